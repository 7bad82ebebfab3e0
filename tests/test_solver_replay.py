"""Solver iterations replayed in place: the data flow of a CUDA-graph replay.

``qeq``'s CG solves (the projected CG of inference, the lock-step CG of training) can record one
iteration as a CUDA graph and replay it on fixed state tensors
(:mod:`aiida_emlip.models.heads.replay`). ``emulate`` mode runs that data flow on the CPU — one eager
iteration, then the same step called again and again on the replay's own state tensors, its results
copied into them — so the bookkeeping around a replay (state hand-over, host checks, the
preconditioner's fallback, maxiter) is tested here; the graph itself on a GPU (the CUDA test at the end).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase.build import bulk

from aiida_emlip.models.coulomb_operator import MeshPreconditioner, gaussian_self_potential
from aiida_emlip.models.electrostatics import Electrostatics
from aiida_emlip.models.heads import replay
from aiida_emlip.models.heads.replay import IterationReplay, replay_mode, replayed_iterations, start_replay
from aiida_emlip.models.heads.solvers import conjugate_gradient, qeq_solve, qeq_solve_from

DT = torch.float64


def coulomb_problem(seed: int = 0):
    """Rattled rock salt (64 atoms), its Ewald operator, per-atom hardness and electronegativity, and
    the mesh preconditioner of ``H = A + diag(J)`` (what ``qeq`` solves)."""
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((2, 2, 2))
    rng = np.random.default_rng(seed)
    atoms.positions += rng.normal(scale=0.1, size=atoms.positions.shape)
    pos = torch.tensor(atoms.positions, dtype=DT)
    cell = torch.tensor(atoms.cell.array, dtype=DT)
    es = Electrostatics()
    op = es.coulomb_operator(pos, cell, torch.tensor([True, True, True]))
    gen = torch.Generator().manual_seed(seed)
    n = len(atoms)
    hardness = 2.2 * (1.0 + 0.2 * (torch.rand(n, generator=gen, dtype=DT) - 0.5))
    chi = torch.where(torch.tensor(atoms.numbers) == 11, -2.0, 2.0).to(DT)
    chi = chi + 0.3 * torch.randn(n, generator=gen, dtype=DT)
    sigma = es.config.sigma
    mesh = MeshPreconditioner(pos, cell, math.sqrt(2.0) * sigma)
    return op, hardness, chi, mesh.with_diagonal(hardness + gaussian_self_potential(sigma))


def solve(mode: str, *args, **kwargs):
    with replayed_iterations(mode):
        return qeq_solve_from(*args, **kwargs)


class ReplayCounter:
    """Counts the replayed iterations (so that a test cannot pass with no replay at all)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        call = IterationReplay.__call__

        def counting(replayer):
            self.calls += 1
            return call(replayer)

        monkeypatch.setattr(IterationReplay, "__call__", counting)


@pytest.mark.parametrize("every", [1, 4, 8])
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_replayed_projected_cg_equals_the_eager_one_bit_for_bit(monkeypatch, every, warm):
    op, hardness, chi, precond = coulomb_problem()
    start = 0.5 * torch.sign(-chi) if warm else torch.zeros_like(chi)
    args = (op, hardness, chi, 0.0, start, precond)
    q0, mu0, info0 = solve("eager", *args, tol=1e-12, check_every=every)
    counter = ReplayCounter(monkeypatch)
    q1, mu1, info1 = solve("emulate", *args, tol=1e-12, check_every=every)
    assert info0.converged and info0.iterations >= 6
    # the first iteration eager, the others replayed up to the host check that saw convergence
    assert info0.iterations - 1 <= counter.calls <= info0.iterations + every - 2
    assert torch.equal(q1, q0) and torch.equal(mu1, mu0)
    assert info1 == info0
    # and the answer is QEq's: the dense KKT solve of the same operator
    dense = torch.stack([op(e) for e in torch.eye(len(chi), dtype=DT)], dim=1)
    exact = qeq_solve(None, hardness, chi, 0.0, dense=0.5 * (dense + dense.T))
    assert torch.allclose(q1, exact.charges, atol=1e-9, rtol=0)
    assert abs(float(mu1 - exact.mu)) < 1e-8


def spd_system(n: int = 50, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=gen, dtype=DT)
    return m @ m.T + 2.0 * torch.eye(n, dtype=DT), torch.randn(n, generator=gen, dtype=DT)


class TurningPreconditioner:
    """Jacobi while the residual is large, then ``rᵀM⁻¹r < 0`` (a test on the device, as a replay
    needs): the solve must move to its Jacobi fallback mid-way, and drop the replay that holds the
    operator."""

    def __init__(self, diag: torch.Tensor, below: float) -> None:
        self.diag, self.below = diag.clone(), below

    def __call__(self, r: torch.Tensor) -> torch.Tensor:  # r: [N] or [N, C], a sign per column
        sign = torch.where(torch.linalg.vector_norm(r, dim=0) > self.below, 1.0, -1.0)
        return sign * r / (self.diag if r.dim() == 1 else self.diag[:, None])


@pytest.mark.parametrize("every", [1, 6])
def test_the_fallback_drops_the_replay_and_ends_where_the_eager_solve_does(monkeypatch, every):
    h, b = spd_system()
    d = torch.linspace(0.5, 2.0, h.shape[0], dtype=DT)
    results = []
    for mode in ("eager", "emulate"):
        precond = TurningPreconditioner(d + torch.diagonal(h), below=0.05 * float(b.norm()))
        counter = ReplayCounter(monkeypatch)
        args = (lambda v: h @ v, d, b, 1.0, torch.zeros_like(b), precond)
        results.append((*solve(mode, *args, tol=1e-12, check_every=every), counter.calls))
    (q0, mu0, info0, _), (q1, mu1, info1, replayed) = results
    assert info0.fallback and info0.converged and info0.iterations > 20
    assert torch.equal(q1, q0) and torch.equal(mu1, mu0) and info1 == info0
    # replays until the host check that found the turn, then eager iterations with the fallback
    assert 5 <= replayed < info0.iterations // 2


def test_a_replayed_solve_stops_at_maxiter():
    op, hardness, chi, precond = coulomb_problem(seed=1)
    args = (op, hardness, chi, 0.0, torch.zeros_like(chi), precond)
    eager = solve("eager", *args, tol=1e-14, maxiter=3, check_every=2)
    replayed = solve("emulate", *args, tol=1e-14, maxiter=3, check_every=2)
    assert eager[2].iterations == replayed[2].iterations == 3 and not eager[2].converged
    assert torch.equal(replayed[0], eager[0]) and replayed[2] == eager[2]


def test_iteration_replay_updates_its_own_tensors_in_place():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])

    def swap_and_count(state):
        x, y, n = state
        return y, x, n + 1  # results that are the other state tensors themselves

    runner = IterationReplay(swap_and_count, (a, b, torch.tensor(0)), "emulate")
    first = runner()
    assert [t.tolist() for t in first] == [[3.0, 4.0], [1.0, 2.0], 1]
    second = runner()
    assert all(s is f for s, f in zip(second, first, strict=True))  # the same tensors every time
    assert [t.tolist() for t in second] == [[1.0, 2.0], [3.0, 4.0], 2]
    assert a.tolist() == [1.0, 2.0] and b.tolist() == [3.0, 4.0]  # the caller's state is copied


def test_a_failed_capture_warns_once_and_the_solvers_go_on_eagerly(monkeypatch):
    monkeypatch.setattr(replay, "_capture_failed", False)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: (_ for _ in ()).throw(RuntimeError("no graphs")))
    with pytest.warns(RuntimeWarning, match="could not be captured as a CUDA graph.*no graphs"):
        assert start_replay(lambda s: s, (torch.zeros(2),), "graph") is None
    with replayed_iterations("graph"):
        assert replay_mode(torch.device("cuda")) == "eager"  # not tried again in this process
    monkeypatch.setattr(replay, "_capture_failed", False)
    with replayed_iterations("graph"):
        assert replay_mode(torch.device("cuda")) == "graph"
        assert replay_mode(torch.device("cpu")) == "eager"  # graphs are CUDA's


def test_replay_modes_are_scoped_and_checked():
    assert replay_mode(torch.device("cpu")) == "eager"
    with replayed_iterations("emulate"):
        assert replay_mode(torch.device("cpu")) == "emulate"
        with replayed_iterations("eager"):
            assert replay_mode(torch.device("cpu")) == "eager"
        assert replay_mode(torch.device("cpu")) == "emulate"
    assert replay_mode(torch.device("cpu")) == "eager"
    with pytest.raises(ValueError, match="replay mode must be one of"), replayed_iterations("graphs"):
        pass


def test_qeq_model_with_replayed_iterations_gives_the_eager_results(monkeypatch):
    """The head's own solve (calculator → ``qeq`` → projected CG) under ``emulate``: bit for bit."""
    from models_helpers import tiny_model

    from aiida_emlip.models.calculator import EmlipCalculator

    counter = ReplayCounter(monkeypatch)
    model = tiny_model({"name": "qeq", "solver": "cg", "tol": 1e-10}, seed=4)
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((2, 2, 2))
    atoms.positions += np.random.default_rng(5).normal(scale=0.1, size=atoms.positions.shape)
    results = []
    for mode in ("eager", "emulate"):
        calc = EmlipCalculator(model, device="cpu", warm_start=False)
        frame = atoms.copy()
        frame.calc = calc
        with replayed_iterations(mode):
            energy, forces = frame.get_potential_energy(), frame.get_forces()
        results.append((energy, forces, int(calc.results["iterations"])))
    (e0, f0, it0), (e1, f1, it1) = results
    assert it0 == it1 > 3 and counter.calls == it0 - 1
    assert e1 == e0 and np.array_equal(f1, f0)


@pytest.mark.parametrize("every", [1, 5])
def test_replayed_lock_step_cg_equals_the_eager_one_bit_for_bit(monkeypatch, every):
    """The lock-step CG of training (``H x = −b`` and ``H y = 1`` together, the mesh preconditioner)."""
    op, hardness, chi, precond = coulomb_problem(seed=2)
    rhs = torch.stack([-chi, torch.ones_like(chi)], dim=1)

    def matvec(x: torch.Tensor) -> torch.Tensor:
        return op.potential(x) + hardness[:, None] * x

    results = []
    for mode in ("eager", "emulate"):
        counter = ReplayCounter(monkeypatch)
        with replayed_iterations(mode):
            results.append(
                (*conjugate_gradient(matvec, rhs, precond, tol=1e-12, check_every=every), counter.calls)
            )
    (x0, info0, _), (x1, info1, replayed) = results
    assert info0.converged and info0.iterations >= 6
    assert info0.iterations - 1 <= replayed <= info0.iterations + every - 2
    assert torch.equal(x1, x0) and info1 == info0
    assert torch.allclose(matvec(x1), rhs, atol=1e-9, rtol=0)


def test_lock_step_cg_fallback_mid_solve_drops_the_replay(monkeypatch):
    h, b = spd_system(seed=3)
    rhs = torch.stack([b, torch.ones_like(b)], dim=1)
    results = []
    for mode in ("eager", "emulate"):
        precond = TurningPreconditioner(torch.diagonal(h), below=0.05 * float(b.norm()))
        counter = ReplayCounter(monkeypatch)
        with replayed_iterations(mode):
            results.append(
                (*conjugate_gradient(lambda v: h @ v, rhs, precond, tol=1e-12, check_every=4), counter.calls)
            )
    (x0, info0, _), (x1, info1, replayed) = results
    assert info0.fallback and info0.converged and info0.iterations > 20
    assert torch.equal(x1, x0) and info1 == info0
    assert 3 <= replayed < info0.iterations // 2


def test_qeq_training_step_with_replayed_iterations_gives_the_eager_gradients(monkeypatch):
    """A training step of ``qeq`` on its CG solver (the lock-step solve and the implicit derivatives):
    the same energies, forces and parameter gradients bit for bit with the iterations replayed."""
    from models_helpers import tiny_model

    from aiida_emlip.models.graph import build_graph

    counter = ReplayCounter(monkeypatch)
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((2, 2, 2))
    atoms.positions += np.random.default_rng(6).normal(scale=0.1, size=atoms.positions.shape)
    results = []
    for mode in ("eager", "emulate"):
        model = tiny_model({"name": "qeq", "solver": "cg", "tol": 1e-10}, seed=4)
        model.train()
        graph = build_graph([atoms], model.cutoff, model.dtype)
        with replayed_iterations(mode):
            out = model(graph, compute_stress=False, create_graph=True)
            loss = (out["energy"] ** 2).sum() + (out["forces"] ** 2).mean()
            params = [p for p in model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        results.append((out["energy"].detach(), out["forces"].detach(), [g for g in grads if g is not None]))
    assert counter.calls > 3  # the lock-step solve was replayed
    (e0, f0, g0), (e1, f1, g1) = results
    assert torch.equal(e1, e0) and torch.equal(f1, f0)
    assert len(g0) == len(g1) > 0 and all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))


@pytest.mark.cuda
def test_cuda_graph_replay_matches_the_eager_solve_on_a_gpu(monkeypatch):
    """On a CUDA device: the calculator with ``cuda_graphs=True`` captures ``qeq``'s CG iteration once per
    evaluation, replays it, and gives the eager results (to the round-off of the GPU's atomic sums)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import warnings

    from models_helpers import tiny_model

    from aiida_emlip.models.calculator import EmlipCalculator

    monkeypatch.setattr(replay, "_capture_failed", False)
    graphs = []
    init = IterationReplay.__init__

    def recording(runner, step, state, mode):
        init(runner, step, state, mode)
        graphs.append(runner._graph is not None)

    monkeypatch.setattr(IterationReplay, "__init__", recording)
    model = tiny_model({"name": "qeq", "solver": "cg", "tol": 1e-10}, seed=4)
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((2, 2, 2))
    atoms.positions += np.random.default_rng(5).normal(scale=0.1, size=atoms.positions.shape)
    results = {}
    for graphs_on in (False, True):
        calc = EmlipCalculator(model, device="cuda", warm_start=False, cuda_graphs=graphs_on)
        frame = atoms.copy()
        frame.calc = calc
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="solver iterations could not be captured")
            results[graphs_on] = (
                frame.get_potential_energy(),
                frame.get_forces(),
                calc.results["charges"].copy(),
                int(calc.results["iterations"]),
            )
    assert graphs and all(graphs)  # captured, and not emulated
    (e0, f0, q0, it0), (e1, f1, q1, it1) = results[False], results[True]
    assert it0 == it1 > 3
    assert abs(e1 - e0) < 1e-8
    np.testing.assert_allclose(f1, f0, atol=1e-8, rtol=0)
    np.testing.assert_allclose(q1, q0, atol=1e-9, rtol=0)
