"""Atomic charges that carry the atomic dipoles of a partition: for heads that predict charges only.

A Hirshfeld partition splits a molecule's dipole between the atomic charges and the atomic dipoles;
for water the charges alone give 0.18 e·Å of its 0.39 e·Å. A head without atomic dipoles (``qeq``,
``scf``, ``functional``) trained on those charges reproduces half of the molecule's field, and the
energy of an ion beyond the cutoff with it. This module moves each atomic dipole onto charges of the
atom and its bonded neighbours (within ``bond_cutoff``, minimum image): for atom i with dipole p_i it
adds the smallest charges δ (least squares) on {i} ∪ N(i) with Σδ = 0 and Σ δ_k (r_k − r_i) = p_i.
Every charge added sums to zero over one atom's neighbourhood, so the total charge and the charge of
every fragment (set of atoms bonded within ``bond_cutoff``) are unchanged; the dipole components that
the neighbourhood cannot span (an isolated ion's, or out of a planar neighbourhood) are dropped and
returned as ``lost_dipole``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import vesin
from ase import Atoms

#: Distance (Å) below which an atom's neighbours take part of its dipole: bonds, and in a molecule such
#: as water the second neighbours across the bond angle (H–H 1.53 Å), so that a hydrogen's dipole across
#: its bond has charges to go to.
BOND_CUTOFF = 1.6


@dataclass(frozen=True)
class DipoleCharges:
    """The projected charges and what could not be projected."""

    charges: np.ndarray  # [n] e
    lost_dipole: np.ndarray  # [n, 3] e·Å, the part of each atomic dipole no neighbourhood charge carries


def dipole_preserving_charges(
    atoms: Atoms, charges: np.ndarray, dipoles: np.ndarray, bond_cutoff: float = BOND_CUTOFF
) -> DipoleCharges:
    """Charges whose monopoles carry ``dipoles`` as far as each atom's bonded neighbourhood allows."""
    charges = np.asarray(charges, dtype=np.float64).reshape(-1)
    dipoles = np.asarray(dipoles, dtype=np.float64).reshape(-1, 3)
    n = len(atoms)
    if charges.shape != (n,) or dipoles.shape != (n, 3):
        raise ValueError(f"need {n} charges and {n}x3 dipoles, got {charges.shape} and {dipoles.shape}")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    i, j, d = vesin.NeighborList(cutoff=bond_cutoff, full_list=True).compute(
        np.asarray(atoms.positions, dtype=np.float64), cell, pbc.tolist(), quantities="ijD"
    )
    out = charges.copy()
    lost = np.zeros((n, 3))
    for atom in range(n):
        mask = i == atom
        members = np.concatenate([[atom], j[mask]]).astype(np.int64)
        offsets = np.concatenate([np.zeros((1, 3)), d[mask]])  # r_k − r_i, minimum image
        # rows: Σδ = 0, then the three dipole components
        matrix = np.vstack([np.ones(len(members)), offsets.T])
        target = np.concatenate([[0.0], dipoles[atom]])
        delta = np.linalg.pinv(matrix) @ target
        np.add.at(out, members, delta)
        lost[atom] = dipoles[atom] - offsets.T @ delta
    return DipoleCharges(charges=out, lost_dipole=lost)
