"""pp.x's electrostatic potential (plot_num 11) planar-averaged: slab vacuum levels, per-axis profiles.

pp.x writes V_bare + V_H (including the sawtooth/dipole correction) on the FFT grid as a cube file;
the planar average over the two in-plane axes (what average.x computes, without macroscopic
smoothing) gives the profile V(s) along ``edir``. The vacuum levels are the plateaus just below the
sawtooth's turning region (``+edir`` side, above the slab) and just above it (``−edir`` side).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from aiida import orm
from aiida.engine import calcfunction

from aiida_emlip import schema

#: pp.x input for the electrostatic potential as a 3D cube file.
PP_PARAMETERS = {"INPUTPP": {"plot_num": 11}, "PLOT": {"iflag": 3}}
#: Width (fraction of the cell) of the window that samples each vacuum plateau.
WINDOW = 0.04


def planar_average(data: np.ndarray, axis: int) -> np.ndarray:
    """Average a 3D grid over the two axes other than ``axis``."""
    others = tuple(i for i in range(3) if i != axis)
    return np.asarray(data, dtype=float).mean(axis=others)


def vacuum_levels(
    profile: np.ndarray, emaxpos: float, eopreg: float, window: float = WINDOW
) -> tuple[float, float]:
    """Return (plateau on the +edir side, plateau on the −edir side) of a planar-averaged profile.

    The +edir plateau is sampled in ``[emaxpos − window, emaxpos)``, the −edir plateau in
    ``[emaxpos + eopreg, emaxpos + eopreg + window)`` (fractional coordinates, periodic).
    """
    n = len(profile)
    grid = np.arange(n) / n

    def mean_in(start: float, stop: float) -> float:
        rel = (grid - start) % 1.0
        mask = rel < (stop - start)
        return float(profile[mask].mean())

    top = mean_in(emaxpos - window, emaxpos)
    bottom = mean_in(emaxpos + eopreg, emaxpos + eopreg + window)
    return top, bottom


@calcfunction
def vacuum_level(potential: orm.ArrayData, settings: orm.Dict) -> orm.Dict:
    """Return the vacuum levels (eV) of a slab from pp.x's potential cube and the pw.x sawtooth settings.

    ``settings`` holds ``edir`` (0-based), ``emaxpos`` and ``eopreg``. The cube is in Ry. The result
    also holds the planar-averaged ``profile`` (eV, the electron's potential energy on the grid
    s_j = j/n along ``edir``) and the sawtooth settings, for comparisons with a model's profile.
    """
    s = settings.get_dict()
    profile = planar_average(potential.get_array("data"), int(s["edir"])) * schema.RYDBERG_IN_EV
    top, bottom = vacuum_levels(profile, float(s["emaxpos"]), float(s["eopreg"]))
    result: dict[str, Any] = {
        "vacuum_level_top": top,
        "vacuum_level_bottom": bottom,
        "units": "eV",
        "profile_min": float(profile.min()),
        "profile_max": float(profile.max()),
        "n_points": len(profile),
        "profile": [float(v) for v in profile],
        "edir": int(s["edir"]),
        "emaxpos": float(s["emaxpos"]),
        "eopreg": float(s["eopreg"]),
    }
    return orm.Dict(result)


@calcfunction
def planar_potentials(potential: orm.ArrayData) -> orm.Dict:
    """pp.x's potential (Ry) averaged over the lattice planes of each cell vector, in eV.

    ``axes`` maps "0", "1", "2" to the profile along that cell vector on the FFT grid s_j = j/n
    (the electron's potential energy, like pw.x's V_bare + V_H): the input of Freysoldt's alignment.
    """
    data = potential.get_array("data")
    axes = {str(axis): (planar_average(data, axis) * schema.RYDBERG_IN_EV).tolist() for axis in range(3)}
    return orm.Dict({"axes": axes, "grid": list(data.shape), "units": "eV"})
