"""Training throughput: the ``sr`` design against bare ``mace_run_train``, side by side, and every head vs sr.

Both trainers see the same extxyz data (the shipped pw.x set, rattled copies to make it larger), the
same MACE size (channels, L, correlation, interactions, cutoff, radial basis, MLP), batch size,
dtype, device and thread count, and both validate every epoch. Throughput is training structures
per second over epochs 2..E (epoch 1 carries one-off costs), from each trainer's own epoch
timestamps, counting the structures each trainer actually trains on per epoch: ``mace_run_train``
splits off its own validation set and drops the last incomplete batch of each epoch, so it sees
``floor(n_train / batch) * batch`` structures an epoch (read from its log), emlip every training
structure. Beside it, the same rate per second of CPU time (user + system of the trainer's process,
read from ``/proc`` when each epoch's line appears), which other load on a shared machine disturbs
less than wall time. On a CUDA machine the same table is measured on the GPU, with emlip's peak GPU
memory.

The MACE size is ``--backbone small`` (16 channels, l ≤ 1 features, max_ell 3, correlation 3,
2 interactions, r_max 5 Å) or ``realistic`` (the same with 64 channels, a production model's size).

    python bench/bench_training.py [--epochs 4] [--copies 3] [--device cpu|cuda] [--heads sr,charges]
                                   [--backbone small|realistic] [--scf-mode unrolled|implicit]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import ase.io
import numpy as np
import yaml
from bench_heads import REALISTIC_BACKBONE

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "tiny.xyz"
#: MACE sizes of both trainers (``--backbone``): the default, and bench_heads.py's production-sized one.
SIZES = {
    "small": {
        "num_channels": 16,
        "max_L": 1,
        "max_ell": 3,
        "correlation": 3,
        "num_interactions": 2,
        "r_max": 5.0,
        "mlp_hidden": 16,
    },
    "realistic": {**REALISTIC_BACKBONE, "mlp_hidden": 16},
}
FORMAL = {"H": 1.0, "O": -2.0, "Na": 1.0, "Cl": -1.0}
HEADS = {
    "sr": {"name": "sr"},
    "fixed": {"name": "fixed", "formal_charges": {"Na": 1.0, "Cl": -1.0}},
    "charges": {"name": "charges"},
    # atomic dipoles read from the backbone's l = 1 features (the presets' charges with Hirshfeld labels)
    "charges-dipoles": {"name": "charges", "dipoles": True},
    "latent": {"name": "latent"},
    "split": {"name": "split", "formal_charges": {"Na": 1.0, "Cl": -1.0}},
    "qeq": {"name": "qeq"},
    "functional": {"name": "functional"},
    # the functional preset's fragments: charge moves along bonds from formal base charges
    "functional-bonds": {"name": "functional", "fragments": "bonds", "formal_charges": FORMAL},
    "qeq-bonds": {"name": "qeq", "fragments": "bonds", "formal_charges": FORMAL},
    "scf": {"name": "scf"},
}


def make_data(path: Path, copies: int, seed: int = 0) -> int:
    """Rattled copies of the tiny set, labels under REF_* keys (throughput does not need exact labels)."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(copies):
        for atoms in ase.io.read(TINY, ":"):
            new = atoms.copy()
            new.calc = None
            new.positions += rng.normal(scale=0.02, size=new.positions.shape)
            new.info = {
                "REF_energy": atoms.get_potential_energy(),
                "total_charge": atoms.info["total_charge"],
                "config_type": atoms.info["config_type"],
            }
            new.arrays["REF_forces"] = atoms.get_forces()
            frames.append(new)
    ase.io.write(path, frames, format="extxyz")
    return len(frames)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the live process ``pid`` and its reaped children, from ``/proc`` (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3 of proc(5)); utime, stime, cutime, cstime are fields 14..17
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def run_logged(cmd: list[str], epoch_line: str, cwd: Path | None = None) -> dict:
    """Run ``cmd``, noting the process's CPU time whenever a line matches ``epoch_line`` (group 1: epoch)."""
    pattern = re.compile(epoch_line)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env
    )  # fmt: skip
    cpu: dict[int, float] = {}
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        match = pattern.search(line)
        if match and int(match.group(1)) not in cpu:
            try:
                cpu[int(match.group(1))] = cpu_seconds(proc.pid)
            except OSError:  # the process ended between its last line and this read
                pass
    proc.wait()
    return {
        "returncode": proc.returncode,
        "output": "".join(lines),
        "wall_s": time.perf_counter() - start,
        "cpu_stamps": [cpu[k] for k in sorted(cpu)],
    }


def run_mace(
    data: Path, work: Path, epochs: int, batch: int, device: str, dtype: str, size: dict | None = None
) -> dict:
    size = size or SIZES["small"]
    exe = shutil.which("mace_run_train") or str(Path(sys.executable).with_name("mace_run_train"))
    cmd = [
        exe, "--name", "bench", "--train_file", str(data), "--valid_fraction", "0.1", "--E0s", "average",
        "--model", "MACE", "--num_channels", str(size["num_channels"]), "--max_L", str(size["max_L"]),
        "--max_ell", str(size["max_ell"]), "--correlation", str(size["correlation"]),
        "--num_interactions", str(size["num_interactions"]), "--r_max", str(size["r_max"]),
        "--num_radial_basis", "8", "--MLP_irreps", f"{size['mlp_hidden']}x0e",
        "--batch_size", str(batch), "--valid_batch_size", "16", "--max_num_epochs", str(epochs),
        "--eval_interval", "1", "--device", device, "--default_dtype", dtype, "--seed", "0",
        "--energy_key", "REF_energy", "--forces_key", "REF_forces", "--loss", "weighted",
        "--work_dir", str(work), "--num_workers", "0",
    ]  # fmt: skip
    proc = run_logged(cmd, r"INFO: Epoch (\d+):", cwd=work)
    log = "\n".join(p.read_text() for p in (work / "logs").glob("*.log")) if (work / "logs").is_dir() else ""
    if proc["returncode"] != 0:
        raise RuntimeError(f"mace_run_train failed:\n{proc['output'][-3000:]}")
    split = re.search(r"Total number of configurations: train=(\d+)", log)
    if split is None:
        raise RuntimeError("mace_run_train's log does not give the size of its training set")
    # the training loader drops the last incomplete batch: these structures are trained per epoch
    n_trained = int(split.group(1)) // batch * batch
    stamps: dict[int, float] = {}  # mace writes the same lines to two log files
    for line in log.splitlines():
        match = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) INFO: Epoch (\d+):", line)
        if match:
            stamps[int(match.group(2))] = datetime.strptime(
                match.group(1), "%Y-%m-%d %H:%M:%S.%f"
            ).timestamp()
    return {
        "epoch_stamps": [stamps[k] for k in sorted(stamps)],
        "cpu_stamps": proc["cpu_stamps"],
        "wall_s": proc["wall_s"],
        "n_train": n_trained,
    }


def run_emlip(
    data: Path,
    work: Path,
    head: dict,
    epochs: int,
    batch: int,
    device: str,
    dtype: str,
    size: dict | None = None,
    scf_mode: str = "unrolled",
) -> dict:
    config = {
        "data": {
            "train": str(data), "valid_fraction": 0.1, "test_fraction": 0.0, "batch_size": batch,
            "valid_batch_size": 16, "keys": {"energy": "REF_energy", "forces": "REF_forces"},
        },
        "model": {"head": head, "backbone": dict(size or SIZES["small"]), "dtype": dtype},
        "loss": {"energy": 1.0, "forces": 100.0},
        "ema": {"enabled": False},
        "stages": [{"epochs": epochs, "scf_mode": scf_mode}],
        "output_dir": str(work / "run"),
        "progress": "log",
        "device": device,
        "checkpoint": {"every": 0},
    }  # fmt: skip
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "aiida_emlip.training.cli", "train", str(path)]
    proc = run_logged(cmd, r"\] epoch (\d+) \(")
    if proc["returncode"] != 0:
        raise RuntimeError(f"emlip-train failed ({proc['returncode']}):\n{proc['output'][-3000:]}")
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    # elapsed_s is taken after each epoch's validation; differences match mace's epoch log stamps
    return {
        "epoch_stamps": [row["elapsed_s"] for row in metrics["history"]],
        "cpu_stamps": proc["cpu_stamps"],
        "wall_s": proc["wall_s"],
        "n_train": metrics["sizes"]["train"],
        "gpu_mb": metrics.get("cuda_max_memory_mb"),
        "params": metrics.get("num_parameters"),
    }


def _emlip(work: Path, data: Path, name: str, args: argparse.Namespace) -> dict:
    work.mkdir()
    size = SIZES[args.backbone]
    res = run_emlip(
        data, work, HEADS[name], args.epochs, args.batch_size, args.device, args.dtype, size, args.scf_mode
    )
    n_train = res["n_train"]
    rate = throughput(res["epoch_stamps"], n_train)
    # printed at once: a run stopped at its time limit keeps the figures of the trainers that finished
    print(f"# emlip {name}: {rate:.2f} structures/s, wall {res['wall_s']:.0f} s", flush=True)
    return {**res, "rate": rate, "cpu_rate": throughput(res["cpu_stamps"], n_train)}


def throughput(stamps: list[float], n_train: int) -> float:
    """Training structures per second (wall or CPU, as the stamps are) over the epochs after the first
    (each epoch includes validation)."""
    if len(stamps) < 2:
        return float("nan")
    return n_train * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def best_of(runs: list[dict]) -> dict:
    """The fastest of repeated runs by wall time, with the best CPU-time rate among them beside it."""
    best = dict(max(runs, key=lambda run: run["rate"]))
    best["cpu_rate"] = max(run["cpu_rate"] for run in runs)
    best["repeats"] = [{"rate": run["rate"], "cpu_rate": run["cpu_rate"]} for run in runs]
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=1, help="OMP/torch threads of both trainers")
    parser.add_argument("--heads", default=",".join(HEADS), help="comma-separated heads to time against sr")
    parser.add_argument(
        "--repeat", type=int, default=2, help="alternate mace and sr this often; best of each"
    )
    parser.add_argument(
        "--backbone", default="small", choices=sorted(SIZES), help="MACE size of both trainers"
    )
    parser.add_argument(
        "--scf-mode",
        default="unrolled",
        choices=["unrolled", "implicit", "converge"],
        help="how the scf head trains (the scf preset: implicit after its warm-up)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from aiida_emlip.models.heads import HEADS as REGISTERED

    with tempfile.TemporaryDirectory(prefix="emlip-bench-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data.xyz"
        n = make_data(data, args.copies)
        n_train = n - max(1, round(0.1 * n))
        print(f"{n} structures ({n_train} train), batch {args.batch_size}, {args.epochs} epochs, "
              f"{args.device}, {args.dtype}, {args.threads} thread(s), "
              f"MACE size {args.backbone} {SIZES[args.backbone]}")  # fmt: skip
        neutral = tmp / "neutral.xyz"  # formal charges of 'fixed' cannot represent the ions
        ase.io.write(
            neutral, [a for a in ase.io.read(data, ":") if a.info["total_charge"] == 0], format="extxyz"
        )
        # mace and sr alternate (best of --repeat each): other load on a shared machine hits both alike
        runs: dict[str, list[dict]] = {"mace": [], "sr": []}
        for r in range(args.repeat):
            (tmp / f"mace{r}").mkdir()
            res = run_mace(
                data,
                tmp / f"mace{r}",
                args.epochs,
                args.batch_size,
                args.device,
                args.dtype,
                SIZES[args.backbone],
            )
            res["rate"] = throughput(res["epoch_stamps"], res["n_train"])
            res["cpu_rate"] = throughput(res["cpu_stamps"], res["n_train"])
            runs["mace"].append(res)
            print(f"# mace_run_train: {res['rate']:.2f} structures/s, wall {res['wall_s']:.0f} s", flush=True)
            if "sr" in args.heads.split(","):
                runs["sr"].append(_emlip(tmp / f"sr{r}", data, "sr", args))
        mace = best_of(runs["mace"])
        rows = {"sr": best_of(runs["sr"])} if runs["sr"] else {}
        for name in args.heads.split(","):
            if name == "sr":
                continue
            if name not in REGISTERED:
                print(f"skip {name}: head not registered")
                continue
            try:
                rows[name] = _emlip(tmp / name, neutral if name == "fixed" else data, name, args)
            except RuntimeError as exc:
                print(f"{name}: failed: {str(exc).splitlines()[-1]}")
    sr, nan = rows.get("sr", {}), float("nan")
    print(f"structures trained per epoch: mace_run_train {mace['n_train']} (drops the last incomplete "
          f"batch), emlip {sr.get('n_train', n_train)}")  # fmt: skip
    header = f"{'trainer':<22}{'structures/s':>14}{'vs mace':>9}{'vs sr':>7}"
    header += f"{'per CPU s':>11}{'vs mace':>9}{'vs sr':>7}{'wall s':>8}{'GPU MB':>8}{'params':>8}"
    print(f"\n{header}")
    for name, row in [("mace_run_train (MACE)", mace)] + [(f"emlip {k}", v) for k, v in rows.items()]:
        gpu = f"{row['gpu_mb']:.0f}" if row.get("gpu_mb") else ""
        line = f"{name:<22}{row['rate']:>14.2f}{row['rate'] / mace['rate']:>9.2f}"
        line += f"{row['rate'] / sr.get('rate', nan):>7.2f}{row['cpu_rate']:>11.2f}"
        line += f"{row['cpu_rate'] / mace['cpu_rate']:>9.2f}{row['cpu_rate'] / sr.get('cpu_rate', nan):>7.2f}"
        print(f"{line}{row['wall_s']:>8.1f}{gpu:>8}{row.get('params') or '':>8}")
    if args.json:
        result = {
            "mace": mace,
            "emlip": rows,
            "args": vars(args) | {"json": str(args.json)},
        }
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
