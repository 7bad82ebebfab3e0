"""``aiida-emlip doctor`` names the active processes whose task the broker lost (real PostgreSQL + RabbitMQ).

A throw-away services profile is made as ``setup --services`` makes one, in a subprocess with its own
``AIIDA_PATH``. A process node stored as ``waiting`` without ever being submitted is what a daemon
stopped mid-run leaves when aiida-core deletes a task as a duplicate: active, and no task in the queue.
While a daemon runs, its workers hold their tasks out of the queue's view, so doctor does not read it;
nor while workers that a crash of the daemon's arbiter left running hold theirs (killed here for real).
Under ``CI=true`` a missing service is a failure, never a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from services_helpers import BENCH, require_services

pytestmark = [pytest.mark.daemon]

DAEMON_RUNS = "not checked while the daemon runs (its workers hold their tasks)"
SCRIPT = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, time
    from pathlib import Path
    sys.path.insert(0, {bench!r})
    from services_profile import delete_profile, scratch_environment, start_daemon

    def wait(done, seconds=30.0):
        end = time.monotonic() + seconds
        while not done() and time.monotonic() < end:
            time.sleep(0.1)

    work, name = scratch_environment("emlip-tasks")
    from aiida_emlip.profile import select_services_profile
    from aiida_emlip.services.postgres import Superuser
    from aiida_emlip.services.profile import Broker, create_services_profile

    create_services_profile(select_services_profile(name), Superuser(), Broker())
    try:
        from aiida import load_profile, orm
        from plumpy import ProcessState

        load_profile(name, allow_switch=True)
        from aiida.engine.daemon.client import get_daemon_client
        from aiida_emlip.services.daemon_processes import profile_daemon_processes
        doctor = [sys.executable, "-m", "aiida_emlip.cli", "doctor", "--profile", name]
        before = subprocess.run(doctor, capture_output=True, text=True)
        node = orm.WorkflowNode()
        node.set_process_state(ProcessState.WAITING)
        node.store()
        after = subprocess.run(doctor, capture_output=True, text=True)
        start_daemon(name, 1)
        running = subprocess.run(doctor, capture_output=True, text=True)
        # a crash of the arbiter alone: its worker and its statistics helper live on
        state = profile_daemon_processes(name)
        os.kill(state.pid, signal.SIGKILL)
        wait(lambda: not profile_daemon_processes(name).running)
        crashed = subprocess.run(doctor, capture_output=True, text=True)
        left = profile_daemon_processes(name)
        for pid in left.leftovers:
            os.kill(pid, signal.SIGKILL)
        wait(lambda: not profile_daemon_processes(name).leftovers)
        cleared = subprocess.run(doctor, capture_output=True, text=True)
        Path(get_daemon_client(name).circus_pid_file).unlink()  # as `verdi daemon start` would
        print(json.dumps({{"pk": node.pk, "name": name, "before": before.stdout, "after": after.stdout,
                          "running": running.stdout, "crashed": crashed.stdout, "cleared": cleared.stdout,
                          "arbiter": state.pid, "workers": left.workers, "helpers": left.helpers,
                          "rc": [before.returncode, after.returncode]}}))
    finally:
        delete_profile(name, work)
    """
)


def test_doctor_names_active_processes_without_a_task(tmp_path):
    require_services()
    script = tmp_path / "lost.py"
    script.write_text(SCRIPT.format(bench=str(BENCH)))
    env = {**os.environ, "AIIDA_PATH": str(tmp_path / "aiida")}
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    before = [line for line in result["before"].splitlines() if "] tasks " in line]
    ok = "[  ok   ] tasks      each of the 0 active process(es) has its task in the broker"
    assert before == [ok], before
    lines = result["after"].splitlines()
    lost = next(i for i, line in enumerate(lines) if "] tasks " in line)
    expected = f"without a task in the broker, never to continue: {result['pk']}"
    assert lines[lost].startswith("[ note  ] tasks      1 active process(es)") and expected in lines[lost]
    name = result["name"]
    fix = f"fix: verdi -p {name} process repair (then: verdi -p {name} daemon start)"
    assert lines[lost + 1].split() == fix.split()
    running = [line for line in result["running"].splitlines() if "] tasks " in line or "] daemon " in line]
    assert running[0].startswith("[  ok   ] daemon     running (arbiter pid ") and "1 worker(s)" in running[0]
    assert running[1:] == [f"[  ok   ] tasks      {DAEMON_RUNS}"], running
    # the arbiter killed: its worker (and circus's statistics helper) named, the queue left alone
    assert len(result["workers"]) == 1 and len(result["helpers"]) == 1, result
    lines = result["crashed"].splitlines()
    at = next(i for i, line in enumerate(lines) if "] daemon " in line)
    stale = f"not running (a stale PID file names pid {result['arbiter']}, which has ended: a crash)"
    assert lines[at].startswith(f"[ note  ] daemon     {stale}; 1 daemon worker(s) left running"), lines[at]
    kill = " ".join(str(pid) for pid in result["workers"] + result["helpers"])
    assert lines[at + 1].split() == f"fix: kill {kill} (then: verdi -p {name} daemon start)".split()
    held = "not checked while 1 leftover daemon worker(s) hold their tasks (end them first)"
    assert lines[at + 2] == f"[  ok   ] tasks      {held}"
    # the leftovers ended: the queue is read again, and the process without a task is named
    lines = result["cleared"].splitlines()
    at = next(i for i, line in enumerate(lines) if "] daemon " in line)
    assert lines[at] == f"[  ok   ] daemon     {stale}"
    assert lines[at + 1].startswith("[ note  ] tasks      1 active process(es)") and expected in lines[at + 1]
    assert result["rc"] == [1, 1]  # the throw-away profile has no computer or code: doctor says so
