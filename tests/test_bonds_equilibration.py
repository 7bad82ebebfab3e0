"""Bond-mediated equilibration (`qeq`, `functional` with `fragments=bonds`): split-charge equilibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from models_helpers import evaluate, gradient_and_central_difference, nacl_cell, tiny_model
from test_fragments import fragment_sums, ion_and_water

from aiida_emlip.models.graph import build_graph
from aiida_emlip.models.heads.bonds import fragment_projector, laplacian_apply, laplacian_matrix
from aiida_emlip.models.model import model_capabilities

FORMAL = {"Na": 1.0, "Cl": -1.0, "O": -0.6, "H": 0.3}
QEQ = {"name": "qeq", "fragments": "bonds", "formal_charges": FORMAL}
FUNCTIONAL = {"name": "functional", "fragments": "bonds", "formal_charges": FORMAL}  # quartic: Newton
SOFTNESS = {**FUNCTIONAL, "parametrization": "softness"}
HEADS = [QEQ, FUNCTIONAL, SOFTNESS]
IDS = ["qeq", "functional", "functional-softness"]


def _oxygen_z() -> float:
    return float(molecule("H2O").positions[0, 2])


def test_laplacian_matrix_and_product_agree_and_conserve_charge():
    """Both forms of L from directed edges (each bond twice): equal; rows sum to zero (charge moved along
    bonds is conserved); a self-image edge moves nothing; the projector is the mean of each fragment."""
    sender = torch.tensor([0, 1, 1, 2, 3])
    receiver = torch.tensor([1, 0, 2, 1, 3])  # bonds 0–1 and 1–2 both ways, and 3 with its own image
    g = torch.tensor([0.5, 0.5, 2.0, 2.0, 7.0], dtype=torch.float64)
    lap = laplacian_matrix(g, sender, receiver, 4)
    expected = torch.tensor(
        [[0.5, -0.5, 0, 0], [-0.5, 2.5, -2.0, 0], [0, -2.0, 2.0, 0], [0, 0, 0, 0]], dtype=torch.float64
    )
    torch.testing.assert_close(lap, expected)
    v = torch.tensor([0.3, -1.0, 2.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(laplacian_apply(g, sender, receiver, v), lap @ v)
    projector = fragment_projector(torch.tensor([0, 0, 0, 1]), torch.float64)
    torch.testing.assert_close(projector @ v, torch.tensor([1.3 / 3] * 3 + [5.0], dtype=torch.float64))


@pytest.mark.parametrize("head", HEADS, ids=IDS)
def test_fragments_apart_keep_their_base_charges(head):
    """Na and a water 9 Å apart (beyond the 4 Å cutoff), Q = +1: no bond joins them, so the lone ion keeps
    its base charge exactly and the water its total; within the water charge moves along the O–H bonds
    (in the ion's field too), and where the two touch, charge crosses between them."""
    model = tiny_model(head, seed=1).eval()
    far = evaluate(model, ion_and_water(9.0))
    assert bool(far["converged"].all())
    assert float(far["charges"][3]) == pytest.approx(1.0, abs=1e-12)
    assert fragment_sums(far["charges"])[0] == pytest.approx(0.0, abs=1e-12)
    assert abs(float(far["charges"][0]) + 0.6) > 1e-2  # polarised away from the base charges
    near = evaluate(model, ion_and_water(2.3))
    assert abs(fragment_sums(near["charges"])[1] - 1.0) > 1e-2
    assert sum(fragment_sums(near["charges"])) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("head", HEADS, ids=IDS)
def test_charges_and_energy_are_continuous_as_the_last_bond_leaves(head):
    """The ion's last bond (to O) crosses the 4 Å cutoff: with bonds the charges and energy move by
    less than 1e-6 across it; one μ per fragment (``integer``) jumps there by what the shared solution
    had moved (the pathology this mode removes)."""
    crossing = 4.0 + _oxygen_z()
    eps = 1e-5
    model = tiny_model(head, seed=2).eval()
    inside, outside = (evaluate(model, ion_and_water(crossing + s)) for s in (-eps, eps))
    assert float((inside["charges"] - outside["charges"]).abs().max()) < 1e-6
    assert abs(float(inside["energy"] - outside["energy"])) < 1e-6
    integer = tiny_model(
        {k: v for k, v in head.items() if k != "formal_charges"} | {"fragments": "integer"}, seed=2
    )
    before, after = (evaluate(integer, ion_and_water(crossing + s)) for s in (-eps, eps))
    assert float((before["charges"] - after["charges"]).abs().max()) > 1e-3


@pytest.mark.parametrize("head", HEADS, ids=IDS)
@pytest.mark.parametrize("periodic", [False, True], ids=["open", "periodic"])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_forces_are_the_energy_derivatives(head, periodic, training):
    """The energy is stationary in the bond potentials, so the Hellmann–Feynman forces of inference
    (y held fixed) and those through the implicit step of training equal central differences of the
    energy (open Na⁺ + water at contact; a rattled periodic NaCl cell)."""
    atoms = nacl_cell(1) if periodic else ion_and_water(2.6)
    if not periodic:
        atoms.positions += np.random.default_rng(4).normal(scale=0.05, size=atoms.positions.shape)
    model = tiny_model(head, seed=3).train(training)
    forces = evaluate(model, atoms)["forces"].numpy()
    h = 1e-5
    for i, k in [(0, 0), (1, 2), (len(atoms) - 1, 1)]:
        energies = []
        for step in (h, -h):
            moved = atoms.copy()
            moved.positions[i, k] += step
            energies.append(float(evaluate(model, moved)["energy"]))
        assert forces[i, k] == pytest.approx(-(energies[0] - energies[1]) / (2 * h), rel=1e-6, abs=1e-8)
    assert np.abs(forces).max() > 1e-2


@pytest.mark.parametrize("head", [QEQ, FUNCTIONAL], ids=["qeq", "functional"])
def test_iterative_solves_equal_the_dense_ones(head):
    """Beyond ``dense_max_atoms`` each Newton step is a CG solve with the Coulomb operator: the same
    charges and energy as the dense path on a 64-atom periodic cell."""
    atoms = nacl_cell(2).repeat((2, 2, 2))
    atoms.positions += np.random.default_rng(6).normal(scale=0.05, size=atoms.positions.shape)
    dense = evaluate(tiny_model({**head, "solver": "dense"}, seed=5).eval(), atoms)
    iterative = evaluate(tiny_model({**head, "solver": "cg"}, seed=5).eval(), atoms)
    assert bool(iterative["converged"].all())
    assert int(iterative["iterations"][0]) > 5  # CG iterations, where a dense step counts one
    torch.testing.assert_close(iterative["charges"], dense["charges"], atol=1e-7, rtol=0)
    torch.testing.assert_close(iterative["forces"], dense["forces"], atol=1e-6, rtol=0)
    assert float(iterative["energy"]) == pytest.approx(float(dense["energy"]), abs=1e-6)
    assert float((dense["charges"].abs() - 1.0).abs().max()) > 0.05  # bonds moved charge


@pytest.mark.parametrize("head", HEADS, ids=IDS)
def test_training_gradients_through_the_bond_solve(head):
    """In training mode one differentiable Newton step attaches the implicit derivatives: the gradient
    of a loss on energy, forces and charges in a conductance weight and a local readout weight equals
    central differences."""
    atoms = ion_and_water(2.7, ion="Cl", charge=-1.0)
    atoms.positions += np.random.default_rng(1).normal(scale=0.05, size=atoms.positions.shape)
    model = tiny_model(head, seed=3)
    model.train()
    graph = build_graph([atoms], model.cutoff, model.dtype)

    def loss() -> torch.Tensor:
        out = model(graph, compute_stress=False)
        return out["energy"].sum() + 3.0 * (out["charges"] ** 2).sum() + (out["forces"] ** 2).sum()

    for module in (model.head.conductance, model.head.readout):
        grad, difference = gradient_and_central_difference(loss, next(iter(module.parameters())))
        assert grad == pytest.approx(difference, rel=1e-5, abs=1e-9)
        assert abs(grad) > 1e-5


def test_bond_options_are_checked():
    with pytest.raises(ValueError, match="bond_cutoff must be positive"):
        tiny_model({**QEQ, "bond_cutoff": -1.0})
    with pytest.raises(ValueError, match="measured on the training data"):
        tiny_model({**QEQ, "formal_charges": "mean"})
    with pytest.raises(ValueError, match="formal_charges must map"):
        tiny_model({**QEQ, "formal_charges": "formal"})
    model = tiny_model(QEQ)
    assert model.config.head["bond_cutoff"] == pytest.approx(4.0)  # the backbone's r_max


@pytest.mark.parametrize("head", HEADS, ids=IDS)
def test_the_fermi_level_is_the_energy_derivative_in_the_total_charge(head):
    """``fermi_level`` is μ = −∂E/∂Q with the extra charge spread over the base charges (one fragment:
    Na at a water), against central differences in Q."""
    model = tiny_model(head, seed=4).eval()
    assert "fermi_level" in model_capabilities(model.config.to_dict())
    mu = float(evaluate(model, ion_and_water(2.5))["fermi_level"][0])
    h = 1e-4
    energies = [float(evaluate(model, ion_and_water(2.5, charge=1.0 + s))["energy"]) for s in (h, -h)]
    assert mu == pytest.approx(-(energies[0] - energies[1]) / (2 * h), rel=1e-6, abs=1e-8)
    assert abs(mu) > 1e-2


def test_dissociation_curve_fades_into_the_base_charges():
    """NaCl pulled apart (Q = 0, neutral base charges): charge transfer while the atoms are bonded, fading
    with the bond's conductance to nothing at the 4 Å cutoff, and neutral atoms beyond it — where one
    shared μ keeps a fraction at 12 Å."""
    head = {"name": "functional", "parametrization": "softness", "fragments": "bonds"}
    model = tiny_model(head, seed=5).eval()
    shared = tiny_model({"name": "functional", "parametrization": "softness"}, seed=5).eval()

    def sodium(m, distance: float) -> float:
        pair = Atoms("NaCl", positions=[[0, 0, 0], [distance, 0, 0]])
        pair.info["total_charge"] = 0.0
        return float(evaluate(m, pair)["charges"][0])

    curve = {d: sodium(model, d) for d in (2.4, 3.0, 3.6, 3.9, 3.99, 4.5, 8.0)}
    assert min(abs(curve[d]) for d in (2.4, 3.0)) > 1e-2
    assert abs(curve[3.6]) > abs(curve[3.9]) > abs(curve[3.99])
    assert abs(curve[3.99]) < 1e-4
    assert curve[4.5] == 0.0 and curve[8.0] == 0.0
    assert abs(sodium(shared, 12.0)) > 1e-3


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_a_batch_gives_each_structure_its_own_solution(training):
    """Two structures in one batch (open and periodic, one and two fragments) give the charges, energies
    and forces each gives alone."""
    model = tiny_model(FUNCTIONAL, seed=6).train(training)
    structures = [ion_and_water(6.0), nacl_cell(3)]
    batch = evaluate(model, structures)
    alone = [evaluate(model, atoms) for atoms in structures]
    torch.testing.assert_close(batch["charges"], torch.cat([a["charges"] for a in alone]), atol=1e-10, rtol=0)
    torch.testing.assert_close(batch["energy"], torch.cat([a["energy"] for a in alone]), atol=1e-10, rtol=0)
    torch.testing.assert_close(batch["forces"], torch.cat([a["forces"] for a in alone]), atol=1e-9, rtol=0)


def test_bond_cutoff_beyond_the_backbone_is_refused_for_training():
    from aiida_emlip.training.config import ConfigError, parse_config

    values = {
        "data": {"train": "x.xyz"},
        "model": {"head": {**QEQ, "bond_cutoff": 4.5}, "backbone": {"r_max": 4.0}},
    }
    with pytest.raises(
        ConfigError, match=r"model\.head\.bond_cutoff 4\.5 Å exceeds the backbone's r_max 4\.0 Å"
    ):
        parse_config(values)
    parse_config({**values, "model": {"head": {**QEQ, "bond_cutoff": 3.5}, "backbone": {"r_max": 4.0}}})


def test_a_model_file_keeps_the_bonds_and_their_base_charges(tmp_path):
    """Saved and loaded, a ``bonds`` model gives the same charges and energy (the conductance weights,
    base charges and resolved cutoff travel with the file)."""
    from aiida_emlip.models.io import load_model, save_model

    model = tiny_model(FUNCTIONAL, seed=7).eval()
    loaded = load_model(save_model(model, tmp_path / "bonds.safetensors")).eval()
    assert loaded.config.head["bond_cutoff"] == pytest.approx(4.0)
    assert loaded.config.head["formal_charges"] == FORMAL
    atoms = ion_and_water(2.8)
    before, after = evaluate(model, atoms), evaluate(loaded, atoms)
    torch.testing.assert_close(after["charges"], before["charges"], atol=0, rtol=0)
    torch.testing.assert_close(after["energy"], before["energy"], atol=0, rtol=0)
