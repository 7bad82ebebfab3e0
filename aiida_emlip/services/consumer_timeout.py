"""RabbitMQ's ``consumer_timeout``: the value in force, where it was read, and how to raise it.

RabbitMQ (3.8.15 and later) closes the channel of a consumer that has not acknowledged a message
within ``consumer_timeout`` milliseconds, 30 minutes by default. An AiiDA daemon worker acknowledges a
process's task only when the process ends, so the task of a process that runs longer is put back in the
queue and handed to another worker, which takes the process up again while the first still runs it:
on a two-worker daemon a calcfunction that outlived a 15 s timeout ran twice
(``bench/consumer_timeout_probe.py``).
The value is read, in this order, from:

1. the running broker, ``rabbitmqctl eval 'application:get_env(rabbit, consumer_timeout).'`` (needs
   the Erlang cookie: root or the ``rabbitmq`` user, broker on this machine);
2. the configuration files: ``advanced.config`` (Erlang terms; wins) and ``rabbitmq.conf``
   (``consumer_timeout = N``), at ``/etc/rabbitmq`` or where ``RABBITMQ_CONFIG_FILE``,
   ``RABBITMQ_ADVANCED_CONFIG_FILE`` or ``rabbitmq-env.conf`` point;

and is otherwise reported as unknown.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MS = 1_800_000
"""RabbitMQ's default since 3.8.15: 30 minutes."""
RECOMMENDED_MS = 36_000_000
"""What the fix suggests: 10 hours."""
LONG_ENOUGH_MS = RECOMMENDED_MS
"""Values from the recommended 10 hours up (or no timeout) are reported as fine."""
RAISE_NOW_EXPRESSION = f"application:set_env(rabbit, consumer_timeout, {RECOMMENDED_MS})."
"""What ``rabbitmqctl eval`` runs to raise the timeout of the running broker (for channels opened later)."""
CONSEQUENCE = "daemon processes that run longer are handed to a second worker and may run twice"
"""What a finite timeout does, as observed with a real broker and daemon."""
CONFIG_DIR = Path("/etc/rabbitmq")
RABBITMQCTL_QUERY = "application:get_env(rabbit, consumer_timeout)."

#: ``None`` in these results means "no timeout"; :data:`NOT_SET` means the source does not set it.
NOT_SET = object()


@dataclass(frozen=True)
class ConsumerTimeout:
    """What is known about the broker's ``consumer_timeout``."""

    value_ms: int | None
    """Milliseconds, or ``None`` for no timeout (meaningful only when ``known``)."""
    known: bool
    source: str
    """Where the value was read, or why it is unknown."""

    @property
    def sufficient(self) -> bool:
        """Whether long daemon processes are safe: no timeout, or one of :data:`LONG_ENOUGH_MS` or more."""
        return self.known and (self.value_ms is None or self.value_ms >= LONG_ENOUGH_MS)

    def describe(self) -> str:
        """One line for ``doctor``."""
        if not self.known:
            return f"consumer_timeout unknown ({self.source}); RabbitMQ's default is 30 min"
        if self.value_ms is None:
            return f"consumer_timeout off (from {self.source}): daemon processes may run any time"
        return f"consumer_timeout {self.value_ms} ms = {format_duration(self.value_ms)} (from {self.source})"


def format_duration(ms: int) -> str:
    """``1800000`` -> ``30 min``; ``36000000`` -> ``10 h``."""
    minutes = ms / 60_000
    if minutes >= 120:
        return f"{minutes / 60:g} h"
    return f"{minutes:g} min" if minutes >= 1 else f"{ms / 1000:g} s"


def _value(text: str) -> int | object | None:
    text = text.strip().strip('"').lower()
    if text in ("undefined", "infinity"):
        return None
    return int(text) if text.isdigit() else NOT_SET


def parse_rabbitmq_conf(text: str) -> int | object | None:
    """``consumer_timeout = N`` of a ``rabbitmq.conf`` (sysctl format); the last one wins."""
    found: int | object | None = NOT_SET
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        key, sep, value = line.partition("=")
        if sep and key.strip() == "consumer_timeout":
            parsed = _value(value)
            if parsed is not NOT_SET:
                found = parsed
    return found


def parse_advanced_config(text: str) -> int | object | None:
    """``{consumer_timeout, N | undefined}`` in the ``rabbit`` section of an ``advanced.config``."""
    body = "\n".join(line.split("%", 1)[0] for line in text.splitlines())
    matches = re.findall(r"\{\s*consumer_timeout\s*,\s*([A-Za-z0-9_]+)\s*\}", body)
    return _value(matches[-1]) if matches else NOT_SET


def parse_rabbitmqctl(output: str) -> int | object | None:
    """The answer of ``rabbitmqctl eval`` to :data:`RABBITMQCTL_QUERY`.

    ``{ok,N}`` or ``{ok,undefined}``; a bare ``undefined`` (not in the environment) means no timeout.
    """
    text = output.strip().splitlines()[-1].strip() if output.strip() else ""
    match = re.fullmatch(r"\{ok,\s*([A-Za-z0-9_]+)\}", text)
    if match:
        return _value(match.group(1))
    if text == "undefined":  # not in the application environment: the broker applies no timeout
        return None
    return NOT_SET


def _env_file_settings(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of ``rabbitmq-env.conf``."""
    settings = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return settings
    for line in lines:
        key, sep, value = line.split("#", 1)[0].strip().partition("=")
        if sep:
            settings[key.strip().removeprefix("export ").strip()] = value.strip().strip("\"'")
    return settings


def config_files(config_dir: Path = CONFIG_DIR, environ: dict[str, str] | None = None) -> tuple[Path, Path]:
    """The ``rabbitmq.conf`` and ``advanced.config`` that a broker on this machine reads."""
    environ = os.environ if environ is None else environ
    env_file = _env_file_settings(config_dir / "rabbitmq-env.conf")
    conf = (
        environ.get("RABBITMQ_CONFIG_FILE")
        or env_file.get("CONFIG_FILE")
        or str(config_dir / "rabbitmq.conf")
    )
    advanced = (
        environ.get("RABBITMQ_ADVANCED_CONFIG_FILE")
        or env_file.get("ADVANCED_CONFIG_FILE")
        or str(config_dir / "advanced.config")
    )
    conf_path = Path(conf)
    if not conf_path.suffix:
        conf_path = conf_path.with_suffix(".conf")
    return conf_path, Path(advanced)


def from_rabbitmqctl(
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
) -> ConsumerTimeout | str:
    """The running broker's value, or why it could not be asked."""
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        return "rabbitmqctl not found"
    try:
        proc = run([exe, "eval", RABBITMQCTL_QUERY], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"rabbitmqctl failed ({error.__class__.__name__})"
    if proc.returncode != 0:
        return "rabbitmqctl not permitted (run doctor as root or the rabbitmq user)"
    value = parse_rabbitmqctl(proc.stdout)
    if value is NOT_SET:
        return f"rabbitmqctl answered {proc.stdout.strip()[-80:]!r}"
    return ConsumerTimeout(value, True, "rabbitmqctl, the running broker")  # type: ignore[arg-type]


def from_config_files(conf: Path, advanced: Path) -> ConsumerTimeout | str:
    """The configured value, or why the files do not tell."""
    readable = []
    for path, parse in ((advanced, parse_advanced_config), (conf, parse_rabbitmq_conf)):
        try:
            text = path.read_text()
        except OSError:
            continue
        readable.append(str(path))
        value = parse(text)
        if value is not NOT_SET:
            return ConsumerTimeout(value, True, str(path))  # type: ignore[arg-type]
    if readable:
        return ConsumerTimeout(DEFAULT_MS, True, f"RabbitMQ's default: not set in {', '.join(readable)}")
    return f"no {conf} or {advanced}"


def read_consumer_timeout(
    host: str,
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
    files: tuple[Path, Path] | None = None,
) -> ConsumerTimeout:
    """The ``consumer_timeout`` of the broker at ``host``: asked, else read from its files, else unknown."""
    from aiida_emlip.services.reachability import is_local

    if not is_local(host):
        return ConsumerTimeout(None, False, f"the broker runs on {host}: its settings are not readable here")
    reasons = []
    for attempt in (lambda: from_rabbitmqctl(run), lambda: from_config_files(*(files or config_files()))):
        result = attempt()
        if isinstance(result, ConsumerTimeout):
            return result
        reasons.append(result)
    return ConsumerTimeout(None, False, "; ".join(reasons))


def raise_fix(conf: Path | None = None, advanced: Path | None = None) -> str:
    """How to raise the timeout: persistently in the files, and at once in the running broker."""
    default_conf, default_advanced = config_files()
    conf = conf or default_conf
    advanced = advanced or default_advanced
    return (
        f"add `consumer_timeout = {RECOMMENDED_MS}` ({format_duration(RECOMMENDED_MS)}) to {conf}, or "
        f"`[{{rabbit, [{{consumer_timeout, undefined}}]}}].` (no timeout) to {advanced}, then "
        "`service rabbitmq-server restart`; until then: "
        f"`rabbitmqctl eval '{RAISE_NOW_EXPRESSION}'` "
        "and restart the daemon (its channels keep the old value)"
    )
