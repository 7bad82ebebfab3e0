r"""Planar-averaged electrostatic potential of a model's Gaussian density along a slab normal (NumPy).

A Gaussian charge q of width σ at height z_i, averaged over a face of area A, is a Gaussian sheet;
the 1D Poisson equation φ'' = −4πk_e ρ̄(z) gives, open along z (the field vanishes far from a
neutral system, as with pw.x's dipole correction),

    φ_q(z) = −(2πk_e q/A) S_σ(z − z_i),   S_σ(x) = x erf(x/√2σ) + σ√(2/π) e^{−x²/2σ²}

(the smeared ``|x|``; ``S_0 = |x|``). A Gaussian dipole p (component along the normal) gives
φ_p(z) = (2πk_e p/A) erf((z − z_i)/√2σ): a step of 4πk_e p/A, the Helmholtz drop. A charged cell
(Σq = Q ≠ 0) gets pw.x's neutralising background, −Q spread uniformly over the cell's length L; a
homogeneous field E along the normal adds −E z. The profiles are reported, like pw.x's
``V_bare + V_H`` (plot_num 11), as the electron's potential energy V(z) = −φ(z) in eV.

The coordinate t runs over one cell length starting at ``origin`` (fractional), which the callers
put in the middle of the vacuum, where pw.x's sawtooth turns over: inside [origin, origin + 1) the
open-boundary profile and the dipole-corrected periodic one of pw.x agree up to a constant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.special import erf

from aiida_emlip.schema import COULOMB_CONSTANT

SQRT2 = math.sqrt(2.0)


def smeared_abs(x: np.ndarray, sigma: float) -> np.ndarray:
    """S_σ(x): ``|x|`` convolved with a normalised Gaussian of standard deviation σ (``|x|`` for σ = 0)."""
    x = np.asarray(x, dtype=float)
    if sigma <= 0.0:
        return np.abs(x)
    return x * erf(x / (SQRT2 * sigma)) + sigma * math.sqrt(2.0 / math.pi) * np.exp(-(x**2) / (2 * sigma**2))


def sheet_potential(
    t: np.ndarray,
    heights: Sequence[float],
    charges: Sequence[float],
    area: float,
    sigma: float,
    dipoles: Sequence[float] | None = None,
) -> np.ndarray:
    """φ(t) (V) of Gaussian charges (e) and dipoles (e·Å, along the normal) at ``heights``, open along t."""
    t = np.asarray(t, dtype=float)[:, None]
    z = np.asarray(heights, dtype=float)[None, :]
    q = np.asarray(charges, dtype=float)[None, :]
    pref = 2.0 * math.pi * COULOMB_CONSTANT / area
    phi = -pref * (q * smeared_abs(t - z, sigma)).sum(axis=1)
    if dipoles is not None:
        p = np.asarray(dipoles, dtype=float)[None, :]
        if sigma > 0.0:
            step = erf((t - z) / (SQRT2 * sigma))
        else:
            step = np.sign(t - z)
        phi = phi + pref * (p * step).sum(axis=1)
    return phi


def background_potential(t: np.ndarray, total_charge: float, area: float, length: float) -> np.ndarray:
    """φ(t) (V) of the uniform background −Q spread over t ∈ [0, L) (evaluated inside that range)."""
    t = np.asarray(t, dtype=float)
    density = -float(total_charge) / (area * length)  # e/Å³
    # −2πk_e ρ ∫_0^L |t − t'| dt' = −2πk_e ρ (t² + (L − t)²)/2
    return -2.0 * math.pi * COULOMB_CONSTANT * density * 0.5 * (t**2 + (length - t) ** 2)


def model_profile(
    fractional: Sequence[float],
    charges: Sequence[float],
    area: float,
    length: float,
    sigma: float,
    n_points: int,
    origin: float,
    dipoles: Sequence[float] | None = None,
    field: float = 0.0,
) -> np.ndarray:
    """The electron's potential energy V(s_j) (eV) on the grid s_j = j/n of one cell length.

    ``fractional`` are the atoms' fractional coordinates along the normal axis, ``charges`` and
    ``dipoles`` the model's (e, e·Å along the normal), ``field`` the applied field (V/Å along +normal),
    ``origin`` the fractional coordinate where the unwrapped coordinate t starts (in the vacuum).
    """
    grid = np.arange(n_points) / n_points
    t = ((grid - origin) % 1.0) * length
    heights = ((np.asarray(fractional, dtype=float) - origin) % 1.0) * length
    q = np.asarray(charges, dtype=float)
    phi = sheet_potential(t, heights, q, area, sigma, dipoles)
    total = float(q.sum())
    if abs(total) > 1e-12:
        phi = phi + background_potential(t, total, area, length)
    phi = phi - float(field) * t
    return -phi


def window_mask(n_points: int, start: float, stop: float) -> np.ndarray:
    """Grid points s_j = j/n inside the periodic fractional window [start, stop)."""
    grid = np.arange(n_points) / n_points
    return ((grid - start) % 1.0) < ((stop - start) % 1.0 or 1.0)


def region_mean(profile: np.ndarray, fractional: Sequence[float]) -> float:
    """Mean of ``profile`` over the grid points between the lowest and highest of ``fractional``.

    The atoms of one region must not straddle the cell boundary (the samplers keep them inside).
    """
    f = np.asarray(fractional, dtype=float) % 1.0
    values = np.asarray(profile, dtype=float)
    mask = window_mask(len(values), float(f.min()), float(f.max()) + 1e-9)
    if not mask.any():  # a region thinner than one grid step: the nearest grid point
        return float(values[round(float(f.mean()) * len(values)) % len(values)])
    return float(values[mask].mean())
