"""A profile's daemon as the operating system sees it: the circus arbiter, its workers and its helper.

aiida-core calls a daemon running when its PID file exists. After a crash (the arbiter killed, the
machine out of memory) the file stays behind although no arbiter runs, and the arbiter's children may
outlive it: daemon workers (``verdi -p PROFILE daemon worker``) that still hold process tasks and run
processes, and the circus statistics helper. ``verdi daemon stop`` does not reach them, and while such
a worker runs, its processes' tasks are out of the broker's queue, so they look lost although they are
not: sending them again (``verdi process repair``) would have two workers run one process.

:func:`daemon_processes` reads the PID file and the process table (psutil, this user's processes only)
and tells the three cases apart: a daemon that runs, none, and leftovers without their arbiter.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: The name of AiiDA's configuration directory (``AIIDA_PATH`` may name it or the folder holding it).
CONFIG_DIR_NAME = ".aiida"


@dataclass(frozen=True)
class DaemonProcesses:
    """``pid``: the arbiter's PID from the profile's PID file (``None``: no file); ``alive``: that PID
    is a running circus process; ``workers`` and ``helpers``: PIDs of the profile's daemon workers and
    of its circus statistics helper."""

    pid: int | None
    alive: bool
    workers: tuple[int, ...] = ()
    helpers: tuple[int, ...] = ()

    @property
    def running(self) -> bool:
        """The daemon runs: its arbiter is alive."""
        return self.pid is not None and self.alive

    @property
    def stale_pid_file(self) -> bool:
        """The PID file names an arbiter that is gone (a crash): ``verdi daemon start`` replaces it."""
        return self.pid is not None and not self.alive

    @property
    def leftovers(self) -> tuple[int, ...]:
        """Workers and helpers left running without an arbiter (none while the daemon runs)."""
        return () if self.running else self.workers + self.helpers

    def describe(self) -> str:
        """One line for ``doctor``."""
        if self.running:
            return f"running (arbiter pid {self.pid}, {len(self.workers)} worker(s))"
        text = "not running"
        if self.stale_pid_file:
            text += f" (a stale PID file names pid {self.pid}, which has ended: a crash)"
        if self.workers:
            pids = " ".join(str(p) for p in self.workers)
            text += (
                f"; {len(self.workers)} daemon worker(s) left running without it, pid {pids}: they still "
                "run processes and hold their tasks"
            )
        if self.helpers:
            pids = " ".join(str(p) for p in self.helpers)
            text += f"; its circus statistics helper left running, pid {pids}"
        return text


def resolved_config_dir(aiida_path: str | None) -> Path:
    """The configuration directory that an ``AIIDA_PATH`` value selects (its first entry; unset: the
    home directory's), resolved."""
    first = next((p for p in (aiida_path or "").split(os.pathsep) if p), None)
    base = Path(first).expanduser() if first else Path.home()
    if base.name != CONFIG_DIR_NAME:
        base = base / CONFIG_DIR_NAME
    return base.resolve()


def _is_worker(cmdline: list[str], profile_name: str) -> bool:
    """``... -p PROFILE daemon worker`` (aiida-core's worker command)."""
    wanted = ["-p", profile_name, "daemon", "worker"]
    return any(cmdline[i : i + 4] == wanted for i in range(len(cmdline) - 3))


def _is_helper(cmdline: list[str], circus_log_file: str) -> bool:
    """circus's statistics process, started with the profile's circus log file on its command line."""
    text = " ".join(cmdline)
    return "circus" in text and "stats" in text and circus_log_file in text


def _is_arbiter(cmdline: list[str]) -> bool:
    """circus's arbiter: ``circusd``, or the ``verdi ... daemon start`` process that became it."""
    text = " ".join(cmdline)
    return "circus" in text or ("verdi" in text and "daemon" in cmdline and "start" in cmdline)


def _own_processes():
    """This user's processes but this one, with their command lines read."""
    import psutil

    uid = os.getuid()
    for proc in psutil.process_iter(["pid", "uids", "cmdline"]):
        uids = proc.info.get("uids")
        if uids is not None and uids.real == uid and proc.pid != os.getpid():
            yield proc


def daemon_processes(
    profile_name: str, config_dir: str | Path, pid_file: str | Path, circus_log_file: str | Path
) -> DaemonProcesses:
    """The daemon of the profile ``profile_name`` of the configuration directory ``config_dir``:
    ``pid_file`` and ``circus_log_file`` as aiida-core's daemon client names them."""
    import psutil

    config = Path(config_dir).resolve()
    pid = None
    try:
        pid = int(Path(pid_file).read_text(encoding="utf8").strip())
    except (OSError, ValueError):
        pass
    alive = False
    if pid is not None:
        try:
            proc = psutil.Process(pid)
            zombie = proc.status() == psutil.STATUS_ZOMBIE
            alive = proc.is_running() and not zombie and _is_arbiter(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):  # ValueError: no valid PID
            alive = False
    workers, helpers = [], []
    for proc in _own_processes():
        cmdline = proc.info.get("cmdline") or []
        worker = _is_worker(cmdline, profile_name)
        helper = not worker and _is_helper(cmdline, str(circus_log_file))
        if not (worker or helper):
            continue
        if worker:  # the profile name alone is not unique: compare the configuration directory
            try:
                environ = proc.environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if resolved_config_dir(environ.get("AIIDA_PATH")) != config:
                continue
        (workers if worker else helpers).append(proc.pid)
    return DaemonProcesses(pid, alive, tuple(sorted(workers)), tuple(sorted(helpers)))


def profile_daemon_processes(profile_name: str) -> DaemonProcesses:
    """:func:`daemon_processes` of a loaded AiiDA profile (its paths from aiida-core's daemon client)."""
    from aiida.engine.daemon.client import get_daemon_client
    from aiida.manage.configuration import get_config

    client = get_daemon_client(profile_name)
    config_dir = get_config().dirpath
    return daemon_processes(profile_name, config_dir, client.circus_pid_file, client.circus_log_file)


def kill_fix(pids: Iterable[int], profile_name: str) -> str:
    """What to run: end the leftovers, then start the daemon again."""
    return f"kill {' '.join(str(p) for p in pids)}   (then: verdi -p {profile_name} daemon start)"
