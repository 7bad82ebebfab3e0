"""What RabbitMQ's ``consumer_timeout`` does to a daemon process that outlives it.

Makes a throw-away ``core.psql_dos`` + RabbitMQ profile (as ``setup --services`` does, without the
pw.x code and pseudopotentials), starts a one-worker daemon, submits one long process and follows it:

* ``--kind calcfunction``: :func:`sleeping_calcfunction` sleeps ``--sleep`` seconds inside the worker
  and appends a line to a file for every execution (a rerun would show as a second line);
* ``--kind calcjob``: ``core.arithmetic.add`` on ``/bin/bash`` whose job script sleeps ``--sleep``
  seconds first (``prepend_text``), also logging every execution.

The broker's ``consumer_timeout`` and ``channel_tick_interval`` (how often a channel checks it, 60 s by
default) are whatever the broker has unless ``--consumer-timeout-ms`` / ``--tick-ms`` are given: then
they are set at runtime with ``rabbitmqctl eval`` (root) before the daemon starts, and the old values are
put back at the end whatever happens. ``--apply-fix`` then applies the runtime part of the advice of
``aiida-emlip doctor`` (``rabbitmqctl eval`` of
:data:`~aiida_emlip.services.consumer_timeout.RAISE_NOW_EXPRESSION`) before the daemon starts.

Written out (``--json``): the process state, exit status, the number of executions, the wall and CPU
seconds, the broker log lines written meanwhile that mention the timeout, and the daemon log's
warnings and errors.

Usage: ``python bench/consumer_timeout_probe.py --kind calcfunction --sleep 60
--consumer-timeout-ms 15000 --tick-ms 5000 --json out.json`` (as root, for the broker settings).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from pathlib import Path

import services_profile
from rabbit_settings import get_rabbit_env, rabbit_env, rabbitmqctl_eval

WORK, PROFILE = services_profile.scratch_environment("emlip-ctimeout")

RABBIT_LOG_DIR = Path("/var/log/rabbitmq")
#: Broker log lines that tell of a consumer timeout or of a channel closed on this account.
RABBIT_PATTERN = re.compile(r"consumer_timeout|timed out|acknowledg|PRECONDITION", re.IGNORECASE)
DAEMON_PATTERN = re.compile(r"WARNING|ERROR|CRITICAL|Traceback|timed out|PRECONDITION|channel", re.IGNORECASE)


def rabbit_log_sizes() -> dict[Path, int]:
    return {path: path.stat().st_size for path in RABBIT_LOG_DIR.glob("*.log")}


def rabbit_log_since(sizes: dict[Path, int]) -> list[str]:
    """Lines written to the broker's logs since ``sizes`` that mention the timeout."""
    lines = []
    for path in RABBIT_LOG_DIR.glob("*.log"):
        with path.open("rb") as handle:
            handle.seek(sizes.get(path, 0))
            text = handle.read().decode(errors="replace")
        lines += [line for line in text.splitlines() if RABBIT_PATTERN.search(line)]
    return lines


def daemon_log_lines(profile: str) -> list[str]:
    """Warnings and errors of the profile's daemon log."""
    for path in Path(os.environ["AIIDA_PATH"]).rglob(f"aiida-{profile}.log"):
        return [line for line in path.read_text(errors="replace").splitlines() if DAEMON_PATTERN.search(line)]
    return ["no daemon log found"]


def task_queue(profile: str) -> list[str]:
    """``name messages_ready messages_unacknowledged consumers`` of the profile's process task queue."""
    from aiida.manage import get_manager

    prefix = f"aiida-{get_manager().get_profile().uuid}"
    proc = subprocess.run(
        [
            "rabbitmqctl",
            "list_queues",
            "-q",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return [line for line in proc.stdout.splitlines() if line.startswith(prefix) and "process.queue" in line]


def make_profile(profile: str, work: Path):
    """The throw-away profile, loaded; a ``localhost`` computer and a ``bash`` code on it."""
    from aiida import load_profile
    from aiida.manage.configuration import get_config
    from aiida.orm import InstalledCode

    from aiida_emlip.cli.setup import ensure_computer
    from aiida_emlip.profile import select_services_profile
    from aiida_emlip.services.postgres import Superuser
    from aiida_emlip.services.profile import Broker, create_services_profile

    target = select_services_profile(profile)
    create_services_profile(target, Superuser(), Broker())
    config = get_config()
    config.set_option("runner.poll.interval", 1.0, scope=profile)
    config.unset_option("caching.enabled_for", scope=profile)
    config.store()
    load_profile(profile, allow_switch=True)
    computer, _ = ensure_computer(target)
    code = InstalledCode(
        label="bash",
        computer=computer,
        filepath_executable="/bin/bash",
        default_calc_job_plugin="core.arithmetic.add",
    ).store()
    return code


def submit(kind: str, seconds: int, marker: Path, code):
    from aiida.engine import submit as aiida_submit
    from aiida.orm import Int, Str
    from aiida.plugins import CalculationFactory

    if kind == "calcfunction":
        from sleeping_process import sleeping_calcfunction

        return aiida_submit(sleeping_calcfunction, seconds=Int(seconds), marker=Str(str(marker)))
    builder = CalculationFactory("core.arithmetic.add").get_builder()
    builder.code = code
    builder.x = Int(seconds)
    builder.y = Int(1)
    builder.metadata.options.prepend_text = f'echo "$$ $(date +%s)" >> {marker}\nsleep {seconds}'
    builder.metadata.options.resources = {"num_machines": 1, "num_mpiprocs_per_machine": 1}
    return aiida_submit(builder)


def follow(node, deadline: float) -> list[tuple[float, str]]:
    """Poll the process until it ends or ``deadline`` (monotonic); its states with the seconds since start."""
    start = time.monotonic()
    states: list[tuple[float, str]] = []
    while True:
        node = type(node).collection.get(pk=node.pk)
        state = node.process_state.value if node.process_state else "none"
        if not states or states[-1][1] != state:
            states.append((round(time.monotonic() - start, 1), state))
            print(f"{states[-1][0]:7.1f} s  {state}", flush=True)
        if node.is_terminated or time.monotonic() > deadline:
            return states
        time.sleep(1.0)


def run(args: argparse.Namespace, work: Path, profile: str) -> dict:
    marker = work / "executions.log"
    code = make_profile(profile, work)
    sizes = rabbit_log_sizes()
    short = args.consumer_timeout_ms
    if args.apply_fix and short is None:  # the value in force comes back after the run
        short = get_rabbit_env("consumer_timeout")
    with rabbit_env(consumer_timeout=short, channel_tick_interval=args.tick_ms) as old:
        if args.apply_fix:
            from aiida_emlip.services.consumer_timeout import RAISE_NOW_EXPRESSION

            rabbitmqctl_eval(RAISE_NOW_EXPRESSION)
        in_force = {key: get_rabbit_env(key) for key in ("consumer_timeout", "channel_tick_interval")}
        print(f"broker: {in_force} (old: {old})", flush=True)
        wall0, cpu0 = time.monotonic(), time.process_time()
        with services_profile.daemon(profile, args.workers):
            node = submit(args.kind, args.sleep, marker, code)
            print(f"submitted {args.kind} <{node.pk}> sleeping {args.sleep} s", flush=True)
            states = follow(node, time.monotonic() + args.wait)
            wall = time.monotonic() - wall0
            node = type(node).collection.get(pk=node.pk)
            status = services_profile.verdi(profile, "daemon", "status").stdout
            time.sleep(args.linger)
            queues = task_queue(profile)
    executions = marker.read_text().splitlines() if marker.exists() else []
    return {
        "kind": args.kind,
        "sleep_s": args.sleep,
        "broker": in_force,
        "broker_before": old,
        "pk": node.pk,
        "process_state": node.process_state.value if node.process_state else None,
        "exit_status": node.exit_status,
        "is_finished_ok": node.is_finished_ok,
        "executions": len(executions),
        "execution_lines": executions,
        "states": states,
        "wall_s": round(wall, 1),
        "cpu_s": round(time.process_time() - cpu0, 2),
        "rabbit_log": rabbit_log_since(sizes)[-20:],
        "daemon_log": daemon_log_lines(profile)[-40:],
        "daemon_status": status[-2000:],
        "task_queue": queues,
        "workers": args.workers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("calcfunction", "calcjob"), default="calcfunction")
    parser.add_argument("--sleep", type=int, default=60, help="seconds the process runs")
    parser.add_argument(
        "--consumer-timeout-ms", type=int, help="set the broker's consumer_timeout for the run"
    )
    parser.add_argument("--tick-ms", type=int, help="set the broker's channel_tick_interval for the run")
    parser.add_argument("--apply-fix", action="store_true", help="raise consumer_timeout as doctor advises")
    parser.add_argument("--workers", type=int, default=2, help="daemon workers (setup advises 2)")
    parser.add_argument(
        "--linger", type=float, default=5, help="seconds after the end before the queue is read"
    )
    parser.add_argument("--wait", type=float, default=0, help="give up after (s); default 2 x sleep + 60")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.wait = args.wait or 2 * args.sleep + 60
    work, profile = WORK, PROFILE
    # the daemon worker imports sleeping_process from here (the daemon passes on PYTHONPATH)
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    try:
        result = run(args, work, profile)
    finally:
        services_profile.delete_profile(profile, work)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
