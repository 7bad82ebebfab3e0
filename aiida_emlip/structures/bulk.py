"""Bulk samplers: random rattles and strains of a periodic cell."""

from __future__ import annotations

import numpy as np
from ase import Atoms

from .records import tag


def rattle(atoms: Atoms, n: int, stdev: float = 0.05, seed: int = 0) -> list[Atoms]:
    """Return ``n`` copies of ``atoms`` with Gaussian displacements of standard deviation ``stdev`` Å."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        frame = atoms.copy()
        frame.positions = frame.positions + rng.normal(0.0, stdev, size=frame.positions.shape)
        frames.append(tag(frame, "rattle", seed, index=i, params={"stdev": stdev}))
    return frames


def strain(atoms: Atoms, n: int, max_strain: float = 0.03, stdev: float = 0.0, seed: int = 0) -> list[Atoms]:
    """Return ``n`` copies of ``atoms`` under random symmetric strains (components in ±``max_strain``).

    Atoms move with the cell (scaled positions kept); ``stdev`` adds a rattle on top.
    """
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        eps = rng.uniform(-max_strain, max_strain, size=(3, 3))
        eps = 0.5 * (eps + eps.T)
        frame = atoms.copy()
        frame.set_cell(np.asarray(atoms.cell[:]) @ (np.eye(3) + eps), scale_atoms=True)
        if stdev > 0:
            frame.positions = frame.positions + rng.normal(0.0, stdev, size=frame.positions.shape)
        frames.append(tag(frame, "strain", seed, index=i, params={"max_strain": max_strain, "stdev": stdev}))
    return frames
