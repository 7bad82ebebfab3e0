"""Figures of the long-range benchmark: fragment charge and energy error against separation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from ase import Atoms

from aiida_emlip import schema
from aiida_emlip.analysis.long_range import fragment_charges, separation


def fragment_charge_curves(
    reference: Sequence[Atoms],
    predictions: Mapping[str, Sequence[Atoms]],
    path: str | Path,
    cutoff: float | None = None,
) -> Path:
    """Charge of the first fragment (the ion) vs separation, one panel per system: DFT and each design.

    Where a design moves charge across vacuum, its curve leaves the DFT one beyond the cutoff.
    """
    systems = sorted({str(a.info.get(schema.CONFIG_TYPE, "")) for a in reference})
    charged = [
        s
        for s in systems
        if any(
            str(a.info.get(schema.CONFIG_TYPE, "")) == s and a.info.get(schema.TOTAL_CHARGE, 0)
            for a in reference
        )
    ] or systems
    fig, axes = plt.subplots(1, len(charged), figsize=(4.5 * len(charged), 3.6), squeeze=False)
    for ax, system in zip(axes[0], charged):
        idx = [i for i, a in enumerate(reference) if str(a.info.get(schema.CONFIG_TYPE, "")) == system]
        seps = np.array([separation(reference[i]) for i in idx])
        order = np.argsort(seps)
        dft = [fragment_charges(reference[i], reference[i].arrays[schema.CHARGES])[0] for i in idx]
        ax.plot(seps[order], np.array(dft)[order], "ko-", lw=2, label="DFT (Hirshfeld)")
        for label, frames in predictions.items():
            if schema.CHARGES not in frames[idx[0]].arrays:
                continue
            values = [fragment_charges(frames[i], frames[i].arrays[schema.CHARGES])[0] for i in idx]
            ax.plot(seps[order], np.array(values)[order], ".-", label=label)
        if cutoff is not None:
            ax.axvline(cutoff, color="grey", ls=":", lw=1)
        ax.set_title(system)
        ax.set_xlabel("closest-atom separation (Å)")
        ax.set_ylabel("charge of the first fragment (e)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
