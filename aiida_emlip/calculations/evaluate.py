"""``emlip.evaluate``: run ``emlip-eval`` (single points, relaxations, MD) on any AiiDA computer."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from aiida import orm
from aiida.common.datastructures import CalcInfo, CodeInfo
from aiida.common.folders import Folder
from aiida.engine import CalcJob, CalcJobProcessSpec
from aiida.engine.processes.calcjobs.calcjob import validate_calc_job
from ase import Atoms

from aiida_emlip import schema
from aiida_emlip.cache_version import cache_version
from aiida_emlip.data.dataset import EmlipDatasetData
from aiida_emlip.data.model import EmlipModelData
from aiida_emlip.extxyz import frames_to_text

MODEL_FILE = "model.safetensors"
STRUCTURES_FILE = "structures.xyz"
PARAMETERS_FILE = "parameters.json"
PREDICTIONS_FILE = "predictions.xyz"
SUMMARY_FILE = "summary.json"
TRAJECTORY_FILE = "trajectory.xyz"
STATUS_FILE = "exit_status"
#: Per-structure conditions a ``conditions`` entry may set (schema keys; field in V/Å, μ in eV).
CONDITION_KEYS = (schema.TOTAL_CHARGE, schema.TOTAL_SPIN, schema.EXTERNAL_FIELD, schema.FERMI_LEVEL)


def validate_parameters(value: orm.Dict | None, _: Any) -> str | None:
    """Check the parameters exactly as ``emlip-eval`` will, so that bad ones fail before submission."""
    from aiida_emlip.training.errors import ConfigError
    from aiida_emlip.training.eval_params import parse_parameters

    if value is None:
        return None
    try:
        parse_parameters(value.get_dict())
    except ConfigError as exc:
        return f"parameters: {exc}"
    return None


def _check_conditions(conditions: dict[str, Any], labels: set[str]) -> str | None:
    for label, entry in conditions.items():
        if label not in labels:
            return f"conditions: {label!r} is not a label of the structures namespace ({sorted(labels)})"
        if not isinstance(entry, dict):
            return f"conditions.{label} must be a mapping of {list(CONDITION_KEYS)}"
        unknown = sorted(set(entry) - set(CONDITION_KEYS))
        if unknown:
            return f"conditions.{label}: unknown key(s) {unknown}; known: {list(CONDITION_KEYS)}"
        for key, value in entry.items():
            shape = schema.label(key).shape
            try:
                array = np.asarray(value, dtype=float)
            except (TypeError, ValueError):
                return f"conditions.{label}.{key} must be numeric, got {value!r}"
            if array.shape != shape or not np.isfinite(array).all():
                kind = "3-vector" if shape else "number"
                return f"conditions.{label}.{key} must be a finite {kind}, got {value!r}"
    return None


def validate_inputs(inputs: Mapping[str, Any], ctx: Any) -> str | None:
    """Exactly one source of structures; conditions match its labels; the model knows every element."""
    message = validate_calc_job(inputs, ctx)
    if message:
        return message
    dataset, structures = inputs.get("dataset"), dict(inputs.get("structures") or {})
    if (dataset is None) == (not structures):
        return "give either 'dataset' (emlip.dataset) or the 'structures' namespace, not both or neither"
    conditions = inputs.get("conditions")
    if conditions is not None:
        if dataset is not None:
            return "'conditions' apply to the 'structures' namespace; an emlip.dataset carries its own"
        message = _check_conditions(conditions.get_dict(), set(structures))
        if message:
            return message
    model = inputs.get("model")
    if model is not None:
        known = set(model.base.attributes.get("elements", []))
        if dataset is not None:
            present = set(dataset.elements)
        else:
            present = {kind.symbol for s in structures.values() for kind in s.kinds}
        if known and present - known:
            return (
                f"the structures contain elements {sorted(present - known)} "
                f"the model does not know ({sorted(known)})"
            )
    return None


def structures_to_frames(
    structures: Mapping[str, orm.StructureData], conditions: Mapping[str, Any]
) -> list[Atoms]:
    """The namespace as ASE frames in label order, each with ``key`` = its label and its conditions."""
    frames = []
    for label in sorted(structures):
        source = structures[label].get_ase()
        atoms = Atoms(
            source.get_chemical_symbols(), positions=source.positions, cell=source.cell, pbc=source.pbc
        )
        atoms.info["key"] = label
        for key, value in (conditions.get(label) or {}).items():
            atoms.info[key] = np.asarray(value, dtype=float) if schema.label(key).shape else float(value)
        if schema.FERMI_LEVEL in atoms.info:
            atoms.info[schema.FERMI_REFERENCE] = "model"
        frames.append(atoms)
    return frames


class EmlipEvaluateCalculation(CalcJob):
    """Evaluate an ``emlip.model`` on structures with ``emlip-eval``: single points, relaxation or MD.

    Structures come from an ``emlip.dataset`` (``dataset``; total charge, spin, field and Fermi level
    from its info keys) or from the ``structures`` namespace of ``StructureData`` with optional
    per-label ``conditions``. ``parameters`` are those of ``emlip-eval`` (docs/evaluate.md), checked
    before submission. Outputs: ``predictions`` (``emlip.dataset`` under the schema keys, the model's
    UUID and the mode in its attributes), ``trajectory`` (relax/md, when frames were written) and
    ``summary``.
    """

    #: Part of the hash: a new release of the package never reuses older results (see cache_version).
    CACHE_VERSION = cache_version("evaluate")

    @classmethod
    def define(cls, spec: CalcJobProcessSpec) -> None:
        super().define(spec)
        spec.input("model", valid_type=EmlipModelData, help="the model to evaluate (emlip.model)")
        spec.input("dataset", valid_type=EmlipDatasetData, required=False, help="structures with conditions")
        spec.input_namespace(
            "structures",
            valid_type=orm.StructureData,
            dynamic=True,
            required=False,
            help="structures by label",
        )
        spec.input(
            "conditions",
            valid_type=orm.Dict,
            required=False,
            help="per structure label: total_charge (e), total_spin, external_field (V/Å), fermi_level (eV)",
        )
        spec.input(
            "parameters",
            valid_type=orm.Dict,
            required=False,
            validator=validate_parameters,
            help="emlip-eval parameters: mode (single_point, relax, md) and its options",
        )
        spec.inputs.validator = validate_inputs
        spec.inputs["metadata"]["options"]["parser_name"].default = "emlip.evaluate"
        spec.inputs["metadata"]["options"]["resources"].default = {"num_machines": 1}
        spec.output(
            "predictions", valid_type=EmlipDatasetData, help="final structures with the model's outputs"
        )
        spec.output("trajectory", valid_type=EmlipDatasetData, required=False, help="relax/md frames")
        spec.output("summary", valid_type=orm.Dict, help="per-structure flags, MD drift, timings")
        spec.exit_code(
            300,
            "ERROR_NO_EXIT_STATUS",
            invalidates_cache=True,
            message="emlip-eval did not finish (no exit status).",
        )
        spec.exit_code(
            301,
            "ERROR_MISSING_OUTPUT",
            invalidates_cache=True,
            message="emlip-eval finished but {files} are missing.",
        )
        spec.exit_code(302, "ERROR_INVALID_OUTPUT", message="the predictions could not be stored: {error}")
        spec.exit_code(
            310,
            "ERROR_BAD_INPUT",
            message="emlip-eval refused the model, structures or parameters: {error}",
        )
        spec.exit_code(
            320,
            "ERROR_NON_FINITE",
            message="non-finite outputs for some structures (outputs attached): {error}",
        )
        spec.exit_code(
            330,
            "ERROR_INTERRUPTED",
            invalidates_cache=True,
            message="emlip-eval was interrupted by a signal.",
        )
        spec.exit_code(
            340,
            "ERROR_SCF_NOT_CONVERGED",
            message="the SCF did not converge for {count} structure(s): flagged scf_converged=False, "
            "outputs attached.",
        )
        spec.exit_code(
            341,
            "ERROR_RELAX_NOT_CONVERGED",
            message="{count} relaxation(s) stopped at max_steps above fmax (outputs attached).",
        )
        spec.exit_code(
            350,
            "ERROR_EVALUATOR",
            invalidates_cache=True,
            message="emlip-eval failed with exit status {status}.",
        )

    def prepare_for_submission(self, folder: Folder) -> CalcInfo:
        if "dataset" in self.inputs:
            text = self.inputs.dataset.get_text()
        else:
            conditions = self.inputs.conditions.get_dict() if "conditions" in self.inputs else {}
            text = frames_to_text(structures_to_frames(dict(self.inputs.structures), conditions))
        with folder.open(STRUCTURES_FILE, "w") as handle:
            handle.write(text)
        parameters = self.inputs.parameters.get_dict() if "parameters" in self.inputs else {}
        with folder.open(PARAMETERS_FILE, "w") as handle:
            json.dump(parameters, handle, indent=2, sort_keys=True)
        model = self.inputs.model
        codeinfo = CodeInfo()
        codeinfo.code_uuid = self.inputs.code.uuid
        codeinfo.cmdline_params = [
            MODEL_FILE,
            STRUCTURES_FILE,
            "--params",
            PARAMETERS_FILE,
            "--schema-keys",
            "-o",
            PREDICTIONS_FILE,
            "--summary",
            SUMMARY_FILE,
            "--trajectory",
            TRAJECTORY_FILE,
            "--exit-status-file",  # written by emlip-eval itself: a user's append_text cannot change it
            STATUS_FILE,
        ]
        codeinfo.stdout_name = "stdout"
        codeinfo.stderr_name = "stderr"
        calcinfo = CalcInfo()
        calcinfo.codes_info = [codeinfo]
        calcinfo.local_copy_list = [(model.uuid, model.base.attributes.get("filename"), MODEL_FILE)]
        calcinfo.retrieve_list = [
            PREDICTIONS_FILE,
            SUMMARY_FILE,
            TRAJECTORY_FILE,
            STATUS_FILE,
            "stdout",
            "stderr",
        ]
        return calcinfo
