"""``aiida-emlip setup``: create or reuse the profile, computer, codes and pseudo family.

The profile is the isolated SQLite one by default, an existing one with ``--profile``, or with
``--services`` a PostgreSQL + RabbitMQ profile for the daemon (:mod:`aiida_emlip.cli.setup_services`);
the computer, codes and family are set up the same way in each. Every step is idempotent: a second
run finds everything in place, prints ``reused`` for each item and changes nothing.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from aiida_emlip.cli.options import (
    CODE_LABEL,
    COMPUTER_LABEL,
    PROFILE_OPTION,
    find_executable,
    qe_missing_message,
    resolve_pw,
    target_or_exit,
)
from aiida_emlip.cli.setup_services import (
    check_services_options,
    print_next_steps,
    services_options,
    services_profile_or_exit,
)
from aiida_emlip.profile import ProfileTarget, load_or_create_profile

if TYPE_CHECKING:
    from aiida.orm import Computer, Group, InstalledCode

TRAIN_CODE_LABEL = "emlip-train"
EVAL_CODE_LABEL = "emlip-eval"
#: Quantum ESPRESSO programs set up beside pw.x: label -> (executable, calculation plugin).
QE_POSTPROCESSING = {
    "pp": ("pp.x", "quantumespresso.pp"),
    "projwfc": ("projwfc.x", "quantumespresso.projwfc"),
    "ph": ("ph.x", "quantumespresso.ph"),
}
#: The project's own programs: label -> (console script, calculation plugin).
EMLIP_PROGRAMS = {
    TRAIN_CODE_LABEL: ("emlip-train", "emlip.train"),
    EVAL_CODE_LABEL: ("emlip-eval", "emlip.evaluate"),
}
CREATED = "created"
REUSED = "reused"


def mpirun_command(as_root: bool | None = None) -> list[str]:
    """Return the computer's mpirun command; OpenMPI refuses root unless told ``--allow-run-as-root``."""
    if as_root is None:
        as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    command = ["mpirun", "-np", "{tot_num_mpiprocs}"]
    return [*command, "--allow-run-as-root"] if as_root else command


def ensure_computer(target: ProfileTarget, label: str = COMPUTER_LABEL) -> tuple[Computer, str]:
    """Load the ``localhost`` computer or create it (core.local, core.direct, workdir in the config dir)."""
    from aiida.common.exceptions import NotExistent
    from aiida.orm import Computer, load_computer

    status = REUSED
    try:
        computer = load_computer(label)
    except NotExistent:
        target.work_dir.mkdir(parents=True, exist_ok=True)
        computer = Computer(
            label=label,
            hostname="localhost",
            description="This machine (created by aiida-emlip setup)",
            transport_type="core.local",
            scheduler_type="core.direct",
            workdir=str(target.work_dir),
        ).store()
        computer.set_minimum_job_poll_interval(0.0)
        computer.set_default_mpiprocs_per_machine(1)
        computer.set_mpirun_command(mpirun_command())
        status = CREATED
    if not computer.is_configured:
        computer.configure(safe_interval=0.0)
        status = CREATED if status == CREATED else "configured"
    return computer, status


def ensure_code(
    computer: Computer,
    pw: Path,
    mpi: bool = False,
    label: str = CODE_LABEL,
    plugin: str = "quantumespresso.pw",
    description: str = "Quantum ESPRESSO pw.x (created by aiida-emlip setup)",
) -> tuple[InstalledCode, str]:
    """Load ``<label>@<computer>`` or create it as an :class:`~aiida.orm.InstalledCode` of ``pw``.

    A stored code cannot be edited: if the existing one points at another executable or MPI setting,
    or is one that setup made with another ``prepend_text`` (an earlier version's), it is relabelled
    ``<label>-<pk>`` (its calculations keep their provenance) and a new one is created.
    """
    from aiida.common.exceptions import NotExistent
    from aiida.orm import InstalledCode, load_code

    status = CREATED
    try:
        existing = load_code(f"{label}@{computer.label}")
    except NotExistent:
        existing = None
    prepend = singleton_prepend(plugin, mpi)
    if existing is not None:
        same_exe = str(existing.get_executable()) == str(pw)
        # a code the user made under this label keeps the prepend_text they gave it
        same_prepend = existing.description != description or existing.prepend_text == prepend
        if same_exe and bool(existing.with_mpi) == mpi and same_prepend:
            return existing, REUSED
        existing.label = f"{label}-{existing.pk}"
        status = f"replaced (previous code relabelled {existing.label}@{computer.label})"
    code = InstalledCode(
        computer=computer,
        filepath_executable=str(pw),
        label=label,
        description=description,
        default_calc_job_plugin=plugin,
        with_mpi=mpi,
        prepend_text=prepend,
    ).store()
    return code, status


def singleton_prepend(plugin: str, mpi: bool) -> str:
    """The code's ``prepend_text``: a Quantum ESPRESSO program run without ``mpirun`` gets the
    environment of :mod:`aiida_emlip.pseudos.mpi_env` (no ``orted`` daemon; its Open MPI session
    directory in the job's working directory; a value set by the user wins); every other code gets none."""
    from aiida_emlip.pseudos.mpi_env import singleton_exports

    if mpi or not plugin.startswith("quantumespresso."):
        return ""
    return singleton_exports()


def emlip_executable(name: str) -> Path:
    """Console script ``name`` (``emlip-train``, ``emlip-eval``) beside the running Python."""
    exe = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if exe is None:
        raise click.ClickException(f"{name} is not installed: run 'pip install -e .' in the project")
    return Path(exe)


def train_executable() -> Path:
    """``emlip-train`` installed beside the running Python (the environment aiida-emlip runs in)."""
    return emlip_executable("emlip-train")


def family_exists(label: str) -> bool:
    """Return whether a group with this label exists in the loaded profile."""
    from aiida.orm import Group, QueryBuilder

    return QueryBuilder().append(Group, filters={"label": label}).count() > 0


def ensure_pseudo_family(target: ProfileTarget, ld1: str | Path = "ld1.x") -> tuple[Group, str]:
    """Install the project's ld1.x pseudo family, generating its UPF files into the config dir first."""
    from aiida_emlip.pseudos.family import FAMILY_LABEL, install_family

    if family_exists(FAMILY_LABEL):
        return install_family(target.pseudo_dir, label=FAMILY_LABEL), REUSED
    from aiida_emlip.pseudos.generate import generate_family

    generate_family(target.pseudo_dir, ld1=str(ld1))
    return install_family(target.pseudo_dir, label=FAMILY_LABEL), CREATED


def report(item: str, description: str, status: str) -> None:
    """Print one status line of ``setup``."""
    click.echo(f"{item:<9} {description}: {status}")


@click.command("setup")
@click.option(
    "--pw",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Location of pw.x (default: pw.x on PATH). ld1.x is looked for beside it, then on PATH.",
)
@PROFILE_OPTION
@click.option(
    "--mpi/--no-mpi",
    default=False,
    show_default=True,
    help="Run pw.x through mpirun. Off by default: Debian's pw.x is OpenMPI-linked and runs as a singleton.",
)
@services_options
def setup(pw: Path | None, profile_name: str | None, mpi: bool, **services: Any) -> None:
    """Create or reuse the AiiDA profile, localhost computer, pw code and pseudo family (idempotent).

    With --services: a PostgreSQL + RabbitMQ profile (default name emlip-services) for the daemon.
    """
    check_services_options(services)
    pw_path = resolve_pw(pw)
    if services["services"]:
        target, profile, status = services_profile_or_exit(profile_name, services)
    else:
        target = target_or_exit(profile_name)
        profile, created = load_or_create_profile(target, create=True)
        status = _s(created)
    storage = profile.storage_backend
    broker = profile.process_control_backend or "no broker"
    report("profile", f"{profile.name} ({storage}, {broker}) in {target.config_dir}", status)
    setup_resources(target, pw_path, mpi)
    if services["services"]:
        print_next_steps(target, profile)


def setup_resources(target: ProfileTarget, pw_path: Path, mpi: bool) -> None:
    """Computer, codes and pseudo family in the loaded profile: the same for every kind of profile."""
    from aiida_emlip.pseudos.family import FAMILY_LABEL

    computer, status = ensure_computer(target)
    report("computer", f"{computer.label} ({computer.transport_type}, {computer.scheduler_type})", status)

    code, status = ensure_code(computer, pw_path, mpi=mpi)
    report("code", f"{code.full_label} -> {code.get_executable()} (withmpi={code.with_mpi})", status)

    for label, (program, plugin) in QE_POSTPROCESSING.items():
        exe = find_executable(program, hint=pw_path)
        if exe is None:
            report("code", f"{label}@{computer.label}", f"skipped ({program} not found)")
            continue
        qe, status = ensure_code(
            computer,
            exe,
            label=label,
            plugin=plugin,
            description=f"Quantum ESPRESSO {program} (created by aiida-emlip setup)",
        )
        report("code", f"{qe.full_label} -> {qe.get_executable()}", status)

    for label, (program, plugin) in EMLIP_PROGRAMS.items():
        own, status = ensure_code(
            computer,
            emlip_executable(program),
            label=label,
            plugin=plugin,
            description=f"{program} of this environment (created by aiida-emlip setup)",
        )
        report("code", f"{own.full_label} -> {own.get_executable()}", status)

    if family_exists(FAMILY_LABEL):
        ld1: Path | None = None
    else:
        ld1 = find_executable("ld1.x", hint=pw_path)
        if ld1 is None:
            raise click.ClickException(qe_missing_message("ld1.x"))
    family, status = ensure_pseudo_family(target, ld1=ld1 or "ld1.x")
    elements = ", ".join(sorted(family.elements))
    report("pseudos", f"{family.label} ({elements})", status)


def _s(created: bool) -> str:
    return CREATED if created else REUSED
