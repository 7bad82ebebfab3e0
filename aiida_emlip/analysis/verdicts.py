"""The design verdict table: where each model sits on the conductor–insulator picture (pure, no AiiDA).

Every probe gives each method one number; a model's verdict on a probe is

* ``matches DFT`` when its number is within the stated tolerance of DFT's;
* otherwise ``metal-like`` or ``insulator-like`` by the side on which it misses DFT:

  - field (metal, water): α_model/α_DFT; above 1 + tol over-screens (metal-like), below 1 − tol
    under-screens (insulator-like);
  - charging: (dμ/dQ)_model/(dμ/dQ)_DFT; below 1 − tol too soft (metal-like), above 1 + tol stiff,
    gap-like (insulator-like);
  - dissociation: the fragment charge at the largest R; a fractional part ≥ tol_frac is metal-like,
    an integer charge off DFT insulator-like;
  - polarizability: the growth exponent b of α ∝ N^b; b > b_DFT + tol_b (superlinear) is metal-like,
    b below or α ≈ 0 insulator-like.

Without DFT numbers the same rules are applied against the physical limits (a metal slab: s ≥ 0.5 is
metal-like; water: b ≤ 1 + tol_b insulator-like, above metal-like) and the verdict says so.
A probe the model cannot answer (no μ, no charges) is ``skipped`` with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

METAL = "metal-like"
INSULATOR = "insulator-like"
MATCH = "matches DFT"
SKIPPED = "skipped"

#: Default tolerances (also the protocol's ``tolerances``).
DEFAULT_TOLERANCES = {
    "field_ratio": 0.25,  # |α_model/α_DFT − 1|
    "charging_ratio": 0.25,  # |dμ/dQ ratio − 1|
    "dissociation_rmse": 0.1,  # e, fragment charge against DFT over all distances
    "fractional_charge": 0.1,  # e, distance of the far charge to the nearest integer
    "exponent": 0.15,  # |b_model − b_DFT|
    "metal_screened_fraction": 0.5,  # s of a metal slab above which a model screens (no DFT)
}

#: Columns of the table, in order.
COLUMNS = ("field_metal", "field_water", "charging", "dissociation", "polarizability")


def _cell(value: float | None, unit: str, verdict: str, **extra: Any) -> dict[str, Any]:
    cell = {"value": value, "unit": unit, "verdict": verdict}
    cell.update(extra)
    return cell


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def ratio_verdict(
    model: float, dft: float | None, tol: float, high: str, low: str
) -> tuple[str, float | None]:
    """(verdict, ratio): ``MATCH`` when ``|model/dft − 1| ≤ tol``, ``high`` above, ``low`` below."""
    if not _finite(dft) or dft == 0 or not _finite(model):
        return "", None
    ratio = model / dft
    if abs(ratio - 1.0) <= tol:
        return MATCH, ratio
    return (high if ratio > 1.0 else low), ratio


def field_verdict(
    model: Mapping[str, Any] | None, dft: Mapping[str, Any] | None, target: str, tol: Mapping[str, float]
) -> dict[str, Any]:
    """Cell of the field probe on ``target`` (``metal`` or ``water``): α ratio to DFT and the verdict."""
    if not model:
        return _cell(None, "", SKIPPED, reason="no dipoles")
    alpha = model["alpha"]
    verdict, ratio = ratio_verdict(alpha, (dft or {}).get("alpha"), tol["field_ratio"], METAL, INSULATOR)
    extra = {"alpha": alpha, "screened_fraction": model.get("screened_fraction")}
    if ratio is not None:
        return _cell(ratio, "α/α_DFT", verdict, **extra)
    s = model.get("screened_fraction")
    if target == "metal" and _finite(s):
        limit = tol["metal_screened_fraction"]
        return _cell(s, "screened fraction", METAL if s >= limit else INSULATOR, note="no DFT", **extra)
    return _cell(alpha, "e·Å²/V", SKIPPED, reason="no DFT reference", **extra)


def charging_verdict(
    model: Mapping[str, Any] | None, dft: Mapping[str, Any] | None, tol: Mapping[str, float], reason: str = ""
) -> dict[str, Any]:
    """Cell of the charging curve: (dμ/dQ)_model/(dμ/dQ)_DFT; stiff is insulator-like, soft metal-like."""
    if not model:
        return _cell(None, "", SKIPPED, reason=reason or "no Fermi level")
    slope = model["dmu_dq"]
    verdict, ratio = ratio_verdict(slope, (dft or {}).get("dmu_dq"), tol["charging_ratio"], INSULATOR, METAL)
    if ratio is None:
        return _cell(slope, "V/e", SKIPPED, reason="no DFT reference", dmu_dq=slope)
    return _cell(ratio, "dμ/dQ ÷ DFT", verdict, dmu_dq=slope, capacitance=model.get("capacitance"))


def dissociation_verdict(
    model: Mapping[str, Any] | None,
    dft: Mapping[str, Any] | None,
    tol: Mapping[str, float],
    rmse: float | None = None,
) -> dict[str, Any]:
    """Cell of the dissociation probe: the far fragment charge; RMSE against DFT decides a match."""
    if not model:
        return _cell(None, "", SKIPPED, reason="no charges")
    far = model["far_charge"]
    if rmse is not None and rmse <= tol["dissociation_rmse"]:
        return _cell(far, "e", MATCH, rmse=rmse)
    verdict = METAL if model["fractional"] >= tol["fractional_charge"] else INSULATOR
    extra = {"rmse": rmse} if rmse is not None else {"note": "no DFT charges"}
    return _cell(far, "e", verdict, **extra)


def polarizability_verdict(
    model: Mapping[str, Any] | None, dft: Mapping[str, Any] | None, tol: Mapping[str, float]
) -> dict[str, Any]:
    """Cell of α vs size: the growth exponent b; superlinear beyond DFT's is metal-like."""
    if not model:
        return _cell(None, "", SKIPPED, reason="no dipoles")
    b = model.get("exponent")
    per = model.get("alpha_per_molecule")
    if b is None:
        # no (positive) response at all: no electronic polarisability
        return _cell(None, "exponent", INSULATOR, alpha_per_molecule=per, note="no positive response")
    ref = (dft or {}).get("exponent")
    if ref is None:
        return _cell(
            b,
            "exponent",
            METAL if b > 1.0 + tol["exponent"] else INSULATOR,
            note="no DFT",
            alpha_per_molecule=per,
        )
    if abs(b - ref) <= tol["exponent"]:
        ratio = per / dft["alpha_per_molecule"] if dft.get("alpha_per_molecule") else None
        if ratio is None or abs(ratio - 1.0) <= tol["field_ratio"]:
            return _cell(b, "exponent", MATCH, alpha_per_molecule=per, dft_exponent=ref)
        return _cell(
            b,
            "exponent",
            METAL if ratio > 1 else INSULATOR,
            alpha_per_molecule=per,
            dft_exponent=ref,
            note=f"α per molecule {ratio:.2f} × DFT",
        )
    return _cell(b, "exponent", METAL if b > ref else INSULATOR, alpha_per_molecule=per, dft_exponent=ref)


def verdict_table(
    probes: Mapping[str, Mapping[str, Any]],
    models: list[str],
    tolerances: Mapping[str, float] | None = None,
    skipped: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """Rows (models) × columns (:data:`COLUMNS`); each cell ``{value, unit, verdict, ...}``.

    ``probes[column][method]`` is that method's summary (``dft`` for the reference); a column absent
    from ``probes`` was not run. ``skipped[model][column]`` gives reasons for cells a model cannot fill.
    """
    tol = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    skipped = skipped or {}
    columns = [c for c in COLUMNS if c in probes]
    rows: dict[str, dict[str, Any]] = {}
    for label in models:
        row = {}
        for column in columns:
            results = probes[column]
            reason = skipped.get(label, {}).get(column)
            model, dft = results.get(label), results.get("dft")
            if reason:
                row[column] = _cell(None, "", SKIPPED, reason=reason)
            elif column.startswith("field_"):
                row[column] = field_verdict(model, dft, column.split("_", 1)[1], tol)
            elif column == "charging":
                row[column] = charging_verdict(model, dft, tol)
            elif column == "dissociation":
                rmse = (model or {}).get("rmse_vs_dft")
                row[column] = dissociation_verdict(model, dft, tol, rmse)
            else:
                row[column] = polarizability_verdict(model, dft, tol)
        rows[label] = row
    dft_row = {}
    for column in columns:
        dft = probes[column].get("dft")
        if dft is None:
            dft_row[column] = {"value": None, "note": "no DFT"}
        elif column.startswith("field_"):
            dft_row[column] = {
                "value": dft["alpha"],
                "unit": "e·Å²/V",
                "screened_fraction": dft.get("screened_fraction"),
            }
        elif column == "charging":
            dft_row[column] = {"value": dft["dmu_dq"], "unit": "V/e"}
        elif column == "dissociation":
            dft_row[column] = {"value": dft["far_charge"], "unit": "e"}
        else:
            dft_row[column] = {
                "value": dft.get("exponent"),
                "unit": "exponent",
                "alpha_per_molecule": dft.get("alpha_per_molecule"),
            }
    return {"columns": columns, "rows": rows, "dft": dft_row, "tolerances": tol}


def format_table(table: Mapping[str, Any]) -> str:
    """The table as plain text (one line per model), for reports and logs."""
    columns = table["columns"]
    lines = ["model | " + " | ".join(columns)]
    for label, row in table["rows"].items():
        cells = []
        for column in columns:
            cell = row[column]
            value = cell.get("value")
            text = "–" if value is None else f"{value:.3g}"
            cells.append(f"{text} {cell['verdict']}")
        lines.append(f"{label} | " + " | ".join(cells))
    return "\n".join(lines)
