"""Gaussian dipoles on a mesh (smooth PME) against the k-space sum, and the wiring into the PME path.

The mesh (``dipole_mesh``) and the half-sphere k-sum (``gaussian_dipoles``) share no code. Errors are
measured as the accuracy is defined (``aiida_emlip.models.accuracy``): ``|ΔE| ≤ ε E_s``,
``RMS|ΔF| ≤ ε F_s``, ``RMS|Δ∂E/∂q| ≤ ε φ_s`` (also the projected potentials),
``RMS|Δ∂E/∂p| ≤ ε φ_s/ℓ``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aiida_emlip.models import dipole_mesh as dm
from aiida_emlip.models import gaussian_dipoles as gd
from aiida_emlip.models.accuracy import coulomb_scales, dipole_mesh_parameters
from aiida_emlip.models.electrostatics import Electrostatics, ElectrostaticsConfig, reduced_cell

DT = torch.float64
T3 = torch.tensor([True, True, True])
SLAB = torch.tensor([True, True, False])
SIGMA = 1.5
WIDTHS = [SIGMA, 3.0, 1.0]
#: rows a, b, c: 27° between a and b, 58° between a and c, 51° between b and c
STRONG_TRICLINIC = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.45, 0.0], [0.55, 0.35, 0.8]], dtype=DT)


def ionic_cell(kind: str, charged: bool, n: int = 64, seed: int = 0):
    """n random ions (charges ±1 ± 0.2, dipoles ~0.3 e·Å) at the density of NaCl, cubic or triclinic."""
    g = torch.Generator().manual_seed(seed)
    volume = n * 22.4
    base = torch.eye(3, dtype=DT) if kind == "cubic" else STRONG_TRICLINIC
    cell = base * (volume / abs(float(torch.linalg.det(base)))) ** (1 / 3)
    pos = torch.rand(n, 3, generator=g, dtype=DT) @ cell
    q = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(DT) * (
        1 + 0.2 * torch.randn(n, generator=g, dtype=DT)
    )
    q = q - q.mean() + (1.7 / n if charged else 0.0)
    p = 0.3 * torch.randn(n, 3, generator=g, dtype=DT)
    return q, pos, cell, p


def dipole_derivatives(energy_fn, q, pos, p) -> dict[str, torch.Tensor]:
    x = [q.clone().requires_grad_(True), pos.clone().requires_grad_(True), p.clone().requires_grad_(True)]
    e = energy_fn(*x)
    dq, dr, dp = torch.autograd.grad(e, x)
    return {"energy": e.detach(), "potential": dq, "forces": -dr, "dE_dp": dp}


def rms(d: torch.Tensor) -> float:
    return d.reshape(d.shape[0], -1).pow(2).sum(1).mean().sqrt().item()


@pytest.mark.parametrize("accuracy", [1e-4, 1e-6, 1e-8])
@pytest.mark.parametrize("charged", [False, True])
@pytest.mark.parametrize("kind", ["cubic", "triclinic"])
def test_mesh_meets_accuracy_against_kspace_sum(kind, charged, accuracy):
    q, pos, cell, p = ionic_cell(kind, charged)
    cell = reduced_cell(cell)
    n = q.shape[0]
    k_ref = 7.5 / SIGMA  # e^{−56}: converged far beyond 1e-8
    ref = dipole_derivatives(lambda a, b, c: gd.dipole_kspace_energy(a, c, b, cell, SIGMA, k_ref), q, pos, p)
    params = dipole_mesh_parameters(cell, SIGMA, n, accuracy)
    got = dipole_derivatives(
        lambda a, b, c: dm.dipole_mesh_energy(a, c, b, cell, SIGMA, params.mesh, params.nodes), q, pos, p
    )
    s = coulomb_scales(q, abs(float(torch.linalg.det(cell))), p)
    errors = {
        "energy": abs((got["energy"] - ref["energy"]).item()) / s.energy,
        "potential": rms(got["potential"] - ref["potential"]) / s.potential,
        "forces": rms(got["forces"] - ref["forces"]) / s.force,
        "dE_dp": rms(got["dE_dp"] - ref["dE_dp"]) / s.field,
    }
    # projected potentials, the narrowest width setting the mesh as in Electrostatics
    widths = torch.tensor(WIDTHS, dtype=DT)
    beta = min(SIGMA, math.sqrt(0.5 * (SIGMA**2 + min(WIDTHS) ** 2)))
    params_w = dipole_mesh_parameters(cell, beta, n, accuracy)
    phi = dm.dipole_mesh_potential(p, pos, cell, SIGMA, widths, params_w.mesh, params_w.nodes)
    phi_ref = gd.dipole_kspace_potential(p, pos, cell, SIGMA, widths, k_ref)
    for w in range(len(WIDTHS)):
        errors[f"projected w={WIDTHS[w]}"] = rms(phi[:, w] - phi_ref[:, w]) / s.potential
    assert max(errors.values()) <= accuracy, errors
    assert errors["energy"] > 0.0  # a mesh, not the sum itself


def test_bspline_weights():
    """Partition of unity, derivative weights sum to zero, continuity where the stencil moves on."""
    for nodes in dm.NODES:
        values, derivs = dm.bspline_coefficients(nodes)
        x = np.linspace(-0.5, 0.5, 11)
        w = np.polynomial.polynomial.polyval(x, values.T)  # [nodes, x]
        dw = np.polynomial.polynomial.polyval(x, derivs.T)
        assert np.allclose(w.sum(0), 1.0, atol=1e-13)
        assert np.allclose(dw.sum(0), 0.0, atol=1e-12)
        assert (w >= -1e-15).all()
        # stencil centred on g at x = +½ equals the one centred on g + 1 at x = −½ (weights and slopes)
        assert np.allclose(w[1:, -1], w[:-1, 0], atol=1e-14) and abs(w[0, -1]) < 1e-14
        assert np.allclose(dw[1:, -1], dw[:-1, 0], atol=1e-12)
        assert dm.bspline_samples(nodes).sum() == pytest.approx(1.0, abs=1e-14)


def test_energy_continuous_across_stencil_switch():
    q, pos, cell, p = ionic_cell("triclinic", False, n=8)
    mesh, nodes = (12, 12, 12), 5
    # move atom 0 along a line through the midpoint between two mesh points (stencil switch)
    rel = pos[0] @ torch.linalg.inv(cell) * 12
    midpoint = (torch.floor(rel) + 0.5) / 12 @ cell
    x = pos.clone()
    x[0] = midpoint
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(dm.dipole_mesh_energy(q, p, x, cell, SIGMA, mesh, nodes), x)
    t = 1e-6
    energies = []
    for sign in (-1.0, 1.0):
        x = pos.clone()
        x[0] = midpoint + sign * t * cell[0]
        energies.append(dm.dipole_mesh_energy(q, p, x, cell, SIGMA, mesh, nodes).item())
    # no jump: the change across the switch is the slope times the step
    assert energies[1] - energies[0] == pytest.approx(2 * t * (grad[0] @ cell[0]).item(), rel=1e-6, abs=1e-13)


def test_forces_are_finite_differences():
    q, pos, cell, p = ionic_cell("triclinic", True, n=12)
    mesh, nodes = (16, 15, 18), 7
    x = pos.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(dm.dipole_mesh_energy(q, p, x, cell, SIGMA, mesh, nodes), x)
    h = 1e-5
    for atom, axis in [(0, 0), (3, 1), (7, 2), (11, 0)]:
        d = torch.zeros_like(pos)
        d[atom, axis] = h
        fd = (
            dm.dipole_mesh_energy(q, p, pos + d, cell, SIGMA, mesh, nodes)
            - dm.dipole_mesh_energy(q, p, pos - d, cell, SIGMA, mesh, nodes)
        ) / (2 * h)
        assert grad[atom, axis].item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-8)


def test_cell_derivative_is_finite_differences():
    """∂E/∂cell (stress) at fixed Cartesian positions and fixed mesh."""
    q, pos, cell, p = ionic_cell("triclinic", True, n=12)
    mesh, nodes = (16, 15, 18), 7
    c = cell.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(dm.dipole_mesh_energy(q, p, pos, c, SIGMA, mesh, nodes), c)
    h = 1e-5
    for i, j in [(0, 0), (1, 0), (2, 1), (2, 2)]:
        d = torch.zeros_like(cell)
        d[i, j] = h
        fd = (
            dm.dipole_mesh_energy(q, p, pos, cell + d, SIGMA, mesh, nodes)
            - dm.dipole_mesh_energy(q, p, pos, cell - d, SIGMA, mesh, nodes)
        ) / (2 * h)
        assert grad[i, j].item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-8)


def test_double_backward_forces_wrt_dipoles_and_charges():
    """∂F/∂p and ∂F/∂q through create_graph equal finite differences of the forces (training)."""
    q, pos, cell, p = ionic_cell("cubic", False, n=10)
    mesh, nodes = (14, 14, 14), 7

    def forces(qq, pp, create_graph=False):
        x = pos.clone().requires_grad_(True)
        e = dm.dipole_mesh_energy(qq, pp, x, cell, SIGMA, mesh, nodes)
        return -torch.autograd.grad(e, x, create_graph=create_graph)[0]

    qq, pp = q.clone().requires_grad_(True), p.clone().requires_grad_(True)
    f = forces(qq, pp, create_graph=True)
    dq, dp = torch.autograd.grad(f[1, 2], [qq, pp])
    h = 1e-5
    d = torch.zeros_like(p)
    d[4, 0] = h
    fd_p = (forces(q, p + d)[1, 2] - forces(q, p - d)[1, 2]) / (2 * h)
    assert dp[4, 0].item() == pytest.approx(fd_p.item(), rel=1e-6, abs=1e-9)
    dqv = torch.zeros_like(q)
    dqv[6] = h
    fd_q = (forces(q + dqv, p)[1, 2] - forces(q - dqv, p)[1, 2]) / (2 * h)
    assert dq[6].item() == pytest.approx(fd_q.item(), rel=1e-6, abs=1e-9)


def test_potential_is_charge_derivative_of_mesh_energy():
    q, pos, cell, p = ionic_cell("triclinic", True, n=20)
    mesh, nodes = (15, 16, 18), 7
    qq = q.clone().requires_grad_(True)
    (dq,) = torch.autograd.grad(dm.dipole_mesh_energy(qq, p, pos, cell, SIGMA, mesh, nodes), qq)
    phi = dm.dipole_mesh_potential(p, pos, cell, SIGMA, torch.tensor([SIGMA], dtype=DT), mesh, nodes)[:, 0]
    assert torch.allclose(phi, dq, rtol=1e-10, atol=1e-12)


def _record_calls(monkeypatch):
    calls = []
    for module, name in [
        (dm, "dipole_mesh_energy"),
        (dm, "dipole_mesh_potential"),
        (gd, "dipole_kspace_energy"),
        (gd, "dipole_kspace_potential"),
    ]:
        original = getattr(module, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)
    return calls


@pytest.mark.parametrize(("method", "expected"), [("pme", "mesh"), ("ewald", "kspace")])
def test_electrostatics_uses_mesh_on_the_pme_path(monkeypatch, method, expected):
    q, pos, cell, p = ionic_cell("cubic", False, n=16)
    calls = _record_calls(monkeypatch)
    el = Electrostatics(ElectrostaticsConfig(method=method))
    el.energy(q, pos, cell, T3, p)
    el.potential(q, pos, cell, T3, p)
    assert calls == [f"dipole_{expected}_energy", f"dipole_{expected}_potential"]


def test_auto_switches_to_mesh_at_pme_min_atoms(monkeypatch):
    q, pos, cell, p = ionic_cell("cubic", False, n=16)
    calls = _record_calls(monkeypatch)
    Electrostatics(ElectrostaticsConfig(pme_min_atoms=16)).energy(q, pos, cell, T3, p)
    Electrostatics(ElectrostaticsConfig(pme_min_atoms=17)).energy(q, pos, cell, T3, p)
    assert calls == ["dipole_mesh_energy", "dipole_kspace_energy"]


@pytest.mark.parametrize("pbc", [T3, SLAB])
def test_pme_path_with_dipoles_matches_ewald_path(pbc):
    """Whole Electrostatics (charges, dipoles, background, slab terms), PME vs Ewald, within ε."""
    q, pos, cell, p = ionic_cell("triclinic", True, n=40, seed=1)
    if pbc is SLAB:  # 8 Å of vacuum along a tilted third vector
        cell = cell.clone()
        cell[2] = cell[2] * (1 + 8.0 / float(cell[2].norm()))
    accuracy = 1e-6
    out = {}
    for method in ("pme", "ewald"):
        el = Electrostatics(ElectrostaticsConfig(method=method, accuracy=accuracy))
        x = pos.clone().requires_grad_(True)
        e = el.energy(q, x, cell, pbc, p)
        (g,) = torch.autograd.grad(e, x)
        out[method] = (e.detach(), -g, el.projected_potentials(q, pos, cell, pbc, WIDTHS, p))
    s = coulomb_scales(q, abs(float(torch.linalg.det(cell))), p)
    # each of the two methods meets ε: their difference stays below 2ε
    assert abs((out["pme"][0] - out["ewald"][0]).item()) <= 2 * accuracy * s.energy
    assert rms(out["pme"][1] - out["ewald"][1]) <= 2 * accuracy * s.force
    assert rms(out["pme"][2] - out["ewald"][2]) <= 2 * accuracy * s.potential


def test_float32():
    q, pos, cell, p = ionic_cell("triclinic", False, n=30)
    el = Electrostatics(ElectrostaticsConfig(method="pme"))
    results = {}
    for dtype in (torch.float32, DT):
        x = pos.to(dtype).requires_grad_(True)
        pp = p.to(dtype).requires_grad_(True)
        e = el.energy(q.to(dtype), x, cell.to(dtype), T3, pp)
        g, gp = torch.autograd.grad(e, [x, pp])
        assert e.dtype == dtype and g.dtype == dtype
        results[dtype] = (e.detach().double(), g.double(), gp.double())
    s = coulomb_scales(q, abs(float(torch.linalg.det(cell))), p)
    e32, f32, p32 = results[torch.float32]
    e64, f64, p64 = results[DT]
    assert abs((e32 - e64).item()) <= 1e-4 * s.energy  # float32 round-off of self-energy-sized terms
    assert rms(f32 - f64) <= 1e-5 * s.force
    assert rms(p32 - p64) <= 1e-5 * s.field
