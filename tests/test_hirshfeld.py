"""Hirshfeld partition on a periodic grid, against a direct sum over periodic images."""

from __future__ import annotations

import numpy as np
import pytest

from aiida_emlip import schema
from aiida_emlip.workflows.hirshfeld import CUTOFF, FLOOR, hirshfeld

CELL = np.array([[5.0, 0.0, 0.0], [1.2, 4.6, 0.0], [-0.8, 0.7, 5.5]])


def _free_atom(width: float) -> tuple[np.ndarray, np.ndarray]:
    r = np.linspace(0.0, 15.0, 3000)  # bohr
    return r, np.exp(-((r / width) ** 2))


def _image_sum(density, positions, symbols, free, z_valence, n_electrons, cell=CELL, reach=3):
    """The partition written as the definition reads: every image of every atom, every grid point; a
    point without promolecular density goes to the nearest image of any atom."""
    CELL = cell  # the module's cell unless another is given
    bohr = schema.BOHR_IN_A
    shape = density.shape
    frac = np.stack(np.meshgrid(*[np.arange(n) / n for n in shape], indexing="ij"), -1).reshape(-1, 3)
    points = frac @ CELL
    rho = density.reshape(-1)
    dv = abs(np.linalg.det(CELL)) / rho.size / bohr**3
    rho = rho * n_electrons / (rho.sum() * dv)
    images = range(-reach, reach + 1)  # enough images for every atom within CUTOFF of every point
    shifts = np.array([[i, j, k] for i in images for j in images for k in images]) @ CELL
    weights = np.zeros((len(symbols), rho.size))
    moments = np.zeros((len(symbols), rho.size, 3))
    for a, (symbol, position) in enumerate(zip(symbols, positions)):
        r, values = free[symbol]
        for shift in shifts:
            delta = points - position - shift
            dist = np.linalg.norm(delta, axis=1)
            value = np.where(dist < CUTOFF, np.interp(dist / bohr, r, values, right=0.0), 0.0)
            weights[a] += value
            moments[a] += value[:, None] * delta
    total = weights.sum(0)
    share = np.where(total > FLOOR, weights / np.where(total > FLOOR, total, 1.0), 0.0)
    charges = np.array([z_valence[s] for s in symbols]) - share @ rho * dv
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_delta = np.where(weights[:, :, None] > 0, moments / weights[:, :, None], 0.0)
    dipoles = np.array([-((share[a] * rho) @ mean_delta[a]) * dv for a in range(len(symbols))])
    for point in np.nonzero(total <= FLOOR)[0]:
        offsets = [points[point] - position - shift for position in positions for shift in shifts]
        best = int(np.argmin([np.linalg.norm(o) for o in offsets]))
        atom = best // len(shifts)
        charges[atom] -= rho[point] * dv
        dipoles[atom] -= rho[point] * dv * offsets[best]
    return charges, dipoles


def test_local_boxes_equal_the_image_sum():
    rng = np.random.default_rng(1)
    positions = rng.random((3, 3)) @ CELL
    symbols = ["O", "H", "H"]
    free = {"O": _free_atom(1.6), "H": _free_atom(1.1)}
    z_valence = {"O": 6.0, "H": 1.0}
    density = rng.random((18, 20, 22)) + 0.1
    fast = hirshfeld(density, CELL, positions, symbols, free, z_valence, 8.0)
    slow = _image_sum(density, positions, symbols, free, z_valence, 8.0)
    assert fast[0].sum() == pytest.approx(0.0, abs=1e-9)  # Σq = Z_total − N = 8 − 8
    assert np.allclose(fast[0], slow[0], atol=1e-10)
    assert np.allclose(fast[1], slow[1], atol=1e-10)
    assert np.abs(fast[1]).max() > 1e-3  # a random density: the dipoles are not zero


def test_density_far_from_every_atom_goes_to_the_nearest_atom():
    """An electron spread far from the atoms (beyond the free-atom cutoff, as an anion's diffuse tail or a
    charged cell's delocalised state) is not lost: Σq equals the total charge, and the nearest atom
    takes it, with its dipole."""
    cell = np.diag([16.0, 9.0, 9.0])
    positions = np.array([[1.0, 4.37, 4.41], [2.2, 4.37, 4.41]])  # no grid point half a cell away
    symbols, free = ["F", "H"], {"F": _free_atom(1.4), "H": _free_atom(1.1)}
    z_valence = {"F": 7.0, "H": 1.0}
    shape = (32, 18, 18)
    frac = np.stack(np.meshgrid(*[np.arange(n) / n for n in shape], indexing="ij"), -1)
    points = frac @ cell
    near = sum(np.exp(-np.sum((points - p) ** 2, axis=-1) / 0.8) for p in positions)
    blob = np.exp(-np.sum((points - [9.0, 4.5, 4.5]) ** 2, axis=-1) / 1.5)  # 6.8 Å from H, 8 from F
    bohr = schema.BOHR_IN_A
    dv = np.prod(np.diag(cell)) / np.prod(shape) / bohr**3
    density = 8.0 * near / (near.sum() * dv) + 1.0 * blob / (blob.sum() * dv)  # 9 electrons: Q = −1
    charges, dipoles = hirshfeld(density, cell, positions, symbols, free, z_valence, 9.0)
    assert charges.sum() == pytest.approx(-1.0, abs=1e-9)
    reference = _image_sum(density, positions, symbols, free, z_valence, 9.0, cell=cell, reach=1)
    assert np.allclose(charges, reference[0], atol=1e-9) and np.allclose(dipoles, reference[1], atol=1e-8)
    # the blob is nearer to H (6.8 Å) than to F: H carries most of the extra electron, its dipole
    # points from the blob back to H (−n (r − R_H) along −x)
    assert charges[1] < -0.5 and dipoles[1][0] < -3.0
