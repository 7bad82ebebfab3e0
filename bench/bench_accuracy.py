"""Electrostatics time at accuracy 1e-4, 1e-6, 1e-8 with the measured error next to it.

NaCl supercells (1000 and 4096 atoms, every atom displaced by ~0.1 Å so that forces are not zero by
symmetry), Gaussian charges of width σ = 1.5 Å (the model default), float64, energy + forces.
For each of Ewald and PME and each accuracy, side by side in one run:

* ``now``: :class:`~aiida_emlip.models.electrostatics.Electrostatics` with that ``accuracy``;
* ``before``: the parameters the layer used before its accuracy was tied to error estimates, called
  through torch-pme directly: ``k_c = √(−2 ln ε)/s`` for a torch-pme Ewald box of wavelength
  ``π/k_c``, and a PME mesh spacing ``0.5 · 2π/k_c`` (rounded up to 2ⁿ points) with 7 nodes.

Errors are against an independent k-space sum (``tests/electrostatics_reference.py``, converged to
``e^{−30}``), in units of the Coulomb scales of :mod:`aiida_emlip.models.accuracy` (``dE`` =
``|ΔE|/E_s``, ``dF`` = ``RMS|ΔF|/F_s``; the accuracy is met when both are ≤ ε). Ewald is skipped where
torch-pme's dense [k × atoms] matrices would exceed ``EWALD_MAX_ELEMENTS``. Times: best of three after
a warm-up. Usage: ``OMP_NUM_THREADS=1 python bench/bench_accuracy.py [--quick]`` (``--quick``: 1000
atoms only).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torchpme import CoulombPotential, EwaldCalculator, PMECalculator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from electrostatics_reference import reference_derivatives  # noqa: E402

from aiida_emlip.models.accuracy import coulomb_scales, kspace_cutoff, pme_parameters  # noqa: E402
from aiida_emlip.models.electrostatics import Electrostatics, ElectrostaticsConfig  # noqa: E402
from aiida_emlip.schema import COULOMB_CONSTANT as KE  # noqa: E402

DT = torch.float64
SIGMA = 1.5
ACCURACIES = (1e-4, 1e-6, 1e-8)
EWALD_MAX_ELEMENTS = 8e7
T3 = torch.tensor([True, True, True])


def nacl(m: int, a: float = 5.64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fcc = torch.tensor([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]], dtype=DT)
    cells = torch.cartesian_prod(*[torch.arange(m, dtype=DT)] * 3)
    na = (fcc[None] + cells[:, None]).reshape(-1, 3) * a
    pos = torch.cat([na, na + torch.tensor([0.5 * a, 0.0, 0.0], dtype=DT)])
    pos = pos + 0.1 * torch.randn(pos.shape, generator=torch.Generator().manual_seed(0), dtype=DT)
    q = torch.cat([torch.ones(len(na), dtype=DT), -torch.ones(len(na), dtype=DT)])
    return q, pos, torch.eye(3, dtype=DT) * a * m


def legacy_energy(method: str, accuracy: float):
    """The energy function with the former parameter choice (torch-pme called directly)."""
    s = math.sqrt(2.0) * SIGMA
    k_cut = math.sqrt(-2.0 * math.log(accuracy)) / s
    pot = CoulombPotential(smearing=s, prefactor=KE)
    if method == "ewald":
        calc = EwaldCalculator(pot, lr_wavelength=math.pi / k_cut)
    else:
        calc = PMECalculator(pot, mesh_spacing=0.5 * 2.0 * math.pi / k_cut, interpolation_nodes=7)
    calc = calc.to(dtype=DT)

    def energy(q, pos, cell):
        v = calc(q[:, None], cell, pos, torch.zeros((0, 2), dtype=torch.long), pos.new_zeros(0))
        volume = torch.abs(torch.linalg.det(cell))
        self_e = KE * (q * q).sum() / (2.0 * SIGMA * math.sqrt(math.pi))
        return (q[:, None] * v).sum() + self_e + 2.0 * math.pi * KE * SIGMA**2 * q.sum() ** 2 / volume

    return energy


def ewald_elements(q, cell, accuracy: float, legacy: bool) -> float:
    """Size of torch-pme's [k × atoms] Ewald matrices for either parameter choice."""
    if legacy:
        k_cut = math.sqrt(-math.log(accuracy)) / SIGMA
        ns = [math.ceil(2.0 * k_cut * float(torch.linalg.norm(a)) / (2.0 * math.pi)) for a in cell]
        return float(ns[0] * ns[1] * ns[2] * len(q))
    k_cut = kspace_cutoff(cell, SIGMA, len(q), accuracy)
    volume = abs(float(torch.linalg.det(cell)))
    return volume * k_cut**3 / (12.0 * math.pi**2) * len(q)  # half sphere


def timed(fn, q, pos, cell) -> tuple[float, float, torch.Tensor]:
    """Best time of three (after a warm-up) of energy + forces; returns (seconds, E, F)."""
    best = math.inf
    for _ in range(4):
        x = pos.clone().requires_grad_(True)
        t0 = time.perf_counter()
        e = fn(q, x, cell)
        (g,) = torch.autograd.grad(e, x)
        best = min(best, time.perf_counter() - t0)
    return best, e.item(), -g


def errors(e: float, f: torch.Tensor, ref: dict, scales) -> tuple[float, float]:
    de = abs(e - ref["energy"].item()) / scales.energy
    df = (f - ref["forces"]).pow(2).sum(1).mean().sqrt().item() / scales.force
    return de, df


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = (5,) if args.quick else (5, 8)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float64, NaCl, sigma {SIGMA} A")
    header = (
        f"{'N':>5} {'method':>6} {'eps':>6} | {'now s':>7} {'dE now':>8} {'dF now':>8} {'params now':>18}"
        f" | {'before s':>8} {'dE bef':>8} {'dF bef':>8} | {'time now/before':>15}"
    )
    print(header)
    for m in sizes:
        q, pos, cell = nacl(m)
        t0 = time.perf_counter()
        ref = reference_derivatives(q, pos, cell, SIGMA, k_max=5.5)
        scales = coulomb_scales(q, abs(float(torch.linalg.det(cell))))
        f_rms = ref["forces"].pow(2).sum(1).mean().sqrt().item()
        print(
            f"# N={len(q)}: reference {time.perf_counter() - t0:.0f} s, E={ref['energy'].item():.6f} eV,"
            f" E_s={scales.energy:.1f} eV, RMS F={f_rms:.4f} eV/A, F_s={scales.force:.3f} eV/A"
        )
        for method in ("ewald", "pme"):
            for accuracy in ACCURACIES:
                el = Electrostatics(ElectrostaticsConfig(sigma=SIGMA, method=method, accuracy=accuracy))
                if method == "ewald":
                    params = f"k_c={kspace_cutoff(cell, SIGMA, len(q), accuracy):.2f}/A"
                else:
                    p = pme_parameters(cell, SIGMA, len(q), accuracy)
                    params = f"{p.mesh[0]}^3 mesh, p={p.nodes}"
                now = before = None
                if method == "pme" or ewald_elements(q, cell, accuracy, False) <= EWALD_MAX_ELEMENTS:
                    now = timed(lambda q, x, c, el=el: el.energy(q, x, c, T3), q, pos, cell)
                if method == "pme" or ewald_elements(q, cell, accuracy, True) <= EWALD_MAX_ELEMENTS:
                    before = timed(legacy_energy(method, accuracy), q, pos, cell)
                row = f"{len(q):>5} {method:>6} {accuracy:>6.0e} | "
                row += (
                    f"{now[0]:7.3f} " + " ".join(f"{x:8.1e}" for x in errors(now[1], now[2], ref, scales))
                    if now
                    else f"{'skip':>7} {'':>8} {'':>8}"
                )
                row += f" {params:>18} | "
                row += (
                    f"{before[0]:8.3f} "
                    + " ".join(f"{x:8.1e}" for x in errors(before[1], before[2], ref, scales))
                    if before
                    else f"{'skip':>8} {'':>8} {'':>8}"
                )
                row += f" | {now[0] / before[0]:15.2f}" if now and before else f" | {'-':>15}"
                print(row, flush=True)


if __name__ == "__main__":
    main()
