"""``emlip.train``: run ``emlip-train`` on any AiiDA computer (CPU or GPU) on a dataset node."""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any

import yaml
from aiida import orm
from aiida.common.datastructures import CalcInfo, CodeInfo
from aiida.common.folders import Folder
from aiida.engine import CalcJob, CalcJobProcessSpec
from aiida.engine.processes.calcjobs.calcjob import validate_calc_job

from aiida_emlip.cache_version import cache_version
from aiida_emlip.data.dataset import EmlipDatasetData
from aiida_emlip.data.model import EmlipModelData

TRAIN_FILE = "train.xyz"
#: Where the inputs ``valid_set`` and ``test_set`` lie in the job folder (``data.valid``, ``data.test``).
SPLIT_FILES = {"valid": "valid.xyz", "test": "test.xyz"}
#: Input port of the dataset node of each split given as a node.
SPLIT_PORTS = {"valid": "valid_set", "test": "test_set"}
CONFIG_FILE = "config.yaml"
STATUS_FILE = "exit_status"
CHECKPOINT_FILE = "checkpoint.pt"
#: Where the initial model of a warm start (input ``initial_model``) lies in the job folder.
INIT_FILE = "initial_model.safetensors"
MODEL_FILE = "model.safetensors"
OUTPUT_FILES = ("metrics.json", "learning_curve.csv", "test_errors.txt", "train.log")
#: Files that become nodes (``model``, ``checkpoint``): retrieved into a temporary folder only, which the
#: parser reads and AiiDA deletes after parsing, so their bytes are stored once (in the output node),
#: not again in the ``retrieved`` folder.
NODE_FILES = (MODEL_FILE, CHECKPOINT_FILE)
#: Keys the calculation sets itself; a user's config may not set them.
RESERVED = {("data", "train"), ("output_dir",), ("checkpoint", "file"), ("init_from",)}


def job_config(
    config: dict[str, Any], initial_model: bool = False, splits: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The YAML the job runs: the user's config with the data path and output folder filled in (and
    ``init_from`` when the job starts from an initial model, ``data.valid`` / ``data.test`` for the
    ``splits`` given as dataset nodes)."""
    values = copy.deepcopy(config)
    values.setdefault("data", {})["train"] = TRAIN_FILE
    for role in splits:
        values["data"][role] = SPLIT_FILES[role]
    values["output_dir"] = "."
    if initial_model:
        values["init_from"] = INIT_FILE
    return values


def split_path_problem(values: dict[str, Any]) -> str | None:
    """``data.valid`` or ``data.test`` given as a path: refused (``None``: neither is). A path would be
    read on the computer that runs the job, outside the provenance graph; the structures come as the
    inputs ``valid_set`` / ``test_set`` (``emlip.dataset`` nodes) instead. ``valid_fraction`` and
    ``test_fraction`` stay as they are."""
    data = values.get("data")
    if not isinstance(data, dict):
        return None
    for role, port in SPLIT_PORTS.items():
        if data.get(role) is not None:
            return (
                f"config: 'data.{role}' ({data[role]!r}) is a path that would be read on the remote "
                f"computer, outside the provenance: pass the structures as the input {port} (an "
                f"emlip.dataset node) instead, or split them from the training data with data.{role}_fraction"
            )
    return None


def check_job(
    config: dict[str, Any],
    dataset: EmlipDatasetData,
    initial_model: EmlipModelData | None = None,
    valid_set: EmlipDatasetData | None = None,
    test_set: EmlipDatasetData | None = None,
) -> str:
    """What ``emlip-train --check`` says of this job: the trainer is built on the CPU, nothing trained.

    Raises the :class:`~aiida_emlip.training.errors.TrainingError` that the job would stop with
    before its first step (bad configuration, head or backbone options, labels, elements, of the
    training data and of ``valid_set`` / ``test_set`` when given; with ``initial_model``, an
    architecture or elements that differ from the model's).
    """
    from aiida_emlip.training.config import parse_config
    from aiida_emlip.training.session import check

    splits = {role: node for role, node in (("valid", valid_set), ("test", test_set)) if node is not None}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / TRAIN_FILE
        path.write_text(dataset.get_text())
        values = job_config(config, initial_model is not None, tuple(splits))
        values["data"]["train"] = str(path)
        for role, node in splits.items():
            split_path = Path(tmp) / SPLIT_FILES[role]
            split_path.write_text(node.get_text())
            values["data"][role] = str(split_path)
        values["output_dir"] = tmp
        if initial_model is not None:
            values["init_from"] = str(initial_model.export(Path(tmp) / INIT_FILE))
        return check(parse_config(values), device="cpu")


def validate_nproc_per_node(value: Any, _) -> str | None:
    """A whole number of training processes, at least 1 (absent: one process)."""
    from aiida_emlip.training.launch import check_nproc_per_node

    return None if value is None else check_nproc_per_node(value)


def dataset_name(dataset: EmlipDatasetData) -> str:
    """``emlip.dataset<PK>``, or ``an unstored emlip.dataset`` before the node is stored."""
    return f"emlip.dataset<{dataset.pk}>" if dataset.is_stored else "an unstored emlip.dataset"


def dataset_problem(config: dict[str, Any], dataset: EmlipDatasetData) -> str | None:
    """What the node's attributes already say against training on ``dataset`` (no file is read): no
    configurations, or a label the loss weights that no configuration has."""
    from aiida_emlip.training.config import parse_config, required_labels
    from aiida_emlip.training.errors import ConfigError

    if dataset.n_configurations == 0:
        return f"dataset: {dataset_name(dataset)} holds no configurations"
    try:
        parsed = parse_config(job_config(config))
    except ConfigError:
        return None  # the config port reports it
    attributes = dataset.base.attributes
    present = set(attributes.get("label_keys", [])) | set(attributes.get("partial_label_keys", []))
    mapped = parsed.data.keys
    missing = [key for key in required_labels(parsed) if mapped.get(key, key) == key and key not in present]
    if missing:
        return (
            f"dataset: the loss weights {missing} but no configuration of {dataset_name(dataset)} has "
            f"{'that label' if len(missing) == 1 else 'these labels'} (it has {sorted(present)}); set "
            f"{'its weight' if len(missing) == 1 else 'their weights'} to 0 or label the data"
        )
    return None


def validate_inputs(inputs: dict[str, Any], ctx) -> str | None:
    """The checks of every CalcJob, then: the dataset has what the config trains on, and several
    processes per machine run on one machine."""
    problem = validate_calc_job(inputs, ctx)
    if problem:
        return problem
    config, dataset = inputs.get("config"), inputs.get("dataset")
    if isinstance(config, orm.Dict) and isinstance(dataset, EmlipDatasetData):
        problem = dataset_problem(config.get_dict(), dataset)
        if problem:
            return problem
    for port in SPLIT_PORTS.values():
        node = inputs.get(port)
        if isinstance(node, EmlipDatasetData) and node.n_configurations == 0:
            return f"{port}: {dataset_name(node)} holds no configurations"
    options = inputs.get("metadata", {}).get("options", {})
    nproc = options.get("nproc_per_node")
    machines = (options.get("resources") or {}).get("num_machines", 1)
    if isinstance(nproc, int) and nproc > 1 and machines != 1:
        return (
            f"nproc_per_node {nproc} starts torchrun --standalone on one machine: ask for num_machines 1 "
            f"(resources ask for {machines})"
        )
    return None


def validate_lr_scale(value: orm.Float, _) -> str | None:
    if not (math.isfinite(value.value) and value.value > 0):
        return f"lr_scale must be a positive number, got {value.value}"
    return None


def config_problem(values: dict[str, Any]) -> str | None:
    """What is wrong with the config of a job (``None``: nothing): parsed exactly as ``emlip-train``
    will, and its model section built (unknown heads and head options), before any submission."""
    from aiida_emlip.training.config import check_model_section, parse_config
    from aiida_emlip.training.errors import ConfigError

    for path in RESERVED:
        node = values
        for key in path[:-1]:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and path[-1] in node:
            return f"config: '{'.'.join(path)}' is set by the calculation and must not be given"
    problem = split_path_problem(values)
    if problem:
        return problem
    try:
        parse_config(job_config(values))
        model = values.get("model") or {}
        check_model_section(model if isinstance(model, dict) else {})
    except ConfigError as exc:
        return f"config: {exc}"
    return None


def validate_config(value: orm.Dict, _) -> str | None:
    """:func:`config_problem` of the config port."""
    return config_problem(value.get_dict())


class EmlipTrainCalculation(CalcJob):
    """Train one model with ``emlip-train`` from an ``emlip.dataset`` node and a config ``Dict``.

    The config is the YAML schema of ``emlip-train`` (docs/training.md) without ``data.train``,
    ``output_dir`` and ``checkpoint.file``, which the calculation sets, and without paths in
    ``data.valid`` / ``data.test``: separate validation and test structures come as the inputs
    ``valid_set`` / ``test_set`` (``emlip.dataset`` nodes, written into the job folder like the
    training data). Outputs: ``model`` (``emlip.model``), ``metrics`` and, whenever one was written,
    ``checkpoint``; the model file and the checkpoint are retrieved into a temporary folder only (they
    are stored once, as these nodes, not again in ``retrieved``). With a
    ``checkpoint`` input the job continues that run (``--resume``); ``lr_scale`` scales its learning
    rates (``--lr-scale``); with an ``initial_model`` the run starts from that model's weights (a warm
    start: ``init_from``, which the calculation sets). emlip-train writes its exit status itself
    (``--exit-status-file``). ``metadata.options.nproc_per_node`` N > 1 trains with N processes on the
    machine (``--nproc-per-node N``: emlip-train runs itself under ``torchrun --standalone
    --nproc_per_node N`` with the same arguments).
    """

    #: Part of the hash: a new release of the package never reuses older results (see cache_version).
    CACHE_VERSION = cache_version("train")

    @classmethod
    def define(cls, spec: CalcJobProcessSpec) -> None:
        super().define(spec)
        spec.input("dataset", valid_type=EmlipDatasetData, help="structures and DFT labels to train on")
        spec.input("config", valid_type=orm.Dict, validator=validate_config, help="emlip-train config")
        spec.input(
            "checkpoint",
            valid_type=orm.SinglefileData,
            required=False,
            help="a checkpoint of this config and dataset (e.g. the checkpoint output of an interrupted "
            "run): emlip-train continues from it (--resume)",
        )
        spec.input(
            "valid_set",
            valid_type=EmlipDatasetData,
            required=False,
            help="structures to validate on (data.valid, which the calculation sets); absent: "
            "data.valid_fraction of the dataset",
        )
        spec.input(
            "test_set",
            valid_type=EmlipDatasetData,
            required=False,
            help="structures to test on (data.test, which the calculation sets); absent: "
            "data.test_fraction of the dataset",
        )
        spec.input(
            "initial_model",
            valid_type=EmlipModelData,
            required=False,
            help="a model of the config's architecture to start from (warm start, emlip-train init_from): "
            "its weights and reference energies; the optimizer starts fresh",
        )
        spec.input(
            "lr_scale",
            valid_type=orm.Float,
            required=False,
            validator=validate_lr_scale,
            help="train at this factor times the configured learning rates (emlip-train --lr-scale)",
        )
        spec.input(
            "metadata.options.nproc_per_node",
            required=False,
            validator=validate_nproc_per_node,
            help="training processes on the machine: N > 1 runs emlip-train under torchrun --standalone "
            "--nproc_per_node N (one process per GPU; gloo on the CPU), with the same arguments. Absent "
            "or 1: one process, no torchrun.",
        )
        spec.inputs.validator = validate_inputs
        spec.inputs["metadata"]["options"]["parser_name"].default = "emlip.train"
        spec.inputs["metadata"]["options"]["resources"].default = {"num_machines": 1}
        spec.output("model", valid_type=EmlipModelData, help="the trained model (emlip.model)")
        spec.output("metrics", valid_type=orm.Dict, help="final errors and training summary")
        spec.output("checkpoint", valid_type=orm.SinglefileData, required=False, help="last checkpoint")
        spec.exit_code(300, "ERROR_NO_EXIT_STATUS", message="emlip-train did not finish (no exit status).")
        spec.exit_code(301, "ERROR_MISSING_OUTPUT", message="emlip-train finished but {files} are missing.")
        spec.exit_code(302, "ERROR_INVALID_OUTPUT", message="the outputs could not be stored: {error}")
        spec.exit_code(
            310,
            "ERROR_BAD_INPUT",
            message="emlip-train refused the config, data, checkpoint or job folder: {error}",
        )
        spec.exit_code(
            320, "ERROR_NON_FINITE", message="training stopped on a NaN/inf loss or gradient: {error}"
        )
        spec.exit_code(
            330, "ERROR_INTERRUPTED", message="training was interrupted; the checkpoint is attached."
        )
        spec.exit_code(340, "ERROR_SCF_FAILED", message="a self-consistent head did not converge: {error}")
        spec.exit_code(350, "ERROR_TRAINER", message="emlip-train failed with exit status {status}.")
        spec.exit_code(
            360, "ERROR_OUT_OF_MEMORY", message="emlip-train ran out of memory (host or GPU): {error}"
        )

    def prepare_for_submission(self, folder: Folder) -> CalcInfo:
        with folder.open(TRAIN_FILE, "w") as handle:
            handle.write(self.inputs.dataset.get_text())
        splits = tuple(role for role, port in SPLIT_PORTS.items() if port in self.inputs)
        for role in splits:
            with folder.open(SPLIT_FILES[role], "w") as handle:
                handle.write(self.inputs[SPLIT_PORTS[role]].get_text())
        with folder.open(CONFIG_FILE, "w") as handle:
            values = job_config(self.inputs.config.get_dict(), "initial_model" in self.inputs, splits)
            yaml.safe_dump(values, handle, sort_keys=False)
        calcinfo = CalcInfo()
        calcinfo.local_copy_list = []
        if "initial_model" in self.inputs:
            model = self.inputs.initial_model
            calcinfo.local_copy_list.append((model.uuid, model.filename, INIT_FILE))
        if "checkpoint" in self.inputs:
            checkpoint = self.inputs.checkpoint
            calcinfo.local_copy_list.append((checkpoint.uuid, checkpoint.filename, CHECKPOINT_FILE))
            resume = CHECKPOINT_FILE  # refused unless it is a checkpoint of this config and data
        else:
            resume = "auto"  # a job requeued with its folder continues from its own checkpoint
        codeinfo = CodeInfo()
        codeinfo.code_uuid = self.inputs.code.uuid
        codeinfo.cmdline_params = [CONFIG_FILE, "--resume", resume, "--exit-status-file", STATUS_FILE]
        if "lr_scale" in self.inputs:
            codeinfo.cmdline_params += ["--lr-scale", repr(float(self.inputs.lr_scale.value))]
        nproc = self.inputs.metadata.options.get("nproc_per_node")
        if nproc is not None and int(nproc) > 1:
            codeinfo.cmdline_params += ["--nproc-per-node", str(int(nproc))]
        codeinfo.stdout_name = "stdout"
        codeinfo.stderr_name = "stderr"
        calcinfo.codes_info = [codeinfo]
        calcinfo.retrieve_list = [*OUTPUT_FILES, STATUS_FILE, "stdout", "stderr"]
        calcinfo.retrieve_temporary_list = list(NODE_FILES)
        return calcinfo
