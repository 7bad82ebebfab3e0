"""Benchmark of the demo study (``aiida-emlip demo``, the README's main command).

In a throw-away isolated profile (a temporary ``AIIDA_PATH``): ``aiida-emlip setup``, then the demo
twice. Reports the first run's wall time split into DFT, training, validation (held-out predictions
and the validations, which run together) and report, from the study's process nodes; the second
run's wall time and its ratio to the first (every DFT dataset reused whole, every training and
evaluation from the cache), and the processes each run created.
Installation itself (``make install``: pip and apt) is not repeated here; ``setup`` is timed.

Targets: first run ≤ 15 min on 2 cores, cached rerun ≤ 10 % of it.

Usage: ``python bench/bench_demo.py [--epochs N] [--json out.json] [--keep]``.
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
from pathlib import Path

from process_times import called_by_label, span

WORK = Path(tempfile.mkdtemp(prefix="emlip-bench-demo-"))
os.environ["AIIDA_PATH"] = str(WORK / ".aiida")


def cli(*args: str) -> tuple[float, str]:
    """Run ``aiida-emlip ARGS``; return the wall time and the output (exit on failure)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "aiida_emlip.cli", *args], capture_output=True, text=True, check=False
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"aiida-emlip {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return elapsed, proc.stdout


def phases(study) -> dict[str, float]:
    """Seconds per phase of a finished study, from the creation and last-change times of its steps."""
    called = called_by_label(study)
    models = [n for label, n in called.items() if label.startswith(("evaluate_", "validate_"))]
    return {
        "dft": span([called.get("sample"), called.get("dft")]),
        "training": span([called.get("training")]),
        "validation": span(models),
        "report": span([called.get("compare"), called.get("report")]),
        "total": (study.mtime - study.ctime).total_seconds(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the study's)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--keep", action="store_true", help=f"keep the profile in {WORK}")
    args = parser.parse_args()
    extra = ["--epochs", str(args.epochs)] if args.epochs else []
    try:
        setup_s, _ = cli("setup")
        first_s, first_out = cli("demo", "--output", str(WORK / "report1"), *extra)
        second_s, second_out = cli("demo", "--output", str(WORK / "report2"), *extra)

        from aiida import load_profile, orm

        load_profile("emlip", allow_switch=True)
        studies = (
            orm.QueryBuilder()
            .append(orm.WorkflowNode, filters={"process_type": "aiida.workflows:emlip.study"}, tag="s")
            .order_by({"s": {"ctime": "asc"}})
            .all(flat=True)
        )
        split = [phases(node) for node in studies[:2]]
        processes = [1 + len(node.called_descendants) for node in studies[:2]]
        results = {
            "setup_s": setup_s,
            "first_run_s": first_s,
            "cached_run_s": second_s,
            "cached_ratio": second_s / first_s,
            "first_phases_s": split[0],
            "cached_phases_s": split[1] if len(split) > 1 else None,
            "verdict": [line.strip() for line in first_out.splitlines() if line.strip().startswith("- ")],
            "cached_line": next((line for line in second_out.splitlines() if "from the cache" in line), None),
            "processes": processes,
            "cpus": os.cpu_count(),
        }
        print(f"setup (installed already)      {setup_s:8.1f} s")
        print(f"demo, first run                {first_s:8.1f} s   (target ≤ 900 s)")
        for name, value in split[0].items():
            print(f"  {name:<28} {value:8.1f} s")
        print(
            f"demo, cached rerun             {second_s:8.1f} s   "
            f"ratio {second_s / first_s:.3f} (target ≤ 0.10)"
        )
        if results["cached_line"]:
            print(f"  {results['cached_line']}")
        print(f"processes created: first run {processes[0]}, cached rerun {processes[-1]}")
        for line in results["verdict"]:
            print(line)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
