"""Fault injection under a real daemon: one pw.x is killed (SIGKILL) in the middle of its run.

Runs ``bench/bench_dataset.py --kill-pw`` with three configurations and one daemon worker in a
subprocess (its own throw-away ``core.psql_dos`` + RabbitMQ profile, deleted afterwards): once a pw.x
of the workchain is in its SCF loop (found by the CalcJob's working directory), its OS process gets
SIGKILL. The parser then fails the calculation (no complete stdout or XML), no ``PwBaseWorkChain``
handler claims that exit code, and the dataset protocol's ``on_unhandled_failure: restart_once`` runs
it once more (``max_iterations: 2``): the configuration is relabelled by a second pw.x run, the others
ran once, and the dataset holds all three.
"""

from __future__ import annotations

import json
import math

import pytest
from services_helpers import require_services, run_bench

pytestmark = [pytest.mark.daemon, pytest.mark.pw, pytest.mark.slow]

N = 3


def test_pw_killed_mid_run(tmp_path):
    require_services()
    _, result = run_bench(tmp_path, "bench_dataset.py", "--n", str(N), "--workers", "1", "--kill-pw")
    assert result["terminated"] and result["daemon_workers"] == 1
    assert result["pw_age_at_kill_s"] > 0 and result["scf_iterations_at_kill"] >= 0
    summary = ("killed_key", "pw_age_at_kill_s", "scf_iterations_at_kill", "workchain_daemon_s")
    print(json.dumps({k: result[k] for k in summary} | {"report_failed": result["report"]["failed"]}))
    killed = result["killed_key"]
    keys = sorted(result["pw_base"])
    assert len(keys) == N and killed in keys
    others = [key for key in keys if key != killed]

    # the other configurations are labelled, with finite energies, and their pw.x ran exactly once
    energies = result["energies"]
    assert set(others) <= set(energies)
    assert all(math.isfinite(energies[key]) for key in others)
    assert all(len(result["pw_calculations"][key]) == 1 for key in others)
    assert all(result["pw_calculations"][key][0]["exit_status"] == 0 for key in others)

    report = result["report"]
    assert report["n_configurations"] == N
    calcs = result["pw_calculations"][killed]
    assert calcs[0]["pk"] == result["killed_calculation_pk"]
    assert calcs[0]["exit_status"] not in (None, 0)  # the killed run itself failed
    # relabelled by the restart of its PwBaseWorkChain: one more pw.x run, finished OK
    assert len(calcs) == 2 and calcs[1]["exit_status"] == 0, calcs
    assert math.isfinite(energies[killed]) and len(energies) == N
    assert result["exit_status"] == 0, result["exit_message"]
    assert report["n_finished"] == N and report["n_failed"] == 0
