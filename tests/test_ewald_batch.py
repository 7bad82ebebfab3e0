"""Ewald sums of a batch's small cells at once (``Electrostatics.energies``): the very numbers of one
structure at a time, an independent reference, and which structures are summed together."""

from __future__ import annotations

import math

import pytest
import torch
from electrostatics_reference import reference_energy

from aiida_emlip.models import ewald_batch as eb
from aiida_emlip.models import ewald_projected as ep
from aiida_emlip.models.accuracy import split_smearing
from aiida_emlip.models.electrostatics import Electrostatics, ElectrostaticsConfig

DT = torch.float64
T3 = [True, True, True]


def cell_of(lengths: tuple[float, float, float], tilt: float = 0.0) -> torch.Tensor:
    a, b, c = lengths
    return torch.tensor([[a, 0.0, 0.0], [tilt, b, 0.0], [0.5 * tilt, -0.4 * tilt, c]], dtype=DT)


def batch(structures: list[tuple[int, torch.Tensor, list[bool]]], seed: int = 0, total: float = 0.3):
    """Positions, cells, pbc and ptr of structures ``(atoms, cell, pbc)``; charges summing to ``total``
    in each structure (charged cells), dipoles; all as float64 leaves."""
    g = torch.Generator().manual_seed(seed)
    pos, q, p, sizes = [], [], [], []
    for n, cell, _ in structures:
        frac = torch.rand(n, 3, generator=g, dtype=DT)
        pos.append(frac @ cell)
        charges = torch.randn(n, generator=g, dtype=DT)
        q.append(charges - charges.mean() + total / n)
        p.append(0.2 * torch.randn(n, 3, generator=g, dtype=DT))
        sizes.append(n)
    ptr = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    cells = torch.stack([cell for _, cell, _ in structures])
    pbc = torch.tensor([flags for *_, flags in structures])
    return torch.cat(q), torch.cat(pos), cells, pbc, ptr, torch.cat(p)


def one_at_a_time(es, q, pos, cells, pbc, ptr, p, charge_term=True) -> torch.Tensor:
    out = []
    for b in range(len(cells)):
        s = slice(int(ptr[b]), int(ptr[b + 1]))
        dip = None if p is None else p[s]
        if charge_term:
            out.append(es.energy(q[s], pos[s], cells[b], pbc[b], dip))
        else:
            out.append(es.dipole_terms(q[s], dip, pos[s], cells[b], pbc[b]))
    return torch.stack(out)


def derivatives(energies_of, q, pos, cells, p):
    """Energies, forces, the cell gradient, and the gradient of a force loss (double backward)."""
    pos = pos.clone().requires_grad_(True)
    cells = cells.clone().requires_grad_(True)
    dipoles = None if p is None else p * torch.sin(pos)  # the dipoles depend on the geometry
    e = energies_of(q * torch.cos(0.1 * pos.sum(1)), pos, cells, dipoles)
    forces, virial = torch.autograd.grad(e.sum(), [pos, cells], create_graph=True)
    loss = (e * e).sum() + (forces * forces).sum()
    (second,) = torch.autograd.grad(loss, [pos])
    return [e.detach(), forces.detach(), virial.detach(), second]


def assert_same_as_each_structure(es, q, pos, cells, pbc, ptr, p, charge_term: bool = True) -> None:
    """Energies, forces, cell gradients and a force loss's gradient agree to 1e-12 (relative to the
    largest of each)."""

    def batched(qq, rr, cc, pp):
        return es.energies(qq, rr, cc, pbc, ptr, pp, charge_term)

    def single(qq, rr, cc, pp):
        return one_at_a_time(es, qq, rr, cc, pbc, ptr, pp, charge_term)

    for got, want in zip(derivatives(batched, q, pos, cells, p), derivatives(single, q, pos, cells, p)):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))


MIXED = [
    (4, cell_of((8.0, 8.0, 18.0)), T3),
    (6, cell_of((8.0, 8.5, 18.0), tilt=1.3), T3),  # triclinic
    (4, cell_of((8.0, 8.0, 17.0)), [True, True, False]),  # a slab: the correction per structure
    (5, cell_of((9.0, 8.0, 17.0), tilt=-0.8), T3),
    (3, cell_of((6.0, 6.0, 6.0)), [False, False, False]),  # open: summed on its own
]


@pytest.mark.parametrize(
    "settings",
    [{"sigma": 1.5}, {"sigma": 2.0, "include_self": False}, {"sigma": 1.5, "accuracy": 1e-9}],
    ids=["sigma1.5", "no-self", "tight"],
)
@pytest.mark.parametrize("dipoles", [True, False])
def test_batched_sums_are_those_of_each_structure(settings, dipoles):
    es = Electrostatics(ElectrostaticsConfig(**settings))
    q, pos, cells, pbc, ptr, p = batch(MIXED)
    p = p if dipoles else None
    groups, others = eb.members(es, pos, cells, pbc, ptr, dipoles, charge_term=True)
    assert sorted(m.index for m in groups[0]) == [0, 1, 2, 3] and others == [4]
    assert_same_as_each_structure(es, q, pos, cells, pbc, ptr, p)


def test_dipole_terms_batched_are_those_of_each_structure():
    """Without the charge–charge term (the induced dipoles' field): Electrostatics.dipole_terms each."""
    es = Electrostatics(ElectrostaticsConfig(sigma=1.5))
    q, pos, cells, pbc, ptr, p = batch(MIXED, seed=3)
    groups, others = eb.members(es, pos, cells, pbc, ptr, True, charge_term=False)
    assert sorted(m.index for m in groups[0]) == [0, 1, 2, 3] and others == [4]
    assert_same_as_each_structure(es, q, pos, cells, pbc, ptr, p, charge_term=False)
    with pytest.raises(ValueError, match="needs dipoles"):
        es.energies(q, pos, cells, pbc, ptr, None, charge_term=False)


def test_batched_sums_meet_an_independent_reference():
    """Charged triclinic cells with dipoles against the textbook k-sum (full sphere, no shared code)."""
    es = Electrostatics(ElectrostaticsConfig(sigma=1.0, accuracy=1e-10))
    lattices = [cell_of((7.0, 7.5, 9.0), 1.1), cell_of((8.0, 7.0, 8.0)), cell_of((7.0, 8.0, 9.0), -0.9)]
    q, pos, cells, pbc, ptr, p = batch([(5, c, T3) for c in lattices], seed=7, total=-1.0)
    groups, _ = eb.members(es, pos, cells, pbc, ptr, True, charge_term=True)
    assert len(groups) == 1 and len(groups[0]) == 3
    got = es.energies(q, pos, cells, pbc, ptr, p)
    for b in range(3):
        s = slice(int(ptr[b]), int(ptr[b + 1]))
        want = reference_energy(q[s], pos[s], cells[b], 1.0, p[s])
        assert float(got[b]) == pytest.approx(float(want), rel=1e-9)


def test_real_space_pairs_are_summed_in_one_pass():
    """Narrow Gaussians in equal cells: the range separation exceeds the charges' width, so each
    structure has real-space pairs; the two structures still share one sum."""
    es = Electrostatics(ElectrostaticsConfig(sigma=0.3))
    cell = cell_of((6.0, 6.0, 6.0))
    q, pos, cells, pbc, ptr, p = batch([(6, cell, T3), (6, cell, T3)], seed=5)
    groups, others = eb.members(es, pos, cells, pbc, ptr, True, charge_term=True)
    assert len(groups) == 1 and not others
    assert all(m.kernel.pairs.shape[0] > 0 for m in groups[0])
    assert_same_as_each_structure(es, q, pos, cells, pbc, ptr, p)


def test_which_structures_share_a_sum(monkeypatch):
    es = Electrostatics(ElectrostaticsConfig(sigma=1.0, pme_min_atoms=50))
    big = cell_of((12.0, 12.0, 12.0))
    structures = [(4, cell_of((8.0, 8.0, 8.0)), T3), (60, big, T3), (4, cell_of((8.0, 8.0, 9.0)), T3)]
    _, pos, cells, pbc, ptr, _ = batch(structures)
    groups, others = eb.members(es, pos, cells, pbc, ptr, True, charge_term=True)
    assert [[m.index for m in g] for g in groups] == [[0, 2]] and others == [1]  # 60 atoms: PME
    # atom counts or volumes a binary order of magnitude apart (the same range separation, the charges'
    # width): summed apart, here each alone
    wide = Electrostatics(ElectrostaticsConfig(sigma=1.5))
    small = (4, cell_of((8.0, 8.0, 8.0)), T3)
    for other in ((9, cell_of((8.0, 8.0, 9.0)), T3), (4, cell_of((8.0, 8.0, 17.0)), T3)):
        _, pos2, cells2, pbc2, ptr2, _ = batch([small, other])
        assert eb.members(wide, pos2, cells2, pbc2, ptr2, True, charge_term=True) == ([], [0, 1])
        separations = {
            split_smearing(float(torch.linalg.det(c)), 1.5 * math.sqrt(2.0), n, "ewald")
            for n, c, _ in (small, other)
        }
        assert separations == {1.5 * math.sqrt(2.0)}
        _, pos2, cells2, pbc2, ptr2, _ = batch([small, small])
        assert len(eb.members(wide, pos2, cells2, pbc2, ptr2, True, charge_term=True)[0]) == 1
    # a budget that holds one structure only: every structure on its own
    monkeypatch.setattr(eb, "BATCH_ELEMENTS", 4 * max(m.n_kvectors for m in groups[0]))
    groups, others = eb.members(es, pos, cells, pbc, ptr, True, charge_term=True)
    assert groups == [] and others == [0, 1, 2]
    monkeypatch.undo()
    # larger structures are summed alone, and nothing is set up for a structure without company
    built = []
    real = eb._member
    monkeypatch.setattr(eb, "_member", lambda *args: built.append(args[1]) or real(*args))
    monkeypatch.setattr(eb, "BATCH_MAX_ATOMS", 3)
    assert eb.members(es, pos, cells, pbc, ptr, True, charge_term=True) == ([], [0, 1, 2])
    monkeypatch.setattr(eb, "BATCH_MAX_ATOMS", 128)
    one = torch.tensor([0, 4])
    assert eb.members(es, pos[:4], cells[:1], pbc[:1], one, True, charge_term=True) == ([], [0])
    assert built == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_padded_kvectors_carry_no_weight(dtype):
    """The padding k-vector's kernels, and their derivatives, are exactly zero."""
    for width in (0.05, 1.0, 3.0):
        k = eb._padded_kvectors([torch.ones(3, 3, dtype=dtype), torch.ones(1, 3, dtype=dtype)], width**2)
        pad = k[1, 1:].clone().requires_grad_(True)
        k2 = (pad * pad).sum(-1)
        weight = torch.exp(-(width**2) * k2) / k2
        (grad,) = torch.autograd.grad(weight.sum(), pad)
        assert k.shape == (2, 3, 3) and torch.equal(k[0], torch.ones(3, 3, dtype=dtype))
        assert not weight.any() and not grad.any()


def test_float32_batches_agree_with_each_structure():
    """In single precision too (the padding's kernels underflow to exactly zero there as well)."""
    es = Electrostatics(ElectrostaticsConfig(sigma=1.5))
    q, pos, cells, pbc, ptr, p = (x.float() if x.is_floating_point() else x for x in batch(MIXED, seed=11))
    got = es.energies(q, pos, cells, pbc, ptr, p)
    want = one_at_a_time(es, q, pos, cells, pbc, ptr, p)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_block_matrices_are_each_structures_dense_operator(monkeypatch):
    """The dense projected-potential blocks of the self-consistent head's batched iteration: those of
    each structure's DenseOperator, gradients through positions and cells included."""
    from aiida_emlip.models.coulomb_operator import CoulombOperator, DenseOperator

    grouped = []
    real = ep.width_groups
    monkeypatch.setattr(ep, "width_groups", lambda *a: grouped.extend(real(*a)) or real(*a))

    es = Electrostatics(ElectrostaticsConfig(sigma=1.5))
    widths = [1.5, 0.8, 2.5]
    _, pos, cells, pbc, ptr, _ = batch(MIXED, seed=13)
    weights = torch.linspace(0.5, 1.5, 3, dtype=DT)[:, None, None]

    def blocks_of(batched: bool):
        r = pos.clone().requires_grad_(True)
        c = cells.clone().requires_grad_(True)
        if batched:
            blocks = ep.block_matrices(es, r, c, pbc, ptr, widths)
        else:
            bounds = ptr.tolist()
            blocks = [
                DenseOperator(
                    CoulombOperator(es, r[bounds[b] : bounds[b + 1]], c[b], pbc[b], widths)
                ).matrices
                for b in range(len(c))
            ]
        total = sum((weights * m * m).sum() for m in blocks)
        return [m.detach() for m in blocks], torch.autograd.grad(total, [r, c])

    (got, got_grads), (want, want_grads) = blocks_of(True), blocks_of(False)
    assert [m.shape for m in got] == [(3, n, n) for n in (4, 6, 4, 5, 3)]
    assert grouped == [[0, 1, 2, 3]]  # the open structure alone
    for a, b in zip([*got, *got_grads], [*want, *want_grads]):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))


def test_projected_potentials_are_each_structures():
    """The self-consistent head's implicit step: every width's projected potentials of the charges,
    with gradients through charges, positions and cells."""
    es = Electrostatics(ElectrostaticsConfig(sigma=1.5))
    widths = [1.5, 0.8, 2.5]
    q, pos, cells, pbc, ptr, _ = batch(MIXED, seed=17)
    assert ep.width_groups(es, cells, pbc, ptr, widths) == [[0, 1, 2, 3]]
    weights = torch.linspace(0.5, 1.5, 3, dtype=DT)

    def potentials_of(batched: bool):
        x, r, c = (t.clone().requires_grad_(True) for t in (q, pos, cells))
        if batched:
            phi = ep.projected_potentials(es, x, r, c, pbc, ptr, widths)
        else:
            bounds = ptr.tolist()
            phi = torch.cat(
                [
                    es.projected_potentials(
                        x[bounds[b] : bounds[b + 1]], r[bounds[b] : bounds[b + 1]], c[b], pbc[b], widths
                    )
                    for b in range(len(c))
                ]
            )
        return [phi.detach(), *torch.autograd.grad((weights * phi * phi).sum(), [x, r, c])]

    for a, b in zip(potentials_of(True), potentials_of(False)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))


def test_a_degenerate_cell_gets_the_one_structure_message():
    es = Electrostatics(ElectrostaticsConfig(sigma=1.5))
    flat = torch.tensor([[8.0, 0.0, 0.0], [0.0, 8.0, 0.0], [0.0, 0.0, 0.0]], dtype=DT)
    q, pos, cells, pbc, ptr, _ = batch([(4, flat, T3), (4, flat, T3)])
    with pytest.raises(ValueError, match="nonzero volume"):
        es.energies(q, pos, cells, pbc, ptr)
