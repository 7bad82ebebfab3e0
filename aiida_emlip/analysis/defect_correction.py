r"""Freysoldt finite-size correction of charged vacancies, the same scheme for DFT and every model.

pymatgen-analysis-defects computes the correction from planar-averaged potentials along the three
cell vectors: ``E_corr(q) = E_lat(q) + q C`` with the lattice term ``E_lat = E_iso − E_per`` of a
model defect charge (a Gaussian, ``QModel``, screened by ε) and the alignment
``C = ⟨V_defect − V_host − V_model-charge⟩`` sampled midway between the defect and its images
(potentials as the electron's potential energy, eV, like pw.x's ``V_bare + V_H``). Every method gets
the same lattice term (it depends only on the cell, q, ε and the model charge) and its own
alignment:

* DFT: pp.x's ``V_bare + V_H`` of the vacancy and pristine cells (same geometry, same FFT grid);
* a model with charges: the periodic potential of its own Gaussian charges and dipoles
  (:mod:`aiida_emlip.analysis.periodic_potential`, zero mean like its k = 0-excluded energy), on
  DFT's grid;
* a model without charges (``sr``): a flat potential, ΔV = 0, so C is the model charge's own
  potential there.

Without DFT potentials the first-order point-charge (Makov–Payne) term of
:func:`aiida_emlip.analysis.defects.point_charge_correction` serves every method instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ase import Atoms

from aiida_emlip import schema

from .periodic_potential import planar_potentials

#: Width (bohr) of pymatgen's Gaussian model charge ``exp(−r²/β²)`` (its default).
MODEL_CHARGE_BETA = 1.0
#: Plane-wave cutoff (eV) of the lattice sums (pymatgen's default).
ENERGY_CUTOFF = 520.0
SCHEME = "Freysoldt (pymatgen-analysis-defects), alignment from each method's own potential"


def freysoldt(
    cell: np.ndarray,
    charge: float,
    dielectric: float,
    defect_profiles: Mapping[int, Sequence[float]],
    host_profiles: Mapping[int, Sequence[float]],
    defect_fractional: Sequence[float],
    beta: float = MODEL_CHARGE_BETA,
    energy_cutoff: float = ENERGY_CUTOFF,
) -> dict[str, Any]:
    """Freysoldt correction (eV) of one charge state: ``total``, ``lattice``, ``alignment``, ``shifts``.

    ``defect_profiles`` / ``host_profiles`` map axis 0, 1, 2 to planar averages (eV) on the same grid.
    """
    if charge == 0:
        return {"total": 0.0, "lattice": 0.0, "alignment": 0.0, "shifts": [0.0, 0.0, 0.0]}
    from pymatgen.analysis.defects.corrections.freysoldt import get_freysoldt_correction
    from pymatgen.analysis.defects.utils import QModel
    from pymatgen.core import Lattice

    for axis in range(3):
        if len(defect_profiles[axis]) != len(host_profiles[axis]):
            raise ValueError(
                f"axis {axis}: defect and host potentials are on different grids "
                f"({len(defect_profiles[axis])} and {len(host_profiles[axis])} points)"
            )
    logging.getLogger("pymatgen.analysis.defects.corrections.freysoldt").setLevel(logging.WARNING)
    result = get_freysoldt_correction(
        q=round(charge),
        dielectric=float(dielectric),
        defect_locpot={i: np.asarray(defect_profiles[i], dtype=float) for i in range(3)},
        bulk_locpot={i: np.asarray(host_profiles[i], dtype=float) for i in range(3)},
        defect_frac_coords=np.asarray(defect_fractional, dtype=float),
        lattice=Lattice(np.asarray(cell, dtype=float)),
        energy_cutoff=energy_cutoff,
        q_model=QModel(beta=beta),
    )
    meta = result.metadata
    return {
        "total": float(result.correction_energy),
        "lattice": float(meta["electrostatic"]),
        "alignment": float(meta["potential"]),
        "shifts": [float(meta["alignments"][i]) for i in range(3)],
    }


def model_potentials(atoms: Atoms, sigma: float, grid: Sequence[int]) -> dict[int, np.ndarray] | None:
    """A model's planar-averaged potentials (eV) from its predicted charges and dipoles; None without."""
    charges = atoms.arrays.get(schema.CHARGES)
    if charges is None:
        return None
    dipoles = atoms.arrays.get(schema.ATOMIC_DIPOLES)
    return planar_potentials(
        atoms.cell[:],
        atoms.get_scaled_positions(wrap=True),
        np.asarray(charges, dtype=float),
        grid,
        sigma=sigma,
        dipoles=None if dipoles is None else np.asarray(dipoles, dtype=float),
    )


def flat_potentials(grid: Sequence[int]) -> dict[int, np.ndarray]:
    """ΔV = 0 along every axis (a model without charges)."""
    return {axis: np.zeros(int(grid[axis])) for axis in range(3)}


def state_corrections(
    cell: np.ndarray,
    charges: Sequence[float],
    dielectric: float,
    defect_fractional: Sequence[float],
    host_potentials: Mapping[int, Sequence[float]],
    defect_potentials: Mapping[float, Mapping[int, Sequence[float]]],
) -> dict[float, dict[str, Any]]:
    """:func:`freysoldt` for every charge state of one method (states without a potential are left out)."""
    out = {}
    for q in charges:
        if q != 0 and q not in defect_potentials:
            continue
        out[q] = freysoldt(
            cell, q, dielectric, defect_potentials.get(q, host_potentials), host_potentials, defect_fractional
        )
    return out
