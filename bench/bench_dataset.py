"""Benchmark of the dataset workchain.

1. Overhead: wall time of ``EmlipDatasetWorkChain`` run with ``run()`` (``max_concurrent=1``, and
   again with 4) over N small configurations, divided by the sum of the wall times of ``pw.x`` run
   bare on the very same input files (copied from the calculations). Target ≤ 1.10.
2. Daemon: wall time of the same workchain submitted to a daemon with two workers
   (``max_concurrent=N``) relative to the serial run. Target ≤ 0.6.

Everything runs in a throw-away profile (``core.psql_dos`` on this machine's PostgreSQL with
a fresh database and user, RabbitMQ broker, under a temporary ``AIIDA_PATH``); the profile, database
and user are dropped at the end.

Usage: ``python bench/bench_dataset.py [--n 20] [--workers 2] [--no-daemon] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

WORK = Path(tempfile.mkdtemp(prefix="emlip-bench-"))
os.environ["AIIDA_PATH"] = str(WORK)
# the daemon client looks for `verdi` on the PATH
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
PROFILE = f"emlip-bench-{uuid.uuid4().hex[:8]}"
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


def verdi(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``verdi`` in the benchmark's AIIDA_PATH."""
    exe = str(Path(sys.executable).with_name("verdi"))
    cmd = [exe, *args] if args[:2] == ("profile", "setup") else [exe, "-p", PROFILE, *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, env=os.environ.copy())


def psql(sql: str) -> None:
    """Run one SQL statement as the ``postgres`` superuser (trust authentication on 127.0.0.1)."""
    subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-c", sql],
        capture_output=True,
        text=True,
        check=True,
    )


def create_profile() -> None:
    """A throw-away PostgreSQL database and a ``core.psql_dos`` profile with the RabbitMQ broker."""
    name = PROFILE.replace("-", "_")
    psql(f"CREATE USER {name} WITH PASSWORD '{name}'")
    psql(
        f"CREATE DATABASE {name} OWNER {name} ENCODING 'UTF8' LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8' "
        "TEMPLATE template0"
    )
    proc = verdi(
        "profile",
        "setup",
        "core.psql_dos",
        "--non-interactive",
        "--profile-name",
        PROFILE,
        "--email",
        "bench@emlip.local",
        "--first-name",
        "bench",
        "--last-name",
        "emlip",
        "--institution",
        "emlip",
        "--broker",
        "core.rabbitmq",
        "--database-hostname",
        "127.0.0.1",
        "--database-port",
        "5432",
        "--database-username",
        name,
        "--database-password",
        name,
        "--database-name",
        name,
        "--repository-uri",
        f"file://{WORK / 'repository'}",
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"verdi profile setup failed:\n{proc.stdout}\n{proc.stderr}")
    computer = verdi(
        "computer",
        "setup",
        "--non-interactive",
        "--label",
        "localhost",
        "--hostname",
        "localhost",
        "--transport",
        "core.local",
        "--scheduler",
        "core.direct",
        "--work-dir",
        str(WORK / "work"),
        "--mpiprocs-per-machine",
        "1",
        check=False,
    )
    if computer.returncode != 0:
        raise SystemExit(f"verdi computer setup failed:\n{computer.stdout}\n{computer.stderr}")
    verdi("computer", "configure", "core.local", "localhost", "--non-interactive", "--safe-interval", "0")
    # A parent learns that a child finished from a RabbitMQ broadcast or, failing that, by polling every
    # runner.poll.interval (default 60 s). Here the broadcasts did not wake the parents; poll every 1 s
    # as `verdi presto` configures.
    verdi("config", "set", "runner.poll.interval", str(POLL_INTERVAL))


def delete_profile() -> None:
    """Stop the daemon, delete the profile, drop its database and user, remove the files."""
    verdi("daemon", "stop", check=False)
    verdi("profile", "delete", "--delete-data", "--force", PROFILE, check=False)
    name = PROFILE.replace("-", "_")
    try:
        from aiida.manage import get_manager

        get_manager().unload_profile()
    except Exception as error:  # the profile may never have been loaded
        print(f"cleanup: unload profile: {error}", file=sys.stderr)
    for sql in (f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"DROP USER IF EXISTS {name}"):
        try:
            psql(sql)
        except subprocess.CalledProcessError as error:
            print(f"cleanup: {sql} failed: {error.stderr}", file=sys.stderr)
    shutil.rmtree(WORK, ignore_errors=True)


def setup_codes():
    """localhost computer, pw.x code and an H/O pseudo family in the benchmark profile."""
    from aiida import load_profile, orm

    load_profile(PROFILE, allow_switch=True)
    from aiida_emlip.pseudos.family import FAMILY_LABEL, install_family

    computer = orm.load_computer("localhost")
    computer.set_minimum_job_poll_interval(0.0)
    computer.configure(safe_interval=0.0)
    code = orm.InstalledCode(
        computer=computer,
        filepath_executable=PW,
        label="pw",
        default_calc_job_plugin="quantumespresso.pw",
        with_mpi=False,
    ).store()
    family = install_family(WORK / "pseudos", label=FAMILY_LABEL, elements=["H", "O"])
    return code, family


def configurations(n: int):
    from ase.build import molecule

    from aiida_emlip.data import EmlipDatasetData
    from aiida_emlip.structures import rattle

    water = molecule("H2O")
    water.cell = [6.0, 6.0, 6.0]
    water.center()
    water.pbc = True
    return EmlipDatasetData.from_ase(rattle(water, n, stdev=0.05, seed=2024)).store()


def builder(code, family, dataset, max_concurrent: int):
    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    return EmlipDatasetWorkChain.get_builder_from_protocol(
        code, dataset, family.label, protocol="fast", overrides=CHEAP, max_concurrent=max_concurrent
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

    started = verdi("daemon", "start", str(workers), check=False)
    if started.returncode != 0:
        raise RuntimeError(f"verdi daemon start failed:\n{started.stdout}\n{started.stderr}")
    try:
        start = time.perf_counter()
        node = submit(builder(code, family, dataset, len(dataset)))
        while not node.is_terminated:
            time.sleep(0.5)
        wall = time.perf_counter() - start
    finally:
        verdi("daemon", "stop", check=False)
    assert node.is_finished_ok, node.exit_message
    return wall, node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-daemon", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--poll-interval", type=int, default=1, help="runner.poll.interval (s, an integer)")
    args = parser.parse_args()
    global POLL_INTERVAL
    POLL_INTERVAL = args.poll_interval
    try:
        create_profile()
        code, family = setup_codes()
        dataset = configurations(args.n)
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
