"""Faults under a real daemon in the middle of a study: the daemon stopped and restarted; the study killed.

A tiny study (6 water configurations labelled by pw.x, two designs trained for 3 epochs, held-out
predictions and one validation: the ``response`` polarisability probe, 6 more pw.x runs) is launched
with ``aiida-emlip launch SPEC --daemon`` in a throw-away ``core.psql_dos`` + RabbitMQ profile (made as
``aiida-emlip setup --services`` makes one, deleted at the end).

``--restart-daemon``: once some pw.x runs of the study's DFT have finished and another has just started
(less than 3 s ago), ``verdi daemon stop``; once the pw.x runs that were running have ended (nothing
watched them) and ``--down`` seconds more, ``verdi daemon start``. Then, at the same point of the
validation's pw.x runs, the daemon is crashed instead: its circus arbiter and every worker get SIGKILL
(the unacknowledged tasks go back to RabbitMQ's queue), and it is started again the same way.
The study is left to finish. Written out: the exit status, every pw.x calculation by configuration
(call path) with its state, which ran before and after each fault, and the pw.x OS processes seen in
each calculation's working directory (sampled every 0.2 s): a repeated run would show twice.

``--kill-study``: once a pw.x of the DFT has just started (less than 3 s ago) and another has
finished, ``verdi process kill PK``;
written out: the state of every process of the study's tree once the kill is through, the pw.x OS
processes still alive in the study's working directories, and the output of ``aiida-emlip status``.

Usage: ``python bench/bench_study_faults.py (--restart-daemon | --kill-study) [--workers 2]
[--json out.json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import services_profile
from daemon_memory import Sampler, daemon_processes
from tiny_study import tiny_spec

WORK, PROFILE = services_profile.scratch_environment("emlip-faults")
PW = shutil.which("pw.x") or "/usr/bin/pw.x"
EMLIP = str(Path(sys.executable).with_name("aiida-emlip"))
PW_PROCESS = "aiida.calculations:quantumespresso.pw"
#: The tiny study of the tests with one validation (6 + 6 pw.x runs, at most 2 at once).
SPEC = tiny_spec(
    name="faults",
    description="water in two charge states, two designs, one validation (a fault-injection run)",
    max_concurrent=2,
    budget=12,
    extra="validations:\n  response: {probes: [polarizability]}\n",
    title="Fault-injection study",
)


def verdi(*args: str) -> subprocess.CompletedProcess[str]:
    """``verdi -p PROFILE ARGS`` in this run's AIIDA_PATH."""
    return services_profile.verdi(PROFILE, *args)


def emlip(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``aiida-emlip ARGS --profile PROFILE`` in this run's AIIDA_PATH."""
    return subprocess.run(
        [EMLIP, *args, "--profile", PROFILE], capture_output=True, text=True, timeout=timeout, check=False
    )


def create_profile() -> None:
    """The throw-away profile with pw.x, emlip-train, emlip-eval and an H/O pseudo family."""
    code, _ = services_profile.make_profile(PROFILE, PW, WORK / "pseudos", ["H", "O"], 1.0)
    services_profile.add_emlip_codes(code.computer)


def crash_daemon() -> list[int]:
    """SIGKILL the daemon's circus arbiter first (nothing respawns the others), then the rest.

    The arbiter's statistics process (``circusd-stats``) outlives a killed arbiter: it goes too, as
    it would on a machine that went down.
    """
    procs = sorted(daemon_processes(PROFILE), key=lambda p: "start-circus" not in (p.info["cmdline"] or []))
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    return [proc.pid for proc in procs]


def launch(spec_file: Path) -> int:
    """``aiida-emlip launch SPEC --daemon``; the study's PK."""
    proc = emlip("launch", str(spec_file), "--daemon")
    found = re.search(r"Submitted study '.*' <(\d+)>", proc.stdout)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"launch failed:\n{proc.stdout}\n{proc.stderr}")
    return int(found.group(1))


def call_path(node: Any) -> str:
    """The call link labels from the study down to ``node``: ``dft/label_water_q0_000`` (a configuration's
    ``PwBaseWorkChain``), ``dft/label_water_q0_000/pw`` (one inside its label workchain), ..."""
    from aiida.common.links import LinkType

    labels = []
    while True:
        links = node.base.links.get_incoming(link_type=(LinkType.CALL_CALC, LinkType.CALL_WORK)).all()
        if not links:
            return "/".join(reversed(labels))
        labels.append(links[0].link_label)
        node = links[0].node


def state(node: Any) -> str:
    """``ok``, ``failed N``, ``killed``, ``excepted`` or the active state (``waiting``, ``running``...)."""
    if node.is_finished_ok:
        return "ok"
    if node.is_finished:
        return f"failed {node.exit_status}"
    if node.is_killed:
        return "killed"
    if node.is_excepted:
        return "excepted"
    return node.process_state.value if node.process_state else "created"


def pw_calculations(study: Any) -> list[dict[str, Any]]:
    """Every pw.x calculation under ``study``: pk, configuration (its PwBaseWorkChain's call path), state."""
    from aiida import orm

    rows = []
    for node in study.called_descendants:
        if isinstance(node, orm.CalcJobNode) and node.process_type == PW_PROCESS:
            rows.append(
                {
                    "pk": node.pk,
                    "configuration": call_path(node.caller),
                    "state": state(node),
                    "workdir": node.get_remote_workdir(),
                }
            )
    return sorted(rows, key=lambda row: row["pk"])


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` every 0.2 s; the seconds it took. RuntimeError after ``timeout``."""
    start = time.perf_counter()
    while not condition():
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)
    return time.perf_counter() - start


def pw_processes(workdirs: set[str], younger_than: float | None = None) -> list[Any]:
    """pw.x OS processes whose working directory is one of ``workdirs`` (started < ``younger_than`` s ago)."""
    now = time.time()
    return [
        p
        for p in psutil.process_iter(["name", "cwd", "create_time"])
        if p.info["name"] == "pw.x"
        and p.info["cwd"]
        and os.path.realpath(p.info["cwd"]) in workdirs
        and (younger_than is None or now - p.info["create_time"] < younger_than)
    ]


def workdirs_of(rows: list[dict[str, Any]]) -> set[str]:
    return {os.path.realpath(r["workdir"]) for r in rows if r["workdir"]}


def mid_pw(study: Any, prefix: str) -> bool:
    """Some pw.x runs under ``prefix`` have finished and another has just started (less than 3 s ago)."""
    rows = [r for r in pw_calculations(study) if r["configuration"].startswith(prefix)]
    if not any(r["state"] == "ok" for r in rows):
        return False
    active = [r for r in rows if r["state"] in ("created", "waiting", "running")]
    return bool(pw_processes(workdirs_of(active), younger_than=3.0))


class PwSampler(Sampler):
    """pw.x OS processes seen, by working directory, sampled every 0.2 s in a thread."""

    def __init__(self) -> None:
        super().__init__(0.2)
        self.seen: dict[str, set[int]] = {}

    def sample(self) -> None:
        for proc in psutil.process_iter(["name", "cwd"]):
            cwd = proc.info["cwd"]
            if proc.info["name"] == "pw.x" and cwd and os.path.realpath(cwd).startswith(str(WORK)):
                self.seen.setdefault(os.path.realpath(cwd), set()).add(proc.pid)

    def runs(self, workdir: str | None) -> int:
        return len(self.seen.get(os.path.realpath(workdir), ())) if workdir else 0


def alive_pw(study: Any, younger_than: float | None = None) -> list[int]:
    """PIDs of pw.x processes running in a working directory of ``study``'s calculations.

    ``younger_than``: only those started less than that many seconds ago.
    """
    from aiida import orm

    workdirs = {
        os.path.realpath(n.get_remote_workdir())
        for n in study.called_descendants
        if isinstance(n, orm.CalcJobNode) and n.get_remote_workdir()
    }
    return [p.pid for p in pw_processes(workdirs, younger_than)]


def fault(
    study: Any, prefix: str, how: str, workers: int, down: float, start: float, timeout: float
) -> dict[str, Any]:
    """Once ``prefix``'s pw.x runs are half done, take the daemon down (``shutdown``, ``crash``); restart."""
    try:
        wait_for(lambda: mid_pw(study, prefix) or study.is_terminated, timeout, f"{prefix} pw.x runs")
    except RuntimeError as error:
        return {"how": how, "injected": False, "why": str(error)}
    if study.is_terminated:
        return {"how": how, "injected": False, "why": "the study ended first"}
    at = time.perf_counter()
    before = pw_calculations(study)
    running = pw_processes(workdirs_of(before))
    by_workdir = {os.path.realpath(r["workdir"]): r["pk"] for r in before if r["workdir"]}
    running_calcs = sorted({by_workdir[os.path.realpath(p.info["cwd"])] for p in running})
    if how == "shutdown":
        ended = verdi("daemon", "stop")
        detail = (ended.stdout + ended.stderr).strip().splitlines()[-1:]
    else:
        detail = [f"SIGKILL {pid}" for pid in crash_daemon()]
    # `verdi daemon stop` may time out on a loaded machine while the workers still shut down
    wait_for(lambda: not daemon_processes(PROFILE), 120, "the daemon's processes to end")
    down_after_s = time.perf_counter() - at
    # the pw.x runs go on without a daemon: let them end, so that the restarted daemon finds them done
    with contextlib.suppress(RuntimeError):
        wait_for(lambda: not any(p.is_running() for p in running), 300, "the running pw.x to end")
    time.sleep(down)
    down_rows = pw_calculations(study)
    services_profile.start_daemon(PROFILE, workers)
    return {
        "how": how,
        "injected": True,
        "stage": study.base.extras.get("emlip_stage", None),
        "at_s": at - start,
        "down_after_s": down_after_s,
        "down_s": time.perf_counter() - at,
        "pw_running_at_fault": running_calcs,
        "detail": detail,
        "before": before,
        "while_down": down_rows,
    }


def run_restart(workers: int, down: float, timeout: float) -> dict[str, Any]:
    """Launch; shut the daemon down mid-DFT, crash it mid-validation, restart it each time; await the end."""
    from aiida import orm

    spec_file = WORK / "faults.yaml"
    spec_file.write_text(SPEC)
    with services_profile.daemon(PROFILE, workers), PwSampler() as sampler:
        start = time.perf_counter()
        pk = launch(spec_file)
        study = orm.load_node(pk)
        faults = [fault(study, "dft/", "shutdown", workers, down, start, timeout)]
        faults.append(fault(study, "validate_", "crash", workers, down, start, timeout))
        wait_for(lambda: study.is_terminated, timeout, f"study {pk} to end")
        wall = time.perf_counter() - start
        time.sleep(0.5)  # the sampler's last look
    rows = pw_calculations(study)
    for row in rows:
        row["os_runs"] = sampler.runs(row["workdir"])
    workdirs = {os.path.realpath(row["workdir"]) for row in rows if row["workdir"]}
    status = emlip("status", str(pk))
    return {
        "mode": "restart-daemon",
        "study_pk": pk,
        "exit_status": study.exit_status,
        "exit_message": study.exit_message,
        "state": state(study),
        "wall_s": wall,
        "faults": faults,
        "pw_calculations": rows,
        "all_processes": processes(study),
        "pw_runs_elsewhere": {cwd: len(p) for cwd, p in sampler.seen.items() if cwd not in workdirs},
        "lost_and_found": lost_and_found(),
        "status_rc": status.returncode,
        "status": status.stdout + status.stderr,
    }


def lost_and_found() -> list[dict[str, Any]]:
    """Working directories that AiiDA moved aside when a calculation's upload ran again after a fault."""
    found = []
    for folder in sorted((WORK / ".aiida" / "work" / "lost+found").glob("*")):
        out = folder / "aiida.out"
        text = out.read_text(errors="replace") if out.is_file() else ""
        files = sorted(p.name for p in folder.iterdir())
        found.append(
            {"folder": folder.name, "files": files, "pw_ran": bool(text), "job_done": "JOB DONE" in text}
        )
    return found


def processes(study: Any) -> list[dict[str, Any]]:
    """Every process of the study's tree: pk, call path, type and state."""
    return [
        {"pk": n.pk, "path": call_path(n), "label": n.process_label, "state": state(n)}
        for n in sorted(study.called_descendants, key=lambda n: n.pk)
    ]


def run_kill_study(workers: int, timeout: float) -> dict[str, Any]:
    """Launch, ``verdi process kill`` the study once DFT is half done; the tree's states and ``status``."""
    from aiida import orm

    spec_file = WORK / "faults.yaml"
    spec_file.write_text(SPEC)
    with services_profile.daemon(PROFILE, workers):
        start = time.perf_counter()
        pk = launch(spec_file)
        study = orm.load_node(pk)

        def running_pw() -> bool:
            rows = [r for r in pw_calculations(study) if r["configuration"].startswith("dft/")]
            return any(r["state"] == "ok" for r in rows) and bool(alive_pw(study, younger_than=3.0))

        wait_for(running_pw, timeout, "a pw.x just started after a finished one")
        at = time.perf_counter() - start
        before = processes(study)
        alive_before = alive_pw(study)
        killed = verdi("process", "kill", str(pk), "--timeout", "120")
        kill_s = time.perf_counter() - start - at

        def tree_ended() -> bool:
            return study.is_terminated and all(n.is_terminated for n in study.called_descendants)

        try:
            ended_s = wait_for(tree_ended, 120, "every process of the study to end")
        except RuntimeError:
            ended_s = None
        time.sleep(1.0)
        alive_after = alive_pw(study)
    status = emlip("status", str(pk))
    return {
        "mode": "kill-study",
        "study_pk": pk,
        "state": state(study),
        "exit_status": study.exit_status,
        "process_status": study.process_status,
        "killed_at_s": at,
        "verdi_process_kill_rc": killed.returncode,
        "verdi_process_kill": (killed.stdout + killed.stderr).strip(),
        "verdi_process_kill_s": kill_s,
        "tree_ended_after_kill_s": ended_s,
        "before": before,
        "after": processes(study),
        "pw_calculations": pw_calculations(study),
        "pw_alive_before_kill": alive_before,
        "pw_alive_after_kill": alive_after,
        "status_rc": status.returncode,
        "status": status.stdout + status.stderr,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--restart-daemon", action="store_true", help="shut down, then crash, the daemon mid-study"
    )
    mode.add_argument("--kill-study", action="store_true", help="verdi process kill the study mid-DFT")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--down", type=float, default=5.0, help="seconds the daemon stays down")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each stage")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    try:
        create_profile()
        if args.restart_daemon:
            result = run_restart(args.workers, args.down, args.timeout)
        else:
            result = run_kill_study(args.workers, args.timeout)
        result.update({"daemon_workers": args.workers, "load_average_end": os.getloadavg()})
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    finally:
        services_profile.delete_profile(PROFILE, WORK)


if __name__ == "__main__":
    main()
