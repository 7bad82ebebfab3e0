"""Charged vacancies at geometries relaxed by each model, judged by DFT single points there (pure).

For a model m and charge state q, R_q is the vacancy cell relaxed by m in state q, R_u the unrelaxed
cell. DFT and the model are compared at identical geometries:

* relaxation energy of the model E_m(R_q) − E_m(R_u), against the DFT energy change along the same
  displacement E_DFT(R_q) − E_DFT(R_u): a model that relaxes towards DFT's minimum lowers the DFT
  energy too (negative); a positive DFT change means the model's relaxed geometry is worse for DFT;
* ΔE(q) = E(R_q, q) − E(R_0, 0) for the model and for DFT at the model's geometries, and its MAE
  over the charged states.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ase import Atoms

from aiida_emlip import schema


def max_displacement(relaxed: Atoms, unrelaxed: Atoms) -> float:
    """Largest displacement (Å, minimum image) of any atom between two cells of the same atoms."""
    delta = relaxed.positions - unrelaxed.positions
    cell = np.asarray(unrelaxed.cell[:], dtype=float)
    frac = delta @ np.linalg.inv(cell)
    frac -= np.round(frac)
    return float(np.linalg.norm(frac @ cell, axis=1).max())


def relaxed_energetics(
    charges: Sequence[int],
    model_relaxed: Mapping[int, Atoms],
    dft_relaxed: Mapping[int, Atoms],
    model_unrelaxed: Mapping[int, Atoms],
    dft_unrelaxed: Mapping[int, Atoms],
) -> dict[str, Any]:
    """Per charge state the relaxation numbers and, over the states, the errors; energies in eV.

    Each mapping goes from q to the frame (with ``energy`` in ``info``) of that state; a state missing
    from any of them is left out and listed under ``missing``.
    """
    states: dict[str, dict[str, float]] = {}
    missing = []
    for q in charges:
        frames = (model_relaxed.get(q), dft_relaxed.get(q), model_unrelaxed.get(q), dft_unrelaxed.get(q))
        if any(f is None or f.info.get(schema.ENERGY) is None for f in frames):
            missing.append(int(q))
            continue
        m_r, d_r, m_u, d_u = (float(f.info[schema.ENERGY]) for f in frames)
        states[str(int(q))] = {
            "model_energy": m_r,
            "dft_energy": d_r,
            "model_relaxation_energy": m_r - m_u,
            "dft_energy_change": d_r - d_u,
            "max_displacement": max_displacement(frames[0], frames[2]),
            "relax_converged": bool(frames[0].info.get("relax_converged", True)),
        }
    result: dict[str, Any] = {"states": states, "missing": missing}
    if states:
        result["relaxation_energy_mae"] = float(
            np.mean([abs(s["model_relaxation_energy"] - s["dft_energy_change"]) for s in states.values()])
        )
        result["dft_lowered"] = all(s["dft_energy_change"] <= 0 for s in states.values())
    if "0" in states:
        zero = states["0"]
        deltas = {}
        for q, s in states.items():
            if q == "0":
                continue
            model = s["model_energy"] - zero["model_energy"]
            dft = s["dft_energy"] - zero["dft_energy"]
            deltas[q] = {"model": model, "dft": dft, "error": model - dft}
        result["delta_e"] = deltas
        if deltas:
            result["delta_e_mae"] = float(np.mean([abs(d["error"]) for d in deltas.values()]))
    return result
