"""Warm start against cold retraining, as an active-learning round uses it (pure training layer, no AiiDA).

The labelled configurations (default: ``bench/data/long_range.xyz``) are shuffled with ``--seed`` and
cut into 70 % initial training set, 15 % added later (what a round labels) and 15 % held out. For each
design (presets ``sr`` and ``charges`` by default, the presets' small backbone):

0. ``first``: cold on the initial 70 % for N epochs (the model of the round before);
a. ``cold``: cold on the 85 % for N epochs (today's retraining);
b. ``warm``: from ``first``'s model (``init_from``) on the 85 % for N/4 epochs;
c. ``cold_short``: cold on the 85 % for N/4 epochs (the control: is it the start or the fewer epochs?);
d. ``warm_low_lr``: as ``warm`` at ``--warm-lr-scale`` times the learning rate (default 0.1): a fresh
   Adam's first steps are about the learning rate in size whatever the gradient, and kick a trained
   model away from its minimum.

Each reports the held-out energy RMSE (meV/atom) and force RMSE (meV/Å) and the CPU seconds of the
whole run (reading the data, building the model and training: ``time.process_time``, one thread).
Several ``--seeds`` repeat it on other shuffles.

Usage: ``OMP_NUM_THREADS=1 python bench/bench_warm_start.py [--epochs 40] [--seeds 0 1 2]``; writes
``--workdir/results.json`` and prints a table (``--report DIR...``: the table of earlier runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "long_range.xyz"
FRACTIONS = (0.70, 0.15, 0.15)  # initial, added, held out
RUNS = ("first", "cold", "warm", "cold_short", "warm_low_lr")


def split(data: Path, workdir: Path, seed: int) -> dict[str, Path]:
    """Initial, enlarged (initial + added) and held-out extxyz files of one shuffle."""
    import ase.io
    import numpy as np

    frames = ase.io.read(data, ":")
    order = np.random.default_rng(seed).permutation(len(frames))
    n_initial = round(FRACTIONS[0] * len(frames))
    n_added = round(FRACTIONS[1] * len(frames))
    parts = {
        "initial": order[:n_initial],
        "enlarged": order[: n_initial + n_added],
        "held_out": order[n_initial + n_added :],
    }
    workdir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, indices in parts.items():
        out[name] = workdir / f"{name}.xyz"
        ase.io.write(out[name], [frames[i] for i in sorted(indices)], format="extxyz")
    return out


def train(
    design: str,
    train_file: Path,
    test_file: Path,
    out: Path,
    epochs: int,
    seed: int,
    init: Path | None,
    lr_scale: float = 1.0,
) -> dict[str, Any]:
    """One run; its held-out errors and CPU seconds."""
    import ase.io

    from aiida_emlip.training.config import parse_config
    from aiida_emlip.training.presets import preset_config
    from aiida_emlip.training.trainer import Trainer

    frames = ase.io.read(train_file, ":") + ase.io.read(test_file, ":")
    labels = {k for a in frames for k in (*a.info, *a.arrays)}
    elements = sorted({s for a in frames for s in a.get_chemical_symbols()})
    values = preset_config(design, labels=labels, epochs=epochs, elements=elements, seed=seed)
    values["data"].update(train=str(train_file), test=str(test_file), valid_fraction=0.1)
    values.update(output_dir=str(out), progress="log", device="cpu", num_threads=1)
    if init is not None:
        values["init_from"] = str(init)
    values["optimizer"]["lr"] *= lr_scale
    values["scheduler"]["min_lr"] *= lr_scale
    cpu, wall = time.process_time(), time.perf_counter()
    metrics = Trainer(parse_config(values)).run()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    test = metrics["test"]
    return {
        "epochs": epochs,
        "train_size": metrics["sizes"]["train"] + metrics["sizes"]["valid"],
        "energy_rmse_meV_atom": 1000 * test["energy"]["all"]["rmse"],
        "forces_rmse_meV_A": 1000 * test["forces"]["all"]["rmse"],
        "cpu_s": cpu,
        "wall_s": wall,
    }


def run(
    data: Path, workdir: Path, designs: list[str], epochs: int, seeds: list[int], warm_lr_scale: float
) -> dict[str, Any]:
    short = max(1, epochs // 4)
    results: dict[str, Any] = {
        "data": str(data),
        "epochs": epochs,
        "short_epochs": short,
        "warm_lr_scale": warm_lr_scale,
        "runs": {},
    }
    for seed in seeds:
        files = split(data, workdir / f"seed{seed}", seed)
        for design in designs:
            base = workdir / f"seed{seed}" / design
            initial, enlarged, held_out = files["initial"], files["enlarged"], files["held_out"]
            row = {"first": train(design, initial, held_out, base / "first", epochs, seed, None)}
            first_model = base / "first" / "model.safetensors"
            row["cold"] = train(design, enlarged, held_out, base / "cold", epochs, seed, None)
            row["warm"] = train(design, enlarged, held_out, base / "warm", short, seed, first_model)
            row["cold_short"] = train(design, enlarged, held_out, base / "cold_short", short, seed, None)
            row["warm_low_lr"] = train(
                design, enlarged, held_out, base / "warm_low_lr", short, seed, first_model, warm_lr_scale
            )
            results["runs"][f"{design}/seed{seed}"] = row
            print(f"{design} seed {seed}: " + json.dumps(row), flush=True)
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def table(results: dict[str, Any], designs: list[str]) -> str:
    seeds = len(results["runs"]) // len(designs)
    epochs, short = results["epochs"], results["short_epochs"]
    lines = [
        f"N = {epochs} epochs, N/4 = {short}; median over {seeds} seeds (min–max)",
        f"{'design':8} {'run':11} {'epochs':>6} {'E RMSE meV/atom':>22} {'F RMSE meV/Å':>20} {'CPU s':>14}",
    ]
    for design in designs:
        rows = [v for k, v in results["runs"].items() if k.startswith(f"{design}/")]
        for name in RUNS:
            cells = []
            for key, fmt in (("energy_rmse_meV_atom", ".1f"), ("forces_rmse_meV_A", ".0f"), ("cpu_s", ".0f")):
                values = [r[name][key] for r in rows]
                cells.append(
                    f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"
                    if len(values) > 1
                    else f"{values[0]:{fmt}}"
                )
            epochs = rows[0][name]["epochs"]
            lines.append(f"{design:8} {name:11} {epochs:>6} {cells[0]:>22} {cells[1]:>20} {cells[2]:>14}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--workdir", type=Path, default=Path("warm-start-runs"))
    parser.add_argument("--designs", nargs="+", default=["sr", "charges"])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--warm-lr-scale", type=float, default=0.1, help="learning-rate factor of warm_low_lr"
    )
    parser.add_argument(
        "--report",
        type=Path,
        nargs="+",
        metavar="WORKDIR",
        help="print the table of earlier runs (their seeds together) instead of running",
    )
    args = parser.parse_args(argv)
    if args.report:
        parts = [json.loads((workdir / "results.json").read_text()) for workdir in args.report]
        results = {**parts[0], "runs": {k: v for part in parts for k, v in part["runs"].items()}}
    else:
        results = run(args.data, args.workdir, args.designs, args.epochs, args.seeds, args.warm_lr_scale)
    print(table(results, args.designs))


if __name__ == "__main__":
    main()
