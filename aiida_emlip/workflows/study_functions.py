"""Calcfunctions of the study: sample the systems, split off the held-out set, compare, write the report.

Each is a calcfunction so that every number of the comparison and every figure of the report is in the
provenance graph, traceable to the DFT labels and the models it came from.
"""

from __future__ import annotations

import io
from typing import Any

from aiida import orm
from aiida.engine import calcfunction

from aiida_emlip.analysis import study as analysis
from aiida_emlip.data import EmlipDatasetData
from aiida_emlip.data.dataset import EXECUTION_KEYS, PROFILE_KEYS, dft_settings_digest
from aiida_emlip.spec_systems import system_frames

#: Per-configuration metadata that names a particular run (the pw.x calculation's UUID, its wall time):
#: left out of the training and held-out sets, so that identical labels make identical training inputs
#: and a rerun finds its trainings in the cache (also in another profile, where an imported computer is
#: relabelled: the split sets name the DFT code without its computer, and without its UUID, which a
#: code set up again in another profile does not share). The ``dataset`` output keeps them.
RUN_SPECIFIC = ("source_uuid", "pw_wall_time")
#: pw.x setting of an ``isolated: true`` system (a molecule in open space).
ISOLATED = {"SYSTEM": {"assume_isolated": "mt"}}


@calcfunction
def sample_study(systems: orm.Dict) -> dict[str, orm.Data]:
    """One ``StructureData`` per configuration (``c_<key>``) and their ``settings``.

    ``settings``: key → total charge, config type, pw.x parameters and geometry.
    """
    out: dict[str, orm.Data] = {}
    settings: dict[str, Any] = {}
    for name, system in systems.get_dict().items():
        parameters: dict[str, Any] = {}
        if system.get("isolated"):
            parameters = {k: dict(v) for k, v in ISOLATED.items()}
        for namelist, entries in (system.get("parameters") or {}).items():
            parameters.setdefault(namelist, {}).update(entries)
        for key, geometry, atoms in system_frames(name, system):
            out[f"c_{key}"] = orm.StructureData(ase=atoms)
            entry = {
                "total_charge": float(atoms.info["total_charge"]),
                "config_type": name,
                "geometry": geometry,
            }
            if parameters:
                entry["parameters"] = parameters
            settings[key] = entry
    out["settings"] = orm.Dict(settings)
    return out


@calcfunction
def split_study(dataset: EmlipDatasetData, settings: orm.Dict) -> dict[str, orm.Data]:
    """``training_set`` and ``held_out_set`` (whole geometries held out) and the ``split`` record.

    ``settings``: ``held_out_geometries`` (list), ``geometry_of`` (key → geometry) and
    ``structure_uuids`` (key → the UUID of the sampled ``StructureData``).
    """
    values = settings.get_dict()
    held = set(values["held_out_geometries"])
    geometry_of = values["geometry_of"]
    training, held_out = [], []
    for atoms in dataset.to_ase():
        for name in RUN_SPECIFIC:
            atoms.info.pop(name, None)
        key = str(atoms.info.get("key"))
        (held_out if geometry_of.get(key) in held else training).append(atoms)
    uuids = values.get("structure_uuids", {})
    record = {
        "held_out_geometries": sorted(held),
        "held_out_keys": sorted(str(a.info["key"]) for a in held_out),
        "training_keys": sorted(str(a.info["key"]) for a in training),
        "held_out_structures": {str(a.info["key"]): uuids.get(str(a.info["key"])) for a in held_out},
        "training_structures": {str(a.info["key"]): uuids.get(str(a.info["key"])) for a in training},
        "dataset": dataset.uuid,
        "rule": "whole geometries (every charge state of one geometry) are held out; "
        "they are never in any design's training or validation set",
    }
    # the same training inputs in every profile, however pw.x ran in parallel
    omitted = PROFILE_KEYS | EXECUTION_KEYS
    dft = {key: value for key, value in dataset.dft_settings.items() if key not in omitted}
    if "code" in dft:  # the program, not the computer's label (an imported computer is renamed)
        dft["code"] = str(dft["code"]).split("@", 1)[0]
        if "digest" in dft:
            dft["digest"] = dft_settings_digest({k: v for k, v in dft.items() if k != "digest"})
    return {
        "training_set": EmlipDatasetData(frames=training, dft_settings=dft),
        "held_out_set": EmlipDatasetData(frames=held_out, dft_settings=dft),
        "split": orm.Dict(record),
    }


def _by_prefix(nodes: dict[str, orm.Data], prefix: str) -> dict[str, orm.Data]:
    return {k[len(prefix) :]: v for k, v in nodes.items() if k.startswith(prefix)}


@calcfunction
def compare_study(held_out: EmlipDatasetData, settings: orm.Dict, **nodes: orm.Data) -> orm.Dict:
    """One row per design: held-out errors, training cost, cost per MD step, validation summaries.

    ``nodes``: ``predictions_<design>``, ``metrics_<design>``, ``evaluation_<design>`` (summary) and
    ``validation_<name>`` (a validation's comparison; its DFT values of the summary metrics go to
    ``validation_references``), and ``active_learning`` (the record of the rounds,
    if any). ``settings``: ``designs`` (label → head and preset), ``split`` (the record) and
    ``validation_summaries`` (name → metric names).
    """
    from aiida_emlip.analysis import active_learning
    from aiida_emlip.workflows.study_registry import VALIDATIONS

    values = settings.get_dict()
    reference = held_out.to_ase()
    predictions = _by_prefix(nodes, "predictions_")
    metrics = _by_prefix(nodes, "metrics_")
    evaluations = _by_prefix(nodes, "evaluation_")
    validations = {k: VALIDATIONS[k].table(v.get_dict()) for k, v in _by_prefix(nodes, "validation_").items()}
    designs: dict[str, Any] = {}
    for label, design in values["designs"].items():
        row: dict[str, Any] = {"head": design.get("head"), "preset": design.get("preset")}
        if label in predictions:
            row["held_out"] = analysis.held_out_errors(reference, predictions[label].to_ase())
        if label in metrics:
            row["training"] = analysis.training_cost(metrics[label].get_dict())
        if label in evaluations:
            row["cost_per_md_step_ms"] = analysis.md_step_cost_ms(evaluations[label].get_dict())
        row["validations"] = {
            name: VALIDATIONS[name].summary(table[label])
            for name, table in validations.items()
            if isinstance(table.get(label), dict)
        }
        designs[label] = row
    verdict = analysis.verdict(designs)
    references = {name: VALIDATIONS[name].reference(table) for name, table in validations.items()}
    for name in validations:
        verdict += analysis.validation_verdict(
            name,
            {d: row["validations"][name] for d, row in designs.items() if name in row["validations"]},
            references[name],
        )
    out = {
        "designs": designs,
        "validations": validations,
        "validation_references": references,
        "verdict": verdict,
        "split": values.get("split", {}),
        "units": analysis.UNITS,
        "held_out_size": len(reference),
    }
    if "active_learning" in nodes:
        record = nodes["active_learning"].get_dict()
        out["active_learning"] = active_learning.summary(record)
        out["verdict"] = verdict + active_learning.verdict(record)
    return orm.Dict(out)


@calcfunction
def study_report(
    comparison: orm.Dict, provenance: orm.Dict, held_out: EmlipDatasetData, **nodes
) -> orm.FolderData:
    """The static HTML report (``index.html`` and its PNG figures) as a ``FolderData``.

    ``nodes``: ``predictions_<design>``, ``metrics_<design>`` and ``figure_<name>`` (PNG files of the
    validations, shown as they are).
    """
    from aiida_emlip.report.html import render_report
    from aiida_emlip.report.study_figures import study_figures

    reference = held_out.to_ase()
    predictions = {k: v.to_ase() for k, v in _by_prefix(nodes, "predictions_").items()}
    histories = {k: v.get_dict().get("history") or [] for k, v in _by_prefix(nodes, "metrics_").items()}
    data = comparison.get_dict()
    figures = study_figures(data, histories, reference, predictions)
    for name, node in _by_prefix(nodes, "figure_").items():
        with node.open(mode="rb") as handle:
            figures[f"validation_{name}"] = handle.read()
    files = render_report(data, figures, provenance.get_dict())
    folder = orm.FolderData()
    for name, content in files.items():
        folder.base.repository.put_object_from_filelike(io.BytesIO(content), name)
    return folder
