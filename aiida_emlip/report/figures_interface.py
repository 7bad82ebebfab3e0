"""Figures of the interface workchain: induced potential profiles, drop vs charge, dipole vs field, and
charge-transfer parity, DFT next to every model."""

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


def _ordered(methods: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return sorted(methods.items(), key=lambda item: (item[0] != "dft", item[0]))


def _save(fig, directory: Path, name: str, paths: dict[str, Path]) -> None:
    fig.tight_layout()
    paths[name] = directory / f"{name}.png"
    fig.savefig(paths[name], dpi=110)
    plt.close(fig)


def _profiles(methods, setup, length: float, directory: Path, paths: dict[str, Path]) -> None:
    keys = [
        k
        for k in setup
        if k != "neutral"
        and any(k in s["states"] and "induced_profile" in s["states"][k] for s in methods.values())
    ]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, summary in _ordered(methods):
            row = summary["states"].get(key, {})
            if "induced_profile" not in row:
                continue
            induced = np.asarray(row["induced_profile"])
            z = np.arange(len(induced)) / len(induced) * length
            style = _style(label)
            style.pop("marker")
            ax.plot(z, induced - induced.mean(), **style)
        meta = setup[key]
        unit = "V/Å" if meta["state"] == "field" else "e"
        ax.set_title(f"{meta['state']} {meta['value']:+g} {unit}")
        ax.set_xlabel("z (Å)")
        ax.set_ylabel("δV(z) = V − V_neutral (eV)")
        ax.legend(fontsize=7)
    _save(fig, directory, "potential_profiles", paths)


def _curve(methods, group: str, xlabel: str, ylabel: str, title: str, directory, name, paths) -> None:
    present = [(label, s[group]) for label, s in _ordered(methods) if group in s]
    if not present:
        return
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    for label, data in present:
        x, y = zip(*data["points"])
        ax.plot(x, y, **_style(label))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, directory, name, paths)


def _parity(errors: Mapping[str, Any], directory: Path, paths: dict[str, Path]) -> None:
    present = {
        label: e["charge_transfer_pairs"] for label, e in errors.items() if e.get("charge_transfer_pairs")
    }
    if not present:
        return
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    values = []
    for label, pairs in sorted(present.items()):
        model, dft = zip(*pairs)
        ax.scatter(dft, model, label=label)
        values += list(model) + list(dft)
    lo, hi = min(values), max(values)
    pad = 0.1 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", linewidth=0.8)
    ax.set_xlabel("electrolyte charge, DFT Hirshfeld (e)")
    ax.set_ylabel("electrolyte charge, model (e)")
    ax.set_title("charge transfer metal → water")
    ax.legend(fontsize=8)
    _save(fig, directory, "charge_transfer", paths)


def write_figures(analysis: Mapping[str, Any], setup: Mapping[str, Any], directory: Path) -> dict[str, Path]:
    """One PNG per quantity that has results; returns {name: path}."""
    directory = Path(directory)
    methods = analysis.get("methods", {})
    paths: dict[str, Path] = {}
    length = float(next(iter(setup.values()))["length"]) if setup else 1.0
    _profiles(methods, setup, length, directory, paths)
    _curve(
        methods,
        "capacitance",
        "electrode charge Q (e)",
        "potential drop Δφ(Q) (V)",
        "drop vs electrode charge",
        directory,
        "drop_vs_charge",
        paths,
    )
    _curve(
        methods,
        "field",
        "field E (V/Å)",
        "dipole d along the normal (e·Å)",
        "induced dipole vs field",
        directory,
        "dipole_vs_field",
        paths,
    )
    _curve(
        methods,
        "charging",
        "electrode charge Q (e)",
        "Fermi level μ (eV)",
        "μ vs electrode charge",
        directory,
        "fermi_vs_charge",
        paths,
    )
    _parity(analysis.get("errors", {}), directory, paths)
    return paths
