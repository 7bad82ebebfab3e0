"""The dataset workchain under a real daemon (PostgreSQL + RabbitMQ, throw-away profile).

Runs ``bench/bench_dataset.py`` with three configurations in a subprocess: it creates its own
profile the way ``aiida-emlip setup --services`` does (a fresh database with the locale fallback,
RabbitMQ broker), submits the workchain to a daemon with two workers and deletes the profile, its
database and user afterwards. Under ``CI=true`` a missing service is a failure, never a skip.
"""

from __future__ import annotations

import subprocess

import pytest
from services_helpers import require_services, run_bench

pytestmark = [pytest.mark.daemon, pytest.mark.pw]


def _databases() -> set[str]:
    proc = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-tAc", "SELECT datname FROM pg_database"],
        capture_output=True,
        text=True,
        check=False,
    )
    return set(proc.stdout.split()) if proc.returncode == 0 else set()


def test_daemon_submit(tmp_path):
    require_services()
    before = _databases()
    # the benchmark makes and deletes its own profile: keep even its config folder out of ~/.aiida
    stdout, result = run_bench(tmp_path, "bench_dataset.py", "--n", "3")
    assert "core.psql_dos (database locale" in stdout
    assert result["n_configurations"] == 3
    assert result["workchain_daemon_s"] > 0 and result["bare_pw_sum_s"] > 0
    assert not any(name.startswith("emlip_emlip_bench_") for name in _databases() - before)
