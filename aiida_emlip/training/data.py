"""Datasets from extxyz: labels by schema key, unit checks, deterministic splits, batches, E0 fit."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols

from aiida_emlip import schema
from aiida_emlip.extxyz import labels_from_calculator, read_frames, stress_matrix
from aiida_emlip.models.graph import Graph, build_graph
from aiida_emlip.structures.geometry import min_interatomic_distance
from aiida_emlip.training.config import ENERGY_UNITS, LENGTH_UNITS, VECTOR_ORDERS, DataConfig
from aiida_emlip.training.dipole_charges import dipole_preserving_charges
from aiida_emlip.training.errors import DataError, NonFiniteError, ReferenceEnergyWarning

#: Labels a structure may carry (schema keys), in the order they are stored.
STRUCTURE_LABELS = (schema.ENERGY, schema.STRESS, schema.DIPOLE, schema.FERMI_LEVEL, schema.POLARIZABILITY)
ATOM_LABELS = (schema.FORCES, schema.CHARGES, schema.ATOMIC_DIPOLES)
#: Conditions (model inputs) read from ``atoms.info``.
CONDITIONS = (schema.TOTAL_CHARGE, schema.TOTAL_SPIN, schema.FERMI_LEVEL, schema.EXTERNAL_FIELD)
#: Atoms closer than this (Å, minimum image) overlap: a broken structure, refused on reading.
MIN_DISTANCE = 0.5


@dataclass
class Sample:
    """One structure: its atoms (in eV/Å units), its labels and its group tags."""

    atoms: Atoms
    labels: dict[str, np.ndarray]
    config_type: str
    total_charge: float
    index: int
    graph: Graph | None = None
    #: What the structure's Fermi level is measured from (``fermi_reference``), where it has one.
    fermi_reference: str | None = None


def _raw_value(atoms: Atoms, key: str) -> np.ndarray | None:
    """A label from ``atoms.info`` / ``atoms.arrays`` (read by :mod:`aiida_emlip.extxyz`)."""
    if key in atoms.info:
        return np.asarray(atoms.info[key], dtype=np.float64)
    if key in atoms.arrays:
        return np.asarray(atoms.arrays[key], dtype=np.float64)
    return None


def _mapped_value(atoms: Atoms, key: str, keys: dict) -> np.ndarray | None:
    """The label ``key`` under its configured file key, or columns of a per-atom array (``data.keys``)."""
    spec = keys.get(key, key)
    if isinstance(spec, str):
        return _raw_value(atoms, spec)
    raw = _raw_value(atoms, spec["key"])
    if raw is None:
        return None
    columns = spec["columns"] if isinstance(spec["columns"], list) else [spec["columns"]]
    table = raw.reshape(len(atoms), -1)
    if max(columns) >= table.shape[1]:
        raise DataError(
            f"data.keys.{key}: column {max(columns)} requested, "
            f"but {spec['key']!r} has {table.shape[1]} column(s)"
        )
    picked = table[:, columns]
    if len(columns) == 3:
        picked = picked[:, list(VECTOR_ORDERS[spec.get("order", "xyz")])]
    return picked


def file_key(key: str, keys: dict) -> str:
    """How ``key`` is looked up in the file, for messages."""
    spec = keys.get(key, key)
    return spec if isinstance(spec, str) else f"{spec['key']}[{spec['columns']}]"


def read_structures(path: str | Path) -> list[Atoms]:
    """Every frame of an extxyz file, labels under schema keys (:func:`aiida_emlip.extxyz.read_frames`,
    the reader of the ``emlip.dataset`` node too); clear errors for missing, empty or unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"dataset {path} is empty")
    try:
        frames = read_frames(path)
    except Exception as exc:  # ASE raises many types for malformed files
        raise DataError(f"cannot read {path} as extxyz: {exc}") from None
    if not frames:
        raise DataError(f"dataset {path} holds no structures")
    return frames


def to_sample(atoms: Atoms, index: int, config: DataConfig, where: str) -> Sample:
    """Pull labels and conditions out of ``atoms`` under their configured keys; convert and check units."""
    e_unit = ENERGY_UNITS[config.energy_unit]
    l_unit = LENGTH_UNITS[config.length_unit]
    scale = {
        schema.ENERGY: e_unit,
        schema.FORCES: e_unit / l_unit,
        schema.STRESS: e_unit / l_unit**3,
        schema.CHARGES: 1.0,
        schema.ATOMIC_DIPOLES: l_unit,
        schema.DIPOLE: l_unit,
        schema.FERMI_LEVEL: e_unit,
        schema.POLARIZABILITY: l_unit**2,
    }
    atoms = atoms.copy() if atoms.calc is None else labels_from_calculator(_with_calc(atoms))
    if l_unit != 1.0:
        atoms.positions *= l_unit
        atoms.set_cell(atoms.cell.array * l_unit)
    name = f"{where}, structure {index}"
    if not np.isfinite(atoms.positions).all():
        raise NonFiniteError(f"{name}: non-finite atomic positions")
    check_no_overlap(atoms, name)
    labels: dict[str, np.ndarray] = {}
    for key in (*STRUCTURE_LABELS, *ATOM_LABELS):
        value = _mapped_value(atoms, key, config.keys)
        if value is None:
            continue
        expected = schema.label(key).shape
        if schema.label(key).scope == "atom":
            expected = (len(atoms), *expected)
        if key == schema.STRESS and value.size in (6, 9):
            value = stress_matrix(value)
        if value.size == math.prod(expected):
            value = value.reshape(expected)
        else:
            raise DataError(f"{name}: label {key!r} has shape {value.shape}, expected {expected}")
        if not np.isfinite(value).all():
            raise NonFiniteError(f"{name}: label {key!r} contains NaN or inf")
        labels[key] = value * scale[key]
    if config.charges_from_dipoles:
        if schema.CHARGES not in labels or schema.ATOMIC_DIPOLES not in labels:
            raise DataError(f"{name}: data.charges_from_dipoles needs reference charges and atomic dipoles")
        projected = dipole_preserving_charges(atoms, labels[schema.CHARGES], labels[schema.ATOMIC_DIPOLES])
        labels[schema.CHARGES] = projected.charges
        # what moved onto the charges leaves the dipoles: a head with atomic dipoles would count it twice
        labels[schema.ATOMIC_DIPOLES] = projected.lost_dipole
    info = {}
    for key in CONDITIONS:
        name_in_file = config.keys.get(key, key)
        if name_in_file in atoms.info:
            info[key] = _condition(atoms.info[name_in_file], key, name)
    if schema.FERMI_LEVEL in info:
        info[schema.FERMI_LEVEL] = float(info[schema.FERMI_LEVEL]) * e_unit
    config_type = str(atoms.info.get(config.keys.get(schema.CONFIG_TYPE, schema.CONFIG_TYPE), "default"))
    clean = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    clean.info.update(info)
    charge = float(info.get(schema.TOTAL_CHARGE, 0.0))
    _check_plausible(labels, config, name)
    reference = None
    if schema.FERMI_LEVEL in info or schema.FERMI_LEVEL in labels:
        given = atoms.info.get(config.keys.get(schema.FERMI_REFERENCE, schema.FERMI_REFERENCE))
        reference = None if given is None else str(given)
    return Sample(clean, labels, config_type, charge, index, fermi_reference=reference)


def check_no_overlap(atoms: Atoms, name: str, min_distance: float = MIN_DISTANCE) -> None:
    """Refuse (:class:`DataError`) a structure with two atoms closer than ``min_distance`` Å."""
    distance = min_interatomic_distance(atoms, cutoff=min_distance)
    if distance < min_distance:
        raise DataError(
            f"{name}: overlapping atoms, two are {distance:.3f} Å apart (minimum image; "
            f"the minimum is {min_distance} Å)"
        )


def _condition(value: object, key: str, name: str) -> float | np.ndarray:
    """A model input from ``atoms.info`` (total charge, spin, Fermi level: numbers; field: 3-vector)."""
    shape = schema.label(key).shape
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{name}: {key} must be numeric, got {value!r}") from None
    if array.size != max(1, math.prod(shape)):
        raise DataError(f"{name}: {key} must have shape {shape or 'scalar'}, got {array.shape}")
    if not np.isfinite(array).all():
        raise NonFiniteError(f"{name}: {key} is not finite ({value!r})")
    return array.reshape(shape) if shape else float(array)


def _with_calc(atoms: Atoms) -> Atoms:
    copy = atoms.copy()
    copy.calc = atoms.calc
    return copy


def _check_plausible(labels: dict[str, np.ndarray], config: DataConfig, name: str) -> None:
    forces = labels.get(schema.FORCES)
    if forces is not None and forces.size and np.abs(forces).max() > config.max_force:
        raise DataError(
            f"{name}: |force| up to {np.abs(forces).max():.3g} eV/Å exceeds "
            f"data.max_force = {config.max_force}; "
            f"wrong units? Forces must be in eV/Å (set data.energy_unit / data.length_unit to convert)"
        )
    charges = labels.get(schema.CHARGES)
    if charges is not None and charges.size and np.abs(charges).max() > config.max_charge:
        raise DataError(f"{name}: |charge| above data.max_charge = {config.max_charge} e; wrong units?")


def load_samples(path: str | Path, config: DataConfig, required: Sequence[str] = ()) -> list[Sample]:
    """Read ``path`` into samples; every key in ``required`` must be present in every structure."""
    frames = read_structures(path)
    samples = [to_sample(atoms, i, config, str(path)) for i, atoms in enumerate(frames)]
    for key in required:
        missing = [s.index for s in samples if key not in s.labels]
        if missing:
            raise DataError(
                f"{path}: {len(missing)} structure(s) (first: {missing[0]}) lack the label {key!r} "
                f"(looked for {file_key(key, config.keys)!r} in atoms.info/arrays; map names with data.keys)"
            )
    return samples


def split(samples: list[Sample], fractions: Sequence[float], seed: int) -> list[list[Sample]]:
    """Split ``samples`` deterministically by ``seed``: parts of ``fractions``, then the rest."""
    order = np.random.default_rng(seed).permutation(len(samples))
    parts, start = [], 0
    for fraction in fractions:
        n = max(1, round(fraction * len(samples))) if fraction > 0 else 0
        parts.append([samples[i] for i in order[start : start + n]])
        start += n
    parts.append([samples[i] for i in order[start:]])
    return parts


def fit_reference_energies(samples: Sequence[Sample], elements: Sequence[str]) -> np.ndarray:
    """Per-element E0 (eV) by least squares of E ≈ Σ_Z n_Z E0_Z over structures with energies.

    The fit is made around the mean energy per atom (minimum-norm deviation), so that when the
    compositions do not determine every E0 (one stoichiometry throughout, or an element absent from
    these samples) the undetermined part stays at the mean energy per atom instead of an arbitrary
    value; a :class:`ReferenceEnergyWarning` then says so. With determined compositions this is the
    ordinary least-squares fit.
    """
    index = {e: i for i, e in enumerate(elements)}
    rows, energies = [], []
    for s in samples:
        if schema.ENERGY not in s.labels:
            continue
        counts = np.zeros(len(elements))
        for symbol in s.atoms.get_chemical_symbols():
            counts[index[symbol]] += 1
        rows.append(counts)
        energies.append(float(s.labels[schema.ENERGY]))
    if not rows:
        return np.zeros(len(elements))
    matrix, target = np.array(rows), np.array(energies)
    n_atoms = matrix.sum(axis=1)
    per_atom = float(np.mean(target / n_atoms))
    # least squares around the mean energy per atom: the minimum-norm deviation leaves every direction
    # the compositions do not determine (and every absent element) at the mean energy per atom
    deviation, *_ = np.linalg.lstsq(matrix, target - per_atom * n_atoms, rcond=None)
    solution = per_atom + deviation
    present = matrix.any(axis=0)
    n_present = int(present.sum())
    rank = int(np.linalg.matrix_rank(matrix[:, present]))
    problems = []
    if rank < n_present:
        problems.append(
            f"the compositions determine only {rank} combination(s) of the {n_present} elements' E0 "
            f"(the rest is set by the mean energy per atom, {per_atom:.4f} eV)"
        )
    absent = [e for e, p in zip(elements, present) if not p]
    if absent:
        problems.append(
            f"no training structure contains {', '.join(absent)} (E0 = the mean energy per atom, "
            f"{per_atom:.4f} eV)"
        )
    if problems:
        warnings.warn(
            "data.reference_energies 'fit': "
            + "; ".join(problems)
            + ". Give data.reference_energies {element: eV} (e.g. isolated-atom energies) for "
            "transferable E0.",
            ReferenceEnergyWarning,
            stacklevel=2,
        )
    return solution


def elements_of(samples: Sequence[Sample]) -> list[str]:
    """Chemical symbols present, ordered by atomic number."""
    numbers = sorted({int(z) for s in samples for z in s.atoms.numbers})
    return [chemical_symbols[z] for z in numbers]


@dataclass
class Batch:
    """A batch ready for the model: its graph, padded labels with presence masks, and group tags."""

    graph: Graph
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # [B] bool per structure
    num_atoms: torch.Tensor | None = None  # [B]
    config_types: list[str] = field(default_factory=list)
    total_charges: list[float] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)

    def to(self, device: torch.device) -> Batch:
        return replace(
            self,
            graph=self.graph.to(device),
            labels={k: v.to(device) for k, v in self.labels.items()},
            masks={k: v.to(device) for k, v in self.masks.items()},
            num_atoms=None if self.num_atoms is None else self.num_atoms.to(device),
        )


def attach_graphs(samples: Sequence[Sample], cutoff: float) -> None:
    """Build (once) each sample's single-structure graph in float64 on the CPU."""
    for s in samples:
        if s.graph is None:
            s.graph = build_graph([s.atoms], cutoff, torch.float64)


def collate(samples: Sequence[Sample], dtype: torch.dtype) -> Batch:
    """Concatenate single-structure graphs and stack labels; missing labels are zero with mask False."""
    graphs = [s.graph for s in samples]
    if any(g is None for g in graphs):
        raise RuntimeError("attach_graphs() must run before collate()")
    offsets = np.cumsum([0] + [g.num_atoms for g in graphs])
    graph = Graph(
        numbers=torch.cat([g.numbers for g in graphs]),
        positions=torch.cat([g.positions for g in graphs]),
        cell=torch.cat([g.cell for g in graphs]),
        pbc=torch.cat([g.pbc for g in graphs]),
        batch=torch.cat([torch.full_like(g.batch, b) for b, g in enumerate(graphs)]),
        ptr=torch.as_tensor(offsets, dtype=torch.long),
        edge_index=torch.cat([g.edge_index + int(o) for g, o in zip(graphs, offsets)], dim=1),
        unit_shifts=torch.cat([g.unit_shifts for g in graphs]),
        total_charge=torch.cat([g.total_charge for g in graphs]),
        total_spin=torch.cat([g.total_spin for g in graphs]),
        fermi_level=torch.cat([g.fermi_level for g in graphs]),
        external_field=torch.cat([g.external_field for g in graphs]),
    ).to(dtype=dtype)
    batch = Batch(graph=graph)
    batch.num_atoms = torch.tensor([g.num_atoms for g in graphs], dtype=dtype)
    for key in (*STRUCTURE_LABELS, *ATOM_LABELS):
        present = [key in s.labels for s in samples]
        if not any(present):
            continue
        shape = schema.label(key).shape
        parts = []
        for s, g in zip(samples, graphs):
            if key in s.labels:
                parts.append(torch.as_tensor(s.labels[key], dtype=dtype))
            elif schema.label(key).scope == "atom":
                parts.append(torch.zeros((g.num_atoms, *shape), dtype=dtype))
            else:
                parts.append(torch.zeros(shape, dtype=dtype))
        scope = schema.label(key).scope
        batch.labels[key] = torch.cat(parts) if scope == "atom" else torch.stack(parts)
        batch.masks[key] = torch.tensor(present)
    batch.config_types = [s.config_type for s in samples]
    batch.total_charges = [s.total_charge for s in samples]
    batch.indices = [s.index for s in samples]
    return batch


def batches(
    samples: Sequence[Sample],
    batch_size: int,
    dtype: torch.dtype,
    shuffle_seed: int | None = None,
) -> Iterator[Batch]:
    """Yield batches in a fixed order, or shuffled by ``shuffle_seed`` (deterministic, no global RNG)."""
    order = list(range(len(samples)))
    if shuffle_seed is not None:
        generator = torch.Generator().manual_seed(shuffle_seed)
        order = torch.randperm(len(samples), generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        yield collate([samples[i] for i in order[start : start + batch_size]], dtype)


def num_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size
