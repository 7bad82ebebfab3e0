r"""Linear solvers shared by the self-consistent heads (no AiiDA).

* :func:`conjugate_gradient` — preconditioned CG for SPD operators, several right-hand sides at once.
* :func:`gmres` — restarted GMRES for the non-symmetric linearised SCF systems.
* :func:`qeq_solve` — the charge-equilibration KKT system
  ``[[H, 1], [1ᵀ, 0]] [q; μ] = [−b; Q]`` with ``H = A + diag(d)`` SPD, solved as two SPD systems
  ``H x = −b`` and ``H y = 1``, ``μ = (Σx − Q)/Σy``, ``q = x − μ y`` (so ``H q + b = −μ 1``).
* :class:`ImplicitStep` — the differentiable Newton step ``z* − K⁻¹ g(z*)`` of the implicit function
  theorem: its forward value is ``K⁻¹ g`` (or zero), its backward applies ``K⁻ᵀ``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from aiida_emlip.models.heads.replay import State, advance, replay_mode

Matvec = Callable[[torch.Tensor], torch.Tensor]

#: Iterations between two host checks of an iterative solve on an accelerator (see
#: :func:`check_interval`): at most this many wasted matvecs once a solve has converged, against one
#: wait for the device's queue per iteration.
DEVICE_CHECK_EVERY = 8


class SCFConvergenceError(RuntimeError):
    """An iterative head did not converge or diverged, and ``on_failure='raise'``."""


def default_tolerance(requested: float, dtype: torch.dtype) -> float:
    """``requested``, but never below what ``dtype`` resolves in a PME potential (500 ε).

    float32: 6e-5 (PME round-off at ~10⁴ atoms leaves charge residuals of ~1e-5 e); float64: 1e-13.
    """
    return max(requested, 500.0 * torch.finfo(dtype).eps)


#: A sum ``Σxᵢ`` is resolved only to about ``ε·Σ|xᵢ|`` in floating point: the charge-conservation error
#: ``|ΣF − Q|`` of a fixed-point step is judged beyond this many ``ε·Σ|F|`` (measured floor in float32, water
#: 1k–16k atoms: 1.4 ``ε·Σ|F|`` on the CPU, ~2.3 on a GPU, where it rose above the 500 ε tolerance from
#: ~10⁴ atoms and an SCF never converged).
SUM_ROUNDOFF = 8.0


def charge_error_beyond_roundoff(error: torch.Tensor, abs_sums: torch.Tensor) -> torch.Tensor:
    """``abs(error)`` less what floating point resolves of the sums it came from (``abs_sums``: ``Σ|xᵢ|``
    of each sum), never negative: the part of a charge-conservation error a solver can still remove."""
    floor = SUM_ROUNDOFF * torch.finfo(error.dtype).eps * abs_sums
    return (error.abs() - floor).clamp(min=0.0)


@dataclass
class SolveInfo:
    """How an iterative solve ended."""

    iterations: int
    residual: float
    converged: bool
    #: the preconditioner operator was not positive at some step and its fallback took over
    fallback: bool = False


def _preconditioner(precond) -> tuple[Callable[[torch.Tensor], torch.Tensor], object, bool]:
    """``(apply, source, checked)`` of a preconditioner given as ``None``, a Jacobi diagonal ``[N]``
    or an operator ``r ↦ M⁻¹ r`` with a ``fallback`` (a preconditioner) or ``diag`` attribute (its
    Jacobi fallback); ``checked``: the solver tests ``rᵀM⁻¹r > 0`` and moves to
    :func:`_fallback` of ``source``, which is only then looked up (an operator may build it lazily)."""
    if precond is None:
        return (lambda r: r), None, False
    if isinstance(precond, torch.Tensor):
        inv = 1.0 / precond

        def jacobi(r: torch.Tensor) -> torch.Tensor:
            return (inv[:, None] if r.dim() == 2 else inv) * r

        return jacobi, precond, False
    return precond, precond, True


def _fallback(source):
    """What a solve continues with once the operator ``source`` was not positive."""
    return getattr(source, "fallback", source.diag)


def _polak_ribiere(rz_new: torch.Tensor, r_z_old: torch.Tensor, rz: torch.Tensor) -> torch.Tensor:
    """``β = r_{k+1}ᵀ(z_{k+1} − z_k) / r_kᵀz_k``, at least 0: the Fletcher–Reeves value for a fixed
    preconditioner (``r_{k+1}ᵀz_k = 0``), and robust to one that varies slightly with ``r`` (the mesh
    preconditioner's inner steps)."""
    return ((rz_new - r_z_old) / rz).clamp(min=0.0)


def check_interval(device: torch.device, check_every: int | None) -> int:
    """Iterations between the host's looks at a solve's convergence: ``check_every``, or by default 1 on
    the CPU (a look costs nothing there) and :data:`DEVICE_CHECK_EVERY` on an accelerator, where each
    look waits for the device's queue to drain."""
    if check_every is None:
        return 1 if device.type == "cpu" else DEVICE_CHECK_EVERY
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    return check_every


def _host(values: torch.Tensor) -> list:
    """Bring ``values`` to the host: the one synchronisation point of the solvers' loops."""
    return values.tolist()


def _iterate(
    state: State,
    step: Callable[[State], State],
    flags: Callable[[State], tuple[torch.Tensor, torch.Tensor]],
    fall_back: Callable[[State], State],
    every: int,
    maxiter: int,
) -> State:
    """The loop of the conjugate-gradient solves: up to ``maxiter`` iterations ``step`` from ``state``.

    Every ``every`` iterations the host reads ``flags(state)`` — what still moves, and where ``M⁻¹`` was
    found not positive — in one transfer: it stops when nothing moves, and moves to ``fall_back(state)``
    (the Jacobi fallback; the caller rebinds its preconditioner) where ``M⁻¹`` failed. Within
    :func:`~aiida_emlip.models.heads.replay.replayed_iterations` the iterations after the first are
    replayed, until a fallback (the replay holds the former preconditioner)."""
    mode, replay = replay_mode(state[0].device), None
    for it in range(maxiter):
        if it % every == 0:
            tests = [t if t.dim() == 0 else t.any() for t in flags(state)]  # one column: already a scalar
            go, bad = (bool(v) for v in _host(torch.stack(tests)))
            if not go:
                break
            if bad:
                state, replay = fall_back(state), None
        state, replay = advance(step, state, replay, it == 0 and maxiter > 1, mode)
    return state


def conjugate_gradient(
    matvec: Matvec,
    b: torch.Tensor,
    precond=None,
    tol: float = 1e-10,
    maxiter: int = 1000,
    x0: torch.Tensor | None = None,
    check_every: int | None = None,
) -> tuple[torch.Tensor, SolveInfo]:
    """Solve ``H X = B`` for SPD ``H`` column by column in lock-step; ``b`` is ``[N]`` or ``[N, C]``.

    ``precond`` is the diagonal of a Jacobi preconditioner (``[N]``) or an operator ``r ↦ M⁻¹ r`` with
    the Jacobi diagonal as its ``diag`` attribute (e.g. the mesh preconditioner of
    :class:`~aiida_emlip.models.coulomb_operator.MeshPreconditioner`); an operator whose ``rᵀM⁻¹r``
    is not positive at some step is replaced by its fallback from the current iterate. Convergence when
    every column's residual norm is below ``tol · ‖b_c‖``.

    Each column's tests run on the device: a converged column stops moving (its step length is zero),
    and so does one where ``M⁻¹`` is not positive, until the host next looks, every
    :func:`check_interval` iterations, and moves all columns to the fallback. The iterations reported
    are those of the column that needed most, whatever the interval. Within
    :func:`~aiida_emlip.models.heads.replay.replayed_iterations` the iterations after the first are
    replayed (on a GPU as a CUDA graph), as in :func:`qeq_solve_from`.
    """
    vector = b.dim() == 1
    b2 = b[:, None] if vector else b
    every = check_interval(b.device, check_every)
    apply, source, checked = _preconditioner(precond)
    x = torch.zeros_like(b2) if x0 is None else (x0[:, None] if vector else x0).clone()
    r = b2 - matvec(x) if x0 is not None else b2.clone()
    z = apply(r)
    target = tol * torch.linalg.vector_norm(b2, dim=0).clamp(min=torch.finfo(b.dtype).tiny)
    res = torch.linalg.vector_norm(r, dim=0)
    stalled = torch.zeros_like(res, dtype=torch.bool)  # columns waiting for the fallback
    steps = torch.zeros_like(res, dtype=torch.long)  # iterations each column has taken
    # the state of the iteration: X, R, Z, P, rᵀz, ‖r‖, columns where M⁻¹ was not positive, iterations
    state = (x, r, z, z.clone(), (r * z).sum(0), res, stalled, steps)

    def flags(state: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """The columns still moving on, and those where ``M⁻¹`` is not positive."""
        rz, res, stalled = state[4], state[5], state[6]
        active = res > target
        if checked:
            stalled = stalled | (active & ~(rz > 0))
        return active, stalled

    def step(state: tuple) -> tuple:
        x, r, z, p, rz, _, _, steps = state
        active, stalled = flags(state)
        moving = active & ~stalled
        hp = matvec(p)
        php = (p * hp).sum(0)
        alpha = torch.where(moving, rz / php, torch.zeros_like(rz))
        x = x + alpha * p
        r = r - alpha * hp
        z_old, z = z, apply(r)
        rz_new = (r * z).sum(0)
        beta = torch.where(moving, _polak_ribiere(rz_new, (r * z_old).sum(0), rz), torch.zeros_like(rz))
        p = torch.where(moving, z + beta * p, p)
        rz = torch.where(moving, rz_new, rz)
        return x, r, z, p, rz, torch.linalg.vector_norm(r, dim=0), stalled, steps + moving

    fell_back = False

    def fall_back(state: tuple) -> tuple:
        nonlocal apply, source, checked, fell_back
        apply, source, checked = _preconditioner(_fallback(source))
        fell_back = True
        x, r, _, _, _, res, stalled, steps = state
        z = apply(r)
        return x, r, z, z.clone(), (r * z).sum(0), res, torch.zeros_like(stalled), steps

    state = _iterate(state, step, flags, fall_back, every, maxiter)
    x, _, _, _, _, res, _, steps = state
    worst, converged, taken = _host(
        torch.stack(
            [
                (res / target.clamp(min=1e-300) * tol).max(),
                (res <= target).all().to(res.dtype),
                steps.max().to(res.dtype),
            ]
        )
    )
    return (x[:, 0] if vector else x), SolveInfo(int(taken), worst, bool(converged), fell_back)


def gmres(
    matvec: Matvec,
    b: torch.Tensor,
    tol: float = 1e-10,
    maxiter: int = 300,
    restart: int = 40,
    check_every: int | None = None,
    precond: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, SolveInfo]:
    """Restarted GMRES for ``K x = b``, ``b`` ``[n]``; relative tolerance.

    ``precond`` ``v ↦ P v`` (optional) preconditions on the right in the flexible form (FGMRES): each
    step keeps ``z_k = P v_k`` beside the Arnoldi vector and the solution is built from the ``z_k``, so
    ``P`` may vary from step to step (the mesh preconditioner's inner steps) and the residual
    minimised is still that of ``K x = b``.

    The Arnoldi basis is orthogonalised by classical Gram–Schmidt applied twice (two matrix products
    per step, as stable as modified Gram–Schmidt). The Hessenberg matrix is filled on the device and
    read by the host every :func:`check_interval` steps, which solves the small least-squares problems
    with Givens rotations (float64, no device work per step beyond the Arnoldi vector) and takes the
    solution of the first step that met the tolerance (or broke down), so the answer and the
    iterations reported do not depend on the interval.
    """
    n = b.shape[0]
    every = check_interval(b.device, check_every)
    x = torch.zeros_like(b)
    norm_b = float(torch.linalg.vector_norm(b))
    if norm_b == 0.0:
        return x, SolveInfo(0, 0.0, True)
    total, rel = 0, 1.0
    restart = max(1, min(restart, n + 1))
    tiny = torch.finfo(b.dtype).tiny
    while total < maxiter:
        r = b - matvec(x) if total else b.clone()
        beta = float(torch.linalg.vector_norm(r))
        rel = beta / norm_b
        if rel <= tol:
            break
        basis = torch.zeros(n, restart + 1, dtype=b.dtype, device=b.device)
        basis[:, 0] = r / beta
        directions = basis if precond is None else torch.zeros_like(basis)  # z_k = P v_k
        hess = torch.zeros(restart + 1, restart, dtype=b.dtype, device=b.device)
        lsq = _HessenbergLeastSquares(beta)
        k_used = 0
        for k in range(restart):
            if precond is not None:
                directions[:, k] = precond(basis[:, k])
            w = matvec(directions[:, k])
            v = basis[:, : k + 1]
            h = v.T @ w
            w = w - v @ h
            h2 = v.T @ w  # the second pass restores the orthogonality the first one loses
            w = w - v @ h2
            norm = torch.linalg.vector_norm(w)
            hess[: k + 1, k] = h + h2
            hess[k + 1, k] = norm
            basis[:, k + 1] = w / norm.clamp(min=tiny)
            last = k == restart - 1 or total + k + 1 >= maxiter
            if (k + 1) % every and not last:
                continue
            columns = _host(hess[: k + 2, len(lsq.rotations) : k + 1].T.double())
            done = None
            for column in columns:
                j = len(lsq.rotations)
                residual = lsq.add_column(column[: j + 2])
                if residual / norm_b <= tol or abs(column[j + 1]) < 1e-300:
                    done = j
                    break
            if done is not None or last:
                k_used = (done if done is not None else k) + 1
                break
        total += k_used
        rel = lsq.residuals[k_used - 1] / norm_b
        solution = torch.tensor(lsq.solution(k_used), dtype=b.dtype, device=b.device)
        x = x + directions[:, :k_used] @ solution
        if rel <= tol:
            break
    return x, SolveInfo(total, rel, rel <= tol)


class _HessenbergLeastSquares:
    """``min_y ‖β e₁ − H_k y‖`` of GMRES for a growing upper Hessenberg ``H`` (host, float64): each new
    column is rotated by the earlier Givens rotations and its own; ``residuals[k]`` is the least-squares
    residual after ``k + 1`` columns, ``solution(k)`` the minimiser over the first ``k`` columns."""

    def __init__(self, beta: float):
        self.g = [beta]  # the rotated right-hand side
        self.rotations: list[tuple[float, float]] = []
        self.r_columns: list[list[float]] = []  # columns of the triangular factor
        self.residuals: list[float] = []

    def add_column(self, column: list[float]) -> float:
        """Append column ``k`` (its ``k + 2`` leading entries); return the new residual."""
        col = list(column)
        for i, (c, s) in enumerate(self.rotations):
            col[i], col[i + 1] = c * col[i] + s * col[i + 1], -s * col[i] + c * col[i + 1]
        k = len(self.rotations)
        rho = math.hypot(col[k], col[k + 1])
        c, s = (1.0, 0.0) if rho == 0.0 else (col[k] / rho, col[k + 1] / rho)
        col[k] = rho
        self.rotations.append((c, s))
        self.r_columns.append(col[: k + 1])
        g = self.g[k]
        self.g[k] = c * g
        self.g.append(-s * g)
        self.residuals.append(abs(self.g[k + 1]))
        return self.residuals[-1]

    def solution(self, k: int) -> list[float]:
        """Back substitution ``R[:k, :k] y = g[:k]`` (a zero pivot, a breakdown, contributes nothing)."""
        y = [0.0] * k
        for i in range(k - 1, -1, -1):
            acc = self.g[i] - sum(self.r_columns[j][i] * y[j] for j in range(i + 1, k))
            pivot = self.r_columns[i][i]
            y[i] = acc / pivot if pivot != 0.0 else 0.0
        return y


@dataclass
class QEqSolution:
    """Charges, the Lagrange multiplier μ and what is needed to apply ``K⁻¹`` again."""

    charges: torch.Tensor
    mu: torch.Tensor
    info: SolveInfo
    #: H⁻¹ (dense or CG) for further right-hand sides, and ``H⁻¹ 1``: for the implicit derivatives and
    #: the fragment constraints; ``None`` after a projected solve (inference of one fragment)
    solve_h: Callable[[torch.Tensor], torch.Tensor] | None
    y: torch.Tensor | None
    #: c of the rank-one shift H + c 11ᵀ used when H is indefinite (slab Coulomb matrices are positive
    #: definite only on Σq = 0); it leaves q unchanged and shifts the multipliers by c·Σq.
    shift: float = 0.0
    #: With one constraint per group (:func:`constrain_groups`): the group of each atom [N]; then ``y``
    #: is ``H⁻¹ Cᵀ`` [N, G] (column g: H⁻¹ of group g's indicator) and ``mu`` has one entry per group.
    groups: torch.Tensor | None = None

    def group_sums(self, values: torch.Tensor) -> torch.Tensor:
        """Σ over each group of ``values`` ([N] → [G], [N, k] → [G, k])."""
        assert self.groups is not None
        count = self.y.shape[1]
        return values.new_zeros((count, *values.shape[1:])).index_add(0, self.groups, values)


def qeq_solve(
    matvec: Matvec | None,
    diag: torch.Tensor,
    b: torch.Tensor,
    total: float | torch.Tensor,
    dense: torch.Tensor | None = None,
    precond=None,
    tol: float = 1e-10,
    maxiter: int = 1000,
) -> QEqSolution:
    """Minimise ``½ qᵀ(A + diag d)q + bᵀq`` subject to ``Σq = Q`` (no autograd).

    ``dense`` is ``A`` as a matrix (then ``matvec`` is unused), otherwise ``matvec(x) = A x``.
    Returns ``q`` and ``μ`` with ``(A + diag d) q + b = −μ 1``.
    """
    shift = 0.0
    if dense is not None:
        h = dense + torch.diag(diag)
        factor, status = torch.linalg.cholesky_ex(h)
        if int(status) != 0:
            # The slab (Yeh–Berkowitz/BAC) Coulomb matrix has a negative uniform mode; on Σq = Q the
            # energy is unchanged by c(Σq)² up to a constant, so shift that mode to make H definite.
            lowest = float(torch.linalg.eigvalsh(h)[0])
            shift = 2.0 * (abs(lowest) + float(diag.abs().max()) + 1.0) / h.shape[0]
            h = h + shift * torch.ones_like(h)
            factor = torch.linalg.cholesky(h)

        def solve_h(rhs: torch.Tensor) -> torch.Tensor:
            r2 = rhs[:, None] if rhs.dim() == 1 else rhs
            out = torch.cholesky_solve(r2, factor)
            return out[:, 0] if rhs.dim() == 1 else out

        xy = solve_h(torch.stack([-b, torch.ones_like(b)], dim=1))
        info = SolveInfo(1, 0.0, True)
    else:
        assert matvec is not None

        def full(x: torch.Tensor) -> torch.Tensor:
            return matvec(x) + (diag[:, None] * x if x.dim() == 2 else diag * x)

        def solve_h(rhs: torch.Tensor) -> torch.Tensor:
            return conjugate_gradient(full, rhs, precond, tol, maxiter)[0]

        xy, info = conjugate_gradient(
            full, torch.stack([-b, torch.ones_like(b)], dim=1), precond, tol, maxiter
        )
    x, y = xy[:, 0], xy[:, 1]
    mu = (x.sum() - total) / y.sum()
    return QEqSolution(x - mu * y, mu + shift * total, info, solve_h, y, shift)


def qeq_solve_from(
    matvec: Matvec,
    diag: torch.Tensor,
    b: torch.Tensor,
    total: float | torch.Tensor,
    start: torch.Tensor,
    precond=None,
    tol: float = 1e-10,
    maxiter: int = 1000,
    check_every: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, SolveInfo]:
    """The problem of :func:`qeq_solve` by projected preconditioned CG from the charges ``start`` (a warm
    start: the solution of a nearby geometry); returns ``q``, ``μ`` and the solve's record.

    ``start`` is shifted uniformly onto ``Σq = Q``; every step stays there (search directions with
    Σ = 0, the preconditioner ``M⁻¹`` — Jacobi, or an operator as in :func:`conjugate_gradient` —
    projected onto that plane in its own metric, ``z − M⁻¹1 (1ᵀz)/(1ᵀM⁻¹1)``), so the iteration
    is CG on the plane, where ``H`` is positive definite also for slab Coulomb matrices. The residual
    ``r = −(H q + b)`` tends to ``μ 1``; its uniform part, which the projection ignores, is moved into
    μ at every step so that the small part along the plane is not lost to cancellation against it.
    Converged when that part, ``‖r − mean(r)‖``, is below ``tol · ‖b‖`` (the scale of
    :func:`qeq_solve`'s test), looked at by the host every :func:`check_interval` iterations as in
    :func:`conjugate_gradient`, and once before the loop: the cold start of a neutral structure (q = 0)
    takes its first residual without applying ``A``. No ``H⁻¹ 1`` is formed: for inference, not for
    the implicit derivatives of training. Within :func:`~aiida_emlip.models.heads.replay.replayed_iterations`
    the iterations after the first are replayed (on a GPU as a CUDA graph) and, should ``M⁻¹`` turn out
    not positive, run eagerly again from the fallback on.
    """
    n = b.shape[0]
    q = start + (torch.as_tensor(total, dtype=b.dtype, device=b.device) - start.sum()) / n
    apply, source, checked = _preconditioner(torch.ones_like(b) if precond is None else precond)

    every = check_interval(b.device, check_every)
    hq = matvec(q) if bool(q.any()) else torch.zeros_like(q)
    r = -(hq + diag * q + b)
    mu = r.mean()
    r = r - mu

    def projector(apply, r: torch.Tensor):
        """``M⁻¹`` projected onto Σ = 0 in its own metric, ``x ↦ z − M⁻¹1 (1ᵀz)/(1ᵀM⁻¹1)`` with
        ``z = M⁻¹x``, the denominator ``1ᵀM⁻¹1`` and the projected ``M⁻¹r`` (``M⁻¹1`` and ``M⁻¹r``
        formed in one application of two channels)."""
        both = apply(torch.stack([torch.ones_like(r), r], dim=1))
        m1_sum = both[:, 0].sum()
        unit = both[:, 0] / m1_sum

        def project(x: torch.Tensor) -> torch.Tensor:
            z = apply(x)
            return z - unit * z.sum()

        return project, m1_sum, both[:, 1] - unit * both[:, 1].sum()

    project, m1_sum, z = projector(apply, r)
    fell_back = checked and not float(m1_sum) > 0.0
    if fell_back:
        apply, source, checked = _preconditioner(_fallback(source))
        project, _, z = projector(apply, r)
    target = tol * torch.linalg.vector_norm(b).clamp(min=torch.finfo(b.dtype).tiny)
    stalled = torch.zeros((), dtype=torch.bool, device=b.device)
    steps = torch.zeros((), dtype=torch.long, device=b.device)
    # the state of the iteration: q, r, z, p, rᵀz, μ, ‖r‖, M⁻¹ found not positive, iterations taken
    state = (q, r, z, z.clone(), (r * z).sum(), mu, torch.linalg.vector_norm(r), stalled, steps)

    def flags(state: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """Whether the iteration goes on, and whether M⁻¹ is not positive where it does."""
        res, rz, stalled = state[6], state[4], state[7]
        active = res > target
        if checked:
            stalled = stalled | (active & ~(rz > 0))
        return active, stalled

    def step(state: tuple) -> tuple:
        q, r, z, p, rz, mu, _, _, steps = state
        active, stalled = flags(state)
        moving = active & ~stalled
        hp = matvec(p) + diag * p
        alpha = torch.where(moving, rz / (p * hp).sum(), torch.zeros_like(rz))
        q = q + alpha * p
        r = r - alpha * hp
        uniform = r.mean()
        mu = mu + uniform
        r = r - uniform
        z_old, z = z, project(r)
        rz_new = (r * z).sum()
        p = torch.where(moving, z + _polak_ribiere(rz_new, (r * z_old).sum(), rz) * p, p)
        rz = torch.where(moving, rz_new, rz)
        return q, r, z, p, rz, mu, torch.linalg.vector_norm(r), stalled, steps + moving

    def fall_back(state: tuple) -> tuple:  # M⁻¹ not positive: its fallback from the current charges
        nonlocal apply, source, checked, project, fell_back
        apply, source, checked = _preconditioner(_fallback(source))
        q, r, _, _, _, mu, res, stalled, steps = state
        project, _, z = projector(apply, r)
        fell_back = True
        return q, r, z, z.clone(), (r * z).sum(), mu, res, torch.zeros_like(stalled), steps

    state = _iterate(state, step, flags, fall_back, every, maxiter)
    q, _, _, _, _, mu, res, _, steps = state
    res_host, target_host, taken = _host(torch.stack([res, target, steps.to(res.dtype)]))
    info = SolveInfo(
        int(taken), res_host / max(target_host, 1e-300) * tol, res_host <= target_host, fell_back
    )
    return q, mu, info


def constrain_groups(solution: QEqSolution, groups: torch.Tensor, targets: torch.Tensor) -> QEqSolution:
    """The problem of ``solution`` (one constraint, Σq = Q) with one constraint per group instead:
    ``Σ_{i∈g} q_i = targets[g]`` for each group ``g`` of ``groups`` [N] (0..G−1, every group non-empty).

    Reuses the solve of ``solution``: with ``x = H⁻¹(−b)`` recovered from it and ``Y = H⁻¹ Cᵀ`` (G more
    right-hand sides), ``(C Y) μ = C x − targets`` and ``q = x − Y μ``, so ``H q + b = −μ_{g(i)}`` atom by
    atom. The groups' constraints sum to the structure's, so the rank-one shift of an indefinite ``H``
    still leaves ``q`` unchanged and adds ``c·Q`` to every multiplier.
    """
    count = targets.numel()
    total = solution.charges.sum()
    x = solution.charges + (solution.mu - solution.shift * total) * solution.y
    indicator = torch.zeros(groups.numel(), count, dtype=x.dtype, device=x.device)
    indicator[torch.arange(groups.numel(), device=x.device), groups] = 1.0
    y = solution.solve_h(indicator)
    grouped = QEqSolution(x, x.new_zeros(count), solution.info, solution.solve_h, y, solution.shift, groups)
    mu = torch.linalg.solve(grouped.group_sums(y), grouped.group_sums(x) - targets.to(x.dtype))
    grouped.charges = x - y @ mu
    grouped.mu = mu + solution.shift * targets.sum().to(x.dtype)
    return grouped


def kkt_inverse(
    solution: QEqSolution,
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``(r, s) ↦ (δ, ν)`` with ``H δ + ν 1 = r``, ``Σδ = s`` (symmetric, so also ``K⁻ᵀ``); with groups
    (:func:`constrain_groups`) ``H δ + Cᵀ ν = r``, ``C δ = s``, one ``ν`` and one ``s`` per group."""

    def apply(r: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hr = solution.solve_h(r)
        if solution.groups is None:
            nu = (hr.sum() - s) / solution.y.sum()
            return hr - nu * solution.y, nu + solution.shift * s
        y = solution.y
        nu = torch.linalg.solve(solution.group_sums(y), solution.group_sums(hr) - s)
        return hr - y @ nu, nu + solution.shift * s.sum()

    return apply


PairSolve = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class ImplicitStep(torch.autograd.Function):
    """``(δq, δμ) = K⁻¹ [r; 0]`` with a custom backward ``K⁻ᵀ``: the implicit-function-theorem step.

    ``r`` is the differentiable residual of the stationarity (or fixed-point) condition at the
    converged, detached solution. Subtracting the output from the solution leaves its value unchanged
    when ``value=False`` (forward returns zeros: the solution is already converged) and gives
    ``dz/dθ = −K⁻¹ ∂g/∂θ`` exactly.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, r: torch.Tensor, solve: PairSolve, solve_t: PairSolve, value: bool, mu_zero=None
    ):
        ctx.solve_t = solve_t
        # μ is a scalar, or one per constraint (``mu_zero``: zeros of its shape)
        zero = r.new_zeros(()) if mu_zero is None else torch.zeros_like(mu_zero)
        ctx.mu_shape = zero.shape
        if value:
            dq, dmu = solve(r.detach(), zero)
            return dq, dmu.reshape(zero.shape)
        return torch.zeros_like(r), zero

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_mu: torch.Tensor):  # type: ignore[override]
        with torch.no_grad():
            gq, _ = ctx.solve_t(grad_q.detach(), grad_mu.detach().reshape(ctx.mu_shape))
        return gq, None, None, None, None
