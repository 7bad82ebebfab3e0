"""Planar-averaged potential of Gaussian charges and dipoles in periodic cells, against independent sums."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aiida_emlip.analysis.periodic_potential import planar_potential, planar_potentials, plane_geometry
from aiida_emlip.schema import COULOMB_CONSTANT

TRICLINIC = np.array([[6.0, 0.0, 0.0], [1.7, 5.5, 0.0], [-1.1, 0.9, 7.3]])


def _real_space_profile(cell, fractional, charges, dipoles, sigma, axis, n_fine):
    """φ by integrating Gauss's law twice over the planar-averaged density summed over images."""
    area, spacing, normal = plane_geometry(cell, axis)
    z = np.arange(n_fine) / n_fine * spacing
    heights = (fractional[:, axis] % 1.0) * spacing
    p_n = dipoles @ normal
    rho = np.full(n_fine, -float(np.sum(charges)) / (area * spacing))
    norm = 1.0 / (math.sqrt(2.0 * math.pi) * sigma)
    for image in range(-3, 4):
        x = z[:, None] - heights[None, :] - image * spacing
        gauss = norm * np.exp(-(x**2) / (2.0 * sigma**2))
        # Gaussian dipole density −p·∇g, averaged: −p_n g'(x) = p_n x g(x)/σ²
        rho += (gauss * charges[None, :] + p_n[None, :] * x * gauss / sigma**2).sum(axis=1) / area
    dz = spacing / n_fine
    # E(z) = 4πk_e ∫ρ (up to a constant fixed by a periodic φ: zero-mean E), φ = −∫E (zero mean)
    field = 4.0 * math.pi * COULOMB_CONSTANT * np.cumsum(rho) * dz
    field -= field.mean()
    phi = -np.cumsum(field) * dz
    return -(phi - phi.mean())


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_profile_matches_real_space_double_integration(axis):
    rng = np.random.default_rng(4)
    fractional = rng.random((5, 3))
    charges = np.array([0.8, -0.5, 0.4, -0.3, 0.6])  # Σq = 1: charged cell with background
    dipoles = rng.normal(scale=0.2, size=(5, 3))
    sigma = 0.6
    n_fine = 6000
    fine = _real_space_profile(TRICLINIC, fractional, charges, dipoles, sigma, axis, n_fine)
    profile = planar_potential(TRICLINIC, fractional, charges, axis, 60, sigma=sigma, dipoles=dipoles)
    assert abs(profile.mean()) < 1e-12
    sampled = fine[:: n_fine // 60]
    assert np.max(np.abs(profile - sampled)) < 2e-3 * np.ptp(profile)
    assert np.ptp(profile) > 0.5  # eV: a real signal, not a flat line


def test_point_charge_sheet_is_the_background_parabola():
    """One point charge q with its background: V(z) = −(2πk_e q/A)(z²/d − z) up to a constant."""
    cell = np.diag([5.0, 5.0, 12.0])
    q = 1.0
    n = 400
    profile = planar_potential(cell, np.array([[0.0, 0.0, 0.0]]), [q], 2, n, sigma=0.05)
    area, d, _ = plane_geometry(cell, 2)
    z = np.arange(n) / n * d
    expected = -(2.0 * math.pi * COULOMB_CONSTANT * q / area) * (z**2 / d - z)
    expected -= expected.mean()
    inner = slice(20, n - 20)  # away from the smeared kink at the sheet
    assert np.max(np.abs(profile[inner] - expected[inner])) < 1e-3


def test_dipole_layer_gives_the_helmholtz_step():
    """A neutral dipole layer: V jumps by −4πk_e p/A across it (electron energy), flat elsewhere."""
    cell = np.diag([4.0, 4.0, 20.0])
    p = 0.3
    profile = planar_potential(
        cell, np.array([[0.0, 0.0, 0.5]]), [0.0], 2, 200, sigma=0.3, dipoles=np.array([[0.0, 0.0, p]])
    )
    area = 16.0
    # periodic: the step is compensated by a uniform ramp; the step itself is the local jump
    step = profile[110] - profile[90]
    ramp = (profile[189] - profile[111]) / 78 * 20  # slope of the ramp across the 20 points
    assert step - ramp == pytest.approx(-4.0 * math.pi * COULOMB_CONSTANT * p / area, rel=2e-3)


def test_translation_shifts_the_profile():
    fractional = np.array([[0.1, 0.2, 0.3], [0.6, 0.5, 0.8]])
    charges = [1.0, -1.0]
    base = planar_potential(TRICLINIC, fractional, charges, 1, 50, sigma=0.5)
    shifted = planar_potential(TRICLINIC, fractional + np.array([0.0, 0.2, 0.0]), charges, 1, 50, sigma=0.5)
    assert np.allclose(np.roll(base, 10), shifted, atol=1e-10)


def test_three_axes_and_bad_grid():
    profiles = planar_potentials(TRICLINIC, np.array([[0.0, 0.0, 0.0]]), [1.0], (30, 40, 50), sigma=0.5)
    assert [len(profiles[i]) for i in range(3)] == [30, 40, 50]
    with pytest.raises(ValueError, match="n_points"):
        planar_potential(TRICLINIC, np.zeros((1, 3)), [1.0], 0, 1)
