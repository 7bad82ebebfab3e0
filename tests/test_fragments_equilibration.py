"""Charge equilibration with one constraint per fragment (`qeq`, `functional`; `fragments=integer`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models_helpers import evaluate, gradient_and_central_difference, nacl_cell, tiny_model
from test_fragments import fragment_sums, ion_and_water

from aiida_emlip.models.graph import build_graph
from aiida_emlip.models.heads.solvers import constrain_groups, kkt_inverse, qeq_solve

QEQ = {"name": "qeq", "fragments": "integer"}
QEQ_CG = {**QEQ, "solver": "cg"}
FUNCTIONAL = {"name": "functional", "fragments": "integer"}  # quartic: Newton with several steps
SOFTNESS = {**FUNCTIONAL, "parametrization": "softness"}
HEADS = [QEQ, QEQ_CG, FUNCTIONAL, SOFTNESS]
IDS = ["qeq", "qeq-cg", "functional", "functional-softness"]


def _bordered(h: np.ndarray, groups: np.ndarray, b: np.ndarray, targets: np.ndarray) -> tuple:
    """q and μ of ``[[H, Cᵀ], [C, 0]] [q; μ] = [−b; targets]`` by one dense solve (numpy)."""
    n, count = h.shape[0], targets.size
    c = np.zeros((count, n))
    c[groups, np.arange(n)] = 1.0
    kkt = np.block([[h, c.T], [c, np.zeros((count, count))]])
    z = np.linalg.solve(kkt, np.concatenate([-b, targets]))
    return z[:n], z[n:]


@pytest.mark.parametrize("indefinite", [False, True], ids=["definite", "slab-like"])
def test_constrain_groups_solves_the_bordered_system(indefinite):
    """One μ per group from the shared solve equals the bordered KKT system solved at once; so does
    the implicit step's inverse. ``slab-like``: H positive only on Σq = 0 (the rank-one shift path)."""
    rng = np.random.default_rng(3)
    n = 7
    m = rng.normal(size=(n, n))
    h = m @ m.T + n * np.eye(n)
    if indefinite:
        ones = np.ones((n, n)) / n
        h = h - ones @ h @ ones - 40.0 * ones  # the uniform mode negative, the rest unchanged
        assert np.linalg.eigvalsh(h)[0] < 0
    b, groups = rng.normal(size=n), np.array([0, 0, 1, 1, 1, 2, 2])
    targets = np.array([1.0, -2.0, 0.5])
    dense = torch.tensor(h)
    shared = qeq_solve(None, torch.zeros(n, dtype=torch.float64), torch.tensor(b), targets.sum(), dense=dense)
    assert (shared.shift != 0.0) == indefinite
    grouped = constrain_groups(shared, torch.tensor(groups), torch.tensor(targets))
    q, mu = _bordered(h, groups, b, targets)
    np.testing.assert_allclose(grouped.charges.numpy(), q, atol=1e-11)
    np.testing.assert_allclose(grouped.mu.numpy(), mu, atol=1e-10)
    r, s = rng.normal(size=n), np.array([0.3, -0.1, 0.2])
    delta, nu = kkt_inverse(grouped)(torch.tensor(r), torch.tensor(s))
    expect_delta, expect_nu = _bordered(h, groups, -r, s)
    np.testing.assert_allclose(delta.numpy(), expect_delta, atol=1e-11)
    np.testing.assert_allclose(nu.numpy(), expect_nu, atol=1e-10)


@pytest.mark.parametrize("head", HEADS, ids=IDS)
def test_equilibrating_heads_keep_fragments_at_integer_charges(head):
    """Na + H2O 9 Å apart (beyond the 4 Å cutoff), Q = +1: each fragment an integer charge; the shared
    solution of the same weights leaks a fraction, and its fragment charges are the ones reported for
    training to supervise."""
    for seed in (1, 2):
        out = evaluate(tiny_model(head, seed=seed), ion_and_water(9.0))
        sums = fragment_sums(out["charges"])
        assert bool(out["converged"].all())
        assert sum(sums) == pytest.approx(1.0, abs=1e-10)
        np.testing.assert_allclose(sums, np.round(sums), atol=1e-10)
        shared = evaluate(tiny_model({**head, "fragments": "shared"}, seed=seed), ion_and_water(9.0))
        leak = fragment_sums(shared["charges"])
        assert min(abs(s - round(s)) for s in leak) > 1e-3
        np.testing.assert_allclose(out["fragment_charges"].numpy(), leak, atol=1e-9)
        # the integers are the shared charges rounded
        np.testing.assert_allclose(sums, np.round(leak), atol=1e-10)


@pytest.mark.parametrize("head", [QEQ, FUNCTIONAL], ids=["qeq", "functional"])
def test_one_fragment_is_the_usual_equilibration(head):
    """A charged periodic crystal and an ion at contact with a water (one fragment each): the same
    charges, energy and μ as with one shared constraint."""
    cell = nacl_cell(seed=2)
    cell.info["total_charge"] = -1.0
    structures = [cell, ion_and_water(2.4)]
    integer = evaluate(tiny_model(head, seed=3), structures)
    shared = evaluate(tiny_model({**head, "fragments": "shared"}, seed=3), structures)
    for key in ("charges", "energy", "fermi_level", "forces"):
        torch.testing.assert_close(integer[key], shared[key], atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "head", [QEQ, FUNCTIONAL, SOFTNESS], ids=["qeq", "functional", "functional-softness"]
)
def test_training_gradients_through_fragment_constraints(head):
    """In training mode the charges carry the implicit derivative of the constrained solve (one μ per
    fragment) and the reported fragment charges that of the shared solve: the gradient of a loss on
    energy, forces, charges and fragment charges equals central differences in a readout weight."""
    atoms = ion_and_water(7.0, ion="Cl", charge=-1.0)
    atoms.positions += np.random.default_rng(1).normal(scale=0.05, size=atoms.positions.shape)
    model = tiny_model(head, seed=3)
    model.train()
    graph = build_graph([atoms], model.cutoff, model.dtype)

    def loss() -> torch.Tensor:
        out = model(graph, compute_stress=False)
        fragments = out["fragment_charges"]
        return (
            out["energy"].sum()
            + 3.0 * (out["charges"] ** 2).sum()
            + (out["forces"] ** 2).sum()
            + (fragments[0] + 0.4) ** 2
        )

    grad, difference = gradient_and_central_difference(loss, next(iter(model.head.readout.parameters())))
    assert grad == pytest.approx(difference, rel=1e-6, abs=1e-9)
    assert abs(grad) > 1e-4


def test_a_fractional_total_charge_is_shared_as_the_shared_solution_would():
    """Q = +0.5 over Na and a water 9 Å apart: each fragment holds the integer nearest its shared charge
    plus its share of the 0.5 (both shares strictly between 0 and 0.5)."""
    atoms = ion_and_water(9.0, charge=0.5)
    out = evaluate(tiny_model(QEQ, seed=1), atoms)
    sums = np.array(fragment_sums(out["charges"]))
    assert sums.sum() == pytest.approx(0.5, abs=1e-10)
    fractions = sums - np.round(out["fragment_charges"].numpy())
    assert fractions.sum() == pytest.approx(0.5, abs=1e-10)
    assert all(0.0 < f < 0.5 for f in fractions)


def test_a_warm_start_does_not_bypass_the_fragment_constraints():
    """The iterative solver's warm start (inference, one constraint) is not taken for a structure of
    several fragments: given initial charges, the fragments still carry integers."""
    atoms = ion_and_water(9.0)
    model = tiny_model(QEQ_CG, seed=2)
    graph = build_graph([atoms], model.cutoff, model.dtype)
    start = torch.full((4,), 0.25, dtype=torch.float64)
    out = model(graph, initial_charges=start, compute_stress=False)
    sums = fragment_sums(out["charges"].detach())
    np.testing.assert_allclose(sums, np.round(sums), atol=1e-10)


def test_unknown_fragment_mode_is_refused_by_the_equilibrating_heads():
    with pytest.raises(ValueError, match="fragments must be one of"):
        tiny_model({"name": "qeq", "fragments": "none"})
