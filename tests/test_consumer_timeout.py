"""RabbitMQ's ``consumer_timeout`` against a real daemon: what a short one does, and that the fix works.

The broker's ``consumer_timeout`` is set to 15 s (and ``channel_tick_interval``, how often a channel
checks it, to 5 s) at runtime with ``rabbitmqctl eval`` (root) for the module, and the old values are put
back afterwards whatever happens (the broker is shared). ``bench/consumer_timeout_probe.py`` runs in a
subprocess with its own throw-away profile and a two-worker daemon (as ``setup --services`` advises) and
submits a calcfunction that sleeps 45 s in the worker, logging every execution:

* as is, the broker closes the worker's channel at 15 s, the task goes back to the queue, the second
  worker takes it up and runs the calcfunction a second time; ``doctor`` flags the 15 s value;
* after the runtime fix that ``doctor`` prints (``rabbitmqctl eval`` of ``RAISE_NOW_EXPRESSION``, then
  the daemon (re)started), the same process runs once and the broker logs no timeout; ``doctor`` is
  content.

Under ``CI=true`` a missing service or an unusable ``rabbitmqctl`` is a failure, never a skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from services_helpers import require_services, run_bench

from aiida_emlip.cli.doctor import Report, check_consumer_timeout
from aiida_emlip.services import consumer_timeout as ct

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

pytestmark = [pytest.mark.daemon, pytest.mark.slow]

SHORT_MS = 15_000
TICK_MS = 5_000
SLEEP_S = 45
BROKER = "the running broker"
TIMED_OUT = f"timed out waiting for delivery acknowledgement. Timeout used: {SHORT_MS} ms"


def _rabbitmqctl_usable() -> None:
    """Skip (fail under ``CI=true``) unless ``rabbitmqctl eval`` answers here (root, local broker)."""
    try:
        proc = subprocess.run(
            ["rabbitmqctl", "eval", ct.RABBITMQCTL_QUERY],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        problem = None if proc.returncode == 0 else f"rabbitmqctl eval failed: {proc.stdout}{proc.stderr}"
    except (OSError, subprocess.TimeoutExpired) as error:
        problem = f"rabbitmqctl not usable: {error}"
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(problem)
        pytest.skip(problem)


@pytest.fixture(scope="module")
def short_timeout():
    """The broker's consumer_timeout at 15 s and channel tick at 5 s; the old values back afterwards."""
    require_services()
    _rabbitmqctl_usable()
    from rabbit_settings import get_rabbit_env, rabbit_env

    with rabbit_env(consumer_timeout=SHORT_MS, channel_tick_interval=TICK_MS) as old:
        yield old
    assert {key: get_rabbit_env(key) for key in old} == old


def _doctor_lines() -> list[str]:
    report = Report()
    check_consumer_timeout(report, "127.0.0.1")
    return report.lines


def test_short_timeout_runs_a_calcfunction_twice(short_timeout, tmp_path):
    from rabbit_settings import get_rabbit_env

    assert get_rabbit_env("consumer_timeout") == str(SHORT_MS)
    lines = _doctor_lines()
    assert lines[0].startswith("[ note  ] consumer   consumer_timeout 15000 ms = 15 s (from rabbitmqctl")
    assert ct.CONSEQUENCE in lines[0] and ct.RAISE_NOW_EXPRESSION in lines[1]

    _, result = run_bench(
        tmp_path, "consumer_timeout_probe.py", "--kind", "calcfunction", "--sleep", str(SLEEP_S)
    )
    assert result["broker"]["consumer_timeout"] == str(SHORT_MS)
    assert any(TIMED_OUT in line for line in result["rabbit_log"]), result["rabbit_log"]
    # the requeued task reached the second worker, which ran the calcfunction again
    pids = {line.split()[0] for line in result["execution_lines"]}
    assert result["executions"] >= 2 and len(pids) == 2, result
    # the node itself ended once, from the first worker
    assert result["process_state"] == "finished" and result["exit_status"] == 0


def test_the_advised_fix_runs_it_once(short_timeout, tmp_path):
    _, result = run_bench(
        tmp_path,
        "consumer_timeout_probe.py",
        "--kind",
        "calcfunction",
        "--sleep",
        str(SLEEP_S),
        "--apply-fix",
    )
    assert result["broker"]["consumer_timeout"] == str(ct.RECOMMENDED_MS)
    assert not any("timed out" in line for line in result["rabbit_log"]), result["rabbit_log"]
    assert result["executions"] == 1, result
    assert result["process_state"] == "finished" and result["is_finished_ok"]
    assert SLEEP_S <= result["states"][-1][0] < SLEEP_S + 30
    # the task was acknowledged: nothing waits in, or is held from, the profile's queue
    assert len(result["task_queue"]) == 1 and result["task_queue"][0].split()[1:3] == ["0", "0"]
    # the probe put the short value back; doctor reads the fix's value as sufficient
    from rabbit_settings import get_rabbit_env, rabbit_env, rabbitmqctl_eval

    assert get_rabbit_env("consumer_timeout") == str(SHORT_MS)
    with rabbit_env(consumer_timeout=SHORT_MS):
        rabbitmqctl_eval(ct.RAISE_NOW_EXPRESSION)
        lines = _doctor_lines()
    assert lines == [
        f"[  ok   ] consumer   consumer_timeout {ct.RECOMMENDED_MS} ms = 10 h (from rabbitmqctl, {BROKER})"
    ]
