"""The electrostatics layer delivers the accuracy it is asked for, against independent references.

``accuracy = ε`` means (``aiida_emlip.models.accuracy``): ``|ΔE| ≤ ε E_s``, ``RMS|ΔF| ≤ ε F_s``,
``RMS|Δ∂E/∂q| ≤ ε φ_s``, ``RMS|Δ∂E/∂p| ≤ ε φ_s/ℓ``. Checked for ε = 1e-4, 1e-6, 1e-8 on a disordered
ionic cell (cubic and strongly triclinic), a tilted slab and a one-atom (fully coherent) lattice, with
Gaussian charges (σ = 1.5 Å, and σ = 0.5 Å split between real and k-space), Gaussian charges +
dipoles and point charges, neutral and charged, Ewald and PME;
references from ``tests/electrostatics_reference.py`` (float64, converged far beyond 1e-8).
Madelung constants of five crystals to ε relative.
"""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch
from electrostatics_reference import reference_derivatives

from aiida_emlip.models.accuracy import (
    PME_FORCE,
    SPLIT_MIN_RATIO,
    coulomb_scales,
    kspace_cutoff,
    pme_parameters,
    smooth_size,
    split_smearing,
)
from aiida_emlip.models.electrostatics import Electrostatics, ElectrostaticsConfig
from aiida_emlip.models.kernels import GaussianCoulombPotential, GaussianSplitCoulombPotential
from aiida_emlip.schema import COULOMB_CONSTANT as KE

DT = torch.float64
T3 = torch.tensor([True, True, True])
SLAB = torch.tensor([True, True, False])
SIGMA = 1.5
#: narrow Gaussians (pair width 0.71 Å, as the latent head's): summed with a real-space part
NARROW_SIGMA = 0.5
ACCURACIES = [1e-4, 1e-6, 1e-8]
FCC = torch.tensor([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]], dtype=DT)
#: rows a, b, c: 27° between a and b, 58° between a and c, 51° between b and c
STRONG_TRICLINIC = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.45, 0.0], [0.55, 0.35, 0.8]], dtype=DT)


def disordered_rocksalt(kind: str, charged: bool, dipoles: bool):
    """64 ions on a 2×2×2 rocksalt supercell, displaced by ~0.25 Å, charges ±(1 ± 0.2)."""
    g = torch.Generator().manual_seed(3)
    a = 5.64
    frac = torch.cat([FCC, FCC + torch.tensor([0.5, 0.0, 0.0], dtype=DT)]) / 2
    frac = (frac[None] + torch.cartesian_prod(*[torch.tensor([0.0, 0.5], dtype=DT)] * 3)[:, None]).reshape(
        -1, 3
    )
    q = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0], dtype=DT).repeat(8)
    cell = torch.eye(3, dtype=DT) * 2 * a
    if kind == "triclinic":
        cell = STRONG_TRICLINIC * (torch.linalg.det(cell) / torch.linalg.det(STRONG_TRICLINIC)) ** (1 / 3)
    pos = frac @ cell + 0.25 * torch.randn(64, 3, generator=g, dtype=DT)
    if kind == "slab":  # 6.5 Å of vacuum along a tilted third vector
        cell = cell.clone()
        cell[2] = torch.tensor([1.3, -0.8, 2 * a + 6.5], dtype=DT)
    q = q * (1 + 0.2 * torch.randn(64, generator=g, dtype=DT))
    q = q - q.mean() + (1.7 / 64 if charged else 0.0)
    p = 0.3 * torch.randn(64, 3, generator=g, dtype=DT) if dipoles else None
    return q, pos, cell, p


def one_atom_lattice(dipoles: bool):
    """One charge (and dipole) per strongly triclinic cell: every k-vector is fully coherent."""
    cell = STRONG_TRICLINIC * 6.0
    q = torch.tensor([0.8], dtype=DT)
    p = torch.tensor([[0.3, -0.2, 0.25]], dtype=DT) if dipoles else None
    return q, torch.tensor([[0.4, 0.3, 0.2]], dtype=DT), cell, p


@cache
def system(kind: str, content: str, charged: bool):
    """(q, positions, cell, dipoles, pbc, σ) and the reference derivatives."""
    dipoles = content == "dipoles"
    q, pos, cell, p = (
        one_atom_lattice(dipoles) if kind == "lattice" else disordered_rocksalt(kind, charged, dipoles)
    )
    sigma = {"point": 0.0, "narrow": NARROW_SIGMA}.get(content, SIGMA)
    pbc = SLAB if kind == "slab" else T3
    return (q, pos, cell, p, pbc, sigma), reference_derivatives(q, pos, cell, sigma, p, slab=kind == "slab")


def model_derivatives(el: Electrostatics, q, pos, cell, p, pbc) -> dict[str, torch.Tensor]:
    inputs = [q.clone().requires_grad_(True), pos.clone().requires_grad_(True)]
    if p is not None:
        inputs.append(p.clone().requires_grad_(True))
    e = el.energy(inputs[0], inputs[1], cell, pbc, inputs[2] if p is not None else None)
    grads = torch.autograd.grad(e, inputs)
    out = {"energy": e.detach(), "forces": -grads[1], "potential": grads[0]}
    if p is not None:
        out["dE_dp"] = grads[2]
    return out


def relative_errors(ours: dict, ref: dict, q, cell, p) -> dict[str, float]:
    """Errors in units of the Coulomb scales."""
    s = coulomb_scales(q, abs(float(torch.linalg.det(cell))), p)
    scale = {"energy": s.energy, "forces": s.force, "potential": s.potential, "dE_dp": s.field}
    out = {}
    for key, value in ours.items():
        diff = value - ref[key]
        if key == "energy":
            error = abs(diff.item())
        else:  # RMS over atoms of the (vector) difference
            error = diff.reshape(diff.shape[0], -1).pow(2).sum(1).mean().sqrt().item()
        out[key] = error / scale[key]
    return out


CASES = [
    (kind, content, charged)
    for kind in ["cubic", "triclinic", "slab"]
    for content in ["charges", "narrow", "dipoles", "point"]
    for charged in [False, True]
] + [("lattice", content, True) for content in ["charges", "narrow", "dipoles", "point"]]


@pytest.mark.parametrize("accuracy", ACCURACIES)
@pytest.mark.parametrize("method", ["ewald", "pme"])
@pytest.mark.parametrize(("kind", "content", "charged"), CASES)
def test_requested_accuracy_is_met(kind, content, charged, method, accuracy):
    (q, pos, cell, p, pbc, sigma), ref = system(kind, content, charged)
    el = Electrostatics(ElectrostaticsConfig(sigma=sigma, method=method, accuracy=accuracy))
    errors = relative_errors(model_derivatives(el, q, pos, cell, p, pbc), ref, q, cell, p)
    assert max(errors.values()) <= accuracy, errors


MADELUNG = {  # E per formula unit = −M k_e z₊ |z₋| / r₀ (r₀ nearest-neighbour distance)
    "rocksalt": 1.747564594633,
    "rocksalt-primitive": 1.747564594633,
    "cesium-chloride": 1.762674773070,
    "zincblende": 1.638055053388,
    "fluorite": 2.519392439,
}


def crystal(name: str):
    """(charges, positions, cell, nearest-neighbour distance, z₊|z₋| × formula units)."""
    if name == "rocksalt":
        a = 5.64
        pos = torch.cat([FCC, FCC + torch.tensor([0.5, 0, 0], dtype=DT)]) * a
        return torch.tensor([1.0] * 4 + [-1.0] * 4, dtype=DT), pos, torch.eye(3, dtype=DT) * a, a / 2, 4
    if name == "rocksalt-primitive":  # rhombohedral cell, 60° between the vectors
        a = 5.64
        cell = torch.tensor([[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]], dtype=DT) * a
        pos = torch.tensor([[0, 0, 0], [0.5 * a, 0, 0]], dtype=DT)
        return torch.tensor([1.0, -1.0], dtype=DT), pos, cell, a / 2, 1
    if name == "cesium-chloride":
        a = 4.12
        pos = torch.tensor([[0, 0, 0], [0.5, 0.5, 0.5]], dtype=DT) * a
        return torch.tensor([1.0, -1.0], dtype=DT), pos, torch.eye(3, dtype=DT) * a, math.sqrt(3) / 2 * a, 1
    if name == "zincblende":
        a = 5.41
        pos = torch.cat([FCC, FCC + 0.25]) * a
        return (
            torch.tensor([1.0] * 4 + [-1.0] * 4, dtype=DT),
            pos,
            torch.eye(3, dtype=DT) * a,
            math.sqrt(3) / 4 * a,
            4,
        )
    a = 5.46  # fluorite CaF2: Ca²⁺ on fcc, F⁻ on the tetrahedral sites
    pos = torch.cat([FCC, FCC + 0.25, FCC + 0.75]) * a
    q = torch.tensor([2.0] * 4 + [-1.0] * 8, dtype=DT)
    return q, pos, torch.eye(3, dtype=DT) * a, math.sqrt(3) / 4 * a, 4 * 2


@pytest.mark.parametrize("accuracy", ACCURACIES)
@pytest.mark.parametrize("method", ["ewald", "pme"])
@pytest.mark.parametrize("name", sorted(MADELUNG))
def test_madelung_constants(name, method, accuracy):
    q, pos, cell, r0, units = crystal(name)
    e = Electrostatics(ElectrostaticsConfig(sigma=0.0, method=method, accuracy=accuracy)).energy(
        q, pos, cell, T3
    )
    madelung = -e.item() * r0 / (KE * units)
    assert madelung == pytest.approx(MADELUNG[name], rel=accuracy)
    # the crystal energy exceeds the energy scale E_s, so ε relative to E is the stricter statement
    assert abs(e.item()) > coulomb_scales(q, abs(float(torch.linalg.det(cell)))).energy


def test_parameters_follow_the_accuracy():
    """Tighter accuracy → larger k-space cutoff and finer PME mesh; a fixed node count is honoured."""
    (_, _, cell, _, _, _), _ = system("cubic", "charges", False)
    cuts = [kspace_cutoff(cell, SIGMA, 64, a) for a in ACCURACIES]
    assert cuts == sorted(cuts) and cuts[0] < cuts[-1]
    assert all(
        kspace_cutoff(cell, SIGMA, 64, a, dipoles=True) > kspace_cutoff(cell, SIGMA, 64, a)
        for a in ACCURACIES
    )
    meshes = [pme_parameters(cell, SIGMA, 64, a).mesh[0] for a in ACCURACIES]
    assert meshes == sorted(meshes) and meshes[0] < meshes[-1]
    for nodes in PME_FORCE:
        assert pme_parameters(cell, SIGMA, 64, 1e-6, nodes=nodes).nodes == nodes
    with pytest.raises(ValueError, match="pme_interpolation_nodes"):
        ElectrostaticsConfig(pme_interpolation_nodes=8)


def test_smooth_mesh_sizes():
    assert [smooth_size(n) for n in [1, 7, 11, 49, 61, 97, 121]] == [1, 8, 12, 50, 64, 100, 125]


def test_narrow_gaussians_are_split_between_real_and_kspace():
    """Narrow Gaussians get a wider k-space kernel and the rest as real-space pairs; wide ones and the
    default σ stay wholly in k-space; the two parts add up to the Gaussian kernel at every distance."""
    (_, _, cell, _, _, _), _ = system("cubic", "charges", False)
    volume = abs(float(torch.linalg.det(cell)))
    for method in ["ewald", "pme"]:
        narrow = math.sqrt(2.0) * NARROW_SIGMA
        assert split_smearing(volume, narrow, 64, method) >= SPLIT_MIN_RATIO * narrow
        assert split_smearing(volume, math.sqrt(2.0) * SIGMA, 64, method) == math.sqrt(2.0) * SIGMA
    r = torch.linspace(0.05, 12.0, 400, dtype=DT)
    for width in [0.0, 0.7]:
        pot = GaussianSplitCoulombPotential(smearing=2.0, width=width)
        whole = pot.sr_from_dist(r) + pot.lr_from_dist(r)
        torch.testing.assert_close(whole, GaussianCoulombPotential(width).from_dist(r), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="width must lie"):
        GaussianSplitCoulombPotential(smearing=1.0, width=1.5)


@pytest.mark.parametrize("method", ["ewald", "pme"])
def test_split_second_derivatives_match_the_kspace_sum(method, monkeypatch):
    """Training differentiates the forces: through the real-space pairs, d(ΣF²)/d(q, r, cell) of the
    split equals that of the sum done wholly in k-space."""
    (q, pos, cell, _, pbc, sigma), _ = system("triclinic", "narrow", True)
    grads = []
    for ratio in [SPLIT_MIN_RATIO, math.inf]:
        monkeypatch.setattr("aiida_emlip.models.accuracy.SPLIT_MIN_RATIO", ratio)
        inputs = [t.clone().requires_grad_(True) for t in (q, pos, cell)]
        el = Electrostatics(ElectrostaticsConfig(sigma=sigma, method=method, accuracy=1e-6))
        energy = el.energy(inputs[0], inputs[1], inputs[2], pbc)
        (forces,) = torch.autograd.grad(energy, inputs[1], create_graph=True)
        grads.append(torch.autograd.grad(forces.pow(2).sum(), inputs))
    for split, kspace in zip(*grads, strict=True):
        assert float((split - kspace).norm() / kspace.norm()) < 1e-5
