"""Batched atomic graphs built from ASE ``Atoms``, neighbour lists on the graph's device (no AiiDA)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from ase import Atoms

from aiida_emlip import schema
from aiida_emlip.models.neighbours import neighbour_list


@dataclass
class Graph:
    """A batch of structures as one disconnected graph.

    Edges follow MACE's convention: ``edge_index[0]`` is the sender ``s``, ``edge_index[1]`` the
    receiver ``r`` and the edge vector is ``r_r - r_s + unit_shifts @ cell``. Per-structure
    conditions come from ``atoms.info`` under the keys of :mod:`aiida_emlip.schema`.
    """

    numbers: torch.Tensor  # [N] atomic numbers
    positions: torch.Tensor  # [N, 3] Å
    cell: torch.Tensor  # [B, 3, 3] rows are lattice vectors, Å
    pbc: torch.Tensor  # [B, 3] bool
    batch: torch.Tensor  # [N] structure index of each atom
    ptr: torch.Tensor  # [B + 1] first atom of each structure
    edge_index: torch.Tensor  # [2, E]
    unit_shifts: torch.Tensor  # [E, 3] integer lattice shifts (stored as float)
    total_charge: torch.Tensor  # [B] e
    total_spin: torch.Tensor  # [B] μB
    fermi_level: torch.Tensor  # [B] eV, NaN where unknown
    external_field: torch.Tensor  # [B, 3] V/Å

    @property
    def num_graphs(self) -> int:
        return int(self.ptr.numel() - 1)

    @property
    def num_atoms(self) -> int:
        return int(self.numbers.numel())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Graph:
        """Move to ``device``; cast floating tensors to ``dtype``."""
        moved = {}
        for f in fields(self):
            value: torch.Tensor = getattr(self, f.name)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype=dtype)
            moved[f.name] = value.to(device=device) if device is not None else value
        return replace(self, **moved)

    def structures(self) -> Iterator[tuple[int, slice]]:
        """Yield ``(index, atom_slice)`` for each structure of the batch."""
        ptr = self.ptr.tolist()
        for b in range(self.num_graphs):
            yield b, slice(ptr[b], ptr[b + 1])

    def reverse_edges(self) -> torch.Tensor | None:
        """Index of each edge's reverse (receiver → sender, opposite shift), ``[E]``; None if one lacks it.

        A full neighbour list holds both directions of every pair, so per-pair quantities can be read
        out once per directed edge and antisymmetrised with this index.
        """
        sender, receiver = self.edge_index
        if sender.numel() == 0:
            return sender.clone()
        shifts = self.unit_shifts.round().long()
        span = int(shifts.abs().max()) if shifts.numel() else 0
        base = 2 * span + 1
        n = self.num_atoms

        def key(s: torch.Tensor, r: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
            code = ((shift[:, 0] + span) * base + shift[:, 1] + span) * base + shift[:, 2] + span
            return (s * n + r) * base**3 + code

        keys = key(sender, receiver, shifts)
        order = torch.argsort(keys)
        wanted = key(receiver, sender, -shifts)
        found = torch.searchsorted(keys[order], wanted).clamp(max=keys.numel() - 1)
        reverse = order[found]
        if not bool((keys[reverse] == wanted).all()):
            return None
        return reverse

    def edge_shifts(self, cell: torch.Tensor) -> torch.Tensor:
        """Cartesian lattice shift ``S·cell`` of each edge [E, 3] for (possibly strained) cells."""
        return torch.einsum("ei,eij->ej", self.unit_shifts, cell[self.batch[self.edge_index[0]]])

    def edge_vectors(self, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Edge vectors ``r_r - r_s + S·cell`` for (possibly strained) positions and cells."""
        sender, receiver = self.edge_index
        return positions[receiver] - positions[sender] + self.edge_shifts(cell)


def _info_float(atoms: Atoms, key: str, default: float) -> float:
    value = atoms.info.get(key, default)
    return float(default if value is None else value)


def _neighbours(atoms: Atoms, cutoff: float, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """Senders, receivers and lattice shifts of ``atoms`` within ``cutoff``, built on ``device``."""
    positions = torch.as_tensor(np.asarray(atoms.positions, dtype=np.float64), device=device)
    cell = torch.as_tensor(np.asarray(atoms.cell.array, dtype=np.float64), device=device)
    return neighbour_list(positions, cell, np.asarray(atoms.pbc, dtype=bool).tolist(), cutoff)


def external_field_of(atoms: Atoms) -> np.ndarray:
    """The applied field of ``atoms.info`` as a 3-vector in V/Å (zero when absent)."""
    field = atoms.info.get(schema.EXTERNAL_FIELD)
    if field is None:
        return np.zeros(3)
    field = np.asarray(field, dtype=np.float64).reshape(-1)
    if field.shape != (3,):
        raise ValueError(f"{schema.EXTERNAL_FIELD} must be a 3-vector in V/Å, got shape {field.shape}")
    return field


def build_graph(
    atoms_list: Sequence[Atoms] | Atoms,
    cutoff: float,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Graph:
    """Batch ``atoms_list`` into a :class:`Graph` with neighbours within ``cutoff`` (Å)."""
    if isinstance(atoms_list, Atoms):
        atoms_list = [atoms_list]
    if len(atoms_list) == 0:
        raise ValueError("cannot build a graph from an empty list of structures")
    senders, receivers, shifts, ptr = [], [], [], [0]
    for atoms in atoms_list:
        if len(atoms) == 0:
            raise ValueError("cannot build a graph for a structure with no atoms")
        i, j, s = _neighbours(atoms, cutoff, device)
        senders.append(i + ptr[-1])
        receivers.append(j + ptr[-1])
        shifts.append(s)
        ptr.append(ptr[-1] + len(atoms))
    n_atoms = [len(a) for a in atoms_list]

    def tensor(array, kind=dtype) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array), dtype=kind, device=device)

    return Graph(
        numbers=tensor(np.concatenate([a.numbers for a in atoms_list]), torch.long),
        positions=tensor(np.concatenate([a.positions for a in atoms_list])),
        cell=tensor(np.stack([a.cell.array for a in atoms_list])),
        pbc=tensor(np.stack([a.pbc for a in atoms_list]), torch.bool),
        batch=tensor(np.repeat(np.arange(len(atoms_list)), n_atoms), torch.long),
        ptr=tensor(ptr, torch.long),
        edge_index=torch.stack([torch.cat(senders), torch.cat(receivers)]),
        unit_shifts=torch.cat(shifts).to(dtype),
        total_charge=tensor([_info_float(a, schema.TOTAL_CHARGE, 0.0) for a in atoms_list]),
        total_spin=tensor([_info_float(a, schema.TOTAL_SPIN, 0.0) for a in atoms_list]),
        fermi_level=tensor([_info_float(a, schema.FERMI_LEVEL, float("nan")) for a in atoms_list]),
        external_field=tensor(np.stack([external_field_of(a) for a in atoms_list])),
    )
