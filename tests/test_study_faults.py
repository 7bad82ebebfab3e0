"""Faults under a real daemon in the middle of a study: the daemon taken down and restarted; the study killed.

Each test runs ``bench/bench_study_faults.py`` in a subprocess: a tiny study (6 pw.x runs of water, two
designs trained for 3 epochs, held-out predictions and the response validation's polarisability probe,
6 more pw.x runs) launched with ``aiida-emlip launch --daemon`` in its own throw-away ``core.psql_dos``
+ RabbitMQ profile, deleted afterwards.

* Restart: ``verdi daemon stop`` once some of the DFT's pw.x runs have finished and another has just
  started; ``verdi daemon start`` once that pw.x has ended unwatched. Then a crash (SIGKILL of the
  circus arbiter and of every worker) at the same point of the validation's pw.x runs, and a start
  again. The study still finishes OK, every configuration has exactly one pw.x calculation, finished
  OK, and no pw.x ran twice (one OS process per working directory, none in a folder AiiDA moved aside).
* Kill: ``verdi process kill`` of the study just after a pw.x started: every process of the tree ends
  (killed, or finished OK before the kill reached it), no pw.x is left running, and
  ``aiida-emlip status`` says what was lost and kept, in words.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from services_helpers import require_services, run_bench

pytestmark = [pytest.mark.daemon, pytest.mark.pw, pytest.mark.slow]

DFT_CONFIGURATIONS = 6
VALIDATION_CONFIGURATIONS = 6


def _bench(tmp_path: Path, mode: str) -> dict:
    _, result = run_bench(
        tmp_path, "bench_study_faults.py", mode, "--workers", "2", timeout=1100, env={"OMP_NUM_THREADS": "1"}
    )
    return result


def test_daemon_shut_down_then_crashed_mid_study(tmp_path):
    require_services()
    result = _bench(tmp_path, "--restart-daemon")
    shutdown, crash = result["faults"]
    summary = {k: result[k] for k in ("study_pk", "state", "exit_status", "wall_s")}
    summary["faults"] = [
        {k: f.get(k) for k in ("how", "injected", "stage", "at_s", "why")} for f in result["faults"]
    ]
    print(json.dumps(summary))
    assert shutdown["injected"] and shutdown["stage"] == "dft", shutdown
    # the shutdown caught the DFT half done: some pw.x finished, some still to run or running
    states = Counter(row["state"] for row in shutdown["before"] if row["configuration"].startswith("dft/"))
    assert states["ok"] >= 1 and states["ok"] < DFT_CONFIGURATIONS, states

    assert result["state"] == "ok" and result["exit_status"] == 0, result["exit_message"]
    rows = result["pw_calculations"]
    by_configuration = Counter(row["configuration"] for row in rows)
    dft = [c for c in by_configuration if c.startswith("dft/")]
    validation = [c for c in by_configuration if c.startswith("validate_response/")]
    assert len(dft) == DFT_CONFIGURATIONS and len(validation) == VALIDATION_CONFIGURATIONS, by_configuration
    # one pw.x calculation per configuration, finished OK: nothing repeated, nothing relabelled
    assert set(by_configuration.values()) == {1}, by_configuration
    assert all(row["state"] == "ok" for row in rows), rows
    # and one pw.x OS process per working directory (sampled): no job was submitted twice
    assert all(row["os_runs"] <= 1 for row in rows), rows
    # what had finished before a fault is the very calculation the study used (same pk, still ok)
    final = {row["configuration"]: row["pk"] for row in rows}
    for event in (shutdown, crash):
        for row in event.get("before", []):
            if row["state"] == "ok":
                assert final[row["configuration"]] == row["pk"], (event["how"], row)
    # the pw.x runs that were running at a fault ended while the daemon was down; the restarted daemon
    # found them done: the same calculation finished OK from that single run
    by_pk = {row["pk"]: row for row in rows}
    for event in (shutdown, crash):
        if not event["injected"]:
            continue
        assert event["pw_running_at_fault"], event
        for pk in event["pw_running_at_fault"]:
            assert by_pk[pk]["state"] == "ok" and by_pk[pk]["os_runs"] == 1, by_pk[pk]
    assert not result["pw_runs_elsewhere"], result["pw_runs_elsewhere"]
    assert not any(entry["pw_ran"] for entry in result["lost_and_found"]), result["lost_and_found"]
    if crash["injected"]:
        assert crash["stage"] == "validation", crash
    assert result["status_rc"] == 0 and "Traceback" not in result["status"], result["status"]
    assert "finished" in result["status"].splitlines()[0], result["status"]


def test_study_killed_under_the_daemon(tmp_path):
    require_services()
    result = _bench(tmp_path, "--kill-study")
    summary = {k: result[k] for k in ("study_pk", "state", "killed_at_s", "tree_ended_after_kill_s")}
    print(json.dumps(summary | {"status": result["status"]}))
    assert result["verdi_process_kill_rc"] == 0, result["verdi_process_kill"]
    assert result["state"] == "killed", result["state"]
    assert result["tree_ended_after_kill_s"] is not None, result["after"]
    # every process of the tree ended: killed, or finished before the kill; none running or waiting
    after = {row["pk"]: row for row in result["after"]}
    active = [row for row in after.values() if row["state"] in ("created", "waiting", "running")]
    assert not active, active
    # what was running ended killed, or finished OK when it ended before the kill reached it
    was_active = [row["pk"] for row in result["before"] if row["state"] in ("created", "waiting", "running")]
    assert was_active and all(after[pk]["state"] in ("killed", "ok") for pk in was_active), result["after"]
    assert [row["state"] for row in after.values() if row["path"] == "dft"] == ["killed"]
    assert result["pw_alive_before_kill"] and not result["pw_alive_after_kill"], result
    # what had finished before the kill is kept, unchanged
    done = [row["pk"] for row in result["before"] if row["state"] == "ok"]
    assert done and all(after[pk]["state"] == "ok" for pk in done)
    assert all(row["state"] in ("ok", "killed") for row in result["pw_calculations"])

    text = result["status"]
    assert result["status_rc"] == 0 and "Traceback" not in text, text
    assert "None" not in text, text
    lines = text.splitlines()
    assert "killed" in lines[0] and lines[1] == "  Killed through `verdi process kill`", text
    assert any(line.startswith("Lost (killed at stage dft): ") and "the report" in line for line in lines)
    assert "running" not in text and "waiting" not in text, text  # nothing is left running
