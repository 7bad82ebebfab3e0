"""``emlip.train``: run ``emlip-train`` on any AiiDA computer (CPU or GPU) on a dataset node."""

from __future__ import annotations

import copy
from typing import Any

import yaml
from aiida import orm
from aiida.common.datastructures import CalcInfo, CodeInfo
from aiida.common.folders import Folder
from aiida.engine import CalcJob, CalcJobProcessSpec

from aiida_emlip.data.dataset import EmlipDatasetData

TRAIN_FILE = "train.xyz"
CONFIG_FILE = "config.yaml"
STATUS_FILE = "exit_status"
OUTPUT_FILES = ("model.safetensors", "metrics.json", "learning_curve.csv", "test_errors.txt", "train.log")
#: Keys the calculation sets itself; a user's config may not set them.
RESERVED = {("data", "train"), ("output_dir",)}


def job_config(config: dict[str, Any]) -> dict[str, Any]:
    """The YAML the job runs: the user's config with the data path and output folder filled in."""
    values = copy.deepcopy(config)
    values.setdefault("data", {})["train"] = TRAIN_FILE
    values["output_dir"] = "."
    return values


def validate_config(value: orm.Dict, _) -> str | None:
    """Parse the config exactly as ``emlip-train`` will, so that a bad one fails before submission."""
    from aiida_emlip.training.config import parse_config
    from aiida_emlip.training.errors import ConfigError

    values = value.get_dict()
    for path in RESERVED:
        node = values
        for key in path[:-1]:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and path[-1] in node:
            return f"config: '{'.'.join(path)}' is set by the calculation and must not be given"
    try:
        parse_config(job_config(values))
    except ConfigError as exc:
        return f"config: {exc}"
    return None


class EmlipTrainCalculation(CalcJob):
    """Train one model with ``emlip-train`` from an ``emlip.dataset`` node and a config ``Dict``.

    The config is the YAML schema of ``emlip-train`` (docs/training.md) without ``data.train`` and
    ``output_dir``, which the calculation sets. Outputs: ``model`` (``emlip.model``) and ``metrics``.
    """

    @classmethod
    def define(cls, spec: CalcJobProcessSpec) -> None:
        super().define(spec)
        spec.input("dataset", valid_type=EmlipDatasetData, help="structures and DFT labels to train on")
        spec.input("config", valid_type=orm.Dict, validator=validate_config, help="emlip-train config")
        spec.inputs["metadata"]["options"]["parser_name"].default = "emlip.train"
        spec.inputs["metadata"]["options"]["resources"].default = {"num_machines": 1}
        spec.output("model", valid_type=orm.Data, help="the trained model (emlip.model)")
        spec.output("metrics", valid_type=orm.Dict, help="final errors and training summary")
        spec.output("checkpoint", valid_type=orm.SinglefileData, required=False, help="last checkpoint")
        spec.exit_code(300, "ERROR_NO_EXIT_STATUS", message="emlip-train did not finish (no exit status).")
        spec.exit_code(301, "ERROR_MISSING_OUTPUT", message="emlip-train finished but {files} are missing.")
        spec.exit_code(
            310, "ERROR_BAD_INPUT", message="emlip-train refused the config, data, checkpoint or job folder."
        )
        spec.exit_code(320, "ERROR_NON_FINITE", message="training stopped on a NaN/inf loss or gradient.")
        spec.exit_code(
            330, "ERROR_INTERRUPTED", message="training was interrupted; the checkpoint is attached."
        )
        spec.exit_code(340, "ERROR_SCF_FAILED", message="a self-consistent head did not converge.")
        spec.exit_code(350, "ERROR_TRAINER", message="emlip-train failed with exit status {status}.")

    def prepare_for_submission(self, folder: Folder) -> CalcInfo:
        with folder.open(TRAIN_FILE, "w") as handle:
            handle.write(self.inputs.dataset.get_text())
        with folder.open(CONFIG_FILE, "w") as handle:
            yaml.safe_dump(job_config(self.inputs.config.get_dict()), handle, sort_keys=False)
        codeinfo = CodeInfo()
        codeinfo.code_uuid = self.inputs.code.uuid
        codeinfo.cmdline_params = [CONFIG_FILE, "--resume", "auto"]
        codeinfo.stdout_name = "stdout"
        codeinfo.stderr_name = "stderr"
        calcinfo = CalcInfo()
        calcinfo.codes_info = [codeinfo]
        calcinfo.append_text = f"echo $? > {STATUS_FILE}"
        calcinfo.retrieve_list = [*OUTPUT_FILES, "checkpoint.pt", STATUS_FILE, "stdout", "stderr"]
        return calcinfo
