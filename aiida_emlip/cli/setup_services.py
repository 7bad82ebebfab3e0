"""``aiida-emlip setup --services``: the PostgreSQL + RabbitMQ profile that the daemon needs.

Both services are looked for first; when one does not answer, setup says what to run (install or
start it) and exits with :data:`EXIT_SERVICES` before anything is created. ``--install-services`` runs
those commands itself (Debian/Ubuntu, ``apt-get``), printing each one first; nothing is ever
installed without it.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from aiida_emlip.profile import ProfileTarget, select_services_profile
from aiida_emlip.services.consumer_timeout import CONSEQUENCE, raise_fix, read_consumer_timeout
from aiida_emlip.services.reachability import (
    Service,
    install_commands,
    is_debian,
    port_open,
    postgres,
    rabbitmq,
    unreachable,
    unreachable_message,
)

if TYPE_CHECKING:
    from aiida.manage.configuration.profile import Profile

EXIT_SERVICES = 3
"""Exit code when PostgreSQL or RabbitMQ is missing, not running or refuses the connection."""
SERVICE_WAIT_S = 60.0
"""How long ``--install-services`` waits for the started services to answer."""

#: The options that only mean something with --services: name -> (flag, default, type, help).
SERVICE_OPTIONS: dict[str, tuple[str, Any, type, str]] = {
    "db_host": ("--db-host", "127.0.0.1", str, "PostgreSQL host."),
    "db_port": ("--db-port", 5432, int, "PostgreSQL port."),
    "db_superuser": (
        "--db-superuser",
        "postgres",
        str,
        "PostgreSQL user that may create databases and users.",
    ),
    "db_superuser_password": ("--db-superuser-password", None, str, "Its password (trust/peer auth: none)."),
    "broker_host": ("--broker-host", "127.0.0.1", str, "RabbitMQ host."),
    "broker_port": ("--broker-port", 5672, int, "RabbitMQ port."),
    "broker_username": ("--broker-username", "guest", str, "RabbitMQ user."),
    "broker_password": ("--broker-password", "guest", str, "RabbitMQ password."),
    "broker_vhost": ("--broker-vhost", "", str, "RabbitMQ virtual host."),
}


def services_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--services``, ``--install-services`` and the connection options to a command."""
    for name, (flag, default, kind, text) in reversed(SERVICE_OPTIONS.items()):
        func = click.option(
            flag,
            name,
            default=default,
            type=kind,
            show_default=default not in (None, ""),
            help=f"{text} [--services]",
        )(func)
    func = click.option(
        "--install-services",
        is_flag=True,
        help="Implies --services: install (apt-get) and start PostgreSQL and RabbitMQ where they do not "
        "answer, printing each command first (Debian/Ubuntu).",
    )(func)
    return click.option(
        "--services",
        is_flag=True,
        help="Create or reuse a PostgreSQL + RabbitMQ profile (core.psql_dos, default name emlip-services) "
        "for the daemon instead of the isolated SQLite profile. --profile NAME names it.",
    )(func)


def check_services_options(values: dict[str, Any]) -> None:
    """``--install-services`` implies ``--services``; the connection options need it."""
    if values["install_services"]:
        values["services"] = True
    if values["services"]:
        return
    ctx = click.get_current_context()
    given = [
        flag
        for name, (flag, *_rest) in SERVICE_OPTIONS.items()
        if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)
    ]
    if given:
        raise click.UsageError(f"{', '.join(given)} need --services")


def _fail(lines: list[str]) -> NoReturn:
    for line in lines:
        click.echo(line, err=True)
    raise SystemExit(EXIT_SERVICES)


def install_services(missing: list[Service], run: Callable[..., Any] = subprocess.run) -> None:
    """Run the Debian commands that install and start ``missing``, each printed first; exit on failure."""
    remote = [s for s in missing if not s.local]
    if remote:
        _fail(
            [unreachable_message(s) for s in remote] + ["--install-services only installs on this machine."]
        )
    if not is_debian():
        _fail(["--install-services needs Debian or Ubuntu (apt-get): install the services yourself."])
    for command in install_commands(missing):
        click.echo(f"$ {command}")
        proc = run(shlex.split(command), check=False)
        if proc.returncode != 0:
            _fail([f"`{command}` failed (exit code {proc.returncode}): nothing else was done."])
    deadline = time.monotonic() + SERVICE_WAIT_S
    while unreachable(missing) and time.monotonic() < deadline:
        time.sleep(1.0)


def services_profile_or_exit(
    profile_name: str | None, values: dict[str, Any]
) -> tuple[ProfileTarget, Profile, str]:
    """Check both services, then create or reuse the services profile; exit 3 with what to do otherwise."""
    from aiida_emlip.services.postgres import Superuser
    from aiida_emlip.services.profile import Broker, ServicesProfileError, load_or_create_services_profile

    services = [
        postgres(values["db_host"], values["db_port"]),
        rabbitmq(values["broker_host"], values["broker_port"]),
    ]
    down = unreachable(services, probe=port_open)
    if down and values["install_services"]:
        install_services(down)
        down = unreachable(down, probe=port_open)
    if down:
        _fail(
            [f"Error: {unreachable_message(s)}" for s in down]
            + [
                "Nothing was created. (The default profile of `aiida-emlip setup`, without --services, needs "
                "neither service; the daemon needs both.)"
            ]
        )
    target = select_services_profile(profile_name)
    superuser = Superuser(
        values["db_host"], values["db_port"], values["db_superuser"], values["db_superuser_password"]
    )
    broker = Broker(
        values["broker_host"],
        values["broker_port"],
        values["broker_username"],
        values["broker_password"],
        values["broker_vhost"],
    )
    try:
        profile, status = load_or_create_services_profile(target, superuser, broker)
    except ServicesProfileError as error:
        _fail([f"Error: {error}"])
    return target, profile, status


def print_next_steps(target: ProfileTarget, profile: Profile) -> None:
    """How to start the daemon and launch on it; a note when RabbitMQ would end long processes."""
    verdi = Path(sys.executable).with_name("verdi")
    click.echo(f"daemon    start it: AIIDA_PATH={target.config_dir} {verdi} -p {profile.name} daemon start 2")
    click.echo(f"launch    aiida-emlip launch SPEC.yaml --daemon --profile {profile.name}")
    timeout = read_consumer_timeout(profile.process_control_config.get("broker_host", "127.0.0.1"))
    if not timeout.sufficient:
        click.echo(f"note      RabbitMQ {timeout.describe()}: {CONSEQUENCE}")
        click.echo(f"          raise it: {raise_fix()}")
