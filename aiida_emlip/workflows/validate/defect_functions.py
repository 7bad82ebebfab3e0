"""Calcfunctions of the charged-defect workchain: the cells, the analysis and the figures (provenance)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from aiida import orm
from aiida.engine import calcfunction

from aiida_emlip import schema
from aiida_emlip.analysis import defects as analysis
from aiida_emlip.data import EmlipDatasetData
from aiida_emlip.report.figures_defects import write_figures
from aiida_emlip.structures.defects import vacancy_cells

#: Structure keys of the DFT dataset and of the model inputs.
PRISTINE = "pristine"
BAND_EDGES = "band_edges"
#: Prefix of DFT's planar-averaged potentials among the analysis calcfunction's inputs.
POTENTIAL_PREFIX = "dft_potential_"


def vacancy_key(charge: float) -> str:
    """``vacancy_q0``, ``vacancy_qp1``, ``vacancy_qm2``: link-label-safe key of a charge state."""
    value = round(charge)
    return f"vacancy_q{'p' if value > 0 else 'm' if value < 0 else ''}{abs(value)}"


def cell_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`~aiida_emlip.structures.defects.vacancy_cells` in ``settings``."""
    return {
        "element": settings["element"],
        "site": settings.get("site"),
        "supercell": settings.get("supercell"),
        "min_length": float(settings.get("min_length", 10.0)),
    }


@calcfunction
def vacancy_structures(host: orm.StructureData, settings: orm.Dict) -> dict[str, orm.Data]:
    """The pristine supercell, the vacancy supercell and both as model inputs (every charge state).

    ``settings``: ``element``, ``site`` (host index or None), ``supercell`` (diagonal repeat or None),
    ``min_length`` (Å), ``charges``. ``configurations`` (an ``emlip.dataset``) holds the pristine cell and
    the vacancy cell once per charge state, with ``total_charge`` and ``key`` in ``info``.
    """
    values = settings.get_dict()
    cells = vacancy_cells(host.get_ase(), **cell_settings(values))
    pristine = cells.pristine.copy()
    pristine.info = {schema.TOTAL_CHARGE: 0.0, "key": PRISTINE, schema.CONFIG_TYPE: "host"}
    frames = [pristine]
    for charge in values["charges"]:
        frame = cells.defect.copy()
        frame.info = {
            schema.TOTAL_CHARGE: float(charge),
            "key": vacancy_key(charge),
            schema.CONFIG_TYPE: f"V_{cells.element}",
        }
        frames.append(frame)
    info = {
        "site": cells.site,
        "position": cells.position.tolist(),
        "repeat": list(cells.repeat),
        "n_atoms": len(cells.pristine),
    }
    return {
        "pristine": orm.StructureData(ase=cells.pristine),
        "vacancy": orm.StructureData(ase=cells.defect),
        "configurations": EmlipDatasetData(frames=frames),
        "cells": orm.Dict(info),
    }


def band_edges(frames: list, key: str) -> dict[str, Any]:
    """VBM and CBM (eV, pw.x's cell-average reference) from the band-edge frame ``key`` of the DFT data."""
    for atoms in frames:
        if atoms.info.get("key") == key:
            vbm = atoms.info.get("highest_occupied_level")
            cbm = atoms.info.get("lowest_unoccupied_level")
            if vbm is None or cbm is None:
                raise ValueError(f"{key}: pw.x printed no highest occupied / lowest unoccupied level")
            return {"vbm": float(vbm), "cbm": float(cbm), "gap": float(cbm) - float(vbm), "source": key}
    raise ValueError(f"no {key} configuration in the DFT dataset")


@calcfunction
def analyse_charged_vacancy(
    settings: orm.Dict, dft: EmlipDatasetData, **nodes: orm.Data
) -> dict[str, orm.Dict]:
    """ΔE(q), corrections, formation energies, transition levels and Δq profiles of DFT and every model.

    ``settings``: ``element``, ``site`` (supercell index), ``charges``, ``band_edges_key``,
    ``dielectric_constant``, ``chemical_potentials``, ``free_atom_energy`` (eV of the removed
    element's free pseudo-atom, or None), ``shell_tolerance``, ``fermi_points``.
    ``sigmas`` (model label -> Gaussian width, Å). ``nodes``: DFT's planar-averaged potentials
    (``POTENTIAL_PREFIX`` + configuration key, from the dataset workchain; with them the correction is
    Freysoldt's) and, under its label, every model's ``emlip.evaluate`` output on the same cells.
    """
    values = settings.get_dict()
    predictions = {k: v for k, v in nodes.items() if not k.startswith(POTENTIAL_PREFIX)}
    found = {
        k[len(POTENTIAL_PREFIX) :]: v["axes"] for k, v in nodes.items() if k.startswith(POTENTIAL_PREFIX)
    }
    frames = dft.to_ase()
    edges = band_edges(frames, values["band_edges_key"])
    keys = {
        "host": PRISTINE,
        "defects": {analysis.charge_label(q): vacancy_key(q) for q in values["charges"]},
    }
    order = [PRISTINE, *(vacancy_key(q) for q in values["charges"])]
    reference, notes = analysis.select_frames(frames, keys)
    host = reference["host"]
    if host is None:
        raise ValueError("the DFT dataset has no pristine supercell energy")
    charges = sorted(float(analysis.charge_label(q)) for q in reference["defects"])
    setup = {
        "cell": host.cell[:].tolist(),
        "pristine_positions": host.positions.tolist(),
        "pristine_symbols": host.get_chemical_symbols(),
        "site": int(values["site"]),
        "element": values["element"],
        "charges": charges,
        "vbm": edges["vbm"],
        "cbm": edges["cbm"],
        "dielectric_constant": float(values.get("dielectric_constant", 1.0)),
        "chemical_potentials": values.get("chemical_potentials") or {},
        "free_atom_energy": values.get("free_atom_energy"),
        "shell_tolerance": float(values.get("shell_tolerance", 0.1)),
        "fermi_points": int(values.get("fermi_points", 201)),
        "sigmas": values.get("sigmas") or {},
    }
    if PRISTINE in found:
        setup["potentials"] = {
            "host": found[PRISTINE],
            "defects": {q: found[vacancy_key(q)] for q in charges if vacancy_key(q) in found},
        }
    models, skipped = {}, {"dft": notes}
    for label, node in sorted(predictions.items()):
        selected, model_notes = analysis.select_frames(node.to_ase(), keys, fallback_order=order)
        skipped[label] = model_notes
        if selected["host"] is None:
            continue
        selected["defects"] = {q: a for q, a in selected["defects"].items() if q in charges}
        models[label] = selected
    result = analysis.analyse_vacancy(reference, models, setup)
    result["analysis"]["skipped"] = skipped
    result["analysis"]["band_edges"] = edges
    for label in predictions:
        if label not in models:
            result["comparison"][label] = {
                "error": "no usable pristine prediction",
                "skipped": skipped[label],
            }
        else:
            result["comparison"][label]["skipped"] = skipped[label]
    return {
        "analysis": orm.Dict(result["analysis"]),
        "comparison": orm.Dict(result["comparison"]),
        "band_edges": orm.Dict(edges),
    }


@calcfunction
def defect_figures(analysis_node: orm.Dict) -> dict[str, orm.SinglefileData]:
    """The formation-energy diagram, the ΔE(q) parity plot and the charge profiles as PNG files."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_figures(analysis_node.get_dict(), Path(tmp))
        return {name: orm.SinglefileData(file=str(path), filename=path.name) for name, path in paths.items()}


# ----------------------------------------------------------------------------- model-relaxed geometries


@calcfunction
def vacancy_subset(configurations: EmlipDatasetData) -> EmlipDatasetData:
    """The vacancy cells (every charge state) of a model's inputs, without the pristine cell."""
    frames = [a for a in configurations.to_ase() if str(a.info.get("key", "")).startswith("vacancy_")]
    return EmlipDatasetData(frames=frames)


def relaxed_key(label: str, key: str) -> str:
    """Key of the DFT single point at ``label``'s relaxed geometry of vacancy state ``key``."""
    return f"relaxed_{label}_{key}"


@calcfunction
def relaxed_structures(**relaxed: EmlipDatasetData) -> dict[str, orm.StructureData]:
    """Every model's relaxed vacancy cells as structures, keyed by :func:`relaxed_key`."""
    structures = {}
    for label, node in relaxed.items():
        for atoms in node.to_ase():
            cell = atoms.copy()
            cell.pbc = True
            structures[relaxed_key(label, str(atoms.info["key"]))] = orm.StructureData(ase=cell)
    return structures


@calcfunction
def analyse_relaxed_vacancy(settings: orm.Dict, dft: EmlipDatasetData, **nodes: orm.Data) -> orm.Dict:
    """Per model: relaxation energies against DFT's along the same displacement, ΔE(q) at its geometries.

    ``nodes``: ``relaxed_dft`` (the single points at every model's geometries), ``relaxed_<label>``
    (the model's relaxations) and ``predictions_<label>`` (its unrelaxed single points).
    ``settings``: ``charges``.
    """
    from aiida_emlip.analysis.defect_relax import relaxed_energetics

    charges = [int(q) for q in settings["charges"]]
    by_key = {str(a.info.get("key")): a for a in dft.to_ase()}
    dft_relaxed_frames = {str(a.info.get("key")): a for a in nodes["relaxed_dft"].to_ase()}
    result = {}
    for name, node in nodes.items():
        if not name.startswith("relaxed_") or name == "relaxed_dft":
            continue
        label = name[len("relaxed_") :]
        unrelaxed = {str(a.info.get("key")): a for a in nodes[f"predictions_{label}"].to_ase()}
        relaxed = {str(a.info.get("key")): a for a in node.to_ase()}
        result[label] = relaxed_energetics(
            charges,
            {q: relaxed.get(vacancy_key(q)) for q in charges},
            {q: dft_relaxed_frames.get(relaxed_key(label, vacancy_key(q))) for q in charges},
            {q: unrelaxed.get(vacancy_key(q)) for q in charges},
            {q: by_key.get(vacancy_key(q)) for q in charges},
        )
    return orm.Dict(result)
