"""Read and write schema-keyed extxyz (no AiiDA import).

ASE's extxyz reader moves ``energy``, ``forces``, ``stress``, ``dipole``, ... into a
``SinglePointCalculator``; :func:`read_frames` moves them back into ``atoms.info`` / ``atoms.arrays``
under the schema keys, with stress as a 3×3 matrix in ASE's sign convention.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
from ase import Atoms
from ase.io import read, write
from ase.stress import voigt_6_to_full_3x3_stress

from aiida_emlip import schema


def _detach(atoms: Atoms) -> Atoms:
    calc = atoms.calc
    atoms.calc = None
    if calc is None:
        return atoms
    for key, value in calc.results.items():
        value = np.asarray(value) if not np.isscalar(value) else value
        if key == schema.STRESS and np.shape(value) == (6,):
            value = voigt_6_to_full_3x3_stress(value)
        label = schema.LABELS.get(key)
        if (label is not None and label.scope == "atom") or (
            label is None and np.ndim(value) >= 1 and len(value) == len(atoms) and len(atoms) > 3
        ):
            atoms.arrays[key] = np.asarray(value)
        else:
            atoms.info[key] = value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value
    return atoms


#: ASE bookkeeping arrays that are not labels; dropped on write.
IGNORED_ARRAYS = frozenset({"numbers", "positions", "masses", "tags", "momenta", "initial_magmoms"})


def _normalise(atoms: Atoms) -> Atoms:
    """Copy ``atoms`` without calculator (ASE bookkeeping arrays dropped), with schema-shaped values."""
    out = Atoms(atoms.get_chemical_symbols(), positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    for key, value in atoms.info.items():
        label = schema.LABELS.get(key)
        if label is not None and label.shape:
            value = np.asarray(value, dtype=float).reshape(label.shape)
        out.info[key] = value
    for key, value in atoms.arrays.items():
        if key in IGNORED_ARRAYS:
            continue
        out.arrays[key] = np.array(value)
    if atoms.calc is not None:  # labels held by a calculator become schema keys
        tmp = atoms.copy()
        tmp.calc = atoms.calc
        _detach(tmp)
        for key, value in tmp.info.items():
            out.info.setdefault(key, value)
        for key, value in tmp.arrays.items():
            if key not in out.arrays:
                out.arrays[key] = value
    return out


def _canonical_order(keys: Iterable[str]) -> list[str]:
    order = list(schema.LABELS)
    return sorted(keys, key=lambda k: (0, order.index(k), "") if k in schema.LABELS else (1, 0, k))


def frames_to_text(frames: Iterable[Atoms]) -> str:
    """Return the extxyz text of ``frames`` (stress as a 3×3 ``stress`` info entry)."""
    handle = io.StringIO()
    prepared = []
    for atoms in frames:
        copy = _normalise(atoms)
        if schema.STRESS in copy.info:
            copy.info[schema.STRESS] = np.asarray(copy.info[schema.STRESS], dtype=float).reshape(3, 3)
        copy.info = {k: copy.info[k] for k in _canonical_order(copy.info)}
        arrays = {k: copy.arrays[k] for k in ("numbers", "positions")}
        for key in _canonical_order(set(copy.arrays) - set(arrays)):
            # extxyz holds per-atom rows only: tensors per atom (e.g. Born charges) are flattened
            value = copy.arrays[key]
            arrays[key] = value.reshape(len(copy), -1) if value.ndim > 2 else value
        copy.arrays = arrays
        prepared.append(copy)
    write(handle, prepared, format="extxyz", write_results=False)
    return handle.getvalue()


def text_to_frames(text: str) -> list[Atoms]:
    """Parse extxyz ``text`` into ``Atoms`` with every label under its schema key (no calculator)."""
    if not text.strip():
        return []
    frames = read(io.StringIO(text), index=":", format="extxyz")
    out = []
    for atoms in frames:
        _detach(atoms)
        for key, value in list(atoms.info.items()):
            label = schema.LABELS.get(key)
            if label is not None and label.shape and not isinstance(value, str):
                atoms.info[key] = np.asarray(value, dtype=float).reshape(label.shape)
            elif isinstance(value, np.generic):
                atoms.info[key] = value.item()
        for key, value in list(atoms.arrays.items()):
            label = schema.LABELS.get(key)
            if label is not None and label.scope == "atom" and len(label.shape) > 1:
                atoms.arrays[key] = np.asarray(value, dtype=float).reshape(len(atoms), *label.shape)
        out.append(atoms)
    return out
