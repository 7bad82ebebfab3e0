"""Calcfunctions of the study's active learning: choose MD frames, merge their labels, record the rounds.

The selection and the merge are calcfunctions so that every configuration a round adds can be traced to
the MD frame it came from, the committee that scored it and the DFT run that labelled it. The scoring
itself is pure (:mod:`aiida_emlip.analysis.active_learning`).
"""

from __future__ import annotations

from typing import Any

from aiida import orm
from aiida.engine import calcfunction
from ase import Atoms

from aiida_emlip.analysis import active_learning as al
from aiida_emlip.data import EmlipDatasetData
from aiida_emlip.workflows.study_functions import RUN_SPECIFIC


def _prefixed(nodes: dict[str, orm.Data], prefix: str) -> dict[str, orm.Data]:
    return {k[len(prefix) :]: v for k, v in nodes.items() if k.startswith(prefix)}


@calcfunction
def select_active(trajectory: EmlipDatasetData, settings: orm.Dict, **nodes: orm.Data) -> dict[str, orm.Data]:
    """Score the MD frames and choose the ones to label; one ``StructureData`` per chosen frame.

    ``nodes``: ``member_<i>`` (a committee member's single points on the trajectory, same order),
    ``stopped`` (final frames of MD runs stopped by a non-converged SCF) and ``source_<key>`` (the
    ``StructureData`` of each training configuration an MD run started from: the new structures take its
    cell and periodicity). ``settings``: ``selection``, ``uncertainty``, ``per_round``, ``min_spacing``,
    ``round`` and ``sources`` (key → the DFT settings of that configuration: charge, config type, pw.x
    parameters). Outputs: ``scores`` (one row per candidate with its status, the chosen keys),
    ``settings`` (the dataset workchain's ``structure_settings``) and ``c_<key>`` per chosen frame.
    """
    values = settings.get_dict()
    frames = trajectory.to_ase()
    if values["selection"] == "committee":
        members = [node.to_ase() for _, node in sorted(_prefixed(nodes, "member_").items())]
        candidates = al.committee_candidates(frames, members, values["uncertainty"])
    else:  # a stopped run's last frame follows the trajectory (its index counts on from there)
        stopped = nodes["stopped"].to_ase() if "stopped" in nodes else []
        candidates = al.scf_candidates(frames, stopped)
        frames = frames + stopped
    chosen, rows = al.choose(candidates, int(values["per_round"]), int(values["min_spacing"]))
    sources = _prefixed(nodes, "source_")
    out: dict[str, orm.Data] = {}
    structure_settings: dict[str, Any] = {}
    keys: dict[int, str] = {}
    for j, candidate in enumerate(chosen):
        key = f"{candidate.source}_al{int(values['round'])}_{j:02d}"
        keys[candidate.index] = key
        base = sources[candidate.source].get_ase()
        atoms = Atoms(frames[candidate.index].numbers, frames[candidate.index].positions)
        atoms.set_cell(base.cell)
        atoms.set_pbc(base.pbc)
        out[f"c_{key}"] = orm.StructureData(ase=atoms)
        structure_settings[key] = dict(values["sources"][candidate.source])
    for row in rows:
        if row["index"] in keys:
            row["key"] = keys[row["index"]]
    out["scores"] = orm.Dict(
        {
            "round": int(values["round"]),
            "selection": values["selection"],
            "uncertainty": values.get("uncertainty") if values["selection"] == "committee" else "scf",
            "candidates": rows,
            "chosen": [keys[c.index] for c in chosen],
            "summary": al.uncertainty_summary(rows),
        }
    )
    out["settings"] = orm.Dict(structure_settings)
    return out


@calcfunction
def merge_active(
    training_set: EmlipDatasetData, labels: EmlipDatasetData, settings: orm.Dict
) -> EmlipDatasetData:
    """The training set with a round's new labels (run-specific metadata left out, origin recorded).

    ``settings``: ``round``, ``held_out_keys`` (refused) and ``origins`` (key → source, md_step, score).
    """
    values = settings.get_dict()
    labelled = labels.to_ase()
    for atoms in labelled:
        for name in RUN_SPECIFIC:
            atoms.info.pop(name, None)
    frames = al.merge_labels(
        training_set.to_ase(), labelled, values["held_out_keys"], values["origins"], int(values["round"])
    )
    return EmlipDatasetData(frames=frames, dft_settings=training_set.dft_settings)


@calcfunction
def record_active_learning(held_out: EmlipDatasetData, settings: orm.Dict, **nodes: orm.Data) -> orm.Dict:
    """The ``active_learning`` record: per round the chosen frames' uncertainty, every design's held-out
    error and the pw.x runs spent.

    ``nodes``: ``scores_r<n>`` (of :func:`select_active`) and ``predictions_r<n>_<design>`` (held-out
    predictions after round n; round 0: before any). ``settings``: ``rounds`` (a list of per-round
    entries: round, dft_calls, labelled, failed, training_size, models, md, ...), the rest as recorded.
    """
    values = settings.get_dict()
    reference = held_out.to_ase()
    rounds = []
    for entry in values.pop("rounds"):
        number = int(entry["round"])
        predictions = {
            label: node.to_ase() for label, node in _prefixed(nodes, f"predictions_r{number}_").items()
        }
        entry = dict(entry)
        entry["test_error"] = al.held_out_rmse(reference, predictions)
        scores = nodes.get(f"scores_r{number}")
        if scores is not None:
            data = scores.get_dict()
            entry["selected"] = [row for row in data["candidates"] if row["status"] == al.SELECTED]
            entry["uncertainty"] = data["summary"]
            entry["candidates"] = data["candidates"]
        rounds.append(entry)
    model = values.get("model")
    errors = [(r["round"], (r["test_error"].get(model) or {}).get("energy")) for r in rounds]
    record = {
        **values,
        "rounds": rounds,
        "rounds_run": max((r["round"] for r in rounds), default=0),
        "dft_calls": sum(int(r.get("dft_calls") or 0) for r in rounds),
        "model_energy_error": [e for _, e in errors],
    }
    return orm.Dict(record)


@calcfunction
def stopped_frames(predictions: EmlipDatasetData, settings: orm.Dict) -> EmlipDatasetData:
    """The final frames (``settings.indices``) of MD runs that stopped on a non-converged SCF."""
    frames = predictions.to_ase()
    return EmlipDatasetData(frames=[frames[int(i)] for i in settings.get_dict()["indices"]])
