r"""The metal–water interface's numbers (pure NumPy, no AiiDA), for DFT and every model alike.

Units: e, Å, V, eV. Each state of one interface geometry (neutral; field E along the normal; electrode
charge Q with a uniform background) gives, per method:

* the **electrolyte charge** q_el: Σ of the charges of every non-metal atom (DFT: Hirshfeld), i.e.
  the charge transferred from the metal to the water (and ions);
* the **dipole** along the normal d (DFT: pw.x's dipole-corrected dipole); the **induced dipole per
  field** α = ∂d/∂E over the neutral and field states;
* the planar-averaged **potential profile** V(z) (electron potential energy, eV; DFT: pp.x's
  V_bare + V_H, the model: its Gaussian charges and dipoles, :mod:`.planar_potential`), and the
  **induced profile** δV = V_state − V_neutral, which cancels the pseudopotential wells that the
  model's Gaussian density has no counterpart of; the two are compared away from pw.x's sawtooth;
* the **potential drop** Δφ = φ̄_metal − φ̄_electrolyte of the electrostatic potential φ = −V averaged
  over each region, relative to the neutral state; the **interfacial capacitance** C = ∂Q/∂Δφ
  (e/V, μF/cm²) over the neutral and charged states, with the background convention of pw.x in both;
* the Fermi level μ against Q for the methods that give it (∂μ/∂Q, as in the charging probe);
* the energy relative to the neutral state, whose error against DFT (with the forces' RMSE) measures
  each model on configurations it never saw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from aiida_emlip import schema
from aiida_emlip.structures.geometry import unit_normal

from . import verdicts
from .planar_potential import region_mean, window_mask
from .response import (
    E_PER_V_A2_IN_UF_PER_CM2,
    charging_curve,
    dipole_along,
    frame_charges,
    interior_field_fraction,
    linear_fit,
)
from .response import usable as converged

#: Interface columns of the design verdict table.
COLUMNS = ("interface_field", "interface_capacitance", "charge_transfer", "interface_mu")
#: Default tolerances (also the protocol's ``tolerances``).
DEFAULT_TOLERANCES = {
    "field_ratio": 0.25,  # |α_model/α_DFT − 1|
    "capacitance_ratio": 0.25,  # |(dΔφ/dQ)_model/(dΔφ/dQ)_DFT − 1|
    "charge_transfer": 0.05,  # e, MAE of the electrolyte charge over the states
    "charging_ratio": 0.25,  # |dμ/dQ ratio − 1|
}


def electrolyte_charge(charges: Sequence[float], metal: Sequence[int]) -> float:
    """Σ of the charges of every atom that is not in ``metal`` (indices)."""
    q = np.asarray(charges, dtype=float)
    mask = np.ones(len(q), dtype=bool)
    mask[list(metal)] = False
    return float(q[mask].sum())


def potential_drop(profile: Sequence[float], fractional: Sequence[float], metal: Sequence[int]) -> float:
    """Δφ = φ̄_metal − φ̄_electrolyte (V) of a profile V = −φ (eV) on the grid s_j = j/n."""
    f = np.asarray(fractional, dtype=float) % 1.0
    mask = np.zeros(len(f), dtype=bool)
    mask[list(metal)] = True
    return -(region_mean(np.asarray(profile), f[mask]) - region_mean(np.asarray(profile), f[~mask]))


def profile_rmse(
    profile: Sequence[float], reference: Sequence[float], exclude: tuple[float, float] | None = None
) -> float:
    """RMS difference (eV) of two profiles on one grid after removing their means, outside ``exclude``."""
    a, b = np.asarray(profile, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"profiles on different grids: {a.shape} and {b.shape}")
    keep = ~window_mask(len(a), *exclude) if exclude else np.ones(len(a), dtype=bool)
    diff = (a - b)[keep]
    return float(np.sqrt(np.mean((diff - diff.mean()) ** 2)))


def capacitance(points: Sequence[tuple[float, float]], area: float) -> dict[str, float]:
    """C = ∂Q/∂Δφ (e/V and μF/cm² of the face ``area``) from (Q, Δφ) pairs."""
    charges, drops = zip(*points)
    slope, drop0 = linear_fit(charges, drops)
    value = 1.0 / slope if slope != 0 else math.inf
    return {
        "ddrop_dq": slope,
        "drop_neutral": drop0,
        "capacitance": value,
        "capacitance_uf_cm2": value / area * E_PER_V_A2_IN_UF_PER_CM2,
        "n_points": len(points),
    }


def state_numbers(
    meta: Mapping[str, Any], atoms, profile: Sequence[float] | None, neutral_profile: Sequence[float] | None
) -> dict[str, Any]:
    """One method's numbers of one state (missing quantities are left out)."""
    row: dict[str, Any] = {"state": meta["state"], "value": float(meta["value"])}
    q = frame_charges(atoms)
    if q is not None:
        row["electrolyte_charge"] = electrolyte_charge(q, meta["metal"])
    d = dipole_along(atoms, unit_normal(atoms, int(meta["axis"])))
    if d is not None:
        row["dipole"] = d
    for key in (schema.ENERGY, schema.FERMI_LEVEL):
        if atoms.info.get(key) is not None:
            row[key] = float(atoms.info[key])
    if profile is not None and neutral_profile is not None:
        fractional = atoms.get_scaled_positions(wrap=True)[:, int(meta["axis"])]
        induced = np.asarray(profile, dtype=float) - np.asarray(neutral_profile, dtype=float)
        row["drop"] = potential_drop(induced, fractional, meta["metal"])
        row["induced_profile"] = induced.tolist()
    return row


def metal_interior_field(setup: Mapping[str, Mapping[str, Any]], frames: Mapping[str, Any]) -> float | None:
    """E_in/E midway through the metal from the antisymmetric induced charges of ±E pairs (sheets).

    0 for a metal that screens perfectly, 1 for none; None without charges or opposite field pairs.
    """
    fractions = []
    for key, meta in setup.items():
        if meta["state"] != "field" or meta["value"] <= 0:
            continue
        partner = next(
            (k for k, m in setup.items() if m["state"] == "field" and m["value"] == -meta["value"]), None
        )
        plus, minus = frames.get(key), frames.get(partner)
        if plus is None or minus is None or frame_charges(plus) is None or frame_charges(minus) is None:
            continue
        heights = plus.positions @ unit_normal(plus, int(meta["axis"]))
        metal = heights[list(meta["metal"])]
        plane = 0.5 * (metal.min() + metal.max())
        delta = 0.5 * (frame_charges(plus) - frame_charges(minus))
        fractions.append(
            interior_field_fraction(heights, delta, float(meta["area"]), float(meta["value"]), plane)
        )
    return float(np.mean(fractions)) if fractions else None


def analyse_method(
    setup: Mapping[str, Mapping[str, Any]],
    frames: Mapping[str, Any],
    profiles: Mapping[str, Sequence[float]] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Every state's numbers and the fitted responses of one method; returns (summary, notes)."""
    notes: list[str] = []
    profiles = profiles or {}
    neutral = profiles.get("neutral")
    states: dict[str, dict[str, Any]] = {}
    for key, meta in setup.items():
        atoms = frames.get(key)
        if atoms is None or not converged(atoms):
            notes.append(f"{key}: {'missing' if atoms is None else 'SCF not converged'}")
            continue
        states[key] = state_numbers(meta, atoms, profiles.get(key), neutral)
    summary: dict[str, Any] = {"states": states}
    area = float(next(iter(setup.values()))["area"]) if setup else 1.0
    field_points = [
        (row["value"], row["dipole"])
        for row in states.values()
        if row["state"] in ("neutral", "field") and "dipole" in row
    ]
    if len({e for e, _ in field_points}) >= 2:
        alpha, d0 = linear_fit(*zip(*field_points))
        summary["field"] = {"alpha": alpha, "dipole_zero_field": d0, "points": sorted(field_points)}
        fraction = metal_interior_field(setup, frames)
        if fraction is not None:
            summary["field"]["interior_field_fraction"] = fraction
    charge_points = [
        (row["value"] if row["state"] == "charge" else 0.0, row["drop"])
        for row in states.values()
        if row["state"] in ("neutral", "charge") and "drop" in row
    ]
    if len({q for q, _ in charge_points}) >= 2:
        summary["capacitance"] = {**capacitance(charge_points, area), "points": sorted(charge_points)}
    mu_points = [
        (row["value"] if row["state"] == "charge" else 0.0, row[schema.FERMI_LEVEL])
        for row in states.values()
        if row["state"] in ("neutral", "charge") and schema.FERMI_LEVEL in row
    ]
    if len({q for q, _ in mu_points}) >= 2:
        summary["charging"] = {**charging_curve(mu_points, area), "points": sorted(mu_points)}
    transfer = {k: row["electrolyte_charge"] for k, row in states.items() if "electrolyte_charge" in row}
    if transfer:
        summary["charge_transfer"] = transfer
    return summary, notes


def compare_with_dft(
    summary: Mapping[str, Any],
    dft: Mapping[str, Any],
    n_atoms: int,
    frames: Mapping[str, Any],
    dft_frames: Mapping[str, Any],
    sawtooth: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """A model's errors against DFT on the common states: energies, forces, charges, induced profiles."""
    common = sorted(set(summary["states"]) & set(dft["states"]))
    errors: dict[str, Any] = {"n_states": len(common)}
    energy = {
        k: (summary["states"][k][schema.ENERGY], dft["states"][k][schema.ENERGY])
        for k in common
        if schema.ENERGY in summary["states"][k] and schema.ENERGY in dft["states"][k]
    }
    if energy:
        diff = np.array([m - r for m, r in energy.values()]) / n_atoms
        errors["energy_mae_per_atom"] = float(np.abs(diff).mean())
        if "neutral" in energy and len(energy) > 1:
            m0, r0 = energy["neutral"]
            rel = [(m - m0) - (r - r0) for k, (m, r) in energy.items() if k != "neutral"]
            errors["relative_energy_mae"] = float(np.abs(rel).mean())
    forces = [
        np.asarray(frames[k].arrays["forces"]) - np.asarray(dft_frames[k].arrays["forces"])
        for k in common
        if k in frames
        and k in dft_frames
        and "forces" in frames[k].arrays
        and "forces" in dft_frames[k].arrays
    ]
    if forces:
        errors["force_rmse"] = float(np.sqrt(np.mean(np.concatenate(forces) ** 2)))
    transfer = [
        (summary["charge_transfer"][k], dft["charge_transfer"][k])
        for k in common
        if k in summary.get("charge_transfer", {}) and k in dft.get("charge_transfer", {})
    ]
    if transfer:
        errors["charge_transfer_mae"] = float(np.mean([abs(m - r) for m, r in transfer]))
        errors["charge_transfer_pairs"] = transfer
    rmse = [
        profile_rmse(summary["states"][k]["induced_profile"], dft["states"][k]["induced_profile"], sawtooth)
        for k in common
        if k != "neutral"
        and "induced_profile" in summary["states"][k]
        and "induced_profile" in dft["states"][k]
    ]
    if rmse:
        errors["induced_profile_rmse"] = float(np.mean(rmse))
    return errors


# ----------------------------------------------------------------------------- verdicts


def _transfer_verdict(model: Mapping[str, Any], dft: Mapping[str, Any], errors, tol) -> dict[str, Any]:
    mae = errors.get("charge_transfer_mae")
    if mae is None:
        return {
            "value": None,
            "unit": "",
            "verdict": verdicts.SKIPPED,
            "reason": "no charges or no DFT charges",
        }
    if mae <= tol["charge_transfer"]:
        return {"value": mae, "unit": "e MAE", "verdict": verdicts.MATCH}
    pairs = errors["charge_transfer_pairs"]
    more = np.mean([abs(m) for m, _ in pairs]) > np.mean([abs(r) for _, r in pairs])
    return {"value": mae, "unit": "e MAE", "verdict": verdicts.METAL if more else verdicts.INSULATOR}


def verdict_row(
    model: Mapping[str, Any],
    dft: Mapping[str, Any] | None,
    errors: Mapping[str, Any],
    tol: Mapping[str, float],
) -> dict[str, dict[str, Any]]:
    """The interface cells of one model: α, dΔφ/dQ and dμ/dQ as ratios to DFT, charge transfer as MAE."""
    dft = dft or {}
    row: dict[str, dict[str, Any]] = {}
    pairs = (
        (
            "interface_field",
            "field",
            "alpha",
            "α/α_DFT",
            verdicts.METAL,
            verdicts.INSULATOR,
            tol["field_ratio"],
        ),
        # the elastance dΔφ/dQ rather than C: a conductor-like model has Δφ ≈ 0 (C → ±∞); too little
        # drop (over-screening water) is metal-like, too much insulator-like
        (
            "interface_capacitance",
            "capacitance",
            "ddrop_dq",
            "dΔφ/dQ ÷ DFT",
            verdicts.INSULATOR,
            verdicts.METAL,
            tol["capacitance_ratio"],
        ),
    )
    for column, group, key, unit, high, low, tolerance in pairs:
        mine, ref = model.get(group), dft.get(group)
        if not mine:
            row[column] = {"value": None, "unit": "", "verdict": verdicts.SKIPPED, "reason": f"no {group}"}
            continue
        verdict, ratio = verdicts.ratio_verdict(mine[key], (ref or {}).get(key), tolerance, high, low)
        if ratio is None:
            row[column] = {
                "value": mine[key],
                "unit": "",
                "verdict": verdicts.SKIPPED,
                "reason": "no DFT reference",
            }
        else:
            row[column] = {"value": ratio, "unit": unit, "verdict": verdict, key: mine[key]}
            if group == "capacitance":
                row[column]["capacitance_uf_cm2"] = mine["capacitance_uf_cm2"]
    row["charge_transfer"] = _transfer_verdict(model, dft, errors, tol)
    row["interface_mu"] = verdicts.charging_verdict(model.get("charging"), dft.get("charging"), tol)
    return row


def analyse_interface(
    setup: Mapping[str, Mapping[str, Any]],
    methods: Mapping[str, Mapping[str, Any]],
    profiles: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    tolerances: Mapping[str, float] | None = None,
    sawtooth: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Every method's summary, each model's errors against DFT, and the interface verdict table.

    ``methods`` maps ``dft`` and each model label to its frames by state key; ``profiles`` maps the
    same labels to their potential profiles by key (one grid for all). ``sawtooth`` is the fractional
    window of pw.x's sawtooth, left out of the profile comparison.
    """
    tol = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    summaries, notes = {}, {}
    for label, frames in methods.items():
        summaries[label], notes[label] = analyse_method(setup, frames, (profiles or {}).get(label))
    dft = summaries.get("dft")
    n_atoms = int(next(iter(setup.values()))["n_atoms"]) if setup else 1
    errors, rows = {}, {}
    for label, summary in summaries.items():
        if label == "dft":
            continue
        errors[label] = (
            compare_with_dft(summary, dft, n_atoms, methods[label], methods["dft"], sawtooth) if dft else {}
        )
        rows[label] = verdict_row(summary, dft, errors[label], tol)
    dft_row = {
        "interface_field": {"value": (dft or {}).get("field", {}).get("alpha"), "unit": "e·Å²/V"},
        "interface_capacitance": {
            "value": (dft or {}).get("capacitance", {}).get("capacitance"),
            "unit": "e/V",
        },
        "charge_transfer": {"value": (dft or {}).get("charge_transfer", {}).get("neutral"), "unit": "e"},
        "interface_mu": {"value": (dft or {}).get("charging", {}).get("dmu_dq"), "unit": "V/e"},
    }
    table = {"columns": list(COLUMNS), "rows": rows, "dft": dft_row, "tolerances": tol}
    table["text"] = verdicts.format_table(table)
    comparison = {
        label: {**quantities(summaries[label]), **comparison_row(errors[label], rows[label])}
        for label in rows
    }
    comparison["dft"] = quantities(dft)
    return {
        "methods": summaries,
        "errors": errors,
        "notes": notes,
        "verdicts": table,
        "comparison": comparison,
    }


def quantities(summary: Mapping[str, Any] | None) -> dict[str, float | None]:
    """A method's interface numbers as such (``None`` where it has none): α (e·Å²/V), the interior
    field fraction, dΔφ/dQ (V/e), C (μF/cm²), the electrolyte's charge in the neutral state (e), dμ/dQ
    (V/e). The comparison carries them for DFT and beside each model's ratios."""
    summary = summary or {}
    field = summary.get("field") or {}
    capacitance = summary.get("capacitance") or {}
    return {
        "alpha": field.get("alpha"),
        "interior_field_fraction": field.get("interior_field_fraction"),
        "ddrop_dq": capacitance.get("ddrop_dq"),
        "capacitance_uf_cm2": capacitance.get("capacitance_uf_cm2"),
        "charge_transfer_neutral": (summary.get("charge_transfer") or {}).get("neutral"),
        "dmu_dq": (summary.get("charging") or {}).get("dmu_dq"),
    }


def comparison_row(errors: Mapping[str, Any], row: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One model's line for a study: its errors against DFT and each verdict cell's value and verdict."""
    line = {k: v for k, v in errors.items() if not isinstance(v, (list, dict))}
    for column, cell in row.items():
        line[column] = cell.get("value")
        line[f"{column}_verdict"] = cell.get("verdict")
    return line
