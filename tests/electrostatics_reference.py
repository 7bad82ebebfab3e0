r"""Independent float64 references for the electrostatics accuracy tests and ``bench/bench_accuracy.py``.

Written from the textbook formulas, sharing no code with :mod:`aiida_emlip.models`:

* Gaussian charges and dipoles of width σ (3D periodic): the k = 0-excluded Hartree energy
  ``(2π k_e/V) Σ_{k≠0} |ρ(k)|²/k²`` with ``ρ(k) = Σ_i (q_i − i k·p_i) e^{−σ²k²/2} e^{−ik·r_i}``,
  summed over the full k-sphere to ``|k| ≤ 7/σ`` (the neglected terms are below ``e^{−49}``).
  The self-energies are part of that sum, as in the model with ``include_self``.
* point charges (3D periodic): an Ewald sum with real-space images in a brute-force loop and
  both tails below 1e-16, with the neutralising background ``−π Q² k_e/(2α²V)``.
* slabs: the 3D sum plus ``(2π k_e/V)(M₁² − Q M₂ − Q²h²/12)`` along the normal of the two periodic
  vectors.

Forces and other derivatives come from autograd of these energies.
"""

from __future__ import annotations

import math

import torch

from aiida_emlip.schema import COULOMB_CONSTANT as KE

#: (k-vector × atom) elements per chunk of the reference k-sums
CHUNK = 1 << 22


def reciprocal(cell: torch.Tensor) -> torch.Tensor:
    return 2.0 * math.pi * torch.linalg.inv(cell).T


def kvectors(cell: torch.Tensor, k_max: float) -> torch.Tensor:
    """All reciprocal lattice vectors with ``0 < |k| ≤ k_max`` (both ±k), differentiable in ``cell``."""
    recip = reciprocal(cell)
    # |m_i| = |k·a_i| / 2π ≤ k_max |a_i| / 2π bounds every vector of the sphere
    n = [math.ceil(k_max * float(torch.linalg.norm(a)) / (2 * math.pi)) for a in cell.detach()]
    m = torch.cartesian_prod(*[torch.arange(-k, k + 1, dtype=cell.dtype) for k in n])
    k2 = ((m @ recip.detach()) ** 2).sum(1)
    m = m[(k2 > 0) & (k2 <= k_max * k_max)]
    return m @ recip


def gaussian_energy(
    q: torch.Tensor,
    pos: torch.Tensor,
    cell: torch.Tensor,
    sigma: float,
    p: torch.Tensor | None = None,
    k_max: float | None = None,
) -> torch.Tensor:
    """Hartree energy of Gaussian charges (and dipoles), k = 0 excluded, self-energies included (eV)."""
    return sum(_gaussian_chunks(q, pos, cell, sigma, p, k_max), pos.new_zeros(()))


def _gaussian_chunks(q, pos, cell, sigma, p=None, k_max=None):
    """The k-sum of :func:`gaussian_energy` as a generator of partial energies (chunks of k)."""
    k_all = kvectors(cell, (7.0 if k_max is None else k_max) / sigma)
    volume = torch.abs(torch.linalg.det(cell))
    for kc in torch.split(k_all, max(1, CHUNK // pos.shape[0])):
        k2 = (kc * kc).sum(1)
        phase = torch.exp(-1j * (pos @ kc.T))  # [N, K]
        amp = q.to(phase.dtype)[:, None]
        if p is not None:
            amp = amp - 1j * (p @ kc.T)
        rho = (amp * phase).sum(0) * torch.exp(-(sigma**2) * k2 / 2)
        yield 2.0 * math.pi * KE * (rho.abs() ** 2 / k2).sum() / volume


def point_energy(q: torch.Tensor, pos: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """Ewald energy of point charges (self-interaction removed, uniform background if Q ≠ 0) (eV)."""
    volume = torch.abs(torch.linalg.det(cell))
    alpha = 0.35 * (pos.shape[0] / float(volume)) ** (1 / 3) * 2.0  # any split works; tails < 1e-16
    r_max = 6.3 / alpha  # erfc(6.3) ≈ 1e-18
    k_max = 2.0 * alpha * 6.3  # exp(−k²/4α²) ≈ 5e-18
    # real space: images within r_max of the cell, brute force
    heights = volume / torch.linalg.norm(torch.linalg.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), dim=1)
    n = [math.ceil(r_max / float(h)) + 1 for h in heights.detach()]
    shifts = torch.cartesian_prod(*[torch.arange(-k, k + 1, dtype=cell.dtype) for k in n]) @ cell
    real = pos.new_zeros(())
    for i in range(pos.shape[0]):
        d = pos[i] - pos[None, :, :] + shifts[:, None, :]  # [S, N, 3]
        r = torch.linalg.norm(d, dim=2)
        mask = (r > 1e-10) & (r < r_max)
        rs = torch.where(mask, r, torch.ones_like(r))
        real = real + 0.5 * q[i] * (torch.where(mask, torch.erfc(alpha * rs) / rs, 0.0) * q[None, :]).sum()
    k = kvectors(cell, k_max)
    k2 = (k * k).sum(1)
    s = (q.to(torch.complex128)[:, None] * torch.exp(-1j * (pos @ k.T))).sum(0)
    recip = (2.0 * math.pi / volume) * (s.abs() ** 2 * torch.exp(-k2 / (4 * alpha**2)) / k2).sum()
    self_e = -alpha / math.sqrt(math.pi) * (q * q).sum()
    background = -math.pi * q.sum() ** 2 / (2 * alpha**2 * volume)
    return KE * (real + recip + self_e + background)


def slab_term(
    q: torch.Tensor,
    pos: torch.Tensor,
    cell: torch.Tensor,
    sigma: float,
    p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Correction of a 3D sum with vacuum along ``cell[2]`` to the 2D-periodic slab (eV)."""
    normal = torch.linalg.cross(cell[0], cell[1])
    area = torch.linalg.norm(normal)
    n = normal / area
    volume = torch.abs(torch.linalg.det(cell))
    h = volume / area
    z = pos @ n
    m1 = (q * z).sum()
    m2 = (q * (z * z + sigma**2)).sum()
    if p is not None:
        m1 = m1 + (p @ n).sum()
        m2 = m2 + 2 * ((p @ n) * z).sum()
    big_q = q.sum()
    return 2 * math.pi * KE / volume * (m1 * m1 - big_q * m2 - big_q * big_q * h * h / 12)


def reference_energy(q, pos, cell, sigma: float, p=None, slab: bool = False) -> torch.Tensor:
    e = gaussian_energy(q, pos, cell, sigma, p) if sigma > 0 else point_energy(q, pos, cell)
    return e + slab_term(q, pos, cell, sigma, p) if slab else e


def reference_derivatives(
    q, pos, cell, sigma: float, p=None, slab: bool = False, k_max: float | None = None
) -> dict[str, torch.Tensor]:
    """Energy, forces ``−∂E/∂r``, potentials ``∂E/∂q`` and, with dipoles, ``∂E/∂p``.

    The k-sum is differentiated chunk by chunk, so memory stays bounded for thousands of atoms.
    """
    inputs = [q.detach().clone().requires_grad_(True), pos.detach().clone().requires_grad_(True)]
    if p is not None:
        inputs.append(p.detach().clone().requires_grad_(True))
    dipoles = inputs[2] if p is not None else None
    if sigma > 0:
        parts = _gaussian_chunks(inputs[0], inputs[1], cell, sigma, dipoles, k_max)
    else:
        parts = iter([point_energy(inputs[0], inputs[1], cell)])
    if slab:
        parts = [*parts, slab_term(inputs[0], inputs[1], cell, sigma, dipoles)]
    energy = pos.new_zeros(())
    grads = [torch.zeros_like(x) for x in inputs]
    for part in parts:
        energy = energy + part.detach()
        for g, dg in zip(grads, torch.autograd.grad(part, inputs, allow_unused=True)):
            if dg is not None:
                g += dg
    out = {"energy": energy, "forces": -grads[1], "potential": grads[0]}
    if p is not None:
        out["dE_dp"] = grads[2]
    return out
