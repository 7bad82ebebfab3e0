"""Fragments beyond each other's receptive field keep integer charges in the insulating heads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from models_helpers import evaluate, nacl_cell, tiny_model

from aiida_emlip.models.fragments import correct_fragment_charges, fragment_index, integer_targets
from aiida_emlip.models.graph import build_graph

CHARGES = {"name": "charges", "correction": "weighted"}
SPLIT_NO_FORMAL = {"name": "split", "formal_charges": {}}


def ion_and_water(distance: float, ion: str = "Na", charge: float = 1.0, water: Atoms | None = None) -> Atoms:
    """An ion ``distance`` Å from a water's oxygen in a 24 Å open box; ``total_charge`` set."""
    atoms = (water if water is not None else molecule("H2O")).copy()
    atoms += Atoms(ion, positions=[[0.0, 0.0, distance]])
    atoms.info["total_charge"] = charge
    return atoms


def fragment_sums(charges: torch.Tensor) -> list[float]:
    return [float(charges[:3].sum()), float(charges[3:].sum())]


def test_fragments_are_the_parts_no_edge_joins():
    far, near = ion_and_water(9.0), ion_and_water(2.5)
    periodic = nacl_cell()
    gas = Atoms("H2O", positions=[[0, 0, 0], [0, 0, 0.74], [6.0, 0, 0]])  # H2 and a lone O
    graph = build_graph([far, near, periodic, gas], 4.0, torch.float64)
    index, count = fragment_index(graph)
    assert count == 2 + 1 + 1 + 2
    assert index.tolist() == [0, 0, 0, 1] + [2] * 4 + [3] * 8 + [4, 4, 5]


def test_fragment_labels_survive_a_long_chain():
    """A chain of 40 atoms 3 Å apart is one fragment (label propagation reaches its end)."""
    chain = Atoms("H40", positions=[[3.0 * i, 0.0, 0.0] for i in range(40)])
    index, count = fragment_index(build_graph([chain], 4.0, torch.float64))
    assert count == 1 and int(index.max()) == 0


def test_integer_targets_round_then_hand_out_the_remainder():
    batch = torch.tensor([0, 0, 0, 1, 1])
    sizes = torch.tensor([3, 1, 5, 2, 2])
    # structure 0: predictions 0.3, 0.45, -0.2 (round to 0, 0, 0) with Q = +1: the unit goes to the
    # fragment nearest to rounding up (0.45); structure 1: 1.6, 0.7 (2, 1) with Q = 1: two units come
    # off, first from the one nearest to rounding down (0.7 → 0), then from the other (1.6 → 1)
    predicted = torch.tensor([0.3, 0.45, -0.2, 1.6, 0.7], dtype=torch.float64)
    targets, remainders = integer_targets(predicted, batch, torch.tensor([1.0, 1.0]), sizes)
    assert targets.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert remainders.tolist() == [0.0, 0.0]
    # a non-integer total leaves its fraction to be shared
    targets, remainders = integer_targets(predicted, batch, torch.tensor([-0.25, 2.0]), sizes)
    assert targets[:3].tolist() == [0.0, 0.0, 0.0] and remainders[0] == pytest.approx(-0.25)
    # ties go to the larger fragment
    targets, _ = integer_targets(
        torch.zeros(3, dtype=torch.float64),
        torch.zeros(3, dtype=torch.long),
        torch.tensor([-1.0]),
        torch.tensor([1, 4, 2]),
    )
    assert targets.tolist() == [0.0, -1.0, 0.0]


@pytest.mark.parametrize("head", [CHARGES, SPLIT_NO_FORMAL], ids=["charges", "split"])
def test_separated_fragments_carry_integer_charges(head):
    """Na + H2O 9 Å apart (beyond the 4 Å cutoff), Q = +1: each fragment an integer, summing to Q.

    The same model with one shared correction leaks a fraction of the excess onto the water.
    """
    for seed in range(3):
        model = tiny_model(head, seed=seed)
        out = evaluate(model, ion_and_water(9.0))
        sums = fragment_sums(out["charges"])
        assert sum(sums) == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(sums, np.round(sums), atol=1e-12)
        shared = tiny_model({**head, "fragments": "shared"}, seed=seed)
        leak = fragment_sums(evaluate(shared, ion_and_water(9.0))["charges"])
        assert sum(leak) == pytest.approx(1.0, abs=1e-12)
        assert min(abs(s - round(s)) for s in leak) > 1e-3


def test_a_distant_fragment_does_not_change_the_ion_charge():
    """Replacing the water 9 Å away by a distorted one leaves the ion's charge as it was."""
    model = tiny_model(CHARGES, seed=1)
    distorted = molecule("H2O")
    distorted.positions[1] += [0.1, -0.05, 0.08]
    ion = [float(evaluate(model, ion_and_water(9.0, water=w))["charges"][3]) for w in (None, distorted)]
    assert ion[0] == pytest.approx(ion[1], abs=1e-12)
    shared = tiny_model({**CHARGES, "fragments": "shared"}, seed=1)
    ion = [float(evaluate(shared, ion_and_water(9.0, water=w))["charges"][3]) for w in (None, distorted)]
    assert abs(ion[0] - ion[1]) > 1e-6


def test_one_fragment_is_the_usual_correction():
    """A periodic crystal (one fragment) gets exactly the charges of the structure-wide correction."""
    cell = nacl_cell(seed=2)
    cell.info["total_charge"] = -1.0
    cluster = ion_and_water(2.4)
    for head in (CHARGES, SPLIT_NO_FORMAL):
        integer = evaluate(tiny_model(head, seed=3), [cell, cluster])["charges"]
        shared = evaluate(tiny_model({**head, "fragments": "shared"}, seed=3), [cell, cluster])["charges"]
        torch.testing.assert_close(integer, shared, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "head",
    [CHARGES, {"name": "qeq", "fragments": "integer"}, {"name": "functional", "fragments": "integer"}],
    ids=["charges", "qeq", "functional"],
)
def test_forces_of_separated_fragments_are_energy_gradients(head):
    """Cl⁻ 7.5 Å from a water: with integer fragments the energy stays a function of the positions
    (the equilibrating heads' constrained minimum is stationary in q: Hellmann–Feynman), so the forces
    equal central differences of the energy."""
    model = tiny_model(head, seed=4)
    atoms = ion_and_water(7.5, ion="Cl", charge=-1.0)
    atoms.positions += np.random.default_rng(0).normal(scale=0.05, size=atoms.positions.shape)
    forces = evaluate(model, atoms)["forces"].numpy()
    h = 1e-5
    for i, k in [(0, 2), (3, 2), (1, 0)]:
        energies = []
        for step in (h, -h):
            moved = atoms.copy()
            moved.positions[i, k] += step
            energies.append(float(evaluate(model, moved)["energy"][0]))
        assert forces[i, k] == pytest.approx(-(energies[0] - energies[1]) / (2 * h), abs=1e-6)


def test_unknown_fragment_mode_is_refused():
    with pytest.raises(ValueError, match="fragments must be one of"):
        tiny_model({**CHARGES, "fragments": "none"})


SCF = {"name": "scf", "update": "mlp", "tol": 1e-12, "unroll_steps": 200}


def test_scf_gives_each_fragment_its_own_integer_charge_and_mu():
    """scf at constant Q: Na + H2O 9 Å apart keep integer charges; one shared μ leaks charge."""
    atoms = ion_and_water(9.0)
    model = tiny_model(SCF, seed=2)
    out = evaluate(model, atoms)
    sums = fragment_sums(out["charges"])
    assert bool(out["converged"].all())
    np.testing.assert_allclose(sums, np.round(sums), atol=1e-10)
    assert sum(sums) == pytest.approx(1.0, abs=1e-10)
    shared = evaluate(tiny_model({**SCF, "fragments": "shared"}, seed=2), atoms)
    leak = fragment_sums(shared["charges"])
    assert sum(leak) == pytest.approx(1.0, abs=1e-10)
    assert min(abs(s - round(s)) for s in leak) > 1e-3


def test_scf_modes_agree_with_fragments():
    """direct (μ of each fragment from its constraint), unrolled and implicit reach the converged
    charges and forces; parameter gradients through the implicit solve (one μ row per fragment)
    equal those of the unrolled iteration."""
    atoms = ion_and_water(7.0, ion="Cl", charge=-1.0)
    atoms.positions += np.random.default_rng(1).normal(scale=0.05, size=atoms.positions.shape)
    model = tiny_model(SCF, seed=3)
    ref = evaluate(model, atoms)
    graph = build_graph([atoms], model.cutoff, model.dtype)
    direct = model(graph, scf_mode="direct", reference_charges=ref["charges"], compute_stress=False)
    np.testing.assert_allclose(direct["charges"].detach().numpy(), ref["charges"].numpy(), atol=1e-10)
    grads = {}
    for mode in ("unrolled", "implicit"):
        out = model(graph, scf_mode=mode, compute_stress=False)
        np.testing.assert_allclose(out["charges"].detach().numpy(), ref["charges"].numpy(), atol=1e-9)
        np.testing.assert_allclose(out["forces"].detach().numpy(), ref["forces"].numpy(), atol=1e-7)
        loss = out["energy"].sum() + (out["charges"] ** 2).sum()
        params = list(model.head.parameters())
        grads[mode] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    np.testing.assert_allclose(grads["implicit"].numpy(), grads["unrolled"].numpy(), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize(
    "head",
    [
        {**SCF, "update": "linear"},
        {"name": "functional", "parametrization": "softness", "fragments": "integer"},
    ],
    ids=["scf", "functional"],
)
def test_dissociation_curve_ends_in_neutral_atoms(head):
    """NaCl pulled apart (Q = 0): a fractional charge transfer while the atoms share the cutoff
    sphere, the neutral atoms beyond it; with one shared μ a fraction stays at 12 Å (QEq-like)."""
    model = tiny_model(head, seed=5)
    shared = tiny_model({**head, "fragments": "shared"}, seed=5)
    curve, leak = {}, {}
    for distance in (2.4, 3.0, 3.6, 4.5, 8.0, 12.0):
        pair = Atoms("NaCl", positions=[[0, 0, 0], [distance, 0, 0]])
        pair.info["total_charge"] = 0.0
        curve[distance] = float(evaluate(model, pair)["charges"][0])
        leak[distance] = float(evaluate(shared, pair)["charges"][0])
    assert all(abs(curve[d]) > 1e-3 for d in (2.4, 3.0, 3.6))  # bonded: charge transfer
    assert all(abs(curve[d]) < 1e-12 for d in (4.5, 8.0, 12.0))  # beyond the 4 Å cutoff: neutral atoms
    assert all(curve[d] == pytest.approx(leak[d], abs=1e-12) for d in (2.4, 3.0, 3.6))  # one fragment
    assert abs(leak[12.0]) > 1e-3


def test_non_finite_local_charges_stay_non_finite():
    """A NaN readout is not rounded into an integer: it reaches the model's non-finite check."""
    predicted = torch.tensor([0.4, math.nan], dtype=torch.float64)
    targets, _ = integer_targets(predicted, torch.tensor([0, 0]), torch.tensor([1.0]), torch.tensor([1, 3]))
    assert bool(torch.isnan(targets).all())


def test_the_weights_decide_which_fragment_takes_the_excess():
    """Local sums Na 0.2, water 0.3 with Q = +1: bare rounding would hand the unit to the water (the
    larger fraction); the weights that carry the excess to Na in a connected structure hand it to Na."""
    atoms = ion_and_water(9.0)
    graph = build_graph([atoms], 4.0, torch.float64)
    local = torch.tensor([0.1, 0.1, 0.1, 0.2], dtype=torch.float64)
    weights = torch.tensor([0.01, 0.01, 0.01, 10.0], dtype=torch.float64)
    charges = correct_fragment_charges(local, graph, weights)
    assert fragment_sums(charges) == pytest.approx([0.0, 1.0], abs=1e-12)
    uniform = correct_fragment_charges(local, graph)  # equal weights: the water's larger share wins
    assert fragment_sums(uniform) == pytest.approx([1.0, 0.0], abs=1e-12)


def test_training_supervises_the_structure_wide_fragment_charges():
    """The charge loss adds (structure-wide fragment charge − reference)² for structures that fall
    apart; it reaches the readout of an ion that carries exactly its integer (no other gradient)."""
    from aiida_emlip import schema
    from aiida_emlip.training.data import Batch
    from aiida_emlip.training.losses import fragment_residuals, loss_terms

    model = tiny_model(CHARGES, seed=6)
    far, near = ion_and_water(9.0), ion_and_water(2.4)
    graph = build_graph([far, near], model.cutoff, model.dtype)
    reference = torch.tensor([-0.8, 0.4, 0.4, 1.0] * 2, dtype=torch.float64)
    batch = Batch(
        graph=graph,
        labels={schema.CHARGES: reference},
        masks={schema.CHARGES: torch.tensor([True, True])},
        num_atoms=torch.tensor([4, 4]),
    )
    out = model(graph, compute_forces=False, compute_stress=False)
    fragments = fragment_residuals(out, batch)
    assert fragments.shape == (2,)  # the two fragments of the far structure only
    shared = out["fragment_charges"][:2]
    torch.testing.assert_close(fragments, shared - torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert float(shared.detach().sum()) == pytest.approx(1.0, abs=1e-12)
    terms = loss_terms(out, batch, {"charges": 1.0})
    atoms_only = float(((out["charges"] - reference) ** 2).mean())
    assert float(terms["charges"]) == pytest.approx(atoms_only + float((fragments**2).mean()), rel=1e-12)
    readout = list(model.head.readout.parameters())[-1]
    grad_far = torch.autograd.grad((fragments**2).mean(), readout, retain_graph=True)[0]
    assert float(grad_far.abs().max()) > 0
