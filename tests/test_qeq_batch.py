"""``qeq``'s KKT solves of a batch of small structures as one block-diagonal system: the charges, μ,
energies, forces and parameter gradients of one solve per structure."""

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


@pytest.mark.parametrize("batch", [molecules_batch, periodic_batch])
@pytest.mark.parametrize("head", [{"name": "qeq"}, {"name": "qeq", "parametrization": "softness"}])
@pytest.mark.parametrize("training", [True, False])
def test_batch_solve_equals_one_structure_at_a_time(batch, head, training, monkeypatch):
    model = tiny_model(head, seed=41).train(training)
    graph = batch(model)
    used = _spy(monkeypatch, model)
    new, g_new = _outputs_and_gradient(model, graph)
    assert used == [True]
    monkeypatch.setattr(type(model.head), "_batch_solve", lambda *args, **kwargs: None)
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
