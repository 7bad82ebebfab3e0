"""Gaussian dipole terms: half-sphere k-space sum (Ewald path) vs smooth-PME mesh (PME path).

Water boxes (SPC/E-like charges, every atom with a random Gaussian dipole of ~0.3 e·Å), ~500, 2000
and 8000 atoms, float32, σ = 1.5 Å, accuracy 1e-6, energy + forces of the charge–dipole and
dipole–dipole terms with the parameters :class:`~aiida_emlip.models.electrostatics.Electrostatics`
picks (``k_c`` from ``kspace_cutoff(dipoles=True)``, mesh and B-spline order from
``dipole_mesh_parameters``), and the whole PME path (charges + dipoles) for reference. Each case runs
in a fresh subprocess (peak RSS its own); times are the best of ``repeats`` after a warm-up, wall and
CPU seconds. ``dE``: the two dipole energies' difference in units of ``E_s``. The load average is
printed before and after: the machine may be shared.
Usage: ``OMP_NUM_THREADS=1 python bench/bench_dipole_mesh.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_electrostatics import child_result, loglog_slope, water

WATER_MOLECULES = (167, 667, 2667)
ACCURACY = 1e-6
SIGMA = 1.5


def run_one(n_mol: int, method: str, repeats: int) -> dict:
    import torch

    from aiida_emlip.models import dipole_mesh as dm
    from aiida_emlip.models import gaussian_dipoles as gd
    from aiida_emlip.models.accuracy import coulomb_scales, dipole_mesh_parameters, kspace_cutoff
    from aiida_emlip.models.electrostatics import Electrostatics, ElectrostaticsConfig, reduced_cell

    q, pos, cell = water(n_mol)
    g = torch.Generator().manual_seed(1)
    p = 0.3 * torch.randn(pos.shape, generator=g, dtype=torch.float64)
    q, pos, cell, p = q.float(), pos.float(), cell.float(), p.float()
    n = q.shape[0]
    pbc = torch.tensor([True, True, True])
    cell = reduced_cell(cell)
    info = ""
    if method == "ksum":
        k_cut = kspace_cutoff(cell, SIGMA, n, ACCURACY, dipoles=True)
        info = f"k_c {k_cut:.2f}/A, {gd.half_space_kvectors(cell, k_cut).shape[0]} k"

        def energy(x):
            return gd.dipole_kspace_energy(q, p, x, cell, SIGMA, k_cut)
    elif method == "mesh":
        params = dipole_mesh_parameters(cell, SIGMA, n, ACCURACY)
        info = "x".join(map(str, params.mesh)) + f" p={params.nodes}"

        def energy(x):
            return dm.dipole_mesh_energy(q, p, x, cell, SIGMA, params.mesh, params.nodes)
    else:  # the whole PME path: charges (torch-pme) + dipoles (mesh)
        el = Electrostatics(ElectrostaticsConfig(sigma=SIGMA, method="pme", accuracy=ACCURACY))

        def energy(x):
            return el.energy(q, x, cell, pbc, p)

    walls, cpus = [], []
    for _ in range(repeats + 1):
        x = pos.clone().requires_grad_(True)
        t0, c0 = time.perf_counter(), time.process_time()
        e = energy(x)
        torch.autograd.grad(-e, x)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    best = min(range(1, len(walls)), key=lambda i: walls[i])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    scales = coulomb_scales(q, abs(float(torch.linalg.det(cell))), p)
    return {
        "n": n,
        "wall": walls[best],
        "cpu": cpus[best],
        "peak_mb": peak_mb,
        "energy": e.item(),
        "energy_scale": scales.energy,
        "info": info,
    }


def spawn(n_mol: int, method: str, repeats: int) -> dict | None:
    return child_result(__file__, [str(n_mol), method, str(repeats)], timeout=1800)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", nargs=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.one:
        n_mol, method, repeats = args.one
        print(json.dumps(run_one(int(n_mol), method, int(repeats))))
        return
    import torch

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, sigma {SIGMA} A, ")
    print(f"accuracy {ACCURACY}; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    head = f"{'N':>6} {'k-sum wall/cpu s':>17} {'mesh wall/cpu s':>16} {'k-sum/mesh':>10} {'dE/E_s':>8}"
    print(f"{head} {'PME path s':>10} {'MB k/m':>10}  mesh | k-sum")
    points = []
    for n_mol in WATER_MOLECULES[:2] if args.quick else WATER_MOLECULES:
        ksum = spawn(n_mol, "ksum", 1 if n_mol > 1000 else 2)
        mesh = spawn(n_mol, "mesh", 2)
        whole = spawn(n_mol, "pme", 2)
        if ksum is None or mesh is None or whole is None:
            continue
        points.append((mesh["n"], mesh["wall"], mesh["cpu"]))
        d_e = abs(ksum["energy"] - mesh["energy"]) / mesh["energy_scale"]
        print(
            f"{mesh['n']:>6} {ksum['wall']:>8.3f}/{ksum['cpu']:<8.3f}"
            f" {mesh['wall']:>7.3f}/{mesh['cpu']:<8.3f} {ksum['wall'] / mesh['wall']:>10.1f}"
            f" {d_e:>8.1e} {whole['wall']:>10.3f}"
            f" {ksum['peak_mb']:>5.0f}/{mesh['peak_mb']:<4.0f}  {mesh['info']} | {ksum['info']}",
            flush=True,
        )
    if len(points) >= 2:
        wall = loglog_slope([(n, t) for n, t, _ in points])
        cpu = loglog_slope([(n, c) for n, _, c in points])
        print(f"mesh log-log slope vs N: wall time {wall:.2f}, CPU time {cpu:.2f}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
