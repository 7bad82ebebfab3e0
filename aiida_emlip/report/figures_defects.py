"""Figures of the charged-vacancy validation: formation energies, ΔE(q) parity, charge-localisation profiles.

Each function takes the ``analysis`` dict of :func:`aiida_emlip.analysis.defects.analyse_vacancy` (as
stored in the workchain's ``analysis`` output) and writes one PNG.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

DFT = "dft"
DFT_STYLE = {"color": "black", "lw": 2.2}


def _methods(analysis: Mapping[str, Any]) -> list[str]:
    """DFT first, then the models in a stable order."""
    return [DFT, *sorted(k for k in analysis["methods"] if k != DFT)]


def _label(method: str) -> str:
    return "DFT" if method == DFT else method


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def formation_energy_diagram(analysis: Mapping[str, Any], path: str | Path) -> Path:
    """E_f(q, E_F) over the DFT gap: the lowest charge state of each method, and DFT's lines per q."""
    fig, ax = plt.subplots(figsize=(5.4, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    gap = float(analysis["gap"])
    dft_lines = analysis["methods"][DFT]["formation_lines"]
    low, high = min(dft_lines["lowest"]), max(analysis["methods"][DFT]["formation_energy_vbm"].values())
    pad = max(2.0, 0.5 * (high - low))
    window = (low - pad, high + pad)  # DFT's range: a model far off is named, not drawn off the page
    for n, method in enumerate(_methods(analysis)):
        result = analysis["methods"][method]
        lines = result["formation_lines"]
        fermi = np.asarray(lines["fermi_level"])
        style = DFT_STYLE if method == DFT else {"color": colours[n % len(colours)], "lw": 1.6}
        lowest = np.asarray(lines["lowest"])
        label = _label(method)
        if lowest.max() < window[0] or lowest.min() > window[1]:
            label += f" (off scale, {lowest.mean():+.1f} eV)"
        ax.plot(fermi, lowest, label=label, **style)
        if method == DFT:
            for q, value in result["formation_energy_vbm"].items():
                ax.plot(fermi, value + float(q) * fermi, color="grey", lw=0.7, ls=":")
                ax.annotate(f"q = {q}", (fermi[-1], value + float(q) * fermi[-1]), fontsize=7, color="grey")
        for energy in result["transition_levels"].values():
            if 0.0 <= energy <= gap:
                y = np.interp(energy, fermi, lines["lowest"])
                ax.plot([energy], [y], "o", ms=4, color=style["color"])
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.axvline(gap, color="grey", lw=0.8)
    ax.set_ylim(*window)
    ax.set_xlabel("Fermi level above the VBM (eV)")
    ax.set_ylabel("formation energy (eV)")
    ax.set_title(
        f"V_{analysis['element']}: formation energy (μ: {analysis['chemical_potential_source']})", fontsize=8
    )
    ax.legend(fontsize=7)
    return _save(fig, path)


def delta_e_parity(analysis: Mapping[str, Any], path: str | Path) -> Path:
    """Model against DFT: ΔE(q) = E(q) − E(0), and E(q) − E_host (which models without q = 0 also have)."""
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.0))
    reference = analysis["methods"][DFT]
    for ax, key, title in (
        (axes[0], "delta_e", "ΔE(q) = E(q) − E(0) (eV)"),
        (axes[1], "relative_energy", "E(q) − E_host (eV)"),
    ):
        ref = reference.get(key, {})
        values = [v for q, v in ref.items() if not (key == "delta_e" and q == "0")]
        for method in _methods(analysis)[1:]:
            mine = analysis["methods"][method].get(key, {})
            qs = [q for q in ref if q in mine and not (key == "delta_e" and q == "0")]
            if not qs:
                continue
            ax.plot([ref[q] for q in qs], [mine[q] for q in qs], "o", label=method)
            for q in qs:
                ax.annotate(q, (ref[q], mine[q]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            values += [mine[q] for q in qs]
        if values:
            low, high = min(values), max(values)
            pad = 0.1 * max(high - low, 1.0)
            ax.plot([low - pad, high + pad], [low - pad, high + pad], color="grey", lw=0.8)
            ax.plot(
                [ref[q] for q in ref if not (key == "delta_e" and q == "0")],
                [ref[q] for q in ref if not (key == "delta_e" and q == "0")],
                "k+",
                ms=9,
                label="DFT",
            )
        ax.set_xlabel(f"DFT {title}")
        ax.set_ylabel(f"model {title}")
        ax.legend(fontsize=7)
    return _save(fig, path)


def charge_profile(analysis: Mapping[str, Any], path: str | Path) -> Path:
    """Δq per shell around the vacancy (and its running sum, dashed), one panel per charge state."""
    charges = [q for q in analysis["charges"] if q in analysis["methods"][DFT].get("profiles", {})] or list(
        analysis["charges"]
    )
    fig, axes = plt.subplots(1, len(charges), figsize=(4.2 * len(charges), 3.6), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, q in zip(axes[0], charges):
        for n, method in enumerate(_methods(analysis)):
            result = analysis["methods"][method]
            profile = result.get("profiles", {}).get(q)
            if profile is None:
                continue
            shells = profile["shells"]
            style = DFT_STYLE if method == DFT else {"color": colours[n % len(colours)], "lw": 1.3}
            source = f" ({result.get('charge_source')})" if method == DFT else ""
            ax.plot(
                shells["radius"], shells["delta_q_sum"], "o-", ms=3, label=_label(method) + source, **style
            )
            ax.plot(shells["radius"], shells["cumulative"], ls="--", **{**style, "lw": 0.9})
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_title(f"V_{analysis['element']}, q = {q}")
        ax.set_xlabel("distance from the vacancy (Å)")
        ax.set_ylabel("Δq per shell (e); dashed: running sum")
        ax.legend(fontsize=7)
    return _save(fig, path)


#: name of each figure output -> function
FIGURES = {
    "formation_energy": formation_energy_diagram,
    "delta_e_parity": delta_e_parity,
    "charge_profile": charge_profile,
}


def write_figures(analysis: Mapping[str, Any], directory: str | Path) -> dict[str, Path]:
    """Write every figure as ``<name>.png`` into ``directory``; return name -> path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return {name: function(analysis, directory / f"{name}.png") for name, function in FIGURES.items()}
