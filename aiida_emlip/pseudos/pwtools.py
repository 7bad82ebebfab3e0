"""Small ``pw.x`` driver used to measure cutoffs and validate the family (no AiiDA).

``pw.x`` runs serially as an MPI singleton (no ``mpirun``: Debian's OpenMPI ``mpirun`` refuses root).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io.espresso import write_espresso_in

from aiida_emlip.pseudos.mpi_env import singleton_env

__all__ = ("PwError", "PwResult", "fit_birch_murnaghan", "lattice_constant", "run_pw")

RY_EV = 13.605693122994
_ENERGY_RE = re.compile(r"^!\s+total energy\s+=\s+(-?\d+\.\d+)\s+Ry", re.MULTILINE)
_FORCE_RE = re.compile(
    r"^\s+atom\s+\d+\s+type\s+\d+\s+force\s+=\s+(-?\d+\.\d+)\s+(-?\d+\.\d+)\s+(-?\d+\.\d+)", re.MULTILINE
)
_SCF_ITER_RE = re.compile(r"convergence has been achieved in\s+(\d+)\s+iterations")


class PwError(RuntimeError):
    """``pw.x`` failed, did not converge or printed no energy."""


@dataclass(frozen=True)
class PwResult:
    """Parsed ``pw.x`` result; energies in Ry, forces in Ry/bohr (last ionic step)."""

    energy_ry: float
    energies_ry: tuple[float, ...]
    forces: np.ndarray
    scf_iterations: int
    atoms: Atoms
    output: str


def run_pw(
    atoms: Atoms,
    pseudos: Mapping[str, Path],
    ecutwfc: float,
    ecutrho: float | None = None,
    kpts: Sequence[int] | None = None,
    smearing: float | None = None,
    calculation: str = "scf",
    extra: Mapping[str, object] | None = None,
    pw: str = "pw.x",
    timeout: float = 900,
) -> PwResult:
    """Run one serial ``pw.x`` calculation on ``atoms`` in a temporary directory.

    ``kpts=None`` means the Γ point (gamma tricks); ``smearing`` is a Marzari–Vanderbilt width in Ry.
    """
    exe = shutil.which(pw)
    if exe is None:
        raise FileNotFoundError(f"'{pw}' not found: install the Debian package `quantum-espresso`")
    symbols = sorted(set(atoms.get_chemical_symbols()))
    pseudo_dirs = {Path(pseudos[s]).resolve().parent for s in symbols}
    if len(pseudo_dirs) != 1:
        raise ValueError("all pseudopotentials must live in one directory")
    data: dict[str, object] = {
        "calculation": calculation,
        "prefix": "pw",
        "outdir": "./out",
        "pseudo_dir": str(pseudo_dirs.pop()),
        "tprnfor": True,
        "ecutwfc": float(ecutwfc),
        "ecutrho": float(ecutrho if ecutrho is not None else 4 * ecutwfc),
        "conv_thr": 1e-8 * len(atoms),
        "mixing_beta": 0.5,
        "disk_io": "none",
    }
    if smearing is not None:
        data.update(occupations="smearing", smearing="mv", degauss=float(smearing))
    data.update(extra or {})
    names = {s: Path(pseudos[s]).name for s in symbols}
    with tempfile.TemporaryDirectory(prefix="emlip_pw_") as tmp:
        inp = Path(tmp) / "pw.in"
        with inp.open("w") as handle:
            write_espresso_in(handle, atoms, input_data=data, pseudopotentials=names, kpts=kpts)
        env = {**singleton_env(tmp), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(
            [exe, "-in", "pw.in"], cwd=tmp, capture_output=True, text=True, timeout=timeout, env=env
        )
        output = proc.stdout
        if proc.returncode != 0 or "JOB DONE" not in output or "convergence NOT achieved" in output:
            raise PwError(f"pw.x failed (exit {proc.returncode}):\n{output[-3000:]}\n{proc.stderr[-2000:]}")
        energies = tuple(float(e) for e in _ENERGY_RE.findall(output))
        if not energies:
            raise PwError(f"pw.x printed no total energy:\n{output[-3000:]}")
        forces_all = np.array(_FORCE_RE.findall(output), dtype=float)
        forces = forces_all[-len(atoms) :] if len(forces_all) >= len(atoms) else np.zeros((len(atoms), 3))
        final = atoms.copy()
        if calculation in ("relax", "vc-relax"):
            final = _final_atoms(output, atoms)
        iters = [int(n) for n in _SCF_ITER_RE.findall(output)]
    return PwResult(energies[-1], energies, forces, iters[-1] if iters else 0, final, output)


_POS_BLOCK_RE = re.compile(r"ATOMIC_POSITIONS\s*\((\w+)\)\s*\n((?:\s*[A-Z][a-z]?\s+[-\d.Ee+\s]+\n)+)")


def _final_atoms(output: str, atoms: Atoms) -> Atoms:
    """Return ``atoms`` with the last ``ATOMIC_POSITIONS`` block of a relax output (angstrom units)."""
    blocks = _POS_BLOCK_RE.findall(output)
    final = atoms.copy()
    if not blocks:
        return final
    unit, body = blocks[-1]
    rows = [line.split() for line in body.strip().splitlines()]
    pos = np.array([[float(x) for x in row[1:4]] for row in rows[: len(atoms)]])
    if unit == "angstrom":
        final.positions = pos
    elif unit == "crystal":
        final.set_scaled_positions(pos)
    elif unit == "bohr":
        final.positions = pos * 0.529177210903
    else:
        raise PwError(f"unexpected ATOMIC_POSITIONS unit {unit}")
    return final


def fit_birch_murnaghan(volumes: Sequence[float], energies: Sequence[float]) -> tuple[float, float, float]:
    """Fit third-order Birch–Murnaghan E(V) (a cubic in V^(-2/3)); return (V0, E0, B0 in E/V units)."""
    v = np.asarray(volumes, dtype=float)
    e = np.asarray(energies, dtype=float)
    x = v ** (-2.0 / 3.0)
    deg = 3 if len(v) >= 5 else 2
    coeffs = np.polyfit(x, e, deg)
    deriv = np.polyder(coeffs)
    roots = np.roots(deriv)
    real = roots[np.isreal(roots)].real
    real = real[(real > x.min() * 0.9) & (real < x.max() * 1.1)]
    if real.size == 0:
        raise ValueError("E(V) has no minimum near the sampled volumes")
    # E(V) minimum: dE/dx = 0 with d2E/dx2 > 0 (x decreases monotonically with V)
    minima = real[np.polyval(np.polyder(deriv), real) > 0]
    if minima.size == 0:
        raise ValueError("E(V) has no minimum near the sampled volumes")
    x0 = minima[np.argmin(np.abs(minima - x.mean()))]
    v0 = x0 ** (-1.5)
    e0 = float(np.polyval(coeffs, x0))
    # B = V d2E/dV2 ; dx/dV = -2/3 V^(-5/3), d2x/dV2 = 10/9 V^(-8/3)
    d1 = np.polyval(deriv, x0)
    d2 = np.polyval(np.polyder(deriv), x0)
    d2e_dv2 = d2 * (2.0 / 3.0 * v0 ** (-5.0 / 3.0)) ** 2 + d1 * (10.0 / 9.0) * v0 ** (-8.0 / 3.0)
    return float(v0), e0, float(v0 * d2e_dv2)


def lattice_constant(
    build: Callable[[float], Atoms],
    a_ref: float,
    run: Callable[[Atoms], PwResult],
    strains: Sequence[float] = (-0.03, -0.015, 0.0, 0.015, 0.03),
) -> tuple[float, list[tuple[float, float]]]:
    """Equilibrium lattice constant from a Birch–Murnaghan fit of E(V) around ``a_ref``.

    ``build(a)`` returns the structure at lattice constant ``a``; ``run`` evaluates it. Returns
    ``(a0, [(a, E_Ry), ...])``. Raises when the minimum falls outside the sampled range.
    """
    points: list[tuple[float, float]] = []
    volumes: list[float] = []
    for s in strains:
        a = a_ref * (1.0 + s)
        atoms = build(a)
        points.append((a, run(atoms).energy_ry))
        volumes.append(atoms.get_volume())
    v0, _, _ = fit_birch_murnaghan(volumes, [e for _, e in points])
    a_values = [a for a, _ in points]
    # a scales as V^(1/3) for a fixed cell shape
    a0 = a_values[0] * (v0 / volumes[0]) ** (1.0 / 3.0)
    if not min(a_values) <= a0 <= max(a_values):
        raise ValueError(f"fitted a0 = {a0:.4f} outside the sampled range {min(a_values)}–{max(a_values)}")
    return float(a0), points
