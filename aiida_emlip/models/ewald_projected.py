"""The self-consistent heads' projected potentials of a batch's small periodic cells at once.

The batched iteration of the ``scf`` head needs, for every structure and every projection width ``w``,
the potential of Gaussian charges projected on Gaussians of width ``w``
(:class:`~aiida_emlip.models.coulomb_operator.CoulombOperator`): once as dense matrices (its steps)
and once, differentiably, for the charges it found (its implicit step); ``qeq``'s batched solve needs
the same at ``w = σ`` (its Coulomb matrix and ``A q*``). Structure by structure, each is a few small
tensor operations per width. Here the Ewald cells that can share a sum for every width
(:func:`~aiida_emlip.models.ewald_batch.shareable`: the same range separations, atom counts and
volumes within a binary order of magnitude) apply their kernels together
(:func:`~aiida_emlip.models.ewald_batch.kernel_potentials`); the others, and the slab terms, stay per
structure. The numbers are those of one operator per structure to rounding.
"""

from __future__ import annotations

import torch

from aiida_emlip.models.coulomb_operator import (
    ChargeKernel,
    CoulombOperator,
    DenseOperator,
    SlabTerm,
    pair_width,
)
from aiida_emlip.models.ewald_batch import kernel_potentials, padded, shareable


def width_groups(es, cells: torch.Tensor, pbc: torch.Tensor, ptr: torch.Tensor, widths) -> list[list[int]]:
    """Indices of the structures that share every width's Ewald sum, in groups of two or more."""
    pair_widths = [pair_width(es.config.sigma, float(w)) for w in widths]
    return shareable(es, cells, pbc, ptr, pair_widths)[0]


class _Group:
    """One group's padded positions, each width's kernels and each structure's slab term."""

    def __init__(self, es, indices, bounds, positions, cells, pbc, widths) -> None:
        self.indices = indices
        self.atoms = [slice(bounds[b], bounds[b + 1]) for b in indices]
        self.sizes = [a.stop - a.start for a in self.atoms]
        self.width = max(self.sizes)
        self.r = self.padded(positions)
        sigma = es.config.sigma
        self.kernels = [
            [
                ChargeKernel(es, positions[a], cells[b], "ewald", pair_width(sigma, float(w)))
                for b, a in zip(indices, self.atoms)
            ]
            for w in widths
        ]
        self.slabs = [
            SlabTerm(positions[a], cells[b], pbc[b], sigma) if es._slab_active(pbc[b]) else None
            for b, a in zip(indices, self.atoms)
        ]

    def padded(self, values: torch.Tensor) -> torch.Tensor:
        return padded(values, self.atoms, self.width)


def block_matrices(es, positions: torch.Tensor, cells: torch.Tensor, pbc: torch.Tensor, ptr, widths) -> list:
    """Each structure's dense projected-potential matrices ``[W, n, n]``, those of
    :class:`~aiida_emlip.models.coulomb_operator.DenseOperator` (column ``j``: the potentials of a
    unit charge on atom ``j``, slab term included), with autograd through the geometry; a group's unit
    charges are padded channels of one vectorised sum (:func:`group_blocks`)."""
    bounds = ptr.tolist()
    widths = [float(w) for w in widths]
    blocks = shared_blocks(es, positions, cells, pbc, ptr, widths)
    for b in range(len(bounds) - 1):
        if b not in blocks:
            atoms = slice(bounds[b], bounds[b + 1])
            blocks[b] = DenseOperator(
                CoulombOperator(es, positions[atoms], cells[b], pbc[b], widths)
            ).matrices
    return [blocks[b] for b in range(len(bounds) - 1)]


def shared_blocks(
    es, positions: torch.Tensor, cells: torch.Tensor, pbc: torch.Tensor, ptr, widths
) -> dict[int, torch.Tensor]:
    """:func:`block_matrices` of the structures that can share a sum (every group of
    :func:`width_groups`), by index; the others are the caller's."""
    blocks: dict[int, torch.Tensor] = {}
    for indices in width_groups(es, cells, pbc, ptr, widths):
        blocks.update(group_blocks(es, indices, positions, cells, pbc, ptr, widths))
    return blocks


def group_blocks(
    es, indices: list[int], positions: torch.Tensor, cells: torch.Tensor, pbc: torch.Tensor, ptr, widths
) -> dict[int, torch.Tensor]:
    """:func:`block_matrices` of the structures ``indices`` (one of :func:`width_groups`), by index."""
    widths = [float(w) for w in widths]
    group = _Group(es, indices, ptr.tolist(), positions, cells, pbc, widths)
    eye = positions.new_zeros((len(indices), group.width, group.width))
    for g, n in enumerate(group.sizes):
        eye[g, :n, :n] = torch.eye(n, dtype=positions.dtype, device=positions.device)
    per_width = [kernel_potentials(kernels, eye, group.r) for kernels in group.kernels]  # [G, A, A]
    blocks = {}
    for g, (b, n) in enumerate(zip(indices, group.sizes)):
        matrices = torch.stack([phi[g, :n, :n] for phi in per_width])
        if group.slabs[g] is not None:
            unit = eye[g, :n, :n]
            matrices = matrices + torch.stack([group.slabs[g].potential(unit, w**2, None) for w in widths])
        blocks[b] = matrices
    return blocks


def projected_potentials(
    es, charges: torch.Tensor, positions: torch.Tensor, cells: torch.Tensor, pbc: torch.Tensor, ptr, widths
) -> torch.Tensor:
    """``[N, W]``: each structure's projected potentials of its charges
    (:meth:`~aiida_emlip.models.electrostatics.Electrostatics.projected_potentials` without dipoles),
    with autograd through charges and geometry."""
    bounds = ptr.tolist()
    widths = [float(w) for w in widths]
    parts: dict[int, torch.Tensor] = {}
    for indices in width_groups(es, cells, pbc, ptr, widths):
        group = _Group(es, indices, bounds, positions, cells, pbc, widths)
        q = group.padded(charges[:, None])  # [G, A, 1]
        per_width = [kernel_potentials(kernels, q, group.r)[..., 0] for kernels in group.kernels]  # [G, A]
        for g, (b, a) in enumerate(zip(indices, group.atoms)):
            n = group.sizes[g]
            phi = torch.stack([p[g, :n] for p in per_width], dim=1)  # [n, W]
            if group.slabs[g] is not None:
                column = charges[a][:, None]
                phi = phi + torch.cat([group.slabs[g].potential(column, w**2, None) for w in widths], dim=1)
            parts[b] = phi
    for b in range(len(bounds) - 1):
        if b not in parts:
            atoms = slice(bounds[b], bounds[b + 1])
            parts[b] = es.projected_potentials(charges[atoms], positions[atoms], cells[b], pbc[b], widths)
    return torch.cat([parts[b] for b in range(len(bounds) - 1)])
