"""pw.x labels and ``emlip.train`` through Slurm over SSH (``core.ssh`` + ``core.slurm``), end to end.

Needs a Slurm cluster that this machine reaches as ``$USER@localhost`` over SSH with key login
(``~/.ssh/id_ed25519``), with partitions ``cpu`` (at least 2 CPUs) and ``gpu`` (a GRES ``gpu``):
``.ci/slurm_setup.sh`` makes one on a Debian machine (root). Skipped, with the reason, otherwise.
Runs ``bench/slurm_check.py``'s steps in the test profile (a few minutes): an
``EmlipDatasetWorkChain`` of two Si cells with pw.x under ``mpirun -np 2`` and 2 k-point pools on the
``cpu`` partition plus pp.x, then an ``emlip.train`` job on the ``gpu`` partition with
``#SBATCH --gres=gpu:1``; checks the job scripts, pw.x's parallelisation and, when Slurm keeps
accounting, ``sacct``.
"""

from __future__ import annotations

import getpass
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

pytestmark = [pytest.mark.slow, pytest.mark.pw]

KEY = Path.home() / ".ssh" / "id_ed25519"


def _run(command: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


def slurm_problem() -> str | None:
    """Why this machine cannot run the test (``None`` when it can)."""
    for tool in ("sbatch", "sinfo", "sacct", "ssh"):
        if shutil.which(tool) is None:
            return f"{tool} missing: needs a Slurm cluster reached over SSH (.ci/slurm_setup.sh makes one)"
    if not KEY.is_file():
        return f"no SSH key {KEY} (.ci/slurm_setup.sh makes one for root)"
    login = _run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-i", str(KEY),
                  f"{getpass.getuser()}@localhost", "true"])  # fmt: skip
    if login is None or login.returncode != 0:
        why = login.stderr.strip() if login is not None else "timed out"
        return f"no SSH key login to {getpass.getuser()}@localhost (sshd running? {why})"
    partitions = _run(["sinfo", "-h", "-o", "%P %G %c"])
    if partitions is None or partitions.returncode != 0:
        return "sinfo failed: slurmctld not running? (.ci/slurm_setup.sh starts it)"
    rows = {line.split()[0].rstrip("*"): line.split()[1:] for line in partitions.stdout.splitlines() if line}
    if "cpu" not in rows or "gpu" not in rows:
        return f"Slurm has no partitions cpu and gpu (has {sorted(rows)})"
    if "gpu" not in rows["gpu"][0]:
        return "the gpu partition's nodes have no GRES gpu (gres.conf)"
    if int(rows["cpu"][1].rstrip("+")) < 2:
        return "the cpu partition's nodes have fewer than 2 CPUs"
    return None


def _accounting() -> bool:
    probe = _run(["sacct", "-n", "-X", "-S", "now-1hour"])
    return probe is not None and probe.returncode == 0


@pytest.fixture(scope="module")
def cluster_codes(aiida_profile, tmp_path_factory):
    problem = slurm_problem()
    if problem:
        pytest.skip(problem)
    import slurm_check

    workdir = tmp_path_factory.mktemp("slurm-work")
    return slurm_check.setup_cluster(
        label="slurm-test",
        hostname="localhost",
        username=getpass.getuser(),
        key_filename=str(KEY),
        workdir=str(workdir),
        poll_interval=2.0,
    )


def test_dataset_pw_mpi_and_pools_on_the_cpu_partition(cluster_codes, pseudo_family):
    import slurm_check

    node, records = slurm_check.run_dataset(cluster_codes, pseudo_family.label, mpiprocs=2, npool=2)
    assert node.is_finished_ok, node.exit_message
    pw = [r for r in records if r["process"] == "PwCalculation"]
    pp = [r for r in records if r["process"] == "PpCalculation"]
    assert len(pw) == 2 and len(pp) == 2, [r["process"] for r in records]
    for record in records:
        assert record["exit_status"] == 0 and record["job_id"], record
        assert not record["cached"]
        script = record["submit_script"]
        assert "#SBATCH --partition=cpu" in script and "#SBATCH --ntasks-per-node=2" in script, script
    for record in pw:
        script = record["submit_script"]
        assert "'mpirun' '-np' '2'" in script and "pw.x' '-npool' '2'" in script, script
        assert record["pw"]["mpi_processes"] == "2" and record["pw"]["npool"] == "2", record["pw"]
        assert int(record["pw"]["k_points"]) >= 2
    for record in pp:  # serial: the pp code is not an MPI code
        assert "mpirun" not in record["submit_script"]
    if _accounting():
        for record in records:
            assert "|COMPLETED|0:0|" in record["sacct"], record["sacct"]


def test_train_on_the_gpu_partition_with_gres(cluster_codes):
    import slurm_check

    node, record = slurm_check.run_train(cluster_codes, queue="gpu", gres="gpu:1")
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    assert "model" in node.outputs
    script = record["submit_script"]
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --gres=gpu:1" in script, script
    assert "source " in script and "/bin/activate" in script  # the code's prepend text
    if _accounting():
        assert "gres/gpu=1" in record["sacct"] and "|COMPLETED|0:0|" in record["sacct"], record["sacct"]
