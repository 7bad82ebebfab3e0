"""Gaussian dipoles (l = 1) against independent sums: ±q pairs, a numpy k-space sum, large boxes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aiida_emlip.models import gaussian_dipoles as gd
from aiida_emlip.models.electrostatics import Electrostatics, ElectrostaticsConfig, total_dipole
from aiida_emlip.schema import COULOMB_CONSTANT as KE

DT = torch.float64
T3 = torch.tensor([True, True, True])
F3 = torch.tensor([False, False, False])
SIGMA = 1.5


def model(**kw) -> Electrostatics:
    return Electrostatics(ElectrostaticsConfig(**kw))


def molecule(seed: int = 0, n: int = 5, box: float = 5.0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(n, 3, generator=g, dtype=DT) * box
    q = torch.randn(n, generator=g, dtype=DT)
    q = q - q.mean()
    p = 0.3 * torch.randn(n, 3, generator=g, dtype=DT)
    return q, pos, p


def triclinic(box: float) -> torch.Tensor:
    return torch.tensor([[box, 0.0, 0.0], [1.1, box * 0.95, 0.0], [0.7, -0.4, box * 1.05]], dtype=DT)


def as_charge_pairs(q, pos, p, delta):
    """Each dipole p_i → charges ±|p_i|/δ at r_i ± (δ/2) p̂_i (original atoms first)."""
    norm = torch.linalg.norm(p, dim=1, keepdim=True)
    unit = p / norm
    big = (norm / delta)[:, 0]
    pos_all = torch.cat([pos, pos + 0.5 * delta * unit, pos - 0.5 * delta * unit])
    return torch.cat([q, big, -big]), pos_all


def richardson(f, delta: float) -> torch.Tensor:
    """Extrapolate f(δ) = f₀ + c δ² + O(δ⁴) to δ → 0."""
    return (4.0 * f(delta / 2) - f(delta)) / 3.0


@pytest.mark.parametrize("periodic", [False, True])
def test_dipole_energy_is_limit_of_charge_pairs(periodic):
    q, pos, p = molecule()
    cell, pbc = (triclinic(7.0), T3) if periodic else (torch.zeros(3, 3, dtype=DT), F3)
    el = model(method="ewald" if periodic else "auto", accuracy=1e-10)
    e_dip = el.energy(q, pos, cell, pbc, p).item()

    def e_pairs(delta):
        qq, rr = as_charge_pairs(q, pos, p, delta)
        return el.energy(qq, rr, cell, pbc)

    e_lim = richardson(e_pairs, 0.02).item()
    assert e_dip == pytest.approx(e_lim, rel=1e-7, abs=1e-7)
    assert abs(e_dip - el.energy(q, pos, cell, pbc).item()) > 1e-2  # the dipoles matter


@pytest.mark.parametrize("periodic", [False, True])
def test_projected_dipole_potential_is_limit_of_charge_pairs(periodic):
    q, pos, p = molecule(seed=1)
    cell, pbc = (triclinic(7.0), T3) if periodic else (torch.zeros(3, 3, dtype=DT), F3)
    el = model(method="ewald" if periodic else "auto", accuracy=1e-10)
    widths = [SIGMA, 3.0]
    phi = el.projected_potentials(q, pos, cell, pbc, widths, p)

    def phi_pairs(delta):
        qq, rr = as_charge_pairs(q, pos, p, delta)
        return el.projected_potentials(qq, rr, cell, pbc, widths)[: q.shape[0]]

    assert torch.allclose(phi, richardson(phi_pairs, 0.02), rtol=1e-6, atol=1e-7)


def test_periodic_vs_large_box_direct():
    q, pos, p = molecule(seed=2)
    box = 90.0
    pos = pos + box / 2
    e_open = model().energy(q, pos, torch.zeros(3, 3, dtype=DT), F3, p).item()
    e_per = model(method="ewald", accuracy=1e-9).energy(q, pos, torch.eye(3, dtype=DT) * box, T3, p).item()
    d = total_dipole(q, pos, p).norm().item()
    assert e_per + 2 * math.pi * d**2 * KE / (3 * box**3) == pytest.approx(e_open, rel=1e-6)


def test_kspace_matches_numpy_sum():
    q, pos, p = molecule(seed=3, n=4)
    cell = triclinic(6.5)
    e = model(method="ewald", accuracy=1e-10).energy(q, pos, cell, T3, p).item()
    e_default = model(method="ewald").energy(q, pos, cell, T3, p).item()
    c = cell.numpy()
    recip = 2 * np.pi * np.linalg.inv(c).T
    m = np.stack(np.meshgrid(*[np.arange(-12, 13)] * 3, indexing="ij"), -1).reshape(-1, 3)
    k = m @ recip
    k2 = (k**2).sum(1)
    k, k2 = k[k2 > 0], k2[k2 > 0]
    amp = q.numpy()[None, :] - 1j * (k @ p.numpy().T)
    rho = (amp * np.exp(-1j * k @ pos.numpy().T)).sum(1)
    ref = 2 * np.pi * KE / abs(np.linalg.det(c)) * (np.abs(rho) ** 2 * np.exp(-(SIGMA**2) * k2) / k2).sum()
    assert e == pytest.approx(ref, rel=1e-9)
    assert e_default == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("periodic", [False, True])
def test_include_self_removes_dipole_self_energy(periodic):
    q, pos, p = molecule(seed=4)
    cell, pbc = (triclinic(7.0), T3) if periodic else (torch.zeros(3, 3, dtype=DT), F3)
    with_self = model(method="ewald" if periodic else "auto").energy(q, pos, cell, pbc, p)
    without = model(method="ewald" if periodic else "auto", include_self=False).energy(q, pos, cell, pbc, p)
    self_q = (q**2).sum() * KE / (2 * SIGMA * math.sqrt(math.pi))
    self_p = (p**2).sum() * KE / (12 * math.sqrt(math.pi) * SIGMA**3)
    assert (with_self - without).item() == pytest.approx((self_q + self_p).item(), rel=1e-6)


def test_chunking_does_not_change_results(monkeypatch):
    q, pos, p = molecule(seed=5, n=9)
    cell = triclinic(8.0)
    el = model(method="ewald")

    def run():
        x = pos.clone().requires_grad_(True)
        e = el.energy(q, x, cell, T3, p)
        return e.detach(), torch.autograd.grad(e, x)[0], el.potential(q, pos, cell, T3, p)

    ref = run()
    monkeypatch.setattr(gd, "CHUNK_ELEMENTS", 40)
    assert len(gd._chunks(gd.half_space_kvectors(cell, 3.0), 9)) > 10
    for a, b in zip(ref, run()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_chunk_memory_bound():
    kv = torch.zeros(100_000, 3)
    assert max(c.shape[0] for c in gd._chunks(kv, 16_000)) * 16_000 <= gd.CHUNK_ELEMENTS


@pytest.mark.parametrize("chunk_elements", [None, 40])
def test_second_derivative_through_checkpoint(monkeypatch, chunk_elements):
    """∂F/∂p via create_graph equals finite differences of the forces: one chunk (no recomputation)
    and many checkpointed chunks alike."""
    q, pos, p = molecule(seed=6)
    cell = triclinic(7.0)
    el = model(method="ewald")
    if chunk_elements is not None:
        monkeypatch.setattr(gd, "CHUNK_ELEMENTS", chunk_elements)
    n_chunks = len(gd._chunks(gd.half_space_kvectors(cell, 3.0), pos.shape[0]))
    assert (n_chunks > 1) == (chunk_elements is not None)
    x = pos.clone().requires_grad_(True)
    pp = p.clone().requires_grad_(True)
    (f,) = torch.autograd.grad(el.energy(q, x, cell, T3, pp), x, create_graph=True)
    (g,) = torch.autograd.grad(f[1, 2], pp)
    h = 1e-5
    d = torch.zeros_like(p)
    d[3, 0] = h

    def force(pd):
        xx = pos.clone().requires_grad_(True)
        return torch.autograd.grad(el.energy(q, xx, cell, T3, pd), xx)[0][1, 2]

    assert g[3, 0].item() == pytest.approx(
        ((force(p + d) - force(p - d)) / (2 * h)).item(), rel=1e-6, abs=1e-9
    )


def test_b_functions_series_branch_continuous():
    a = 1.0 / (2 * SIGMA)
    r = torch.tensor([0.1 / a * (1 - 1e-9), 0.1 / a * (1 + 1e-9)], dtype=DT)
    b1, b2 = gd.b_functions(r, a)
    assert b1[0].item() == pytest.approx(b1[1].item(), rel=1e-9)
    assert b2[0].item() == pytest.approx(b2[1].item(), rel=1e-9)
    # large r: point-dipole limits 1/r³ and 3/r⁵
    b1, b2 = gd.b_functions(torch.tensor([40.0], dtype=DT), a)
    assert b1.item() == pytest.approx(40.0**-3, rel=1e-12)
    assert b2.item() == pytest.approx(3 * 40.0**-5, rel=1e-12)


def test_dipoles_need_width():
    q, pos, p = molecule()
    with pytest.raises(ValueError):
        model(sigma=0.0).energy(q, pos, torch.zeros(3, 3, dtype=DT), F3, p)
