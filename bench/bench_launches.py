"""Tensor operations (kernel launches) of every head's energy + forces, counted at torch's dispatcher.

On a GPU these small models are bound by kernel launches, not arithmetic: an H200 runs the tiny
backbone's ``sr`` evaluation in about the same time from 1k to 17.6k atoms, and each iteration of a
self-consistent head costs a near-constant time whatever N. The number of operations that launch a
kernel is then the figure that predicts a head's cost relative to ``sr`` there, and it is the same on
every device: this script counts them on the CPU (or any device), so that a change to a solver can be
judged without a GPU.

Counted: every ATen operation that reaches a kernel (views, reshapes and other metadata-only operations
are left out; ``aten._local_scalar_dense``, the device → host copies behind ``.item()`` and
``.tolist()``, also counted as *host syncs*). Each head's model (untrained weights, float32, default
options) is evaluated once to fill its per-cell caches, as in MD, then counted. Printed per head: the
operations of an energy + forces evaluation and of an energy alone, the ratio of the first to ``sr``'s,
the host syncs, the solver's iterations and the operations per iteration beyond ``sr`` (the difference
to ``sr`` divided by the iterations: an upper bound of one iteration's share), and the launches with the
solver iterations replayed as CUDA graphs (``cuda_graphs``: each iteration a single graph launch;
counted in ``emulate`` mode, which runs a replay's data flow on any device) with their ratio to ``sr``.

Usage: ``python bench/bench_launches.py [--systems nacl,water] [--size 1k] [--heads sr,charges,qeq,scf]
[--backbone tiny|realistic] [--device cpu] [--json out.json]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_heads import BACKBONES, HEADS, NACL_REPEATS, structure

#: Operations that never launch a kernel (aliases and metadata), besides those torch marks as views.
METADATA = {
    "detach",
    "alias",
    "lift_fresh",
    "_unsafe_view",
    "view",
    "_reshape_alias",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
    "is_same_size",
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "set_",
    "resize_",
}
SYNC = "_local_scalar_dense"


def counting_mode():
    """A dispatch mode that tallies the kernel-launching operations by name (and the host syncs)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter = Counter()
            self.muted = False  # inside a replayed iteration: one launch for all of it

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if not (self.muted or getattr(func, "is_view", False) or name in METADATA):
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    return Count()


@contextlib.contextmanager
def replays_as_one_launch(mode) -> Iterator[None]:
    """Within the block, the solvers' replayed iterations (``emulate`` mode: their data flow on any
    device) count as one launch each, as a CUDA graph's replay does."""
    from aiida_emlip.models.heads.replay import IterationReplay, replayed_iterations

    call = IterationReplay.__call__

    def one_launch(runner):
        mode.ops["cuda graph replay"] += 1
        mode.muted = True
        try:
            return call(runner)
        finally:
            mode.muted = False

    IterationReplay.__call__ = one_launch
    try:
        with replayed_iterations("emulate"):
            yield
    finally:
        IterationReplay.__call__ = call


def count_head(system: str, size: str, head: str, backbone: str, device: str) -> dict:
    """Operations of one energy + forces evaluation (the second: caches warm, as in MD)."""
    import torch

    from aiida_emlip.models.graph import build_graph
    from aiida_emlip.models.model import EmlipModel, ModelConfig

    torch.manual_seed(0)
    model = EmlipModel(
        ModelConfig(
            elements=["H", "O", "Na", "Cl"], head=HEADS[head], backbone=BACKBONES[backbone], dtype="float32"
        )
    ).to(device)
    model.eval()
    atoms = structure(system, size)
    graph = build_graph([atoms], model.cutoff, torch.float32, device)
    for _ in range(2):  # warm-up: per-cell caches filled, a steady state as in MD
        model(graph, compute_forces=True, compute_stress=False)
    full, energy = counting_mode(), counting_mode()
    with full:
        out = model(graph, compute_forces=True, compute_stress=False)
    with energy:
        model(graph, compute_forces=False, compute_stress=False)
    graphs = counting_mode()
    with graphs, replays_as_one_launch(graphs):
        model(graph, compute_forces=True, compute_stress=False)
    total = sum(full.ops.values())
    energy_only = sum(energy.ops.values())
    iterations = None if out["iterations"] is None else int(out["iterations"].max())
    return {
        "system": system,
        "n": len(atoms),
        "head": head,
        "total": total,
        "energy_only": energy_only,
        "with_graphs": sum(graphs.ops.values()),
        "syncs": full.ops.get(SYNC, 0),
        "iterations": iterations,
        "top": full.ops.most_common(12),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| system | N | head | ops, energy + forces | ops, energy only | × sr | host syncs | iterations |"
        " ops per iteration beyond sr | launches with CUDA graphs | × sr |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["system"]: r for r in rows if r["head"] == "sr"}
    for r in rows:
        sr = base.get(r["system"])
        ratio = r["total"] / sr["total"] if sr else float("nan")
        its = r["iterations"]
        per = (r["total"] - sr["total"]) / its if (its and sr) else None
        lines.append(
            f"| {r['system']} | {r['n']} | {r['head']} | {r['total']} | {r['energy_only']} | {ratio:.2f} | "
            f"{r['syncs']} | {'' if its is None else its} | {'' if per is None else f'{per:.0f}'} | "
            f"{r['with_graphs']} | {r['with_graphs'] / sr['total'] if sr else float('nan'):.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default="nacl,water")
    parser.add_argument("--size", default="1k", choices=list(NACL_REPEATS))
    parser.add_argument("--heads", default="sr,charges,latent,split,qeq,scf,functional")
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--top", action="store_true", help="print each head's most frequent operations")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    heads = args.heads.split(",")
    unknown = sorted(set(heads) - set(HEADS))
    if unknown:
        parser.error(f"unknown heads {unknown}; known: {', '.join(HEADS)}")
    if "sr" not in heads:
        heads.insert(0, "sr")
    rows = [
        count_head(system, args.size, head, args.backbone, args.device)
        for system in args.systems.split(",")
        for head in heads
    ]
    print(table(rows))
    if args.top:
        for r in rows:
            print(f"\n{r['system']} {r['head']}: " + ", ".join(f"{name} {n}" for name, n in r["top"]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
