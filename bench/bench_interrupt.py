"""Ctrl-C during a study, tried as a user would: does the shell stop at once, and what is left running?

In a throw-away isolated profile (a temporary ``AIIDA_PATH``, ``aiida-emlip setup``), a tiny study (6
water configurations in two charge states, two designs, 3 epochs) is launched with ``--no-cache`` and
sent SIGINT after each of the given delays (seconds after the start: the DFT phase, then training). For
each trial: the exit status (130 expected), the seconds from the interrupt to the exit (a run still
alive 60 s after it counts as hung and is killed with SIGKILL), the processes of the profile left
``Created``, ``Waiting`` or ``Running``, and the pw.x and training processes still alive in the
profile's work directory.

Usage: ``python bench/bench_interrupt.py [--delays 5 10 15 20 30 40] [--json out.json] [--keep]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from tiny_study import tiny_spec

WORK = Path(tempfile.mkdtemp(prefix="emlip-bench-interrupt-"))
os.environ["AIIDA_PATH"] = str(WORK / ".aiida")
HUNG_S = 60.0
SPEC = tiny_spec()


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "aiida_emlip.cli", *args]


def unfinished_processes() -> int:
    """Processes of the profile that are neither finished, excepted nor killed."""
    from aiida import load_profile, orm

    load_profile(allow_switch=True)
    query = orm.QueryBuilder().append(
        orm.ProcessNode, filters={"attributes.process_state": {"in": ["created", "waiting", "running"]}}
    )
    return query.count()


def jobs_alive() -> list[str]:
    """pw.x and emlip-train/emlip-eval processes running in the profile's work directory."""
    alive = []
    for proc in psutil.process_iter(["name", "cmdline", "cwd"]):
        cwd, cmd = proc.info.get("cwd") or "", " ".join(proc.info.get("cmdline") or [])
        if str(WORK) in cwd and ("pw.x" in cmd or "emlip-train" in cmd or "emlip-eval" in cmd):
            alive.append(cmd[:80])
    return alive


def trial(spec: Path, delay: float) -> dict:
    """Launch, interrupt after ``delay`` s, and see what is left."""
    before = unfinished_processes()
    proc = subprocess.Popen(
        cli("launch", str(spec), "--no-cache"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    sent = time.perf_counter()
    try:
        out, _ = proc.communicate(timeout=HUNG_S)
        exit_s, status = time.perf_counter() - sent, proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        exit_s, status = None, "hung"
    time.sleep(1.0)
    lines = out.decode(errors="replace").splitlines()
    return {
        "delay_s": delay,
        "exit_status": status,
        "exit_after_s": exit_s,
        "left_unfinished": unfinished_processes() - before,
        "jobs_alive": jobs_alive(),
        "output_lines": len(lines),
        "last_line": lines[-1][:160] if lines else "",
        "traceback": any("Traceback" in line for line in lines),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delays", type=float, nargs="+", default=[5, 10, 15, 20, 30, 40])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true", help=f"keep the profile in {WORK}")
    args = parser.parse_args()
    try:
        subprocess.run(cli("setup"), check=True, capture_output=True)
        spec = WORK / "tiny.yaml"
        spec.write_text(SPEC)
        results = []
        for delay in args.delays:
            result = trial(spec, delay)
            results.append(result)
            after = "-" if result["exit_after_s"] is None else f"{result['exit_after_s']:.1f}"
            print(
                f"interrupt at {delay:5.1f} s: exit {result['exit_status']} after {after} s; "
                f"left unfinished {result['left_unfinished']}, jobs alive {len(result['jobs_alive'])}, "
                f"{result['output_lines']} lines, traceback {result['traceback']}",
                flush=True,
            )
        stopped = [r for r in results if r["exit_status"] == 130]
        summary = {
            "trials": len(results),
            "exit_130": len(stopped),
            "exit_after_s_max": max((r["exit_after_s"] for r in stopped), default=None),
            "left_unfinished": sum(r["left_unfinished"] for r in results),
            "jobs_alive": sum(len(r["jobs_alive"]) for r in results),
            "tracebacks": sum(r["traceback"] for r in results),
        }
        print(json.dumps(summary))
        if args.json:
            args.json.write_text(json.dumps({"summary": summary, "trials": results}, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
