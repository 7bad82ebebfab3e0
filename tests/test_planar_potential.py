"""The model's planar-averaged potential against an independent 1D Poisson solution and exact limits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aiida_emlip.analysis.planar_potential import (
    background_potential,
    model_profile,
    region_mean,
    sheet_potential,
    smeared_abs,
)
from aiida_emlip.schema import COULOMB_CONSTANT

K = COULOMB_CONSTANT


def poisson_1d(t: np.ndarray, density: np.ndarray) -> np.ndarray:
    """φ'' = −4πk ρ by two cumulative trapezoid integrals, φ'(t_0) = 0 (no field left of a neutral system)."""
    dt = np.diff(t)
    field = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * dt)]) * 4 * math.pi * K
    # E = −φ' and ∇·E = 4πkρ: E(t) = 4πk ∫ρ, φ = −∫E
    return -np.concatenate([[0.0], np.cumsum(0.5 * (field[1:] + field[:-1]) * dt)])


def gaussian(t: np.ndarray, centre: float, sigma: float) -> np.ndarray:
    return np.exp(-((t - centre) ** 2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))


def test_smeared_abs_limits():
    x = np.array([-5.0, 0.0, 5.0])
    assert np.allclose(smeared_abs(x, 0.0), [5.0, 0.0, 5.0])
    assert np.allclose(smeared_abs(x, 0.5)[[0, 2]], 5.0, atol=1e-12)  # far from the sheet: |x|
    assert smeared_abs(np.array([0.0]), 0.5)[0] == pytest.approx(0.5 * math.sqrt(2 / math.pi))


def test_gaussian_sheets_match_numerical_poisson():
    """Two opposite Gaussian sheets and a Gaussian dipole: the analytic φ equals the integrated Poisson φ."""
    t = np.linspace(0.0, 30.0, 30001)
    area, sigma = 12.0, 0.8
    heights, charges, dipoles = [10.0, 14.0, 20.0], [0.7, -0.7, 0.0], [0.0, 0.0, 0.3]
    analytic = sheet_potential(t, heights, charges, area, sigma, dipoles)
    density = sum(q * gaussian(t, z, sigma) for z, q in zip(heights, charges)) / area
    # a dipole p along the normal is the density −p ∂g/∂z
    density += dipoles[2] * (t - heights[2]) / sigma**2 * gaussian(t, heights[2], sigma) / area
    numeric = poisson_1d(t, density)
    diff = analytic - numeric
    assert np.ptp(diff) < 1e-5  # equal up to a constant
    # Helmholtz: the vacuum levels differ by 4πk P/A, P = Σ q z + Σ p
    moment = sum(q * z for z, q in zip(heights, charges)) + sum(dipoles)
    drop = analytic[-1] - analytic[0]
    assert drop == pytest.approx(4 * math.pi * K * moment / area, rel=1e-9)


def test_background_neutralises_a_charged_cell():
    """Q plus the background −Q over the cell: no field at either end, as for a neutral system."""
    length, area, sigma = 20.0, 9.0, 0.6
    t = np.linspace(0.0, length, 4001)
    phi = sheet_potential(t, [8.0, 9.5], [0.4, -0.1], area, sigma) + background_potential(
        t, 0.3, area, length
    )
    slope_left = (phi[1] - phi[0]) / (t[1] - t[0])
    slope_right = (phi[-1] - phi[-2]) / (t[1] - t[0])
    scale = 2 * math.pi * K * 0.3 / area  # field of the bare charge
    assert abs(slope_left) < 2e-3 * scale
    assert abs(slope_right) < 2e-3 * scale


def test_model_profile_field_and_sign():
    """The electron energy V = −φ: a positive sheet lowers it; a field along +z raises it along +z."""
    n, length, area = 400, 20.0, 10.0
    flat = model_profile([0.5], [0.0], area, length, 0.5, n, origin=0.0, field=0.1)
    grid = np.arange(n) / n * length
    assert np.allclose(np.diff(flat), 0.1 * length / n)  # V = +E t
    sheet = model_profile([0.5, 0.5], [1.0, -1.0], area, length, 0.5, n, origin=0.0)
    assert np.allclose(sheet, 0.0, atol=1e-9)  # coincident opposite charges cancel
    positive = model_profile([0.5], [1.0], area, length, 0.5, n, origin=0.0)
    centre = int(n / 2)
    assert positive[centre] == positive.min()
    # region mean over a window: the points between the two given fractional coordinates
    assert region_mean(grid, [0.25, 0.5]) == pytest.approx(grid[100:201].mean())
