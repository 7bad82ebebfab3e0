"""Inference benchmarks: the ``emlip.evaluate`` overhead and MD steps per second of the ASE calculator.

(a) Overhead: wall time of the ``emlip.evaluate`` calculation (``run_get_node`` on localhost in a
    throw-away SQLite profile: upload, submission, polling, retrieval, parsing) over the wall time of
    the same ``emlip-eval`` command run directly on the same files (process start included in both).
    The workload is NVE MD of a 72-atom water box with the ``charges`` head, ``--eval-steps`` steps;
    the two run alternately ``--repeats`` times. On a shared machine the evaluation's own time varies
    with the load, so the script also reports the time the calculation adds, (calculation − its
    evaluation) − (direct − its evaluation), each evaluation timed inside ``emlip-eval``, and the ratio
    this gives for a 30 s run, (30 s + added) / 30 s; and the CPU time the AiiDA process itself used
    while waiting. Target: ≤ 1.2 for a ~30 s evaluation.
(b) MD throughput: velocity-Verlet steps per second of :class:`~aiida_emlip.models.calculator.EmlipCalculator`
    (energy, forces, stress and charges every step) on water boxes for the heads ``sr``, ``charges``,
    ``qeq`` and ``scf``, as the ratio to ``sr``, for one or both backbones (``--backbones``): ``tiny``
    as in bench_heads.py (8 channels, correlation 2, 2 interactions, r_max 5 Å) and ``realistic``
    (64 channels, l ≤ 1 features, max_ell 3, correlation 3, 2 interactions, r_max 5 Å, the size of a
    production MACE model); float32, untrained weights (SCF iterations depend on them and are
    printed). The heads alternate over ``--rounds`` rounds of ``--steps`` steps and each keeps its best
    round, so that a burst of load on a shared machine does not land on one head only. The peak
    resident memory of the process is printed after each box. Targets (as bench_heads.py for one
    energy+force evaluation): charges ≥ 1/1.3, qeq ≥ 1/1.6, scf ≥ 1/2.5 of sr's steps per second.
    The calculator starts each step's charge solve from the previous step's charges (its default);
    ``--heads sr,qeq,qeq-cold,scf,scf-cold`` sets each iterative head beside itself without that warm
    start (iteration counts and steps per second side by side); ``qeq+graphs`` runs ``qeq`` with the
    calculator's ``cuda_graphs=True`` (its CG iteration replayed as a CUDA graph; the same as ``qeq``
    on a CPU).

Usage::

    python bench/bench_evaluate.py [--device auto|cpu|cuda] [--sizes 1000,5000] [--steps 2]
                                   [--heads sr,charges,qeq,scf] [--backbones tiny,realistic] [--rounds 3]
                                   [--kernels e3nn|cueq]
                                   [--eval-steps 40] [--repeats 2] [--skip-overhead] [--skip-md]
                                   [--json out.json]

Threads: torch follows ``OMP_NUM_THREADS`` (e.g. ``OMP_NUM_THREADS=1`` for one core); the count used
is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
WORK = Path(tempfile.mkdtemp(prefix="emlip-bench-evaluate-"))
os.environ["AIIDA_PATH"] = str(WORK / ".aiida")  # a throw-away profile, before aiida is imported

MD_HEADS = {
    "sr": {"name": "sr"},
    "charges": {"name": "charges"},
    "qeq": {"name": "qeq"},
    "scf": {"name": "scf", "on_failure": "flag"},
}
MD_TARGETS = {"charges": 1 / 1.3, "qeq": 1 / 1.6, "scf": 1 / 2.5}
#: ``<head>-cold``: the same head with the calculator's warm start off (every step's charge solve from
#: the local guess), to set beside the default, which starts from the previous step's charges.
COLD = "-cold"
#: ``<head>+graphs``: the same head with the calculator's ``cuda_graphs`` on.
GRAPHS = "+graphs"
OVERHEAD_TARGET = 1.2
WATER_ATOMS = {1000: 333, 5000: 1667}  # molecules → 999 and 5001 atoms
SMALL_BOX = 24  # molecules of the overhead workload (72 atoms)


def water_box(n_mol: int):
    """A rattled periodic box of ``n_mol`` water molecules at liquid density (bench_heads' construction)."""
    import bench_heads

    return bench_heads.water_box(n_mol)


def backbones() -> dict[str, dict]:
    """Backbone name -> configuration (``tiny`` is bench_heads.py's)."""
    from bench_heads import BACKBONES

    return dict(BACKBONES)


def make_model(head: dict, path: Path | None = None, dtype: str = "float32", backbone: str = "tiny"):
    import torch

    from aiida_emlip.models.io import save_model
    from aiida_emlip.models.model import EmlipModel, ModelConfig

    torch.manual_seed(0)
    model = EmlipModel(
        ModelConfig(elements=["H", "O", "Na", "Cl"], head=head, backbone=backbones()[backbone], dtype=dtype)
    )
    if path is not None:
        save_model(model, path)
    return model


def verdict(value: float, target: float, lower_is_better: bool = False) -> str:
    met = value <= target if lower_is_better else value >= target
    return "met" if met else "MISSED"


# ------------------------------------------------------------------------------ (a) overhead


def overhead(eval_steps: int, device: str, repeats: int) -> dict:
    """Direct emlip-eval and emlip.evaluate alternately, ``repeats`` times each; best of each."""
    import ase.io
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.calculations.evaluate import EmlipEvaluateCalculation
    from aiida_emlip.cli.setup import emlip_executable, ensure_code, ensure_computer
    from aiida_emlip.data.dataset import EmlipDatasetData
    from aiida_emlip.data.model import EmlipModelData
    from aiida_emlip.profile import load_or_create_profile, select_profile

    work = WORK / "direct"
    work.mkdir(parents=True)
    model_path = work / "model.safetensors"
    make_model({"name": "charges"}, model_path, dtype="float64")
    box = water_box(SMALL_BOX)
    ase.io.write(work / "structures.xyz", [box], format="extxyz")
    parameters = {
        "mode": "md",
        "device": device,
        "steps": eval_steps,
        "timestep_fs": 0.5,
        "trajectory_stride": 10,
    }
    (work / "parameters.json").write_text(json.dumps(parameters))
    exe = str(emlip_executable("emlip-eval"))
    cmd = [exe, "model.safetensors", "structures.xyz", "--params", "parameters.json", "--schema-keys"]
    cmd += ["-o", "predictions.xyz", "--summary", "summary.json", "--trajectory", "trajectory.xyz"]

    target = select_profile(None)
    load_or_create_profile(target)
    computer, _ = ensure_computer(target)
    code, _ = ensure_code(computer, Path(exe), label="emlip-eval", plugin="emlip.evaluate")
    model_node = EmlipModelData(model_path).store()
    dataset = EmlipDatasetData.from_extxyz(work / "structures.xyz").store()

    print(
        f"\n(a) emlip.evaluate overhead: NVE MD of {len(box)} water atoms, {eval_steps} steps, charges head,"
    )
    print(f"    float64, device {device}; direct and calculation alternately, {repeats}× each, best of each")
    direct_times, calc_times, direct_inner, calc_inner, parent_cpu = [], [], [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, check=False)
        direct_times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"emlip-eval failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        direct_inner.append(json.loads((work / "summary.json").read_text())["timings"]["total_s"])
        builder = EmlipEvaluateCalculation.get_builder()
        builder.code = code
        builder.model = model_node
        builder.dataset = dataset
        builder.parameters = orm.Dict(parameters)
        t0, cpu0 = time.perf_counter(), time.process_time()
        results, node = run_get_node(builder)
        calc_times.append(time.perf_counter() - t0)
        parent_cpu.append(time.process_time() - cpu0)
        if not node.is_finished_ok:
            raise SystemExit(f"emlip.evaluate failed: {node.exit_status} {node.exit_message}")
        calc_inner.append(results["summary"]["timings"]["total_s"])
        print(
            f"    direct {direct_times[-1]:8.2f} s (evaluation {direct_inner[-1]:7.2f} s)   "
            f"calculation {calc_times[-1]:8.2f} s (evaluation {calc_inner[-1]:7.2f} s, "
            f"AiiDA process CPU {parent_cpu[-1]:5.2f} s)",
            flush=True,
        )
    # the evaluation itself varies with the machine's load; what the calculation adds does not
    # depend on it: (calculation − its evaluation) − (direct − its evaluation)
    added = [(c - ci) - (d - di) for c, ci, d, di in zip(calc_times, calc_inner, direct_times, direct_inner)]
    start_up = min(d - di for d, di in zip(direct_times, direct_inner))
    overhead_s = float(sorted(added)[len(added) // 2])
    direct, calc = min(direct_times), min(calc_times)
    ratio = calc / direct
    ratio_30 = (30.0 + overhead_s) / 30.0
    print(f"  best direct {direct:.2f} s, best calculation {calc:.2f} s: ratio {ratio:.3f} (load-dependent)")
    print(f"  emlip-eval start-up (imports, model load) outside the evaluation: {start_up:.2f} s")
    print(f"  time the calculation adds (median of {repeats}): {overhead_s:.2f} s")
    print(
        f"  ratio for a 30 s emlip-eval run: {ratio_30:.3f}   target <= {OVERHEAD_TARGET}: "
        f"{verdict(ratio_30, OVERHEAD_TARGET, True)}"
    )
    return {
        "direct_s": direct_times,
        "direct_evaluation_s": direct_inner,
        "calculation_s": calc_times,
        "calculation_evaluation_s": calc_inner,
        "aiida_process_cpu_s": parent_cpu,
        "added_s": added,
        "ratio_of_best": ratio,
        "ratio_for_30s": ratio_30,
        "atoms": len(box),
        "steps": eval_steps,
    }


# ------------------------------------------------------------------------------ (b) MD throughput


class MDRun:
    """Velocity-Verlet MD of one head on one box, kept alive so that it can be timed in rounds."""

    def __init__(self, head: str, atoms, device: str, backbone: str = "tiny", kernels: str = "e3nn") -> None:
        import numpy as np
        from ase import units
        from ase.md.verlet import VelocityVerlet

        from aiida_emlip.models.calculator import EmlipCalculator
        from aiida_emlip.training.dynamics import thermalize_momenta

        name = head.removesuffix(GRAPHS).removesuffix(COLD)
        self.calc = EmlipCalculator(
            make_model(MD_HEADS[name], backbone=backbone),
            device=device,
            warm_start=not head.removesuffix(GRAPHS).endswith(COLD),
            kernels=kernels,
            cuda_graphs=head.endswith(GRAPHS),
        )
        self.atoms = atoms.copy()
        thermalize_momenta(self.atoms, temperature_K=300, rng=np.random.default_rng(0))
        self.atoms.calc = self.calc
        self.dynamics = VelocityVerlet(self.atoms, timestep=0.5 * units.fs, logfile=None)
        self.dynamics.run(1)  # warm-up: neighbour list, Ewald/PME set-up, CUDA kernels
        self.iterations: list[int] = []
        self.dynamics.attach(self._record, interval=1)
        self.best = float("inf")  # seconds per step, best round

    def _record(self) -> None:
        if "iterations" in self.calc.results:
            self.iterations.append(int(self.calc.results["iterations"]))

    def time(self, steps: int) -> float:
        import torch

        cuda = self.calc.model.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.dynamics.run(steps)
        if cuda:
            torch.cuda.synchronize()
        cost = (time.perf_counter() - t0) / steps
        self.best = min(self.best, cost)
        return cost


def peak_memory_gb(device: str) -> float:
    """Peak memory so far: the process's resident set on the CPU, allocated memory on CUDA (GB)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def md_table(
    sizes: list[int],
    steps: int,
    device: str,
    heads: list[str],
    rounds: int,
    backbone: str = "tiny",
    kernels: str = "e3nn",
) -> dict:
    """Steps per second per head and size; heads alternate over ``rounds``, the best round counts."""
    import torch

    from aiida_emlip.models.io import resolve_device

    device = str(resolve_device(device))
    results: dict = {}
    print(
        f"\n(b) MD steps per second of the ASE calculator (velocity Verlet, {device}, "
        f"{torch.get_num_threads()} thread(s); {backbone} backbone {backbones()[backbone]}, {kernels} "
        f"kernels; {steps} timed "
        f"step(s) per head per round after one warm-up step, heads alternating, best of {rounds} round(s))"
    )
    print(f"  {'atoms':>6} {'head':8} {'s/step':>8} {'steps/s':>8} {'vs sr':>6} {'SCF it.':>7}  target")
    order = ["sr", *[h for h in heads if h != "sr"]]
    for size in sizes:
        atoms = water_box(WATER_ATOMS.get(size, round(size / 3)))
        runs = {head: MDRun(head, atoms, device, backbone, kernels) for head in order}
        rounds_seen: dict[str, list[float]] = {head: [] for head in order}
        for _ in range(rounds):
            for head in order:
                rounds_seen[head].append(runs[head].time(steps))
        rows = {}
        for head in order:
            cost = runs[head].best
            ratio = (1 / cost) / (1 / runs["sr"].best)
            its = runs[head].iterations
            rows[head] = {
                "s_per_step": cost,
                "steps_per_s": 1 / cost,
                "ratio_to_sr": ratio,
                "rounds_s_per_step": rounds_seen[head],
                "iterations": sum(its) / len(its) if its else None,
            }
            target = MD_TARGETS.get(head.removesuffix(GRAPHS))
            note = f">= {target:.2f}: {verdict(ratio, target)}" if target else ""
            it_text = f"{rows[head]['iterations']:7.1f}" if its else f"{'-':>7}"
            spread = "/".join(f"{t:.3g}" for t in rounds_seen[head])
            print(
                f"  {len(atoms):6d} {head:8} {cost:8.3f} {1 / cost:8.3f} {ratio:6.2f} {it_text}  {note}"
                f"  (rounds {spread} s)",
                flush=True,
            )
        memory = peak_memory_gb(device)
        print(f"  peak memory so far: {memory:.2f} GB", flush=True)
        results[str(len(atoms))] = {"heads": rows, "peak_memory_gb": memory}
        del runs
    return {
        "device": device,
        "threads": torch.get_num_threads(),
        "backbone": backbone,
        "backbone_config": backbones()[backbone],
        "steps": steps,
        "rounds": rounds,
        "sizes": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--sizes", default="1000,5000", help="water-box sizes in atoms (default 1000,5000)")
    parser.add_argument("--steps", type=int, default=2, help="timed MD steps per head, size and round")
    parser.add_argument("--heads", default=",".join(MD_HEADS), help="heads of the MD table (sr always)")
    parser.add_argument(
        "--backbones", default="tiny", help="backbones of the MD table: tiny, realistic or tiny,realistic"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the heads; the best counts")
    parser.add_argument(
        "--kernels", default="e3nn", choices=["e3nn", "cueq"], help="MACE's products in the MD table"
    )
    parser.add_argument("--eval-steps", type=int, default=40, help="MD steps of the overhead workload")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side of the overhead comparison")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-md", action="store_true")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    results: dict = {"threads": __import__("torch").get_num_threads()}
    try:
        if not args.skip_md:
            sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
            heads = [h for h in args.heads.split(",") if h.strip()]
            unknown = sorted({h.removesuffix(GRAPHS).removesuffix(COLD) for h in heads} - set(MD_HEADS))
            if unknown:
                raise SystemExit(f"unknown heads {unknown}; known: {list(MD_HEADS)}")
            names = [b for b in args.backbones.split(",") if b.strip()]
            unknown = sorted(set(names) - set(backbones()))
            if unknown:
                raise SystemExit(f"unknown backbones {unknown}; known: {list(backbones())}")
            results["md"] = {
                name: md_table(sizes, args.steps, args.device, heads, args.rounds, name, args.kernels)
                for name in names
            }
        if not args.skip_overhead:
            results["overhead"] = overhead(args.eval_steps, args.device, args.repeats)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
