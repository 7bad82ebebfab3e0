"""Calcfunctions of the response workchain: the probe structures, the model polarisability, the analysis,
the figures (provenance). The physics is in :mod:`aiida_emlip.analysis.response` and
:mod:`aiida_emlip.analysis.verdicts` (pure)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from aiida import orm
from aiida.engine import calcfunction

from aiida_emlip import schema
from aiida_emlip.analysis import response as analysis
from aiida_emlip.analysis import verdicts
from aiida_emlip.data import EmlipDatasetData
from aiida_emlip.data.model import EmlipModelData
from aiida_emlip.structures.response import model_cell, probe_configurations


@calcfunction
def response_structures(settings: orm.Dict, **slabs: orm.StructureData) -> dict[str, orm.Data]:
    """The probes' configurations: ``configurations`` (DFT cells), ``model_configurations`` (the same,
    open along their vacuum axes, as the models see them) and ``setup`` (probe metadata by key).

    ``slabs`` may hold ``metal`` and ``water``, used instead of the protocol's builders.
    """
    metal = slabs["metal"].get_ase() if "metal" in slabs else None
    water = slabs["water"].get_ase() if "water" in slabs else None
    frames, setup = probe_configurations(settings.get_dict(), metal, water)
    model_frames = []
    for atoms in frames:
        copy = model_cell(atoms)
        copy.info = dict(atoms.info)
        model_frames.append(copy)
    return {
        "configurations": EmlipDatasetData(frames=frames),
        "model_configurations": EmlipDatasetData(frames=model_frames),
        "setup": orm.Dict(setup),
    }


@calcfunction
def model_polarizabilities(model: EmlipModelData, configurations: EmlipDatasetData) -> orm.Dict:
    """α along the field axis (e·Å²/V) by autograd through the field, per chain size: ``{"N": α}``.

    Only the ``chain<N>_p`` configurations of the polarisability probe are used (zero for heads
    without the ``polarizability`` capability).
    """
    from aiida_emlip.models.response import polarizability

    loaded = model.load(device="cpu")
    result = {}
    for atoms in configurations.to_ase():
        key = str(atoms.info.get("key", ""))
        if key.startswith("chain") and key.endswith("_p"):
            n = key[len("chain") : -len("_p")]
            atoms.info[schema.TOTAL_CHARGE] = 0.0
            result[n] = float(polarizability(loaded, atoms)[0, 0])
    return orm.Dict(result)


def probe_key(key: str, keys: list[str]) -> str:
    """The configuration key of a dataset-workchain key (it names them c0000, c0001, ... in order)."""
    if key not in keys and key.startswith("c") and key[1:].isdigit() and int(key[1:]) < len(keys):
        return keys[int(key[1:])]
    return key


def dft_frames(dft: EmlipDatasetData, configurations: EmlipDatasetData) -> dict:
    """DFT frames by probe key (see :func:`probe_key`)."""
    keys = [str(a.info["key"]) for a in configurations.to_ase()]
    frames = {}
    for atoms in dft.to_ase():
        key = probe_key(str(atoms.info.get("key", "")), keys)
        atoms.info["key"] = key
        frames[key] = atoms
    return frames


@calcfunction
def analyse_response_probes(
    setup: orm.Dict,
    settings: orm.Dict,
    dft: EmlipDatasetData,
    configurations: EmlipDatasetData,
    **nodes: orm.Data,
) -> dict[str, orm.Dict]:
    """Every probe's numbers for DFT and each model, and the design verdict table.

    ``nodes``: ``predictions_<label>`` (``emlip.dataset``) and ``autograd_<label>`` (Dict) per model.
    ``settings``: ``models`` (labels), ``tolerances``, ``skipped`` ({label: {column: reason}}).
    """
    values = settings.get_dict()
    methods = {"dft": dft_frames(dft, configurations)}
    autograd = {}
    for name, node in nodes.items():
        if name.startswith("predictions_"):
            label = name[len("predictions_") :]
            methods[label] = {str(a.info["key"]): a for a in node.to_ase() if "key" in a.info}
        elif name.startswith("autograd_"):
            autograd[name[len("autograd_") :]] = node.get_dict()
    result = analysis.analyse_response(setup.get_dict(), methods, autograd)
    probes = dict(result["probes"])
    columns = {}
    for probe, per_method in probes.items():
        columns[probe] = per_method
    table = verdicts.verdict_table(
        columns, list(values["models"]), values.get("tolerances"), values.get("skipped")
    )
    # columns of requested probes that no method could fill still appear, with their reasons
    for column in values.get("columns", []):
        if column not in table["columns"]:
            table["columns"].append(column)
            table["dft"][column] = {"value": None, "note": "no results"}
            for label in table["rows"]:
                reason = (values.get("skipped") or {}).get(label, {}).get(column, "no results")
                table["rows"][label][column] = {
                    "value": None,
                    "unit": "",
                    "verdict": verdicts.SKIPPED,
                    "reason": reason,
                }
    table["text"] = verdicts.format_table(table)
    return {"analysis": orm.Dict(result), "verdicts": orm.Dict(table)}


@calcfunction
def response_figures(analysis_node: orm.Dict) -> dict[str, orm.SinglefileData]:
    """Induced dipole vs field, μ vs Q, fragment charge vs distance and α vs N as PNG files."""
    from aiida_emlip.report.figures_response import write_figures

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_figures(analysis_node.get_dict(), Path(tmp))
        return {name: orm.SinglefileData(file=str(path), filename=path.name) for name, path in paths.items()}
