"""The iterative solves look at their convergence from the host only every few iterations.

On an accelerator each look waits for the device's queue; the solvers keep their tests on the device
and bring them to the host every ``check_every`` iterations. The answer, the iterations reported and
the preconditioner's fallback must not depend on the interval.
"""

from __future__ import annotations

import math

import pytest
import torch

from aiida_emlip.models.heads import solvers
from aiida_emlip.models.heads.solvers import (
    DEVICE_CHECK_EVERY,
    check_interval,
    conjugate_gradient,
    qeq_solve,
    qeq_solve_from,
)

DT = torch.float64


def spd_system(n: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense SPD matrix with a spread spectrum (tens of CG iterations) and two right-hand sides."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=gen, dtype=DT)
    h = m @ m.T + 2.0 * torch.eye(n, dtype=DT)
    return h, torch.randn(n, 2, generator=gen, dtype=DT)


class Counter:
    """Counts the solvers' host transfers."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        host = solvers._host

        def counting(values: torch.Tensor) -> list:
            self.calls += 1
            return host(values)

        monkeypatch.setattr(solvers, "_host", counting)


def negative_preconditioner(diag: torch.Tensor):
    """An operator with ``rᵀM⁻¹r < 0`` everywhere: every solve must move to its Jacobi fallback."""
    return type("Negative", (), {"diag": diag.clone(), "__call__": lambda self, r: -r})()


def test_default_interval_is_one_on_cpu_and_larger_on_an_accelerator():
    assert check_interval(torch.device("cpu"), None) == 1
    assert check_interval(torch.device("cuda"), None) == DEVICE_CHECK_EVERY > 1
    assert check_interval(torch.device("cpu"), 5) == 5
    with pytest.raises(ValueError, match="check_every"):
        check_interval(torch.device("cpu"), 0)


@pytest.mark.parametrize("every", [3, 8])
def test_cg_with_sparse_checks_matches_every_step(monkeypatch, every):
    h, b = spd_system()
    x1, info1 = conjugate_gradient(lambda v: h @ v, b, torch.diagonal(h), tol=1e-12, check_every=1)
    counter = Counter(monkeypatch)
    xk, infok = conjugate_gradient(lambda v: h @ v, b, torch.diagonal(h), tol=1e-12, check_every=every)
    assert info1.converged and infok.converged
    assert info1.iterations > 20  # a solve long enough for the interval to matter
    # converged columns stand still: the extra iterations change nothing
    assert infok.iterations == info1.iterations
    assert torch.equal(xk, x1)
    assert torch.allclose(h @ xk, b, atol=1e-9, rtol=0)
    assert counter.calls <= math.ceil(info1.iterations / every) + 2


def test_cg_moves_to_the_fallback_at_the_next_check(monkeypatch):
    h, b = spd_system(seed=1)
    jacobi = conjugate_gradient(lambda v: h @ v, b, torch.diagonal(h), tol=1e-12, check_every=1)[1]
    counter = Counter(monkeypatch)
    x, info = conjugate_gradient(
        lambda v: h @ v, b, negative_preconditioner(torch.diagonal(h)), tol=1e-12, check_every=4
    )
    assert info.fallback and info.converged
    assert torch.allclose(h @ x, b, atol=1e-9, rtol=0)
    assert info.iterations == jacobi.iterations  # no step was taken with the bad operator
    assert counter.calls <= math.ceil(info.iterations / 4) + 3


@pytest.mark.parametrize("bad", [False, True])
def test_projected_solve_with_sparse_checks(monkeypatch, bad):
    h, b2 = spd_system(seed=2)
    d = torch.linspace(0.5, 2.0, h.shape[0], dtype=DT)
    b = b2[:, 0]
    exact = qeq_solve(None, d, b, 1.0, dense=h)
    precond = negative_preconditioner(d + torch.diagonal(h)) if bad else d + torch.diagonal(h)
    start = torch.zeros_like(b)
    q1, mu1, info1 = qeq_solve_from(lambda v: h @ v, d, b, 1.0, start, precond, tol=1e-12, check_every=1)
    counter = Counter(monkeypatch)
    q, mu, info = qeq_solve_from(lambda v: h @ v, d, b, 1.0, start, precond, tol=1e-12, check_every=6)
    assert info.converged and info.fallback == bad
    assert info.iterations == info1.iterations > 12
    assert torch.allclose(q, exact.charges, atol=1e-9, rtol=0)
    assert abs(float(mu - exact.mu)) < 1e-8
    assert abs(float(q.sum()) - 1.0) < 1e-12
    assert torch.allclose(q, q1, atol=1e-12, rtol=0)
    assert abs(float(mu - mu1)) < 1e-11
    assert counter.calls <= math.ceil(info.iterations / 6) + 3


@pytest.mark.parametrize("restart", [40, 9], ids=["one-cycle", "restarted"])
def test_gmres_with_sparse_checks_matches_every_step(monkeypatch, restart):
    """A non-symmetric system: the same iterations and solution at any interval, the host reached about
    once per interval (plus once per restart cycle), and the residual as numpy's solve gives it."""
    gen = torch.Generator().manual_seed(4)
    n = 50
    k = torch.randn(n, n, generator=gen, dtype=DT) / math.sqrt(n) + 1.5 * torch.eye(n, dtype=DT)
    b = torch.randn(n, generator=gen, dtype=DT)
    x1, info1 = solvers.gmres(lambda v: k @ v, b, tol=1e-12, restart=restart, check_every=1)
    counter = Counter(monkeypatch)
    x5, info5 = solvers.gmres(lambda v: k @ v, b, tol=1e-12, restart=restart, check_every=5)
    assert info1.converged and info5.converged
    assert info5.iterations == info1.iterations > 10
    assert torch.allclose(x5, x1, atol=1e-12, rtol=0)
    exact = torch.linalg.solve(k, b)
    assert torch.allclose(x5, exact, atol=1e-10, rtol=0)
    cycles = math.ceil(info1.iterations / restart)
    assert counter.calls <= math.ceil(info1.iterations / 5) + 2 * cycles


def test_gmres_stops_at_a_breakdown():
    """A matrix with three distinct eigenvalues: the Krylov space is exhausted after three steps (the
    next basis vector is zero); the solve stops there with the exact answer at any interval."""
    gen = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=DT))
    k = q @ torch.diag(torch.tensor([1.0] * 7 + [2.0] * 7 + [5.0] * 6, dtype=DT)) @ q.T
    b = torch.randn(20, generator=gen, dtype=DT)
    for every in (1, 8):
        x, info = solvers.gmres(lambda v: k @ v, b, tol=1e-14, check_every=every)
        assert info.converged and info.iterations == 3
        assert torch.allclose(k @ x, b, atol=1e-11, rtol=0)


def _scf_run(monkeypatch, every: int | None, head: dict, stop_at: int | None = None) -> tuple[dict, int]:
    """An ``scf`` model in inference on a charged water + NaCl cluster, the host looking every ``every``
    fixed-point steps (``stop_at``: a stop reason raised at that step); its outputs and the host
    transfers it made."""
    from models_helpers import evaluate, tiny_model, water_cluster

    from aiida_emlip.models.heads.scf import SelfConsistentHead

    monkeypatch.setattr(SelfConsistentHead, "check_every", every)
    if stop_at is not None:
        monkeypatch.setattr(
            SelfConsistentHead, "_stop_reason", lambda self, step, *a: "stop" if step == stop_at else None
        )
    counter = Counter(monkeypatch)
    out = evaluate(tiny_model(head, seed=2).eval(), water_cluster(1.0))
    monkeypatch.undo()
    return out, counter.calls


SCF_HEADS = [
    {"name": "scf", "mixer": "anderson", "on_failure": "flag"},
    {"name": "scf", "mixer": "linear", "mixing": 0.2, "on_failure": "flag"},
]


@pytest.mark.parametrize("head", SCF_HEADS, ids=["anderson", "linear"])
def test_scf_iteration_with_sparse_checks_matches_every_step(monkeypatch, head):
    """The fixed-point iteration keeps each step's tests and (q, μ) on the device: at any interval it
    returns the charges, μ, steps and residuals of the step that converged, in one host transfer per
    ``every`` steps."""
    reference, reference_calls = _scf_run(monkeypatch, 1, head)
    steps = int(reference["iterations"][0])
    assert steps >= 6 and bool(reference["converged"].all())
    others = reference_calls - steps  # transfers outside the iteration
    assert others >= 0
    for every in (3, 5, 8):
        out, calls = _scf_run(monkeypatch, every, head)
        torch.testing.assert_close(out["charges"], reference["charges"], atol=0, rtol=0)
        torch.testing.assert_close(out["fermi_level"], reference["fermi_level"], atol=0, rtol=0)
        assert out["iterations"].tolist() == reference["iterations"].tolist()
        assert [float(r[0]) for r in out["residuals"]] == [float(r[0]) for r in reference["residuals"]]
        assert calls == math.ceil(steps / every) + others


def test_scf_iteration_stops_at_the_failing_step_whatever_the_interval(monkeypatch):
    """A step whose tests fail (here: a stop forced at step 4) ends the iteration with that step's
    charges, read at the next look of the host, not those of the steps run after it."""
    reference, _ = _scf_run(monkeypatch, 1, SCF_HEADS[0], stop_at=4)
    assert not bool(reference["converged"].all()) and len(reference["residuals"]) == 5
    for every in (3, 8):
        out, _ = _scf_run(monkeypatch, every, SCF_HEADS[0], stop_at=4)
        torch.testing.assert_close(out["charges"], reference["charges"], atol=0, rtol=0)
        assert len(out["residuals"]) == 5 and not bool(out["converged"].all())
