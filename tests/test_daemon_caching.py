"""`launch --daemon`: the notes it prints — caching as the profile says, a short consumer_timeout, a
daemon that does not run."""

from __future__ import annotations

import contextlib


def test_launch_daemon_says_when_the_profile_caches_otherwise():
    """Daemon workers cache as the profile says: `launch --daemon` notes where that differs from --cache."""
    from aiida.manage.caching import disable_caching, enable_caching

    from aiida_emlip.cache_version import CACHED_PROCESSES
    from aiida_emlip.cli.study import daemon_caching_note

    with disable_caching():
        note = daemon_caching_note(True, "p")
        assert note is not None and "leaves caching off for quantumespresso.pw" in note
        assert "verdi -p p config set caching.enabled_for" in note and "daemon restart" in note
        assert daemon_caching_note(False, "p") is None
    with enable_caching(identifier="aiida.calculations:quantumespresso.pw"):
        note = daemon_caching_note(False, "p")
        assert note is not None and "--no-cache does not reach the daemon" in note
        assert "caches quantumespresso.pw;" in note and "config unset caching.enabled_for" in note
    with contextlib.ExitStack() as stack:
        for identifier in CACHED_PROCESSES:
            stack.enter_context(enable_caching(identifier=identifier))
        assert daemon_caching_note(True, "p") is None


def test_launch_daemon_notes_a_short_consumer_timeout():
    from aiida_emlip.cli.study import daemon_timeout_note
    from aiida_emlip.services.consumer_timeout import ConsumerTimeout

    asked = []

    def short(host):
        asked.append(host)
        return ConsumerTimeout(1_800_000, True, "rabbitmqctl")

    note = daemon_timeout_note(short)
    assert asked and note is not None
    assert "consumer_timeout 1800000 ms = 30 min" in note and "may run twice" in note
    assert "rabbitmqctl eval" in note  # the fix, as doctor prints it
    assert daemon_timeout_note(lambda host: ConsumerTimeout(None, True, "rabbitmqctl")) is None  # off
    assert daemon_timeout_note(lambda host: ConsumerTimeout(None, False, "remote broker")) is None


def test_launch_daemon_says_when_no_daemon_runs_or_a_crashed_one_left_workers():
    from aiida_emlip.cli.study import daemon_state_note
    from aiida_emlip.services.daemon_processes import DaemonProcesses

    assert daemon_state_note(DaemonProcesses(pid=10, alive=True, workers=(11,)), "p") is None
    none = daemon_state_note(DaemonProcesses(pid=None, alive=False), "p")
    assert none == "No daemon is running: start one with `verdi -p p daemon start`"
    crashed = daemon_state_note(DaemonProcesses(pid=10, alive=False, workers=(11, 12)), "p")
    assert crashed is not None
    assert crashed.startswith("The daemon is not running (a stale PID file names pid 10")
    assert "2 daemon worker(s) left running without it, pid 11 12" in crashed
    assert "`aiida-emlip doctor --profile p`" in crashed
    # a stale PID file without leftovers: nothing runs the study until a daemon is started
    assert daemon_state_note(DaemonProcesses(pid=10, alive=False), "p") == none
