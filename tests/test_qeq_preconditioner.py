"""Coulomb operators set up once per geometry, and the mesh preconditioner of QEq's conjugate gradients."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from aiida_emlip.models.coulomb_operator import MeshPreconditioner, MeshPreconditionerApply
from aiida_emlip.models.electrostatics import Electrostatics, ElectrostaticsConfig
from aiida_emlip.models.heads.solvers import conjugate_gradient, qeq_solve, qeq_solve_from
from aiida_emlip.schema import COULOMB_CONSTANT

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_heads import structure

DT = torch.float64
SIGMA = 1.5
A_DIAG = COULOMB_CONSTANT / (SIGMA * math.sqrt(math.pi))


def water(n_mol: int, seed: int = 0):
    """A rattled water box of ``n_mol`` molecules (29.9 Å³ each)."""
    gen = torch.Generator().manual_seed(seed)
    side = math.ceil(n_mol ** (1 / 3))
    box = (n_mol * 29.9) ** (1 / 3)
    grid = torch.stack(torch.meshgrid(*[torch.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n_mol]
    centres = (grid.to(DT) + 0.5) * box / side
    rot = torch.linalg.qr(torch.randn(n_mol, 3, 3, generator=gen, dtype=DT))[0]
    h1, h2 = torch.tensor([0.8165, 0.5774, 0.0], dtype=DT), torch.tensor([-0.8165, 0.5774, 0.0], dtype=DT)
    pos = torch.stack([centres, centres + rot @ h1, centres + rot @ h2], 1).reshape(-1, 3)
    pos = pos + 0.05 * torch.randn(pos.shape, generator=gen, dtype=DT)
    return pos, torch.eye(3, dtype=DT) * box


def problem(n: int, hardness: float, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    chi = torch.randn(n, generator=gen, dtype=DT)
    d = hardness * (1.0 + 0.2 * (torch.rand(n, generator=gen, dtype=DT) - 0.5))
    return chi, d


CASES = {
    "periodic": torch.tensor([True, True, True]),
    "slab": torch.tensor([True, True, False]),
    "open": torch.tensor([False, False, False]),
}


@pytest.mark.parametrize("method", ["ewald", "pme"])
@pytest.mark.parametrize("case", list(CASES))
def test_operator_equals_matvec_and_projected_potentials(case, method):
    """The operator of one geometry, set up once from detached tensors, gives ``coulomb_matvec`` and
    ``projected_potentials`` (the differentiable path) of that geometry, also after the same module has
    evaluated another geometry in between."""
    pos, cell = water(40)
    pbc = CASES[case]
    es = Electrostatics(ElectrostaticsConfig(method=method if case != "open" else "auto"))
    x = torch.randn(pos.shape[0], 2, dtype=DT, generator=torch.Generator().manual_seed(3))
    ref = es.coulomb_matvec(x, pos, cell, pbc)
    op = es.coulomb_operator(pos, cell, pbc)
    # another geometry evaluated in between (shared torch-pme calculators): the operator keeps its own
    other = es.coulomb_matvec(x, 0.9 * pos, 0.9 * cell, pbc)
    assert float((other - ref).abs().max()) > 1e-3 * float(ref.abs().max())
    scale = float(ref.abs().max())
    assert float((op(x) - ref).abs().max()) < 1e-12 * scale
    assert float((op(x[:, 0]) - ref[:, 0]).abs().max()) < 1e-12 * scale
    assert not es.coulomb_operator(pos.clone().requires_grad_(True), cell, pbc)(x).requires_grad
    widths = [1.5, 3.0]
    proj = es.projected_operator(pos, cell, pbc, widths)
    ref_p = es.projected_potentials(x[:, 0], pos, cell, pbc, widths)
    assert float((proj.potentials(x[:, 0]) - ref_p).abs().max()) < 1e-12 * float(ref_p.abs().max())
    ref_1 = es.projected_potentials(x[:, 1], pos, cell, pbc, [3.0])[:, 0]
    assert float((proj.potential(x[:, 1], 1) - ref_1).abs().max()) < 1e-12 * float(ref_1.abs().max())


@pytest.mark.parametrize("total", [0.0, 1.0])
@pytest.mark.parametrize("hardness", [2.23, 8.0])
def test_mesh_preconditioned_cg_matches_dense_kkt(total, hardness):
    """Periodic water box (Ewald), neutral and charged: the mesh-preconditioned CG (cold, both
    right-hand sides) and the projected warm-start PCG give the dense KKT charges."""
    pos, cell = water(70)
    pbc = CASES["periodic"]
    es = Electrostatics()
    n = pos.shape[0]
    chi, d = problem(n, hardness)
    exact = qeq_solve(None, d, chi, total, dense=es.coulomb_matrix(pos, cell, pbc))
    op = es.coulomb_operator(pos, cell, pbc)
    mesh = MeshPreconditioner(pos, cell, math.sqrt(2.0) * SIGMA).with_diagonal(d + A_DIAG)
    cold = qeq_solve(op, d, chi, total, precond=mesh, tol=1e-12)
    assert cold.info.converged and not cold.info.fallback
    assert not isinstance(mesh._fallback, MeshPreconditionerApply)  # the bounded form never built
    assert torch.allclose(cold.charges, exact.charges, atol=1e-9, rtol=0)
    assert abs(float(cold.mu - exact.mu)) < 1e-8
    start = exact.charges + 0.05 * torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(5))
    q, mu, info = qeq_solve_from(op, d, chi, total, start, precond=mesh, tol=1e-12)
    assert info.converged
    assert torch.allclose(q, exact.charges, atol=1e-9, rtol=0)
    assert abs(float(mu - exact.mu)) < 1e-8


def test_indefinite_preconditioner_falls_back_to_jacobi():
    """An operator with ``rᵀM⁻¹r ≤ 0`` is replaced by Jacobi; the solves still converge to the answer."""
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(30, 30, generator=gen, dtype=DT)
    spd = m @ m.T + 30.0 * torch.eye(30, dtype=DT)
    b = torch.randn(30, generator=gen, dtype=DT)
    negative = type("Negative", (), {"diag": torch.diagonal(spd).clone(), "__call__": lambda self, r: -r})()
    x, info = conjugate_gradient(lambda v: spd @ v, b, precond=negative, tol=1e-12)
    assert info.converged and info.fallback
    assert torch.allclose(spd @ x, b, atol=1e-9)
    d = torch.zeros(30, dtype=DT)
    exact = qeq_solve(None, d, b, 0.5, dense=spd)
    q, _, info = qeq_solve_from(lambda v: spd @ v, d, b, 0.5, torch.zeros(30, dtype=DT), negative, tol=1e-12)
    assert info.converged and info.fallback
    assert torch.allclose(q, exact.charges, atol=1e-9)


def test_bounded_mesh_preconditioner_is_positive_where_the_mean_one_is_not():
    """A water box with 10 Å of vacuum in a fully periodic cell: the mean form of ``M⁻¹`` has a negative
    eigenvalue, its bounded fallback none; CG starts with the mean form, moves to the bounded one and
    reaches the dense KKT charges."""
    pos, cell = water(70)
    cell = cell.clone()
    cell[2, 2] += 10.0
    n = pos.shape[0]
    chi, d = problem(n, 2.23)
    mesh = MeshPreconditioner(pos, cell, math.sqrt(2.0) * SIGMA).with_diagonal(d + A_DIAG)
    eye = torch.eye(n, dtype=DT)
    lowest = {}
    for name, op in [("mean", mesh), ("bounded", mesh.fallback)]:
        dense = op(eye)
        lowest[name] = float(torch.linalg.eigvalsh(0.5 * (dense + dense.T))[0])
    assert lowest["mean"] < 0.0 < lowest["bounded"], lowest
    assert isinstance(mesh.fallback.fallback, torch.Tensor)  # then Jacobi, against round-off
    es = Electrostatics()
    pbc = CASES["periodic"]
    exact = qeq_solve(None, d, chi, 1.0, dense=es.coulomb_matrix(pos, cell, pbc))
    op = es.coulomb_operator(pos, cell, pbc)
    jacobi = qeq_solve(op, d, chi, 1.0, precond=d + A_DIAG, tol=1e-12)
    sol = qeq_solve(op, d, chi, 1.0, precond=mesh, tol=1e-12)
    assert sol.info.converged and sol.info.fallback
    assert sol.info.iterations <= jacobi.info.iterations
    assert torch.allclose(sol.charges, exact.charges, atol=1e-9, rtol=0)


def test_mesh_preconditioner_cuts_iterations_on_1k_atoms():
    """NaCl, 1000 atoms (PME), J = 5 eV/e², float64, tolerance 1e-10: at least 2× fewer CG iterations
    than Jacobi (measured: 18 against 41), same charges to the tolerance."""
    atoms = structure("nacl", "1k")
    pos, cell = torch.tensor(atoms.positions, dtype=DT), torch.tensor(atoms.cell.array, dtype=DT)
    pbc = CASES["periodic"]
    es = Electrostatics()
    op = es.coulomb_operator(pos, cell, pbc)
    assert op.method == "pme"
    chi, d = problem(len(atoms), 5.0)
    chi = chi + torch.where(torch.tensor(atoms.numbers) == 11, -2.0, 2.0).to(DT)
    jacobi = qeq_solve(op, d, chi, 0.0, precond=d + A_DIAG, tol=1e-10)
    mesh = MeshPreconditioner(pos, cell, math.sqrt(2.0) * SIGMA).with_diagonal(d + A_DIAG)
    fast = qeq_solve(op, d, chi, 0.0, precond=mesh, tol=1e-10)
    assert jacobi.info.converged and fast.info.converged and not fast.info.fallback
    assert fast.info.iterations * 2 <= jacobi.info.iterations
    assert torch.allclose(fast.charges, jacobi.charges, atol=1e-8, rtol=0)


@pytest.mark.parametrize("name", ["qeq", "functional"])
@pytest.mark.parametrize("pbc", [(True, True, True), (True, True, False)])
def test_qeq_head_with_mesh_preconditioner_agrees_with_dense(pbc, name):
    """``qeq`` and ``functional`` (quartic: several Newton steps) with the iterative solver — in
    inference the projected CG, ``preconditioner='mesh'`` by default (periodic; the slab uses Jacobi)
    — and the dense solve agree on a charged NaCl cell: charges, μ, energy and forces."""
    import numpy as np
    from ase.build import bulk
    from models_helpers import evaluate, tiny_model

    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((2, 2, 2))
    atoms.positions += np.random.default_rng(3).normal(scale=0.1, size=atoms.positions.shape)
    atoms.pbc = pbc
    if not all(pbc):
        atoms.cell[2, 2] += 15.0
    atoms.info["total_charge"] = 1.0
    dense = tiny_model({"name": name, "solver": "dense"}, seed=2)
    mesh = tiny_model({"name": name, "solver": "cg", "tol": 1e-12}, seed=2)
    od, om = evaluate(dense, atoms), evaluate(mesh, atoms)
    np.testing.assert_allclose(om["charges"].numpy(), od["charges"].numpy(), atol=1e-8)
    assert float(om["fermi_level"][0]) == pytest.approx(float(od["fermi_level"][0]), abs=1e-8)
    assert float(om["energy"][0]) == pytest.approx(float(od["energy"][0]), abs=1e-8)
    np.testing.assert_allclose(om["forces"].numpy(), od["forces"].numpy(), atol=1e-8)
