"""Tests of the electrostatics layer against independent references (CPU, float64 unless stated)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchpme import CoulombPotential, EwaldCalculator

from aiida_emlip.models.electrostatics import Electrostatics, ElectrostaticsConfig, field_energy, total_dipole
from aiida_emlip.schema import COULOMB_CONSTANT as KE

DT = torch.float64
T3 = torch.tensor([True, True, True])
F3 = torch.tensor([False, False, False])
SLAB = torch.tensor([True, True, False])
SIGMA = 1.5
MADELUNG_NACL = 1.747564594633
MADELUNG_CSCL = 1.762674773070
MADELUNG_SC_POINT = 2.837297479  # single point charge in a simple-cubic lattice with background


def model(**kw) -> Electrostatics:
    return Electrostatics(ElectrostaticsConfig(**kw))


def rocksalt(a: float = 5.64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    frac = [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    na = torch.tensor(frac, dtype=DT)
    pos = torch.cat([na, na + torch.tensor([0.5, 0, 0], dtype=DT)]) * a
    q = torch.tensor([1.0] * 4 + [-1.0] * 4, dtype=DT)
    return q, pos, torch.eye(3, dtype=DT) * a


def random_system(n: int, box: float, seed: int = 0, neutral: bool = True):
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(n, 3, generator=g, dtype=DT) * box
    q = torch.randn(n, generator=g, dtype=DT)
    if neutral:
        q = q - q.mean()
    p = 0.3 * torch.randn(n, 3, generator=g, dtype=DT)
    return q, pos, p


def triclinic(box: float) -> torch.Tensor:
    return torch.tensor([[box, 0.0, 0.0], [1.1, box * 0.95, 0.0], [0.7, -0.4, box * 1.05]], dtype=DT)


def slab_system(vacuum: float, seed: int = 1, neutral: bool = True):
    g = torch.Generator().manual_seed(seed)
    n, lx, thick = 6, 7.0, 6.0
    pos = torch.rand(n, 3, generator=g, dtype=DT) * torch.tensor([lx, lx, thick], dtype=DT)
    q = torch.randn(n, generator=g, dtype=DT)
    if neutral:
        q = q - q.mean()
    cell = torch.diag(torch.tensor([lx, lx, thick + vacuum], dtype=DT))
    cell[1, 0] = 0.8
    return q, pos, cell


def strained_energy(el, q, pos, cell, pbc, p=None, eps=None):
    deform = torch.eye(3, dtype=DT) + (eps if eps is not None else 0.0)
    return el.energy(q, pos @ deform.T, cell @ deform.T, pbc, p)


def check_forces_stress(el, q, pos, cell, pbc, p=None, h=1e-5, tol=1e-6):
    pos = pos.clone().requires_grad_(True)
    eps = torch.zeros(3, 3, dtype=DT, requires_grad=True)
    e = strained_energy(el, q, pos, cell, pbc, p, eps)
    g_pos, g_eps = torch.autograd.grad(e, (pos, eps))
    forces = -g_pos
    for a, c in [(0, 0), (1, 2), (2, 1)]:
        d = torch.zeros_like(pos)
        d[a, c] = h
        fd = (el.energy(q, pos.detach() + d, cell, pbc, p) - el.energy(q, pos.detach() - d, cell, pbc, p)) / (
            2 * h
        )
        assert -fd.item() == pytest.approx(forces[a, c].item(), abs=tol, rel=tol)
    if pbc.any():
        volume = torch.abs(torch.linalg.det(cell))
        stress = g_eps / volume
        for a, b in [(0, 0), (2, 2), (0, 1), (1, 2)]:
            d = torch.zeros(3, 3, dtype=DT)
            d[a, b] = d[b, a] = h / 2 if a != b else h
            ep = strained_energy(el, q, pos.detach(), cell, pbc, p, d)
            em = strained_energy(el, q, pos.detach(), cell, pbc, p, -d)
            fd = (ep - em) / (2 * h) / volume
            sym = 0.5 * (stress[a, b] + stress[b, a])
            assert fd.item() == pytest.approx(sym.item(), abs=tol, rel=tol)


# ----------------------------------------------------------------------------- point charges


@pytest.mark.parametrize("method", ["ewald", "pme"])
def test_madelung_rocksalt(method):
    q, pos, cell = rocksalt(5.64)
    e = model(sigma=0.0, method=method).energy(q, pos, cell, T3)
    madelung = -e.item() / (4 * KE) * (5.64 / 2)  # 4 formula units, nearest neighbour a/2
    assert madelung == pytest.approx(MADELUNG_NACL, rel=1e-6)


@pytest.mark.parametrize("method", ["ewald", "pme"])
def test_madelung_cscl(method):
    a = 4.1
    pos = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]], dtype=DT) * a
    q = torch.tensor([1.0, -1.0], dtype=DT)
    e = model(sigma=0.0, method=method).energy(q, pos, torch.eye(3, dtype=DT) * a, T3)
    assert -e.item() / KE * (math.sqrt(3) / 2 * a) == pytest.approx(MADELUNG_CSCL, rel=1e-6)


def test_madelung_accuracy_knob():
    q, pos, cell = rocksalt(5.64)
    e = model(sigma=0.0, method="ewald", accuracy=1e-10).energy(q, pos, cell, T3)
    assert -e.item() / (4 * KE) * 2.82 == pytest.approx(MADELUNG_NACL, rel=1e-9)


# ----------------------------------------------------------------------------- Gaussian charges


def dimer(r: float = 3.1):
    pos = torch.tensor([[0.0, 0.0, 0.0], [r, 0.4, -0.2]], dtype=DT) + 20.0
    q = torch.tensor([0.7, -0.45], dtype=DT)
    dist = torch.linalg.norm(pos[1] - pos[0]).item()
    pair = q[0].item() * q[1].item() * KE * math.erf(dist / (2 * SIGMA)) / dist
    self_e = (q**2).sum().item() * KE / (2 * SIGMA * math.sqrt(math.pi))
    return q, pos, pair, self_e


def test_gaussian_dimer_open():
    q, pos, pair, self_e = dimer()
    assert model().energy(q, pos, torch.zeros(3, 3, dtype=DT), F3).item() == pytest.approx(
        pair + self_e, rel=1e-12
    )
    no_self = model(include_self=False).energy(q, pos, torch.zeros(3, 3, dtype=DT), F3)
    assert no_self.item() == pytest.approx(pair, rel=1e-12)


def test_gaussian_dimer_big_box():
    """Neutral periodic dimer = isolated dimer + tin-foil term −2π d² k_e/3V (+ O(L⁻⁵))."""
    q, pos, pair, self_e = dimer()
    q = torch.tensor([0.7, -0.7], dtype=DT)
    pair = pair * (-0.7 / -0.45)
    self_e = (q**2).sum().item() * KE / (2 * SIGMA * math.sqrt(math.pi))
    box = 120.0  # the next term decays as L⁻⁵: 3e-6 relative at L = 60, 1e-7 at 120
    cell = torch.eye(3, dtype=DT) * box
    d = total_dipole(q, pos).norm().item()
    ref = pair + self_e - 2 * math.pi * d**2 * KE / (3 * box**3)
    e = model(method="ewald", accuracy=1e-10).energy(q, pos, cell, T3).item()
    assert e == pytest.approx(ref, rel=3e-7)


def test_torchpme_empty_neighbour_list_is_gaussian_kernel():
    """libraries.md claim: Ewald at s = √2σ with no pairs = k ≠ 0 Gaussian Hartree − self − 2πσ²Q²k_e/V."""
    q, pos, _ = random_system(5, 9.0, neutral=False)
    cell = triclinic(9.0)
    calc = EwaldCalculator(CoulombPotential(smearing=math.sqrt(2) * SIGMA, prefactor=KE), lr_wavelength=0.6)
    calc = calc.to(dtype=DT)
    v = calc(q[:, None], cell, pos, torch.zeros((0, 2), dtype=torch.long), torch.zeros(0, dtype=DT))
    e_tpme = (q[:, None] * v).sum().item()
    e_k = reference_kspace_energy(q.numpy(), pos.numpy(), cell.numpy(), SIGMA)
    vol = abs(np.linalg.det(cell.numpy()))
    self_e = (q**2).sum().item() * KE / (2 * SIGMA * math.sqrt(math.pi))
    big_q = q.sum().item()
    assert e_tpme == pytest.approx(e_k - self_e - 2 * math.pi * SIGMA**2 * big_q**2 * KE / vol, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("total", [0.0, 1.3])
def test_pme_kernel_matches_torchpme_mesh_pipeline(dtype, total):
    """The PME charge kernel (weights once per geometry, all channels spread at once) against
    torch-pme's own pipeline on the same mesh (MeshInterpolator.points_to_mesh, KSpaceFilter.forward,
    mesh_to_points, self and background terms): potentials, forces and cell gradient of the energy,
    in a triclinic (reduced) cell with a charged and a neutral channel."""
    from torchpme.lib import KSpaceFilter, MeshInterpolator

    from aiida_emlip.models.accuracy import pme_parameters
    from aiida_emlip.models.coulomb_operator import ChargeKernel, reduced_cell

    q, pos, _ = random_system(20, 8.0, seed=4)
    q = (q + total / 20).to(dtype)
    pos, cell = (
        pos.to(dtype),
        (triclinic(8.0) @ torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1.0]], dtype=DT)).to(dtype),
    )
    x = torch.stack([q, torch.linspace(-1.0, 1.0, 20, dtype=dtype)], dim=1)
    assert not torch.equal(reduced_cell(cell), cell)  # the kernel works in the reduced cell
    el = model(method="pme", include_self=False)
    s = math.sqrt(2) * SIGMA

    def reference(positions, c):
        c = reduced_cell(c)
        params = pme_parameters(c, s / math.sqrt(2), 20, el.config.accuracy)
        ns = torch.tensor(params.mesh)
        pot = CoulombPotential(smearing=s, prefactor=KE).to(dtype)
        interp = MeshInterpolator(c, ns, params.nodes, method="Lagrange")
        interp.compute_weights(positions)
        kfilter = KSpaceFilter(c, ns, kernel=pot, fft_norm="backward", ifft_norm="forward")
        volume = torch.abs(torch.linalg.det(c))
        phi = interp.mesh_to_points(kfilter.forward(interp.points_to_mesh(x))) / volume
        phi = phi - x * pot.self_contribution() - 2.0 * pot.background_correction() * x.sum(0) / volume
        return phi + 2.0 * math.pi * KE * s**2 * x.sum(0) / volume

    results = []
    for fn in (reference, lambda r, c: ChargeKernel(el, r, c, "pme", s)(x)):
        r, c = pos.clone().requires_grad_(True), cell.clone().requires_grad_(True)
        phi = fn(r, c)
        grads = torch.autograd.grad(0.5 * (x * phi).sum(), (r, c))
        results.append((phi.detach(), *grads))
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for ours, ref in zip(results[1], results[0]):
        assert float((ours - ref).abs().max()) < tol * float(ref.abs().max())
    assert float(results[0][1].abs().max()) > 0.1  # forces of size ~1 eV/Å, not a vacuous comparison


def reciprocal_vectors(cell: np.ndarray, k_cut: float) -> np.ndarray:
    recip = 2 * np.pi * np.linalg.inv(cell).T
    n = np.ceil(k_cut * np.linalg.norm(cell, axis=1) / (2 * np.pi)).astype(int)
    m = np.stack(np.meshgrid(*[np.arange(-k, k + 1) for k in n], indexing="ij"), -1).reshape(-1, 3)
    k = m @ recip
    k2 = (k**2).sum(1)
    return k[(k2 > 0) & (k2 <= k_cut**2)]


def reference_kspace_energy(q, pos, cell, sigma, dipoles=None) -> float:
    """Independent numpy sum (2π k_e/V) Σ_{k≠0} |ρ(k)|²/k², ρ(k) = Σ (q − i k·p) e^{−σ²k²/2} e^{−ik·r}."""
    k = reciprocal_vectors(cell, 12.0 / sigma)
    k2 = (k**2).sum(1)
    amp = q[None, :].astype(complex)
    if dipoles is not None:
        amp = amp - 1j * (k @ dipoles.T)
    rho = (amp * np.exp(-1j * k @ pos.T)).sum(1) * np.exp(-(sigma**2) * k2 / 2)
    vol = abs(np.linalg.det(cell))
    return float(2 * np.pi * KE / vol * (np.abs(rho) ** 2 / k2).sum())


def test_periodic_energy_is_k0_excluded_hartree_energy():
    q, pos, _ = random_system(6, 8.0, neutral=False)
    cell = triclinic(8.0)
    e = model(method="ewald", accuracy=1e-10).energy(q, pos, cell, T3).item()
    assert e == pytest.approx(reference_kspace_energy(q.numpy(), pos.numpy(), cell.numpy(), SIGMA), rel=1e-7)


@pytest.mark.parametrize("box", [12.0, 16.0, 24.0, 36.0])
def test_charged_cell_makov_payne(box):
    """One Gaussian charge: −α Q² k_e/2L + 2πσ² Q² k_e/L³ + self energy."""
    big_q = 1.3
    e = model(method="ewald", accuracy=1e-10).energy(
        torch.tensor([big_q], dtype=DT),
        torch.tensor([[1.0, 2.0, 3.0]], dtype=DT),
        torch.eye(3, dtype=DT) * box,
        T3,
    )
    ref = (
        big_q**2
        * KE
        * (
            -MADELUNG_SC_POINT / (2 * box)
            + 2 * math.pi * SIGMA**2 / box**3
            + 1 / (2 * SIGMA * math.sqrt(math.pi))
        )
    )
    assert e.item() == pytest.approx(ref, rel=1e-7)


def test_charged_cell_volume_dependence_and_pressure():
    """dE/dV of the charged cell = d/dV of the Makov–Payne expression (tests the background's stress)."""
    big_q, box = 1.0, 14.0
    el = model(method="ewald", accuracy=1e-10)
    q = torch.tensor([big_q], dtype=DT)
    pos = torch.tensor([[0.3, 0.2, 0.1]], dtype=DT)
    eps = torch.zeros(3, 3, dtype=DT, requires_grad=True)
    e = strained_energy(el, q, pos, torch.eye(3, dtype=DT) * box, T3, eps=eps)
    (g,) = torch.autograd.grad(e, eps)
    # E(L) = a/L + b/L³ + c, isotropic strain ε: L → L(1+ε), dE/dε_xx = L dE/dL / 3
    a, b = -MADELUNG_SC_POINT * KE / 2, 2 * math.pi * SIGMA**2 * KE
    de_dl = -a / box**2 - 3 * b / box**4
    assert g[0, 0].item() == pytest.approx(box * de_dl / 3, rel=1e-6)


# ----------------------------------------------------------------------------- methods agree


def test_ewald_pme_agree_gaussian():
    q, pos, _ = random_system(300, (300 * 22.4) ** (1 / 3), seed=3)
    cell = triclinic((300 * 22.4) ** (1 / 3))
    ee = model(method="ewald").energy(q, pos, cell, T3)
    ep = model(method="pme").energy(q, pos, cell, T3)
    exact = model(method="ewald", accuracy=1e-12).energy(q, pos, cell, T3)
    assert abs(ee.item() / exact.item() - 1) < 1e-6
    assert abs(ep.item() / exact.item() - 1) < 2e-6


def test_ewald_pme_agree_point_charges_and_forces():
    q, pos, _ = random_system(120, 11.0, seed=4)
    cell = triclinic(11.0)
    out = {}
    for m in ["ewald", "pme"]:
        x = pos.clone().requires_grad_(True)
        e = model(sigma=0.0, method=m).energy(q, x, cell, T3)
        out[m] = (e.item(), torch.autograd.grad(e, x)[0])
    assert out["pme"][0] == pytest.approx(out["ewald"][0], rel=2e-6)
    scale = out["ewald"][1].abs().max().item()
    assert (out["pme"][1] - out["ewald"][1]).abs().max().item() < 1e-4 * scale


def test_direct_vs_ewald_huge_vacuum():
    q, pos, _ = random_system(8, 4.0, seed=5)
    box = 70.0
    pos = pos + box / 2
    e_open = model().energy(q, pos, torch.zeros(3, 3, dtype=DT), F3).item()
    d = total_dipole(q, pos).norm().item()
    e_per = model(method="ewald").energy(q, pos, torch.eye(3, dtype=DT) * box, T3).item()
    assert e_per + 2 * math.pi * d**2 * KE / (3 * box**3) == pytest.approx(e_open, rel=1e-6)


def test_auto_method_selection():
    el = model(pme_min_atoms=100)
    assert el.select_method(10, F3) == "direct"
    assert el.select_method(99, T3) == "ewald"
    assert el.select_method(100, SLAB) == "pme"
    with pytest.raises(NotImplementedError):
        el.select_method(10, torch.tensor([True, False, False]))


# ----------------------------------------------------------------------------- slab


def reference_2d_energy(q, pos, cell, sigma, dk: float = 0.004) -> float:
    """Independent 2D-periodic Hartree energy: in-plane k-sum and a midpoint-rule integral over k_z.

    E = (k_e/A) Σ_{k∥} ∫ dk_z |ρ(k)|²/k²; valid for a neutral slab (the k = 0 integrand is finite).
    """
    a_vec, b_vec = cell[0], cell[1]
    normal = np.cross(a_vec, b_vec)
    area = np.linalg.norm(normal)
    normal = normal / area
    k_cut = 12.0 / sigma
    inplane = np.stack([a_vec, b_vec, normal * 1.0])
    recip = 2 * np.pi * np.linalg.inv(inplane).T
    n = np.ceil(k_cut * np.linalg.norm(inplane[:2], axis=1) / (2 * np.pi)).astype(int)
    m = np.stack(
        np.meshgrid(np.arange(-n[0], n[0] + 1), np.arange(-n[1], n[1] + 1), indexing="ij"), -1
    ).reshape(-1, 2)
    kpar = m @ recip[:2]
    kpar = kpar[(kpar**2).sum(1) <= k_cut**2]
    kz = (np.arange(-int(k_cut / dk), int(k_cut / dk)) + 0.5) * dk
    total = 0.0
    z = pos @ normal
    for kp in kpar:
        phase_par = np.exp(-1j * pos @ kp)
        k2 = kp @ kp + kz**2
        rho = (q[None, :] * phase_par[None, :] * np.exp(-1j * kz[:, None] * z[None, :])).sum(1)
        total += (np.abs(rho) ** 2 * np.exp(-(sigma**2) * k2) / k2).sum() * dk
    return float(KE / area * total)


def test_slab_converges_to_isolated_in_z():
    q, pos, cell = slab_system(vacuum=10.0)
    ref = reference_2d_energy(q.numpy(), pos.numpy(), cell.numpy(), SIGMA)
    errors, errors_3d = [], []
    for vac in [10.0, 20.0, 40.0]:
        c = cell.clone()
        c[2, 2] = 6.0 + vac
        errors.append(abs(model(method="ewald").energy(q, pos, c, SLAB).item() - ref))
        errors_3d.append(
            abs(model(method="ewald", slab_correction=False).energy(q, pos, c, SLAB).item() - ref)
        )
    assert errors[-1] < 1e-6 * abs(ref) + 1e-7
    assert errors[0] < 1e-3 * abs(ref)
    assert errors_3d[-1] > 20 * errors[-1]  # the uncorrected 3D sum is off by ~2πM_z²/V


def test_slab_tilted_cell_rotation_invariant():
    q, pos, cell = slab_system(vacuum=15.0)
    el = model(method="ewald")
    e0 = el.energy(q, pos, cell, SLAB)
    rot = rotation_matrix()
    e1 = el.energy(q, pos @ rot.T, cell @ rot.T, SLAB)
    assert e1.item() == pytest.approx(e0.item(), rel=1e-9)


def test_slab_matches_torchpme_correction_point_charges():
    """torch-pme's own 2D correction (periodic=[T,T,F], orthogonal cells) equals ours at σ = 0, Q ≠ 0."""
    q, pos, cell = slab_system(vacuum=12.0, neutral=False)
    cell[1, 0] = 0.0
    ours = model(sigma=0.0, method="ewald", accuracy=1e-10).energy(q, pos, cell, SLAB).item()
    from aiida_emlip.models.accuracy import coulomb_length, ewald_alpha, kspace_cutoff, realspace_cutoff
    from aiida_emlip.models.coulomb_operator import _neighbour_pairs

    volume = abs(torch.linalg.det(cell)).item()
    alpha = ewald_alpha(6, volume)
    pairs, dist = _neighbour_pairs(pos, cell, realspace_cutoff(alpha, coulomb_length(6, volume), 1e-10))
    k_cut = kspace_cutoff(cell, 0.5 / alpha, 6, 1e-10)
    # torch-pme's Ewald box reaches about π/λ along each axis: ask for twice the sphere
    calc = EwaldCalculator(
        CoulombPotential(smearing=1 / (math.sqrt(2) * alpha), prefactor=KE),
        lr_wavelength=math.pi / (2 * k_cut),
    )
    v = calc.to(dtype=DT)(q[:, None], cell, pos, pairs, dist, periodic=SLAB)
    assert ours == pytest.approx((q[:, None] * v).sum().item(), rel=1e-6)


# ----------------------------------------------------------------------------- derivatives


def rotation_matrix() -> torch.Tensor:
    a, b = 0.7, -1.1
    rz = torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]], dtype=DT)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]], dtype=DT)
    return rz @ rx


CASES = ["periodic", "periodic_pme", "slab", "finite", "point_periodic"]


def case(name: str, neutral: bool = False):
    if name in ("periodic", "periodic_pme", "point_periodic"):
        q, pos, p = random_system(7, 7.5, seed=7, neutral=neutral)
        cell = triclinic(7.5)
        pbc = T3
        method = "pme" if name == "periodic_pme" else "ewald"
    elif name == "slab":
        q, pos, cell = slab_system(vacuum=12.0, neutral=neutral)
        p = 0.3 * torch.randn(6, 3, generator=torch.Generator().manual_seed(9), dtype=DT)
        pbc, method = SLAB, "ewald"
    else:
        q, pos, p = random_system(7, 6.0, seed=8, neutral=neutral)
        cell, pbc, method = torch.zeros(3, 3, dtype=DT), F3, "auto"
    sigma = 0.0 if name == "point_periodic" else SIGMA
    return model(method=method, sigma=sigma), q, pos, cell, pbc, (None if sigma == 0.0 else p)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("with_dipoles", [False, True])
def test_forces_and_stress_finite_differences(name, with_dipoles):
    el, q, pos, cell, pbc, p = case(name)
    if with_dipoles and p is None:
        pytest.skip("point charges carry no dipoles")
    tol = 2e-5 if name == "periodic_pme" else 1e-6
    check_forces_stress(el, q, pos, cell, pbc, p if with_dipoles else None, tol=tol)


@pytest.mark.parametrize("name", CASES)
def test_potential_is_dE_dq(name):
    el, q, pos, cell, pbc, p = case(name)
    phi = el.potential(q, pos, cell, pbc, p)
    h = 1e-5
    tol = 2e-5 if name == "periodic_pme" else 1e-6
    for i in range(3):
        d = torch.zeros_like(q)
        d[i] = h
        fd = (el.energy(q + d, pos, cell, pbc, p) - el.energy(q - d, pos, cell, pbc, p)) / (2 * h)
        assert phi[i].item() == pytest.approx(fd.item(), rel=tol, abs=tol)


def test_projected_potential_width_sigma_is_potential():
    el, q, pos, cell, pbc, p = case("slab")
    proj = el.projected_potentials(q, pos, cell, pbc, [SIGMA, 3.0], p)
    assert torch.allclose(proj[:, 0], el.potential(q, pos, cell, pbc, p), rtol=1e-10, atol=1e-10)


def test_projected_potential_open_matches_kernel():
    _, q, pos, _, _, _ = case("finite")
    w = 3.0
    proj = model().projected_potentials(q, pos, torch.zeros(3, 3, dtype=DT), F3, [w])[:, 0]
    s = math.sqrt(2 * (SIGMA**2 + w**2))
    r = torch.cdist(pos, pos)
    kern = torch.where(
        r > 0, torch.erf(r / s) / r.clamp(min=1e-9), torch.full_like(r, 2 / (s * math.sqrt(math.pi)))
    )
    assert torch.allclose(proj, KE * kern @ q, rtol=1e-12)


def test_projected_potential_periodic_matches_kspace_sum():
    q, pos, _ = random_system(5, 8.0, neutral=False)
    cell = triclinic(8.0)
    w = 2.5
    proj = model(method="ewald", accuracy=1e-10).projected_potentials(q, pos, cell, T3, [w])[:, 0].numpy()
    k = reciprocal_vectors(cell.numpy(), 12.0 / SIGMA)
    k2 = (k**2).sum(1)
    vol = abs(np.linalg.det(cell.numpy()))
    phase = np.exp(-1j * k @ pos.numpy().T)
    rho = phase @ q.numpy()
    ref = (
        4
        * np.pi
        * KE
        / vol
        * ((np.exp(-(SIGMA**2 + w**2) * k2 / 2) / k2)[:, None] * (rho[:, None] * phase.conj())).sum(0).real
    )
    assert np.allclose(proj, ref, rtol=1e-7)


# ----------------------------------------------------------------------------- Coulomb operator


@pytest.mark.parametrize("name", ["periodic", "slab", "finite", "periodic_pme"])
def test_coulomb_matrix_is_spd_hessian(name):
    el, q, pos, cell, pbc, _ = case(name)
    a = el.coulomb_matrix(pos, cell, pbc)
    assert torch.allclose(a, a.T, atol=1e-10)
    if name == "slab":  # charged-slab background term: positive definite on Σx = 0 only (docs)
        n = a.shape[0]
        proj = torch.eye(n, dtype=DT) - torch.full((n, n), 1.0 / n, dtype=DT)
        assert torch.linalg.eigvalsh(proj @ a @ proj)[1:].min() > 0
    else:
        assert torch.linalg.eigvalsh(a).min() > 0
    hess = torch.autograd.functional.hessian(lambda x: el.energy(x, pos, cell, pbc), q)
    tol = 1e-5 if name == "periodic_pme" else 1e-9
    assert torch.allclose(a, hess, atol=tol * a.abs().max().item())
    if name == "finite":
        diag_self = KE / (SIGMA * math.sqrt(math.pi))
        assert torch.allclose(a.diagonal(), torch.full_like(q, diag_self), rtol=1e-12)


@pytest.mark.parametrize("name", ["periodic", "slab", "finite", "periodic_pme"])
def test_coulomb_matvec_equals_matrix(name):
    el, _, pos, cell, pbc, _ = case(name)
    a = el.coulomb_matrix(pos, cell, pbc)
    # 12 channels: more than one PME channel chunk (PME_CHANNEL_CHUNK = 8)
    x = torch.randn(pos.shape[0], 12, generator=torch.Generator().manual_seed(2), dtype=DT)
    assert torch.allclose(el.coulomb_matvec(x, pos, cell, pbc), a @ x, atol=1e-8, rtol=0)
    assert torch.allclose(el.coulomb_matvec(x[:, 0], pos, cell, pbc), a @ x[:, 0], atol=1e-8, rtol=0)


# ----------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("name", ["periodic", "slab", "finite"])
def test_translation_rotation_permutation_invariance(name):
    el, q, pos, cell, pbc, p = case(name, neutral=True)
    e0 = el.energy(q, pos, cell, pbc, p).item()
    shift = torch.tensor([0.37, -1.2, 0.55], dtype=DT)
    assert el.energy(q, pos + shift, cell, pbc, p).item() == pytest.approx(e0, rel=1e-9)
    rot = rotation_matrix()
    assert el.energy(q, pos @ rot.T, cell @ rot.T, pbc, p @ rot.T).item() == pytest.approx(e0, rel=1e-9)
    perm = torch.randperm(q.shape[0], generator=torch.Generator().manual_seed(0))
    assert el.energy(q[perm], pos[perm], cell, pbc, p[perm]).item() == pytest.approx(e0, rel=1e-12)
    if name == "periodic":  # lattice translation of one atom
        moved = pos.clone()
        moved[0] += cell[1] - cell[2]
        assert el.energy(q, moved, cell, pbc, p).item() == pytest.approx(e0, rel=1e-9)


# ----------------------------------------------------------------------------- field, dtype


def test_field_energy_sign_and_dipole():
    q = torch.tensor([1.0], dtype=DT)
    field = torch.tensor([0.0, 0.0, 0.5], dtype=DT)
    e0 = field_energy(q, torch.zeros(1, 3, dtype=DT), field)
    e1 = field_energy(q, torch.tensor([[0.0, 0.0, 1.0]], dtype=DT), field)
    assert e1.item() - e0.item() == pytest.approx(-0.5)
    pos = torch.zeros(1, 3, dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(field_energy(q, pos, field), pos)
    assert torch.allclose(-g[0], q * field)  # force q E
    p = torch.tensor([[0.1, 0.2, 0.3]], dtype=DT)
    assert torch.allclose(
        total_dipole(q, torch.ones(1, 3, dtype=DT), p), torch.tensor([1.1, 1.2, 1.3], dtype=DT)
    )
    assert field_energy(torch.zeros(1, dtype=DT), pos.detach(), field, p).item() == pytest.approx(-0.15)


@pytest.mark.parametrize("name", ["periodic", "periodic_pme", "slab", "finite"])
def test_float32(name):
    el, q, pos, cell, pbc, p = case(name)
    e64 = el.energy(q, pos, cell, pbc, p).item()
    x = pos.float().requires_grad_(True)
    e32 = el.energy(q.float(), x, cell.float(), pbc, p.float())
    assert e32.dtype == torch.float32
    (g,) = torch.autograd.grad(e32, x)
    assert torch.isfinite(g).all()
    assert e32.item() == pytest.approx(e64, rel=1e-4, abs=1e-4)


def test_differentiable_wrt_charges_and_dipoles_double_backward():
    """Training needs ∂F/∂q: force depends on charges through a second derivative."""
    el, q, pos, cell, pbc, p = case("periodic")
    q = q.clone().requires_grad_(True)
    p = p.clone().requires_grad_(True)
    x = pos.clone().requires_grad_(True)
    e = el.energy(q, x, cell, pbc, p)
    (f,) = torch.autograd.grad(e, x, create_graph=True)
    gq, gp = torch.autograd.grad(f[0, 0], (q, p))
    h = 1e-5
    d = torch.zeros_like(q)
    d[1] = h
    fp = torch.autograd.grad(el.energy(q.detach() + d, x, cell, pbc, p.detach()), x)[0][0, 0]
    fm = torch.autograd.grad(el.energy(q.detach() - d, x, cell, pbc, p.detach()), x)[0][0, 0]
    assert gq[1].item() == pytest.approx(((fp - fm) / (2 * h)).item(), rel=1e-6, abs=1e-8)
    assert torch.isfinite(gp).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    for name in ["periodic", "periodic_pme", "slab", "finite", "point_periodic"]:
        el, q, pos, cell, pbc, p = case(name)
        cpu = el.energy(q, pos, cell, pbc, p).item()
        p_gpu = None if p is None else p.cuda()
        gpu = el.energy(q.cuda(), pos.cuda(), cell.cuda(), pbc.cuda(), p_gpu)
        assert gpu.device.type == "cuda"
        assert gpu.item() == pytest.approx(cpu, rel=1e-9)


@pytest.mark.parametrize("with_dipoles", [False, True])
@pytest.mark.parametrize("include_self", [True, False])
def test_open_energies_of_a_batch_match_one_structure_at_a_time(include_self, with_dipoles):
    """The batched pair sum of open-boundary structures gives each structure's energy and its gradients
    (structures of 1, 3 and 5 atoms, charged and neutral; Gaussian dipoles too)."""
    es = Electrostatics(ElectrostaticsConfig(sigma=0.8, include_self=include_self))
    gen = torch.Generator().manual_seed(3)
    sizes = [3, 1, 5]
    positions = (4.0 * torch.rand(sum(sizes), 3, generator=gen, dtype=DT)).requires_grad_(True)
    charges = torch.randn(sum(sizes), generator=gen, dtype=DT).requires_grad_(True)
    dipoles = None
    if with_dipoles:
        dipoles = (0.3 * torch.randn(sum(sizes), 3, generator=gen, dtype=DT)).requires_grad_(True)
    ptr = torch.tensor([0, 3, 4, 9])
    batched = es.open_energies(charges, positions, ptr, dipoles)
    one_by_one = torch.stack(
        [
            es.energy(
                charges[a:b],
                positions[a:b],
                torch.zeros(3, 3, dtype=DT),
                F3,
                None if dipoles is None else dipoles[a:b],
            )
            for a, b in zip(ptr[:-1].tolist(), ptr[1:].tolist())
        ]
    )
    torch.testing.assert_close(batched, one_by_one, rtol=1e-13, atol=1e-13)
    if with_dipoles:  # the dipole terms matter here (the lone atom's only with its self-energy)
        change = (batched - es.open_energies(charges, positions, ptr)).abs()
        assert float(change[[0, 2]].min()) > 1e-3
        assert (float(change[1]) > 1e-3) == include_self
    weights = torch.tensor([0.3, -1.2, 0.7], dtype=DT)
    inputs = (charges, positions) if dipoles is None else (charges, positions, dipoles)
    grads = torch.autograd.grad((weights * batched).sum(), inputs)
    expected = torch.autograd.grad((weights * one_by_one).sum(), inputs)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["periodic", "periodic_pme", "slab", "finite"])
@pytest.mark.parametrize("include_self", [True, False])
def test_dipole_terms_are_the_energy_without_its_charge_term(name, include_self):
    """``dipole_terms`` differs from ``energy`` by a term that does not depend on the dipoles (charged
    cells, triclinic, PME, a slab with its correction, open): the same field on every atom."""
    el, q, pos, cell, pbc, p = case(name)
    el = model(method=el.config.method, sigma=el.config.sigma, include_self=include_self)
    left_out = []
    for dipoles in (p, -2.0 * p + 0.1):
        dipoles = dipoles.clone().requires_grad_(True)
        full = el.energy(q, pos, cell, pbc, dipoles)
        terms = el.dipole_terms(q, dipoles, pos, cell, pbc)
        (grad_full,) = torch.autograd.grad(full, dipoles)
        (grad_terms,) = torch.autograd.grad(terms, dipoles)
        torch.testing.assert_close(grad_terms, grad_full, rtol=1e-12, atol=1e-14)
        left_out.append((full - terms).item())
    assert float(grad_full.abs().max()) > 1e-2
    assert left_out[1] == pytest.approx(left_out[0], rel=1e-12, abs=1e-13)
    # the difference is the charges' own energy (the slab term, with its dipole part, is in the terms)
    config = {"method": el.config.method, "sigma": el.config.sigma, "include_self": include_self}
    charges_only = model(**config, slab_correction=False).energy(q, pos, cell, pbc).item()
    assert left_out[0] == pytest.approx(charges_only, rel=1e-10)
