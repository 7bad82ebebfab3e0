"""The one reader and writer of schema-keyed extxyz (no AiiDA, no torch): the ``emlip.dataset`` node,
``emlip-train``, ``emlip-eval`` and the parser of ``emlip.evaluate`` all read labels through it.

ASE's extxyz reader moves ``energy``, ``forces``, ``stress``, ``dipole``, ... into a
``SinglePointCalculator`` (stress there in Voigt form); :func:`text_to_frames` moves them back into
``atoms.info`` / ``atoms.arrays`` under the schema keys, with stress as a 3×3 matrix in ASE's sign
convention. A stress is accepted in either form: 3×3 (9 values, the extxyz convention) or Voigt (6
values ``xx yy zz yz xz xy``, which ASE's reader alone refuses); :func:`stress_matrix` is the one
conversion.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import read, write

from aiida_emlip import schema

__all__ = (
    "frames_to_text",
    "labels_from_calculator",
    "read_frames",
    "stress_matrix",
    "text_to_frames",
)

#: Calculator results of ASE that hold one row per atom (whatever the number of atoms).
ASE_PER_ATOM = frozenset({"forces", "stresses", "charges", "magmoms", "energies", "born_effective_charges"})
#: ASE bookkeeping arrays that are not labels; dropped on write.
IGNORED_ARRAYS = frozenset({"numbers", "positions", "masses", "tags", "momenta", "initial_magmoms"})


def stress_matrix(value: object) -> np.ndarray:
    """A stress as the symmetric 3×3 matrix: from Voigt (``xx yy zz yz xz xy``), 9 values or 3×3."""
    array = np.asarray(value, dtype=float)
    if array.size == 6:
        xx, yy, zz, yz, xz, xy = array.reshape(6)
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    if array.size == 9:
        return array.reshape(3, 3).copy()
    raise ValueError(f"a stress has 6 (Voigt) or 9 (3×3) values, got shape {array.shape}")


def labels_from_calculator(atoms: Atoms) -> Atoms:
    """Move the results of ``atoms.calc`` into ``atoms.info`` / ``atoms.arrays`` (in place; no calculator
    is left): per-atom results into arrays, the others into info, stress as a 3×3 matrix. An entry
    already in info or arrays is kept (it wins over the calculator's)."""
    calc = atoms.calc
    atoms.calc = None
    if calc is None:
        return atoms
    for key, value in calc.results.items():
        value = np.asarray(value) if not np.isscalar(value) else value
        if key == schema.STRESS:
            value = stress_matrix(value)
        label = schema.LABELS.get(key)
        per_atom = label.scope == "atom" if label is not None else key in ASE_PER_ATOM
        if label is None and not per_atom:  # another calculator's result: one row per atom or not
            per_atom = np.ndim(value) >= 1 and len(value) == len(atoms) and len(atoms) > 3
        if key in atoms.info or key in atoms.arrays:
            continue
        if per_atom:
            atoms.arrays[key] = np.asarray(value)
        else:
            atoms.info[key] = value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value
    return atoms


def _normalise(atoms: Atoms) -> Atoms:
    """Copy ``atoms`` without calculator (ASE bookkeeping arrays dropped), with schema-shaped values."""
    out = Atoms(atoms.get_chemical_symbols(), positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    for key, value in atoms.info.items():
        label = schema.LABELS.get(key)
        if key == schema.STRESS:
            value = stress_matrix(value)
        elif label is not None and label.shape:
            value = np.asarray(value, dtype=float).reshape(label.shape)
        out.info[key] = value
    for key, value in atoms.arrays.items():
        if key in IGNORED_ARRAYS:
            continue
        out.arrays[key] = np.array(value)
    if atoms.calc is not None:  # labels held by a calculator become schema keys
        tmp = atoms.copy()
        tmp.calc = atoms.calc
        labels_from_calculator(tmp)
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


#: ``stress=`` with its value in quotes, braces or brackets, in an extxyz comment line.
_STRESS_ENTRY = re.compile(r"""(?:(?<=\s)|^)stress=(?:"([^"]*)"|'([^']*)'|\{([^}]*)\}|\[([^\]]*)\])""")


def _full_stress_entry(match: re.Match[str]) -> str:
    raw = next(group for group in match.groups() if group is not None)
    numbers = raw.replace(",", " ").split()
    if len(numbers) != 6:
        return match.group(0)
    try:
        matrix = stress_matrix([float(x) for x in numbers])
    except ValueError:
        return match.group(0)  # not numbers: ASE reports the entry
    return 'stress="' + " ".join(repr(float(v)) for v in matrix.reshape(9)) + '"'


def _voigt_stress_to_full(text: str) -> str:
    """``text`` with every Voigt ``stress`` (6 values) of a comment line written as its 9 values."""
    if "stress=" not in text:
        return text
    lines = text.splitlines(keepends=True)
    i = 0
    while i + 1 < len(lines):
        try:
            n_atoms = int(lines[i].strip())
        except ValueError:
            break  # not a frame header: ASE's reader says what is wrong
        lines[i + 1] = _STRESS_ENTRY.sub(_full_stress_entry, lines[i + 1])
        i += n_atoms + 2
    return "".join(lines)


def _shaped(value: object, shape: tuple[int, ...], where: str) -> np.ndarray:
    array = np.asarray(value, dtype=float)
    if array.size != int(np.prod(shape, dtype=int)):
        raise ValueError(f"{where} has {array.size} value(s), expected shape {shape}")
    return array.reshape(shape)


def text_to_frames(text: str) -> list[Atoms]:
    """Parse extxyz ``text`` into ``Atoms`` with every label under its schema key (no calculator).

    A label of the wrong size is a ``ValueError`` naming the structure and the key.
    """
    if not text.strip():
        return []
    frames = read(io.StringIO(_voigt_stress_to_full(text)), index=":", format="extxyz")
    out = []
    for index, atoms in enumerate(frames):
        labels_from_calculator(atoms)
        for key, value in list(atoms.info.items()):
            label = schema.LABELS.get(key)
            if label is not None and label.shape and not isinstance(value, str):
                atoms.info[key] = _shaped(value, label.shape, f"structure {index}: {key!r}")
            elif isinstance(value, np.generic):
                atoms.info[key] = value.item()
        for key, value in list(atoms.arrays.items()):
            label = schema.LABELS.get(key)
            if label is not None and label.scope == "atom" and len(label.shape) > 1:
                where = f"structure {index}: per-atom {key!r}"
                atoms.arrays[key] = _shaped(value, (len(atoms), *label.shape), where)
        out.append(atoms)
    return out


def read_frames(path: str | Path) -> list[Atoms]:
    """The structures of the extxyz file at ``path``, labels under schema keys (:func:`text_to_frames`)."""
    return text_to_frames(Path(path).read_text())
