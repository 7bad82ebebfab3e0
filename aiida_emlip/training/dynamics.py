"""Relaxation and molecular dynamics of one structure with ASE and the model's calculator."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.constraints import FixAtoms
from ase.filters import FrechetCellFilter
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS, FIRE

from aiida_emlip.extxyz import stress_matrix
from aiida_emlip.models.calculator import EmlipCalculator, NonFinitePredictionError
from aiida_emlip.training.errors import DataError
from aiida_emlip.training.eval_params import Constraints, MDOptions, RelaxOptions

try:  # ASE >= 3.29
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # older ASE
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

OPTIMIZERS = {"FIRE": FIRE, "BFGS": BFGS}
#: Calculator result → prediction key (as in :data:`aiida_emlip.training.evaluate.PER_ATOM` etc.).
RESULT_KEYS = {
    "energy": "energy",
    "forces": "forces",
    "charges": "charges",
    "atomic_dipoles": "dipoles",
    "dipole": "dipole",
    "fermi_level": "fermi_level",
}


@dataclass
class Frame:
    """A snapshot of a trajectory: geometry, the model's outputs there and bookkeeping values."""

    atoms: Atoms
    values: dict[str, np.ndarray]
    meta: dict[str, Any]


@dataclass
class DynamicsResult:
    """Outcome of a relaxation or an MD run of one structure."""

    atoms: Atoms  # final geometry, without calculator and constraints; conditions kept in info
    frames: list[Frame] = field(default_factory=list)
    steps: int = 0
    scf_converged: bool | None = None  # None: the head is not iterative; False if any step failed
    scf_iterations: int | None = None  # the most iterations any step needed
    finite: bool = True
    non_finite: tuple[str, ...] = ()  # the outputs that were NaN/inf at the step that stopped the run
    stop_reason: str | None = None
    relax: dict[str, Any] | None = None
    md: dict[str, Any] | None = None
    final_meta: dict[str, Any] = field(default_factory=dict)


def check_structure(atoms: Atoms, constraints: Constraints, relax_cell: bool, where: str) -> list[int]:
    """The fixed atoms of ``atoms``; refuses what cannot run (before any compute)."""
    if relax_cell and not atoms.pbc.all():
        raise DataError(f"{where}: relax_cell needs a structure periodic in all three directions")
    fixed = constraints.fixed_atoms(atoms, where)
    if len(fixed) == len(atoms):
        raise DataError(f"{where}: the constraints fix every atom ({len(atoms)}); nothing can move")
    return fixed


def _prepare(atoms: Atoms, calc: EmlipCalculator, fixed: list[int]) -> Atoms:
    work = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    work.info.update(atoms.info)
    if fixed:
        work.set_constraint(FixAtoms(indices=fixed))
    work.calc = calc
    return work


class _Tracker:
    """Reads the calculator after every step: outputs for frames, SCF flags; records a NaN/inf stop."""

    def __init__(self, work: Atoms, calc: EmlipCalculator, result: DynamicsResult) -> None:
        self.work, self.calc, self.result = work, calc, result

    def check(self) -> bool:
        """Record the SCF flags of the last evaluation; False when the run must stop."""
        results = self.calc.results
        if "converged" in results:
            ok = bool(results["converged"])
            self.result.scf_converged = (
                ok if self.result.scf_converged is None else self.result.scf_converged and ok
            )
            iterations = int(results.get("iterations", 0))
            self.result.scf_iterations = max(self.result.scf_iterations or 0, iterations)
            if not ok:
                self.result.stop_reason = "the SCF of a self-consistent head did not converge"
                return False
        return True

    def stopped(self, exc: NonFinitePredictionError) -> None:
        """The calculator refused a NaN/inf prediction: the run ends there, not finite."""
        self.result.finite = False
        self.result.non_finite = exc.quantities
        self.result.stop_reason = str(exc)

    def frame(self, meta: dict[str, Any]) -> Frame:
        results = self.calc.results
        values = {
            key: np.asarray(results[name], dtype=float)
            for name, key in RESULT_KEYS.items()
            if name in results
        }
        if "stress" in results:
            values["stress"] = stress_matrix(results["stress"])
        atoms = Atoms(self.work.numbers, self.work.positions, cell=self.work.cell, pbc=self.work.pbc)
        atoms.info.update(self.work.info)
        meta = dict(meta)
        if "converged" in results:  # every frame says whether its own SCF converged
            meta["scf_converged"] = bool(results["converged"])
            meta["scf_iterations"] = int(results.get("iterations", 0))
        return Frame(atoms, values, meta)

    def final_atoms(self) -> Atoms:
        atoms = Atoms(self.work.numbers, self.work.positions, cell=self.work.cell, pbc=self.work.pbc)
        atoms.info.update(self.work.info)
        return atoms


def _fmax(target: Any) -> float:
    forces = target.get_forces()
    return float(np.sqrt((forces**2).sum(axis=1)).max()) if len(forces) else 0.0


def relax(
    atoms: Atoms, calc: EmlipCalculator, options: RelaxOptions, constraints: Constraints, where: str
) -> DynamicsResult:
    """Minimise the energy (optionally with the cell) until max |F| < fmax or max_steps."""
    fixed = check_structure(atoms, constraints, options.relax_cell, where)
    work = _prepare(atoms, calc, fixed)
    target = FrechetCellFilter(work) if options.relax_cell else work
    optimizer = OPTIMIZERS[options.optimizer](target, logfile=None)
    result = DynamicsResult(atoms=atoms)
    tracker = _Tracker(work, calc, result)
    stride = options.trajectory_stride
    initial_energy = None
    converged = False
    last_recorded = -1
    try:
        for converged in optimizer.irun(fmax=options.fmax, steps=options.max_steps):
            step = optimizer.nsteps
            if initial_energy is None:
                initial_energy = float(calc.results["energy"])
            if not tracker.check():
                converged = False
                break
            if stride and step % stride == 0:
                result.frames.append(tracker.frame({"relax_steps": step}))
                last_recorded = step
    except NonFinitePredictionError as exc:
        tracker.stopped(exc)
        converged = False
    result.steps = optimizer.nsteps
    if stride and last_recorded != result.steps and result.finite:
        result.frames.append(tracker.frame({"relax_steps": result.steps}))
    ok = bool(converged) and result.stop_reason is None
    if not ok and result.stop_reason is None:
        result.stop_reason = f"max_steps = {options.max_steps} reached above fmax = {options.fmax:g} eV/Å"
    result.atoms = tracker.final_atoms()
    result.relax = {
        "converged": ok,
        "steps": result.steps,
        "fmax": _fmax(target) if result.finite else None,
        "initial_energy": initial_energy,
        "final_energy": float(calc.results["energy"]) if result.finite else None,
        "fixed_atoms": len(fixed),
    }
    result.final_meta = {"relax_converged": ok, "relax_steps": result.steps}
    return result


def molecular_dynamics(
    atoms: Atoms, calc: EmlipCalculator, options: MDOptions, constraints: Constraints, where: str
) -> DynamicsResult:
    """NVE (velocity Verlet) or Langevin NVT from Maxwell–Boltzmann velocities; energy drift by a fit."""
    fixed = check_structure(atoms, constraints, False, where)
    work = _prepare(atoms, calc, fixed)
    rng = np.random.default_rng(options.seed)
    if options.temperature_K > 0:
        thermalize_momenta(work, temperature_K=options.temperature_K, rng=rng)
        if not fixed:
            Stationary(work)
            if not work.pbc.any():
                ZeroRotation(work)
    timestep = options.timestep_fs * units.fs
    if options.ensemble == "nve":
        dynamics = VelocityVerlet(work, timestep=timestep, logfile=None)
    else:
        dynamics = Langevin(
            work,
            timestep,
            temperature_K=options.temperature_K,
            friction=options.friction / units.fs,
            fixcm=not fixed,
            rng=rng,
            logfile=None,
        )
    result = DynamicsResult(atoms=atoms)
    tracker = _Tracker(work, calc, result)
    times, totals, temperatures = [], [], []
    stride = options.trajectory_stride
    last_recorded = -1
    try:
        for _ in dynamics.irun(options.steps):
            step = dynamics.nsteps
            if not tracker.check():
                break
            time_fs = step * options.timestep_fs
            temperature = float(work.get_temperature())
            times.append(time_fs)
            totals.append(float(work.get_potential_energy()) + float(work.get_kinetic_energy()))
            temperatures.append(temperature)
            if stride and step % stride == 0:
                meta = {"md_step": step, "time_fs": time_fs, "temperature": temperature}
                result.frames.append(tracker.frame(meta))
                last_recorded = step
    except NonFinitePredictionError as exc:
        tracker.stopped(exc)
    result.steps = dynamics.nsteps
    time_fs = result.steps * options.timestep_fs
    temperature = float(work.get_temperature())
    result.final_meta = {"md_step": result.steps, "time_fs": time_fs, "temperature": temperature}
    if stride and last_recorded != result.steps and result.stop_reason is None:
        result.frames.append(tracker.frame(result.final_meta))
    drift = None
    if len(times) >= 2:
        slope = np.polyfit(np.asarray(times), np.asarray(totals), 1)[0]  # eV/fs
        drift = float(slope * 1000.0 / len(work))
    later = temperatures[len(temperatures) // 2 :] or [temperature]
    result.atoms = tracker.final_atoms()
    result.md = {
        "ensemble": options.ensemble,
        "steps": result.steps,
        "time_fs": time_fs,
        "energy_drift_eV_per_atom_per_ps": drift,
        "total_energy_initial": totals[0] if totals else None,
        "total_energy_final": totals[-1] if totals else None,
        "temperature_initial_K": temperatures[0] if temperatures else None,
        "temperature_mean_K": float(np.mean(temperatures)) if temperatures else None,
        "temperature_mean_second_half_K": float(np.mean(later)),
        "temperature_final_K": temperature,
        "fixed_atoms": len(fixed),
    }
    return result
