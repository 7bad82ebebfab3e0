r"""Ewald sums of many small periodic cells at once.

A training batch of small molecules in boxes sums each structure's electrostatics on its own: a few
dozen small tensor operations per structure in the forward pass, and as many again in each of the two
backward passes of a force-trained model. At a handful of atoms per cell that dispatch, not the
arithmetic, sets the time. Here the structures of a batch that use the Ewald method are summed
together, with the very terms, k-vectors and cutoffs of
:meth:`~aiida_emlip.models.electrostatics.Electrostatics.energy` structure by structure (each
structure's :class:`~aiida_emlip.models.coulomb_operator.ChargeKernel` is built as there):

* the charges' k-space sum is torch-pme's (``EwaldCalculator._compute_kspace``), vectorised over the
  structures with :func:`torch.vmap` on padded tensors: padded atoms carry no charge, and padded
  k-vectors lie so far out that their kernels (``e^{−s²k²/2}/k²``, ``e^{−σ²k²}/k²``) are exactly zero;
* the charges' real-space pairs (where the range separation exceeds the charges' width) are one pair
  sum over the pairs of every structure (torch-pme's ``_compute_rspace``, which needs no cell);
* the charge–dipole and dipole–dipole k-space terms (:mod:`~aiida_emlip.models.gaussian_dipoles`'
  formula) are one padded sum;
* the slab correction stays per structure (a few operations on the atoms' heights).

:func:`kernel_potentials` applies the structures' charge kernels to padded channels: the energies here,
and the self-consistent head's projected potentials (:mod:`~aiida_emlip.models.ewald_projected`).

Structures are summed together when they share the charges' calculator (the same range separation),
their atom counts and volumes lie within the same binary order of magnitude (padding then costs at most
about a factor 2) and the padded sum stays within :data:`BATCH_ELEMENTS`; the others, and every structure of a
``pme`` or ``direct`` method, are left to the caller's structure-by-structure path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from aiida_emlip.models import gaussian_dipoles as gd
from aiida_emlip.models.accuracy import kspace_cutoff, split_smearing
from aiida_emlip.models.coulomb_operator import ChargeKernel, SlabTerm, pair_width, reduced_cell
from aiida_emlip.schema import COULOMB_CONSTANT

#: Largest padded sum (structures × atoms × k-vectors) done at once; the k-space sums of one structure
#: are chunked above this size, so a structure that large is left to the structure-by-structure path.
BATCH_ELEMENTS = gd.CHUNK_ELEMENTS
#: Structures of more atoms are summed one at a time: their sums are large enough that the per-operation
#: cost batching saves is a small part of them.
BATCH_MAX_ATOMS = 128
#: ``s²k²/2`` (charges) and ``σ²k²`` (dipoles) at a padded k-vector: ``e^{−1000}`` is zero in float32
#: and float64, and so is every derivative of it.
PAD_EXPONENT = 1000.0


@dataclass
class Member:
    """One structure of a batched sum: its atoms, cell, and the parts of its sum that depend on the
    geometry alone."""

    index: int
    atoms: slice
    reduced: torch.Tensor  # the reduced cell (the dipole terms')
    kernel: ChargeKernel | None  # None without the charge–charge term
    dipole_kvectors: torch.Tensor | None
    slab: SlabTerm | None

    @property
    def n_atoms(self) -> int:
        return self.atoms.stop - self.atoms.start

    @property
    def n_kvectors(self) -> int:
        sizes = [len(k) for k in (self.charge_kvectors, self.dipole_kvectors) if k is not None]
        return max(sizes, default=0)

    @property
    def charge_kvectors(self) -> torch.Tensor | None:
        return None if self.kernel is None else self.kernel.kvectors


def members(
    es,
    positions: torch.Tensor,
    cells: torch.Tensor,
    pbc: torch.Tensor,
    ptr: torch.Tensor,
    dipoles: bool,
    charge_term: bool,
) -> tuple[list[list[Member]], list[int]]:
    """The batch's structures in groups to sum together, and the indices of the others (``pme`` or
    ``direct``, more than :data:`BATCH_MAX_ATOMS` atoms, too large a sum, or alone in their group).

    Structures are first grouped by numbers of their cells and atom counts (:func:`shareable`); only
    those with company get their geometry's set-up here, so a structure left to the caller is set up
    once, by the caller.
    """
    bounds = ptr.tolist()
    s_phys = [pair_width(es.config.sigma, es.config.sigma)] if charge_term else []
    shared, others = shareable(es, cells, pbc, ptr, s_phys)
    groups: list[list[Member]] = []
    for indices in shared:
        built = []
        for b in indices:
            member = _member(
                es, b, slice(bounds[b], bounds[b + 1]), positions, cells, pbc, dipoles, charge_term
            )
            if member.n_atoms * member.n_kvectors > BATCH_ELEMENTS:
                others.append(b)
            else:
                built.append(member)
        for group in _within_budget(built):
            if len(group) == 1:
                others.append(group[0].index)
            else:
                groups.append(group)
    return groups, sorted(others)


def shareable(
    es, cells: torch.Tensor, pbc: torch.Tensor, ptr: torch.Tensor, pair_widths: list[float]
) -> tuple[list[list[int]], list[int]]:
    """The structures that may share Ewald sums, in groups of two or more, and the others.

    A group's structures use the Ewald method, have at most :data:`BATCH_MAX_ATOMS` atoms and the same
    range separation for each of ``pair_widths`` (a number of the cell's volume and atom count), and
    their atom counts and volumes lie within one binary order of magnitude: padding then multiplies the
    work by at most about 2 (the number of k-vectors goes with the volume).
    """
    bounds = ptr.tolist()
    candidates: dict[tuple, list[int]] = {}
    others: list[int] = []
    for b in range(len(bounds) - 1):
        n = bounds[b + 1] - bounds[b]
        if n > BATCH_MAX_ATOMS or es.select_method(n, pbc[b]) != "ewald":
            others.append(b)
            continue
        volume = float(torch.abs(torch.linalg.det(cells[b].detach())))
        if volume < 1e-8:  # a degenerate cell: the structure's own sum says what is wrong
            others.append(b)
            continue
        separations = tuple(split_smearing(volume, s, n, "ewald") for s in pair_widths)
        key = (separations, n.bit_length(), math.floor(math.log2(volume)))
        candidates.setdefault(key, []).append(b)
    shared = [indices for indices in candidates.values() if len(indices) > 1]
    others += [indices[0] for indices in candidates.values() if len(indices) == 1]
    return shared, sorted(others)


def _member(
    es,
    b: int,
    atoms: slice,
    positions: torch.Tensor,
    cells: torch.Tensor,
    pbc: torch.Tensor,
    dipoles: bool,
    charge_term: bool,
) -> Member:
    """Structure ``b``'s set-up: its :class:`ChargeKernel` (as :meth:`Electrostatics.energy` builds it),
    the dipole terms' k-vectors, the slab term."""
    n = atoms.stop - atoms.start
    s_phys = pair_width(es.config.sigma, es.config.sigma)
    kernel = ChargeKernel(es, positions[atoms], cells[b], "ewald", s_phys) if charge_term else None
    reduced = reduced_cell(cells[b]) if kernel is None else kernel.cell
    dipole_kvectors = None
    if dipoles:
        k_cut = kspace_cutoff(reduced, es.config.sigma, n, es.config.accuracy, dipoles=True)
        dipole_kvectors = gd.half_space_kvectors(reduced, k_cut)
    slab = None
    if es._slab_active(pbc[b]):
        slab = SlabTerm(positions[atoms], cells[b], pbc[b], es.config.sigma)
    return Member(b, atoms, reduced, kernel, dipole_kvectors, slab)


def _within_budget(candidates: list[Member]) -> list[list[Member]]:
    """Consecutive groups whose padded size stays within :data:`BATCH_ELEMENTS`."""
    groups: list[list[Member]] = []
    current: list[Member] = []
    for member in candidates:
        trial = [*current, member]
        size = len(trial) * max(m.n_atoms for m in trial) * max(m.n_kvectors for m in trial)
        if current and size > BATCH_ELEMENTS:
            groups.append(current)
            trial = [member]
        current = trial
    if current:
        groups.append(current)
    return groups


def padded(values: torch.Tensor, atoms: list[slice], width: int) -> torch.Tensor:
    """``[G, width, ...]``: the rows ``atoms[g]`` of ``values`` (per atom) for each structure ``g``,
    zeros after them."""
    out = values.new_zeros((len(atoms), width, *values.shape[1:]))
    for g, rows in enumerate(atoms):
        out[g, : rows.stop - rows.start] = values[rows]
    return out


def _padded_kvectors(kvectors: list[torch.Tensor], decay: float) -> torch.Tensor:
    """``[G, K, 3]``: the members' k-vectors, then copies of one whose kernel ``e^{−decay·k²}`` is zero."""
    size = max(len(k) for k in kvectors)
    far = math.sqrt(PAD_EXPONENT / decay)
    out = []
    for k in kvectors:
        pad = k.new_zeros((size - len(k), 3))
        pad[:, 0] = far
        out.append(torch.cat([k, pad]))
    return torch.stack(out)


def group_energies(
    es,
    group: list[Member],
    charges: torch.Tensor,
    positions: torch.Tensor,
    dipoles: torch.Tensor | None,
) -> torch.Tensor:
    """The electrostatic energies ``[G]`` (eV) of the group's structures: those of
    :meth:`~aiida_emlip.models.electrostatics.Electrostatics.energy`, or of its ``dipole_terms`` where the
    group was made without the charge–charge term."""
    width = max(m.n_atoms for m in group)
    atoms = [m.atoms for m in group]
    q = padded(charges[:, None], atoms, width)  # [G, A, 1]
    r = padded(positions, atoms, width)
    energies = charges.new_zeros(len(group))
    if group[0].kernel is not None:
        energies = energies + _charge_energies(group, charges, q, r)
    if dipoles is not None:
        energies = energies + _dipole_energies(es, group, q[..., 0], padded(dipoles, atoms, width), r)
    if any(m.slab is not None for m in group):
        zero = charges.new_zeros(())
        slabs = [
            zero if m.slab is None else m.slab.energy(charges[m.atoms], _rows(dipoles, m)) for m in group
        ]
        energies = energies + torch.stack(slabs)
    return energies


def _rows(values: torch.Tensor | None, member: Member) -> torch.Tensor | None:
    return None if values is None else values[member.atoms]


def _charge_energies(
    group: list[Member], charges: torch.Tensor, q: torch.Tensor, r: torch.Tensor
) -> torch.Tensor:
    """``½ Σ q φ`` of each structure's charges ``q`` ``[G, A, 1]`` (padded)."""
    phi = kernel_potentials([m.kernel for m in group], q, r)
    return 0.5 * (q * phi).sum((1, 2))


def kernel_potentials(kernels: list[ChargeKernel], x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Each structure's Ewald :class:`ChargeKernel` applied to its padded charge channels ``x``
    ``[G, A, C]`` at padded positions ``r`` ``[G, A, 3]``: the potentials ``[G, A, C]`` of
    ``ChargeKernel.__call__`` (k-space by torch-pme, vectorised; real-space pairs in one sum;
    background and on-site terms). Rows of padded atoms are not meaningful."""
    first = kernels[0]
    calc = first.calc
    if any(k.calc is not calc for k in kernels):
        raise RuntimeError("structures of different range separations cannot share one Ewald sum")
    smearing = float(calc.potential.smearing)
    kvectors = _padded_kvectors([k.kvectors for k in kernels], 0.5 * smearing**2)
    cells = torch.stack([k.cell for k in kernels])

    def kspace(q: torch.Tensor, cell: torch.Tensor, pos: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return calc._compute_kspace(q, cell, pos, None, k, None)

    phi = 2.0 * torch.vmap(kspace)(x, cells, r, kvectors)
    width = x.shape[1]
    pairs = [k.pairs + g * width for g, k in enumerate(kernels) if k.pairs.shape[0]]
    if pairs:
        dist = torch.cat([k.dist for k in kernels if k.pairs.shape[0]])
        flat = x.reshape(-1, x.shape[2])
        phi = phi + 2.0 * calc._compute_rspace(flat, torch.cat(pairs), dist).reshape(x.shape)
    volumes = torch.stack([k.volume for k in kernels])
    phi = phi + first.background * x.sum(1, keepdim=True) / volumes[:, None, None]
    if first.onsite:
        phi = phi + first.onsite * x
    return phi


def _dipole_energies(
    es, group: list[Member], q: torch.Tensor, p: torch.Tensor, r: torch.Tensor
) -> torch.Tensor:
    """Charge–dipole plus dipole–dipole k-space energies ``[G]``: the sum of
    :func:`~aiida_emlip.models.gaussian_dipoles.dipole_kspace_energy` over padded k-vectors, the dipoles'
    self-energies removed unless ``include_self``."""
    sigma = es._require_dipole_width()
    kvectors = _padded_kvectors([m.dipole_kvectors for m in group], sigma**2)
    k2 = (kvectors * kvectors).sum(-1)  # [G, K]
    weight = torch.exp(-(sigma**2) * k2) / k2
    arg = torch.bmm(r, kvectors.transpose(1, 2))  # [G, A, K]
    cos, sin = torch.cos(arg), torch.sin(arg)
    kp = torch.bmm(p, kvectors.transpose(1, 2))
    c_q, s_q = (q[..., None] * cos).sum(1), (q[..., None] * sin).sum(1)
    c_p, s_p = (kp * cos).sum(1), (kp * sin).sum(1)
    total = (weight * (c_p * c_p + s_p * s_p - 2.0 * (c_q * s_p - s_q * c_p))).sum(-1)
    volumes = torch.abs(torch.linalg.det(torch.stack([m.reduced for m in group])))
    energies = 4.0 * math.pi * COULOMB_CONSTANT * total / volumes
    if not es.config.include_self:
        energies = energies - gd.dipole_self_energies(p.reshape(-1, 3), sigma).reshape(p.shape[:2]).sum(1)
    return energies
