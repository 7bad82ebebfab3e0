"""Training steps of each head against ``sr``'s, in one process, the heads taking turns epoch by epoch.

``bench_training.py`` times whole ``emlip-train`` processes one after the other, so the load of the
moment lands on one side of each ratio. Here every head trains in the same process on the same batches
(``--data tiny``: the shipped pw.x set of 2–4-atom molecules with rattled copies, as there; ``--data
periodic``: the periodic cells of a bulk training set, see :func:`periodic_data`; ``--data long-range``:
small molecules in large boxes, see :func:`long_range_data`), one epoch each in turn for ``--rounds`` rounds,
and each keeps its fastest epoch after the first round: what a head's own work adds to a training
step, with the data pipeline, validation and logging (the same for every head) left out. A step is
the model's energy and forces with the graph for the force loss, ``Σ(ΔE/N)² + mean |ΔF|²``, its
backward pass and an Adam step.

    python bench/bench_train_step.py [--heads charges,qeq,scf] [--scf-mode implicit|unrolled]
                                     [--backbone small|realistic] [--rounds 8] [--device cpu|cuda]
                                     [--induction] [--data tiny|periodic|long-range]

A head name with the suffix ``@last`` (``split@last``, ``charges-dipoles@last``) is that head with the
backbone's last layer keeping l = 1 features (``backbone.last_layer_vectors: true``, the layout of dipole
heads' model files of earlier versions), timed beside the default, whose last layer is ``sr``'s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import ase.io
import numpy as np
import torch
from bench_heads import rattled, rock_salt, water_box
from bench_training import HEADS, SIZES, make_data

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


#: ``--data periodic``: water molecules per box (96 atoms) and rock-salt cells per edge (2: 64 atoms).
PERIODIC_WATER = 32
PERIODIC_NACL = 2


#: Head-name suffix: the head with ``backbone.last_layer_vectors: true``.
LAST = "@last"


def periodic_data(copies: int) -> list:
    """Periodic cells of a bulk training set, ``copies`` rattled ones of each kind: a box of
    :data:`PERIODIC_WATER` water molecules (96 atoms, more than the 64 up to which ``scf`` factorises its
    Jacobian), a rock-salt cell of 2×2×2 conventional cells (64 atoms), and that cell without one Cl
    (63 atoms, total charge +1: a charged cell under a neutralising background). Labels: energy
    −1 eV/atom and zero forces (a training step costs the same whatever the labels)."""
    frames = []
    for seed in range(copies):
        rng = np.random.default_rng(seed)
        nacl = rattled(rock_salt(PERIODIC_NACL), rng)
        vacancy = rattled(rock_salt(PERIODIC_NACL), rng)
        del vacancy[len(vacancy) - 1]  # the last atom is a Cl
        for atoms, charge in ((water_box(PERIODIC_WATER, seed), 0.0), (nacl, 0.0), (vacancy, 1.0)):
            atoms.info = {"REF_energy": -1.0 * len(atoms), "total_charge": charge}
            atoms.arrays["REF_forces"] = np.zeros((len(atoms), 3))
            frames.append(atoms)
    return frames


def long_range_data() -> list:
    """The long-range benchmark's committed cells (``bench/data/long_range*.xyz``: Li⁺ + H₂O, total
    charge +1, and water pairs, 4–6 atoms in 8 × 8 × 18 Å boxes, 72 structures): small molecules in
    large boxes, where each structure's Ewald sum is a few small operations and the number of
    structures, not of atoms, sets its cost. Labels as :func:`periodic_data`'s."""
    frames = []
    for name in ("long_range.xyz", "long_range_more.xyz"):
        for atoms in ase.io.read(ROOT / "bench" / "data" / name, ":"):
            charge = float(atoms.info.get("total_charge", 0.0))
            atoms.calc = None
            atoms.info = {"REF_energy": -1.0 * len(atoms), "total_charge": charge}
            atoms.arrays = {k: v for k, v in atoms.arrays.items() if k in ("numbers", "positions")}
            atoms.arrays["REF_forces"] = np.zeros((len(atoms), 3))
            frames.append(atoms)
    return frames


def batches(frames, size: int, model, device: str):
    """``(graph, energies, forces)`` of consecutive batches of ``size`` structures (the last smaller)."""
    from aiida_emlip.models.graph import build_graph

    out = []
    for start in range(0, len(frames), size):
        chunk = frames[start : start + size]
        graph = build_graph(chunk, model.cutoff, model.dtype, device=device)
        energy = torch.tensor([a.info["REF_energy"] for a in chunk], dtype=model.dtype, device=device)
        forces = torch.cat([torch.as_tensor(a.arrays["REF_forces"], dtype=model.dtype) for a in chunk])
        out.append((graph, energy, forces.to(device)))
    return out


def epoch(model, optimiser, data, scf_mode: str, device: str) -> float:
    """Seconds for one pass of training steps over ``data``."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for graph, energy, forces in data:
        out = model(graph, scf_mode=scf_mode, compute_stress=False, create_graph=True)
        atoms = (graph.ptr[1:] - graph.ptr[:-1]).to(energy.dtype)
        loss = (((out["energy"] - energy) / atoms) ** 2).sum() + ((out["forces"] - forces) ** 2).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", default="charges,qeq,scf", help="comma-separated heads to time against sr")
    parser.add_argument("--scf-mode", default="implicit", choices=["implicit", "unrolled", "converge"])
    parser.add_argument("--backbone", default="small", choices=sorted(SIZES))
    parser.add_argument("--rounds", type=int, default=8, help="epochs per head, taking turns (at least 2)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument(
        "--data",
        default="tiny",
        choices=["tiny", "periodic", "long-range"],
        help="the shipped 2-4-atom molecules (default), periodic cells of 63-96 atoms (periodic_data) or "
        "small molecules in large boxes (long_range_data)",
    )
    parser.add_argument(
        "--induction",
        action="store_true",
        help="induced atomic dipoles on every head but sr (as the presets)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the first round is left out)")
    heads = ["sr"] + [h for h in args.heads.split(",") if h and h != "sr"]
    unknown = [h for h in heads if h.removesuffix(LAST) not in HEADS or h.removesuffix(LAST) == "fixed"]
    if unknown:
        parser.error(
            f"unknown heads {unknown}; choose from {sorted(set(HEADS) - {'fixed'})}, each also with {LAST}"
        )
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    from aiida_emlip.models.model import EmlipModel, ModelConfig

    if args.data == "periodic":
        frames = periodic_data(args.copies)
    elif args.data == "long-range":
        frames = long_range_data()
    else:
        with tempfile.TemporaryDirectory(prefix="emlip-bench-") as tmp:
            path = Path(tmp) / "data.xyz"
            make_data(path, args.copies)
            frames = ase.io.read(path, ":")
    elements = sorted({s for a in frames for s in a.get_chemical_symbols()})
    runs = {}
    for name in heads:
        torch.manual_seed(0)
        config = ModelConfig(
            elements=elements,
            head=HEADS[name.removesuffix(LAST)],
            backbone={**SIZES[args.backbone], "last_layer_vectors": name.endswith(LAST)},
            dtype=args.dtype,
            induction={"enabled": args.induction and name.removesuffix(LAST) != "sr"},
        )
        model = EmlipModel(config).to(args.device)
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
        runs[name] = (model, optimiser, batches(frames, args.batch_size, model, args.device), [])
    print(f"{len(frames)} structures ({args.data}), batch {args.batch_size}, backbone {args.backbone}, "
          f"{args.dtype}, {args.device}, {args.threads} thread(s), scf_mode {args.scf_mode}, "
          f"induction {args.induction}, {args.rounds} rounds")  # fmt: skip
    for _ in range(args.rounds):
        for model, optimiser, data, times in runs.values():
            times.append(epoch(model, optimiser, data, args.scf_mode, args.device))
    best = {name: min(run[3][1:]) for name, run in runs.items()}
    print(f"\n{'head':<22}{'best epoch s':>14}{'structures/s':>14}{'vs sr':>8}  epochs (s)")
    for name, run in runs.items():
        rate = len(frames) / best[name]
        line = f"{name:<22}{best[name]:>14.3f}{rate:>14.1f}{best['sr'] / best[name]:>8.2f}  "
        print(line + " ".join(f"{t:.3f}" for t in run[3]))


if __name__ == "__main__":
    main()
