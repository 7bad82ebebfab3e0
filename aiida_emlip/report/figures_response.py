"""Figures of the response probes: induced dipole vs field, μ vs Q, fragment charge vs R, α vs N."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def _style(label: str) -> dict[str, Any]:
    if label == "dft":
        return {"color": "black", "marker": "o", "linestyle": "-", "label": "DFT", "zorder": 3}
    return {"marker": "s", "linestyle": "--", "label": label}


def write_figures(analysis: Mapping[str, Any], directory: Path) -> dict[str, Path]:
    """One PNG per probe that has results; returns {name: path}."""
    probes = analysis.get("probes", {})
    directory = Path(directory)
    paths: dict[str, Path] = {}
    fields = [p for p in ("field_metal", "field_water") if p in probes]
    if fields:
        fig, axes = plt.subplots(1, len(fields), figsize=(4.6 * len(fields), 3.6), squeeze=False)
        for ax, probe in zip(axes[0], fields):
            for label, s in sorted(probes[probe].items(), key=lambda x: x[0] != "dft"):
                induced = np.asarray(s["dipoles"]) - s["dipole_zero_field"]
                ax.plot(s["fields"], induced, **_style(label))
            ax.set_xlabel("field E (V/Å)")
            ax.set_ylabel("induced dipole d(E) − d₀ (e·Å)")
            ax.set_title(probe.replace("_", " "))
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths["field_response"] = directory / "field_response.png"
        fig.savefig(paths["field_response"], dpi=110)
        plt.close(fig)
    if "charging" in probes:
        fig, ax = plt.subplots(figsize=(4.6, 3.6))
        for label, s in sorted(probes["charging"].items(), key=lambda x: x[0] != "dft"):
            mu = np.asarray(s["fermi_levels"]) - s["mu_neutral"]
            ax.plot(s["charges"], mu, **_style(label))
        ax.set_xlabel("total charge Q (e)")
        ax.set_ylabel("μ(Q) − μ(0) (eV)")
        ax.set_title("charging curve")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths["charging_curve"] = directory / "charging_curve.png"
        fig.savefig(paths["charging_curve"], dpi=110)
        plt.close(fig)
    if "dissociation" in probes:
        fig, ax = plt.subplots(figsize=(4.6, 3.6))
        for label, s in sorted(probes["dissociation"].items(), key=lambda x: x[0] != "dft"):
            ax.plot(s["distances"], s["fragment_charge"], **_style(label))
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set_xlabel("separation R (Å)")
        ax.set_ylabel("charge of the first ion (e)")
        ax.set_title("dissociation")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths["dissociation"] = directory / "dissociation.png"
        fig.savefig(paths["dissociation"], dpi=110)
        plt.close(fig)
    if "polarizability" in probes:
        fig, ax = plt.subplots(figsize=(4.6, 3.6))
        for label, s in sorted(probes["polarizability"].items(), key=lambda x: x[0] != "dft"):
            b = s.get("exponent")
            style = _style(label)
            style["label"] += f" (b = {b:.2f})" if b is not None else " (no response)"
            ax.plot(s["sizes"], s["alpha_volume"], **style)
        ax.set_xlabel("water molecules N")
        ax.set_ylabel("α along the chain (Å³)")
        ax.set_title("polarisability vs size")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths["polarizability"] = directory / "polarizability.png"
        fig.savefig(paths["polarizability"], dpi=110)
        plt.close(fig)
    return paths
