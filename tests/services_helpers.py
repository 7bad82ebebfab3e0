"""PostgreSQL and RabbitMQ in tests: skipped where they are missing, never under ``CI=true``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aiida_emlip.services.reachability import port_open


def require_services() -> None:
    """Skip (fail under ``CI=true``) unless PostgreSQL (5432) and RabbitMQ (5672) answer on 127.0.0.1."""
    down = [
        name for name, port in (("PostgreSQL", 5432), ("RabbitMQ", 5672)) if not port_open("127.0.0.1", port)
    ]
    if down:
        message = f"services not reachable: {down}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_bench(
    tmp_path: Path, script: str, *args: str, timeout: float = 900, env: dict[str, str] | None = None
) -> tuple[str, dict[str, Any]]:
    """Run ``bench/SCRIPT ARGS --json OUT`` in a subprocess (it makes and deletes its own throw-away
    services profile, its config folder under ``tmp_path``); assert it exits 0; return its stdout and
    the JSON it wrote."""
    out = tmp_path / f"{Path(script).stem}.json"
    full_env = {**os.environ, "AIIDA_PATH": str(tmp_path / "aiida"), **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())
