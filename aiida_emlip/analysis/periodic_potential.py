r"""Planar-averaged electrostatic potential of a model's Gaussian charges and dipoles in a periodic cell.

The counterpart of pp.x's ``V_bare + V_H`` averaged over the lattice planes spanned by two cell vectors
(what Freysoldt's potential alignment compares between a defect and its host). Along lattice vector
``a_i`` the planes have area ``A = |a_j × a_k|`` and spacing ``d = V/A``; an atom at fractional
coordinate ``s_i`` sits at height ``z = s_i d`` along the plane normal n̂. A Gaussian charge q of
width σ and a Gaussian dipole p average to the 1D density whose Fourier coefficients are

    ρ̂(G) = (1/V) Σ_i (q_i − i G p_i·n̂) e^{−σ²G²/2} e^{−i G z_i},   G = 2πm/d,

and the periodic 1D Poisson equation φ'' = −4πk_e ρ̄ gives φ̂(G) = 4πk_e ρ̂(G)/G² for m ≠ 0; the
m = 0 term (Σq = Q) is cancelled by the uniform background of a charged cell, so φ has zero mean like
pw.x's Hartree potential. The profile is returned, like pw.x's, as the electron's potential energy
V(s) = −φ(s) in eV on the grid s_j = j/n. Point charges (σ = 0) are resolved to the grid's Nyquist
wavevector.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from aiida_emlip.schema import COULOMB_CONSTANT

#: Gaussian factors below this are dropped from the Fourier sum.
GAUSSIAN_CUTOFF = 1e-14


def plane_geometry(cell: np.ndarray, axis: int) -> tuple[float, float, np.ndarray]:
    """(area A, spacing d, unit normal n̂ with n̂·a_axis > 0) of the lattice planes normal to ``axis``."""
    cell = np.asarray(cell, dtype=float)
    j, k = [i for i in range(3) if i != axis]
    cross = np.cross(cell[j], cell[k])
    area = float(np.linalg.norm(cross))
    normal = cross / area
    if float(normal @ cell[axis]) < 0.0:
        normal = -normal
    spacing = abs(float(np.linalg.det(cell))) / area
    return area, spacing, normal


def planar_potential(
    cell: np.ndarray,
    fractional: np.ndarray,
    charges: Sequence[float],
    axis: int,
    n_points: int,
    sigma: float = 0.0,
    dipoles: np.ndarray | None = None,
) -> np.ndarray:
    """V(s_j) (eV) along lattice vector ``axis`` of Gaussian charges (e) and dipoles (e·Å, Cartesian).

    ``fractional`` are the atoms' fractional coordinates (N × 3). The mean of the profile is zero.
    """
    if n_points < 2:
        raise ValueError("n_points must be at least 2")
    area, spacing, normal = plane_geometry(cell, axis)
    volume = area * spacing
    z = (np.asarray(fractional, dtype=float)[:, axis] % 1.0) * spacing
    q = np.asarray(charges, dtype=float)
    p = np.zeros_like(q) if dipoles is None else np.asarray(dipoles, dtype=float) @ normal
    m_max = n_points // 2
    if sigma > 0.0:
        # e^{−σ²G²/2} < GAUSSIAN_CUTOFF beyond G = √(−2 ln cutoff)/σ
        m_max = min(
            m_max, math.ceil(math.sqrt(-2.0 * math.log(GAUSSIAN_CUTOFF)) / sigma * spacing / (2 * math.pi))
        )
    m = np.arange(1, max(m_max, 1) + 1)
    g = 2.0 * math.pi * m / spacing
    phase = np.exp(-1j * np.outer(g, z))  # (M, N)
    rho = ((q[None, :] - 1j * g[:, None] * p[None, :]) * phase).sum(axis=1) / volume
    rho = rho * np.exp(-0.5 * (sigma * g) ** 2)
    phi_hat = 4.0 * math.pi * COULOMB_CONSTANT * rho / g**2
    s = np.arange(n_points) / n_points
    phi = 2.0 * np.real(np.exp(1j * np.outer(s * spacing, g)) @ phi_hat)
    return -phi


def planar_potentials(
    cell: np.ndarray,
    fractional: np.ndarray,
    charges: Sequence[float],
    grid: Sequence[int],
    sigma: float = 0.0,
    dipoles: np.ndarray | None = None,
) -> dict[int, np.ndarray]:
    """:func:`planar_potential` along the three lattice vectors, on the grid sizes ``grid``."""
    return {
        axis: planar_potential(cell, fractional, charges, axis, int(grid[axis]), sigma, dipoles)
        for axis in range(3)
    }
