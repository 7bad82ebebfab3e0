r"""``qeq``: charge equilibration with environment-dependent electronegativity and hardness (4G-HDNNP style).

The charges minimise

.. math:: E[q] = \sum_i (χ_i q_i + ½ J_i q_i^2) + E_H[q] − \mathbf E·\sum_i q_i \mathbf r_i
   \quad\text{subject to}\quad \sum_i q_i = Q,

with ``χ_i = χ⁰_{Z_i} + f_χ(h_i)`` and ``J_i = softplus(J⁰_{Z_i} + f_J(h_i))``. Stationarity is the KKT
system ``(A + diag J) q + b = −μ 1`` with ``b_i = χ_i − E·r_i`` and ``A`` the Coulomb Hessian (Gaussian
self-interaction on its diagonal). ``μ = −∂E/∂Q`` is returned as ``fermi_level`` (eV): the electron
chemical potential, so adding electrons (lowering Q) costs ``μ`` per electron.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from aiida_emlip.models.coulomb_operator import (
    CoulombOperator,
    MeshPreconditioner,
    OpenBatchOperator,
    gaussian_self_potential,
    mesh_preconditioner_width,
)
from aiida_emlip.models.ewald_projected import projected_potentials
from aiida_emlip.models.fragments import (
    FRAGMENTS,
    fragment_index,
    integer_targets,
    largest_fragment_mu,
)
from aiida_emlip.models.heads.base import (
    Head,
    HeadInput,
    HeadOptions,
    HeadOutput,
    batch_coulomb_matrix,
    coulomb_energy,
    element_table,
    field_work,
    mlp,
    scatter_sum,
    solved_output,
    structure_dipoles,
)
from aiida_emlip.models.heads.bonds import BondConductance, BondEquilibration
from aiida_emlip.models.heads.solvers import (
    ImplicitStep,
    QEqSolution,
    SCFConvergenceError,
    SolveInfo,
    constrain_groups,
    default_tolerance,
    kkt_inverse,
    qeq_solve,
    qeq_solve_from,
)
from aiida_emlip.schema import MEAN_CHARGES

SOLVERS = ("auto", "dense", "cg")
PRECONDITIONERS = ("jacobi", "mesh")
FAILURE_MODES = ("raise", "flag")
PARAMETRIZATIONS = ("electronegativity", "softness")
#: ``fragments`` of the equilibrating heads: those of the other heads, and ``bonds``
EQUILIBRATION_FRAGMENTS = (*FRAGMENTS, "bonds")


@dataclass
class QEqOptions(HeadOptions):
    hidden: int = 16
    solver: str = "auto"  # auto | dense | cg (conjugate gradients with the Ewald/PME operator)
    dense_max_atoms: int = 256  # ``auto`` uses the dense N×N path up to this many atoms
    tol: float = 1e-10  # CG: relative residual of each SPD solve
    max_iter: int = 1000
    on_failure: str = "raise"  # raise | flag (set ``converged`` False)
    min_hardness: float = 0.1  # eV/e², added to softplus(J) for a strictly convex local term
    #: ``electronegativity``: the readout gives χ_i and J_i (classic QEq); ``softness``: it gives a local
    #: reference charge q⁰_i and a softness s_i = 1/J_i that can vanish, E_loc = (q − q⁰)²/(2 s): where
    #: s → 0 the atom keeps its local charge (insulator), where s is large charge flows (metal).
    parametrization: str = "electronegativity"
    max_hardness: float = 1.0e4  # eV/e², caps 1/s of the softness parametrization (conditioning)
    #: CG preconditioner: ``mesh`` (long-wavelength Coulomb modes inverted on a coarse mesh, Jacobi on
    #: the rest, positive on every geometry; fully periodic cells and slabs with Gaussian charges,
    #: Jacobi elsewhere), or ``jacobi``
    preconditioner: str = "mesh"
    #: How Σq = Q is met across fragments that no edge joins (see :mod:`aiida_emlip.models.fragments`):
    #: ``shared`` — one μ for the whole structure, charge flows between fragments however far apart
    #: (classic QEq); ``integer`` — each fragment at the integer charge nearest its charge under the
    #: shared solution, with a μ of its own, so no charge crosses vacuum.
    #: ``bonds``: charge moves only along the graph's edges, each bond with a learned conductance that
    #: vanishes at ``bond_cutoff`` (split-charge equilibration, :mod:`~aiida_emlip.models.heads.bonds`):
    #: separated fragments keep the integer charges of their base charges, and nothing jumps as they meet.
    fragments: str = "shared"
    #: ``bonds``: Å, where the conductances vanish; None: the backbone's r_max (resolved by the model's
    #: config), the longest edge of the graph
    bond_cutoff: float | None = None
    #: ``bonds``: base charges q⁰ per element (e; missing ones 0), or ``"mean"`` in a training config (each
    #: element's mean DFT charge, measured by the trainer as for ``split``)
    formal_charges: dict[str, float] | str = field(default_factory=dict)
    num_radial: int = 8  # ``bonds``: Bessel functions of the bond length read by the conductance

    def __post_init__(self) -> None:
        if self.fragments not in EQUILIBRATION_FRAGMENTS:
            raise ValueError(f"fragments must be one of {EQUILIBRATION_FRAGMENTS}, got {self.fragments!r}")
        if self.bond_cutoff is not None and not self.bond_cutoff > 0:
            raise ValueError(f"bond_cutoff must be positive (Å), got {self.bond_cutoff!r}")
        if isinstance(self.formal_charges, str) and self.formal_charges != MEAN_CHARGES:
            raise ValueError(
                f"formal_charges must map elements to charges (e) or be {MEAN_CHARGES!r}, "
                f"got {self.formal_charges!r}"
            )
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {self.preconditioner!r}")
        if self.on_failure not in FAILURE_MODES:
            raise ValueError(f"on_failure must be one of {FAILURE_MODES}, got {self.on_failure!r}")
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"parametrization must be one of {PARAMETRIZATIONS}, got {self.parametrization!r}"
            )


def self_interaction(inp: HeadInput) -> float:
    """Coulomb-diagonal Gaussian self-term ``k_e/(σ√π)`` when the electrostatics leaves it out, else 0."""
    config = inp.electrostatics.config
    return 0.0 if config.include_self else gaussian_self_potential(config.sigma)


@dataclass
class _Operators:
    """What the solves of one structure reuse: ``A`` as an operator, its diagonal and the mesh
    preconditioner (or ``None``: Jacobi); on the dense path ``A`` as a matrix, whose product is the
    operator."""

    matvec: CoulombOperator | Callable[[torch.Tensor], torch.Tensor]
    a_diag: float
    mesh_width: float | None  # s = √2 σ of the mesh preconditioner, None: Jacobi
    mesh: MeshPreconditioner | None = None
    dense: torch.Tensor | None = None

    def precond(self, diag: torch.Tensor):
        """The preconditioner of ``H = A + diag(diag)``: mesh (built on first use), or Jacobi."""
        jacobi = diag + self.a_diag
        if self.mesh_width is None:
            return jacobi
        if self.mesh is None:
            self.mesh = MeshPreconditioner(self.matvec.positions, self.matvec.cell, self.mesh_width)
        return self.mesh.with_diagonal(jacobi)


class EquilibrationHead(BondEquilibration, Head):
    """Shared machinery of ``qeq`` and ``functional``: a convex local term minimised with E_H under Σq = Q.

    Subclasses define the local energy, its gradient and curvature; :meth:`_minimise` returns the
    converged charges and μ of one structure without autograd. Forces are exact: in evaluation mode
    the energy is stationary in q at fixed Σq (Hellmann–Feynman); in training mode the charges carry
    the implicit-function-theorem derivative (:class:`ImplicitStep`) so that ∂q/∂θ and second
    derivatives (force training) are exact too.

    With ``fragments='integer'`` a structure of several fragments is solved twice: once with Σq = Q
    (the shared solution, whose fragment charges decide the integers and are what training supervises
    as ``fragment_charges``), then with one constraint per fragment (:meth:`_regroup`).
    """

    charge_control = "exact"
    #: Whether inference with the iterative solver uses the projected CG of :meth:`_warm_minimise`,
    #: from ``HeadInput.initial_charges`` (a warm start) or Q/N; it solves the quadratic problem, so
    #: only a quadratic local term.
    warm_startable = False

    #: Whether the local term is quadratic in q (one Newton step solves it).
    quadratic = True
    #: Whether a batch of small structures with one constraint each solves as one block-diagonal system
    #: (:meth:`_batch_solve`), by the head's :meth:`_batch_minimise` (here one KKT solve, the
    #: :meth:`_minimise` of a quadratic local term; ``functional``: Newton steps).
    solves_batches = False

    @classmethod
    def capabilities(cls, options: QEqOptions) -> frozenset[str]:
        return frozenset({"charges", "fermi_level", "polarizability"})

    def __init__(self, options: QEqOptions, elements, num_scalars, num_vectors) -> None:
        super().__init__(options, elements, num_scalars, num_vectors)
        self.readout = mlp(num_scalars, self.num_local_outputs, options.hidden)
        self.chi0 = torch.nn.Parameter(torch.zeros(len(elements)))
        # softness parametrization: start fairly hard (s ≈ 0.05 e²/eV), near the insulating limit
        start = -3.0 if options.parametrization == "softness" else 2.0
        self.hardness0 = torch.nn.Parameter(torch.full((len(elements),), start))
        if options.fragments == "bonds":
            if options.bond_cutoff is None:
                raise ValueError(
                    f"{self.name}: the bond cutoff is not resolved (build the head through its ModelConfig)"
                )
            if options.formal_charges == MEAN_CHARGES:
                raise ValueError(
                    f"{self.name}: formal_charges {MEAN_CHARGES!r} is measured on the training data by "
                    "emlip-train; a model built outside training needs the charges per element"
                )
            self.register_buffer("formal", element_table(options.formal_charges, elements, "formal charges"))
            self.conductance = BondConductance(
                num_scalars, options.hidden, options.num_radial, options.bond_cutoff
            )

    num_local_outputs = 2

    # ------------------------------------------------------------------ local term
    def local_parameters(self, inp: HeadInput) -> dict[str, torch.Tensor]:
        """Per-atom parameters of the local energy from the features."""
        out = self.readout(inp.features.scalars)
        options = self.options
        if options.parametrization == "softness":
            # q⁰ from the readout, s = softplus(·) ≥ 0; J = 1/s capped at max_hardness; χ = −J q⁰
            softness = torch.nn.functional.softplus(self.hardness0[inp.species] + out[:, 1])
            hardness = 1.0 / (softness + 1.0 / options.max_hardness) + options.min_hardness
            chi = -hardness * (self.chi0[inp.species] + out[:, 0])
        else:
            chi = self.chi0[inp.species] + out[:, 0]
            hardness = torch.nn.functional.softplus(self.hardness0[inp.species] + out[:, 1])
            hardness = hardness + options.min_hardness
        return {"chi": chi, "hardness": hardness + self_interaction(inp)}

    def local_energy(self, params: dict[str, torch.Tensor], q: torch.Tensor) -> torch.Tensor:
        return params["chi"] * q + 0.5 * params["hardness"] * q * q

    def local_gradient(self, params: dict[str, torch.Tensor], q: torch.Tensor) -> torch.Tensor:
        return params["chi"] + params["hardness"] * q

    def local_curvature(self, params: dict[str, torch.Tensor], q: torch.Tensor) -> torch.Tensor:
        return params["hardness"]

    # ------------------------------------------------------------------ solver
    def _use_dense(self, n: int) -> bool:
        if self.options.solver == "auto":
            return n <= self.options.dense_max_atoms
        return self.options.solver == "dense"

    def _coulomb_operator(self, inp: HeadInput, b: int, atoms: slice) -> _Operators:
        """``x ↦ A x`` of structure ``b`` (Ewald or PME, no matrix; its geometry-dependent set-up done
        once), the diagonal of ``A`` (the Gaussian self-interaction) and the mesh preconditioner
        where it applies (``preconditioner='mesh'``, a fully periodic cell or a slab, Gaussian charges)."""
        pos, cell, pbc = inp.positions[atoms].detach(), inp.cell[b].detach(), inp.graph.pbc[b]
        es = inp.electrostatics
        sigma = es.config.sigma
        a_diag = gaussian_self_potential(sigma)
        mesh = mesh_preconditioner_width(sigma, pbc) if self.options.preconditioner == "mesh" else None
        return _Operators(es.coulomb_operator(pos, cell, pbc), a_diag, mesh)

    def _operators(self, inp: HeadInput, b: int, atoms: slice) -> _Operators:
        """What every solve of one structure reuses (Newton's steps): on the dense path the matrix ``A``,
        built once, else :meth:`_coulomb_operator`."""
        if not self._use_dense(atoms.stop - atoms.start):
            return self._coulomb_operator(inp, b, atoms)
        pos, cell, pbc = inp.positions[atoms].detach(), inp.cell[b].detach(), inp.graph.pbc[b]
        dense = inp.electrostatics.coulomb_matrix(pos, cell, pbc)
        return _Operators(lambda x: dense @ x, float(dense.diagonal().mean()), None, dense=dense)

    def _quadratic_solve(
        self,
        inp: HeadInput,
        b: int,
        atoms: slice,
        diag: torch.Tensor,
        rhs: torch.Tensor,
        total,
        ops: _Operators | None = None,
    ) -> QEqSolution:
        tol = default_tolerance(self.options.tol, inp.positions.dtype)
        ops = self._operators(inp, b, atoms) if ops is None else ops
        if ops.dense is not None:
            return qeq_solve(None, diag, rhs, total, dense=ops.dense)
        return qeq_solve(
            ops.matvec, diag, rhs, total, precond=ops.precond(diag), tol=tol, maxiter=self.options.max_iter
        )

    def _projected_solve(
        self,
        diag: torch.Tensor,
        rhs: torch.Tensor,
        ops: _Operators,
        total: float | torch.Tensor = 0.0,
        start: torch.Tensor | None = None,
    ) -> QEqSolution:
        """The minimiser of ``½ xᵀ(A + diag)x + rhsᵀx`` on ``Σx = total`` by projected CG from ``start``
        (default zero), one charge channel (inference of a single fragment: no ``H⁻¹``, no ``H⁻¹1``)."""
        x, mu, info = qeq_solve_from(
            ops.matvec,
            diag,
            rhs,
            total,
            torch.zeros_like(rhs) if start is None else start,
            precond=ops.precond(diag),
            tol=default_tolerance(self.options.tol, rhs.dtype),
            maxiter=self.options.max_iter,
        )
        return QEqSolution(x, mu, info, None, None)

    def _minimise(
        self, inp: HeadInput, b: int, atoms: slice, params: dict[str, torch.Tensor], external: torch.Tensor
    ) -> tuple[QEqSolution, list[float]]:
        """Charges of one structure (quadratic local term: one KKT solve)."""
        sol = self._quadratic_solve(
            inp, b, atoms, params["hardness"], params["chi"] + external, inp.total_charge[b]
        )
        return sol, [sol.info.residual]

    def _warm_minimise(
        self,
        inp: HeadInput,
        b: int,
        atoms: slice,
        params: dict[str, torch.Tensor],
        external: torch.Tensor,
        start: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, SolveInfo]:
        """Charges and μ of one structure by CG on Σq = Q from ``start`` (inference, iterative solver)."""
        ops = self._coulomb_operator(inp, b, atoms)
        rhs = params["chi"] + external
        sol = self._projected_solve(params["hardness"], rhs, ops, inp.total_charge[b].detach(), start)
        return sol.charges, sol.mu, sol.info

    def _warm_start(self, inp: HeadInput, atoms: slice, differentiable: bool) -> torch.Tensor | None:
        """The start of the projected CG on Σq = Q where it applies — inference (no implicit
        derivatives) with the iterative solver: ``inp.initial_charges`` of the structure when they are
        given and finite, else zeros (the uniform charges Q/N). ``None`` otherwise: the lock-step solve
        of ``H x = −b`` and ``H y = 1``, whose ``H⁻¹1`` the implicit derivatives need. The projected CG
        takes the lock-step's iterations on one charge channel instead of two (1.8–3.9× less CPU
        at 1k–4k atoms)."""
        n = atoms.stop - atoms.start
        if differentiable or self._use_dense(n):
            return None
        warm = inp.warm_charges(atoms)
        return warm if warm is not None else inp.positions.new_zeros(n)

    # ------------------------------------------------------------------ fragments
    def _regroup(
        self,
        inp: HeadInput,
        b: int,
        atoms: slice,
        params: dict[str, torch.Tensor],
        external: torch.Tensor,
        shared: QEqSolution,
        groups: torch.Tensor,
        targets: torch.Tensor,
    ) -> tuple[QEqSolution, list[float]]:
        """The charges of one structure with ``Σ_{i∈g} q_i = targets[g]`` for each fragment ``g`` of
        ``groups``, from its ``shared`` solution (quadratic local term: one more solve per fragment)."""
        sol = constrain_groups(shared, groups, targets)
        return sol, [sol.info.residual]

    @staticmethod
    def _fragment_targets(shared: QEqSolution, groups: torch.Tensor, count: int, total) -> torch.Tensor:
        """Each fragment's charge [G]: the integer nearest its charge in the ``shared`` solution (the
        structure's integer total met as :func:`~aiida_emlip.models.fragments.integer_targets` does),
        and a non-integer remainder of Q shared as the shared solution would share an extra charge
        (each fragment's part of ``H⁻¹ 1``)."""
        q = shared.charges
        sums = q.new_zeros(count).index_add(0, groups, q)
        sizes = torch.bincount(groups, minlength=count)
        owner = torch.zeros(count, dtype=torch.long)
        integers, remainder = integer_targets(sums, owner, torch.as_tensor(total).reshape(1), sizes)
        targets = integers.to(device=q.device, dtype=q.dtype)
        if float(remainder[0]) != 0.0:
            response = shared.y.new_zeros(count).index_add(0, groups, shared.y)
            targets = targets + float(remainder[0]) * response / response.sum()
        return targets

    # ------------------------------------------------------------------ forward
    def forward(self, inp: HeadInput) -> HeadOutput:
        graph = inp.graph
        params = self.local_parameters(inp)
        # b_i gets −E·r_i: the field work −E·Σ q_i r_i is linear in q
        external = -(inp.external_field[graph.batch] * inp.positions).sum(-1)
        if self.options.fragments == "bonds":
            return self._bonds_forward(inp, params, external)
        differentiable = self.training and torch.is_grad_enabled()
        integer = self.options.fragments == "integer"
        index = fragment_index(graph)[0] if integer else None
        charges, mus, converged, iterations, history, fragment_sums = [], [], [], [], [], []
        batched = (
            self._batch_solve(inp, params, external, differentiable) if self._solves_as_batch(graph) else None
        )
        if batched is not None:
            charges, mus, converged, iterations, history = batched
        for b, atoms in graph.structures() if batched is None else ():
            local = {k: v[atoms].detach() for k, v in params.items()}
            # the structure's fragments, numbered from 0; constraints per fragment only with several
            members = index[atoms] - index[atoms].min() if index is not None else None
            count = int(members.max()) + 1 if members is not None and members.numel() else 1
            groups = members if count > 1 else None
            warm = None
            if self.warm_startable and groups is None:
                warm = self._warm_start(inp, atoms, differentiable)
            grouped = None
            with torch.no_grad():
                if warm is not None:
                    q, mu, info = self._warm_minimise(inp, b, atoms, local, external[atoms].detach(), warm)
                    sol, residuals = None, [info.residual]
                else:
                    sol, residuals = self._minimise(inp, b, atoms, local, external[atoms].detach())
                    q, mu, info = sol.charges, sol.mu, sol.info
                shared_q = q
                if groups is not None and sol is not None and info.converged:
                    targets = self._fragment_targets(sol, groups, count, inp.total_charge[b].detach())
                    grouped, more = self._regroup(
                        inp, b, atoms, local, external[atoms].detach(), sol, groups, targets
                    )
                    residuals = residuals + more
                    info = SolveInfo(
                        info.iterations + grouped.info.iterations,
                        grouped.info.residual,
                        grouped.info.converged,
                        info.fallback or grouped.info.fallback,
                    )
                    q, mu = grouped.charges, grouped.mu
            ok = info.converged and bool(torch.isfinite(q).all())
            if not ok and self.options.on_failure == "raise":
                raise SCFConvergenceError(
                    f"{self.name}: structure {b} did not converge (residual {info.residual:.3g} after "
                    f"{info.iterations} iterations); raise max_iter/tol or use on_failure='flag'"
                )
            if differentiable:
                shared_q, mu = self._implicit(inp, b, atoms, params, external, sol)
                q = shared_q
                if grouped is not None:
                    q, mu = self._implicit(inp, b, atoms, params, external, grouped)
            if groups is not None and grouped is not None:
                mu = largest_fragment_mu(mu, groups)
            if members is not None:
                fragment_sums.append(shared_q.new_zeros(count).index_add(0, members, shared_q))
            charges.append(q)
            mus.append(mu)
            converged.append(ok)
            iterations.append(info.iterations)
            history.append(residuals)
        charges_all = torch.cat(charges)
        dipole = structure_dipoles(inp, charges_all)
        local_e = scatter_sum(self.local_energy(params, charges_all), graph.batch, graph.num_graphs)
        energy = local_e + coulomb_energy(inp, charges_all) + field_work(inp, dipole)
        return solved_output(
            inp,
            energy,
            charges_all,
            dipole,
            (mus, converged, iterations, history),
            fragment_index=index,
            fragment_charges=torch.cat(fragment_sums) if index is not None else None,
        )

    def _small_dense_batch(self, graph, always_dense: bool = False) -> bool:
        """Whether the batch has several structures, each on the dense path (or ``always_dense``), and
        within ``dense_max_atoms`` in all: what one block-diagonal solve of the batch takes."""
        if graph.num_graphs < 2 or graph.num_atoms > self.options.dense_max_atoms:
            return False
        sizes = (graph.ptr[1:] - graph.ptr[:-1]).tolist()
        return always_dense or all(self._use_dense(n) for n in sizes)

    def _solves_as_batch(self, graph) -> bool:
        """Whether :meth:`_batch_solve` takes the batch: a small dense batch with one constraint per
        structure (``fragments='shared'``)."""
        return self.solves_batches and self.options.fragments == "shared" and self._small_dense_batch(graph)

    def _batch_solve(
        self, inp: HeadInput, params: dict[str, torch.Tensor], external: torch.Tensor, differentiable: bool
    ):
        """Every structure's minimisation at once (:meth:`_batch_minimise`) on the batch's block-diagonal
        Coulomb matrix (:func:`~.base.batch_coulomb_matrix`), with one constraint ``Σq = Q`` per
        structure, and in training one :class:`ImplicitStep` for the batch. Returns the charges, each
        structure's μ, converged flags, iterations and residual histories, or ``None`` where the
        batch needs the structures one by one (an indefinite ``H``: a slab's uniform mode; a
        structure that does not converge or whose charges are not finite, reported there).
        """
        graph, es = inp.graph, inp.electrostatics
        batch, sigma = graph.batch, es.config.sigma
        open_batch = not bool(graph.pbc.any())
        with torch.no_grad():
            a = batch_coulomb_matrix(inp)
            detached = {k: v.detach() for k, v in params.items()}
            minimised = self._batch_minimise(inp, a, detached, external.detach())
        if minimised is None:
            return None
        sol, history = minimised
        q, mu = sol.charges, sol.mu
        if differentiable:
            q_star, mu_star = q.detach(), mu.detach()
            if open_batch:
                potential = OpenBatchOperator(es, inp.positions, graph.ptr, [sigma]).potentials(q_star)[:, 0]
            else:  # A q*, the small Ewald cells that can share a sum together
                potential = projected_potentials(
                    es, q_star, inp.positions, inp.cell, graph.pbc, graph.ptr, [sigma]
                )[:, 0]
            residual = potential + self.local_gradient(params, q_star) + external + mu_star[batch]
            solve = kkt_inverse(sol)
            dq, dmu = ImplicitStep.apply(residual, solve, solve, False, mu_star)
            q, mu = q_star - dq, mu_star - dmu
        n_struct = graph.num_graphs
        return [q], list(mu.unbind()), [True] * n_struct, [len(h) for h in history], history

    def _batch_minimise(
        self, inp: HeadInput, a: torch.Tensor, params: dict[str, torch.Tensor], external: torch.Tensor
    ) -> tuple[QEqSolution, list[list[float]]] | None:
        """The charges of every structure of the batch (no autograd) on its block-diagonal Coulomb
        matrix ``a``, and each structure's residual history; ``None`` where the batch needs the
        structures one by one. A quadratic local term: one KKT solve (:meth:`_batch_kkt`)."""
        totals = inp.total_charge.detach().to(a.dtype)
        sol = self._batch_kkt(inp, a, params["hardness"], params["chi"] + external, totals)
        if sol is None or not bool(torch.isfinite(sol.charges).all()):
            return None
        return sol, [[0.0] for _ in range(inp.graph.num_graphs)]

    @staticmethod
    def _batch_kkt(
        inp: HeadInput, a: torch.Tensor, diag: torch.Tensor, rhs: torch.Tensor, totals: torch.Tensor
    ) -> QEqSolution | None:
        """The minimiser of ``½ qᵀ(A + diag)q + rhsᵀq`` with ``Σq = totals[b]`` over each structure b of
        the batch: one Cholesky factorisation of the block-diagonal ``H``, ``x = H⁻¹(−rhs)`` and
        ``Y = H⁻¹Cᵀ`` (one column per structure), the structures as the solution's groups; ``None``
        when ``H`` is not positive definite."""
        graph = inp.graph
        factor, status = torch.linalg.cholesky_ex(a + torch.diag(diag))
        if int(status) != 0:
            return None

        def solve_h(r: torch.Tensor) -> torch.Tensor:
            r2 = r[:, None] if r.dim() == 1 else r
            out = torch.cholesky_solve(r2, factor)
            return out[:, 0] if r.dim() == 1 else out

        indicator = torch.nn.functional.one_hot(graph.batch, graph.num_graphs).to(a.dtype)
        xy = solve_h(torch.cat([-rhs[:, None], indicator], dim=1))
        x, y = xy[:, 0], xy[:, 1:]
        sol = QEqSolution(
            x, x.new_zeros(graph.num_graphs), SolveInfo(1, 0.0, True), solve_h, y, 0.0, graph.batch
        )
        mu = torch.linalg.solve(sol.group_sums(y), sol.group_sums(x) - totals)
        sol.charges, sol.mu = x - y @ mu, mu
        return sol

    def _implicit(
        self,
        inp: HeadInput,
        b: int,
        atoms: slice,
        params: dict[str, torch.Tensor],
        external: torch.Tensor,
        sol: QEqSolution,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attach ∂(q, μ)/∂(θ, R) by the implicit function theorem at the converged solution."""
        q_star, mu_star = sol.charges.detach(), sol.mu.detach()
        local = {k: v[atoms] for k, v in params.items()}
        residual = (
            inp.electrostatics.coulomb_matvec(q_star, inp.positions[atoms], inp.cell[b], inp.graph.pbc[b])
            + self.local_gradient(local, q_star)
            + external[atoms]
            + (mu_star if sol.groups is None else mu_star[sol.groups])
        )
        solve = kkt_inverse(sol)
        dq, dmu = ImplicitStep.apply(residual, solve, solve, False, None if sol.groups is None else mu_star)
        return q_star - dq, mu_star - dmu


class QEqHead(EquilibrationHead):
    """Charge equilibration: quadratic local term, one KKT solve (dense or CG with the PME operator).

    QEq with finite hardness behaves like a metal everywhere: charge flows between any two atoms of
    the structure however far apart (fractional charges on dissociated fragments).
    """

    name = "qeq"
    Options = QEqOptions
    warm_startable = True
    solves_batches = True
