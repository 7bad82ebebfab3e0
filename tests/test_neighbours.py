"""Neighbour lists on the positions' device against ASE's own neighbour list."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.neighborlist import primitive_neighbor_list

from aiida_emlip.models import neighbours
from aiida_emlip.models.graph import build_graph
from aiida_emlip.models.neighbours import neighbour_list


def _triclinic() -> Atoms:
    atoms = bulk("NaCl", "rocksalt", 5.64).repeat((2, 2, 1))
    atoms.set_cell(atoms.cell.array @ np.array([[1.0, 0.0, 0.0], [0.35, 1.0, 0.0], [0.2, -0.3, 1.0]]), True)
    atoms.rattle(0.08, seed=3)
    return atoms


def _slab() -> Atoms:
    atoms = fcc111("Al", (2, 2, 3), vacuum=6.0)
    atoms.pbc = (True, True, False)
    return atoms


CASES = {
    "triclinic": _triclinic,
    "slab": _slab,
    "molecule": lambda: molecule("CH3CH2OH"),
    "small cell": lambda: bulk("Al", "fcc", 4.05),  # cell smaller than the cutoff: many images
}


def _pair_set(i, j, shifts) -> set[tuple[int, ...]]:
    return {(int(a), int(b), *map(int, s)) for a, b, s in zip(i, j, np.asarray(shifts), strict=True)}


def _ase_pairs(atoms: Atoms, cutoff: float) -> set[tuple[int, ...]]:
    i, j, shifts = primitive_neighbor_list(
        "ijS", atoms.pbc, atoms.cell.array, atoms.positions, cutoff, self_interaction=False
    )
    return _pair_set(i, j, shifts)


def _tensors(atoms: Atoms) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(atoms.positions), torch.tensor(atoms.cell.array)


@pytest.mark.parametrize("name", CASES)
def test_full_list_is_ase_list(name):
    atoms = CASES[name]()
    i, j, shifts = neighbour_list(*_tensors(atoms), atoms.pbc.tolist(), 4.5)
    assert i.dtype == j.dtype == shifts.dtype == torch.long
    expected = _ase_pairs(atoms, 4.5)
    assert len(expected) > 0
    assert _pair_set(i, j, shifts) == expected
    assert len(i) == len(expected)  # no pair twice


@pytest.mark.parametrize("name", CASES)
def test_half_list_holds_each_pair_once(name):
    atoms = CASES[name]()
    i, j, shifts = neighbour_list(*_tensors(atoms), atoms.pbc.tolist(), 4.5, full_list=False)
    half = _pair_set(i, j, shifts)
    mirrored = {(b, a, -s0, -s1, -s2) for a, b, s0, s1, s2 in half}
    assert not half & mirrored
    assert half | mirrored == _ase_pairs(atoms, 4.5)


def test_host_list_when_vesin_torch_is_missing(monkeypatch):
    atoms = _triclinic()
    on_device = neighbour_list(*_tensors(atoms), atoms.pbc.tolist(), 4.5)
    monkeypatch.setattr(neighbours, "vesin_torch", None)
    on_host = neighbour_list(*_tensors(atoms), atoms.pbc.tolist(), 4.5)
    for a, b in zip(on_device, on_host, strict=True):
        assert b.dtype == torch.long
        assert torch.equal(a, b)


def test_zero_volume_periodic_cell_is_refused():
    atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], cell=[4.0, 4.0, 0.0], pbc=True)
    with pytest.raises(ValueError, match="non-zero volume"):
        build_graph(atoms, 4.0)


def test_graph_edges_and_vectors():
    atoms = _triclinic()
    graph = build_graph(atoms, 4.5)
    sender, receiver = graph.edge_index
    assert _pair_set(sender, receiver, graph.unit_shifts.long()) == _ase_pairs(atoms, 4.5)
    _, _, vectors = primitive_neighbor_list(
        "ijD", atoms.pbc, atoms.cell.array, atoms.positions, 4.5, self_interaction=False
    )
    lengths = graph.edge_vectors(graph.positions, graph.cell).norm(dim=1)
    assert np.allclose(np.sort(lengths.numpy()), np.sort(np.linalg.norm(vectors, axis=1)), atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_built_on_cuda_equals_cpu():
    atoms = [_triclinic(), _slab(), molecule("H2O")]
    cpu = build_graph(atoms, 4.5)
    gpu = build_graph(atoms, 4.5, device="cuda")
    assert gpu.edge_index.is_cuda and gpu.unit_shifts.is_cuda
    assert _pair_set(*gpu.edge_index.cpu(), gpu.unit_shifts.cpu().long()) == _pair_set(
        *cpu.edge_index, cpu.unit_shifts.long()
    )
