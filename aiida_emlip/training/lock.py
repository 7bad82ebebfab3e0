"""The output directory's lock file: one ``emlip-train`` per directory at a time.

The lock is created with ``O_CREAT | O_EXCL`` and holds the pid and host of its owner as JSON. A lock
whose pid is not alive on this host is stale (a run killed with SIGKILL, a crashed node): it is
reported and taken over. A lock of another host cannot be checked and is never taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from aiida_emlip.training.errors import OutputError

LOCK_NAME = "emlip-train.lock"


@dataclass
class Lock:
    """A held lock; :meth:`release` removes its file (only if it is still ours)."""

    path: Path
    content: str
    stale_owner: str | None = None  # "pid N on HOST" of a stale lock that was taken over

    def release(self) -> None:
        with contextlib.suppress(OSError):
            if self.path.read_text() == self.content:
                self.path.unlink()


def _create(path: Path, content: str) -> bool:
    """Create ``path`` holding ``content`` atomically; False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, content.encode())
    finally:
        os.close(fd)
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, owned by someone else
        return True
    return True


def _owner(path: Path) -> tuple[int, str] | None:
    """(pid, host) recorded in a lock file; ``None`` when it cannot be read."""
    try:
        data = json.loads(path.read_text())
        return int(data["pid"]), str(data["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _busy(path: Path, why: str) -> OutputError:
    return OutputError(
        f"output directory {path.parent} is locked by {why} (lock file {path}); wait for that run, "
        f"or remove {path} if no emlip-train is running there"
    )


def acquire(directory: Path) -> Lock:
    """Take the lock of ``directory``; an :class:`OutputError` when another live run holds it."""
    path = directory / LOCK_NAME
    host = socket.gethostname()
    content = json.dumps({"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    try:
        if _create(path, content):
            return Lock(path, content)
        owner = _owner(path)
        if owner is None:
            raise _busy(path, "a run whose lock file cannot be read")
        pid, where = owner
        if where != host:
            raise _busy(path, f"pid {pid} on host {where}")
        if pid_alive(pid):
            raise _busy(path, f"the running process {pid}")
        return _take_over(path, content, owner)
    except OSError as exc:
        raise OutputError(f"cannot write to output directory {directory}: {exc.strerror or exc}") from None


def _take_over(path: Path, content: str, owner: tuple[int, str]) -> Lock:
    """Replace a stale lock, guarded by a second O_EXCL file so that two runs cannot both take it."""
    guard = path.with_name(path.name + ".takeover")
    if not _create(guard, content):
        raise _busy(path, f"another run taking over the stale lock of pid {owner[0]} ({guard} exists)")
    try:
        if _owner(path) != owner:
            raise _busy(path, "a run that took over its stale lock first")
        path.unlink()
        if not _create(path, content):
            raise _busy(path, "a run that started at the same moment")
    finally:
        guard.unlink()
    return Lock(path, content, stale_owner=f"pid {owner[0]} on {owner[1]}")
