"""Induced atomic dipoles: the field they respond to, their energy, and the physics at long range."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase import Atoms

from aiida_emlip.models.electrostatics import Electrostatics, ElectrostaticsConfig
from aiida_emlip.models.graph import build_graph
from aiida_emlip.models.heads.base import HeadInput
from aiida_emlip.models.induction import Induction, InductionConfig
from aiida_emlip.models.model import EmlipModel, ModelConfig, model_capabilities
from aiida_emlip.models.response import polarizability
from aiida_emlip.schema import COULOMB_CONSTANT as KE

SIGMA = 1.0
BACKBONE = {
    "num_channels": 4,
    "num_interactions": 1,
    "correlation": 2,
    "max_ell": 1,
    "r_max": 4.0,
    "mlp_hidden": 4,
}


def _fields(atoms: Atoms, charges: np.ndarray, dipoles: np.ndarray | None = None) -> torch.Tensor:
    """Induction.fields of the given Gaussian multipoles (no model needed)."""
    graph = build_graph(atoms, 3.0)
    solver = Electrostatics(ElectrostaticsConfig(sigma=SIGMA, accuracy=1e-9))
    inp = HeadInput(graph, graph.positions, graph.cell, None, None, solver)
    induction = Induction(InductionConfig(enabled=True), num_scalars=1).double()
    p = None if dipoles is None else torch.tensor(dipoles)
    return induction.fields(inp, torch.tensor(charges), p).detach()


def _coulomb_forces(atoms: Atoms, charges: np.ndarray) -> np.ndarray:
    graph = build_graph(atoms, 3.0)
    solver = Electrostatics(ElectrostaticsConfig(sigma=SIGMA, accuracy=1e-9))
    positions = graph.positions.clone().requires_grad_(True)
    energy = solver.energy(torch.tensor(charges), positions, graph.cell[0], graph.pbc[0])
    (grad,) = torch.autograd.grad(energy, positions)
    return -grad.numpy()


def _random_cell(pbc, seed: int = 0) -> Atoms:
    rng = np.random.default_rng(seed)
    shear = 0.3 * rng.normal(size=(3, 3)) * np.array(pbc)[:, None]
    cell = np.diag([7.0, 8.0, 9.0 if all(pbc) else 22.0]) + shear
    return Atoms("H6", scaled_positions=rng.uniform(0.1, 0.6, size=(6, 3)), cell=cell, pbc=pbc)


@pytest.mark.parametrize("pbc", [(True, True, True), (True, True, False), (False, False, False)])
@pytest.mark.parametrize("total", [0.0, 1.0])
def test_field_is_the_coulomb_force_per_charge(pbc, total):
    """F_i = q_i E_i: the field at an atom is that of every other charge (images, background and the
    slab correction included); an atom's own Gaussian exerts none on it."""
    atoms = _random_cell(pbc, seed=3)
    rng = np.random.default_rng(1)
    charges = rng.normal(size=6)
    charges += (total - charges.sum()) / 6
    field = _fields(atoms, charges).numpy()
    forces = _coulomb_forces(atoms, charges)
    np.testing.assert_allclose(charges[:, None] * field, forces, atol=1e-7 * np.abs(forces).max())
    assert np.abs(field).max() > 0.1


def test_field_of_a_gaussian_charge_and_dipole_against_closed_forms():
    """Open boundary: the field of a Gaussian charge (pair kernel erf(r/2σ)/r) and of a Gaussian dipole
    at another atom, from their closed forms."""
    r = 3.7
    atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, r]], pbc=False)
    q = 0.8
    field = _fields(atoms, np.array([q, 0.0])).numpy()
    a = 2.0 * SIGMA
    radial = (2 / math.sqrt(math.pi)) * math.exp(-((r / a) ** 2)) / (a * r) - math.erf(r / a) / r**2
    np.testing.assert_allclose(field[1], [0, 0, -KE * q * radial], atol=1e-10)
    # a dipole p at the origin has φ = −p·∇K, so E = ∇(p·∇K): on its axis E_z = p K''(r), with K the kernel
    p = 0.3
    field = _fields(atoms, np.zeros(2), np.array([[0, 0, p], [0, 0, 0]])).numpy()
    h = 1e-4

    def radial_field(x):
        return (2 / math.sqrt(math.pi)) * math.exp(-((x / a) ** 2)) / (a * x) - math.erf(x / a) / x**2

    second = (radial_field(r + h) - radial_field(r - h)) / (2 * h)  # d²/dr² of erf(r/a)/r
    np.testing.assert_allclose(field[1], [0, 0, KE * p * second], rtol=1e-6, atol=1e-10)
    # a dipole across the axis: E_x = p K'(r)/r (antiparallel to p)
    field = _fields(atoms, np.zeros(2), np.array([[p, 0, 0], [0, 0, 0]])).numpy()
    np.testing.assert_allclose(field[1], [KE * p * radial_field(r) / r, 0, 0], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("with_dipoles", [False, True])
def test_fields_of_a_batch_are_those_of_each_structure_alone(with_dipoles):
    """A batch of open structures (one pair sum for all) and a batch with a periodic cell (one structure
    at a time) give each structure the field it has alone, applied fields included."""
    rng = np.random.default_rng(7)
    structures = [_random_cell((False, False, False), seed=s) for s in (4, 5)]
    structures.append(Atoms("H", positions=[[0.0, 0.0, 0.0]], pbc=False))
    periodic = _random_cell((True, True, True), seed=6)
    fields = [np.array([0.0, 0.0, 0.02]), np.array([0.01, -0.03, 0.0]), np.array([0.0, 0.05, 0.0])]
    for atoms, field in zip(structures, fields):
        atoms.info["external_field"] = field
    periodic.info["external_field"] = fields[0]
    solver = Electrostatics(ElectrostaticsConfig(sigma=SIGMA, accuracy=1e-9))
    induction = Induction(InductionConfig(enabled=True), num_scalars=1).double()

    def fields_of(batch, q, p):
        graph = build_graph(batch, 3.0)
        inp = HeadInput(graph, graph.positions, graph.cell, None, None, solver)
        return induction.fields(inp, torch.tensor(q), None if p is None else torch.tensor(p)).detach()

    for batch in (structures, [structures[0], periodic, structures[1]]):
        sizes = [len(a) for a in batch]
        q = rng.normal(size=sum(sizes))
        p = 0.2 * rng.normal(size=(sum(sizes), 3)) if with_dipoles else None
        together = fields_of(batch, q, p)
        start = 0
        for atoms, n in zip(batch, sizes):
            alone = fields_of([atoms], q[start : start + n], None if p is None else p[start : start + n])
            torch.testing.assert_close(together[start : start + n], alone, rtol=1e-12, atol=1e-13)
            start += n
        assert float(together.abs().max()) > 0.1


def _ion_atom_model() -> EmlipModel:
    torch.manual_seed(0)
    config = ModelConfig(
        elements=["He", "Li"],
        head={"name": "fixed", "formal_charges": {"Li": 1.0, "He": 0.0}},
        backbone=BACKBONE,
        electrostatics={"sigma": SIGMA},
        induction={"enabled": True, "initial_polarizability": 1.4},
    )
    return EmlipModel(config).eval()


def _ion_atom(distance: float) -> Atoms:
    direction = np.array([0.3, 0.4, 0.866]) / np.linalg.norm([0.3, 0.4, 0.866])
    atoms = Atoms("LiHe", positions=[[0, 0, 0], distance * direction], pbc=False)
    atoms.info["total_charge"] = 1.0
    return atoms


def test_ion_induced_dipole_energy_beyond_the_cutoff():
    """An ion and a neutral atom far beyond the cutoff: the energy follows −½ α k_e q²/r⁴ (with the
    Gaussian's erf factor), the induced dipole points away from the cation, and no charge moves."""
    model = _ion_atom_model()
    far = model(build_graph(_ion_atom(60.0), model.cutoff), compute_stress=False)
    alpha_he = float(far["polarizabilities"][1])
    assert alpha_he == pytest.approx(1.4, rel=0.05)  # the readout starts at initial_polarizability
    a = 2.0 * SIGMA

    def field_at(r):  # V/Å along the Li → He direction, the charge kernel erf(r/2σ)/r
        return -KE * ((2 / math.sqrt(math.pi)) * math.exp(-((r / a) ** 2)) / (a * r) - math.erf(r / a) / r**2)

    def induction_energy(r):
        return -0.5 * alpha_he / KE * field_at(r) ** 2

    for r in (6.0, 9.0, 12.0):
        atoms = _ion_atom(r)
        out = model(build_graph(atoms, model.cutoff), compute_stress=False)
        field = field_at(r)
        expected = induction_energy(r)
        binding = float(out["energy"][0] - far["energy"][0])
        assert binding == pytest.approx(expected - induction_energy(60.0), rel=1e-8)
        assert binding == pytest.approx(-0.5 * alpha_he * KE / r**4, rel=0.01)  # point-charge limit
        direction = atoms.positions[1] / np.linalg.norm(atoms.positions[1])
        induced = out["dipoles"][1].detach().numpy()
        np.testing.assert_allclose(induced, alpha_he / KE * field * direction, rtol=1e-8)
        np.testing.assert_allclose(out["charges"].detach().numpy(), [1.0, 0.0], atol=1e-12)
        # force on He along −r̂ (attraction) of size |dE/dr| = 2|E|/r for the 1/r⁴ law
        force = out["forces"][1].detach().numpy()
        assert float(force @ direction) == pytest.approx(4 * expected / r, rel=0.02)


def _energy(model: EmlipModel, atoms: Atoms) -> float:
    out = model(build_graph(atoms, model.cutoff), compute_forces=False, compute_stress=False)
    return float(out["energy"][0])


def test_forces_and_stress_are_derivatives_of_the_energy():
    torch.manual_seed(1)
    config = ModelConfig(
        elements=["H", "O"],
        head={"name": "charges", "dipoles": True},
        backbone={**BACKBONE, "num_interactions": 2},
        induction={"enabled": True},
    )
    model = EmlipModel(config).eval()
    rng = np.random.default_rng(0)
    atoms = Atoms("OH2OH2", positions=rng.uniform(0, 5, size=(6, 3)), cell=np.diag([6.0, 6.5, 7.0]), pbc=True)
    atoms.info["total_charge"] = 0.0
    out = model(build_graph(atoms, model.cutoff))
    forces = out["forces"].detach().numpy()

    def energy(positions, strain=0.0):
        moved = atoms.copy()
        moved.positions = positions
        moved.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
        return _energy(model, moved)

    h = 1e-4
    for i, k in ((0, 0), (2, 1), (4, 2)):
        plus, minus = atoms.positions.copy(), atoms.positions.copy()
        plus[i, k] += h
        minus[i, k] -= h
        assert -(energy(plus) - energy(minus)) / (2 * h) == pytest.approx(forces[i, k], abs=1e-6)
    stress = out["stress"][0].detach().numpy()
    for a, b in ((0, 0), (1, 2)):
        strain = np.zeros((3, 3))
        strain[a, b] = strain[b, a] = 0.5 * h if a != b else h
        derivative = (energy(atoms.positions, strain) - energy(atoms.positions, -strain)) / (2 * h)
        assert derivative / atoms.get_volume() == pytest.approx(stress[a, b], abs=1e-7)
    assert float(out["polarizabilities"].min()) > 0.0
    # the induced part lowers the energy: the same model without it lies higher, by far more than round-off
    # (the untrained charges are small, 0.004 e here, and the induced energy goes with their field squared)
    plain = EmlipModel(ModelConfig(elements=["H", "O"], head=config.head, backbone=config.backbone)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("induction.")})
    assert float(out["energy"][0]) < _energy(plain, atoms) - 1e-7


def test_polarizability_of_an_isolated_atom_is_its_readout():
    """∂d/∂E of one atom in a large cell is α/k_e exactly (first order, no charges around it)."""
    model = _ion_atom_model()
    atoms = Atoms("He", positions=[[1.0, 2.0, 3.0]], cell=np.eye(3) * 12.0, pbc=True)
    atoms.info["total_charge"] = 0.0
    out = model(build_graph(atoms, model.cutoff), compute_stress=False)
    alpha = float(out["polarizabilities"][0])
    np.testing.assert_allclose(polarizability(model, atoms), np.eye(3) * alpha / KE, rtol=1e-10, atol=1e-14)


def test_capabilities_and_config_checks():
    assert model_capabilities({"head": {"name": "sr"}}) == frozenset()
    enabled = model_capabilities({"head": {"name": "charges"}, "induction": {"enabled": True}})
    assert enabled == {"charges", "atomic_dipoles", "polarizability"}
    with pytest.raises(ValueError, match="unknown key"):
        ModelConfig(elements=["H"], induction={"enable": True})
    with pytest.raises(ValueError, match="initial_polarizability"):
        ModelConfig(elements=["H"], induction={"enabled": True, "initial_polarizability": 0.0})
    with pytest.raises(ValueError, match="enabled must be true or false, got 'no'"):
        ModelConfig(elements=["H"], induction={"enabled": "no"})  # a string would otherwise switch it on
    with pytest.raises(ValueError, match="hidden must be an integer"):
        ModelConfig(elements=["H"], induction={"enabled": True, "hidden": "16"})


def test_model_file_keeps_the_induction(tmp_path):
    from aiida_emlip.models.io import load_model, save_model

    model = _ion_atom_model()
    with torch.no_grad():
        model.induction.readout[-1].bias.add_(0.7)  # not the initial value: the weights must travel
    path = save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(path)
    assert loaded.config.induction == {"enabled": True, "initial_polarizability": 1.4}
    graph = build_graph(_ion_atom(7.0), model.cutoff)
    a, b = model(graph, compute_stress=False), loaded(graph, compute_stress=False)
    np.testing.assert_allclose(b["energy"].detach(), a["energy"].detach(), rtol=1e-12)
    np.testing.assert_allclose(b["polarizabilities"].detach(), a["polarizabilities"].detach(), rtol=1e-12)
