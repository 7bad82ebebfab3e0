"""``emlip-eval`` from end to end: read, predict / relax / run MD, write predictions and the summary."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
from ase import Atoms

from aiida_emlip import schema
from aiida_emlip.training.data import Sample, read_structures
from aiida_emlip.training.dynamics import DynamicsResult, Frame, check_structure, molecular_dynamics, relax
from aiida_emlip.training.errors import NonFiniteError, RelaxNotConvergedError, ScfFailedError
from aiida_emlip.training.eval_params import EvalParameters
from aiida_emlip.training.evaluate import (
    PER_ATOM,
    Prediction,
    file_sha256,
    load_for_inference,
    predict_samples,
    read_samples,
)
from aiida_emlip.training.losses import ErrorTable, format_table

#: Prediction key → schema key of the predictions file written with ``schema_keys``.
SCHEMA_KEYS = {
    "energy": schema.ENERGY,
    "forces": schema.FORCES,
    "stress": schema.STRESS,
    "charges": schema.CHARGES,
    "dipoles": schema.ATOMIC_DIPOLES,
    "dipole": schema.DIPOLE,
    "fermi_level": schema.FERMI_LEVEL,
}
#: Input ``atoms.info`` entries that are carried over to the predictions (besides the conditions).
CARRIED_INFO = (schema.CONFIG_TYPE, "key")


@dataclass
class EvalReport:
    """What ``run_evaluation`` wrote and found; :meth:`raise_on_failure` maps it to the exit status."""

    output: Path
    summary_path: Path
    trajectory_path: Path | None
    summary: dict[str, Any]
    table: str = ""
    failures: dict[str, list[int]] = field(default_factory=dict)
    non_finite: dict[int, list[str]] = field(default_factory=dict)  # structure → NaN/inf outputs

    def raise_on_failure(self) -> None:
        """Non-finite (3) before SCF not converged (5) before relaxation not converged (6)."""
        where = f"results written to {self.output} and {self.summary_path}"
        if self.failures.get("non_finite"):
            which = "; ".join(
                f"structure {i}: {', '.join(self.non_finite.get(i) or ['outputs'])}"
                for i in self.failures["non_finite"]
            )
            raise NonFiniteError(f"non-finite (NaN or inf) predictions for {which}; {where}")
        if self.failures.get("scf"):
            raise ScfFailedError(
                f"the SCF did not converge for structure(s) {self.failures['scf']} "
                f"(flagged scf_converged=False); {where}"
            )
        if self.failures.get("relax"):
            raise RelaxNotConvergedError(
                f"the relaxation did not reach fmax for structure(s) {self.failures['relax']} "
                f"(flagged relax_converged=False); {where}"
            )


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def annotate(atoms: Atoms, values: dict[str, np.ndarray], prefix: str | None) -> None:
    """Store predictions on ``atoms``: under schema keys (``prefix`` None) or as ``PREFIX_key``."""
    if prefix is None:
        for key in (schema.FERMI_LEVEL, schema.FERMI_REFERENCE):
            atoms.info.pop(key, None)  # a DFT μ is never presented as the model's
    for key, value in values.items():
        name = SCHEMA_KEYS[key] if prefix is None else f"{prefix}_{key}"
        value = np.asarray(value, dtype=float)
        if key in PER_ATOM:
            atoms.arrays[name] = value
        elif value.ndim == 0:
            atoms.info[name] = float(value)
        else:  # ASE's extxyz writer wants arrays under schema keys (stress), lists elsewhere
            atoms.info[name] = value if prefix is None else value.tolist()
    if prefix is None and "fermi_level" in values:
        atoms.info[schema.FERMI_REFERENCE] = "model"


def _base_atoms(source: Atoms, atoms: Atoms) -> Atoms:
    """``atoms`` (geometry and conditions) with the carried-over info entries of ``source``."""
    out = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    out.info.update(atoms.info)
    for key in CARRIED_INFO:
        if key in source.info:
            out.info[key] = source.info[key]
    return out


def _metadata(atoms: Atoms, meta: dict[str, Any]) -> None:
    for key, value in meta.items():
        if value is not None:
            atoms.info[key] = value


def _write(path: Path, frames: list[Atoms]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(path, frames, format="extxyz")


def run_evaluation(
    model_path: str | Path,
    data_path: str | Path,
    output: str | Path,
    params: EvalParameters,
    prefix: str = "emlip",
    schema_keys: bool = False,
    keys: dict[str, str] | None = None,
    errors_json: str | Path | None = None,
    summary_json: str | Path | None = None,
    trajectory: str | Path | None = None,
) -> EvalReport:
    """Run ``params.mode`` on every structure of ``data_path``; write every output before judging.

    ``schema_keys`` writes predictions under the schema's keys (labels of the input dropped), as the
    ``emlip.evaluate`` calculation stores them; otherwise as ``PREFIX_key`` beside the input's labels.
    """
    start = time.perf_counter()
    output = Path(output)
    summary_path = Path(summary_json) if summary_json else output.with_name(output.stem + "_summary.json")
    trajectory_path = Path(trajectory) if trajectory else output.with_name(output.stem + "_traj.xyz")
    model = load_for_inference(model_path, params.device, params.kernels)
    sha256 = file_sha256(model_path)
    originals = read_structures(data_path)
    samples = read_samples(data_path, model, keys)
    options = params.relax if params.mode == "relax" else params.md
    relax_cell = bool(params.relax and params.relax.relax_cell)
    for s in samples:  # bad constraints or a cell relaxation of a molecule: refused before any compute
        if params.mode != "single_point":
            check_structure(s.atoms, params.constraints, relax_cell, f"{data_path}, structure {s.index}")
    loaded = time.perf_counter()

    table = ErrorTable()
    runs: list[DynamicsResult | None] = [None] * len(samples)
    timings = [0.0] * len(samples)
    if params.mode == "single_point":
        predictions = predict_samples(model, samples, params.batch_size, table)
        timings = [(time.perf_counter() - loaded) / max(1, len(samples))] * len(samples)
    else:
        from aiida_emlip.models.calculator import EmlipCalculator

        calc = EmlipCalculator(model, device=str(model.device))  # the device chosen above, not 'auto'
        run = relax if params.mode == "relax" else molecular_dynamics
        for i, s in enumerate(samples):
            tick = time.perf_counter()
            runs[i] = run(s.atoms, calc, options, params.constraints, f"{data_path}, structure {s.index}")
            timings[i] = time.perf_counter() - tick
        finals = [Sample(r.atoms, {}, s.config_type, s.total_charge, s.index) for r, s in zip(runs, samples)]
        predictions = predict_samples(model, finals, params.batch_size)
    computed = time.perf_counter()

    name_prefix = None if schema_keys else prefix
    written, trajectory_frames, rows = [], [], []
    failures: dict[str, list[int]] = {"non_finite": [], "scf": [], "relax": []}
    for i, (source, sample, pred, result) in enumerate(zip(originals, samples, predictions, runs)):
        if result is None:
            atoms = _base_atoms(source, sample.atoms) if schema_keys else source.copy()
        else:
            atoms = _base_atoms(source, result.atoms)
        annotate(atoms, pred.values, name_prefix)
        row = _structure_row(i, source, pred, result, timings[i])
        meta = {"model_sha256": sha256, "eval_mode": params.mode}
        meta.update({k: row[k] for k in ("scf_converged", "scf_iterations")})
        if result is not None:
            meta.update(result.final_meta)
            for frame in result.frames:
                trajectory_frames.append(
                    _frame_atoms(source, frame, pred, i, sha256, params.mode, name_prefix)
                )
        _metadata(atoms, meta)
        written.append(atoms)
        rows.append(row)
        if not row["finite"]:
            failures["non_finite"].append(i)
        if row["scf_converged"] is False:
            failures["scf"].append(i)
        if result is not None and result.relax is not None and not result.relax["converged"]:
            failures["relax"].append(i)
    _write(output, written)
    if trajectory_frames:
        _write(trajectory_path, trajectory_frames)
    errors = table.summary()
    if errors_json is not None:
        Path(errors_json).write_text(json.dumps(errors, indent=2))
    summary = {
        "mode": params.mode,
        "parameters": {**params.to_dict(), "device": str(model.device)},
        "model": {"file": Path(model_path).name, "sha256": sha256, "head": model.config.head.get("name")},
        "data": Path(data_path).name,
        "n_structures": len(samples),
        "n_atoms": int(sum(len(s.atoms) for s in samples)),
        "n_scf_not_converged": len(failures["scf"]),
        "n_relax_not_converged": len(failures["relax"]),
        "n_non_finite": len(failures["non_finite"]),
        "outputs": {
            "predictions": output.name,
            "trajectory": trajectory_path.name if trajectory_frames else None,
            "n_trajectory_frames": len(trajectory_frames),
        },
        "structures": rows,
        "errors": errors,
        "timings": {
            "load_s": loaded - start,
            "compute_s": computed - loaded,
            "write_s": time.perf_counter() - computed,
            "total_s": time.perf_counter() - start,
        },
    }
    summary = _finite_or_none(summary)
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2))
    if errors:
        text = format_table(errors, f"errors of {Path(model_path).name} on {Path(data_path).name}")
    else:
        text = "no labels to compare with" if params.mode == "single_point" else ""
    return EvalReport(
        output,
        summary_path,
        trajectory_path if trajectory_frames else None,
        summary,
        text,
        {k: v for k, v in failures.items() if v},
        {row["index"]: row["non_finite"] for row in rows if row["non_finite"]},
    )


def _structure_row(
    index: int, source: Atoms, pred: Prediction, result: DynamicsResult | None, wall_s: float
) -> dict[str, Any]:
    """One structure's entry of the summary."""
    scf_converged, scf_iterations = pred.scf_converged, pred.scf_iterations
    finite = pred.finite
    non_finite = pred.non_finite
    if result is not None:
        # a run is converged only when every step's SCF was (and finite only when every step was)
        if result.scf_converged is not None:
            scf_converged = bool(result.scf_converged and (scf_converged is not False))
            scf_iterations = max(result.scf_iterations or 0, scf_iterations or 0)
        finite = finite and result.finite
        non_finite += [q for q in result.non_finite if q not in non_finite]
    energy = pred.values.get("energy")
    row: dict[str, Any] = {
        "index": index,
        "key": source.info.get("key"),
        "n_atoms": len(source),
        "energy": None if energy is None else float(energy),
        "fermi_level": float(pred.values["fermi_level"]) if "fermi_level" in pred.values else None,
        "scf_converged": scf_converged,
        "scf_iterations": scf_iterations,
        "finite": bool(finite),
        "non_finite": non_finite,
        "wall_s": wall_s,
    }
    if result is not None:
        row["stop_reason"] = result.stop_reason
        if result.relax is not None:
            row["relax"] = result.relax
        if result.md is not None:
            row["md"] = result.md
    return row


def _frame_atoms(
    source: Atoms, frame: Frame, pred: Prediction, index: int, sha256: str, mode: str, prefix: str | None
) -> Atoms:
    """A trajectory frame with the outputs the final prediction has (e.g. no charges for ``sr``)."""
    atoms = _base_atoms(source, frame.atoms)
    annotate(atoms, {k: v for k, v in frame.values.items() if k in pred.values}, prefix)
    _metadata(atoms, {"model_sha256": sha256, "eval_mode": mode, "structure_index": index, **frame.meta})
    return atoms
