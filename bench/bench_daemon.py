"""Benchmark: DFT calculations per minute in the foreground and on the daemon, and the workchain overhead.

On N tiny configurations (H₂ of N bond lengths in a 5 Å box, 25 Ry, Γ: about a second of pw.x each),
with caching off so that every calculation runs (checked: no calculation comes from the cache), after
a warm-up that imports both sides and runs one configuration through each (untimed; the import times are
reported):

1. foreground: the dataset workchain with ``max_concurrent = 1`` (serial) and with
   ``max_concurrent = M``, run as ``aiida-emlip`` runs it (:mod:`aiida_emlip.workflows.foreground`: a
   parent resumes when its child ends); then ``PwBaseWorkChain`` alone, one after the other, on the very
   same inputs (``get_builder_restart`` of each child of the serial run) with ``aiida.engine.run``, as a
   user without this plugin runs it. Target: serial workchain / Σ PwBaseWorkChain ≤ 1.10. Side by side,
   the serial workchain with ``aiida.engine.run`` too, and ``PwBaseWorkChain`` alone with the foreground
   runner (the same runner on both sides: what the workchain itself costs).
2. daemon with 1 worker, then 2 workers: the dataset workchain submitted with ``max_concurrent = M``;
   the resident memory (RSS) of every daemon worker is sampled every 0.5 s with psutil. Target: wall
   with 2 workers / serial foreground wall ≤ 0.6.

The profile is made the way ``aiida-emlip setup --services`` makes one (a fresh PostgreSQL database and
user, RabbitMQ broker) under a temporary ``AIIDA_PATH``, and deleted with its database at the end.

``--serial-only`` stops after the serial run and ``PwBaseWorkChain`` alone (the overhead ratio);
``--sqlite`` measures that on the SQLite profile without a broker that ``aiida-emlip setup`` makes (a
parent there learns that a child ended only by polling, unless the foreground runner tells it). The CPU
time of the benchmark's own Python process is recorded beside the wall time of both (``cpu_s``: the
figure that still compares on a loaded machine, where the wall time follows the load).

``--repeats R`` runs the serial workchain and ``PwBaseWorkChain`` alone R times, taking turns, and takes
the ratio of each side's fastest round (the rounds' own ratios are printed and kept beside it): on a
shared machine a single pair of runs moves by more than what is measured.

``--ecutwfc`` raises the cutoff (the density's is 4 times it): longer pw.x runs for the same bookkeeping,
as a study's DFT has them.

Usage: ``nice -n 10 python bench/bench_daemon.py [--n 40] [--max-concurrent 4] [--serial-only]
[--repeats 3] [--ecutwfc 25] [--no-side-by-side] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import services_profile
from daemon_memory import MemoryTrace

WORK, PROFILE = services_profile.scratch_environment("emlip-bench")
PW = shutil.which("pw.x") or "/usr/bin/pw.x"
CHEAP = {
    "ecutwfc": 25.0,
    "ecutrho": 100.0,
    "conv_thr_per_atom": 1.0e-7,
    "kpoints_distance": 1.0,
    "max_iterations": 1,
    "postprocess": {"hirshfeld": False},
}
SAMPLE_S = 0.5
#: The pw.x inputs of every run (``--ecutwfc`` raises the cutoff: longer pw.x runs, the same bookkeeping).
OVERRIDES = dict(CHEAP)


def make_profile(poll_interval: float, sqlite: bool = False) -> tuple[Any, Any]:
    """The services profile (or the SQLite one), ``pw@localhost`` and an H-only pseudo family."""
    if sqlite:
        return services_profile.make_sqlite_profile(WORK, PW, ["H"], poll_interval)
    return services_profile.make_profile(PROFILE, PW, WORK / "pseudos", ["H"], poll_interval)


def configurations(n: int) -> dict[str, Any]:
    """H₂ at ``n`` bond lengths from 0.70 to 0.80 Å (all different: nothing could be reused anyway)."""
    from aiida import orm
    from ase import Atoms

    out = {}
    for i in range(n):
        atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.70 + 0.10 * i / max(1, n - 1)]])
        atoms.cell = [5.0, 5.0, 5.0]
        atoms.center()
        atoms.pbc = True
        out[f"h2_{i:03d}"] = orm.StructureData(ase=atoms).store()
    return out


def builder(code, family, structures, max_concurrent: int):
    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    return EmlipDatasetWorkChain.get_builder_from_protocol(
        code, structures, family.label, protocol="fast", overrides=OVERRIDES, max_concurrent=max_concurrent
    )


def calculations(node) -> list:
    from aiida import orm

    return [c for c in node.called_descendants if isinstance(c, orm.CalcJobNode)]


def check_ran(node, n: int) -> int:
    """Every configuration ran pw.x itself (none from the cache); return the number of pw.x runs."""
    assert node.is_finished_ok, f"{node.process_label}<{node.pk}>: {node.exit_status} {node.exit_message}"
    calcs = calculations(node)
    cached = [c.pk for c in calcs if c.base.caching.is_created_from_cache]
    assert not cached, f"calculations from the cache: {cached}"
    assert len(calcs) >= n, f"{len(calcs)} calculations for {n} configurations"
    return len(calcs)


def process_cpu() -> float:
    """CPU seconds (user + system) of this Python process so far (not of pw.x)."""
    times = os.times()
    return times.user + times.system


def runner_of(name: str):
    """``run_get_node`` of the plugin's foreground runner (``foreground``) or of aiida-core (``stock``)."""
    if name == "foreground":
        from aiida_emlip.workflows.foreground import run_get_node
    else:
        from aiida.engine import run_get_node
    return run_get_node


def run_foreground(
    code, family, structures, max_concurrent: int, runner: str = "foreground"
) -> tuple[float, Any]:
    start = time.perf_counter()
    _, node = runner_of(runner)(builder(code, family, structures, max_concurrent))
    return time.perf_counter() - start, node


def run_pwbase_alone(dataset_node, runner: str = "stock") -> tuple[float, list[float]]:
    """Each PwBaseWorkChain of ``dataset_node`` again, alone and one after the other, on the same inputs."""
    from aiida.common.links import LinkType

    from aiida_emlip.workflows.dataset import LABEL_PREFIX, pw_run

    run_get_node = runner_of(runner)

    links = dataset_node.base.links.get_outgoing(link_type=LinkType.CALL_WORK).all()
    keys = [link.link_label.removeprefix(LABEL_PREFIX) for link in links]
    children = [pw_run(dataset_node, key) for key in keys]  # each configuration's PwBaseWorkChain
    walls = []
    for child in sorted(children, key=lambda c: c.ctime):
        start = time.perf_counter()
        _, node = run_get_node(child.get_builder_restart())
        walls.append(time.perf_counter() - start)
        check_ran(node, 1)
    return sum(walls), walls


def warm_up(code, family) -> dict[str, float]:
    """Import both sides and run one configuration through each, untimed, before anything is timed.

    Without it the first timed run (the workchain) would also pay the imports and the first calculation's
    start-up that the runs after it find done. Returns the import times: what a user without the plugin
    imports (``PwBaseWorkChain``), and what the plugin adds to that.
    """
    from aiida import orm
    from aiida.manage.caching import disable_caching
    from ase import Atoms

    start = time.perf_counter()
    from aiida_quantumespresso.workflows.pw.base import PwBaseWorkChain  # noqa: F401

    pwbase_s = time.perf_counter() - start
    start = time.perf_counter()
    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain  # noqa: F401

    plugin_s = time.perf_counter() - start
    atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.66]], cell=[5.0, 5.0, 5.0], pbc=True)
    atoms.center()
    with disable_caching():
        _, node = run_foreground(code, family, {"warm_up": orm.StructureData(ase=atoms).store()}, 1)
        check_ran(node, 1)
        run_pwbase_alone(node)
    return {"import_pwbase_s": pwbase_s, "import_plugin_extra_s": plugin_s}


def rss_summary(trace: MemoryTrace) -> dict[str, Any]:
    """Per daemon worker: first, largest and last resident memory (MiB) and the number of samples."""
    series: dict[int, list[float]] = {}
    for _, _, rss in trace.samples:
        for pid, mib in rss.items():
            series.setdefault(pid, []).append(mib)
    per_worker = {
        str(pid): {"first_mib": s[0], "max_mib": max(s), "last_mib": s[-1], "samples": len(s)}
        for pid, s in series.items()
    }
    peaks = [w["max_mib"] for w in per_worker.values()]
    return {"workers": per_worker, "max_mib": max(peaks) if peaks else None}


def run_daemon(code, family, structures, workers: int, max_concurrent: int) -> tuple[float, Any, dict]:
    from aiida.engine import submit

    with services_profile.daemon(PROFILE, workers), MemoryTrace(PROFILE, interval=SAMPLE_S) as trace:
        start = time.perf_counter()
        node = submit(builder(code, family, structures, max_concurrent))
        while not node.is_terminated:
            time.sleep(0.5)
        wall = time.perf_counter() - start
    return wall, node, rss_summary(trace)


def per_minute(n: int, wall: float) -> float:
    return 60.0 * n / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="configurations (default 40)")
    parser.add_argument("--max-concurrent", type=int, default=4, help="of the concurrent runs (default 4)")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="runner.poll.interval (s)")
    parser.add_argument("--serial-only", action="store_true", help="only the overhead ratio (no daemon)")
    parser.add_argument(
        "--sqlite",
        action="store_true",
        help="the overhead ratio on the SQLite profile without a broker that `aiida-emlip setup` makes "
        "(implies --serial-only)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of the serial workchain and PwBaseWorkChain alone, taking turns; the ratio is of each "
        "side's fastest round (default 1)",
    )
    parser.add_argument(
        "--ecutwfc",
        type=float,
        default=CHEAP["ecutwfc"],
        help="wave-function cutoff in Ry, the density's 4x (default 25: about a second of pw.x each)",
    )
    parser.add_argument(
        "--no-side-by-side",
        action="store_true",
        help="leave out the two runs with the other runner (AiiDA's for the workchain, the foreground one)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    OVERRIDES.update(ecutwfc=args.ecutwfc, ecutrho=4.0 * args.ecutwfc)
    n, m = args.n, args.max_concurrent
    args.serial_only = args.serial_only or args.sqlite
    result: dict[str, Any] = {
        "n_configurations": n,
        "max_concurrent": m,
        "runner_poll_interval_s": args.poll_interval,
        "ecutwfc_ry": args.ecutwfc,
        "cpu_count": os.cpu_count(),
        "load_average_start": os.getloadavg(),
    }
    try:
        from aiida.manage.caching import disable_caching
        from aiida.manage.configuration import get_config_option

        code, family = make_profile(args.poll_interval, sqlite=args.sqlite)
        result["profile"] = "core.sqlite_dos, no broker" if args.sqlite else "core.psql_dos + core.rabbitmq"
        result["caching_default_enabled"] = get_config_option("caching.default_enabled")
        structures = configurations(n)
        result.update(warm_up(code, family))
        print(
            f"imports (before timing): PwBaseWorkChain {result['import_pwbase_s']:.2f} s, the plugin's "
            f"dataset workchain {result['import_plugin_extra_s']:.2f} s more"
        )
        with disable_caching():
            rounds = []
            for _ in range(args.repeats):
                cpu_start = process_cpu()
                serial, node = run_foreground(code, family, structures, 1)
                cpu_serial = process_cpu() - cpu_start
                result["pw_runs_serial"] = check_ran(node, n)
                print(f"foreground, max_concurrent=1: {serial:.1f} s, {per_minute(n, serial):.1f} DFT/min")
                cpu_start = process_cpu()
                alone, walls = run_pwbase_alone(node)
                cpu_alone = process_cpu() - cpu_start
                print(f"PwBaseWorkChain alone x {n}: {alone:.1f} s; workchain / alone = {serial / alone:.3f}")
                print(
                    f"CPU of this process: workchain {cpu_serial:.1f} s, alone {cpu_alone:.1f} s; "
                    f"workchain / alone = {cpu_serial / cpu_alone:.3f}"
                )
                rounds.append(
                    {
                        "serial_s": serial,
                        "alone_s": alone,
                        "serial_cpu_s": cpu_serial,
                        "alone_cpu_s": cpu_alone,
                    }
                )
            if args.repeats > 1:
                # each side's fastest round: what the load of the moment added to either side left out
                serial = min(r["serial_s"] for r in rounds)
                alone = min(r["alone_s"] for r in rounds)
                cpu_serial = min(r["serial_cpu_s"] for r in rounds)
                cpu_alone = min(r["alone_cpu_s"] for r in rounds)
                ratios = sorted(r["serial_s"] / r["alone_s"] for r in rounds)
                result["rounds"] = rounds
                result["overhead_ratio_median_of_rounds"] = ratios[len(ratios) // 2]
                print(
                    f"{args.repeats} rounds: fastest workchain {serial:.1f} s / fastest alone {alone:.1f} s "
                    f"= {serial / alone:.3f}; ratios of the rounds {', '.join(f'{r:.3f}' for r in ratios)}"
                )
            result.update(
                {
                    "foreground_serial_cpu_s": cpu_serial,
                    "pwbase_alone_cpu_s": cpu_alone,
                    "overhead_ratio_cpu": cpu_serial / cpu_alone,
                    "overhead_ratio": serial / alone,
                    "foreground_serial_s": serial,
                    "pwbase_alone_sum_s": alone,
                    "overhead_per_configuration_s": (serial - alone) / n,
                }
            )
            if not args.no_side_by_side:
                serial_stock, node_stock = run_foreground(code, family, structures, 1, runner="stock")
                check_ran(node_stock, n)
                alone_fg, _ = run_pwbase_alone(node, runner="foreground")
                print(
                    f"side by side: workchain with aiida.engine.run {serial_stock:.1f} s "
                    f"({serial_stock / alone:.3f} of PwBaseWorkChain alone); PwBaseWorkChain alone with the "
                    f"foreground runner {alone_fg:.1f} s "
                    f"(workchain / alone, same runner: {serial / alone_fg:.3f})"
                )
                result.update(
                    {
                        "foreground_serial_stock_runner_s": serial_stock,
                        "overhead_ratio_stock_runner": serial_stock / alone,
                        "pwbase_alone_foreground_runner_s": alone_fg,
                        "overhead_ratio_same_runner": serial / alone_fg,
                    }
                )
            if args.serial_only:
                result["load_average_end"] = os.getloadavg()
                if args.json:
                    args.json.write_text(json.dumps(result, indent=2))
                print(json.dumps(result, indent=2))
                return
            concurrent, node_m = run_foreground(code, family, structures, m)
            check_ran(node_m, n)
            print(
                f"foreground, max_concurrent={m}: {concurrent:.1f} s, {per_minute(n, concurrent):.1f} DFT/min"
            )
        result.update(
            {
                "pwbase_alone_mean_s": alone / len(walls),
                f"foreground_max_concurrent_{m}_s": concurrent,
            }
        )
        rates = {"foreground_serial": per_minute(n, serial), f"foreground_mc{m}": per_minute(n, concurrent)}
        for workers in (1, 2):
            wall, node_d, rss = run_daemon(code, family, structures, workers, m)
            check_ran(node_d, n)
            rates[f"daemon_{workers}_worker"] = per_minute(n, wall)
            result[f"daemon_{workers}_worker_s"] = wall
            result[f"daemon_{workers}_worker_rss"] = rss
            rate = per_minute(n, wall)
            print(
                f"daemon, {workers} worker(s), max_concurrent={m}: {wall:.1f} s, {rate:.1f} DFT/min; "
                f"worker RSS max {rss['max_mib']:.0f} MiB"
            )
        result["dft_per_minute"] = rates
        result["daemon_2_workers_vs_serial"] = result["daemon_2_worker_s"] / serial
        result["daemon_2_workers_vs_1"] = result["daemon_2_worker_s"] / result["daemon_1_worker_s"]
        result["load_average_end"] = os.getloadavg()
        print(
            f"targets: workchain / PwBaseWorkChain alone = {result['overhead_ratio']:.3f} (<= 1.10); "
            f"2 workers / serial = {result['daemon_2_workers_vs_serial']:.3f} (<= 0.6)"
        )
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    finally:
        cleanup()


def cleanup() -> None:
    """Stop the daemon; delete the profile, its database and user, and the temporary folder."""
    if (WORK / "storage").is_dir():  # the SQLite profile: its folder holds everything
        shutil.rmtree(WORK, ignore_errors=True)
        return
    services_profile.delete_profile(PROFILE, WORK)


if __name__ == "__main__":
    main()
