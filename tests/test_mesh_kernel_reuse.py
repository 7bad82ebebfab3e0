"""The PME k-space kernel is built once per cell and reused (``Electrostatics.mesh_kernel``): the
numbers do not change, a different cell gets its own, a cell under autograd (stress) never takes a
kept one, the solver's operator and the energy of one evaluation share one, and nothing is kept under
inference mode."""

from __future__ import annotations

import pytest
import torch

from aiida_emlip.models.electrostatics import MESH_KERNELS_KEPT, Electrostatics, ElectrostaticsConfig

DT = torch.float64
PBC = torch.tensor([True, True, True])


def ionic_box(n: int = 64, side: float = 9.0, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``n`` random positions in a slightly triclinic cell and neutral random charges."""
    gen = torch.Generator().manual_seed(seed)
    cell = torch.tensor([[side, 0.0, 0.0], [0.8, side, 0.0], [0.3, -0.6, side]], dtype=DT)
    pos = torch.rand(n, 3, generator=gen, dtype=DT) @ cell
    q = torch.randn(n, generator=gen, dtype=DT)
    return pos, cell, q - q.mean()


def pme() -> Electrostatics:
    return Electrostatics(ElectrostaticsConfig(method="pme"))


def test_same_cell_reuses_the_kernel_and_changes_no_number():
    pos, cell, q = ionic_box()
    es = pme()
    first = es.energy(q, pos, cell, PBC)
    assert len(es._mesh_kernels) == 1
    (kept,) = es._mesh_kernels.values()
    moved = pos + 0.05 * torch.randn(pos.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    again = es.energy(q, moved, cell, PBC)
    assert len(es._mesh_kernels) == 1 and next(iter(es._mesh_kernels.values())) is kept
    # bit for bit what a module without kept kernels gives, before and after the move
    assert float(first) == float(pme().energy(q, pos, cell, PBC))
    assert float(again) == float(pme().energy(q, moved, cell, PBC))
    assert abs(float(again - first)) > 1e-6 * abs(float(first))


def test_another_cell_gets_its_own_kernel_and_the_oldest_are_dropped():
    pos, cell, q = ionic_box()
    es = pme()
    scales = [1.0 + 0.02 * k for k in range(MESH_KERNELS_KEPT + 2)]
    energies = [float(es.energy(q, s * pos, s * cell, PBC)) for s in scales]
    assert len(es._mesh_kernels) == MESH_KERNELS_KEPT
    assert len(set(energies)) == len(energies)
    for s, e in zip(scales, energies, strict=True):
        assert e == float(pme().energy(q, s * pos, s * cell, PBC))
    # the first cell's kernel was dropped: evaluating it again builds it anew, with the same number
    assert float(es.energy(q, pos, cell, PBC)) == energies[0]


def test_cell_under_autograd_takes_no_kept_kernel():
    """The stress needs ∂E/∂cell through the kernel too: a kernel kept from a detached evaluation of the
    same cell must not stand in for it. Checked against a module that never kept one and against the
    derivative by central differences."""
    pos, cell, q = ionic_box()
    es = pme()
    es.energy(q, pos, cell, PBC)  # keeps this cell's kernel
    frac = pos @ torch.linalg.inv(cell)

    def grad(module: Electrostatics) -> torch.Tensor:
        c = cell.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(module.energy(q, frac @ c, c, PBC), c)
        return g

    g_kept, g_fresh = grad(es), grad(pme())
    assert torch.equal(g_kept, g_fresh)
    h = 1e-5
    step = torch.zeros_like(cell)
    step[1, 0] = h
    plus, minus = cell + step, cell - step
    fd = (pme().energy(q, frac @ plus, plus, PBC) - pme().energy(q, frac @ minus, minus, PBC)) / (2 * h)
    assert abs(float(g_kept[1, 0] - fd)) < 1e-5 * float(g_kept.abs().max())


def test_solver_operator_and_energy_share_one_kernel():
    """``coulomb_operator`` (charges of width σ projected on σ) and ``energy`` (the charges' pair width)
    take one width from ``pair_width``: one kernel and one torch-pme calculator serve both."""
    pos, cell, q = ionic_box()
    es = pme()
    op = es.coulomb_operator(pos, cell, PBC)
    phi = op(q)
    es.energy(q, pos.clone().requires_grad_(True), cell, PBC)
    assert len(es._mesh_kernels) == 1
    assert len([key for key in es._calculators if key[0] == "pme"]) == 1
    assert float(0.5 * (q * phi).sum()) == pytest.approx(float(pme().energy(q, pos, cell, PBC)), rel=1e-12)


def test_inference_mode_keeps_nothing_for_a_later_autograd_evaluation():
    """A kernel made under ``torch.inference_mode`` cannot be saved for backward; none is kept, and
    forces after such an evaluation still work."""
    pos, cell, q = ionic_box()
    es = pme()
    with torch.inference_mode():
        first = es.energy(q, pos, cell, PBC)
    assert len(es._mesh_kernels) == 0
    moving = pos.clone().requires_grad_(True)
    energy = es.energy(q, moving, cell, PBC)
    (forces,) = torch.autograd.grad(-energy, moving)
    assert float(energy) == float(first)
    fresh = pos.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(-pme().energy(q, fresh, cell, PBC), fresh)
    assert torch.equal(forces, expected)
