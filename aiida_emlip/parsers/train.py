"""Parser of ``emlip.train``: the model file becomes an ``emlip.model`` node, metrics a ``Dict``.

The model file and the checkpoint are in the calculation's ``retrieve_temporary_list``: the parser reads
them from the temporary folder AiiDA passes as ``retrieved_temporary_folder`` (deleted after parsing)
and stores them as the ``model`` and ``checkpoint`` nodes. Without that folder (a node of an older
version, which kept them in ``retrieved``, or ``Parser.parse_from_node`` without the folder) they are
read from ``retrieved``.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from aiida import orm
from aiida.engine import ExitCode
from aiida.parsers import Parser

from aiida_emlip.calculations.train import CHECKPOINT_FILE, MODEL_FILE, NODE_FILES, STATUS_FILE
from aiida_emlip.data.model import EmlipModelData

#: emlip-train exit status → exit code label of the calculation.
STATUS_LABELS = {
    2: "ERROR_BAD_INPUT",
    3: "ERROR_NON_FINITE",
    4: "ERROR_INTERRUPTED",
    5: "ERROR_SCF_FAILED",
    7: "ERROR_OUT_OF_MEMORY",
}
#: Exit codes whose message quotes emlip-train's own one-line reason (``{error}``).
QUOTES_ERROR = ("ERROR_BAD_INPUT", "ERROR_NON_FINITE", "ERROR_SCF_FAILED", "ERROR_OUT_OF_MEMORY")
STDERR_FILE = "stderr"


def last_error_line(retrieved: orm.FolderData, files: set[str]) -> str:
    """The last ``error: ...`` line emlip-train or emlip-eval wrote to stderr (its one-line reason)."""
    if STDERR_FILE in files:
        for line in reversed(retrieved.get_object_content(STDERR_FILE).splitlines()):
            if line.startswith("error: "):
                return line[len("error: ") :].strip()
    return "see the stderr of the calculation"


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (the database refuses them)."""
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite_or_none(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class EmlipTrainParser(Parser):
    """Attach whatever emlip-train finished: the model and metrics, or at least the checkpoint."""

    def parse(self, **kwargs) -> ExitCode | None:
        self._temporary = self._temporary_files(kwargs.get("retrieved_temporary_folder"))
        files = set(self.retrieved.list_object_names()) | set(self._temporary)
        if CHECKPOINT_FILE in files:
            self._attach_file("checkpoint", CHECKPOINT_FILE, orm.SinglefileData)
        if STATUS_FILE not in files:
            if self.node.exit_status:  # the scheduler's verdict (out of walltime, of memory): keep it
                return None
            return self.exit_codes.ERROR_NO_EXIT_STATUS
        text = self.retrieved.get_object_content(STATUS_FILE).strip()
        status = int(text) if text.lstrip("-").isdigit() else -1
        if status != 0:
            label = STATUS_LABELS.get(status)
            if label in QUOTES_ERROR:
                return getattr(self.exit_codes, label).format(error=self._error_line(files))
            if label:
                return getattr(self.exit_codes, label)
            return self.exit_codes.ERROR_TRAINER.format(status=status)
        missing = sorted({MODEL_FILE, "metrics.json"} - files)
        if missing:
            return self.exit_codes.ERROR_MISSING_OUTPUT.format(files=", ".join(missing))
        try:
            metrics = json.loads(self.retrieved.get_object_content("metrics.json"))
        except json.JSONDecodeError as exc:
            return self.exit_codes.ERROR_INVALID_OUTPUT.format(error=f"metrics.json: {exc}")
        try:  # the model file is verified (format and checksum) before it becomes a node
            self._attach_file("model", MODEL_FILE, EmlipModelData)
        except ValueError as exc:
            return self.exit_codes.ERROR_INVALID_OUTPUT.format(error=str(exc))
        self.out("metrics", orm.Dict(finite_or_none(metrics)))
        return None

    def _error_line(self, files: set[str]) -> str:
        return last_error_line(self.retrieved, files)

    @staticmethod
    def _temporary_files(folder: str | None) -> dict[str, Path]:
        """The files of :data:`NODE_FILES` in the temporary retrieved folder (none without a folder)."""
        if not folder:
            return {}
        return {name: Path(folder) / name for name in NODE_FILES if (Path(folder) / name).is_file()}

    def _attach_file(self, port: str, name: str, cls: type) -> None:
        """Store ``name`` as the output ``port``: from the temporary folder, or else from ``retrieved``."""
        if name in self._temporary:
            self.out(port, cls(self._temporary[name]))
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(self.retrieved.get_object_content(name, mode="rb"))
            self.out(port, cls(path))
