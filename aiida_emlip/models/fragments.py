"""Fragments: the parts of a structure that no edge of the graph connects (no AiiDA).

A local model cannot know anything beyond its receptive field, so charge it moves between two
fragments that no chain of edges joins (an ion and a molecule 10 Å apart, two molecules in a gas)
is charge transfer across vacuum that the physics of an insulator forbids. The heads that call
themselves insulating meet the total charge of a structure fragment by fragment: each fragment
receives an integer charge — the integer nearest the charge that the head's structure-wide
correction would give it (its local charges plus its weighted share of the structure's excess), the
remainder going in unit steps to the fragments closest to the next integer — and only within a
fragment is charge redistributed. Rounding the structure-wide charges, not the bare local sums,
keeps the assignment consistent with what training on connected structures teaches the weights.
A non-integer total charge (a charged electrode) leaves its fractional part to be shared by every
fragment in proportion to their weights.

With one fragment (any bulk, any liquid or slab denser than the cutoff) this is exactly the usual
correction of the total charge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from aiida_emlip.models.graph import Graph

#: How a head meets the total charge across fragments: ``integer`` — each fragment an integer charge,
#: nothing moves across vacuum; ``shared`` — one correction over the whole structure (charge leaks
#: between distant fragments in proportion to their weights).
FRAGMENTS = ("integer", "shared")
#: A total charge whose distance to an integer is below this is treated as that integer (e).
INTEGER_TOLERANCE = 1e-6


def fragment_index(graph: Graph) -> tuple[torch.Tensor, int]:
    """The fragment of every atom [N] (numbered 0.. within the batch) and the number of fragments.

    Fragments are the connected components of the graph's edges (the backbone's cutoff, periodic
    images included); edges never join two structures of a batch, so no fragment spans two.
    """
    n = graph.num_atoms
    label = torch.arange(n, device=graph.batch.device)
    if graph.edge_index.numel():
        sender, receiver = graph.edge_index
        while True:
            # each atom takes the smallest label among itself and its neighbours, then follows the
            # label it took (pointer jumping), so that chains collapse in a few sweeps
            new = label.scatter_reduce(0, receiver, label[sender], reduce="amin", include_self=True)
            new = new.scatter_reduce(0, sender, new[receiver], reduce="amin", include_self=True)
            new = new[new]
            if torch.equal(new, label):
                break
            label = new
    _, index = torch.unique(label, return_inverse=True)
    return index, int(index.max()) + 1 if n else 0


def integer_targets(
    predicted: torch.Tensor, fragment_batch: torch.Tensor, total_charge: torch.Tensor, sizes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer charge of each fragment [F] and the non-integer remainder of each structure [B].

    ``predicted`` [F]: each fragment's charge under a structure-wide correction
    (:func:`shared_fragment_charges`); ``fragment_batch`` [F]: its
    structure; ``sizes`` [F]: its number of atoms (ties go to the larger fragment). Each fragment takes
    the integer nearest its prediction; a structure's integer remainder goes one unit at a time to the
    fragments nearest to rounding the other way (positive remainders to the largest fractional parts).
    """
    predicted = predicted.detach().double().cpu()
    fragment_batch = fragment_batch.cpu()
    totals = total_charge.detach().double().cpu()
    if not (bool(torch.isfinite(predicted).all()) and bool(torch.isfinite(totals).all())):
        # no integer is nearest a NaN: pass it on, so that the model reports a non-finite prediction
        return torch.full_like(predicted, math.nan), torch.zeros_like(totals)
    targets = torch.round(predicted)
    remainders = torch.zeros_like(totals)
    for b in range(totals.numel()):
        members = torch.nonzero(fragment_batch == b).flatten()
        if members.numel() == 0:
            continue
        residual = float(totals[b] - targets[members].sum())
        units = round(residual)
        if abs(residual - units) < INTEGER_TOLERANCE:
            residual = float(units)
        remainders[b] = residual - units
        if units == 0:
            continue
        sign = 1.0 if units > 0 else -1.0
        fraction = (predicted[members] - targets[members]) * sign
        order = sorted(range(members.numel()), key=lambda k: (-float(fraction[k]), -int(sizes[members[k]])))
        for step in range(abs(units)):
            targets[members[order[step % len(order)]]] += sign
    return targets, remainders


@dataclass
class FragmentCharges:
    """The fragments of a batch and the charge each must carry (:func:`fragment_targets`)."""

    index: torch.Tensor  # [N] the fragment of each atom
    batch: torch.Tensor  # [F] the structure of each fragment
    local: torch.Tensor  # [F] the sum of its local charges
    weight: torch.Tensor  # [F] the sum of its atoms' weights
    shared: torch.Tensor  # [F] its charge under one structure-wide correction (differentiable)
    targets: torch.Tensor  # [F] the charge it carries: an integer, plus its share of a fractional Q


def fragment_structures(index: torch.Tensor, count: int, graph: Graph) -> torch.Tensor:
    """The structure of each of the ``count`` fragments [F] from the fragment of each atom [N]."""
    batch = torch.zeros(count, dtype=graph.batch.dtype, device=index.device)
    return batch.scatter(0, index, graph.batch)


def fragment_targets(
    charges: torch.Tensor, graph: Graph, weights: torch.Tensor | None = None
) -> FragmentCharges:
    """Each fragment's charge: the integer nearest the charge a structure-wide correction would give it,
    the correction sharing each structure's excess over Σ ``charges`` in proportion to ``weights`` [N]
    (uniformly without), and a non-integer remainder of Q shared in the same proportion."""
    index, count = fragment_index(graph)
    weights = torch.ones_like(charges) if weights is None else weights
    batch = fragment_structures(index, count, graph)
    local = charges.new_zeros(count).index_add(0, index, charges)
    weight = weights.new_zeros(count).index_add(0, index, weights)
    share = weight / weights.new_zeros(graph.num_graphs).index_add(0, graph.batch, weights)[batch]
    sizes = torch.bincount(index, minlength=count)
    shared = shared_fragment_charges(local, share, batch, graph.total_charge.to(charges.dtype))
    integers, remainders = integer_targets(shared, batch, graph.total_charge, sizes)
    targets = integers.to(device=charges.device, dtype=charges.dtype)
    remainders = remainders.to(device=charges.device, dtype=charges.dtype)
    if bool((remainders != 0).any()):
        targets = targets + remainders[batch] * share
    return FragmentCharges(index, batch, local, weight, shared, targets)


def correct_fragment_charges(
    charges: torch.Tensor, graph: Graph, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Shift ``charges`` [N] so that each fragment carries an integer charge and each structure Q.

    Within a fragment the excess is spread uniformly, or in proportion to positive ``weights`` [N].
    Differentiable in ``charges`` and ``weights`` (the integers are constants).
    """
    return fragment_corrected(charges, graph, weights)[0]


def fragment_corrected(
    charges: torch.Tensor, graph: Graph, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`correct_fragment_charges`, plus the fragment of each atom [N] and each fragment's charge
    under one structure-wide correction [F] (differentiable: the quantity that training supervises)."""
    weights = torch.ones_like(charges) if weights is None else weights
    f = fragment_targets(charges, graph, weights)
    return charges + ((f.targets - f.local) / f.weight)[f.index] * weights, f.index, f.shared


def largest_fragment_mu(mu: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """A structure's Fermi level from one μ per fragment ``mu`` [G] (``groups`` [N]: the fragment of each
    atom): the μ of the fragment with the most atoms; a single μ as it is."""
    if mu.numel() == 1:
        return mu.reshape(())
    return mu[int(torch.bincount(groups, minlength=mu.numel()).argmax())]


def shared_fragment_charges(
    predicted: torch.Tensor, share: torch.Tensor, fragment_batch: torch.Tensor, total_charge: torch.Tensor
) -> torch.Tensor:
    """Each fragment's charge under one structure-wide correction [F]: its local sum ``predicted`` plus
    its ``share`` (its fraction of the structure's weights) of the structure's excess charge."""
    excess = total_charge - predicted.new_zeros(total_charge.numel()).index_add(0, fragment_batch, predicted)
    return predicted + share * excess[fragment_batch]
