"""Snapshots from Langevin molecular dynamics with any ASE calculator (later: the trained model)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from .records import tag


def md_snapshots(
    atoms: Atoms,
    calculator: Calculator | Callable[[], Calculator],
    n: int,
    interval: int = 10,
    temperature: float = 300.0,
    timestep: float = 0.5,
    friction: float = 0.02,
    seed: int = 0,
) -> list[Atoms]:
    """Run Langevin MD at ``temperature`` K and return ``n`` snapshots taken every ``interval`` steps.

    ``timestep`` in fs, ``friction`` in 1/fs. ``calculator`` is an ASE calculator or a factory of one.
    Velocities and the Langevin noise are drawn from ``seed``; the snapshots carry no labels.
    """
    system = atoms.copy()
    system.calc = (
        calculator() if callable(calculator) and not isinstance(calculator, Calculator) else calculator
    )
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(system, temperature_K=temperature, rng=rng)
    dyn = Langevin(
        system,
        timestep * units.fs,
        temperature_K=temperature,
        friction=friction / units.fs,
        rng=rng,
        fixcm=False,
    )
    charge = float(atoms.info.get("total_charge", 0.0))
    frames = []
    for i in range(n):
        dyn.run(interval)
        frame = Atoms(
            system.get_chemical_symbols(), positions=system.positions, cell=system.cell, pbc=system.pbc
        )
        params = {"step": (i + 1) * interval, "temperature": temperature, "timestep": timestep}
        frames.append(tag(frame, "md", seed, index=i, params=params, total_charge=charge))
    return frames
