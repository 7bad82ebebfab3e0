"""The dataset workchain under a real daemon (PostgreSQL + RabbitMQ, throw-away profile).

Runs ``bench/bench_dataset.py`` with three configurations in a subprocess: it creates its own
profile with ``verdi presto --use-postgres`` (RabbitMQ broker), submits the workchain to a daemon
with two workers and deletes the profile and its database afterwards. Under ``CI=true`` a missing
service is a failure, never a skip.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.daemon, pytest.mark.pw]

REPO = Path(__file__).resolve().parent.parent


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_daemon_submit(tmp_path):
    services = {"PostgreSQL": _port_open(5432), "RabbitMQ": _port_open(5672)}
    if not all(services.values()):
        message = f"services not reachable: {[k for k, v in services.items() if not v]}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path / "bench.json"
    # the benchmark makes and deletes its own profile: keep even its config folder out of ~/.aiida
    env = {**os.environ, "AIIDA_PATH": str(tmp_path / "aiida")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_dataset.py"), "--n", "3", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["n_configurations"] == 3
    assert result["workchain_daemon_s"] > 0 and result["bare_pw_sum_s"] > 0
