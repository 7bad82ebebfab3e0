"""Parser of ``emlip.evaluate``: predictions and trajectory as ``emlip.dataset`` nodes, the summary."""

from __future__ import annotations

import json

from aiida import orm
from aiida.engine import ExitCode
from aiida.parsers import Parser

from aiida_emlip.calculations.evaluate import PREDICTIONS_FILE, STATUS_FILE, SUMMARY_FILE, TRAJECTORY_FILE
from aiida_emlip.data.dataset import EmlipDatasetData
from aiida_emlip.extxyz import text_to_frames
from aiida_emlip.parsers.train import finite_or_none, last_error_line

#: emlip-eval exit statuses whose outputs are complete and attached (0 ok; 3, 5, 6 flagged structures).
ATTACHED = (0, 3, 5, 6)
#: emlip-eval exit status → exit code label of the calculation. 2: a bad model file (missing, not a
#: model, truncated, checksum mismatch), bad structures (unknown element, overlapping atoms) or
#: parameters; 3: a NaN/inf prediction.
STATUS_LABELS = {
    2: "ERROR_BAD_INPUT",
    3: "ERROR_NON_FINITE",
    4: "ERROR_INTERRUPTED",
    5: "ERROR_SCF_NOT_CONVERGED",
    6: "ERROR_RELAX_NOT_CONVERGED",
}
#: Exit codes whose message quotes emlip-eval's own one-line error (``{error}``).
QUOTES_ERROR = ("ERROR_BAD_INPUT", "ERROR_NON_FINITE")
STDERR_FILE = "stderr"


class EmlipEvaluateParser(Parser):
    """Attach predictions, trajectory and summary; flag SCF and relaxation failures with exit codes.

    A structure whose SCF did not converge stays in the outputs with ``scf_converged`` False, and the
    calculation fails with ``ERROR_SCF_NOT_CONVERGED``: never a converged-looking result.
    """

    def parse(self, **kwargs) -> ExitCode | None:
        files = set(self.retrieved.list_object_names())
        if STATUS_FILE not in files:
            return self.exit_codes.ERROR_NO_EXIT_STATUS
        text = self.retrieved.get_object_content(STATUS_FILE).strip()
        status = int(text) if text.lstrip("-").isdigit() else -1
        if status not in ATTACHED:
            label = STATUS_LABELS.get(status)
            if label is None:
                return self.exit_codes.ERROR_EVALUATOR.format(status=status)
            if label in QUOTES_ERROR:
                return getattr(self.exit_codes, label).format(error=self._error_line(files))
            return getattr(self.exit_codes, label)
        missing = sorted({PREDICTIONS_FILE, SUMMARY_FILE} - files)
        if missing:
            return self.exit_codes.ERROR_MISSING_OUTPUT.format(files=", ".join(missing))
        try:
            summary = json.loads(self.retrieved.get_object_content(SUMMARY_FILE))
        except json.JSONDecodeError as exc:
            return self.exit_codes.ERROR_INVALID_OUTPUT.format(error=f"{SUMMARY_FILE}: {exc}")
        outputs = {"predictions": PREDICTIONS_FILE}
        if TRAJECTORY_FILE in files:
            outputs["trajectory"] = TRAJECTORY_FILE
        nodes = {}
        for port, name in outputs.items():
            try:
                nodes[port] = self._dataset(name, summary)
            except ValueError as exc:
                return self.exit_codes.ERROR_INVALID_OUTPUT.format(error=f"{name}: {exc}")
        for port, node in nodes.items():
            self.out(port, node)
        self.out("summary", orm.Dict(finite_or_none(summary)))
        return self._judge(status, summary, files)

    def _error_line(self, files: set[str]) -> str:
        return last_error_line(self.retrieved, files)

    def _dataset(self, name: str, summary: dict) -> EmlipDatasetData:
        frames = text_to_frames(self.retrieved.get_object_content(name))
        node = EmlipDatasetData(frames=frames)
        model = self.node.inputs.model
        node.base.attributes.set_many(
            {
                "model_uuid": model.uuid,
                "model_sha256": model.base.attributes.get("sha256", None),
                "eval_mode": summary.get("mode"),
            }
        )
        return node

    def _judge(self, status: int, summary: dict, files: set[str]) -> ExitCode | None:
        """The exit code of ``status``; the summary's flags count too (never a failure passed as ok)."""
        non_finite = int(summary.get("n_non_finite") or 0)
        scf = int(summary.get("n_scf_not_converged") or 0)
        relax = int(summary.get("n_relax_not_converged") or 0)
        if status == 3 or non_finite:
            return self.exit_codes.ERROR_NON_FINITE.format(error=self._error_line(files))
        if status == 5 or scf:
            return self.exit_codes.ERROR_SCF_NOT_CONVERGED.format(count=scf or "some")
        if status == 6 or relax:
            return self.exit_codes.ERROR_RELAX_NOT_CONVERGED.format(count=relax or "some")
        return None
