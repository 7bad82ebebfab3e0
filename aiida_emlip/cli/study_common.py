"""Helpers of the study commands: load the profile, check a spec against it, build and run a study."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from aiida_emlip.cache_version import CACHED_PROCESSES
from aiida_emlip.cli.options import target_or_exit
from aiida_emlip.profile import ProfileNotFoundError, ProfileTarget, daemon_problem, load_or_create_profile

if TYPE_CHECKING:
    from aiida.orm import ProcessNode

T = TypeVar("T")

STUDY_ENTRY_POINT = "aiida.workflows:emlip.study"
#: Calculations (and calcfunctions) whose finished results a study reuses when caching is on.
CACHED = CACHED_PROCESSES
#: Processes whose report lines the foreground run prints.
PROGRESS_PROCESSES = ("EmlipStudyWorkChain", "EmlipDatasetWorkChain", "EmlipTrainingWorkChain")
PROGRESS_PROCESSES += ("EmlipChargedDefectWorkChain",)
#: The ``[pk|Process|step]: `` that AiiDA puts before each report line.
REPORT_PREFIX = re.compile(r"^\[\d+\|\w+\|\w+\]: ")


def load_profile_or_exit(profile_name: str | None) -> ProfileTarget:
    """Select and load the profile; a clear message (exit 1) when it does not exist yet."""
    target = target_or_exit(profile_name)
    try:
        load_or_create_profile(target, create=False)
    except ProfileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc
    return target


def refuse_daemon_profile() -> None:
    """Exit 1 before anything is stored when the loaded profile cannot run the daemon (SQLite, no broker)."""
    from aiida.manage import get_manager

    profile = get_manager().get_profile()
    problem = daemon_problem(profile.storage_backend, profile.process_control_backend, profile.name)
    if problem:
        raise click.ClickException(problem)


class ProfileResources:
    """The spec's codes and pseudopotential family, looked up in the loaded profile."""

    def code_problem(self, label: str, plugin: str) -> str | None:
        from aiida.common.exceptions import MultipleObjectsError, NotExistent
        from aiida.orm import load_code

        try:
            code = load_code(label)
        except (NotExistent, MultipleObjectsError, ValueError) as exc:
            return f"no code {label!r} in the profile ({exc.__class__.__name__}); run `aiida-emlip setup`"
        found = code.default_calc_job_plugin
        if found and found != plugin:
            return f"code {label!r} runs {found}, not {plugin}"
        return None

    def family_elements(self, label: str) -> set[str] | None:
        from aiida.common.exceptions import NotExistent
        from aiida.orm import load_group

        try:
            group = load_group(label)
        except NotExistent:
            return None
        return set(getattr(group, "elements", []) or [])


def load_spec_or_exit(path: Path) -> tuple[dict[str, Any], str]:
    """The checked spec (every problem with its line, exit 1 otherwise) and its text."""
    from aiida_emlip.spec import SpecError, load_spec

    try:
        return load_spec(path, resources=ProfileResources()), path.read_text()
    except SpecError as exc:
        raise click.ClickException(exc.format()) from None


def study_builder(spec: dict[str, Any], text: str | None, codes: dict[str, Any] | None = None) -> Any:
    """The builder of :class:`~aiida_emlip.workflows.study.EmlipStudyWorkChain` (codes from the spec)."""
    from aiida import orm

    from aiida_emlip.workflows.study import EmlipStudyWorkChain

    builder = EmlipStudyWorkChain.get_builder()
    builder.spec = orm.Dict(spec)
    if text is not None:
        builder.spec_text = orm.Str(text)
    codes = codes or {}
    for role, label in spec["codes"].items():
        builder[f"{role}_code"] = codes.get(role) or orm.load_code(label)
    builder.metadata.label = spec["name"]
    builder.metadata.description = spec.get("description", "")
    return builder


@contextlib.contextmanager
def caching(enabled: bool) -> Iterator[None]:
    """Caching of the finished calculations of :data:`CACHED` (and calcfunctions) inside the block."""
    if not enabled:
        yield
        return
    from aiida.manage.caching import enable_caching

    with contextlib.ExitStack() as stack:
        for identifier in CACHED:
            stack.enter_context(enable_caching(identifier=identifier))
        stack.enter_context(enable_caching(identifier="aiida.workflows:emlip.*"))
        yield


class ProgressHandler(logging.Handler):
    """Print the report lines of the study and its main steps while it runs in this shell."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.start = time.perf_counter()
        self.labels: dict[int, str | None] = {}
        self.done: dict[int, str] = {}

    def _label(self, pk: int) -> str | None:
        if pk not in self.labels:
            from aiida.orm import load_node

            try:
                self.labels[pk] = getattr(load_node(pk), "process_label", None)
            except Exception:  # a node of another process type, or not yet visible
                self.labels[pk] = None
        return self.labels[pk]

    def emit(self, record: logging.LogRecord) -> None:
        pk = getattr(record, "dbnode_id", None)
        label = self._label(pk) if isinstance(pk, int) else None
        if label not in PROGRESS_PROCESSES:
            return
        message = REPORT_PREFIX.sub("", record.getMessage())
        if label == "EmlipDatasetWorkChain":
            if not message.startswith(("progress", "finished")):
                return
            if self.done.get(pk) == message:  # the same counts again: nothing new to say
                return
            self.done[pk] = message
        elapsed = time.perf_counter() - self.start
        short = label.replace("Emlip", "").replace("WorkChain", "")
        click.echo(f"[{elapsed:6.0f} s] {short}<{pk}>: {message}")


@contextlib.contextmanager
def printed_progress() -> Iterator[None]:
    """Route the REPORT lines of the study's processes to the terminal inside the block."""
    logger = logging.getLogger("aiida")
    handler = ProgressHandler()
    quiet = [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]
    levels = [h.level for h in quiet]
    for h in quiet:  # aiida's own console lines would repeat ours
        h.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        for h, level in zip(quiet, levels):
            h.setLevel(level)


#: Exit status of a study stopped with Ctrl-C in the shell: 128 + SIGINT, as shells report it.
INTERRUPTED_EXIT = 130


def check_report_dir(output: Path, study: ProcessNode | None = None) -> Path:
    """``output`` made absolute, once it is a directory a report may be written into; exit 1 otherwise.

    Accepted: a missing or empty directory, or one whose ``index.html`` is an earlier report. With
    ``study`` (``aiida-emlip report PK``) that report must be of this study (its UUID is in the page):
    the command writes one study's report, and another study's is kept. Without (``aiida-emlip demo``,
    checked before the study starts, whose node does not exist yet) any report aiida-emlip wrote is
    accepted, so that the demo rewrites its own earlier report. A file, or a directory holding other
    files, is refused: writing ``index.html`` and ``figures/`` into it would overwrite them.
    """
    output = output.resolve()
    if output.exists() and not output.is_dir():
        raise click.ClickException(f"{output} is a file, not a directory: give an empty or new directory")
    if not output.exists() or not any(output.iterdir()):
        return output
    index = output / "index.html"
    page = index.read_text(errors="replace") if index.is_file() else ""
    if study is not None:
        if study.uuid in page:
            return output
        what = f"not a report of study {study.pk}"
    else:
        from aiida_emlip.report.html import written_by_emlip

        if written_by_emlip(page):
            return output
        what = "not an aiida-emlip report"
    raise click.ClickException(
        f"{output} exists and holds other files ({what}): give an empty or new directory"
    )


def write_report(node: ProcessNode, output: Path) -> Path:
    """Copy the HTML report of the study ``node`` into the directory ``output`` (made absolute: aiida-core
    copies a repository only into an absolute path), say where, and return its ``index.html``."""
    output = output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    node.outputs.report.copy_tree(output)
    index = output / "index.html"
    click.echo(f"Report: {index}")
    return index


@contextlib.contextmanager
def interrupt_exits(kept: str) -> Iterator[None]:
    """Ctrl-C during a foreground run (see :mod:`aiida_emlip.workflows.interrupt`) ends the command with
    one line, ``stopped: <why>. <kept>``, and exit :data:`INTERRUPTED_EXIT` instead of a traceback; a
    second Ctrl-C, which stops at once, with a line saying what may be left."""
    from plumpy.exceptions import KilledError

    try:
        yield
    except KilledError as error:
        click.echo(f"stopped: {error}. {kept}", err=True)
        raise SystemExit(INTERRUPTED_EXIT) from None
    except KeyboardInterrupt:
        click.echo(
            "stopped at once by a second interrupt: processes may be left unfinished in the profile "
            "(`verdi process list`; `verdi process kill PK` ends them).",
            err=True,
        )
        raise SystemExit(INTERRUPTED_EXIT) from None


def run_in_shell(builder: Any, cache: bool) -> ProcessNode:
    """Run the study in this shell with progress lines; return its node.

    Ctrl-C kills the study, every process under it and their jobs: one message and exit
    :data:`INTERRUPTED_EXIT` (:func:`interrupt_exits`). A second Ctrl-C stops at once."""
    from aiida_emlip.workflows.foreground import run_get_node

    kept = "launching the same spec again reuses them" if cache else "they stay in the profile"
    kept = f"The calculations that finished are kept ({kept}); `aiida-emlip list` shows the study."
    with caching(cache), printed_progress(), interrupt_exits(kept):
        _, node = run_get_node(builder)
    return node


def load_study(pk: str) -> ProcessNode:
    """The study node of PK or UUID; a clear message when it is something else."""
    from aiida.common.exceptions import MultipleObjectsError, NotExistent
    from aiida.orm import WorkflowNode, load_node

    try:
        node = load_node(pk)
    except (NotExistent, MultipleObjectsError, ValueError) as exc:
        raise click.ClickException(f"no node {pk} in this profile: {exc}") from None
    if not isinstance(node, WorkflowNode) or node.process_type != STUDY_ENTRY_POINT:
        kind = getattr(node, "process_label", None) or type(node).__name__
        raise click.ClickException(f"node {pk} is not a study but a {kind} (see `aiida-emlip list`)")
    return node


def cached_counts(node: ProcessNode) -> tuple[int, int, int]:
    """(calculations reused, all calculations, datasets reused) of the study ``node``.

    A calculation is reused when the cache made it, or when a dataset workchain of the study returned
    the outputs of a finished twin (:mod:`aiida_emlip.workflows.reuse`): the twin's calculations count.
    """
    from aiida.orm import CalcJobNode

    from aiida_emlip.workflows.reuse import reused_counts

    descendants = node.called_descendants
    calcs = [n for n in descendants if isinstance(n, CalcJobNode)]
    twins, twin_calcs = reused_counts(node, descendants)
    cached = sum(1 for c in calcs if c.base.caching.is_created_from_cache)
    return cached + twin_calcs, len(calcs) + twin_calcs, twins


def print_outcome(node: ProcessNode, target: ProfileTarget) -> None:
    """The verdict, the report's location hint and what to do next."""
    state = "finished OK" if node.is_finished_ok else f"exit status {node.exit_status}"
    click.echo(f"Study {node.label!r} <{node.pk}>: {state}")
    if node.exit_message:
        click.echo(f"  {node.exit_message}")
    if "comparison" in node.outputs:
        for line in node.outputs.comparison.get_dict().get("verdict", []):
            click.echo(f"  - {line}")
    cached, total, datasets = cached_counts(node)
    if cached:
        plural = "s" if datasets != 1 else ""
        through = ""
        if datasets:
            through = f" ({datasets} DFT dataset{plural} with the inputs of a finished one reused whole)"
        click.echo(f"{cached} of {total} calculations reused from the cache{through}")
    click.echo(f"Status: aiida-emlip status {node.pk}; all processes: verdi -p {target.name} process list -a")


def retry_when_busy(read: Callable[[], T], attempts: int = 10, wait: float = 1.0) -> T:
    """``read()``, again after a pause while a running study holds the SQLite database's write lock."""
    from sqlalchemy.exc import OperationalError

    for attempt in range(attempts):
        try:
            return read()
        except OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise click.ClickException(
                    f"the profile's database is busy ({exc.orig}); try again"
                ) from None
            from aiida.manage import get_manager

            try:  # the failed statement leaves the session's transaction unusable
                get_manager().get_profile_storage().get_session().rollback()
            except Exception:
                pass
            time.sleep(wait)
    raise AssertionError("unreachable")
