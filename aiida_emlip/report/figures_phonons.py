"""Figures of the phonon validation: band structures (DFT and every model) and densities of states.

Each function takes the ``analysis`` dict of :func:`aiida_emlip.analysis.phonons.analyse` (as stored in
the workchain's ``phonons`` output) and writes one PNG.
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
DFT_STYLE = {"color": "black", "lw": 2.0}


def _methods(analysis: Mapping[str, Any]) -> list[str]:
    """DFT first, then the models in a stable order."""
    methods = analysis["methods"]
    return [m for m in (DFT,) if m in methods] + sorted(k for k in methods if k != DFT)


def _label(method: str) -> str:
    return "DFT" if method == DFT else method


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ticks(path: Mapping[str, Any]) -> tuple[list[float], list[str]]:
    """Tick positions and labels at the segment ends; a jump of the path joins two labels (``U|K``)."""
    positions, labels = [path["distances"][0][0]], [path["labels"][0][0]]
    for k, (distances, (_, end)) in enumerate(zip(path["distances"], path["labels"])):
        positions.append(distances[-1])
        labels.append(end)
        if path["breaks"][k] and k + 1 < len(path["labels"]):
            labels[-1] = f"{end}|{path['labels'][k + 1][0]}"
    return positions, labels


def band_structures(analysis: Mapping[str, Any], path: str | Path) -> Path:
    """Bands along the standard path: each method with its NAC where it has one (LO–TO at Γ).

    Dashed: the analytic bands (no NAC) of a method whose NAC bands are drawn.
    """
    band_path = analysis["path"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, method in enumerate(_methods(analysis)):
        entry = analysis["methods"][method]
        style = DFT_STYLE if method == DFT else {"color": colours[n % len(colours)], "lw": 1.3}
        nac = entry.get("bands_nac")
        main = nac if nac is not None else entry["bands"]
        suffix = " (NAC)" if nac is not None else ""
        for k, (distances, frequencies) in enumerate(zip(band_path["distances"], main)):
            ax.plot(distances, frequencies, **style, label=_label(method) + suffix if k == 0 else None)
        if nac is not None:
            for distances, frequencies in zip(band_path["distances"], entry["bands"]):
                ax.plot(distances, frequencies, **{**style, "lw": 0.8, "ls": "--"})
    positions, labels = _ticks(band_path)
    for x in positions:
        ax.axvline(x, color="0.8", lw=0.6)
    ax.axhline(0.0, color="0.6", lw=0.6)
    ax.set_xticks(positions)
    ax.set_xticklabels(labels)
    ax.set_xlim(positions[0], positions[-1])
    ax.set_ylabel("frequency (THz)")
    ax.set_title("Phonon band structure (dashed: without NAC)")
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="best")
    return _save(fig, path)


def densities_of_states(analysis: Mapping[str, Any], path: str | Path) -> Path:
    """Total phonon DOS of every method (with its NAC where it has one)."""
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, method in enumerate(_methods(analysis)):
        dos = analysis["methods"][method]["dos"]
        style = DFT_STYLE if method == DFT else {"color": colours[n % len(colours)], "lw": 1.3}
        ax.plot(
            np.asarray(dos["frequency_points"]), np.asarray(dos["total_dos"]), **style, label=_label(method)
        )
    ax.set_xlabel("frequency (THz)")
    ax.set_ylabel("DOS (states/THz per primitive cell)")
    ax.legend(fontsize=8)
    return _save(fig, path)


FIGURES = {"bands": band_structures, "dos": densities_of_states}


def write_figures(analysis: Mapping[str, Any], directory: str | Path) -> dict[str, Path]:
    """Write every figure as ``<name>.png`` into ``directory``; return name -> path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return {name: function(analysis, directory / f"{name}.png") for name, function in FIGURES.items()}
