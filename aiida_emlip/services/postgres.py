"""The PostgreSQL user and database of a ``core.psql_dos`` profile, made as the database superuser.

Made through aiida-core's :class:`~aiida.manage.external.postgres.Postgres` (psycopg, or ``sudo -u
postgres psql``). aiida-core creates databases with the ``en_US.UTF-8`` locale, which many minimal
systems (Debian containers among them) do not have: :func:`create_database` then falls back to a
``template0`` database with the ``C.UTF-8`` locale, then ``C``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Locales tried, in order, after aiida-core's own ``en_US.UTF-8`` fails for want of the locale.
FALLBACK_LOCALES = ("C.UTF-8", "C")
AIIDA_LOCALE = "en_US.UTF-8"


class DatabaseSetupError(RuntimeError):
    """The database or its user could not be made; the message says what to do."""


@dataclass(frozen=True)
class Superuser:
    """How to reach PostgreSQL as a user that may create databases and roles."""

    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"
    password: str | None = None

    def describe(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def database_name(profile: str, config_dir: Path) -> str:
    """Name of the profile's database and user: the profile name plus a hash of the configuration folder.

    Two checkouts (two ``.aiida`` folders) with a profile of the same name get different databases.
    """
    slug = re.sub(r"[^a-z0-9]+", "_", profile.lower()).strip("_")[:40] or "profile"
    digest = hashlib.sha256(str(config_dir.resolve()).encode()).hexdigest()[:8]
    return f"emlip_{slug}_{digest}"


def create_database_sql(name: str, owner: str, locale: str) -> str:
    """``CREATE DATABASE`` from ``template0`` with the given collation and character classification."""
    return (
        f'CREATE DATABASE "{name}" OWNER "{owner}" ENCODING \'UTF8\' '
        f"LC_COLLATE '{locale}' LC_CTYPE '{locale}' TEMPLATE template0"
    )


def is_locale_error(error: BaseException) -> bool:
    """Whether PostgreSQL refused a database for a locale it does not know."""
    return "locale" in str(error).lower()


def locale_hint(name: str, owner: str) -> str:
    """What to do when no locale works."""
    return (
        "Generate a UTF-8 locale and restart PostgreSQL (Debian: `apt-get install -y locales && "
        "sed -i 's/^# *en_US.UTF-8/en_US.UTF-8/' /etc/locale.gen && locale-gen && service postgresql "
        "restart`), or create the database yourself as the superuser:\n    "
        + create_database_sql(name, owner, "C.UTF-8")
    )


def create_database(
    execute: Callable[[str], Any],
    exists: Callable[[str], bool],
    name: str,
    owner: str,
    create_default: Callable[[], Any] | None = None,
) -> str:
    """Create database ``name`` owned by ``owner``; return the locale it got.

    ``create_default`` (aiida-core's ``en_US.UTF-8`` database) is tried first; when it (or a fallback)
    fails for a missing locale, the next of :data:`FALLBACK_LOCALES` is tried. Any other failure is
    raised at once.

    :raises DatabaseSetupError: no locale worked; the message says how to fix it.
    """
    attempts: list[tuple[str, Callable[[], Any]]] = []
    if create_default is not None:
        attempts.append((AIIDA_LOCALE, create_default))
    for locale in FALLBACK_LOCALES:
        attempts.append((locale, lambda locale=locale: execute(create_database_sql(name, owner, locale))))
    failures = []
    for locale, attempt in attempts:
        try:
            attempt()
        except Exception as error:
            if not is_locale_error(error):
                raise DatabaseSetupError(f"creating database {name!r} failed: {error}") from error
            failures.append(f"{locale}: {str(error).strip()}")
            continue
        if exists(name):
            return locale
        failures.append(f"{locale}: no error, but the database does not exist")
    raise DatabaseSetupError(
        f"PostgreSQL could not create database {name!r} with any locale ("
        + "; ".join(failures)
        + ").\n"
        + locale_hint(name, owner)
    )


def connect_superuser(superuser: Superuser) -> Any:
    """aiida-core's :class:`Postgres` connected as the superuser.

    :raises DatabaseSetupError: no way to connect as the superuser was found.
    """
    from aiida.manage.external.postgres import Postgres

    dbinfo = {"host": superuser.host, "port": superuser.port, "user": superuser.user}
    if superuser.password:
        dbinfo["password"] = superuser.password
    postgres = Postgres(interactive=False, quiet=True, dbinfo=dbinfo)
    if not postgres.is_connected:
        raise DatabaseSetupError(
            f"cannot connect to PostgreSQL as {superuser.describe()}, a user that may create databases. "
            "Allow it in pg_hba.conf (trust or peer for local connections), run setup as a user who may "
            "`sudo -u postgres psql`, or give --db-superuser / --db-superuser-password."
        )
    return postgres


def ensure_user_and_database(postgres: Any, name: str, password: str) -> str:
    """Create user ``name`` (or reset its password) and its database ``name``; return the locale.

    :raises DatabaseSetupError: the database exists already (no profile of ours knows its password
        and its data), or it cannot be created.
    """
    if postgres.db_exists(name):
        raise DatabaseSetupError(
            f"database {name!r} exists already but no profile in this configuration folder uses it "
            f"(left over from a deleted profile?). Drop it (`psql -h HOST -U postgres -c 'DROP DATABASE "
            f'"{name}"\'`) or choose another profile name with --profile.'
        )
    if postgres.dbuser_exists(name):
        postgres.execute(f"ALTER USER \"{name}\" WITH PASSWORD '{password}'")
    else:
        postgres.create_dbuser(dbuser=name, dbpass=password)
    return create_database(
        postgres.execute,
        postgres.db_exists,
        name,
        name,
        create_default=lambda: postgres.create_db(dbuser=name, dbname=name),
    )


def drop_user_and_database(postgres: Any, name: str) -> None:
    """Drop database and user ``name`` where they exist (the inverse of :func:`ensure_user_and_database`)."""
    if postgres.db_exists(name):
        postgres.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    if postgres.dbuser_exists(name):
        postgres.drop_dbuser(name)
