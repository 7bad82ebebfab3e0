"""The study commands: ``launch``, ``status``, ``report``, ``export``, ``reproduce``, ``list``.

Every command loads the profile first (``--profile``, as the other subcommands) and turns the user's
mistakes (a bad spec, an unknown PK, a file that exists) into one message and exit code 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from aiida_emlip.cli.options import PROFILE_OPTION
from aiida_emlip.cli.study_common import (
    CACHED,
    check_report_dir,
    load_profile_or_exit,
    load_spec_or_exit,
    load_study,
    print_outcome,
    refuse_daemon_profile,
    retry_when_busy,
    run_in_shell,
    study_builder,
    write_report,
)

if TYPE_CHECKING:
    from aiida_emlip.services.daemon_processes import DaemonProcesses

CACHE_OPTION = click.option(
    "--cache/--no-cache",
    default=True,
    show_default=True,
    help="Reuse finished pw.x, training and evaluation runs whose inputs are identical.",
)


@click.command("launch")
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--daemon", is_flag=True, help="Submit to the AiiDA daemon instead of running in this shell.")
@CACHE_OPTION
@PROFILE_OPTION
def launch(spec_file: Path, daemon: bool, cache: bool, profile_name: str | None) -> None:
    """Check SPEC_FILE, then run the study in this shell with progress (or submit it with --daemon)."""
    target = load_profile_or_exit(profile_name)
    if daemon:
        refuse_daemon_profile()
    spec, text = load_spec_or_exit(spec_file)
    if daemon:
        _submit(spec, text, target)
        for note in (daemon_caching_note(cache, target.name), daemon_timeout_note()):
            if note:
                click.echo(note)
        return
    click.echo(f"{spec_file}: valid; running study {spec['name']!r} in this shell (Ctrl-C stops it)")
    node = run_in_shell(study_builder(spec, text), cache)
    print_outcome(node, target)
    if "report" in node.outputs:
        click.echo(f"Report: aiida-emlip report {node.pk} --output DIR")
    if not node.is_finished_ok:
        raise SystemExit(1)


def daemon_timeout_note(read=None) -> str | None:
    """A note when the broker's ``consumer_timeout`` is shorter than a study may take (see ``doctor``).

    ``read`` (host -> :class:`~aiida_emlip.services.consumer_timeout.ConsumerTimeout`) defaults to
    reading the running broker of the loaded profile.
    """
    from aiida.manage import get_manager

    from aiida_emlip.services.consumer_timeout import CONSEQUENCE, raise_fix, read_consumer_timeout

    config = get_manager().get_profile().process_control_config or {}
    timeout = (read or read_consumer_timeout)(config.get("broker_host", "127.0.0.1"))
    if not timeout.known or timeout.sufficient:
        return None
    return f"note: RabbitMQ's {timeout.describe()}: {CONSEQUENCE}; to raise it: {raise_fix()}"


def daemon_caching_note(cache: bool, profile: str) -> str | None:
    """A note when the daemon will not cache as ``--cache``/``--no-cache`` asks.

    Daemon workers read the profile's ``caching.enabled_for``, not this command's option (the profile
    made by ``aiida-emlip setup --services`` enables the study's calculations).
    """
    from aiida.manage.caching import get_use_cache

    on = [i for i in CACHED if get_use_cache(identifier=i)]
    off = [i.split(":", 1)[1] for i in CACHED if i not in on]
    if cache and off:
        return (
            f"note: the daemon caches what profile {profile!r} says, and it leaves caching off for "
            f"{', '.join(off)}; to reuse finished runs: `verdi -p {profile} config set caching.enabled_for "
            f"'aiida.calculations:quantumespresso.*'`, `verdi -p {profile} config set --append "
            f"caching.enabled_for 'aiida.calculations:emlip.*'`, then `verdi -p {profile} daemon restart`"
        )
    if not cache and on:
        names = ", ".join(i.split(":", 1)[1] for i in on)
        return (
            f"note: --no-cache does not reach the daemon: profile {profile!r} caches {names}; "
            f"`verdi -p {profile} config unset caching.enabled_for` and `verdi -p {profile} daemon restart` "
            "turn that off"
        )
    return None


def daemon_state_note(daemon: DaemonProcesses, profile: str) -> str | None:
    """What to say after a submission when no daemon runs (``daemon``: its
    :class:`~aiida_emlip.services.daemon_processes.DaemonProcesses`): start one, or, after a crash of
    its arbiter, end the workers it left running first."""
    if daemon.running:
        return None
    if daemon.workers:
        return (
            f"The daemon is {daemon.describe()}; `aiida-emlip doctor --profile {profile}` says how to end "
            "them before starting the daemon again"
        )
    return f"No daemon is running: start one with `verdi -p {profile} daemon start`"


def _submit(spec: dict, text: str, target) -> None:
    from aiida.engine import submit
    from aiida.manage import get_manager

    profile = get_manager().get_profile()
    node = submit(study_builder(spec, text))
    click.echo(f"Submitted study {spec['name']!r} <{node.pk}> to the daemon of profile {profile.name!r}")
    try:
        from aiida_emlip.services.daemon_processes import profile_daemon_processes

        note = daemon_state_note(profile_daemon_processes(profile.name), profile.name)
    except Exception:  # the daemon client needs a configured broker; the submission is done anyway
        note = None
    if note:
        click.echo(note)
    click.echo(f"Follow it: aiida-emlip status {node.pk}")


@click.command("status")
@click.argument("pk")
@PROFILE_OPTION
def status(pk: str, profile_name: str | None) -> None:
    """Live summary of study PK: DFT, each design's training, validations, report."""
    load_profile_or_exit(profile_name)
    from aiida_emlip.cli.study_status import render, status_lines

    for line in render(retry_when_busy(lambda: status_lines(load_study(pk)))):
        click.echo(line)


@click.command("report")
@click.argument("pk")
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory to write index.html and figures/ into [default: ./study-<PK>-report].",
)
@PROFILE_OPTION
def report(pk: str, output: Path | None, profile_name: str | None) -> None:
    """Write the HTML report of study PK to a directory (open index.html in any browser, offline)."""
    load_profile_or_exit(profile_name)
    node = load_study(pk)
    if "report" not in node.outputs:
        state = node.process_state.value if node.process_state else "unknown"
        raise click.ClickException(
            f"study {node.pk} has no report yet (state {state}, exit status {node.exit_status}); "
            f"see `aiida-emlip status {node.pk}`"
        )
    write_report(node, check_report_dir(output or Path(f"study-{node.pk}-report"), node))


@click.command("export")
@click.argument("pk")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
@PROFILE_OPTION
def export(pk: str, file: Path, force: bool, profile_name: str | None) -> None:
    """Write study PK with its whole provenance (DFT, models, report) to an AiiDA archive FILE."""
    load_profile_or_exit(profile_name)
    node = load_study(pk)
    if file.exists() and not force:
        raise click.ClickException(f"{file} exists: give another name or --force")
    import logging

    from aiida.tools.archive import create_archive

    logging.getLogger("aiida.export").setLevel(logging.WARNING)  # its tables would bury our line
    create_archive([node], filename=file, overwrite=force)
    size = file.stat().st_size / 2**20
    click.echo(f"Exported study {node.label!r} <{node.pk}> to {file} ({size:.1f} MiB)")
    click.echo(f"Re-run it elsewhere: aiida-emlip reproduce {file}")


@click.command("reproduce")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--study", "study_uuid", default=None, help="UUID of the study when the archive holds several.")
@CACHE_OPTION
@click.option(
    "--tolerance", default=1e-6, show_default=True, help="Relative difference reported as a change."
)
@PROFILE_OPTION
def reproduce(
    file: Path, study_uuid: str | None, cache: bool, tolerance: float, profile_name: str | None
) -> None:
    """Import archive FILE, relaunch its study with caching on and print where the results differ."""
    target = load_profile_or_exit(profile_name)
    from aiida_emlip.cli.study_reproduce import reproduce_archive

    reproduce_archive(file, study_uuid, cache, tolerance, target)


@click.command("list")
@click.argument("what", type=click.Choice(["all", "studies", "models", "datasets"]), default="all")
@click.option("--limit", default=20, show_default=True, help="Most recent entries per kind.")
@PROFILE_OPTION
def list_(what: str, limit: int, profile_name: str | None) -> None:
    """Studies, models and datasets of the profile, newest first."""
    load_profile_or_exit(profile_name)
    from aiida_emlip.cli.study_status import list_lines

    for line in retry_when_busy(lambda: list_lines(what, limit)):
        click.echo(line)
