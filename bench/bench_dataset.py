"""Benchmark of the dataset workchain.

1. Overhead: wall time of ``EmlipDatasetWorkChain`` run with ``run()`` (``max_concurrent=1``, and
   again with 4) over N small configurations, divided by the sum of the wall times of ``pw.x`` run
   bare on the very same input files (copied from the calculations). Target ≤ 1.10.
2. Daemon: wall time of the same workchain submitted to a daemon with two workers
   (``max_concurrent=N``) relative to the serial run. Target ≤ 0.6.

Everything runs in a throw-away profile made as ``aiida-emlip setup --services`` makes one
(``core.psql_dos`` on this machine's PostgreSQL with a fresh database and user, RabbitMQ broker, under
a temporary ``AIIDA_PATH``); the profile, database and user are dropped at the end.

With ``--load`` only the daemon runs, as a load test: N configurations (default 200) through
``--workers`` workers with the workchain's own throttle (``max_concurrent`` 8), every daemon worker's
resident memory sampled every 2 s (:mod:`daemon_memory`); the report gives per worker the peak and
the growth after the first 50 configurations (target: no growth beyond 20 %), and checks that every
configuration was labelled by exactly one pw.x run.

With ``--kill-pw`` only a fault is injected instead: the workchain is submitted to the daemon (with
``max_iterations: 2``, so that the protocol's ``on_unhandled_failure: restart_once`` can run the
killed configuration again), the OS process of one running pw.x (found by its working directory, the
CalcJob's remote workdir) is sent SIGKILL, and the outcome (exit status, report, labels,
PwCalculations per configuration) is written out.

Usage: ``python bench/bench_dataset.py [--n 20] [--workers 2] [--no-daemon] [--kill-pw | --load]
[--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import services_profile
from daemon_memory import MemoryTrace, growth

WORK, PROFILE = services_profile.scratch_environment("emlip-bench")
PW = shutil.which("pw.x") or "/usr/bin/pw.x"
#: runner.poll.interval of the benchmark profile (s); set from --poll-interval.
POLL_INTERVAL = 1
CHEAP = {
    "ecutwfc": 25.0,
    "ecutrho": 100.0,
    "conv_thr_per_atom": 1.0e-7,
    "kpoints_distance": 1.0,
    "max_iterations": 1,
}


def verdi(*args: str) -> subprocess.CompletedProcess[str]:
    """``verdi -p PROFILE ARGS`` in the benchmark's AIIDA_PATH."""
    return services_profile.verdi(PROFILE, *args)


def create_profile():
    """The throw-away ``core.psql_dos`` + RabbitMQ profile with pw.x and an H/O family; (code, family).

    ``runner.poll.interval`` is set from ``--poll-interval``: a parent learns that a child finished from
    a RabbitMQ broadcast or, failing that, by polling (AiiDA's default: every 60 s); processes run with
    ``run()`` here were not woken by the broadcasts.
    """
    return services_profile.make_profile(PROFILE, PW, WORK / "pseudos", ["H", "O"], POLL_INTERVAL)


def delete_profile() -> None:
    """Stop the daemon, delete the profile, its database and user, remove the files."""
    services_profile.delete_profile(PROFILE, WORK)


def configurations(n: int):
    from ase.build import molecule

    from aiida_emlip.data import EmlipDatasetData
    from aiida_emlip.structures import rattle

    water = molecule("H2O")
    water.cell = [6.0, 6.0, 6.0]
    water.center()
    water.pbc = True
    return EmlipDatasetData.from_ase(rattle(water, n, stdev=0.05, seed=2024)).store()


def builder(code, family, dataset, max_concurrent: int, max_iterations: int = 1):
    """The dataset workchain at :data:`CHEAP`; ``max_iterations`` > 1 lets a killed pw.x run again (the
    protocol's ``on_unhandled_failure: restart_once``)."""
    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    overrides = {**CHEAP, "max_iterations": max_iterations}
    return EmlipDatasetWorkChain.get_builder_from_protocol(
        code, dataset, family.label, protocol="fast", overrides=overrides, max_concurrent=max_concurrent
    )


def bare_pw_time(node) -> tuple[float, list[float]]:
    """Rerun pw.x bare on the input files of every PwCalculation under ``node``; return the sum of walls."""
    from aiida import orm

    walls = []
    calcs = [c for c in node.called_descendants if isinstance(c, orm.CalcJobNode)]
    for calc in calcs:
        run_dir = Path(tempfile.mkdtemp(prefix="bare-", dir=WORK))
        (run_dir / "pseudo").mkdir()
        (run_dir / "aiida.in").write_text(calc.base.repository.get_object_content("aiida.in"))
        for pseudo in calc.inputs.pseudos.values():
            (run_dir / "pseudo" / pseudo.filename).write_bytes(pseudo.get_content(mode="rb"))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        with open(run_dir / "aiida.out", "w") as out:
            subprocess.run(
                [PW, "-in", "aiida.in"],
                cwd=run_dir,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                check=True,
            )
        walls.append(time.perf_counter() - start)
    return sum(walls), walls


def run_local(code, family, dataset, max_concurrent: int = 1) -> tuple[float, object]:
    """Run the workchain with ``run()`` in this interpreter; return (wall time, node)."""
    from aiida.engine import run_get_node

    start = time.perf_counter()
    _, node = run_get_node(builder(code, family, dataset, max_concurrent))
    wall = time.perf_counter() - start
    assert node.is_finished_ok, node.exit_message
    return wall, node


def run_daemon(code, family, dataset, workers: int) -> tuple[float, object]:
    from aiida.engine import submit

    with services_profile.daemon(PROFILE, workers):
        start = time.perf_counter()
        node = submit(builder(code, family, dataset, len(dataset)))
        while not node.is_terminated:
            time.sleep(0.5)
        wall = time.perf_counter() - start
    assert node.is_finished_ok, node.exit_message
    return wall, node


def running_pw(node) -> tuple[object, object, int] | None:
    """(PwCalculation, its pw.x OS process, SCF iterations so far) of a pw.x under ``node`` in its SCF.

    The pw.x process is matched by its working directory (the CalcJob's remote workdir), so pw.x runs
    of other programs never are; it counts once its stdout shows the SCF loop and not yet ``JOB DONE``.
    """
    import psutil
    from aiida import orm

    workdirs = {}
    for calc in node.called_descendants:
        if isinstance(calc, orm.CalcJobNode) and calc.get_remote_workdir():
            workdirs[os.path.realpath(calc.get_remote_workdir())] = calc
    for proc in psutil.process_iter(["name", "cwd"]):
        cwd = proc.info["cwd"]
        if proc.info["name"] != "pw.x" or not cwd or os.path.realpath(cwd) not in workdirs:
            continue
        try:
            stdout = (Path(cwd) / "aiida.out").read_text(errors="replace")
        except OSError:
            continue
        if "Self-consistent Calculation" in stdout and "JOB DONE" not in stdout:
            return workdirs[os.path.realpath(cwd)], proc, stdout.count("iteration #")
    return None


def call_labels(node) -> dict[int, str]:
    """pk -> call link label of the processes ``node`` called."""
    from aiida.common.links import LinkType

    links = node.base.links.get_outgoing(link_type=(LinkType.CALL_CALC, LinkType.CALL_WORK)).all()
    return {link.node.pk: link.link_label for link in links}


def configuration_of(node, calc) -> str:
    """The key of the configuration of the dataset workchain ``node`` that the pw.x calculation ``calc``
    labels: its ``PwBaseWorkChain`` is called ``label_<key>``, or the label workchain around it."""
    from aiida_emlip.workflows.label_runs import LABEL_PREFIX

    labels = call_labels(node)
    run = calc.caller if calc.caller.pk in labels else calc.caller.caller
    return labels[run.pk].removeprefix(LABEL_PREFIX)


def outcome(node) -> dict[str, object]:
    """What a dataset workchain did: exit status, report, energies by key, PwCalculations by key."""
    from aiida import orm

    from aiida_emlip.workflows.label_runs import LABEL_PREFIX, pw_of

    labels = call_labels(node)
    calcs: dict[str, list[dict[str, object]]] = {}
    base: dict[str, dict[str, object]] = {}
    for label in node.called:
        key = labels.get(label.pk, "").removeprefix(LABEL_PREFIX)
        if not labels.get(label.pk, "").startswith(LABEL_PREFIX):
            continue
        child = pw_of(label)  # the configuration's PwBaseWorkChain
        if child is None:
            continue
        base[key] = {"pk": child.pk, "exit_status": child.exit_status, "exit_message": child.exit_message}
        calcs[key] = [
            {"pk": c.pk, "exit_status": c.exit_status, "exit_message": c.exit_message}
            for c in sorted(child.called, key=lambda c: c.ctime)
            if isinstance(c, orm.CalcJobNode)
        ]
    energies = {}
    if "dataset" in node.outputs:
        energies = {a.info["key"]: float(a.info["energy"]) for a in node.outputs.dataset.to_ase()}
    return {
        "exit_status": node.exit_status,
        "exit_message": node.exit_message,
        "report": node.outputs.report.get_dict() if "report" in node.outputs else None,
        "energies": energies,
        "energies_finite": all(math.isfinite(e) for e in energies.values()),
        "pw_base": base,
        "pw_calculations": calcs,
    }


def run_daemon_load(code, family, dataset, workers: int, warmup: int = 50) -> dict[str, object]:
    """Submit N configurations to the daemon (throttled by the workchain), trace the workers' memory."""
    from aiida import orm
    from aiida.engine import submit

    def finished_pw() -> int:
        query = orm.QueryBuilder().append(orm.WorkflowNode, filters={"id": node.pk}, tag="wc")
        query.append(orm.WorkflowNode, with_incoming="wc", tag="base")
        query.append(orm.CalcJobNode, with_incoming="base", filters={"attributes.exit_status": 0})
        return query.count()

    with services_profile.daemon(PROFILE, workers):
        start = time.perf_counter()
        node = submit(builder(code, family, dataset, 8))
        with MemoryTrace(PROFILE, finished_pw) as trace:
            while not node.is_terminated:
                time.sleep(1.0)
        wall = time.perf_counter() - start
    result = outcome(node)
    runs = result.pop("pw_calculations")
    result.pop("pw_base")
    energies = result.pop("energies")
    return {
        "wall_s": wall,
        "workers": workers,
        "exit_status": result["exit_status"],
        "labelled": len(energies),
        "pw_runs_per_configuration": sorted({len(v) for v in runs.values()}),
        "energies_finite": result["energies_finite"],
        "memory": growth(trace.samples, warmup),
        "warmup_configurations": warmup,
        "samples": len(trace.samples),
    }


def run_daemon_kill_pw(code, family, dataset, workers: int, timeout: float = 600.0) -> dict[str, object]:
    """Submit to the daemon, SIGKILL one running pw.x, wait for the end; the :func:`outcome` and timings."""
    from aiida.engine import submit

    with services_profile.daemon(PROFILE, workers):
        start = time.perf_counter()
        node = submit(builder(code, family, dataset, len(dataset), max_iterations=2))
        found = None
        while found is None and not node.is_terminated and time.perf_counter() - start < timeout:
            found = running_pw(node)
            if found is None:
                time.sleep(0.1)
        if found is None:
            raise RuntimeError(f"no pw.x seen in its SCF under {node.pk} ({node.process_state})")
        calc, proc, iterations = found
        killed_at = time.perf_counter() - start
        pw_age = time.time() - proc.create_time()
        os.kill(proc.pid, signal.SIGKILL)
        killed_key = configuration_of(node, calc)
        while not node.is_terminated and time.perf_counter() - start < timeout:
            time.sleep(0.5)
        wall = time.perf_counter() - start
    return {
        **outcome(node),
        "daemon_workers": workers,
        "killed_key": killed_key,
        "killed_calculation_pk": calc.pk,
        "killed_pid": proc.pid,
        "killed_after_submit_s": killed_at,
        "pw_age_at_kill_s": pw_age,
        "scf_iterations_at_kill": iterations,
        "terminated": node.is_terminated,
        "workchain_daemon_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help="configurations (20; 200 with --load)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-daemon", action="store_true")
    parser.add_argument("--kill-pw", action="store_true", help="only the daemon run, with one pw.x killed")
    parser.add_argument("--load", action="store_true", help="only the daemon run, with worker memory traced")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--poll-interval", type=int, default=1, help="runner.poll.interval (s, an integer)")
    args = parser.parse_args()
    if args.n is None:
        args.n = 200 if args.load else 20
    global POLL_INTERVAL
    POLL_INTERVAL = args.poll_interval
    try:
        code, family = create_profile()
        dataset = configurations(args.n)
        if args.load:
            warmup = min(50, max(1, args.n // 4))
            result = {
                "n_configurations": args.n,
                **run_daemon_load(code, family, dataset, args.workers, warmup),
            }
            if args.json:
                args.json.write_text(json.dumps(result, indent=2))
            print(json.dumps(result, indent=2))
            return
        if args.kill_pw:
            result = {"n_configurations": args.n, **run_daemon_kill_pw(code, family, dataset, args.workers)}
            if args.json:
                args.json.write_text(json.dumps(result, indent=2))
            print(json.dumps(result, indent=2))
            return
        wall_serial, node = run_local(code, family, dataset, 1)
        bare, walls = bare_pw_time(node)
        result = {
            "n_configurations": args.n,
            "runner_poll_interval_s": POLL_INTERVAL,
            "cpu_count": os.cpu_count(),
            "load_average_start": os.getloadavg(),
            "workchain_run_serial_s": wall_serial,
            "bare_pw_sum_s": bare,
            "bare_pw_mean_s": bare / len(walls),
            "overhead_ratio": wall_serial / bare,
        }
        print(
            f"serial workchain {wall_serial:.1f} s; bare pw.x sum {bare:.1f} s; "
            f"ratio {wall_serial / bare:.3f}"
        )
        wall_four, _ = run_local(code, family, dataset, 4)
        result.update(
            {"workchain_run_concurrent4_s": wall_four, "overhead_ratio_concurrent4": wall_four / bare}
        )
        print(f"run() with max_concurrent=4: {wall_four:.1f} s; ratio to bare sum {wall_four / bare:.3f}")
        if not args.no_daemon:
            wall_daemon, _ = run_daemon(code, family, dataset, args.workers)
            result.update(
                {
                    "daemon_workers": args.workers,
                    "workchain_daemon_s": wall_daemon,
                    "daemon_vs_serial": wall_daemon / wall_serial,
                }
            )
            print(
                f"daemon ({args.workers} workers) {wall_daemon:.1f} s; "
                f"relative to serial {wall_daemon / wall_serial:.3f}"
            )
        result["load_average_end"] = os.getloadavg()
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    finally:
        delete_profile()


if __name__ == "__main__":
    main()
