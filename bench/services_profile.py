"""A throw-away PostgreSQL + RabbitMQ profile for the daemon benchmarks, made as ``setup --services`` does.

The caller points ``AIIDA_PATH`` at a temporary folder before importing :mod:`aiida`;
:func:`make_profile` creates the database (locale fallback included), its user and the profile, a
``localhost`` computer, the ``pw`` code and a pseudo family of the given elements
(:func:`make_sqlite_profile`: the SQLite profile without a broker that ``aiida-emlip setup`` makes);
:func:`delete_profile` stops the daemon and drops everything again. :func:`add_emlip_codes` adds the
``emlip-train`` and ``emlip-eval`` codes a study needs.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def scratch_environment(prefix: str) -> tuple[Path, str]:
    """A temporary ``AIIDA_PATH`` (set before :mod:`aiida` is imported), this environment's ``verdi``
    first on the ``PATH`` (the daemon client starts it), one OpenMP thread unless set; returns the folder
    and a fresh profile name."""
    import os
    import tempfile
    import uuid

    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    os.environ["AIIDA_PATH"] = str(work)
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return work, f"{prefix}-{uuid.uuid4().hex[:8]}"


def verdi(profile: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``verdi -p PROFILE ARGS`` of this environment (in the caller's ``AIIDA_PATH``)."""
    exe = str(Path(sys.executable).with_name("verdi"))
    return subprocess.run([exe, "-p", profile, *args], capture_output=True, text=True, check=False)


def start_daemon(profile: str, workers: int) -> None:
    """``verdi daemon start WORKERS``; a RuntimeError with verdi's output when it fails."""
    started = verdi(profile, "daemon", "start", str(workers))
    if started.returncode != 0:
        raise RuntimeError(f"verdi daemon start failed:\n{started.stdout}\n{started.stderr}")


@contextlib.contextmanager
def daemon(profile: str, workers: int) -> Iterator[None]:
    """A daemon with ``workers`` workers for the duration of the block, stopped whatever happens."""
    start_daemon(profile, workers)
    try:
        yield
    finally:
        verdi(profile, "daemon", "stop")


def make_profile(
    name: str, pw: str, pseudo_dir: Path, elements: list[str], poll_interval: float = 1.0
) -> tuple[Any, Any]:
    """The profile (loaded), and its ``pw@localhost`` code and pseudo family; prints the database locale.

    Caching is off (``setup --services`` turns it on for a study's calculations): a benchmark measures
    real runs, and may run the same inputs twice.
    """
    from aiida import load_profile
    from aiida.manage.configuration import get_config

    from aiida_emlip.cli.setup import ensure_code, ensure_computer
    from aiida_emlip.profile import select_services_profile
    from aiida_emlip.pseudos.family import FAMILY_LABEL, install_family
    from aiida_emlip.services.postgres import Superuser
    from aiida_emlip.services.profile import Broker, create_services_profile

    target = select_services_profile(name)
    _, locale = create_services_profile(target, Superuser(), Broker())
    config = get_config()
    config.set_option("runner.poll.interval", poll_interval, scope=name)
    config.unset_option("caching.enabled_for", scope=name)
    config.store()
    load_profile(name, allow_switch=True)
    computer, _ = ensure_computer(target)
    code, _ = ensure_code(computer, Path(pw))
    family = install_family(pseudo_dir, label=FAMILY_LABEL, elements=elements)
    print(f"profile {name}: core.psql_dos (database locale {locale}) + core.rabbitmq in {target.config_dir}")
    return code, family


def make_sqlite_profile(
    work: Path, pw: str, elements: list[str], poll_interval: float = 1.0
) -> tuple[Any, Any]:
    """The profile ``aiida-emlip setup`` makes (SQLite, no broker) in ``work``, loaded, with its
    ``pw@localhost`` code and a pseudo family of ``elements``."""
    from aiida.manage.configuration import get_config

    from aiida_emlip.cli.setup import ensure_code, ensure_computer
    from aiida_emlip.profile import PROFILE_NAME, ProfileTarget, load_or_create_profile
    from aiida_emlip.pseudos.family import FAMILY_LABEL, install_family

    target = ProfileTarget(PROFILE_NAME, work, isolated=True)
    profile, _ = load_or_create_profile(target)
    config = get_config()
    config.set_option("runner.poll.interval", poll_interval, scope=profile.name)
    config.store()
    profile.set_option("runner.poll.interval", poll_interval)
    computer, _ = ensure_computer(target)
    code, _ = ensure_code(computer, Path(pw))
    family = install_family(work / "pseudos", label=FAMILY_LABEL, elements=elements)
    print(f"profile {profile.name}: core.sqlite_dos, no broker, in {work}")
    return code, family


def add_emlip_codes(computer: Any) -> dict[str, Any]:
    """``emlip-train`` and ``emlip-eval`` of this environment on ``computer``, as setup makes them."""
    from aiida_emlip.cli.setup import EMLIP_PROGRAMS, emlip_executable, ensure_code

    codes = {}
    for label, (program, plugin) in EMLIP_PROGRAMS.items():
        codes[label], _ = ensure_code(computer, emlip_executable(program), label=label, plugin=plugin)
    return codes


def delete_profile(name: str, work: Path) -> None:
    """Stop the daemon; delete the profile, its database and user, and the folder ``work``."""
    verdi(name, "daemon", "stop")
    try:
        from aiida_emlip.services.profile import delete_services_profile

        delete_services_profile(name)
    except Exception as error:  # report, but still remove the folder
        print(f"cleanup: {error.__class__.__name__}: {error}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
