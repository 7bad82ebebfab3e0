"""``qeq``'s KKT solves and ``functional``'s Newton steps of a batch of small structures as one
block-diagonal system: the charges, μ, energies, forces and parameter gradients of one solve per
structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models_helpers import molecules_batch, periodic_batch, spy_on, tiny_model


def _spy(monkeypatch, model) -> list[bool]:
    return spy_on(monkeypatch, type(model.head), "_batch_solve")


def _outputs_and_gradient(model, graph):
    """The outputs, the head's parameter gradient of a force-training loss and, in training, the
    charges' derivative along the positions (∂(w·q)/∂R: the implicit step's geometry part)."""
    graph.positions = graph.positions.detach().requires_grad_(True)
    out = model(graph, compute_stress=False, create_graph=True)
    loss = out["energy"].sum() + (out["forces"] ** 2).sum() + (out["charges"] ** 2).sum()
    grads = list(torch.autograd.grad(loss, list(model.head.parameters()), retain_graph=True))
    if model.training:
        weights = torch.linspace(-1.0, 1.0, out["charges"].numel(), dtype=out["charges"].dtype)
        grads.append(torch.autograd.grad((weights * out["charges"]).sum(), graph.positions)[0])
    return out, torch.cat([g.reshape(-1) for g in grads])


def _batch_against_per_structure(model, graph, monkeypatch, method: str):
    """The outputs with the batch path ``method`` and with it declined (the per-structure path), after
    checking that the batch path was taken and that both give the same energies, charges, forces, μ,
    step counts, convergence, gradients and each structure's total charge."""
    used = spy_on(monkeypatch, type(model.head), method)
    new, g_new = _outputs_and_gradient(model, graph)
    assert used == [True]
    monkeypatch.setattr(type(model.head), method, lambda *args, **kwargs: None)
    old, g_old = _outputs_and_gradient(model, graph)
    for key in ("energy", "charges", "forces", "fermi_level"):
        np.testing.assert_allclose(
            new[key].detach().numpy(), old[key].detach().numpy(), rtol=1e-10, atol=1e-11, err_msg=key
        )
    assert new["iterations"].tolist() == old["iterations"].tolist()
    assert bool(new["converged"].all())
    np.testing.assert_allclose(g_new.numpy(), g_old.numpy(), rtol=1e-9, atol=1e-10)
    # every structure holds its own total charge
    sums = torch.zeros(graph.num_graphs, dtype=new["charges"].dtype).index_add(0, graph.batch, new["charges"])
    np.testing.assert_allclose(sums.detach().numpy(), graph.total_charge.numpy(), atol=1e-10)
    return new, old


HEADS = [
    {"name": "qeq"},
    {"name": "qeq", "parametrization": "softness"},
    {"name": "functional", "quartic": False},
    {"name": "functional", "newton_tol": 1e-12},
]


@pytest.mark.parametrize("batch", [molecules_batch, periodic_batch])
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("training", [True, False])
def test_batch_solve_equals_one_structure_at_a_time(batch, head, training, monkeypatch):
    model = tiny_model(head, seed=41).train(training)
    new, old = _batch_against_per_structure(model, batch(model), monkeypatch, "_batch_solve")
    if head.get("quartic", head["name"] == "functional"):
        assert min(new["iterations"].tolist()) >= 3  # Newton steps, each structure to its own count
        for a, b in zip(new["residuals"], old["residuals"]):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-14)


def test_integer_fragments_and_large_batches_go_structure_by_structure(monkeypatch):
    """Fragments with their own constraints, or a batch beyond ``dense_max_atoms``, keep the solves one
    structure at a time."""
    model = tiny_model({"name": "qeq", "fragments": "integer"}, seed=42)
    used = _spy(monkeypatch, model)
    model(molecules_batch(model), compute_stress=False)
    assert used == []
    model = tiny_model({"name": "qeq", "dense_max_atoms": 12}, seed=42)
    used = _spy(monkeypatch, model)
    model(molecules_batch(model), compute_stress=False)
    assert used == []


def test_functional_not_done_in_max_newton_goes_structure_by_structure(monkeypatch):
    """Newton steps that run out in the batch leave the report to the structure-by-structure path."""
    from aiida_emlip.models.heads.solvers import SCFConvergenceError

    model = tiny_model({"name": "functional", "max_newton": 2, "newton_tol": 1e-14}, seed=43)
    used = _spy(monkeypatch, model)
    with pytest.raises(SCFConvergenceError, match="did not converge"):
        model(molecules_batch(model), compute_stress=False)
    assert used == [False]


FORMAL = {"Na": 1.0, "Cl": -1.0, "O": -0.6, "H": 0.3}
BONDS = [
    {"name": "qeq", "fragments": "bonds", "formal_charges": FORMAL},
    {"name": "functional", "fragments": "bonds", "formal_charges": FORMAL},
    {"name": "functional", "fragments": "bonds", "formal_charges": FORMAL, "parametrization": "softness"},
]


@pytest.mark.parametrize("batch", [molecules_batch, periodic_batch])
@pytest.mark.parametrize("head", BONDS, ids=["qeq", "functional", "functional-softness"])
@pytest.mark.parametrize("training", [True, False])
def test_bonds_batch_equals_one_structure_at_a_time(batch, head, training, monkeypatch):
    """``fragments='bonds'``: one Newton solve of the batch's block-diagonal problem a step, each
    structure held where it converged, is the structure-by-structure minimisation: the same steps, the
    same charges (each fragment at its integer), forces, μ and gradients."""
    uneven = head["name"] == "functional" and "parametrization" not in head
    if uneven:
        # tolerances at which these structures take different numbers of Newton steps
        head = {**head, "newton_tol": 1e-8 if batch is molecules_batch else 1e-12}
    model = tiny_model(head, seed=44).train(training)
    graph = batch(model)
    new, old = _batch_against_per_structure(model, graph, monkeypatch, "_bonds_batch")
    if head["name"] == "functional":
        assert min(new["iterations"].tolist()) >= 2  # Newton steps
        assert len(set(new["iterations"].tolist())) > 1 or not uneven  # each structure to its own count
        for a, b in zip(new["residuals"], old["residuals"]):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-14)
    else:
        assert new["iterations"].tolist() == [1] * graph.num_graphs


def test_bonds_batch_not_done_in_max_newton_goes_structure_by_structure(monkeypatch):
    """Newton steps that run out in the batch leave the report to the structure-by-structure path; a
    batch beyond ``dense_max_atoms`` is not taken as one."""
    from aiida_emlip.models.heads.solvers import SCFConvergenceError

    head = {**BONDS[1], "max_newton": 2, "newton_tol": 1e-14}
    model = tiny_model(head, seed=45)
    used = spy_on(monkeypatch, type(model.head), "_bonds_batch")
    with pytest.raises(SCFConvergenceError, match="did not converge"):
        model(molecules_batch(model), compute_stress=False)
    assert used == [False]
    model = tiny_model({**BONDS[0], "dense_max_atoms": 12}, seed=45)
    used = spy_on(monkeypatch, type(model.head), "_bonds_batch")
    model(molecules_batch(model), compute_stress=False)
    assert used == []
