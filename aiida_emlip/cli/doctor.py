"""``aiida-emlip doctor``: report what is installed and configured, and how to fix what is missing.

Doctor only reads: it never creates the profile (it does not even import :mod:`aiida` for a profile
that does not exist yet), and it only *reports* the broker, which SQLite profiles do not need. With a
RabbitMQ broker it also reports the broker's ``consumer_timeout``, past which a daemon process is handed
to a second worker, the daemon as the process table shows it (workers that a crashed daemon left
running, which ``verdi daemon stop`` does not reach), and, while no daemon worker runs, any active process
whose task the broker no longer holds.
"""

from __future__ import annotations

import re
import socket
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import click

from aiida_emlip.cli.options import (
    CODE_LABEL,
    COMPUTER_LABEL,
    PROFILE_OPTION,
    QE_PACKAGE,
    find_executable,
    target_or_exit,
)
from aiida_emlip.profile import ProfileTarget, profiles_in
from aiida_emlip.services.consumer_timeout import (
    CONSEQUENCE,
    ConsumerTimeout,
    raise_fix,
    read_consumer_timeout,
)
from aiida_emlip.services.daemon_processes import DaemonProcesses, kill_fix, profile_daemon_processes

SETUP_FIX = "aiida-emlip setup"
QE_FIX = f"apt-get install -y {QE_PACKAGE}   (or: aiida-emlip setup --pw /path/to/pw.x)"


@dataclass
class Report:
    """Collects doctor lines; ``ok`` turns false when an essential item is missing."""

    ok: bool = True
    lines: list[str] = field(default_factory=list)

    def add(self, item: str, text: str, fix: str | None = None, essential: bool = True) -> None:
        """Record one item; with ``fix`` it is missing and the fix command is printed under it."""
        mark = "ok" if fix is None else ("MISSING" if essential else "note")
        self.lines.append(f"[{mark:^7}] {item:<10} {text}")
        if fix is not None:
            self.lines.append(f"{'':10}  fix: {fix}")
            if essential:
                self.ok = False


def qe_version(exe: Path, timeout: float = 30.0) -> str:
    """Return the version banner of a Quantum ESPRESSO program (run with empty input in a temp dir)."""
    with tempfile.TemporaryDirectory(prefix="emlip-doctor-") as tmp:
        try:
            proc = subprocess.run(
                [str(exe)],
                input="",
                capture_output=True,
                text=True,
                cwd=tmp,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unknown ({exc.__class__.__name__})"
    match = re.search(r"Program\s+(\S+)\s+v\.(\S+)", proc.stdout)
    return f"{match.group(1)} v.{match.group(2)}" if match else "unknown version"


def check_qe(report: Report) -> None:
    """Report pw.x and ld1.x."""
    pw = find_executable("pw.x")
    for name in ("pw.x", "ld1.x"):
        exe = pw if name == "pw.x" else find_executable(name, hint=pw)
        if exe is None:
            report.add(name, "not found on PATH", fix=QE_FIX)
        else:
            report.add(name, f"{qe_version(exe)}  {exe}")


CHROMIUM_FIX = "apt-get install -y chromium   (or: make browser)"


def check_browser(report: Report) -> None:
    """Report the headless browser that renders the study report in the tests (not essential)."""
    exe = find_executable("chromium") or find_executable("chromium-browser")
    if exe is None:
        report.add(
            "chromium", "not found (only needed to test the HTML report)", fix=CHROMIUM_FIX, essential=False
        )
        return
    try:
        proc = subprocess.run(
            [str(exe), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        version = proc.stdout.strip() or "unknown version"
    except (OSError, subprocess.TimeoutExpired) as exc:
        version = f"unknown ({exc.__class__.__name__})"
    report.add("chromium", f"{version}  {exe}")


def check_torch(report: Report) -> None:
    """Report the torch version and whether a CUDA device is available."""
    try:
        import torch
    except ImportError:
        report.add("torch", "not importable", fix="pip install torch==2.13.0")
        return
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s))"
    else:
        device = "cpu (CUDA not available)"
    report.add("torch", f"{torch.__version__}  device: {device}")


def broker_reachable(config: dict, timeout: float = 2.0) -> bool:
    """Return whether a TCP connection to the configured RabbitMQ host and port succeeds."""
    host = config.get("broker_host", "127.0.0.1")
    port = int(config.get("broker_port", 5672))
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def check_consumer_timeout(
    report: Report, host: str, read: Callable[[str], ConsumerTimeout] = read_consumer_timeout
) -> None:
    """Report RabbitMQ's consumer_timeout: a note, with how to raise it, unless it is off or 10 h or more."""
    timeout = read(host)
    if timeout.sufficient:
        report.add("consumer", timeout.describe())
    else:
        text = f"{timeout.describe()}: {CONSEQUENCE}"
        report.add("consumer", text, fix=raise_fix(), essential=False)


def check_daemon(report: Report, profile_name: str) -> DaemonProcesses | None:
    """Report the daemon as the process table shows it: running, not running, or workers and helpers
    left running by a crashed arbiter (``None``: the process table could not be read)."""
    try:
        state = profile_daemon_processes(profile_name)
    except Exception as exc:  # psutil refused, a PID file in a strange state: report, go on
        report.add("daemon", f"not checked ({exc.__class__.__name__}: {exc})", essential=False)
        return None
    if state.leftovers:
        report.add("daemon", state.describe(), fix=kill_fix(state.leftovers, profile_name), essential=False)
    else:
        report.add("daemon", state.describe())
    return state


def check_tasks(report: Report, profile_name: str, daemon: DaemonProcesses | None = None) -> None:
    """Report active processes without a task in the broker (read only while no daemon worker runs)."""
    from aiida_emlip.services.lost_tasks import check_process_tasks, repair_fix

    if daemon is not None and not daemon.running and daemon.workers:
        count = len(daemon.workers)
        text = f"not checked while {count} leftover daemon worker(s) hold their tasks (end them first)"
        report.add("tasks", text)
        return
    try:
        check = check_process_tasks(profile_name, None if daemon is None else daemon.running)
    except Exception as exc:  # a broker that answers the port but not the protocol: report, go on
        report.add("tasks", f"not checked ({exc.__class__.__name__}: {exc})", essential=False)
        return
    if check.daemon_running:
        report.add("tasks", "not checked while the daemon runs (its workers hold their tasks)")
    elif check.lost:
        pks = ", ".join(str(pk) for pk in check.lost)
        text = f"{len(check.lost)} active process(es) without a task in the broker, never to continue: {pks}"
        report.add("tasks", text, fix=repair_fix(profile_name), essential=False)
    else:
        report.add("tasks", f"each of the {len(check.active)} active process(es) has its task in the broker")


def check_aiida(report: Report, target: ProfileTarget) -> None:
    """Report the AiiDA profile, its storage and broker, the computer, the pw code and the pseudo family."""
    report.add("aiida", f"aiida-core {metadata.version('aiida-core')}, config dir {target.config_dir}")
    if target.name not in profiles_in(target.config_dir):
        report.add("profile", f"'{target.name}' not created yet", fix=SETUP_FIX)
        return

    from aiida.manage.configuration import load_profile

    profile = load_profile(target.name, allow_switch=True)
    report.add("profile", f"{profile.name}{' (isolated project profile)' if target.isolated else ''}")
    try:
        from aiida.manage import get_manager

        get_manager().get_profile_storage()
    except Exception as exc:
        text = f"{profile.storage_backend}: cannot be loaded ({exc})"
        report.add("storage", text, fix=f"verdi -p {profile.name} storage migrate")
        return
    report.add("storage", f"{profile.storage_backend}")

    broker = profile.process_control_backend
    if broker is None:
        report.add("broker", "none (fine: processes run in this shell with run(); no daemon/submit)")
    elif broker_reachable(profile.process_control_config):
        report.add("broker", f"{broker} reachable")
        check_consumer_timeout(report, profile.process_control_config.get("broker_host", "127.0.0.1"))
        check_tasks(report, profile.name, check_daemon(report, profile.name))
    else:
        report.add(
            "broker",
            f"{broker} not reachable (needed only for the daemon and submit)",
            fix="apt-get install -y rabbitmq-server && service rabbitmq-server start",
            essential=False,
        )

    from aiida.common.exceptions import NotExistent
    from aiida.orm import load_code, load_computer

    try:
        computer = load_computer(COMPUTER_LABEL)
        configured = "" if computer.is_configured else " (not configured)"
        report.add("computer", f"{computer.label} workdir {computer.get_workdir()}{configured}")
    except NotExistent:
        report.add("computer", f"'{COMPUTER_LABEL}' missing", fix=SETUP_FIX)
    try:
        code = load_code(f"{CODE_LABEL}@{COMPUTER_LABEL}")
        report.add("code", f"{code.full_label} -> {code.get_executable()} (withmpi={code.with_mpi})")
    except NotExistent:
        report.add("code", f"'{CODE_LABEL}@{COMPUTER_LABEL}' missing", fix=SETUP_FIX)

    from aiida_emlip.pseudos.family import FAMILY_LABEL, family_elements

    try:
        elements = family_elements(FAMILY_LABEL)
        report.add("pseudos", f"{FAMILY_LABEL}: {', '.join(sorted(elements))}")
    except Exception:
        report.add("pseudos", f"family '{FAMILY_LABEL}' not installed", fix=SETUP_FIX)


@click.command("doctor")
@PROFILE_OPTION
def doctor(profile_name: str | None) -> None:
    """Report pw.x, ld1.x, chromium, torch, the profile and the pseudo family; exit 1 if essentials miss."""
    target = target_or_exit(profile_name)
    report = Report()
    check_qe(report)
    check_browser(report)
    check_torch(report)
    check_aiida(report, target)
    for line in report.lines:
        click.echo(line)
    if not report.ok:
        click.echo("Some essentials are missing: run the 'fix' commands above.", err=True)
        raise SystemExit(1)
    click.echo("All essentials present.")
