r"""Gaussian dipole (l = 1) terms that torch-pme does not provide.

Every atom carries a Gaussian charge and a Gaussian dipole of the same width σ,
``ρ_i(r) = q_i g(r − r_i) − p_i·∇g(r − r_i)`` with ``g`` the normalised Gaussian of width σ, so that

.. math:: ρ(\mathbf k) = \sum_i (q_i − i\,\mathbf k·\mathbf p_i)\, e^{-σ^2k^2/2} e^{-i\mathbf k·\mathbf r_i}.

Periodic: the k = 0-excluded Hartree energy ``(2π k_e / V) Σ_{k≠0} |ρ(k)|² / k²`` splits into the
charge–charge part (torch-pme) and what this module computes, the charge–dipole and dipole–dipole
parts. With ``C_q = Σ q cos(k·r)``, ``S_q = Σ q sin(k·r)``, ``C_p = Σ (k·p) cos(k·r)``,
``S_p = Σ (k·p) sin(k·r)`` and ``w(k) = e^{-σ²k²}/k²``,

.. math::
    E_{qp+pp} = \frac{4π k_e}{V} \sum_{k∈\text{half}} w(k)\,[C_p^2 + S_p^2 − 2(C_q S_p − S_q C_p)].

The sum runs over chunks of k-vectors with activation checkpointing when there are several, so memory
stays O(N · chunk).
Cost O(N · K) ∝ N² at fixed density: the PME path evaluates the same terms on a mesh instead
(:mod:`aiida_emlip.models.dipole_mesh`).
The periodic sum includes each dipole's self-energy ``k_e p² / (12 √π σ³)``.

Open boundaries: the same density interacts through derivatives of ``v(r) = k_e erf(a r)/r``,
``a = 1/(2σ)``: with ``R = r_i − r_j``, ``B₁ = [erf(ar)/r − (2a/√π) e^{−a²r²}]/r²`` and
``B₂ = [3B₁ − (4a³/√π) e^{−a²r²}]/r²``,
``E_qp = q_i B₁ (p_j·R)`` and ``E_pp = B₁ p_i·p_j − B₂ (p_i·R)(p_j·R)`` (self-energy excluded).
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from aiida_emlip.schema import COULOMB_CONSTANT

SQRT_PI = math.sqrt(math.pi)
#: number of (k-vector × atom) elements per chunk of the k-space sums
CHUNK_ELEMENTS = 1 << 21


def reciprocal_cell(cell: torch.Tensor) -> torch.Tensor:
    """Rows ``b_i`` with ``a_i · b_j = 2π δ_ij`` (differentiable in ``cell``)."""
    return 2.0 * math.pi * torch.linalg.inv(cell).transpose(0, 1)


def half_space_kvectors(cell: torch.Tensor, k_cut: float) -> torch.Tensor:
    """Reciprocal lattice vectors with ``0 < |k| ≤ k_cut``, one of each ``±k`` pair, ``[K, 3]``."""
    recip = reciprocal_cell(cell)
    with torch.no_grad():
        n_max = torch.ceil(k_cut * torch.linalg.norm(cell, dim=1) / (2.0 * math.pi)).long().tolist()
        axes = [torch.arange(-n, n + 1, device=cell.device) for n in n_max]
        m = torch.cartesian_prod(*axes).reshape(-1, 3)
        x0, y0 = m[:, 0] == 0, m[:, 1] == 0
        half = (m[:, 0] > 0) | (x0 & (m[:, 1] > 0)) | (x0 & y0 & (m[:, 2] > 0))
        m = m[half]
        inside = torch.linalg.norm(m.to(recip.dtype) @ recip.detach(), dim=1) <= k_cut
        m = m[inside].to(recip.dtype)
    return m @ recip


def _chunks(kvectors: torch.Tensor, n_atoms: int) -> list[torch.Tensor]:
    size = max(1, CHUNK_ELEMENTS // max(1, n_atoms))
    return list(torch.split(kvectors, size, dim=0))


def _maybe_checkpoint(fn, *args: torch.Tensor, chunked: bool = True) -> torch.Tensor:
    """``fn(*args)``, recomputed in the backward pass when the sum runs over several chunks.

    With one chunk the memory is bounded by the chunk size already: recomputing would only cost time.
    """
    if chunked and torch.is_grad_enabled() and any(a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _energy_chunk(
    kvec: torch.Tensor, charges: torch.Tensor, dipoles: torch.Tensor, positions: torch.Tensor, sigma2: float
) -> torch.Tensor:
    k2 = (kvec * kvec).sum(-1)
    weight = torch.exp(-sigma2 * k2) / k2
    arg = positions @ kvec.T
    cos, sin = torch.cos(arg), torch.sin(arg)
    kp = dipoles @ kvec.T
    c_q, s_q = charges @ cos, charges @ sin
    c_p, s_p = (kp * cos).sum(0), (kp * sin).sum(0)
    return (weight * (c_p * c_p + s_p * s_p - 2.0 * (c_q * s_p - s_q * c_p))).sum()


def _potential_chunk(
    kvec: torch.Tensor, dipoles: torch.Tensor, positions: torch.Tensor, decay: torch.Tensor
) -> torch.Tensor:
    k2 = (kvec * kvec).sum(-1)
    weight = torch.exp(-decay[:, None] * k2[None, :]) / k2  # [W, K]
    arg = positions @ kvec.T
    cos, sin = torch.cos(arg), torch.sin(arg)
    kp = dipoles @ kvec.T
    c_p, s_p = (kp * cos).sum(0), (kp * sin).sum(0)
    # Re[ρ_p(k) e^{ik·r_i}] with ρ_p(k) = Σ_j (−i k·p_j) e^{−ik·r_j}
    return (sin * c_p - cos * s_p) @ weight.T  # [N, W]


def dipole_kspace_energy(
    charges: torch.Tensor,
    dipoles: torch.Tensor,
    positions: torch.Tensor,
    cell: torch.Tensor,
    sigma: float,
    k_cut: float,
) -> torch.Tensor:
    """Charge–dipole plus dipole–dipole k-space energy (eV), dipole self-energies included."""
    kvectors = half_space_kvectors(cell, k_cut)
    volume = torch.abs(torch.linalg.det(cell))
    total = positions.new_zeros(())
    chunks = _chunks(kvectors, positions.shape[0])
    for kvec in chunks:
        fn = lambda k, q, p, r: _energy_chunk(k, q, p, r, sigma * sigma)  # noqa: E731
        total = total + _maybe_checkpoint(fn, kvec, charges, dipoles, positions, chunked=len(chunks) > 1)
    return 4.0 * math.pi * COULOMB_CONSTANT * total / volume


def dipole_kspace_potential(
    dipoles: torch.Tensor,
    positions: torch.Tensor,
    cell: torch.Tensor,
    sigma: float,
    widths: torch.Tensor,
    k_cut: float,
) -> torch.Tensor:
    """Potential of the dipole density projected on Gaussians of the given widths, ``[N, W]`` (V).

    ``widths = [σ]`` gives ``∂E_{qp}/∂q_i``.
    """
    kvectors = half_space_kvectors(cell, k_cut)
    volume = torch.abs(torch.linalg.det(cell))
    decay = 0.5 * (sigma * sigma + widths * widths)
    out = positions.new_zeros(positions.shape[0], widths.shape[0])
    chunks = _chunks(kvectors, positions.shape[0] * max(1, widths.shape[0]))
    for kvec in chunks:
        out = out + _maybe_checkpoint(
            _potential_chunk, kvec, dipoles, positions, decay, chunked=len(chunks) > 1
        )
    # half-space sum: (4π k_e/V) Σ_all = (8π k_e/V) Σ_half
    return 8.0 * math.pi * COULOMB_CONSTANT * out / volume


def dipole_self_energy(dipoles: torch.Tensor, sigma: float) -> torch.Tensor:
    """Σ_i k_e |p_i|² / (12 √π σ³): the Hartree self-energy of the Gaussian dipoles."""
    return dipole_self_energies(dipoles, sigma).sum()


def dipole_self_energies(dipoles: torch.Tensor, sigma: float) -> torch.Tensor:
    """``[N]``: each atom's ``k_e |p_i|² / (12 √π σ³)``, the Hartree self-energy of its Gaussian dipole."""
    return COULOMB_CONSTANT * (dipoles * dipoles).sum(-1) / (12.0 * SQRT_PI * sigma**3)


def b_functions(r: torch.Tensor, a: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``B₁, B₂`` of ``erf(a r)/r`` (∇v = −B₁ R, ∂_a∂_b v = B₂ R_a R_b − B₁ δ_ab), series at small ``a r``."""
    x = a * r
    small = x < 0.1
    xs = torch.where(small, torch.ones_like(x), x)
    rs = xs / a
    gauss = torch.exp(-xs * xs)
    b1 = (torch.erf(xs) / rs - (2.0 * a / SQRT_PI) * gauss) / (rs * rs)
    b2 = (3.0 * b1 - (4.0 * a**3 / SQRT_PI) * gauss) / (rs * rs)
    x2 = x * x
    c = 2.0 / SQRT_PI
    b1_series = c * a**3 * (2.0 / 3.0 - 0.4 * x2 + x2 * x2 / 7.0 - x2**3 / 27.0)
    b2_series = c * a**5 * (0.8 - 4.0 * x2 / 7.0 + 2.0 * x2 * x2 / 9.0 - 2.0 * x2**3 / 33.0)
    return torch.where(small, b1_series, b1), torch.where(small, b2_series, b2)


def _pairs(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.triu_indices(n, n, offset=1, device=device)
    return idx[0], idx[1]


def dipole_direct_energy(
    charges: torch.Tensor, dipoles: torch.Tensor, positions: torch.Tensor, sigma: float
) -> torch.Tensor:
    """Open-boundary charge–dipole plus dipole–dipole energy of Gaussian multipoles (no self-energy)."""
    i, j = _pairs(positions.shape[0], positions.device)
    return dipole_pair_energies(charges, dipoles, positions, i, j, sigma).sum()


def dipole_pair_energies(
    charges: torch.Tensor,
    dipoles: torch.Tensor,
    positions: torch.Tensor,
    i: torch.Tensor,
    j: torch.Tensor,
    sigma: float,
) -> torch.Tensor:
    """The charge–dipole plus dipole–dipole energy of each pair ``(i[k], j[k])`` of Gaussian
    multipoles, ``[P]`` eV, open boundaries (each pair once)."""
    vec = positions[i] - positions[j]
    r = torch.linalg.norm(vec, dim=1)
    b1, b2 = b_functions(r, 1.0 / (2.0 * sigma))
    pi_r = (dipoles[i] * vec).sum(1)
    pj_r = (dipoles[j] * vec).sum(1)
    # charge i with dipole j (R = r_i − r_j) and charge j with dipole i (R → −R)
    e_qp = b1 * (charges[i] * pj_r - charges[j] * pi_r)
    e_pp = b1 * (dipoles[i] * dipoles[j]).sum(1) - b2 * pi_r * pj_r
    return COULOMB_CONSTANT * (e_qp + e_pp)


def dipole_direct_potential(
    dipoles: torch.Tensor, positions: torch.Tensor, sigma: float, widths: torch.Tensor
) -> torch.Tensor:
    """Open-boundary potential of the other atoms' dipoles projected on Gaussians of width w, ``[N, W]``."""
    n = positions.shape[0]
    i, j = _pairs(n, positions.device)
    vec = positions[i] - positions[j]
    r = torch.linalg.norm(vec, dim=1)
    columns = []
    for width in widths.tolist():
        a = 1.0 / math.sqrt(2.0 * (sigma * sigma + width * width))
        b1, _ = b_functions(r, a)
        # potential at i from dipole j: B₁ p_j·(r_i − r_j); at j from dipole i: B₁ p_i·(r_j − r_i)
        at_i = b1 * (dipoles[j] * vec).sum(1)
        at_j = -b1 * (dipoles[i] * vec).sum(1)
        phi = torch.zeros(n, dtype=positions.dtype, device=positions.device)
        columns.append(phi.index_add(0, i, at_i).index_add(0, j, at_j))
    return COULOMB_CONSTANT * torch.stack(columns, dim=1)
