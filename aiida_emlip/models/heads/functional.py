r"""``functional``: the density minimises a learned energy functional; the energy is the minimum.

.. math:: E[q] = \sum_i \big(χ_i q_i + ½ J_i q_i^2 + ¼ K_i q_i^4\big) + E_H[q] − \mathbf E·\mathbf d[q],
   \qquad \sum_i q_i = Q,

with ``χ, J, K`` read out from the local features, ``J > 0`` and ``K ≥ 0`` so that E is strictly convex
in q and the minimum is unique. It is found by Newton's method with the charge constraint: each step
solves the same KKT system as ``qeq`` with the local curvature ``J + 3Kq²`` (dense, or CG with the
PME operator), so with ``quartic=False`` the first step lands exactly on the QEq solution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aiida_emlip.models.heads.qeq import EquilibrationHead, QEqOptions
from aiida_emlip.models.heads.solvers import QEqSolution, SolveInfo, constrain_groups, default_tolerance


@dataclass
class FunctionalOptions(QEqOptions):
    quartic: bool = True  # add ¼ K_i q_i⁴ (K ≥ 0): a non-quadratic, still convex local functional
    newton_tol: float = 1e-9  # e; stop when the largest Newton charge update is below this
    max_newton: int = 50


class FunctionalHead(EquilibrationHead):
    """Variational density: Newton minimisation of a learned convex local functional plus E_H.

    The returned energy is the constrained minimum, stationary in q, so forces follow from the
    Hellmann–Feynman theorem (training mode attaches the implicit derivative as in ``qeq``).
    """

    name = "functional"
    Options = FunctionalOptions
    solves_batches = True

    @property
    def quadratic(self) -> bool:  # type: ignore[override]
        return not self.options.quartic

    @property
    def num_local_outputs(self) -> int:  # type: ignore[override]
        return 3 if self.options.quartic else 2

    def local_parameters(self, inp):
        params = super().local_parameters(inp)
        if self.options.quartic:
            params["quartic"] = torch.nn.functional.softplus(self.readout(inp.features.scalars)[:, 2])
        return params

    def local_energy(self, params, q):
        e = super().local_energy(params, q)
        return e + 0.25 * params["quartic"] * q**4 if "quartic" in params else e

    def local_gradient(self, params, q):
        g = super().local_gradient(params, q)
        return g + params["quartic"] * q**3 if "quartic" in params else g

    def local_curvature(self, params, q):
        c = super().local_curvature(params, q)
        return c + 3.0 * params["quartic"] * q * q if "quartic" in params else c

    def _minimise(self, inp, b, atoms, params, external) -> tuple[QEqSolution, list[float]]:
        """Constrained Newton from the uniform density Q/N; quadratic functionals need one step."""
        n = atoms.stop - atoms.start
        pos = inp.positions[atoms].detach()
        q = torch.full((n,), float(inp.total_charge[b]) / n, dtype=pos.dtype, device=pos.device)
        return self._newton(inp, b, atoms, params, external, q)

    def _batch_minimise(self, inp, a, params, external):
        """:meth:`_newton` of every structure of the batch at once: each step one block-diagonal KKT
        solve with zero right-hand side for each structure's Σq, from the uniform density Q/N of each
        structure; a structure whose update fell below ``newton_tol`` keeps its charges while the others
        go on. ``None`` (the structures one by one) when a structure is not done in ``max_newton``
        steps or its charges are not finite."""
        graph = inp.graph
        batch, n_struct = graph.batch, graph.num_graphs
        sizes = (graph.ptr[1:] - graph.ptr[:-1]).to(a.dtype)
        q = (inp.total_charge.detach().to(a.dtype) / sizes)[batch]
        tol = default_tolerance(self.options.newton_tol, q.dtype)
        zeros = q.new_zeros(n_struct)
        history: list[list[float]] = [[] for _ in range(n_struct)]
        active = [True] * n_struct
        moving = torch.ones(n_struct, dtype=torch.bool, device=q.device)
        sol = None
        for _ in range(self.options.max_newton):
            grad = a @ q + self.local_gradient(params, q) + external
            step = self._batch_kkt(inp, a, self.local_curvature(params, q), grad, zeros)
            if step is None:
                return None
            update = torch.where(moving[batch], step.charges, torch.zeros_like(q))
            q = q + update
            largest = q.new_zeros(n_struct).scatter_reduce(0, batch, update.abs(), "amax", include_self=False)
            finite = bool(torch.isfinite(q).all())
            sol = step if sol is None else sol
            # μ and the factorisation of each structure's own last step (at the same charges for a
            # structure that is done)
            sol.mu = torch.where(moving, step.mu, sol.mu)
            sol.solve_h, sol.y = step.solve_h, step.y
            for b, change in enumerate(largest.tolist()):
                if active[b]:
                    history[b].append(change)
                    if change < tol or not self.options.quartic:
                        active[b] = False
            if not finite:
                return None
            if not any(active):
                break
            moving = torch.tensor(active, device=q.device)
        if any(active) or sol is None:
            return None
        sol.charges = q
        return sol, history

    def _regroup(self, inp, b, atoms, params, external, shared, groups, targets):
        """Constrained Newton with one constraint per fragment, from the shared minimum shifted
        uniformly within each fragment onto its target."""
        counts = torch.bincount(groups).to(shared.charges.dtype)
        sums = shared.charges.new_zeros(counts.numel()).index_add(0, groups, shared.charges)
        q = shared.charges + ((targets - sums) / counts)[groups]
        return self._newton(inp, b, atoms, params, external, q, groups)

    def _newton(
        self, inp, b, atoms, params, external, q: torch.Tensor, groups: torch.Tensor | None = None
    ) -> tuple[QEqSolution, list[float]]:
        """Newton's method from the charges ``q``, which meet the constraints: each step solves the KKT
        system with the local curvature at ``q`` and zero right-hand side for Σq (with ``groups``: then
        for each group's sum, :func:`constrain_groups`), so every iterate keeps the start's sums. In
        inference of one fragment with the iterative solver a step is one projected CG system;
        otherwise both right-hand sides, for the implicit derivatives and the fragment constraints."""
        tol = default_tolerance(self.options.newton_tol, q.dtype)
        history: list[float] = []
        sol = None
        converged = False
        # the Coulomb operator (and the mesh preconditioner) of this geometry, for every Newton step
        ops = self._operators(inp, b, atoms)
        zeros = None if groups is None else q.new_zeros(int(groups.max()) + 1)
        # inference of one fragment: each step is one projected CG system (no H⁻¹1 needed)
        projected = groups is None and not self.training and ops.dense is None
        for _ in range(self.options.max_newton):
            grad = ops.matvec(q) + self.local_gradient(params, q) + external
            curvature = self.local_curvature(params, q)
            if projected:
                step = self._projected_solve(curvature, grad, ops)
            else:
                step = self._quadratic_solve(inp, b, atoms, curvature, grad, 0.0, ops)
            sol = step if groups is None else constrain_groups(step, groups, zeros)
            q = q + sol.charges
            change = float(sol.charges.abs().max())
            history.append(change)
            if not step.info.converged or not torch.isfinite(q).all():
                break
            if change < tol or not self.options.quartic:
                converged = True
                break
        assert sol is not None
        info = SolveInfo(len(history), history[-1], converged)
        # at the minimum the Newton multiplier is μ: ∂E/∂q_i = −μ
        return QEqSolution(q, sol.mu, info, sol.solve_h, sol.y, sol.shift, groups), history
