"""pw.x labels and an ``emlip.train`` job through a Slurm cluster over SSH, end to end.

What ``docs/cluster.md`` walks through, as one script (checked on a single-node Slurm on localhost
made by ``.ci/slurm_setup.sh``; ``tests/test_slurm_cluster.py`` runs it):

* ``--setup`` creates (or reuses) the computer (``core.ssh`` + ``core.slurm``) and its codes as the
  documentation does with ``verdi``: ``pw`` (``--with-mpi``), ``pp`` (serial), ``emlip-train`` and
  ``emlip-eval`` of a virtual environment on the cluster;
* ``dataset``: an ``EmlipDatasetWorkChain`` of two bulk Si cells (several k-points each) with pw.x
  under ``mpirun`` on the ``cpu`` partition (``--mpiprocs`` processes) and ``--npool`` k-point pools
  (the protocol key ``parallelization: {npool: N}``, so ``pw.x -npool N``), and the Hirshfeld
  charges from pp.x;
* ``train``: an ``emlip.train`` calculation (tiny model, two epochs, ``device: cpu``) on the ``gpu``
  partition with ``custom_scheduler_commands: "#SBATCH --gres=gpu:1"``.

Written out (``--json``): for every calculation its PK, process state and exit status, the Slurm job
id, the submission script (``_aiidasubmit.sh``), Slurm's accounting (``sacct``, run on the cluster
through the computer's transport) and, for pw.x, what its output says about the parallelisation; the
wall and CPU seconds and the load average.

Usage (a profile that has the pseudopotential family; as root on the Slurm host)::

    AIIDA_PATH=$PWD/.aiida python bench/slurm_check.py --profile emlip --setup --json out.json

``--only dataset`` or ``--only train`` runs one of the two stages alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "data" / "tiny.xyz"

#: Stand-in for ``module load`` on a real cluster: OpenMPI's mpirun refuses root unless told.
MPI_ROOT_PREPEND = "export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"

TRAIN_CONFIG = {
    "seed": 0,
    "device": "cpu",
    "data": {"valid_fraction": 0.2, "test_fraction": 0.2, "batch_size": 4},
    "model": {
        "backbone": {"num_channels": 4, "num_interactions": 1, "correlation": 2, "max_ell": 2, "r_max": 4.0},
        "head": {"name": "charges"},
    },
    "stages": [{"name": "main", "epochs": 2}],
    "checkpoint": {"every": 0},
}

#: A small study whose codes are the cluster's: pw.x (2 MPI processes) and pp.x on the cpu partition,
#: training on the gpu partition with a GRES. ``{computer}`` is the computer's label.
STUDY_SPEC = """\
name: cluster-check
description: pw.x on the cpu partition, training on the gpu partition of a Slurm cluster
codes:
  pw: pw@{computer}
  pp: pp@{computer}
  train: emlip-train@{computer}
  eval: emlip-eval@{computer}
pseudo_family: {family}
dft:
  protocol: fast
  max_concurrent: 4
  overrides:
    ecutwfc: 20.0
    ecutrho: 80.0
    conv_thr_per_atom: 1.0e-7
    max_iterations: 1
    options:
      queue_name: cpu
      resources: {{num_machines: 1, num_mpiprocs_per_machine: 2}}
      max_wallclock_seconds: 1800
systems:
  water:
    structure: {{molecule: H2O, box: 6.0}}
    rattle: {{n: 4, stdev: 0.05}}
    charges: [0]
split:
  held_out_fraction: 0.25
  seed: 0
training:
  epochs: 2
  batch_size: 2
  device: cpu
  options:
    queue_name: gpu
    resources: {{num_machines: 1}}
    max_wallclock_seconds: 1800
    custom_scheduler_commands: "#SBATCH --gres=gpu:1"
designs: [sr, charges]
"""

SACCT_FIELDS = "JobID,JobName,Partition,AllocCPUS,AllocTRES,State,ExitCode,Elapsed,TotalCPU,NodeList"


def setup_cluster(
    label: str = "cluster",
    hostname: str = "localhost",
    username: str | None = None,
    key_filename: str | None = None,
    workdir: str = "/var/tmp/emlip-cluster/{username}/aiida",
    venv: str | None = None,
    poll_interval: float = 10.0,
) -> dict[str, Any]:
    """The computer and its codes, created as docs/cluster.md does with ``verdi`` (reused when present).

    Returns ``{"computer": Computer, "pw": code, "pp": code, "emlip-train": code, "emlip-eval": code}``.
    """
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    username = username or os.environ.get("USER") or "root"
    key_filename = key_filename or str(Path.home() / ".ssh" / "id_ed25519")
    venv = venv or sys.prefix
    try:
        computer = orm.load_computer(label)
    except NotExistent:
        computer = orm.Computer(
            label=label,
            hostname=hostname,
            transport_type="core.ssh",
            scheduler_type="core.slurm",
            workdir=workdir,
        )
        computer.set_mpirun_command(["mpirun", "-np", "{tot_num_mpiprocs}"])
        computer.store()
        computer.set_default_mpiprocs_per_machine(1)
    computer.set_minimum_job_poll_interval(poll_interval)
    if not computer.is_user_configured(orm.User.collection.get_default()):
        computer.configure(  # what `verdi computer configure core.ssh -n` sets, with the key and user
            username=username,
            port=22,
            key_filename=key_filename,
            look_for_keys=False,
            load_system_host_keys=True,  # ~/.ssh/known_hosts
            key_policy="RejectPolicy",
            safe_interval=1.0,
        )
    root = username == "root"
    venv_prepend = f"source {venv}/bin/activate; export OMP_NUM_THREADS=1"
    specs = {
        "pw": ("/usr/bin/pw.x", "quantumespresso.pw", True, MPI_ROOT_PREPEND if root else ""),
        "pp": ("/usr/bin/pp.x", "quantumespresso.pp", False, ""),
        "emlip-train": (f"{venv}/bin/emlip-train", "emlip.train", None, venv_prepend),
        "emlip-eval": (f"{venv}/bin/emlip-eval", "emlip.evaluate", None, venv_prepend),
    }
    out: dict[str, Any] = {"computer": computer}
    for code_label, (executable, plugin, with_mpi, prepend) in specs.items():
        try:
            out[code_label] = orm.load_code(f"{code_label}@{label}")
        except NotExistent:
            code = orm.InstalledCode(
                computer=computer,
                filepath_executable=executable,
                label=code_label,
                default_calc_job_plugin=plugin,
                with_mpi=with_mpi,
            )
            code.prepend_text = prepend
            out[code_label] = code.store()
    return out


def si_structures() -> dict[str, Any]:
    """Two bulk Si cells: the primitive cell and a strained, rattled copy (4x4x4 k-points at 0.5 1/Å)."""
    from aiida import orm
    from ase.build import bulk

    si = bulk("Si", "diamond", a=5.43)
    strained = si.copy()
    strained.set_cell(si.cell * 1.02, scale_atoms=True)
    strained.positions[1] += [0.05, -0.03, 0.02]
    return {"si": orm.StructureData(ase=si), "si_strained": orm.StructureData(ase=strained)}


def dataset_overrides(mpiprocs: int, npool: int, queue: str | None) -> dict[str, Any]:
    """Protocol ``fast`` overrides: cheap cutoffs, pw.x under mpirun with ``npool`` pools on ``queue``.

    The pools are the protocol key ``parallelization`` (``pw.x -npool N``), set when ``npool > 1``.
    """
    options: dict[str, Any] = {
        "resources": {"num_machines": 1, "num_mpiprocs_per_machine": mpiprocs},
        # no withmpi: the pw codes are MPI codes (--with-mpi), which the dataset workchain follows
        "max_wallclock_seconds": 900,
        "environment_variables": {"OMP_NUM_THREADS": "1"},
    }
    if queue:
        options["queue_name"] = queue
    overrides: dict[str, Any] = {
        "ecutwfc": 20.0,
        "ecutrho": 80.0,
        "conv_thr_per_atom": 1.0e-7,
        "kpoints_distance": 0.5,
        "max_iterations": 1,
        "options": options,
    }
    if npool > 1:
        overrides["parallelization"] = {"npool": npool}
    return overrides


def sacct(computer, job_id: str | None) -> str | None:
    """Slurm's accounting of ``job_id``, asked on the cluster through the computer's transport."""
    if not job_id:
        return None
    command = f"sacct -j {shlex.quote(str(job_id))} -P --format={SACCT_FIELDS}"
    with computer.get_transport() as transport:
        status, stdout, stderr = transport.exec_command_wait(command)
    return stdout if status == 0 else f"sacct failed ({status}): {stderr.strip()}"


def pw_parallelisation(node) -> dict[str, Any]:
    """What the retrieved pw.x output says about MPI processes, k-point pools and the k-points."""
    out: dict[str, Any] = {}
    retrieved = node.outputs.retrieved if "retrieved" in node.outputs else None
    if retrieved is None:
        return out
    text = retrieved.base.repository.get_object_content("aiida.out")
    for key, pattern in {
        "mpi_processes": r"running on\s+(\d+) processors",
        "npool": r"K-points division:\s+npool\s*=\s*(\d+)",
        "k_points": r"number of k points=\s+(\d+)",
        "wall": r"PWSCF\s+:.*CPU\s+(.*)WALL",
    }.items():
        match = re.search(pattern, text)
        if match:
            out[key] = match.group(1).strip()
    return out


def calc_record(node) -> dict[str, Any]:
    """PK, state, exit status, Slurm job id, submission script and accounting of one calculation."""
    record: dict[str, Any] = {
        "pk": node.pk,
        "process": node.process_label,
        "code": node.inputs.code.full_label if "code" in node.inputs else None,
        "state": node.process_state.value if node.process_state else None,
        "exit_status": node.exit_status,
        "job_id": node.get_job_id(),
        "queue": node.get_option("queue_name"),
        "resources": node.get_option("resources"),
        "cached": node.base.extras.get("_aiida_cached_from", None) is not None,
    }
    try:
        record["submit_script"] = node.base.repository.get_object_content("_aiidasubmit.sh")
    except (FileNotFoundError, OSError):
        record["submit_script"] = None
    record["sacct"] = sacct(node.computer, record["job_id"])
    if node.process_type and node.process_type.endswith("quantumespresso.pw"):
        record["pw"] = pw_parallelisation(node)
    return record


def run_dataset(
    codes: dict[str, Any], family: str, mpiprocs: int = 2, npool: int = 2, queue: str | None = "cpu"
):
    """The dataset workchain on the cluster; returns (node, records of its calculations)."""
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        codes["pw"],
        si_structures(),
        family,
        protocol="fast",
        overrides=dataset_overrides(mpiprocs, npool, queue),
        max_concurrent=2,
    )
    builder.pp_code = codes["pp"]
    _, node = run_get_node(builder)
    calcs = [n for n in node.called_descendants if isinstance(n, orm.CalcJobNode)]
    return node, [calc_record(calc) for calc in sorted(calcs, key=lambda n: n.pk)]


def run_train(codes: dict[str, Any], queue: str | None = "gpu", gres: str = "gpu:1"):
    """An ``emlip.train`` calculation on the GPU partition (``device: cpu``); returns (node, record)."""
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.calculations.train import EmlipTrainCalculation
    from aiida_emlip.data.dataset import EmlipDatasetData

    builder = EmlipTrainCalculation.get_builder()
    builder.code = codes["emlip-train"]
    builder.dataset = EmlipDatasetData.from_extxyz(TINY)
    builder.config = orm.Dict(TRAIN_CONFIG)
    builder.metadata.options.resources = {"num_machines": 1}
    builder.metadata.options.max_wallclock_seconds = 900
    if queue:
        builder.metadata.options.queue_name = queue
    if gres:
        builder.metadata.options.custom_scheduler_commands = f"#SBATCH --gres={gres}"
    _, node = run_get_node(builder)
    return node, calc_record(node)


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=None, help="AiiDA profile (default: the default profile)")
    parser.add_argument("--computer", default="cluster")
    parser.add_argument("--hostname", default="localhost")
    parser.add_argument("--username", default=None)
    parser.add_argument("--setup", action="store_true", help="create the computer and codes if missing")
    parser.add_argument("--poll-interval", type=float, default=10.0, help="minimum job poll interval (s)")
    parser.add_argument("--family", default="emlip-ld1-pbe-v1", help="pseudopotential family")
    parser.add_argument("--mpiprocs", type=int, default=2)
    parser.add_argument("--npool", type=int, default=2)
    parser.add_argument("--cpu-queue", default="cpu")
    parser.add_argument("--gpu-queue", default="gpu")
    parser.add_argument("--gres", default="gpu:1")
    parser.add_argument("--only", choices=["dataset", "train"], default=None, help="run one stage alone")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from aiida import load_profile, orm

    load_profile(args.profile, allow_switch=True)
    if args.setup:
        codes = setup_cluster(args.computer, args.hostname, args.username, poll_interval=args.poll_interval)
    else:
        codes = {
            label: orm.load_code(f"{label}@{args.computer}")
            for label in ("pw", "pp", "emlip-train", "emlip-eval")
        }
    result: dict[str, Any] = {"computer": args.computer, "load_before": os.getloadavg()}
    ok = True
    if args.only in (None, "dataset"):
        wall, cpu = time.monotonic(), _cpu_seconds()
        node, records = run_dataset(codes, args.family, args.mpiprocs, args.npool, args.cpu_queue)
        result["dataset"] = {
            "pk": node.pk,
            "exit_status": node.exit_status,
            "exit_message": node.exit_message,
            "wall_s": round(time.monotonic() - wall, 1),
            "cpu_s_here": round(_cpu_seconds() - cpu, 1),
            "calculations": records,
        }
        ok &= node.is_finished_ok and all(r["exit_status"] == 0 for r in records)
        print(f"dataset workchain {node.pk}: exit {node.exit_status}, {len(records)} calculations")
    if args.only in (None, "train"):
        wall, cpu = time.monotonic(), _cpu_seconds()
        node, record = run_train(codes, args.gpu_queue, args.gres)
        result["train"] = {
            **record,
            "wall_s": round(time.monotonic() - wall, 1),
            "cpu_s_here": round(_cpu_seconds() - cpu, 1),
        }
        ok &= node.is_finished_ok
        print(f"emlip.train {node.pk}: exit {node.exit_status}, Slurm job {record['job_id']}")
    result["load_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
