"""Ewald vs PME timing for energy + forces of the electrostatics layer.

NaCl supercells and water boxes (SPC/E-like charges), ~200 → 17k atoms, float32, σ = 1.5 Å and the
default accuracy (1e-6). Each (system, method) runs in a fresh subprocess so that its peak resident
memory (``ru_maxrss``) is its own. Ewald is skipped where its dense [k, atoms] matrices would exceed
``EWALD_MAX_ELEMENTS``. Usage: ``python bench/bench_electrostatics.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

EWALD_MAX_ELEMENTS = 8e7
NACL_REPEATS = (3, 4, 5, 6, 8, 10, 13)
WATER_MOLECULES = (333, 1000, 2700, 5400)


def nacl(m: int):
    import torch

    a = 5.64
    base = torch.tensor([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]], dtype=torch.float64)
    cells = torch.stack(torch.meshgrid(*[torch.arange(m)] * 3, indexing="ij"), -1).reshape(-1, 1, 3)
    na = (base[None] + cells).reshape(-1, 3) * a
    cl = na + torch.tensor([0.5 * a, 0.0, 0.0], dtype=torch.float64)
    pos = torch.cat([na, cl])
    q = torch.cat([torch.ones(len(na)), -torch.ones(len(cl))]).double()
    return q, pos, torch.eye(3, dtype=torch.float64) * a * m


def water(n_mol: int):
    import torch

    g = torch.Generator().manual_seed(0)
    side = math.ceil(n_mol ** (1 / 3))
    box = (n_mol * 29.9) ** (1 / 3)
    grid = torch.stack(torch.meshgrid(*[torch.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n_mol]
    centres = (grid.double() + 0.5) * box / side
    h1 = torch.tensor([0.8165, 0.5774, 0.0], dtype=torch.float64)
    h2 = torch.tensor([-0.8165, 0.5774, 0.0], dtype=torch.float64)
    rot = torch.linalg.qr(torch.randn(n_mol, 3, 3, generator=g, dtype=torch.float64))[0]
    pos = torch.stack([centres, centres + rot @ h1, centres + rot @ h2], 1).reshape(-1, 3)
    q = torch.tensor([-0.8476, 0.4238, 0.4238], dtype=torch.float64).repeat(n_mol)
    return q, pos, torch.eye(3, dtype=torch.float64) * box


def run_one(system: str, size: int, method: str, repeats: int) -> dict:
    import torch

    from aiida_emlip.models.electrostatics import Electrostatics, ElectrostaticsConfig

    q, pos, cell = nacl(size) if system == "nacl" else water(size)
    q, pos, cell = q.float(), pos.float(), cell.float()
    pbc = torch.tensor([True, True, True])
    el = Electrostatics(ElectrostaticsConfig(method=method))
    chosen = Electrostatics().select_method(len(q), pbc)
    times = []
    for _ in range(repeats + 1):
        x = pos.clone().requires_grad_(True)
        t0 = time.perf_counter()
        e = el.energy(q, x, cell, pbc)
        torch.autograd.grad(-e, x)
        times.append(time.perf_counter() - t0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"n": len(q), "time": min(times[1:]), "peak_mb": peak_mb, "chosen": chosen, "energy": e.item()}


def ewald_elements(system: str, size: int) -> float:
    """Size of torch-pme's dense Ewald [k, atoms] matrix at the default accuracy (half k-sphere)."""
    import torch

    from aiida_emlip.models.accuracy import kspace_cutoff

    n = 8 * size**3 if system == "nacl" else 3 * size
    side = 5.64 * size if system == "nacl" else (size * 29.9) ** (1 / 3)
    k_cut = kspace_cutoff(torch.eye(3, dtype=torch.float64) * side, 1.5, n, 1e-6)
    return side**3 * k_cut**3 / (12 * math.pi**2) * n


def child_result(script: str, args: list[str], timeout: float) -> dict | None:
    """Run ``script --one ARGS`` in a fresh process (its own peak memory) and return the JSON object on
    its last output line; None, with the end of its stderr printed, when it fails."""
    cmd = [sys.executable, script, "--one", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def spawn(system: str, size: int, method: str, repeats: int) -> dict | None:
    return child_result(__file__, [system, str(size), method, str(repeats)], timeout=300)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", nargs=4)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.one:
        system, size, method, repeats = args.one
        print(json.dumps(run_one(system, int(size), method, int(repeats))))
        return
    import torch

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, sigma 1.5 A, accuracy 1e-6"
    )
    print(f"{'system':>7} {'N':>6} {'ewald s':>9} {'pme s':>8} {'auto':>6} {'ewald MB':>9} {'pme MB':>8}")
    cases = [("nacl", m) for m in NACL_REPEATS] + [("water", n) for n in WATER_MOLECULES]
    if args.quick:
        cases = cases[:3]
    pme_points = []
    for system, size in cases:
        ewald = None
        if ewald_elements(system, size) <= EWALD_MAX_ELEMENTS:
            ewald = spawn(system, size, "ewald", 2)
        pme = spawn(system, size, "pme", 2)
        if pme is None:
            continue
        pme_points.append((system, pme["n"], pme["time"]))
        e_t = f"{ewald['time']:9.3f}" if ewald else f"{'skip':>9}"
        e_m = f"{ewald['peak_mb']:9.0f}" if ewald else f"{'-':>9}"
        row = f"{system:>7} {pme['n']:>6} {e_t} {pme['time']:8.3f} {pme['chosen']:>6}"
        print(f"{row} {e_m} {pme['peak_mb']:8.0f}")
        if ewald:
            rel = abs(pme["energy"] / ewald["energy"] - 1)
            print(f"{'':>7} {'':>6} |E_pme/E_ewald - 1| = {rel:.1e}")
    for name in ("nacl", "water"):
        big = [(n, t) for s, n, t in pme_points if s == name and n >= 1000]
        if len(big) >= 2:
            print(f"PME log-log slope, {name}, N >= 1000: {loglog_slope(big):.2f}")


def loglog_slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of log t against log N."""
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


if __name__ == "__main__":
    main()
