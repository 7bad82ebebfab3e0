"""The output directory of ``emlip-train``: never mix two runs, never resume or replace silently.

:func:`prepare` (rank 0 only) creates the directory, takes its lock and decides from the files it
finds and the flags what the run may do:

- no flag: the directory must hold no run (no model, metrics, checkpoint, config copy or log);
- ``--resume auto``: continue from the directory's checkpoint; without one, start a new run, which is
  allowed only when nothing but the config copy and log of a run that stopped before its first
  checkpoint is there (those are replaced);
- ``--resume CHECKPOINT``: continue from that checkpoint, in its own directory or into one that
  holds no other run;
- ``--overwrite``: remove the files emlip-train writes (listed in the log) and start a new run;
  other files stay.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from aiida_emlip.training.atomic import TMP_SUFFIX, temp_files_of
from aiida_emlip.training.errors import CheckpointError, OutputError
from aiida_emlip.training.lock import Lock, acquire

#: Results of a finished run.
RESULTS = ("model.safetensors", "metrics.json", "learning_curve.csv", "test_errors.txt")
#: What a run writes from its start, before any result.
STARTED = ("config.yaml", "train.log")


@dataclass
class Plan:
    """What the run does in its directory: resume from ``resume`` or start anew, removing ``clear``."""

    lock: Lock
    resume: Path | None
    clear: list[Path] = field(default_factory=list)
    input_config: Path | None = None

    def is_input(self, path: Path) -> bool:
        """Whether ``path`` is the input configuration file (never overwritten nor removed)."""
        return _same(path, self.input_config)


def _same(a: Path, b: Path | None) -> bool:
    try:
        return b is not None and a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def run_files(directory: Path, checkpoint: Path, input_config: Path | None) -> list[Path]:
    """The files of a previous run in ``directory`` (the input configuration is not one of them)."""
    names = [directory / name for name in (*RESULTS, *STARTED)] + [checkpoint]
    found = [p for p in names if p.is_file() and not _same(p, input_config)]
    for path in names:
        found += temp_files_of(path)
    return found


def _listing(directory: Path, files: list[Path]) -> str:
    return ", ".join(str(p.relative_to(directory)) if p.is_relative_to(directory) else str(p) for p in files)


def _make_directory(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output directory {directory}: {exc.strerror or exc}") from None
    if not directory.is_dir():
        raise OutputError(f"output directory {directory} is not a directory")


def prepare(
    directory: Path, checkpoint: Path, resume: str | None, overwrite: bool, input_config: Path | None
) -> Plan:
    """Create and lock ``directory`` and decide what the run does there (see the module docstring)."""
    _make_directory(directory)
    lock = acquire(directory)
    try:
        return Plan(lock, *_decide(directory, checkpoint, resume, overwrite, input_config), input_config)
    except BaseException:
        lock.release()
        raise


def _decide(
    directory: Path, checkpoint: Path, resume: str | None, overwrite: bool, input_config: Path | None
) -> tuple[Path | None, list[Path]]:
    found = run_files(directory, checkpoint, input_config)
    listing = _listing(directory, found)
    if overwrite:
        return None, found
    if resume is None:
        if found:
            raise OutputError(
                f"output directory {directory} already holds a run ({listing}); continue it with "
                f"--resume auto, replace it with --overwrite, or choose another --output-dir"
            )
        return None, []
    if resume == "auto":
        if checkpoint.is_file():
            return checkpoint, _temporary(found)
        if any(p.name not in STARTED for p in found):
            raise OutputError(
                f"--resume auto: output directory {directory} holds a run ({listing}) but no "
                f"checkpoint {checkpoint.name} to continue from; replace it with --overwrite or choose "
                f"another --output-dir"
            )
        return None, found  # a run that stopped before its first checkpoint: start again
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if _same(path, checkpoint):
        return path, _temporary(found)
    if found:
        raise OutputError(
            f"output directory {directory} holds another run ({listing}); resume from its own "
            f"checkpoint (--resume auto), or continue {path} into an empty --output-dir"
        )
    return path, []


def _temporary(files: list[Path]) -> list[Path]:
    """Left-over temporary files of a killed write (removed when a run resumes)."""
    return [p for p in files if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)]


def clear(directory: Path, files: list[Path]) -> list[str]:
    """Remove ``files`` (emlip-train's own outputs); their names, for the log."""
    removed = []
    for path in files:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot remove {path}: {exc.strerror or exc}") from None
        removed.append(_listing(directory, [path]))
    return removed
