"""Writing a node's file for ``verdi data emlip.* export``: never over an existing file unless asked,
never half a file, one line instead of a traceback."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import click
from aiida.cmdline.utils import echo

OVERWRITE_OPTION = click.option(
    "-o", "--overwrite", is_flag=True, default=False, help="Replace PATH if it exists (refused otherwise)."
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_atomic(datum: Any, path: str | Path, overwrite: bool) -> Path:
    """``datum.export`` to a temporary file beside ``path``, then renamed to it (a reader never sees a
    partial file). An existing ``path`` is refused without ``overwrite``; an error that stops the
    write (a missing folder, no permission, a full disk) is one ``Critical:`` line and exit status 1.
    """
    target = Path(path)
    if target.is_dir():
        echo.echo_critical(f"{target} is a directory; give the path of the file to write")
    if target.exists() and not overwrite:
        echo.echo_critical(f"{target} already exists; use --overwrite to replace it")
    tmp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        datum.export(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        echo.echo_critical(f"cannot write {target}: {exc.strerror or exc}")
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return target
