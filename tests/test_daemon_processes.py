"""The daemon as the process table shows it (``services.daemon_processes``) and what ``doctor`` says of it.

Stand-in processes carry the command lines that aiida-core gives a daemon's arbiter, workers and
circus statistics helper (a Python that sleeps, with those words as its arguments), so the tests need
no broker; ``test_lost_tasks.py`` crashes a real daemon.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aiida_emlip.cli import doctor
from aiida_emlip.services.daemon_processes import (
    DaemonProcesses,
    daemon_processes,
    kill_fix,
    resolved_config_dir,
)

SLEEP = "import time; time.sleep(120)"


@pytest.fixture
def spawn():
    """Start a sleeping Python with the given trailing arguments (and ``AIIDA_PATH``); end them all."""
    started: list[subprocess.Popen] = []

    def start(*args: str, aiida_path: Path | None = None) -> int:
        env = dict(os.environ)
        if aiida_path is not None:
            env["AIIDA_PATH"] = str(aiida_path)
        proc = subprocess.Popen([sys.executable, "-c", SLEEP, *args], env=env)
        started.append(proc)
        return proc.pid

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def ended_pid() -> int:
    """The PID of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def paths(tmp_path: Path) -> tuple[Path, Path, Path]:
    config = tmp_path / "project" / ".aiida"
    (config / "daemon" / "log").mkdir(parents=True)
    return config, config / "daemon" / "circus-p.pid", config / "daemon" / "log" / "circus-p.log"


def wait_for(pids: list[int]) -> None:
    """Until each process's command line is readable (a freshly started process may not show it)."""
    import psutil

    for pid in pids:
        for _ in range(100):
            if len(psutil.Process(pid).cmdline()) > 3:
                break
            time.sleep(0.02)


def test_a_crash_leaves_workers_and_the_helper_which_are_found(tmp_path, spawn):
    config, pid_file, log = paths(tmp_path)
    pid_file.write_text(f"{ended_pid()}\n")
    worker = spawn("-p", "p", "daemon", "worker", aiida_path=config)
    helper = spawn("from circus import stats; stats.main()", "--log-output", str(log))
    # the same profile name in another configuration directory, and another profile: not this daemon's
    other_dir = spawn("-p", "p", "daemon", "worker", aiida_path=tmp_path / "elsewhere")
    other_name = spawn("-p", "q", "daemon", "worker", aiida_path=config)
    wait_for([worker, helper, other_dir, other_name])
    state = daemon_processes("p", config, pid_file, log)
    assert not state.running and state.stale_pid_file
    assert state.workers == (worker,) and state.helpers == (helper,)
    assert state.leftovers == (worker, helper)
    text = state.describe()
    assert text.startswith("not running (a stale PID file names pid")
    assert f"1 daemon worker(s) left running without it, pid {worker}" in text
    assert f"statistics helper left running, pid {helper}" in text
    assert kill_fix(state.leftovers, "p") == f"kill {worker} {helper}   (then: verdi -p p daemon start)"


def test_a_running_daemon_has_no_leftovers(tmp_path, spawn):
    config, pid_file, log = paths(tmp_path)
    arbiter = spawn("circusd", str(config / "daemon" / "circus-p.ini"))
    worker = spawn("-p", "p", "daemon", "worker", aiida_path=config.parent)  # AIIDA_PATH: the folder above
    wait_for([arbiter, worker])
    pid_file.write_text(str(arbiter))
    state = daemon_processes("p", config, pid_file, log)
    assert state.running and not state.stale_pid_file
    assert state.workers == (worker,) and state.leftovers == ()
    assert state.describe() == f"running (arbiter pid {arbiter}, 1 worker(s))"


def test_a_reused_pid_is_not_the_arbiter(tmp_path, spawn):
    config, pid_file, log = paths(tmp_path)
    unrelated = spawn("an", "unrelated", "program")
    wait_for([unrelated])
    pid_file.write_text(str(unrelated))
    state = daemon_processes("p", config, pid_file, log)
    assert not state.running and state.stale_pid_file


def test_a_pid_file_naming_no_valid_pid_is_stale(tmp_path):
    config, pid_file, log = paths(tmp_path)
    pid_file.write_text("-5\n")
    state = daemon_processes("p", config, pid_file, log)
    assert state.pid == -5 and state.stale_pid_file and not state.running
    pid_file.write_text("not a number")
    assert daemon_processes("p", config, pid_file, log) == DaemonProcesses(None, False)


def test_no_daemon(tmp_path):
    config, pid_file, log = paths(tmp_path)
    state = daemon_processes("p", config, pid_file, log)
    assert state == DaemonProcesses(None, False)
    assert state.describe() == "not running" and state.leftovers == ()


def test_configuration_directory_of_aiida_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolved_config_dir(str(tmp_path / "x")) == (tmp_path / "x" / ".aiida").resolve()
    assert resolved_config_dir(str(tmp_path / "x" / ".aiida")) == (tmp_path / "x" / ".aiida").resolve()
    assert resolved_config_dir(f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}") == tmp_path / "a" / ".aiida"
    assert resolved_config_dir(None) == (tmp_path / ".aiida").resolve()


def test_doctor_does_not_read_the_queue_while_leftover_workers_hold_tasks(monkeypatch):
    """A leftover worker's processes are not lost: doctor must not advise ``verdi process repair``."""
    state = DaemonProcesses(pid=123, alive=False, workers=(501, 502), helpers=(503,))
    monkeypatch.setattr(doctor, "profile_daemon_processes", lambda name: state)

    def never(*args, **kwargs):
        raise AssertionError("the queue was read while leftover workers hold their tasks")

    monkeypatch.setattr("aiida_emlip.services.lost_tasks.check_process_tasks", never)
    report = doctor.Report()
    doctor.check_tasks(report, "p", doctor.check_daemon(report, "p"))
    assert report.lines[0].startswith("[ note  ] daemon     not running (a stale PID file names pid 123")
    assert report.lines[1].split() == "fix: kill 501 502 503 (then: verdi -p p daemon start)".split()
    assert report.lines[2] == (
        "[  ok   ] tasks      not checked while 2 leftover daemon worker(s) hold their tasks (end them first)"
    )
    assert report.ok  # a note, not a missing essential


def test_doctor_reads_the_queue_after_a_crash_without_leftovers(monkeypatch):
    """A stale PID file alone (aiida-core's "daemon running") does not stop doctor from reading the queue."""
    state = DaemonProcesses(pid=123, alive=False)
    monkeypatch.setattr(doctor, "profile_daemon_processes", lambda name: state)
    seen = []

    def check(name, daemon_running=None):
        from aiida_emlip.services.lost_tasks import TaskCheck

        seen.append(daemon_running)
        return TaskCheck(False, (7, 8), (8,))

    monkeypatch.setattr("aiida_emlip.services.lost_tasks.check_process_tasks", check)
    report = doctor.Report()
    doctor.check_tasks(report, "p", doctor.check_daemon(report, "p"))
    assert seen == [False]
    assert (
        report.lines[0]
        == "[  ok   ] daemon     not running (a stale PID file names pid 123, which has ended: a crash)"
    )
    assert "1 active process(es) without a task in the broker, never to continue: 8" in report.lines[1]
