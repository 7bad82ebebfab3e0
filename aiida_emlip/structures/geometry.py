"""Geometry checks shared by the samplers and the dataset workchain (no AiiDA import)."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.neighborlist import neighbor_list

#: Default smallest empty gap (Å) along a cell axis that counts as vacuum.
VACUUM_GAP = 4.0


def min_interatomic_distance(atoms: Atoms, cutoff: float | None = None) -> float:
    """Return the smallest distance between two atoms (minimum image where periodic), ``inf`` for one atom.

    With ``cutoff`` (Å) only pairs closer than it are searched, through a neighbour list (linear cost,
    for large structures; an atom's own periodic images count too): ``inf`` when there is none.
    """
    if cutoff is not None:
        distances = neighbor_list("d", atoms, cutoff)
        return float(distances.min()) if len(distances) else float("inf")
    if len(atoms) < 2:
        return float("inf")
    distances = atoms.get_all_distances(mic=bool(np.any(atoms.pbc)))
    np.fill_diagonal(distances, np.inf)
    return float(distances.min())


def cell_volume(atoms: Atoms) -> float:
    """Return the absolute cell volume in Å^3 (0 for a degenerate or missing cell)."""
    return float(abs(np.linalg.det(np.asarray(atoms.cell[:], dtype=float))))


def vacuum_gaps(atoms: Atoms) -> np.ndarray:
    """Return, per cell axis, the widest empty gap (Å) measured along the normal of the opposite cell face."""
    cell = np.asarray(atoms.cell[:], dtype=float)
    scaled = atoms.get_scaled_positions(wrap=True)
    gaps = np.zeros(3)
    recip = np.linalg.inv(cell).T  # rows: reciprocal vectors / 2π
    for axis in range(3):
        height = 1.0 / np.linalg.norm(recip[axis])  # spacing of lattice planes along this axis
        frac = np.sort(scaled[:, axis])
        if len(frac) == 0:
            gaps[axis] = height
            continue
        steps = np.diff(np.concatenate([frac, [frac[0] + 1.0]]))
        gaps[axis] = float(steps.max() * height)
    return gaps


def unit_normal(atoms: Atoms, axis: int) -> np.ndarray:
    """Unit normal of the lattice planes spanned by the two cell vectors other than ``axis``."""
    normal = np.linalg.inv(np.asarray(atoms.cell[:], dtype=float)).T[axis]
    return normal / np.linalg.norm(normal)


def vacuum_axes(atoms: Atoms, gap: float = VACUUM_GAP) -> list[int]:
    """Return the cell axes along which the structure has an empty gap of at least ``gap`` Å."""
    return [int(axis) for axis in np.flatnonzero(vacuum_gaps(atoms) >= gap)]


def slab_axis(atoms: Atoms, gap: float = VACUUM_GAP) -> int | None:
    """Return the vacuum axis of a slab (vacuum along exactly one axis), else None."""
    axes = vacuum_axes(atoms, gap)
    return axes[0] if len(axes) == 1 else None


def vacuum_center(atoms: Atoms, axis: int) -> float:
    """Return the fractional coordinate along ``axis`` of the middle of the widest empty gap."""
    frac = np.sort(atoms.get_scaled_positions(wrap=True)[:, axis])
    ext = np.concatenate([frac, [frac[0] + 1.0]])
    steps = np.diff(ext)
    i = int(np.argmax(steps))
    return float((ext[i] + steps[i] / 2.0) % 1.0)
