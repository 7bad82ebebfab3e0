"""Cost of every electrostatic head relative to the short-range model.

Energy + forces (eval mode, no stress) of one model per head on the same structures: rattled NaCl
supercells and water boxes from ~1k to ~16k atoms (64k with ``--sizes``, for a GPU). Two backbones
(``--backbone``): ``tiny``, MACE with 8 channels, 2 interactions, l ≤ 1 features, correlation 2,
r_max 5 Å, and ``realistic``, a production model's size (64 channels, l ≤ 1 features, max_ell 3,
correlation 3, 2 interactions, r_max 5 Å); the ratio to ``sr`` depends on the backbone's cost, the
electrostatics do not. float32; electrostatics at its defaults (σ = 1.5 Å, accuracy 1e-6, Ewald
below 3000 atoms, PME above). Heads keep their default options and untrained weights (SCF iteration
counts depend on the weights: they are printed). Each (structure, head) runs in a forked child on
CPU so that its peak memory (resident set size, including the ~0.5 GB of the imported libraries) is
its own; on CUDA all run in one process and the peak is ``max_memory_allocated`` per head. Printed:
time, ratio to ``sr``, the target, peak memory, iterations, the time per iteration, and the log–log
slope of time vs N over the PME sizes (≥ 3000 atoms).

On the CPU every head runs as aiida-emlip runs models there (the calculator and ``emlip-eval``):
freed host memory kept for the next tensors (:mod:`aiida_emlip.models.host_memory`); beside them,
``sr`` once more with glibc's default, which gives large blocks back at once (``sr, released``: the
time and peak memory that setting saves and costs, side by side). ``--host-memory release`` runs
every head that way instead.

``--rounds R`` measures the heads of each structure R times, alternating (``sr``, the next head, …,
then ``sr`` again), and keeps each head's best round: a burst of load on a shared machine, or
``sr``'s own run-to-run spread on the largest cells (2.5–3.1 s on NaCl 17 576 on the CPU), then does
not land on one side of a ratio only.

``qeq+graphs`` runs ``qeq`` with its CG iteration replayed as a CUDA graph
(:mod:`aiida_emlip.models.heads.replay`; on a CPU the same as ``qeq``), beside the eager ``qeq``.

Usage: ``python bench/bench_heads.py [--quick] [--device auto|cpu|cuda] [--backbone tiny|realistic]
[--rounds R] [--json out.json]`` (``BENCH_THREADS``: torch threads, default 2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import resource
import sys
import time

import numpy as np

HEADS = {
    "sr": {"name": "sr"},
    "fixed": {"name": "fixed", "formal_charges": {"Na": 1.0, "Cl": -1.0, "O": -1.0, "H": 0.5}},
    "charges": {"name": "charges"},
    "latent": {"name": "latent"},
    "split": {"name": "split", "formal_charges": {"Na": 1.0, "Cl": -1.0, "O": -1.0, "H": 0.5}},
    "qeq": {"name": "qeq"},  # dense up to 256 atoms, CG with the Ewald/PME operator above
    "scf": {"name": "scf"},
    "functional": {"name": "functional"},
    "scf-newton": {"name": "scf", "mixer": "newton"},  # Newton–Krylov instead of Anderson mixing
}
TARGETS = {
    "fixed": 1.3,
    "charges": 1.3,
    "latent": 1.3,
    "split": 1.3,
    "qeq": 1.6,
    "scf": 2.5,
    "scf-newton": 2.5,
}
SLOPE_TARGET = 1.15
NACL_REPEATS = {"1k": 5, "4k": 8, "8k": 10, "16k": 13, "64k": 20}  # 1000, 4096, 8000, 17576, 64000 atoms
WATER_MOLECULES = {"1k": 333, "4k": 1366, "8k": 2700, "16k": 5400, "64k": 21333}
BACKBONE = {"num_channels": 8, "num_interactions": 2, "correlation": 2, "r_max": 5.0, "mlp_hidden": 16}
#: A backbone of a production model's size (``--backbone realistic``).
REALISTIC_BACKBONE = {
    "num_channels": 64,
    "max_L": 1,
    "max_ell": 3,
    "correlation": 3,
    "num_interactions": 2,
    "r_max": 5.0,
}
BACKBONES = {"tiny": BACKBONE, "realistic": REALISTIC_BACKBONE}
#: The row of ``sr`` run with glibc's default handling of freed memory (CPU only).
RELEASED = "sr, released"
#: ``<head>+graphs``: the head with its solver iterations replayed as CUDA graphs.
GRAPHS = "+graphs"


def structure(system: str, size: str):
    """A rattled NaCl supercell or a water box (ASE ``Atoms``) of one of the benchmark's sizes."""
    if system == "nacl":
        return rattled(rock_salt(NACL_REPEATS[size]), np.random.default_rng(0))
    return water_box(WATER_MOLECULES[size])


def water_box(n_mol: int, seed: int = 0):
    """A rattled periodic box of ``n_mol`` randomly oriented water molecules at liquid density."""
    from ase import Atoms

    rng = np.random.default_rng(seed)
    side = math.ceil(n_mol ** (1 / 3))
    box = (n_mol * 29.9) ** (1 / 3)
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n_mol]
    centres = (grid + 0.5) * box / side
    h1, h2 = np.array([0.8165, 0.5774, 0.0]), np.array([-0.8165, 0.5774, 0.0])
    rot = np.linalg.qr(rng.normal(size=(n_mol, 3, 3)))[0]
    pos = np.stack([centres, centres + rot @ h1, centres + rot @ h2], 1).reshape(-1, 3)
    return rattled(Atoms("OH2" * n_mol, positions=pos, cell=np.eye(3) * box, pbc=True), rng)


def rattled(atoms, rng: np.random.Generator, scale: float = 0.05):
    """``atoms`` with every position moved by a normal deviate of ``scale`` Å (in place; returned)."""
    atoms.positions += rng.normal(scale=scale, size=atoms.positions.shape)
    return atoms


def rock_salt(m: int):
    """m×m×m conventional rock-salt cells (8m³ atoms), a = 5.64 Å."""
    from ase import Atoms

    a = 5.64
    base = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    cells = np.stack(np.meshgrid(*[np.arange(m)] * 3, indexing="ij"), -1).reshape(-1, 1, 3)
    na = (base[None] + cells).reshape(-1, 3) * a
    cl = na + np.array([0.5 * a, 0.0, 0.0])
    symbols = ["Na"] * len(na) + ["Cl"] * len(cl)
    return Atoms(symbols, positions=np.concatenate([na, cl]), cell=np.eye(3) * a * m, pbc=True)


def run_one(
    system: str,
    size: str,
    head: str,
    device: str,
    repeats: int,
    queue,
    backbone: str = "tiny",
    retain: bool = True,
) -> None:
    """Time energy + forces of one head on one structure; put a result dict on ``queue``. ``retain``:
    keep freed host memory in the process (CPU; :mod:`aiida_emlip.models.host_memory`)."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from aiida_emlip.models.graph import build_graph
    from aiida_emlip.models.heads.replay import replayed_iterations
    from aiida_emlip.models.host_memory import retain_on_cpu
    from aiida_emlip.models.model import EmlipModel, ModelConfig

    if retain:
        retain_on_cpu(device)
    torch.manual_seed(0)
    spec = HEADS["sr" if head == RELEASED else head.removesuffix(GRAPHS)]
    model = EmlipModel(
        ModelConfig(elements=["H", "O", "Na", "Cl"], head=spec, backbone=BACKBONES[backbone], dtype="float32")
    ).to(device)
    model.eval()
    atoms = structure(system, size)
    graph = build_graph([atoms], model.cutoff, torch.float32, device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, out = [], None
    for _ in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with replayed_iterations("graph") if head.endswith(GRAPHS) else contextlib.nullcontext():
            out = model(graph, compute_forces=True, compute_stress=False)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    iterations = None if out["iterations"] is None else int(out["iterations"].max())
    converged = None if out["converged"] is None else bool(out["converged"].all())
    queue.put(
        {
            "system": system,
            "size": size,
            "head": head,
            "n": len(atoms),
            "time": min(times[1:]),
            "peak_mb": peak,
            "rss_before_mb": before / 1024,
            "iterations": iterations,
            "converged": converged,
            "energy": float(out["energy"].detach().sum()),
        }
    )


class _ListQueue(list):
    def put(self, item: dict) -> None:
        self.append(item)


def measure(
    system: str, size: str, head: str, device: str, repeats: int, backbone: str = "tiny", retain: bool = True
) -> dict:
    if device.startswith("cuda"):  # CUDA peak memory is per head already: no child process needed
        queue = _ListQueue()
        try:
            run_one(system, size, head, device, repeats, queue, backbone)
            return queue[0]
        except Exception as exc:
            return {"system": system, "size": size, "head": head, "error": repr(exc)}
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    retain = retain and head != RELEASED
    proc = ctx.Process(target=run_one, args=(system, size, head, device, repeats, queue, backbone, retain))
    proc.start()
    try:
        result = queue.get(timeout=1800)
    except Exception as exc:
        result = {"system": system, "size": size, "head": head, "error": repr(exc)}
    proc.join()
    if proc.exitcode and "error" not in result:
        result["error"] = f"exit code {proc.exitcode}"
    return result


def _better(kept: dict | None, new: dict) -> dict:
    """Of two measurements of one head, the faster; one that failed only where neither has a time."""
    if kept is None or ("time" in new and new["time"] < kept.get("time", math.inf)):
        return new
    return kept


def slope(rows: list[dict]) -> float | None:
    """Least-squares slope of log t vs log N over rows with N ≥ 3000 (the PME path)."""
    pts = [(math.log(r["n"]), math.log(r["time"])) for r in rows if r.get("n", 0) >= 3000 and "time" in r]
    if len({x for x, _ in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def table(results: list[dict]) -> str:
    lines = [
        "| system | N | head | time (s) | ratio to sr | target | peak MB | Δpeak vs sr MB | iterations |"
        " s/iteration | converged |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["system"], r["size"]): r for r in results if r["head"] == "sr" and "time" in r}
    for r in results:
        if "time" not in r:
            lines.append(f"| {r['system']} | {r['size']} | {r['head']} | error: {r.get('error')} |||||||")
            continue
        sr = base.get((r["system"], r["size"]))
        ratio = r["time"] / sr["time"] if sr else float("nan")
        target = TARGETS.get(r["head"].removesuffix(GRAPHS))
        mark = "" if target is None else (" ✓" if ratio <= target else " ✗")
        dpeak = r["peak_mb"] - sr["peak_mb"] if sr else float("nan")
        its = r["iterations"]
        per_it = (r["time"] - sr["time"]) / its if (its and sr) else None
        lines.append(
            f"| {r['system']} | {r['n']} | {r['head']} | {r['time']:.3f} | {ratio:.2f}{mark} | "
            f"{'' if target is None else f'≤ {target}'} | {r['peak_mb']:.0f} | {dpeak:+.0f} | "
            f"{'' if its is None else its} | {'' if per_it is None else f'{per_it:.4f}'} | "
            f"{'' if r['converged'] is None else r['converged']} |"
        )
    lines += ["", f"log–log slope of time vs N over the PME sizes (N ≥ 3000), target ≤ {SLOPE_TARGET}:", ""]
    lines += ["| system | head | slope |", "|---|---|---|"]
    for system in sorted({r["system"] for r in results}):
        for head in [*HEADS, RELEASED]:
            s = slope([r for r in results if r["system"] == system and r["head"] == head])
            if s is not None:
                lines.append(f"| {system} | {head} | {s:.2f}{' ✓' if s <= SLOPE_TARGET else ' ✗'} |")
    return "\n".join(lines)


def _write_json(path: str, device: str, backbone: str, results: list[dict]) -> None:
    with open(path, "w") as fh:
        json.dump({"device": device, "backbone": BACKBONES[backbone], "results": results}, fh, indent=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1k and 4k atoms only")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--systems", default="nacl,water")
    parser.add_argument("--heads", default=",".join(HEADS))
    parser.add_argument("--sizes", default=None, help="comma list of 1k,4k,8k,16k,64k (64k: meant for a GPU)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed evaluations after a warm-up, the best counts (default 3 on CUDA, 3 on the CPU with the "
        "memory kept, whose heap settles in two or three evaluations, 1 with --host-memory release)",
    )
    parser.add_argument(
        "--backbone", default="tiny", choices=sorted(BACKBONES), help="tiny (default) or realistic"
    )
    parser.add_argument(
        "--host-memory",
        default="retain",
        choices=("retain", "release"),
        help="CPU: keep freed memory for the next tensors (retain, what aiida-emlip does; plus an sr row "
        "released) or give it back at once (release, glibc's default)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure the heads of each structure this many times, alternating; each keeps its best round",
    )
    parser.add_argument("--json", default=None, help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = (
        args.sizes.split(",") if args.sizes else (["1k", "4k"] if args.quick else ["1k", "4k", "8k", "16k"])
    )
    retain = args.host_memory == "retain"
    repeats = args.repeats if args.repeats is not None else (1 if device == "cpu" and not retain else 3)
    heads = args.heads.split(",")
    if device == "cpu" and retain and "sr" in heads and RELEASED not in heads:
        heads.insert(heads.index("sr") + 1, RELEASED)
    results = []
    for system in args.systems.split(","):
        for size in sizes:
            best: dict[str, dict] = {}
            for round_ in range(args.rounds):
                for head in heads:
                    t0 = time.perf_counter()
                    r = measure(system, size, head, device, repeats, args.backbone, retain)
                    best[head] = _better(best.get(head), r)
                    if args.json:  # after every measurement: a run stopped early keeps what it measured
                        _write_json(args.json, device, args.backbone, results + list(best.values()))
                    print(
                        f"# {system} {size} {head} (round {round_ + 1}): {r.get('time', r.get('error'))} "
                        f"(wall {time.perf_counter() - t0:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
            results.extend(best[head] for head in heads)
    print(
        f"device: {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), "
        f"threads {os.environ.get('BENCH_THREADS', '2')}, float32, backbone {args.backbone} "
        f"{BACKBONES[args.backbone]}, host memory {args.host_memory if device == 'cpu' else '-'}"
    )
    print(table(results))


if __name__ == "__main__":
    main()
