"""Tiny test systems for the dataset workchain tests (ASE only)."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import molecule

from aiida_emlip.structures import metal_water_interface

#: Cheap settings for real pw.x in tests: low cutoffs, loose SCF, one restart at most.
CHEAP = {
    "ecutwfc": 25.0,
    "ecutrho": 100.0,
    "conv_thr_per_atom": 1.0e-7,
    "kpoints_distance": 1.0,
    "max_iterations": 1,
    "options": {"max_wallclock_seconds": 600},
}


def in_box(atoms: Atoms, box: float = 6.0) -> Atoms:
    """Centre ``atoms`` in a cubic periodic box of edge ``box`` Å."""
    atoms = atoms.copy()
    atoms.cell = [box, box, box]
    atoms.center()
    atoms.pbc = True
    return atoms


def water() -> Atoms:
    return in_box(molecule("H2O"))


def hydroxide() -> Atoms:
    return in_box(molecule("OH"))


def hydronium() -> Atoms:
    angle = np.radians(112.0)
    r = 0.98
    h = r * np.cos(np.arcsin(np.sin(angle / 2) * 2 / np.sqrt(3)))
    rho = np.sqrt(r**2 - h**2)
    positions = [[0, 0, 0]] + [
        [rho * np.cos(p), rho * np.sin(p), -h] for p in (0, 2 * np.pi / 3, 4 * np.pi / 3)
    ]
    return in_box(Atoms("OH3", positions=positions))


def nacl() -> Atoms:
    return in_box(Atoms("NaCl", positions=[[0, 0, 0], [2.36, 0, 0]]), box=7.0)


def al_slab_water() -> Atoms:
    return metal_water_interface("Al", "100", size=(2, 2, 2), n_water=1, vacuum=6.0, gap=2.2, seed=2)
