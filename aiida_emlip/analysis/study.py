"""The study's comparison (pure): held-out errors per design, charge state and config type, and a verdict.

Energies are compared per atom (meV/atom), forces per component (meV/Å), charges per atom (me) where
both the DFT labels and the model carry them. The verdict says in words which design wins where, in
particular how the best electrostatic design does against ``sr`` on the charged structures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ase import Atoms

from aiida_emlip import schema

UNITS = {"energy": "meV/atom", "forces": "meV/Å", "charges": "me"}
ALL = "all"


def charge_group(charge: float) -> str:
    """``total_charge=+1`` style group names (``+0`` for neutral)."""
    return f"total_charge={charge:+g}"


def _stats(errors: list[float]) -> dict[str, Any]:
    values = np.asarray(errors, dtype=float)
    if values.size == 0:
        return {"rmse": None, "mae": None, "n": 0}
    return {
        "rmse": float(np.sqrt(np.mean(values**2))),
        "mae": float(np.mean(np.abs(values))),
        "n": int(values.size),
    }


def held_out_errors(reference: Sequence[Atoms], predicted: Sequence[Atoms]) -> dict[str, Any]:
    """Errors of ``predicted`` against ``reference`` (matched by ``info['key']``), grouped.

    Groups: ``all``, one per total charge (``total_charge=+1``), one per config type
    (``config_type=water``), and ``charged`` / ``neutral``. Returns
    ``{quantity: {group: {rmse, mae, n}}}`` and ``missing`` (reference keys without a prediction).
    """
    by_key = {str(a.info.get("key")): a for a in predicted}
    buckets: dict[str, dict[str, list[float]]] = {q: {} for q in UNITS}
    missing = []
    for ref in reference:
        key = str(ref.info.get("key"))
        pred = by_key.get(key)
        energy = pred.info.get(schema.ENERGY) if pred is not None else None
        if pred is None or energy is None or not math.isfinite(float(energy)):
            missing.append(key)
            continue
        charge = float(ref.info.get(schema.TOTAL_CHARGE, 0.0))
        groups = [
            ALL,
            charge_group(charge),
            f"config_type={ref.info.get(schema.CONFIG_TYPE, 'default')}",
            "charged" if charge != 0 else "neutral",
        ]
        values: dict[str, list[float]] = {}
        if schema.ENERGY in ref.info:
            values["energy"] = [1000.0 * (float(energy) - float(ref.info[schema.ENERGY])) / len(ref)]
        if schema.FORCES in ref.arrays and schema.FORCES in pred.arrays:
            diff = np.asarray(pred.arrays[schema.FORCES]) - np.asarray(ref.arrays[schema.FORCES])
            values["forces"] = (1000.0 * diff).ravel().tolist()
        if schema.CHARGES in ref.arrays and schema.CHARGES in pred.arrays:
            diff = np.asarray(pred.arrays[schema.CHARGES]) - np.asarray(ref.arrays[schema.CHARGES])
            values["charges"] = (1000.0 * diff).ravel().tolist()
        for quantity, errors in values.items():
            for group in groups:
                buckets[quantity].setdefault(group, []).extend(errors)
    out: dict[str, Any] = {
        quantity: {group: _stats(errors) for group, errors in sorted(groups.items())}
        for quantity, groups in buckets.items()
        if groups
    }
    out["missing"] = missing
    return out


def parity_points(reference: Sequence[Atoms], predicted: Sequence[Atoms]) -> list[dict[str, Any]]:
    """Per held-out structure: key, total charge, config type, DFT and model energy per atom (eV)."""
    by_key = {str(a.info.get("key")): a for a in predicted}
    points = []
    for ref in reference:
        pred = by_key.get(str(ref.info.get("key")))
        if pred is None or schema.ENERGY not in ref.info or pred.info.get(schema.ENERGY) is None:
            continue
        points.append(
            {
                "key": str(ref.info.get("key")),
                "total_charge": float(ref.info.get(schema.TOTAL_CHARGE, 0.0)),
                "config_type": str(ref.info.get(schema.CONFIG_TYPE, "default")),
                "dft": float(ref.info[schema.ENERGY]) / len(ref),
                "model": float(pred.info[schema.ENERGY]) / len(ref),
            }
        )
    return points


def training_cost(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """What training a design cost: wall time, epochs, parameters, device, structures per second."""
    history = metrics.get("history") or []
    return {
        "wall_time_s": metrics.get("wall_time_s"),
        "epochs": metrics.get("epochs"),
        "num_parameters": metrics.get("num_parameters"),
        "device": metrics.get("device"),
        "train_structures_per_s": metrics.get("train_structures_per_s"),
        "train_size": (metrics.get("sizes") or {}).get("train"),
        "final_valid_loss": history[-1].get("valid_loss") if history else None,
    }


def md_step_cost_ms(summary: Mapping[str, Any]) -> float | None:
    """Mean single-point time per structure (ms) of an ``emlip.evaluate`` run: the cost of one MD step."""
    rows = summary.get("structures") or []
    times = [float(r["wall_s"]) for r in rows if r.get("wall_s") is not None]
    return 1000.0 * float(np.mean(times)) if times else None


def _rmse(row: Mapping[str, Any], group: str, quantity: str = "energy") -> float | None:
    return ((row.get("held_out") or {}).get(quantity) or {}).get(group, {}).get("rmse")


def verdict(designs: Mapping[str, Mapping[str, Any]], baseline: str = "sr") -> list[str]:
    """Sentences that answer the study's question from the comparison rows."""
    lines: list[str] = []
    scored = {label: _rmse(row, ALL) for label, row in designs.items()}
    scored = {k: v for k, v in scored.items() if v is not None}
    if scored:
        best = min(scored, key=scored.__getitem__)
        lines.append(
            f"Lowest held-out energy error overall: {best} ({scored[best]:.1f} meV/atom over every "
            "held-out structure)."
        )
    base = designs.get(baseline)
    electrostatic = {
        label: _rmse(row, "charged")
        for label, row in designs.items()
        if row.get("head") != "sr" and _rmse(row, "charged") is not None
    }
    base_charged = _rmse(base, "charged") if base is not None else None
    if base_charged is not None and electrostatic:
        best = min(electrostatic, key=electrostatic.__getitem__)
        value = electrostatic[best]
        if value > 0 and value < base_charged:
            ratio = base_charged / value
            lines.append(
                f"On the charged structures the best electrostatic design, {best}, has an energy error "
                f"{ratio:.1f}× lower than {baseline}'s ({value:.1f} vs {base_charged:.1f} meV/atom)."
            )
        else:
            lines.append(
                f"On the charged structures no electrostatic design beats {baseline} "
                f"(best: {best}, {value:.1f} vs {base_charged:.1f} meV/atom)."
            )
        base_neutral = _rmse(base, "neutral")
        neutral = _rmse(designs[best], "neutral")
        if base_neutral is not None and neutral is not None:
            lines.append(
                f"On the neutral structures {best} and {baseline} have {neutral:.1f} and "
                f"{base_neutral:.1f} meV/atom: the gain is in the charged states."
                if neutral < 2 * base_neutral
                else f"On the neutral structures {best} is worse "
                f"({neutral:.1f} vs {base_neutral:.1f} meV/atom)."
            )
    charges = {label: _rmse(row, ALL, "charges") for label, row in designs.items()}
    charges = {k: v for k, v in charges.items() if v is not None}
    if charges:
        best = min(charges, key=charges.__getitem__)
        lines.append(f"Closest charges to the DFT (Hirshfeld) ones: {best} ({charges[best]:.0f} me RMSE).")
    return lines


def distance_to_dft(value: float, reference: float | None) -> float:
    """How far a summary metric is from DFT: ``|value − reference|``, or ``|value|`` (an error against
    DFT) where the validation gives no reference."""
    return abs(value - reference) if reference is not None else abs(value)


def validation_verdict(
    name: str,
    summaries: Mapping[str, Mapping[str, float | None]],
    references: Mapping[str, float | None] | None = None,
) -> list[str]:
    """One sentence per summary metric of a validation: which design comes closest to DFT.

    ``references``: DFT's value of a metric (1 for a ratio to DFT, DFT's own number for a quantity);
    a metric without one is an error against DFT, closest at 0.
    """
    references = references or {}
    lines = []
    metrics = sorted({m for row in summaries.values() for m in row})
    for metric in metrics:
        values = {d: row.get(metric) for d, row in summaries.items() if row.get(metric) is not None}
        if values:
            ref = references.get(metric)
            best = min(values, key=lambda d: distance_to_dft(values[d], ref))
            dft = f"; DFT {ref:.3g}" if ref is not None else ""
            lines.append(f"{name}: closest to DFT in {metric}: {best} ({values[best]:.3g}{dft}).")
    return lines
