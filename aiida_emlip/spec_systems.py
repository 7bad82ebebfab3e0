"""The ``systems`` of a study spec as ASE configurations (pure: no AiiDA).

A structure block is exactly one of::

    {bulk: NaCl, crystalstructure: rocksalt, a: 5.64, cubic: true}   # ase.build.bulk
    {molecule: H2O, box: 9.0}                                         # ASE g2 molecule in a cubic box
    {atoms: {symbols: [...], positions: [[...]], cell: [[...]], pbc: [true, true, true]}}
    {file: host.cif}                                                  # read by ASE, relative to the spec

A system takes the structure (optionally repeated by ``supercell``), runs an optional ``sampler``
recipe of :mod:`aiida_emlip.workflows.samplers` on it, makes ``rattle.n`` seeded rattled copies of every
geometry, and labels each geometry in every total charge of ``charges``. Configuration keys are
``<system>_<geometry:03d>_q<charge>`` and their ``config_type`` is the system name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from aiida_emlip import schema

STRUCTURE_KINDS = ("bulk", "molecule", "atoms", "file")
BULK_KEYS = ("bulk", "crystalstructure", "a", "c", "cubic", "orthorhombic")
MOLECULE_KEYS = ("molecule", "box")
DEFAULT_BOX = 9.0

Problems = list[tuple[tuple[Any, ...], str]]


def charge_tag(charge: float) -> str:
    """``-1`` → ``m1``, ``0`` → ``0``, ``2`` → ``p2`` (``0.5`` → ``p0.5``)."""
    text = f"{abs(charge):g}"
    return "0" if charge == 0 else ("m" if charge < 0 else "p") + text


def check_structure(block: Any, path: tuple[Any, ...]) -> Problems:
    """Problems of a structure block (before :func:`build_structure` is called on it)."""
    if not isinstance(block, dict):
        return [(path, f"a structure block is a mapping with one of {', '.join(STRUCTURE_KINDS)}")]
    kinds = [k for k in STRUCTURE_KINDS if k in block]
    if len(kinds) != 1:
        return [(path, f"give exactly one of {', '.join(STRUCTURE_KINDS)} (got {kinds or 'none'})")]
    allowed = {"bulk": BULK_KEYS, "molecule": MOLECULE_KEYS, "atoms": ("atoms",), "file": ("file",)}
    unknown = sorted(set(block) - set(allowed[kinds[0]]), key=str)
    if unknown:
        return [((*path, key), f"unknown key for a {kinds[0]} structure") for key in unknown]
    try:
        build_structure(block)
    except Exception as exc:
        return [((*path, kinds[0]), f"cannot build the structure: {exc}")]
    return []


def build_structure(block: dict[str, Any], base_dir: Path | None = None) -> Atoms:
    """The ``Atoms`` of a structure block (see the module docstring)."""
    if "bulk" in block:
        from ase.build import bulk

        kwargs = {k: block[k] for k in BULK_KEYS[1:] if k in block}
        return bulk(str(block["bulk"]), **kwargs)
    if "molecule" in block:
        from ase.build import molecule

        atoms = molecule(str(block["molecule"]))
        box = float(block.get("box", DEFAULT_BOX))
        atoms.set_cell([box, box, box])
        atoms.pbc = True
        atoms.center()
        return atoms
    if "atoms" in block:
        values = block["atoms"]
        if not isinstance(values, dict) or not {"symbols", "positions"} <= set(values):
            raise ValueError("atoms needs symbols and positions (and cell, pbc)")
        return Atoms(
            values["symbols"],
            positions=np.asarray(values["positions"], dtype=float),
            cell=np.asarray(values.get("cell", np.zeros((3, 3))), dtype=float),
            pbc=values.get("pbc", True),
        )
    if "file" in block:
        from ase.io import read

        path = Path(block["file"])
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return read(path)
    raise ValueError(f"a structure block needs one of {', '.join(STRUCTURE_KINDS)}")


def inline_structure(block: dict[str, Any], base_dir: Path | None = None) -> dict[str, Any]:
    """A ``file`` block as an ``atoms`` block (the spec stored with a study must not point at files)."""
    if "file" not in block:
        return block
    atoms = build_structure(block, base_dir)
    return {
        "atoms": {
            "symbols": atoms.get_chemical_symbols(),
            "positions": atoms.positions.tolist(),
            "cell": np.asarray(atoms.cell[:]).tolist(),
            "pbc": [bool(p) for p in atoms.pbc],
        }
    }


def _rattled(atoms: Atoms, n: int, stdev: float, rng: np.random.Generator) -> list[Atoms]:
    out = []
    for _ in range(n):
        frame = atoms.copy()
        frame.positions = frame.positions + rng.normal(0.0, stdev, size=frame.positions.shape)
        out.append(frame)
    return out


def system_frames(name: str, system: dict[str, Any]) -> list[tuple[str, str, Atoms]]:
    """``(key, geometry, atoms)`` of every configuration of a (checked) system block, in order.

    ``atoms.info`` holds ``total_charge`` and ``config_type``; the geometry is shared by the
    configurations that differ only in their total charge (the split keeps them together).
    """
    from aiida_emlip.workflows.samplers import run_recipe

    seed = int(system.get("seed", 0))
    base = build_structure(system["structure"]) if "structure" in system else None
    if base is not None and system.get("supercell"):
        base = base.repeat(tuple(int(n) for n in system["supercell"]))
    geometries = run_recipe(system["sampler"], base) if system.get("sampler") else [base]
    rattle = system.get("rattle")
    if rattle:
        rng = np.random.default_rng(seed)
        geometries = [
            frame
            for geometry in geometries
            for frame in _rattled(geometry, int(rattle.get("n", 1)), float(rattle.get("stdev", 0.05)), rng)
        ]
    out = []
    for index, geometry in enumerate(geometries):
        charges = system.get("charges")
        if charges is None:
            charges = [float(geometry.info.get(schema.TOTAL_CHARGE, 0.0))]
        label = f"{name}_{index:03d}"
        for charge in charges:
            atoms = Atoms(
                geometry.get_chemical_symbols(),
                positions=geometry.positions,
                cell=geometry.cell,
                pbc=geometry.pbc,
            )
            atoms.info[schema.TOTAL_CHARGE] = float(charge)
            atoms.info[schema.CONFIG_TYPE] = name
            out.append((f"{label}_q{charge_tag(float(charge))}", label, atoms))
    return out
