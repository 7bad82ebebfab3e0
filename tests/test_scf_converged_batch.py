"""The converged (``converge``/``implicit``) iteration of a batch of small structures at once: the
charges, μ, forces and parameter gradients of one iteration per structure, the same step counts where
both mix alike, non-convergence and divergence reported as before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models_helpers import molecules_batch, periodic_batch, spy_on, tiny_model

from aiida_emlip.models.heads.base import HeadInput
from aiida_emlip.models.heads.scf import _Anderson, _BatchAnderson
from aiida_emlip.models.heads.solvers import SCFConvergenceError


def _spy(monkeypatch, model) -> list[bool]:
    return spy_on(monkeypatch, type(model.head), "_converged_batch")


def _run(model, graph, mode: str, grad: bool):
    """Outputs in ``mode`` and, with ``grad``, the head's parameter gradient of a force-training loss."""
    if not grad:
        with torch.no_grad():
            return model(graph, scf_mode=mode, compute_forces=False, compute_stress=False), None
    out = model(graph, scf_mode=mode, compute_stress=False, create_graph=True)
    loss = out["energy"].sum() + (out["forces"] ** 2).sum() + (out["charges"] ** 2).sum()
    grads = torch.autograd.grad(loss, list(model.head.parameters()))
    return out, torch.cat([g.reshape(-1) for g in grads])


def _both(monkeypatch, model, graph, mode: str, grad: bool = True):
    """The batch iterated as one, then structure by structure."""
    used = _spy(monkeypatch, model)
    new = _run(model, graph, mode, grad)
    assert used == [True]
    monkeypatch.setattr(type(model.head), "_converged_batch", lambda *args, **kwargs: None)
    return new, _run(model, graph, mode, grad)


HEADS = [
    {"name": "scf"},
    {"name": "scf", "update": "mlp"},
    {"name": "scf", "fragments": "shared"},
    {"name": "scf", "mixer": "linear", "mixing": 0.5},
    {"name": "scf", "ensemble": "constant_mu", "fermi_level": -1.0},
]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("mode", ["implicit", "converge"])
def test_open_batch_equals_per_structure(head, mode, monkeypatch):
    """Open structures: the same steps as one iteration per structure (same step counts and
    residuals), so the charges, μ, forces and force-loss gradient agree to round-off."""
    model = tiny_model(head, seed=31)
    graph = molecules_batch(model)
    (new, g_new), (old, g_old) = _both(monkeypatch, model, graph, mode)
    assert new["iterations"].tolist() == old["iterations"].tolist()
    assert min(new["iterations"].tolist()) > 2  # the structures do iterate
    assert bool(new["converged"].all())
    for a, b in zip(new["residuals"], old["residuals"]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-13)
    for key in ("energy", "charges", "forces", "fermi_level"):
        np.testing.assert_allclose(
            new[key].detach().numpy(), old[key].detach().numpy(), rtol=1e-10, atol=1e-11, err_msg=key
        )
    np.testing.assert_allclose(g_new.numpy(), g_old.numpy(), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("head", HEADS[:3])
def test_periodic_batch_reaches_the_per_structure_fixed_point(head, monkeypatch):
    """Periodic cells take exactly inverted ``J + A`` steps in the batch, the mesh's approximation of
    them one by one: other steps to the same fixed point, and after the implicit Newton step the same
    charges, forces and gradient."""
    model = tiny_model({**head, "tol": 1e-10}, seed=32)
    graph = periodic_batch(model)
    (new, g_new), (old, g_old) = _both(monkeypatch, model, graph, "implicit")
    assert bool(new["converged"].all()) and bool(old["converged"].all())
    for key in ("energy", "charges", "forces", "fermi_level"):
        np.testing.assert_allclose(
            new[key].detach().numpy(), old[key].detach().numpy(), rtol=1e-9, atol=1e-10, err_msg=key
        )
    np.testing.assert_allclose(g_new.numpy(), g_old.numpy(), rtol=1e-8, atol=1e-9)
    # the exact block inverse steps at least as well as the mesh's approximation
    steps = list(zip(new["iterations"].tolist(), old["iterations"].tolist()))
    assert all(a <= b for a, b in steps), steps


def test_head_without_autograd_batch_equals_per_structure(monkeypatch):
    """The head called without autograd returns the iterated charges (no implicit step to take)."""
    model = tiny_model({"name": "scf", "update": "mlp"}, seed=33)
    graph = molecules_batch(model)
    feats = model.backbone(graph, graph.positions, graph.cell)
    inp = HeadInput(
        graph, graph.positions, graph.cell, feats, model.backbone.species(graph.numbers), model.electrostatics
    )
    inp.scf_mode = "converge"
    used = _spy(monkeypatch, model)
    with torch.no_grad():
        new = model.head(inp)
        assert used == [True]
        monkeypatch.setattr(type(model.head), "_converged_batch", lambda *args, **kwargs: None)
        old = model.head(inp)
    assert not new.charges.requires_grad
    assert new.iterations.tolist() == old.iterations.tolist()
    for key in ("energy", "charges", "fermi_level"):
        a, b = getattr(new, key).numpy(), getattr(old, key).numpy()
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12, err_msg=key)


def test_batch_anderson_steps_each_structure_as_its_own():
    """Two structures mixed together take the steps each takes alone; a structure whose history stops
    moving gets a non-finite step, which the iteration never applies."""
    rng = np.random.default_rng(4)
    index = torch.tensor([0, 0, 0, 1, 1])
    together = _BatchAnderson(3, 0.4, index, 2)
    alone = [_Anderson(3, 0.4), _Anderson(3, 0.4)]
    x = torch.tensor(rng.normal(size=5))
    for _ in range(6):
        f = torch.tanh(x) - 0.7 * x + 0.1
        stepped = together.step(x, f)
        expected = torch.cat([alone[0].step(x[:3], f[:3]), alone[1].step(x[3:], f[3:])])
        # the two least-squares solves round differently (MKL's code path depends on the CPU), and the
        # history's conditioning grows as the steps converge: agreement to rounding, not bit for bit
        torch.testing.assert_close(stepped, expected, rtol=1e-9, atol=1e-10)
        x = stepped


def test_non_convergence_in_a_batch_is_raised_or_flagged(monkeypatch):
    """The step limit reached in the batch: the structure named, or flagged with its step count."""
    graph = molecules_batch(tiny_model({"name": "scf"}, seed=34))
    model = tiny_model({"name": "scf", "max_steps": 3, "tol": 1e-14}, seed=34)
    used = _spy(monkeypatch, model)
    with pytest.raises(SCFConvergenceError, match=r"structure 0 did not converge \(max_steps = 3"):
        model(graph, scf_mode="implicit", compute_stress=False)
    assert used == []  # raised within the batch, before it returned
    flagged = tiny_model({"name": "scf", "max_steps": 3, "tol": 1e-14, "on_failure": "flag"}, seed=34)
    out = flagged(graph, scf_mode="implicit", compute_stress=False)
    assert used == [True]
    assert out["converged"].tolist() == [False] * 4
    assert out["iterations"].tolist() == [3] * 4


def test_divergence_in_a_batch_is_reported_by_the_per_structure_iteration(monkeypatch):
    """A structure whose steps blow up stops the batch; the per-structure iteration then says why."""
    config = {"name": "scf", "mixer": "linear", "mixing": 1.0, "widths": [1.5]}
    model = tiny_model(config, seed=17)
    with torch.no_grad():
        model.head.susceptibility[-1].bias.fill_(8.0)
    graph = molecules_batch(model)
    used = _spy(monkeypatch, model)
    with pytest.raises(SCFConvergenceError, match="changed a charge"):
        model(graph, scf_mode="implicit", compute_stress=False)
    assert used == [False]


@pytest.mark.parametrize("every", [3, 8])
def test_sparse_host_checks_give_the_steps_of_every_check(every, monkeypatch):
    """With the host looking every few steps (as on an accelerator) the batch returns each structure's
    charges, μ, step count and residuals of the step where it converged, bit for bit, in one transfer
    per look."""
    from aiida_emlip.models.heads import solvers
    from aiida_emlip.models.heads.scf import SelfConsistentHead

    model = tiny_model({"name": "scf", "update": "mlp", "tol": 1e-10}, seed=31)
    graph = molecules_batch(model)
    runs = []
    for interval in (1, every):
        monkeypatch.setattr(SelfConsistentHead, "check_every", interval)
        looks: list[int] = []

        def counting(values, looks=looks, host=solvers._host):
            looks.append(1)
            return host(values)

        monkeypatch.setattr(solvers, "_host", counting)
        used = _spy(monkeypatch, model)
        out = model(graph, scf_mode="implicit", compute_stress=False)
        assert used == [True]
        runs.append((out, len(looks)))
        monkeypatch.undo()
    (reference, looks_1), (out, looks_k) = runs
    steps = reference["iterations"].tolist()
    assert len(set(steps)) > 1, steps  # the structures converge at different steps
    assert out["iterations"].tolist() == steps
    for key in ("charges", "fermi_level", "forces"):
        torch.testing.assert_close(out[key], reference[key], atol=0, rtol=0)
    for a, b in zip(out["residuals"], reference["residuals"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    others = looks_1 - max(steps)  # transfers outside the iteration
    assert looks_k == -(-max(steps) // every) + others
