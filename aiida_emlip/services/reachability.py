"""Whether PostgreSQL and RabbitMQ answer, and what to run (on Debian) when they do not."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "")


@dataclass(frozen=True)
class Service:
    """A network service the daemon profile needs, with its Debian package and init script."""

    name: str
    host: str
    port: int
    package: str
    init_script: str
    option: str
    """The ``aiida-emlip setup`` options that point at another server."""

    @property
    def local(self) -> bool:
        """Whether the service is expected on this machine (then it can be installed and started here)."""
        return is_local(self.host)


def postgres(host: str = "127.0.0.1", port: int = 5432) -> Service:
    """PostgreSQL, the storage of a ``core.psql_dos`` profile."""
    return Service("PostgreSQL", host, port, "postgresql", "postgresql", "--db-host/--db-port")


def rabbitmq(host: str = "127.0.0.1", port: int = 5672) -> Service:
    """RabbitMQ, the broker through which the daemon workers receive their tasks."""
    return Service(
        "RabbitMQ", host, port, "rabbitmq-server", "rabbitmq-server", "--broker-host/--broker-port"
    )


def is_local(host: str) -> bool:
    """Whether ``host`` names this machine."""
    return host.strip().lower() in LOCAL_HOSTS


def port_open(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def is_debian() -> bool:
    """Whether this is a Debian-like system with ``apt-get``."""
    return Path("/etc/debian_version").is_file() and shutil.which("apt-get") is not None


def package_installed(
    package: str, run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run
) -> bool:
    """Whether the Debian ``package`` is installed (``dpkg-query``; false where there is no dpkg)."""
    if shutil.which("dpkg-query") is None:
        return False
    try:
        proc = run(
            ["dpkg-query", "-W", "-f=${Status}", package],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and proc.stdout.strip().endswith("installed")


def _sudo() -> str:
    return "" if not hasattr(os, "geteuid") or os.geteuid() == 0 else "sudo "


def start_command(service: Service) -> str:
    """The command that starts an installed service (Debian init script; also works without systemd)."""
    return f"{_sudo()}service {service.init_script} start"


def install_commands(
    services: Sequence[Service], installed: Callable[[str], bool] | None = None
) -> list[str]:
    """The Debian commands that install (when missing) and start ``services``, in order."""
    installed = installed or package_installed
    missing = [s.package for s in services if not installed(s.package)]
    commands = []
    if missing:
        commands.append(f"{_sudo()}apt-get update")
        commands.append(f"{_sudo()}env DEBIAN_FRONTEND=noninteractive apt-get install -y {' '.join(missing)}")
    commands.extend(start_command(s) for s in services)
    return commands


def unreachable_message(
    service: Service, debian: bool | None = None, installed: Callable[[str], bool] | None = None
) -> str:
    """What went wrong with ``service`` and what to run about it."""
    installed = installed or package_installed
    head = f"{service.name} is not reachable at {service.host}:{service.port}."
    if not service.local:
        return (
            f"{head} Check that it runs there and accepts connections from this machine, "
            f"or give another server with {service.option}."
        )
    if installed(service.package):
        return (
            f"{head} It is installed here: if it is not running, start it with `{start_command(service)}` "
            f"(or `systemctl start {service.init_script}`); if it listens elsewhere, give {service.option}."
        )
    if debian if debian is not None else is_debian():
        commands = " && ".join(install_commands([service], installed=lambda _: False))
        return (
            f"{head} It is not installed. Install and start it with:\n    {commands}\n"
            "or rerun with --install-services to let aiida-emlip run these commands."
        )
    return f"{head} Install {service.name} and start it, or give a running server with {service.option}."


def unreachable(services: Sequence[Service], probe: Callable[[str, int], bool] = port_open) -> list[Service]:
    """The services among ``services`` that do not accept a TCP connection."""
    return [s for s in services if not probe(s.host, s.port)]
