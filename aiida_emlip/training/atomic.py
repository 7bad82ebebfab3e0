"""Atomic output files: write a temporary file in the same directory, then ``os.replace`` it.

A reader (or a later run) sees either the previous complete file or the new complete one, never a
partial write. On any failure (disk full, read-only directory, a signal) the temporary file is
removed; an ``OSError`` becomes an :class:`~aiida_emlip.training.errors.OutputError` (exit status 2).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from aiida_emlip.training.errors import OutputError

#: Temporary files are named ``.NAME.XXXXXXXX.tmp`` beside ``NAME``.
TMP_SUFFIX = ".tmp"


def temp_files_of(path: Path) -> list[Path]:
    """Temporary files a killed write of ``path`` may have left (``.NAME.*.tmp``)."""
    return sorted(path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"))


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, flush it to disk, rename it to ``path``."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))
