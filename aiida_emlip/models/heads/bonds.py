r"""Bond-mediated equilibration: split-charge equilibration for ``qeq`` and ``functional`` (no AiiDA).

With ``fragments='bonds'`` charge moves between atoms only along the graph's edges. Every bond i–j
carries a transfer p_ij from the base charges q⁰ (per element, each fragment at an integer charge),
and costs ½ p_ij²/g_ij on top of the head's energy E_eq[q] (its local term, E_H and the field work):

.. math:: E = \min_p \Big( E_\mathrm{eq}[q^0 + B p] + \sum_\mathrm{bonds} \frac{p_{ij}^2}{2 g_{ij}} \Big)
          = \min_y \Big( E_\mathrm{eq}[q^0 + L y] + ½\, y^\top L y \Big),

with B the bond–atom incidence matrix, ``L = B diag(g) Bᵀ`` the graph Laplacian of the conductances
and ``p = diag(g) Bᵀ y`` (the optimum over p lies in that subspace). ``g_ij ≥ 0`` is read out of the
two atoms' features and the bond length and multiplied by a cosine envelope that vanishes, with its
slope, at the cutoff. So the bond hardness 1/g diverges as a bond leaves the graph: charge crosses a
bond in proportion to how much of it the backbone still sees, a fragment alone keeps its integer
charge, and charges, energy and forces stay continuous as fragments meet or part — where a single μ
per structure or per fragment lets charge flow in full between atoms that barely see each other.

The minimum is stationary where ``L(∇E_eq + y) = 0``; Newton's method on y solves
``(L H L + L + P) δ = −L(∇E_eq + y)`` with H the Hessian of E_eq and P the projector onto the
constants of each fragment (the null space of L): one step for a quadratic E_eq. The energy is
stationary in y, so forces follow from the Hellmann–Feynman theorem, and in training one
differentiable Newton step from the converged y attaches the implicit derivatives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from aiida_emlip.models.fragments import fragment_corrected, largest_fragment_mu
from aiida_emlip.models.heads.base import (
    HeadInput,
    HeadOutput,
    batch_coulomb_matrix,
    coulomb_energy,
    field_work,
    mlp,
    scatter_sum,
    solved_output,
    structure_dipoles,
)
from aiida_emlip.models.heads.edges import bessel_radial, cosine_envelope
from aiida_emlip.models.heads.solvers import (
    SCFConvergenceError,
    SolveInfo,
    conjugate_gradient,
    default_tolerance,
)


class BondConductance(torch.nn.Module):
    """Conductance g of every directed edge [E] (e²/eV), the same for both directions of a bond."""

    def __init__(self, num_scalars: int, hidden: int, num_radial: int, cutoff: float) -> None:
        super().__init__()
        self.cutoff = cutoff
        self.num_radial = num_radial
        self.readout = mlp(2 * num_scalars + num_radial, 1, hidden)

    def forward(self, inp: HeadInput) -> torch.Tensor:
        sender, receiver = inp.graph.edge_index
        lengths = torch.linalg.vector_norm(inp.graph.edge_vectors(inp.positions, inp.cell), dim=-1)
        h = inp.features.scalars
        radial = bessel_radial(lengths, self.cutoff, self.num_radial)
        # symmetric in the two atoms, so that a bond's two edges carry one conductance
        x = torch.cat([h[sender] + h[receiver], h[sender] * h[receiver], radial], dim=-1)
        return torch.nn.functional.softplus(self.readout(x)[:, 0]) * cosine_envelope(lengths, self.cutoff)


def laplacian_apply(
    g: torch.Tensor, sender: torch.Tensor, receiver: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """``L v`` from the directed edges (each bond twice, half each): ``(Lv)_i = Σ_j g_ij (v_i − v_j)``."""
    flow = 0.5 * g * (v[sender] - v[receiver])
    return torch.zeros_like(v).index_add(0, sender, flow).index_add(0, receiver, -flow)


def laplacian_matrix(g: torch.Tensor, sender: torch.Tensor, receiver: torch.Tensor, n: int) -> torch.Tensor:
    """Dense ``L`` [n, n] of one structure's edges (differentiable in ``g``)."""
    half = 0.5 * g
    out = g.new_zeros(n, n)
    out = out.index_put((sender, sender), half, accumulate=True)
    out = out.index_put((receiver, receiver), half, accumulate=True)
    out = out.index_put((sender, receiver), -half, accumulate=True)
    return out.index_put((receiver, sender), -half, accumulate=True)


def fragment_projector(members: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``P`` [n, n]: the mean over each fragment (``members`` [n], numbered from 0), the null space of L."""
    onehot = torch.nn.functional.one_hot(members).to(dtype)
    return (onehot / onehot.sum(0)) @ onehot.T


@dataclass
class BondProblem:
    """One structure's minimisation in y: its edges (numbered within the structure), conductances, base
    charges, fragments, and E_eq's gradient and curvature as functions of q."""

    sender: torch.Tensor
    receiver: torch.Tensor
    g: torch.Tensor
    base: torch.Tensor
    members: torch.Tensor
    gradient: Callable[[torch.Tensor], torch.Tensor]  # ∇E_eq(q)
    curvature: Callable[[torch.Tensor], torch.Tensor]  # the local part of H(q), a diagonal
    coulomb: Callable[[torch.Tensor], torch.Tensor]  # A x
    dense: torch.Tensor | None = None  # A as a matrix, where the structure is solved densely

    def laplacian(self, v: torch.Tensor) -> torch.Tensor:
        return laplacian_apply(self.g, self.sender, self.receiver, v)

    @cached_property
    def fragment_sizes(self) -> torch.Tensor:
        """The number of atoms of each fragment, [F]."""
        return torch.bincount(self.members)

    def fragment_means(self, v: torch.Tensor) -> torch.Tensor:
        """The mean of ``v`` [n] over each fragment, [F]."""
        sizes = self.fragment_sizes
        return v.new_zeros(sizes.shape).index_add(0, self.members, v) / sizes

    def charges(self, y: torch.Tensor) -> torch.Tensor:
        return self.base + self.laplacian(y)

    def residual(self, y: torch.Tensor) -> torch.Tensor:
        """``∇_y E = L(∇E_eq(q) + y)``."""
        return self.laplacian(self.gradient(self.charges(y)) + y)

    def hessian(self, y: torch.Tensor) -> torch.Tensor:
        """``L H L + L + P`` as a matrix (dense structures)."""
        assert self.dense is not None
        n = self.base.numel()
        lap = laplacian_matrix(self.g, self.sender, self.receiver, n)
        h = self.dense + torch.diag(self.curvature(self.charges(y)))
        return lap @ h @ lap + lap + fragment_projector(self.members, lap.dtype)

    def hessian_apply(self, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``v ↦ (L H L + L + P) v`` without matrices (iterative solves); v is [n] or [n, k]."""
        curvature = self.curvature(self.charges(y))

        def apply(v: torch.Tensor) -> torch.Tensor:
            if v.dim() == 2:
                return torch.stack([apply(c) for c in v.unbind(1)], dim=1)
            lv = self.laplacian(v)
            constants = self.fragment_means(v)[self.members]  # P v
            return self.laplacian(self.coulomb(lv) + curvature * lv) + lv + constants

        return apply

    def step(
        self, y: torch.Tensor, tol: float, maxiter: int, scale: float | None = None
    ) -> tuple[torch.Tensor, bool, int]:
        """The Newton step δ at y, whether its solve converged, and its iterations. The CG stops at
        ``tol`` relative to the right-hand side, or, with ``scale``, at ``tol · scale`` (a warm start:
        the cold start's residual as the yardstick, so that a start near the answer saves iterations)."""
        rhs = -self.residual(y)
        if self.dense is not None:
            return torch.linalg.solve(self.hessian(y), rhs), True, 1
        if scale is not None:
            tol = tol * scale / max(float(torch.linalg.vector_norm(rhs)), torch.finfo(rhs.dtype).tiny)
        delta, info = conjugate_gradient(self.hessian_apply(y), rhs, tol=tol, maxiter=maxiter)
        return delta, info.converged, info.iterations


def warm_potentials(problem: BondProblem, charges: torch.Tensor) -> torch.Tensor:
    """Bond potentials y from which Newton's method starts near the charges ``charges`` (a previous
    step's): at a solution ``y = −∇E_eq(q)`` up to a constant per fragment, which does not move charge;
    each fragment's mean is taken out."""
    y = -problem.gradient(charges)
    return y - problem.fragment_means(y)[problem.members]


def minimise_bonds(
    problem: BondProblem,
    quadratic: bool,
    tol: float,
    charge_tol: float,
    max_steps: int,
    maxiter: int,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SolveInfo, list[float]]:
    """Newton's method in y from y = 0 (the base charges) or from ``start`` (:func:`warm_potentials`);
    the converged y, the solve's record and the largest charge change of every step. A quadratic E_eq
    needs one step. From ``start`` the CG tolerances are taken relative to the cold start's residual,
    the accuracy a cold start reaches."""
    y = torch.zeros_like(problem.base) if start is None else start
    scale = None
    if start is not None and problem.dense is None:
        scale = float(torch.linalg.vector_norm(problem.residual(torch.zeros_like(start))))
    history: list[float] = []
    iterations = 0
    converged = False
    for _ in range(max_steps):
        delta, solved, its = problem.step(y, tol, maxiter, scale)
        iterations += its
        y = y + delta
        change = float(problem.laplacian(delta).abs().max()) if delta.numel() else 0.0
        history.append(change)
        if not solved or not bool(torch.isfinite(y).all()):
            break
        if quadratic or change < charge_tol:
            converged = True
            break
    return y, SolveInfo(iterations, history[-1] if history else 0.0, converged), history


def minimise_bonds_batch(
    problem: BondProblem,
    structure: torch.Tensor,
    count: int,
    quadratic: bool,
    charge_tol: float,
    max_steps: int,
) -> tuple[torch.Tensor, list[list[float]]] | None:
    """:func:`minimise_bonds` from y = 0 for ``count`` dense structures at once (``problem`` over the
    whole batch, ``structure`` [N] the structure of each atom): ``L``, ``P`` and ``A`` are
    block-diagonal, so one solve gives every structure's Newton step, and a structure is held where it
    converged while the others go on — the steps each takes alone. The converged y and each
    structure's largest charge change per step, or ``None`` where a structure does not converge (the
    per-structure path reports it)."""
    y = torch.zeros_like(problem.base)
    active = [True] * count
    history: list[list[float]] = [[] for _ in range(count)]
    for _ in range(max_steps):
        delta = torch.linalg.solve(problem.hessian(y), -problem.residual(y))
        delta = delta * delta.new_tensor(active)[structure]
        y = y + delta
        moved = problem.laplacian(delta).abs()
        changes = moved.new_zeros(count).scatter_reduce(0, structure, moved, "amax").tolist()
        if not bool(torch.isfinite(y).all()):
            return None
        for b in range(count):
            if active[b]:
                history[b].append(changes[b])
                active[b] = not (quadratic or changes[b] < charge_tol)
        if not any(active):
            return y, history
    return None


def implicit_bonds_step(problem: BondProblem, y: torch.Tensor) -> torch.Tensor:
    """One differentiable Newton step from the converged ``y`` (detached): the same value, with
    ∂y/∂(θ, R) of the implicit function theorem (every input of ``problem`` carries autograd)."""
    y = y.detach()
    return y - torch.linalg.solve(problem.hessian(y), problem.residual(y))


class BondEquilibration:
    """The ``fragments='bonds'`` path of the equilibrating heads (``qeq``, ``functional``), which provide
    ``local_gradient``, ``local_curvature``, ``local_energy``, ``quadratic``, ``conductance``, ``formal``
    and the Coulomb operators."""

    def _bond_problem(
        self,
        inp: HeadInput,
        b: int,
        atoms: slice,
        params: dict[str, torch.Tensor],
        external: torch.Tensor,
        edges: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        base: torch.Tensor,
        members: torch.Tensor,
        dense: bool,
        differentiable: bool,
    ) -> BondProblem:
        """Structure ``b``'s minimisation in y (:mod:`~aiida_emlip.models.heads.bonds`): with autograd
        through the geometry where ``differentiable`` (the implicit step), else on detached inputs."""
        sender, receiver, g = edges
        pos, cell, pbc = inp.positions[atoms], inp.cell[b], inp.graph.pbc[b]
        if not differentiable:
            pos, cell = pos.detach(), cell.detach()
        matrix = None
        if dense:
            matrix = inp.electrostatics.coulomb_matrix(pos, cell, pbc)
            coulomb = matrix.__matmul__
        else:
            coulomb = self._coulomb_operator(inp, b, atoms).matvec
        return self._problem((sender, receiver, g), base, members, params, external, coulomb, matrix)

    def _problem(
        self,
        edges: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        base: torch.Tensor,
        members: torch.Tensor,
        params: dict[str, torch.Tensor],
        external: torch.Tensor,
        coulomb: Callable[[torch.Tensor], torch.Tensor],
        matrix: torch.Tensor | None,
    ) -> BondProblem:
        """A :class:`BondProblem` whose ``E_eq`` is the head's local term with the Coulomb operator
        ``coulomb`` (``matrix`` where it is dense) and the potential ``external``."""

        def gradient(q: torch.Tensor) -> torch.Tensor:
            return coulomb(q) + self.local_gradient(params, q) + external

        def curvature(q: torch.Tensor) -> torch.Tensor:
            return self.local_curvature(params, q)

        return BondProblem(*edges, base, members, gradient, curvature, coulomb, matrix)

    def _batch_bond_problem(
        self,
        inp: HeadInput,
        params: dict[str, torch.Tensor],
        external: torch.Tensor,
        g: torch.Tensor,
        base: torch.Tensor,
        members: torch.Tensor,
        differentiable: bool,
    ) -> BondProblem:
        """The minimisation in y of the whole batch as one problem: the graph's edges, the batch's
        fragments and its block-diagonal Coulomb matrix (:func:`~.base.batch_coulomb_matrix`); with
        autograd through the geometry where ``differentiable``."""
        matrix = batch_coulomb_matrix(inp, differentiable)
        edges = (*inp.graph.edge_index, g)
        return self._problem(edges, base, members, params, external, matrix.__matmul__, matrix)

    def _bonds_batch(
        self,
        inp: HeadInput,
        params: dict[str, torch.Tensor],
        external: torch.Tensor,
        g: torch.Tensor,
        base: torch.Tensor,
        index: torch.Tensor,
        stopping: tuple[float, int],
        differentiable: bool,
    ):
        """Every structure's Newton steps at once (:func:`minimise_bonds_batch`; ``stopping``: the
        charge tolerance and the step limit), and in training one differentiable step for the batch.
        Returns y [N], each structure's μ, converged flags, iterations and histories, or ``None`` where
        a structure needs the per-structure path."""
        graph = inp.graph
        with torch.no_grad():
            detached = {k: v.detach() for k, v in params.items()}
            problem = self._batch_bond_problem(
                inp, detached, external.detach(), g.detach(), base, index, differentiable=False
            )
            solved = minimise_bonds_batch(problem, graph.batch, graph.num_graphs, self.quadratic, *stopping)
        if solved is None:
            return None
        y, history = solved
        if differentiable:
            problem = self._batch_bond_problem(inp, params, external, g, base, index, differentiable=True)
            y = implicit_bonds_step(problem, y)
        means = -problem.fragment_means(problem.gradient(problem.charges(y)))
        mus = []
        for _, atoms in graph.structures():
            first = int(index[atoms].min())
            members = index[atoms] - first
            mus.append(largest_fragment_mu(means[first : first + int(members.max()) + 1], members))
        count = graph.num_graphs
        return y, mus, [True] * count, [len(h) for h in history], history

    def _bonds_forward(
        self, inp: HeadInput, params: dict[str, torch.Tensor], external: torch.Tensor
    ) -> HeadOutput:
        """Charges by bond-mediated equilibration (``fragments='bonds'``): Newton's method in the bond
        potentials y of each structure, dense up to ``dense_max_atoms`` atoms (always in training, where
        one differentiable step attaches the implicit derivatives), else CG for each step."""
        graph = inp.graph
        options = self.options
        dtype = inp.positions.dtype
        differentiable = self.training and torch.is_grad_enabled()
        # each fragment's base charges at its integer, and the fragment of each atom (one labelling)
        base, index, _ = fragment_corrected(self.formal.to(dtype)[inp.species].detach(), graph)
        base = base.detach()
        g = self.conductance(inp)
        sender, receiver = graph.edge_index
        edge_batch = graph.batch[sender]
        tol = default_tolerance(options.tol, dtype)
        charge_tol = default_tolerance(getattr(options, "newton_tol", options.tol), dtype)
        max_steps = getattr(options, "max_newton", 1)
        ys, mus, converged, iterations, history = [], [], [], [], []
        batched = None
        if self.solves_batches and self._small_dense_batch(graph, always_dense=differentiable):
            stopping = (charge_tol, max_steps)
            batched = self._bonds_batch(inp, params, external, g, base, index, stopping, differentiable)
        if batched is not None:
            y_batch, mus, converged, iterations, history = batched
            ys = [y_batch]
        for b, atoms in graph.structures() if batched is None else ():
            mask = edge_batch == b
            local_edges = (sender[mask] - atoms.start, receiver[mask] - atoms.start)
            members = index[atoms] - index[atoms].min()
            dense = differentiable or self._use_dense(atoms.stop - atoms.start)
            warm = None if dense else inp.warm_charges(atoms)  # inference by CG: a previous step's q
            with torch.no_grad():
                local = {k: v[atoms].detach() for k, v in params.items()}
                problem = self._bond_problem(
                    inp,
                    b,
                    atoms,
                    local,
                    external[atoms].detach(),
                    (*local_edges, g[mask].detach()),
                    base[atoms],
                    members,
                    dense,
                    differentiable=False,
                )
                start = None if warm is None else warm_potentials(problem, warm)
                y, info, steps = minimise_bonds(
                    problem, self.quadratic, tol, charge_tol, max_steps, options.max_iter, start
                )
            ok = info.converged and bool(torch.isfinite(y).all())
            if not ok and options.on_failure == "raise":
                raise SCFConvergenceError(
                    f"{self.name}: structure {b} did not converge (largest charge step {info.residual:.3g} "
                    f"after {len(steps)} Newton steps); raise max_iter/tol or use on_failure='flag'"
                )
            if differentiable:
                local = {k: v[atoms] for k, v in params.items()}
                problem = self._bond_problem(
                    inp,
                    b,
                    atoms,
                    local,
                    external[atoms],
                    (*local_edges, g[mask]),
                    base[atoms],
                    members,
                    dense=True,
                    differentiable=True,
                )
                y = implicit_bonds_step(problem, y)
            # μ = −∂E/∂Q with the extra charge spread uniformly over a fragment's base charges: at the
            # minimum ∂E/∂q⁰_i = ∂E_eq/∂q_i, so μ is minus its mean over the (largest) fragment
            gradient = problem.gradient(problem.charges(y))
            mus.append(largest_fragment_mu(-problem.fragment_means(gradient), members))
            ys.append(y)
            converged.append(ok)
            iterations.append(info.iterations)
            history.append(steps)
        y_all = torch.cat(ys)
        charges = base + laplacian_apply(g, sender, receiver, y_all)
        dipole = structure_dipoles(inp, charges)
        bond_energy = 0.25 * g * (y_all[sender] - y_all[receiver]) ** 2  # ½ yᵀLy, each bond twice
        energy = (
            scatter_sum(self.local_energy(params, charges), graph.batch, graph.num_graphs)
            + scatter_sum(bond_energy, edge_batch, graph.num_graphs)
            + coulomb_energy(inp, charges)
            + field_work(inp, dipole)
        )
        return solved_output(inp, energy, charges, dipole, (mus, converged, iterations, history))
