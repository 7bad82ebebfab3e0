"""PostgreSQL and RabbitMQ in tests: skipped where they are missing, never under ``CI=true``."""

from __future__ import annotations

import os

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
