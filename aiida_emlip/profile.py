"""Choose and load the AiiDA profile that aiida-emlip works in.

By default everything lives in an isolated, project-local AiiDA configuration directory
(``<project>/.aiida``) holding one SQLite profile (``core.sqlite_dos``, no broker) named
:data:`PROFILE_NAME`, so that a user's own ``~/.aiida`` is never read or written. An ``AIIDA_PATH``
already set in the environment is respected. ``--profile NAME`` selects an existing profile instead
(e.g. a PostgreSQL + RabbitMQ one); it is never created, except by ``aiida-emlip setup --services``,
which creates the PostgreSQL + RabbitMQ profile :data:`SERVICES_PROFILE_NAME` (or ``--profile NAME``).

AiiDA fixes its configuration directory when :mod:`aiida` is first imported, so :func:`select_profile`
must run before anything imports :mod:`aiida` (the CLI imports it lazily for this reason).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiida.manage.configuration.profile import Profile

PROFILE_NAME = "emlip"
"""Name of the isolated profile that ``aiida-emlip setup`` creates."""
SERVICES_PROFILE_NAME = "emlip-services"
"""Name of the PostgreSQL + RabbitMQ profile that ``aiida-emlip setup --services`` creates."""

DEFAULT_EMAIL = "emlip@localhost"
AIIDA_PATH_VAR = "AIIDA_PATH"
POLL_INTERVAL = 1.0
"""``runner.poll.interval`` (s) for processes run in this shell: without a broker a workchain learns that a
child finished only by polling, and AiiDA's default of 60 s would idle most of a short job."""
CONFIG_DIR_NAME = ".aiida"


class ProfileNotFoundError(RuntimeError):
    """Raised when ``--profile NAME`` names a profile that does not exist."""


@dataclass(frozen=True)
class ProfileTarget:
    """Where the profile lives: its name, the AiiDA configuration directory and whether it is ours."""

    name: str
    config_dir: Path
    isolated: bool

    @property
    def pseudo_dir(self) -> Path:
        """Directory in which the generated UPF files are cached."""
        return self.config_dir / "pseudos"

    @property
    def work_dir(self) -> Path:
        """Working directory of the ``localhost`` computer created for this profile."""
        return self.config_dir / "work"


def project_root() -> Path:
    """Return the project directory: the source checkout if the package runs from one, else the cwd."""
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").is_file() and (here / "aiida_emlip").is_dir():
        return here
    return Path.cwd()


def project_config_dir() -> Path:
    """Return the project-local AiiDA configuration directory ``<project>/.aiida``."""
    return project_root() / CONFIG_DIR_NAME


def resolve_aiida_path(value: str) -> Path:
    """Resolve an ``AIIDA_PATH`` value to a configuration directory the way :mod:`aiida` does.

    The value is a ``:``-separated list of paths; ``.aiida`` is appended to each entry not already
    ending in it; the first entry that exists wins, otherwise the last.
    """
    chosen: Path | None = None
    for entry in (p for p in value.split(os.pathsep) if p):
        path = Path(entry).expanduser()
        if path.name != CONFIG_DIR_NAME:
            path = path / CONFIG_DIR_NAME
        chosen = path
        if path.is_dir():
            break
    return (chosen or Path("~").expanduser() / CONFIG_DIR_NAME).resolve()


def profiles_in(config_dir: Path) -> list[str]:
    """Return the profile names in ``config_dir/config.json`` without importing :mod:`aiida`."""
    config_file = config_dir / "config.json"
    try:
        data = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return []
    return sorted(data.get("profiles", {}))


def default_config_dir() -> Path:
    """Where aiida-emlip creates its profiles: ``AIIDA_PATH``'s directory, else the project's."""
    env_value = os.environ.get(AIIDA_PATH_VAR)
    return resolve_aiida_path(env_value) if env_value else project_config_dir()


def candidate_config_dirs() -> list[Path]:
    """Where ``--profile NAME`` is looked up: ``AIIDA_PATH``'s directory, else the project's, ``~/.aiida``."""
    env_value = os.environ.get(AIIDA_PATH_VAR)
    if env_value:
        return [resolve_aiida_path(env_value)]
    return [project_config_dir(), (Path("~").expanduser() / CONFIG_DIR_NAME).resolve()]


def select_profile(profile: str | None = None) -> ProfileTarget:
    """Decide which profile to use and point ``AIIDA_PATH`` at its configuration directory.

    :param profile: name of an existing profile, or ``None`` for the isolated project profile.
    :raises ProfileNotFoundError: ``profile`` is given but exists in none of the searched directories;
        nothing is created anywhere in that case.
    """
    if profile is None:
        target = ProfileTarget(PROFILE_NAME, default_config_dir(), isolated=True)
    else:
        candidates = candidate_config_dirs()
        found = next((c for c in candidates if profile in profiles_in(c)), None)
        if found is None:
            lines = [f"AiiDA profile '{profile}' does not exist. Looked in:"]
            for cand in candidates:
                names = ", ".join(profiles_in(cand)) or "no profiles"
                lines.append(f"  {cand}  ({names})")
            lines.append(
                "Create it first (e.g. `verdi profile setup core.psql_dos`), set AIIDA_PATH to its "
                "directory, or omit --profile to use the isolated project profile."
            )
            raise ProfileNotFoundError("\n".join(lines))
        target = ProfileTarget(profile, found, isolated=False)
    activate_config_dir(target.config_dir)
    return target


def select_services_profile(profile: str | None = None) -> ProfileTarget:
    """The PostgreSQL + RabbitMQ profile of ``setup --services``: found where ``--profile`` looks, else new.

    A profile of that name that exists is reused from its directory; otherwise it will be created in
    :func:`default_config_dir`, beside the isolated profile.
    """
    name = profile or SERVICES_PROFILE_NAME
    found = next((c for c in candidate_config_dirs() if name in profiles_in(c)), None)
    target = ProfileTarget(name, found or default_config_dir(), isolated=False)
    activate_config_dir(target.config_dir)
    return target


def profile_backends(config_dir: Path, name: str) -> tuple[str | None, str | None]:
    """Storage and broker backends of profile ``name`` in ``config_dir/config.json`` (without aiida)."""
    try:
        data = json.loads((config_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None, None
    profile = data.get("profiles", {}).get(name, {})
    storage = profile.get("storage", {}).get("backend")
    broker = (profile.get("process_control") or {}).get("backend")
    return storage, broker


def daemon_problem(storage_backend: str | None, broker_backend: str | None, name: str) -> str | None:
    """Why profile ``name`` cannot run the daemon, or ``None``: SQLite storage or no broker.

    SQLite serialises writers: several daemon workers writing at once get "database is locked".
    """
    fix = "run `aiida-emlip setup --services` (PostgreSQL + RabbitMQ) and use `--profile emlip-services`"
    if storage_backend is not None and storage_backend.startswith("core.sqlite"):
        return (
            f"profile {name!r} stores its data in SQLite ({storage_backend}), which does not take the "
            'concurrent writes of daemon workers (they fail with "database is locked"). Run without '
            f"--daemon (the work runs in this shell), or {fix}."
        )
    if broker_backend is None:
        return (
            f"profile {name!r} has no broker, so it has no daemon: run without --daemon (the work runs in "
            f"this shell), or {fix}."
        )
    return None


def activate_config_dir(config_dir: Path) -> None:
    """Point ``AIIDA_PATH`` (and an already-imported :mod:`aiida`) at ``config_dir``."""
    os.environ[AIIDA_PATH_VAR] = str(config_dir)
    if "aiida.manage.configuration.settings" in sys.modules:
        from aiida.manage.configuration import reset_config
        from aiida.manage.configuration.settings import AiiDAConfigDir

        if AiiDAConfigDir.get() != config_dir:
            reset_config()
            AiiDAConfigDir.set(config_dir)


def load_or_create_profile(target: ProfileTarget, create: bool = True) -> tuple[Profile, bool]:
    """Load the target profile, creating the isolated SQLite profile if it is missing.

    :returns: the loaded profile and whether it was created now.
    :raises ProfileNotFoundError: the profile does not exist and ``create`` is false or it is not ours.
    """
    may_create = create and target.isolated
    if not may_create and target.name not in profiles_in(target.config_dir):
        # Checked before importing aiida, which would create the configuration directory.
        raise ProfileNotFoundError(
            f"AiiDA profile '{target.name}' does not exist in {target.config_dir}: "
            "run `aiida-emlip setup` first."
        )
    from aiida.manage.configuration import create_profile, get_config, load_profile

    config = get_config(create=may_create)
    created = False
    if target.name not in config.profile_names:
        create_profile(
            config,
            storage_backend="core.sqlite_dos",
            storage_config={"filepath": str(target.config_dir / "storage" / target.name)},
            broker_backend=None,
            name=target.name,
            email=DEFAULT_EMAIL,
        )
        config.set_option("runner.poll.interval", POLL_INTERVAL, scope=target.name)
        if config.default_profile_name is None:
            config.set_default_profile(target.name)
        config.store()
        created = True
    profile = load_profile(target.name, allow_switch=True)
    # In memory only: never rewrites a user's profile; an explicit setting wins.
    profile.set_option("runner.poll.interval", POLL_INTERVAL, override=False)
    return profile, created
