"""The RabbitMQ broker's ``rabbit`` application values, read and set at runtime with ``rabbitmqctl eval``.

Needs root (or the ``rabbitmq`` user) and the broker on this machine. No side effects on import: the
tests use :func:`rabbit_env` to change the shared broker for a while and put the old values back.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator


def rabbitmqctl_eval(expression: str) -> str:
    """``rabbitmqctl eval EXPRESSION``'s answer; RuntimeError when it fails (not root, no broker)."""
    proc = subprocess.run(
        ["rabbitmqctl", "eval", expression], capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl eval {expression!r} failed: {proc.stdout}{proc.stderr}")
    return proc.stdout.strip()


def get_rabbit_env(key: str) -> str:
    """The broker's ``rabbit`` application value of ``key``: an Erlang term, ``undefined`` when unset."""
    answer = rabbitmqctl_eval(f"application:get_env(rabbit, {key}).")
    match = re.fullmatch(r"\{ok,(.*)\}", answer)
    return match.group(1) if match else "undefined"


def set_rabbit_env(key: str, value: str) -> None:
    """Set (``undefined``: unset) the broker's ``rabbit`` application value of ``key`` at runtime."""
    if value == "undefined":
        rabbitmqctl_eval(f"application:unset_env(rabbit, {key}).")
    else:
        rabbitmqctl_eval(f"application:set_env(rabbit, {key}, {value}).")


@contextlib.contextmanager
def rabbit_env(**values: str | int | None) -> Iterator[dict[str, str]]:
    """The broker's ``rabbit`` values set for the block (``None``: left alone), the old ones put back
    afterwards whatever happens; yields the old values."""
    old = {key: get_rabbit_env(key) for key, value in values.items() if value is not None}
    try:
        for key, value in values.items():
            if value is not None:
                set_rabbit_env(key, str(value))
        yield old
    finally:
        for key, value in old.items():
            set_rabbit_env(key, value)
