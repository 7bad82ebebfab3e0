"""The ``core.psql_dos`` + RabbitMQ profile of ``aiida-emlip setup --services``: create it or reuse it."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiida_emlip.cache_version import CACHED_PROCESSES
from aiida_emlip.profile import DEFAULT_EMAIL, POLL_INTERVAL, ProfileTarget, profile_backends
from aiida_emlip.services.postgres import (
    DatabaseSetupError,
    Superuser,
    connect_superuser,
    database_name,
    drop_user_and_database,
    ensure_user_and_database,
)

if TYPE_CHECKING:
    from aiida.manage.configuration.profile import Profile


#: ``daemon.timeout`` (s) of the profile: how long ``verdi daemon stop``/``status`` wait for the daemon's
#: answer. AiiDA's 2 s made ``verdi daemon stop`` print ``Connection to the daemon timed out`` on a busy
#: machine while the workers were still shutting down (they did, seconds later).
DAEMON_TIMEOUT = 20
STORAGE = "core.psql_dos"
BROKER = "core.rabbitmq"


class ServicesProfileError(RuntimeError):
    """The profile cannot be made or reused; the message says why and what to do."""


@dataclass(frozen=True)
class Broker:
    """How to reach RabbitMQ."""

    host: str = "127.0.0.1"
    port: int = 5672
    username: str = "guest"
    password: str = "guest"
    virtual_host: str = ""


def broker_config(broker: Broker) -> dict[str, Any]:
    """Log in to RabbitMQ (aiida-core's probe) and return the profile's broker configuration.

    :raises ServicesProfileError: the broker answers but refuses the login (or the connection fails).
    """
    from aiida.brokers.rabbitmq.defaults import detect_rabbitmq_config

    try:
        return detect_rabbitmq_config(
            protocol="amqp",
            username=broker.username,
            password=broker.password,
            host=broker.host,
            port=broker.port,
            virtual_host=broker.virtual_host,
        )
    except ConnectionError as error:
        cause = error.__cause__ or error
        raise ServicesProfileError(
            f"RabbitMQ at {broker.host}:{broker.port} refused the connection of user {broker.username!r} "
            f"({cause.__class__.__name__}: {str(cause)[:200]}). RabbitMQ's `guest` user may only log in from "
            "localhost; elsewhere create a user (`rabbitmqctl add_user NAME PASSWORD && rabbitmqctl "
            "set_permissions NAME '.*' '.*' '.*'`) and give --broker-username / --broker-password."
        ) from error


def create_services_profile(
    target: ProfileTarget, superuser: Superuser, broker: Broker
) -> tuple[Profile, str]:
    """Create the database, its user and the profile; return the profile and the database's locale.

    The database and user are dropped again when the profile cannot be created.
    """
    rabbit = broker_config(broker)
    try:
        postgres = connect_superuser(superuser)
        name = database_name(target.name, target.config_dir)
        password = secrets.token_hex(16)
        locale = ensure_user_and_database(postgres, name, password)
    except DatabaseSetupError as error:
        raise ServicesProfileError(str(error)) from error
    from aiida.manage.configuration import create_profile, get_config

    config = get_config(create=True)
    storage = {
        "database_engine": "postgresql_psycopg",
        "database_hostname": superuser.host,
        "database_port": superuser.port,
        "database_username": name,
        "database_password": password,
        "database_name": name,
        "repository_uri": (target.config_dir / "repository" / target.name).as_uri(),
    }
    try:
        profile = create_profile(
            config,
            storage_backend=STORAGE,
            storage_config=storage,
            broker_backend=BROKER,
            broker_config=rabbit,
            name=target.name,
            email=DEFAULT_EMAIL,
        )
    except Exception as error:
        drop_user_and_database(postgres, name)
        raise ServicesProfileError(f"creating profile {target.name!r} failed: {error}") from error
    config.set_option("runner.poll.interval", POLL_INTERVAL, scope=target.name)
    config.set_option("daemon.timeout", DAEMON_TIMEOUT, scope=target.name)
    # the daemon's workers cache what a foreground `launch` caches (they read the profile, not `--cache`)
    config.set_option("caching.enabled_for", list(CACHED_PROCESSES), scope=target.name)
    config.store()
    return profile, locale


def load_or_create_services_profile(
    target: ProfileTarget, superuser: Superuser, broker: Broker
) -> tuple[Profile, str]:
    """Load the services profile, creating it when missing; return it and ``created ...`` / ``reused``.

    :raises ServicesProfileError: a profile of that name exists without PostgreSQL storage or RabbitMQ,
        or the new one cannot be made.
    """
    storage, process_control = profile_backends(target.config_dir, target.name)
    if storage is None:
        _, locale = create_services_profile(target, superuser, broker)
        status = f"created (database locale {locale})"
    elif storage != STORAGE or process_control != BROKER:
        raise ServicesProfileError(
            f"profile {target.name!r} in {target.config_dir} exists with storage {storage} and broker "
            f"{process_control or 'none'}, not {STORAGE} + {BROKER}: give another name with --profile"
        )
    else:
        status = "reused"
    from aiida.manage.configuration import load_profile

    profile = load_profile(target.name, allow_switch=True)
    try:
        from aiida.manage import get_manager

        get_manager().get_profile_storage()
    except Exception as error:
        raise ServicesProfileError(
            f"profile {target.name!r}: its PostgreSQL database cannot be opened ({error.__class__.__name__}: "
            f"{str(error)[:300]})"
        ) from error
    return profile, status


def delete_services_profile(name: str, superuser: Superuser | None = None) -> None:
    """Delete profile ``name`` of the active configuration with its daemon, repository, database and user.

    For throw-away profiles (tests, benchmarks). The database is dropped ``WITH (FORCE)``, so open
    connections do not block it.
    """
    import logging
    import shutil
    from urllib.parse import urlparse

    from aiida.manage import get_manager
    from aiida.manage.configuration import get_config

    config = get_config()
    storage = config.get_profile(name).storage_config
    loaded = get_manager().get_profile()
    if loaded is not None and loaded.name == name:
        get_manager().unload_profile()
    quiet = logging.getLogger("aiida.manage.configuration.config")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # its "storage not deleted" line: the database is dropped below
    try:
        config.delete_profile(name, delete_storage=False)  # stops the daemon and forgets the profile
    finally:
        quiet.setLevel(level)
    superuser = superuser or Superuser(storage["database_hostname"], int(storage["database_port"]))
    drop_user_and_database(connect_superuser(superuser), storage["database_name"])
    repository = urlparse(storage["repository_uri"]).path
    if repository:
        shutil.rmtree(repository, ignore_errors=True)
