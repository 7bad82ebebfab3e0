"""Figure of the active-learning rounds: every design's held-out energy error after each round."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiida_emlip.report.study_figures import _png, plt


def active_learning_errors(summary: Mapping[str, Any]) -> bytes | None:
    """Held-out energy RMSE (meV/atom, log scale) against the round, one line per design; the model
    that drives the selection drawn thick, the training-set size on the upper axis."""
    rounds = [r for r in summary.get("rounds") or [] if r.get("energy_error")]
    if not rounds:
        return None
    numbers = [int(r["round"]) for r in rounds]
    labels = sorted({label for r in rounds for label in r["energy_error"]})
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for label in labels:
        points = [
            (n, r["energy_error"][label])
            for n, r in zip(numbers, rounds, strict=True)
            if r["energy_error"].get(label) is not None
        ]
        if not points:
            continue
        thick = label == summary.get("model")
        ax.plot(
            [p[0] for p in points],
            [max(p[1], 1e-3) for p in points],
            "o-",
            lw=2.4 if thick else 1.2,
            label=f"{label} (selects)" if thick else label,
        )
    ax.set_yscale("log")
    ax.set_xticks(numbers)
    ax.set_xlabel("round (0: before any new label)")
    ax.set_ylabel("held-out energy RMSE (meV/atom)")
    sizes = [r.get("training_size") for r in rounds]
    if all(s is not None for s in sizes):
        top = ax.secondary_xaxis("top")
        top.set_xticks(numbers)
        top.set_xticklabels([str(s) for s in sizes])
        top.set_xlabel("training structures", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)
