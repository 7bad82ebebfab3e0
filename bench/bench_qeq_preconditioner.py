"""QEq conjugate gradients: Jacobi against the mesh preconditioner, iteration counts and CPU time.

The solve of ``qeq`` (``qeq_solve``: ``H x = −b`` and ``H y = 1`` in lock-step, ``H = A + diag J``) on
the NaCl crystals and water boxes of ``bench_heads.py``, electrostatics at the defaults (σ = 1.5 Å,
accuracy 1e-6; Ewald below 700 atoms, PME above), with the Coulomb operator set up once per geometry
(:meth:`Electrostatics.coulomb_operator`). Hardness: ``untrained`` (softplus(2) + 0.1 = 2.23 eV/e², what
an untrained ``qeq`` head gives), ``J=5`` and ``J=15`` (eV/e², realistic), each ±10 % per atom;
χ per element ± 0.3 eV. Printed per case: iterations, CPU seconds of the solve (operator set-up
excluded, preconditioner set-up included), whether the mesh preconditioner fell back to Jacobi
(round-off only: it is positive by construction), and the largest charge difference between the
two; then the solve inference runs (``projected``: the mesh-preconditioned CG projected on Σq = Q
from Q/N, one charge channel instead of two) with its iterations, CPU seconds and charge difference
to the two-channel mesh solve. Iteration counts do not depend on the device.
``SYSTEM+vacuum`` adds 12 Å of vacuum along the third cell vector of a fully periodic cell (an
unevenly filled cell, as a slab or an interface in a periodic box), where a preconditioner built on
one homogeneous density over-corrects the smooth modes; the mesh preconditioner's inner steps
resolve the uneven density, so its iterations should stay as flat in N there as on the full cells.

Usage: ``python bench/bench_qeq_preconditioner.py [--sizes 1k,4k] [--dtype float32|float64]``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VACUUM, VACUUM_SUFFIX = 12.0, "+vacuum"
HARDNESS = {"untrained": math.log1p(math.exp(2.0)) + 0.1, "J=5": 5.0, "J=15": 15.0}
CHI = {1: -1.0, 8: 2.0, 11: -2.0, 17: 2.0}


def run(system: str, size: str, dtype: str, tol: float | None) -> list[dict]:
    import torch
    from bench_heads import structure

    from aiida_emlip.models.coulomb_operator import MeshPreconditioner
    from aiida_emlip.models.electrostatics import Electrostatics
    from aiida_emlip.models.heads.solvers import default_tolerance, qeq_solve, qeq_solve_from
    from aiida_emlip.schema import COULOMB_CONSTANT

    dt = getattr(torch, dtype)
    tol = default_tolerance(1e-10 if tol is None else tol, dt)
    atoms = structure(system.removesuffix(VACUUM_SUFFIX), size)
    if system.endswith(VACUUM_SUFFIX):  # unevenly filled
        atoms.cell[2, 2] += VACUUM
    pos = torch.tensor(atoms.positions, dtype=dt)
    cell = torch.tensor(atoms.cell.array, dtype=dt)
    pbc = torch.tensor([True, True, True])
    es = Electrostatics()
    sigma = es.config.sigma
    op = es.coulomb_operator(pos, cell, pbc)
    a_diag = COULOMB_CONSTANT / (sigma * math.sqrt(math.pi))
    gen = torch.Generator().manual_seed(0)
    n = len(atoms)
    chi = torch.tensor([CHI[int(z)] for z in atoms.numbers], dtype=dt)
    chi = chi + 0.3 * torch.randn(n, generator=gen, dtype=dt)
    rows = []
    for label, j in HARDNESS.items():
        hardness = j * (1.0 + 0.2 * (torch.rand(n, generator=gen, dtype=dt) - 0.5))
        out = {}
        for name in ("jacobi", "mesh"):
            t0, w0 = time.process_time(), time.perf_counter()
            if name == "jacobi":
                precond = hardness + a_diag
            else:
                precond = MeshPreconditioner(pos, cell, math.sqrt(2.0) * sigma).with_diagonal(
                    hardness + a_diag
                )
            sol = qeq_solve(op, hardness, chi, 0.0, precond=precond, tol=tol, maxiter=2000)
            out[name] = (sol, time.process_time() - t0, time.perf_counter() - w0)
        # inference: projected CG on Σq = Q from Q/N, one charge channel (what the head runs)
        t0 = time.process_time()
        precond = MeshPreconditioner(pos, cell, math.sqrt(2.0) * sigma).with_diagonal(hardness + a_diag)
        qp, _, ip = qeq_solve_from(op, hardness, chi, 0.0, torch.zeros_like(chi), precond, tol, 2000)
        cp = time.process_time() - t0
        (sj, cj, wj), (sm, cm, wm) = out["jacobi"], out["mesh"]
        rows.append(
            {
                "system": system,
                "n": n,
                "hardness": label,
                "method": op.method,
                "jacobi_its": sj.info.iterations,
                "mesh_its": sm.info.iterations,
                "jacobi_cpu": cj,
                "mesh_cpu": cm,
                "jacobi_wall": wj,
                "mesh_wall": wm,
                "fallback": sm.info.fallback,
                "converged": sj.info.converged and sm.info.converged,
                "dq": float((sj.charges - sm.charges).abs().max()),
                "projected_its": ip.iterations,
                "projected_cpu": cp,
                "dq_projected": float((qp - sm.charges).abs().max()),
            }
        )
        r = rows[-1]
        print(
            f"| {system} | {n} | {label} | {r['jacobi_its']} | {r['mesh_its']}"
            f"{' (fell back)' if r['fallback'] else ''} | {cj:.2f} | {cm:.2f} | {cj / cm:.2f}× | "
            f"{wj:.2f} / {wm:.2f} | {r['dq']:.1e} | {r['converged']} | {ip.iterations} | {cp:.2f} | "
            f"{cm / cp:.2f}× | {r['dq_projected']:.1e} |",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default="water,nacl,water+vacuum,nacl+vacuum")
    parser.add_argument("--sizes", default="1k,4k")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--tol", type=float, default=None, help="CG tolerance (default: the head's)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    load = os.getloadavg()
    print(
        f"CPU, {torch.get_num_threads()} thread(s), {args.dtype}, "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    print(
        "| system | N | hardness | Jacobi its | mesh its | Jacobi CPU s | mesh CPU s | speed-up (CPU) |"
        " wall s J / mesh | max |Δq| (e) | converged | projected its | projected CPU s |"
        " mesh / projected (CPU) | max |Δq| projected (e) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        for system in args.systems.split(","):
            run(system, size, args.dtype, args.tol)
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


if __name__ == "__main__":
    main()
