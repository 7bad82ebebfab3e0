"""Make ``tiny.xyz``: a few small molecules labelled by real ``pw.x`` runs (no AiiDA).

The set mixes total charges of the *same* geometries (NaCl dimers and water in the charge states
-1, 0, +1) so that a model blind to the total charge (``sr``) cannot fit the energies while a head
with Σq = Q can. Each structure is a molecule in an open box: ``pw.x`` runs with Martyna–Tuckerman
isolation (``assume_isolated='mt'``) and the stored ``Atoms`` are non-periodic (``pbc=False``).

Pseudopotentials come from the project's ``ld1.x`` family (:func:`generate_family`). Labels use the
keys of :mod:`aiida_emlip.schema`: ``energy`` (eV), ``forces`` (eV/Å), ``total_charge`` (e),
``config_type``. Usage::

    python tests/data/make_tiny_dataset.py [--out tests/data/tiny.xyz] [--workers 1]

Runtime: about one minute on one core (58 s measured for the 22 structures shipped).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.build import molecule

from aiida_emlip import schema
from aiida_emlip.pseudos.generate import generate_family
from aiida_emlip.pseudos.pwtools import RY_EV, run_pw

BOX = 9.0  # Å, cubic box; MT isolation needs about twice the molecule's extent
ECUTWFC = 25.0  # Ry, deliberately low: labels only need to be self-consistent, not converged
BOHR = schema.BOHR_IN_A


def structures(seed: int = 7) -> list[Atoms]:
    """The configurations: rattled water/hydroxide/hydronium and NaCl dimers in three charge states."""
    rng = np.random.default_rng(seed)
    out: list[Atoms] = []

    def add(atoms: Atoms, charge: float, tag: str) -> None:
        atoms = atoms.copy()
        atoms.info = {schema.TOTAL_CHARGE: float(charge), schema.CONFIG_TYPE: tag}
        out.append(atoms)

    for i in range(3):
        water = molecule("H2O")
        water.positions += rng.normal(scale=0.06, size=water.positions.shape)
        for charge in (0, -1, 1) if i < 2 else (0,):
            add(water, charge, "water")
    for _ in range(3):
        oh = Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97 + rng.normal(scale=0.04)]])
        oh.positions += rng.normal(scale=0.03, size=oh.positions.shape)
        add(oh, -1, "hydroxide")
    for _ in range(3):
        h3o = molecule("H2O")
        h3o += Atoms("H", positions=[[0.0, 0.0, 0.98]])
        h3o.positions += rng.normal(scale=0.05, size=h3o.positions.shape)
        add(h3o, 1, "hydronium")
    for distance in (2.2, 2.4, 2.7):
        dimer = Atoms("NaCl", positions=[[0, 0, 0], [0, 0, distance]])
        dimer.positions += rng.normal(scale=0.02, size=dimer.positions.shape)
        for charge in (0, -1, 1):
            add(dimer, charge, "nacl")
    return out


def label(atoms: Atoms, pseudo_dir: str) -> Atoms:
    """Run ``pw.x`` on ``atoms`` (centred in the box) and return a labelled, non-periodic copy."""
    boxed = atoms.copy()
    boxed.set_cell([BOX, BOX, BOX])
    boxed.pbc = True
    boxed.center()
    pseudos = {s: Path(pseudo_dir) / f"{s}.pbe-emlip.UPF" for s in set(atoms.get_chemical_symbols())}
    extra = {"assume_isolated": "mt", "tot_charge": float(atoms.info[schema.TOTAL_CHARGE])}
    result = run_pw(boxed, pseudos, ECUTWFC, kpts=None, smearing=0.01, extra=extra)
    labelled = boxed.copy()
    labelled.pbc = False
    labelled.set_cell(np.zeros((3, 3)))
    labelled.info = dict(atoms.info)
    labelled.info[schema.ENERGY] = result.energy_ry * RY_EV
    labelled.arrays[schema.FORCES] = result.forces * RY_EV / BOHR
    return labelled


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("tiny.xyz"))
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    pseudo_dir = Path(tempfile.mkdtemp(prefix="emlip-tiny-upf-"))
    generate_family(pseudo_dir, elements=["H", "O", "Na", "Cl"])
    configs = structures()
    with ProcessPoolExecutor(args.workers) as pool:
        labelled = list(pool.map(label, configs, [str(pseudo_dir)] * len(configs)))
    # extxyz keeps info keys by name; energy/forces stay plain keys (no calculator).
    ase.io.write(args.out, labelled, format="extxyz")
    elapsed = time.perf_counter() - start
    print(f"wrote {len(labelled)} structures to {args.out} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
