"""Physics of the local heads: derivatives, invariances, charge conservation, fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models_helpers import HEAD_CONFIGS, evaluate, nacl_cell, tiny_model, water_cluster
from scipy.spatial.transform import Rotation

from aiida_emlip.models.heads.base import ChargeConstraintError

HEADS = list(HEAD_CONFIGS)


def _structure(kind: str):
    return nacl_cell() if kind == "periodic" else water_cluster()


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("kind", ["periodic", "finite"])
def test_forces_are_minus_energy_gradient(head, kind):
    """Directional central finite difference of E along a random displacement (Richardson-extrapolated
    from steps h and h/2, error O(h⁴)) equals -F·u."""
    model = tiny_model(HEAD_CONFIGS[head])
    atoms = _structure(kind)
    out = evaluate(model, atoms, compute_stress=False)
    u = np.random.default_rng(1).normal(size=atoms.positions.shape)

    def central(h: float) -> float:
        energies = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions += sign * h * u
            energies.append(
                float(evaluate(model, moved, compute_forces=False, compute_stress=False)["energy"][0])
            )
        return (energies[0] - energies[1]) / (2 * h)

    fd = (4 * central(0.5e-4) - central(1e-4)) / 3
    analytic = -float((out["forces"].numpy() * u).sum())
    assert fd == pytest.approx(analytic, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("head", HEADS)
def test_stress_is_strain_derivative(head):
    """(1/V) dE/dε along a random symmetric strain equals the stress contracted with it."""
    model = tiny_model(HEAD_CONFIGS[head])
    atoms = nacl_cell()
    out = evaluate(model, atoms)
    eps = np.random.default_rng(2).normal(size=(3, 3))
    eps = 0.5 * (eps + eps.T)
    h = 1e-5
    energies = []
    for sign in (1, -1):
        strained = atoms.copy()
        strained.set_cell(atoms.cell.array @ (np.eye(3) + sign * h * eps), scale_atoms=True)
        energies.append(
            float(evaluate(model, strained, compute_forces=False, compute_stress=False)["energy"][0])
        )
    fd = (energies[0] - energies[1]) / (2 * h) / atoms.get_volume()
    analytic = float((out["stress"][0].numpy() * eps).sum())
    assert fd == pytest.approx(analytic, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("head", HEADS)
def test_invariance_rotation_translation_permutation(head):
    model = tiny_model(HEAD_CONFIGS[head])
    atoms = water_cluster()
    ref = evaluate(model, atoms)
    rot = Rotation.random(random_state=3).as_matrix()
    moved = atoms.copy()
    moved.positions = atoms.positions @ rot.T + np.array([0.7, -1.1, 2.3])
    perm = np.random.default_rng(4).permutation(len(atoms))
    for other, order, r in ((moved, np.arange(len(atoms)), rot), (atoms[perm], perm, np.eye(3))):
        out = evaluate(model, other)
        assert float(out["energy"][0]) == pytest.approx(float(ref["energy"][0]), abs=1e-9)
        np.testing.assert_allclose(out["forces"].numpy(), ref["forces"].numpy()[order] @ r.T, atol=1e-9)
        if ref["charges"] is not None:
            np.testing.assert_allclose(out["charges"].numpy(), ref["charges"].numpy()[order], atol=1e-10)


@pytest.mark.parametrize("head", ["charges", "charges-weighted-dipoles", "split"])
@pytest.mark.parametrize("charge", [0.0, 1.0, -2.0])
def test_total_charge_exact(head, charge):
    model = tiny_model(HEAD_CONFIGS[head], seed=5)
    atoms = water_cluster(charge)
    periodic = nacl_cell()
    periodic.info["total_charge"] = charge
    out = evaluate(model, [atoms, periodic])
    sums = [float(out["charges"][:5].sum()), float(out["charges"][5:].sum())]
    assert sums == pytest.approx([charge, charge], abs=1e-12)


@pytest.mark.parametrize("head", ["charges-loss", "latent"])
def test_unconstrained_heads_report_their_total_charge(head):
    """Loss-only and latent charges do not meet Q by construction; the sum is what the readout gives."""
    model = tiny_model(HEAD_CONFIGS[head], seed=6)
    out_neutral = evaluate(model, water_cluster(0.0))
    out_charged = evaluate(model, water_cluster(1.0))
    assert abs(float(out_neutral["charges"].sum())) > 1e-3
    np.testing.assert_allclose(out_neutral["charges"].numpy(), out_charged["charges"].numpy())


def test_split_conserves_charge_for_any_weights():
    for seed in range(5):
        model = tiny_model(HEAD_CONFIGS["split"], seed=seed)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        out = evaluate(model, nacl_cell(seed))
        assert float(out["charges"].sum()) == pytest.approx(0.0, abs=1e-10)
        assert float(out["charges"].abs().max()) > 1e-3


def _pair_charge(model, distance: float) -> tuple[float, float]:
    """Na's charge and the energy of an NaCl pair ``distance`` Å apart in vacuum."""
    from ase import Atoms

    atoms = Atoms("NaCl", positions=[[0.0, 0.0, 0.0], [distance, 0.0, 0.0]])
    atoms.info["total_charge"] = 0.0
    out = evaluate(model, atoms)
    return float(out["charges"][0]), float(out["energy"])


def test_split_transfers_vanish_at_the_graphs_cutoff():
    """Transfers ride on the graph's edges, which end at r_max: with the cutoff left out it is r_max, and
    the cosine envelope takes the charge moved between two atoms to zero as their bond reaches r_max, so
    charges and energy are continuous there. Transfers kept whole up to a 5 Å cutoff (older model files)
    jump to zero as the bond crosses the graph's r_max."""
    model = tiny_model(HEAD_CONFIGS["split"], seed=1)
    assert model.config.head["cutoff"] == model.cutoff == 4.0  # resolved, explicit in the model's config
    assert model.config.head["envelope"] == "cosine"
    inside, outside = _pair_charge(model, 4.0 - 1e-9), _pair_charge(model, 4.0 + 1e-9)
    assert abs(inside[0] - outside[0]) < 1e-9 and abs(inside[1] - outside[1]) < 1e-7
    assert abs(_pair_charge(model, 3.0)[0] - 1.0) > 1e-3  # charge does move along the bond
    former = tiny_model({**HEAD_CONFIGS["split"], "cutoff": 5.0, "envelope": "step"}, seed=1)
    inside, outside = _pair_charge(former, 4.0 - 1e-9), _pair_charge(former, 4.0 + 1e-9)
    assert abs(inside[0] - outside[0]) > 1e-4 and abs(inside[1] - outside[1]) > 1e-4


def test_split_cutoff_beyond_the_backbone_is_refused_for_training_and_read_from_older_files():
    from aiida_emlip.models.file_layout import FORMER_SPLIT, explicit_head, model_for_weights
    from aiida_emlip.training.config import ConfigError, parse_config

    head = {"name": "split", "formal_charges": {"Na": 1.0, "Cl": -1.0}}
    values = {
        "data": {"train": "x.xyz"},
        "model": {"head": {**head, "cutoff": 4.5}, "backbone": {"r_max": 4.0}},
    }
    with pytest.raises(ConfigError, match=r"model\.head\.cutoff 4\.5 Å exceeds the backbone's r_max 4\.0 Å"):
        parse_config(values)
    assert parse_config({**values, "model": {"head": head, "backbone": {"r_max": 4.0}}}).model["head"] == head
    # a model file written before the envelope existed lacks it: read as it was trained, transfers whole
    # up to 5 Å unless the file names another cutoff
    config = {"elements": ["Na", "Cl"], "head": head, "backbone": {"r_max": 4.0, "num_channels": 4}}
    assert FORMER_SPLIT == {"cutoff": 5.0, "envelope": "step"}
    model = model_for_weights(config, {})
    assert model.head.options.cutoff == 5.0 and model.config.head["envelope"] == "step"
    assert explicit_head({**config, "head": {**head, "cutoff": 3.0}})["head"]["cutoff"] == 3.0
    current = {**config, "head": {**head, "envelope": "cosine"}}
    assert explicit_head(current) == current
    assert model_for_weights(current, {}).head.options.cutoff == 4.0


def _small_cells():
    """A periodic cell smaller than the cutoff (edges to many images), a slab and a cluster, batched."""
    from ase import Atoms

    tiny = Atoms(
        "NaCl", positions=[[0, 0, 0], [0.9, 1.0, 0.95]], cell=[[1.9, 0, 0], [0.3, 2.0, 0], [0, 0.2, 1.95]]
    )
    tiny.pbc = True
    tiny.info["total_charge"] = 0.0
    slab = nacl_cell(2)
    slab.pbc = (True, True, False)
    slab.cell[2] = [0, 0, 20.0]
    return [tiny, slab, water_cluster(1.0)]


def test_reverse_edges_pair_every_edge_with_its_opposite():
    from aiida_emlip.models.graph import build_graph

    graph = build_graph(_small_cells(), 4.0, torch.float64)
    reverse = graph.reverse_edges()
    sender, receiver = graph.edge_index
    assert reverse is not None and graph.unit_shifts.abs().max() >= 2  # several images of one atom
    assert torch.equal(reverse[reverse], torch.arange(sender.numel()))
    assert torch.equal(sender[reverse], receiver) and torch.equal(receiver[reverse], sender)
    assert torch.equal(graph.unit_shifts[reverse], -graph.unit_shifts)
    vectors = graph.edge_vectors(graph.positions, graph.cell)
    assert torch.equal(vectors[reverse], -vectors)  # exactly: lengths and radial features agree bit for bit
    graph.edge_index = graph.edge_index[:, 1:]  # one direction of a pair missing
    graph.unit_shifts = graph.unit_shifts[1:]
    assert graph.reverse_edges() is None


def test_split_reads_each_pair_once_with_the_same_result(monkeypatch):
    """One transfer readout per directed edge, antisymmetrised through the reverse edge, gives exactly
    what two readouts per edge give (the fallback when an edge has no reverse)."""
    from aiida_emlip.models.graph import Graph, build_graph

    model = tiny_model(HEAD_CONFIGS["split"], seed=3)
    graph = build_graph(_small_cells(), model.cutoff, model.dtype)
    fast = model(graph)
    monkeypatch.setattr(Graph, "reverse_edges", lambda self: None)
    slow = model(graph)
    for key in ("energy", "forces", "stress", "charges", "dipoles"):
        torch.testing.assert_close(fast[key], slow[key], rtol=0, atol=1e-12, equal_nan=True)
    assert float(fast["charges"].abs().max()) > 1e-3


def test_split_born_charges_acoustic_sum_rule():
    """Σ_i Z*_i = Q·1 because a rigid translation moves the polarisation by Q·δ."""
    from aiida_emlip.models.graph import build_graph

    model = tiny_model(HEAD_CONFIGS["split"], seed=7)
    atoms = nacl_cell()
    graph = build_graph([atoms], model.cutoff, model.dtype)
    graph.positions.requires_grad_(True)
    from aiida_emlip.models.heads.base import HeadInput

    feats = model.backbone(graph, graph.positions, graph.cell)
    inp = HeadInput(
        graph, graph.positions, graph.cell, feats, model.backbone.species(graph.numbers), model.electrostatics
    )
    polarization = model.head(inp).dipole[0]
    born = torch.stack(
        [torch.autograd.grad(polarization[a], graph.positions, retain_graph=True)[0] for a in range(3)]
    )
    total = born.sum(dim=1)  # [3 (P component), 3 (displacement)]
    np.testing.assert_allclose(total.detach().numpy(), np.zeros((3, 3)), atol=1e-10)
    assert float(born.abs().max()) > 1e-2


def test_fixed_refuses_wrong_total_charge():
    model = tiny_model(HEAD_CONFIGS["fixed"])
    atoms = nacl_cell()
    atoms.info["total_charge"] = 1.0
    with pytest.raises(ChargeConstraintError, match="formal charges sum to"):
        evaluate(model, atoms)


@pytest.mark.parametrize("head", ["fixed", "charges", "split"])
def test_field_energy_is_minus_field_dot_dipole(head):
    """For local heads the charges ignore the field, so dE/dE_ext = -d exactly."""
    model = tiny_model(HEAD_CONFIGS[head])
    atoms = water_cluster()
    field = np.array([0.02, -0.01, 0.03])
    atoms.info["external_field"] = field
    base = water_cluster()
    out, ref = evaluate(model, atoms), evaluate(model, base)
    expected = float(ref["energy"][0]) - float(field @ ref["dipole"][0].numpy())
    assert float(out["energy"][0]) == pytest.approx(expected, abs=1e-10)


def test_unknown_head_and_option_are_errors():
    with pytest.raises(ValueError, match="available heads"):
        tiny_model({"name": "nope"})
    with pytest.raises(ValueError, match="unknown option"):
        tiny_model({"name": "charges", "colour": "red"})
    with pytest.raises(ValueError, match="correction must be one of"):
        tiny_model({"name": "charges", "correction": "sometimes"})


def test_unknown_element_is_an_error():
    from ase import Atoms

    model = tiny_model(HEAD_CONFIGS["sr"])
    with pytest.raises(ValueError, match="unknown to this model"):
        evaluate(model, Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]]))
