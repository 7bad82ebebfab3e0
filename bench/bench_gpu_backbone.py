"""GPU options of the backbone, measured side by side: TF32, cuEquivariance kernels, ``torch.compile``.

One model per head (``sr`` and ``qeq`` by default; the realistic MACE size of bench_heads.py,
float32, untrained weights, energy + forces in eval mode) on the water boxes and NaCl crystals of
bench_heads.py. Each variant runs on the same graph and weights:

* ``fp32``: plain float32 (TF32 off), the reference of every ratio and difference;
* ``tf32``: float32 with TF32 tensor-core matrix products (``torch.backends.cuda.matmul``);
* ``cueq``: the MACE backbone on cuEquivariance kernels (``backbone.use_kernels('cueq')``, the
  weights moved by mace-torch's converter; needs ``cuequivariance-torch`` and its CUDA ops package);
* ``compile``: the MACE backbone wrapped in ``torch.compile(dynamic=True)`` (first call timed apart).

Printed per variant: best time of ``--repeats`` evaluations, ratio to ``fp32``, and the change of the
energy per atom (meV/atom) and of the forces (RMS and max, meV/Å) against ``fp32``, beside the RMS
force itself: a variant is usable for MD where its force change is far below the model's error
(tens of meV/Å). A variant that cannot run here prints why.

Usage: ``python bench/bench_gpu_backbone.py [--sizes 4k,16k] [--systems water,nacl] [--heads sr,qeq]
[--variants fp32,tf32,cueq,compile] [--backbone realistic|tiny] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time

import torch
from bench_heads import BACKBONES, HEADS, structure

VARIANTS = ("fp32", "tf32", "cueq", "compile")


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 matrix products (and cuDNN convolutions) on or off inside the block."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def timed(model, graph, repeats: int) -> tuple[float, float, dict]:
    """(first-call seconds, best of ``repeats`` seconds, last output) of energy + forces."""
    times, out = [], None
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(graph, compute_forces=True, compute_stress=False)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[0], min(times[1:]), out


def variant_model(base, name: str):
    """A copy of ``base`` set up for variant ``name`` (same weights)."""
    model = copy.deepcopy(base)
    if name == "cueq":
        model.backbone.use_kernels("cueq")
    elif name == "compile":
        model.backbone.mace = torch.compile(model.backbone.mace, dynamic=True)
    return model.eval()


def measure(
    system: str, size: str, head: str, variants: list[str], backbone: str, repeats: int
) -> list[dict]:
    from aiida_emlip.models.graph import build_graph
    from aiida_emlip.models.model import EmlipModel, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(
        elements=["H", "O", "Na", "Cl"], head=HEADS[head], backbone=BACKBONES[backbone], dtype="float32"
    )
    base = EmlipModel(config).to("cuda").eval()
    atoms = structure(system, size)
    graph = build_graph([atoms], base.cutoff, torch.float32, "cuda")
    rows, ref = [], None
    for name in variants:
        row = {"system": system, "n": len(atoms), "head": head, "variant": name}
        try:
            model = variant_model(base, name)
            with tf32(name == "tf32"):
                first, best, out = timed(model, graph, repeats)
        except Exception as exc:  # a variant this machine cannot run: say why, go on
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            rows.append(row)
            print(f"# {system} {size} {head} {name}: {row['error']}", file=sys.stderr, flush=True)
            continue
        energy, forces = out["energy"].detach().double(), out["forces"].detach().double()
        row.update(first_s=first, time_s=best)
        if ref is None:
            ref = (row, energy, forces)
        f_diff = forces - ref[2]
        row.update(
            ratio=best / ref[0]["time_s"],
            dE_meV_atom=float((energy - ref[1]).abs().sum()) * 1000 / len(atoms),
            dF_rms_meV_A=float(f_diff.pow(2).mean().sqrt()) * 1000,
            dF_max_meV_A=float(f_diff.abs().max()) * 1000,
            F_rms_meV_A=float(ref[2].pow(2).mean().sqrt()) * 1000,
        )
        rows.append(row)
        print(f"# {system} {size} {head} {name}: {best:.4f} s (first {first:.1f} s)", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| system | N | head | variant | time (s) | ratio to fp32 | ΔE (meV/atom) | ΔF RMS / max (meV/Å) "
        "| F RMS (meV/Å) | first call (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['system']} | {r['n']} | {r['head']} | {r['variant']} |"
        if "error" in r:
            lines.append(f"{head} not run: {r['error']} ||||||")
            continue
        lines.append(
            f"{head} {r['time_s']:.4f} | {r['ratio']:.2f} | {r['dE_meV_atom']:.2e} | "
            f"{r['dF_rms_meV_A']:.2e} / {r['dF_max_meV_A']:.2e} | {r['F_rms_meV_A']:.0f} | "
            f"{r['first_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4k,16k")
    parser.add_argument("--systems", default="water,nacl")
    parser.add_argument("--heads", default="sr,qeq")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--backbone", default="realistic", choices=sorted(BACKBONES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows here (after every structure)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gpu_backbone.py needs a CUDA device")
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or variants[0] != "fp32":
        sys.exit(f"variants: a comma list of {', '.join(VARIANTS)} starting with fp32 (got {args.variants})")
    rows: list[dict] = []
    for system in args.systems.split(","):
        for size in args.sizes.split(","):
            for head in args.heads.split(","):
                rows += measure(system, size, head, variants, args.backbone, args.repeats)
                if args.json:
                    with open(args.json, "w") as fh:
                        json.dump({"backbone": BACKBONES[args.backbone], "rows": rows}, fh, indent=1)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, backbone {args.backbone} "
          f"{BACKBONES[args.backbone]}")  # fmt: skip
    print(table(rows))


if __name__ == "__main__":
    main()
