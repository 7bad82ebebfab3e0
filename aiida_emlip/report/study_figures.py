"""Figures of the study report (pure matplotlib, Agg): error bars per charge state, learning curves, parity.

Every function returns PNG bytes; :func:`study_figures` returns them by name.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from ase import Atoms

from aiida_emlip.analysis.study import parity_points

DPI = 110


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def errors_by_charge(designs: Mapping[str, Any]) -> bytes | None:
    """Held-out energy RMSE per total-charge state, one bar per design (log scale)."""
    groups = sorted(
        {g for row in designs.values() for g in (row.get("held_out") or {}).get("energy", {})},
        key=lambda g: float(g.split("=")[1]) if g.startswith("total_charge=") else 1e9,
    )
    groups = [g for g in groups if g.startswith("total_charge=")]
    labels = [label for label, row in designs.items() if (row.get("held_out") or {}).get("energy")]
    if not groups or not labels:
        return None
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(groups), 3.4))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        energy = designs[label]["held_out"]["energy"]
        values = [max(energy.get(g, {}).get("rmse") or 0.0, 1e-3) for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"Q = {g.split('=')[1]}" for g in groups])
    ax.set_yscale("log")
    ax.set_ylabel("held-out energy RMSE (meV/atom)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def learning_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> bytes | None:
    """Validation (and training) loss per epoch of every design."""
    if not any(histories.values()):
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for label, history in histories.items():
        if not history:
            continue
        epochs = [row["epoch"] for row in history]
        line = ax.plot(epochs, [row.get("valid_loss") for row in history], label=f"{label} (valid)")
        ax.plot(
            epochs,
            [row.get("train_loss") for row in history],
            ls=":",
            color=line[0].get_color(),
            alpha=0.7,
        )
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (dotted: training)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def parity(label: str, reference: Sequence[Atoms], predicted: Sequence[Atoms]) -> bytes | None:
    """DFT against model energy per atom on the held-out set, one panel per total-charge state.

    Energies are relative to the mean DFT energy per atom of each configuration type over the held-out
    set (the same shift for DFT and model), so that systems of very different energies share one scale.
    """
    points = parity_points(reference, predicted)
    if not points:
        return None
    shift: dict[str, float] = {}
    for config_type in {p["config_type"] for p in points}:
        values = [p["dft"] for p in points if p["config_type"] == config_type]
        shift[config_type] = sum(values) / len(values)
    charges = sorted({p["total_charge"] for p in points})
    fig, axes = plt.subplots(1, len(charges), figsize=(2.9 * len(charges), 2.9), squeeze=False)
    for ax, charge in zip(axes[0], charges):
        chosen = [p for p in points if p["total_charge"] == charge]
        for config_type in sorted({p["config_type"] for p in chosen}):
            sub = [p for p in chosen if p["config_type"] == config_type]
            x = [p["dft"] - shift[config_type] for p in sub]
            y = [p["model"] - shift[config_type] for p in sub]
            ax.scatter(x, y, s=18, label=config_type)
        values = [p[k] - shift[p["config_type"]] for p in chosen for k in ("dft", "model")]
        lo, hi = min(values), max(values)
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k-", lw=0.8)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(f"{label}, Q = {charge:+g}", fontsize=9)
        ax.set_xlabel("DFT (eV/atom)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("model (eV/atom)", fontsize=8)
    fig.suptitle("energy per atom relative to the held-out DFT mean of each configuration type", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def study_figures(
    comparison: Mapping[str, Any],
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    reference: Sequence[Atoms],
    predictions: Mapping[str, Sequence[Atoms]],
) -> dict[str, bytes]:
    """Every figure of the report by name (``errors_by_charge``, ``learning_curves``, ``parity_<design>``,
    ``active_learning`` when the study ran rounds)."""
    out: dict[str, bytes] = {}
    figure = errors_by_charge(comparison.get("designs", {}))
    if figure:
        out["errors_by_charge"] = figure
    figure = learning_curves(histories)
    if figure:
        out["learning_curves"] = figure
    for label, frames in predictions.items():
        figure = parity(label, reference, frames)
        if figure:
            out[f"parity_{label}"] = figure
    if comparison.get("active_learning"):
        from aiida_emlip.report.figures_active import active_learning_errors

        figure = active_learning_errors(comparison["active_learning"])
        if figure:
            out["active_learning"] = figure
    return out
