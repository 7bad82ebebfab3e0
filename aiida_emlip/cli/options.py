"""Options and helpers shared by the ``aiida-emlip`` subcommands."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from aiida_emlip.profile import ProfileNotFoundError, ProfileTarget, select_profile

QE_PACKAGE = "quantum-espresso"
"""Debian/Ubuntu package that provides ``pw.x`` and ``ld1.x``."""

CODE_LABEL = "pw"
COMPUTER_LABEL = "localhost"

PROFILE_OPTION = click.option(
    "--profile",
    "profile_name",
    metavar="NAME",
    default=None,
    help="Use this existing AiiDA profile instead of the isolated project profile "
    "(searched in AIIDA_PATH if set, else in <project>/.aiida and ~/.aiida).",
)


def target_or_exit(profile_name: str | None) -> ProfileTarget:
    """Select the profile (see :func:`~aiida_emlip.profile.select_profile`); exit 1 if it does not exist."""
    try:
        return select_profile(profile_name)
    except ProfileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc


def qe_missing_message(program: str) -> str:
    """Return the one message printed when a Quantum ESPRESSO executable cannot be found."""
    return (
        f"{program} not found on PATH. Install Quantum ESPRESSO (Debian/Ubuntu: "
        f"`apt-get install -y {QE_PACKAGE}`) or give the location of pw.x with `--pw PATH`."
    )


def find_executable(name: str, hint: Path | None = None) -> Path | None:
    """Return ``name`` from the directory of ``hint`` (if given) or from ``PATH``, else ``None``."""
    if hint is not None:
        sibling = hint.parent / name
        if sibling.is_file():
            return sibling.resolve()
    found = shutil.which(name)
    return Path(found).resolve() if found else None


def resolve_pw(pw: Path | None) -> Path:
    """Return the absolute path of ``pw.x``: the ``--pw`` value if given, else ``pw.x`` on ``PATH``.

    :raises click.ClickException: nothing usable is found.
    """
    if pw is not None:
        pw = pw.expanduser()
        if not pw.is_file():
            raise click.ClickException(f"--pw {pw}: no such file. {qe_missing_message('pw.x')}")
        return pw.resolve()
    found = find_executable("pw.x")
    if found is None:
        raise click.ClickException(qe_missing_message("pw.x"))
    return found
