r"""``scf``: a learned fixed-point self-consistent response of the density (the study's recommended design).

One structure at a time, with ``h_i`` the backbone scalars and ``q`` the current charges:

* local part: ``p_loc,i = f(h_i)``;
* potential inputs ``u_iw = (φ_w,i[q] + v_app,i + μ)/s_w`` — the potential of the density projected on
  a normalised Gaussian of width ``w`` at atom i (several widths), the applied potential
  ``v_app,i = −E·r_i`` and μ, each divided by the self-projection ``s_w = k_e√(2/π)/√(σ² + w²)``;
* update ``F_i(q, μ) = p_loc,i + U(h_i, u_i)``: ``linear`` ``U = −Σ_w χ_iw u_iw`` with an
  environment-dependent susceptibility ``χ_iw = softplus(g_w(h_i)) ≥ 0``, or ``mlp`` that plus an MLP of
  ``(h_i, u_i)`` (nonlinear response);
* iteration from ``p_loc`` (shifted uniformly to Σ = Q at constant Q): ``linear`` mixing
  ``q ← q + α (F(q, μ) − q)``, ``anderson`` (Pulay) acceleration of it, or ``newton`` (Newton–Krylov
  with GMRES, robust against charge sloshing). Constant Q: the Fukui function
  ``f_i = (∂F_i/∂μ)/Σ_j ∂F_j/∂μ`` (autograd through the update) redistributes the charge error,
  ``F += f (Q − ΣF)``, and μ takes a Newton step ``Δμ = (Q − ΣF)/Σ ∂F/∂μ`` clamped to ±1.
  With ``fragments='integer'`` (the default) every fragment that no edge joins to another
  (:mod:`~aiida_emlip.models.fragments`) has its own integer charge — the one nearest the charge a
  structure-wide linear response would give it — and its own μ, so no charge moves across vacuum
  between fragments; the reported Fermi level is that of the largest fragment. ``shared``: one μ and
  one constraint per structure.
  Constant μ: μ is the electrode's Fermi level and Σq floats.

Energy on the final density: ``Σ_i [a_i δ_i + ½ b_i δ_i²] + E_H[q] − E·d`` with ``δ = q − p_loc`` and
``a, b`` read out from ``h``. The map F is not the gradient of this energy, so forces come from the
implicit function theorem: the converged solution ``z* = (q*, μ*)`` is detached and corrected by
``z = z* − K⁻¹ g(z*)`` with ``g = (F − q, Σq − Q)`` and ``K = ∂g/∂z`` applied by GMRES (a dense LU
factorisation up to :data:`DENSE_SOLVE_ATOMS` atoms) in the backward pass
(:class:`~aiida_emlip.models.heads.solvers.ImplicitStep`); dz/dR and dz/dθ are then exact.

``unrolled`` iterates a batch of open-boundary structures, or of small structures of any periodicity,
as one (:meth:`SelfConsistentHead._unrolled_batch`); so do ``converge`` and ``implicit`` for a batch of
several small structures (:meth:`SelfConsistentHead._converged_batch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from aiida_emlip.models.coulomb_operator import (
    BlockDenseOperator,
    CoulombOperator,
    DenseOperator,
    MeshPreconditioner,
    OpenBatchOperator,
    gaussian_self_potential,
    mesh_preconditioner_width,
)
from aiida_emlip.models.ewald_projected import projected_potentials
from aiida_emlip.models.fragments import FRAGMENTS, fragment_targets, largest_fragment_mu
from aiida_emlip.models.heads import solvers
from aiida_emlip.models.heads.base import (
    Head,
    HeadInput,
    HeadOptions,
    HeadOutput,
    coulomb_energy,
    field_work,
    mlp,
    scatter_sum,
    structure_dipoles,
)
from aiida_emlip.models.heads.solvers import (
    ImplicitStep,
    SCFConvergenceError,
    default_tolerance,
    gmres,
)
from aiida_emlip.schema import COULOMB_CONSTANT

UPDATES = ("linear", "mlp")
ENSEMBLES = ("constant_q", "constant_mu")
MODES = ("converge", "direct", "unrolled", "implicit")
FAILURE_MODES = ("raise", "flag")
MIXERS = ("anderson", "linear", "newton")
MIXING_PRECONDITIONERS = ("mesh", "none")
#: Structures up to this many atoms solve the implicit (linearised) systems by a dense LU
#: factorisation instead of GMRES, and iterate on dense projected Coulomb matrices formed once per
#: geometry (:class:`~aiida_emlip.models.coulomb_operator.DenseOperator`) instead of applying the
#: Ewald/PME operator at every step.
DENSE_SOLVE_ATOMS = 64
#: Batches of such structures with up to this many atoms in all iterate ``unrolled`` as one (one
#: block-diagonal matrix per width) and take their implicit steps together (one factorisation of the
#: block-diagonal linearised system); larger batches do each structure on its own.
DENSE_BATCH_ATOMS = 256
#: Inner conjugate-gradient steps of the mesh preconditioner of the fixed-point steps and the GMRES
#: solves (:class:`~aiida_emlip.models.coulomb_operator.MeshPreconditioner`; its default, 8, is what
#: ``qeq``'s CG takes). Anderson mixing needs a less exact inverse: with 4, the CPU time of an energy +
#: forces evaluation was the same at 1k–17.6k atoms (at most one or two steps more, on water boxes of 4k
#: and 16k atoms) and the kernels launched 15–17 % fewer, what a launch-bound GPU pays for.
MESH_INNER_STEPS = 4


@dataclass
class SCFOptions(HeadOptions):
    update: str = "linear"  # linear (environment-dependent linear susceptibility) | mlp (nonlinear)
    widths: list[float] = field(default_factory=lambda: [1.5, 3.0])  # Å, projections of the potential
    ensemble: str = "constant_q"  # constant_q (μ found, Σq = Q exactly) | constant_mu (Σq floats)
    fragments: str = "integer"  # constant Q: integer | shared (see aiida_emlip.models.fragments)
    fermi_level: float | None = None  # constant_mu target (eV); None: graph.fermi_level per structure
    mixer: str = "anderson"  # anderson | linear | newton (Newton–Krylov); ``unrolled`` is always linear
    mixing: float = 0.3  # α of the linear mixing (and the damping of Anderson's step)
    anderson_history: int = 6
    #: ``mesh``: on fully periodic cells and slabs the inference steps and the linearised (GMRES) solves are
    #: preconditioned Kerker-like, the linear response of the long-wavelength modes inverted on a coarse
    #: mesh (:meth:`SelfConsistentHead._kerker`); ``none``: plain steps. The unrolled steps of
    #: training are never preconditioned
    preconditioner: str = "mesh"
    tol: float = 1e-6  # e: converged when max |F(q) − q| and |ΣF − Q| are below this
    max_steps: int = 200
    unroll_steps: int = 10  # K of scf_mode='unrolled'
    on_failure: str = "raise"  # raise | flag (``converged`` False in the output)
    max_total_charge: float = 10.0  # |Σq| above this is divergence
    max_step_change: float = 1.0  # e: a larger per-step charge change is divergence
    linear_tol: float = 1e-10  # GMRES relative tolerance of the implicit (linearised) solves
    linear_max_iter: int = 500
    hidden: int = 16

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("update", self.update, UPDATES),
            ("ensemble", self.ensemble, ENSEMBLES),
            ("on_failure", self.on_failure, FAILURE_MODES),
            ("mixer", self.mixer, MIXERS),
            ("fragments", self.fragments, FRAGMENTS),
            ("preconditioner", self.preconditioner, MIXING_PRECONDITIONERS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not self.widths or min(self.widths) <= 0.0:
            raise ValueError("widths must be a non-empty list of positive widths (Å)")
        if not 0.0 < self.mixing <= 1.0:
            raise ValueError("mixing must lie in (0, 1]")


class _Anderson:
    """Anderson (Pulay) acceleration of ``x ← x + α f`` with the last ``m`` iterates (type II).

    Linear combinations of iterates with Σ = Q keep Σ = Q, so the charge constraint survives.
    """

    def __init__(self, history: int, mixing: float) -> None:
        self.m, self.alpha = history, mixing
        self.xs: list[torch.Tensor] = []
        self.fs: list[torch.Tensor] = []

    def step(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        self.xs.append(x)
        self.fs.append(f)
        if len(self.xs) > self.m + 1:
            self.xs.pop(0)
            self.fs.pop(0)
        if len(self.xs) == 1 or self.m == 0:
            return x + self.alpha * f
        dx = torch.stack([b - a for a, b in zip(self.xs[:-1], self.xs[1:])], dim=1)  # [N, k]
        df = torch.stack([b - a for a, b in zip(self.fs[:-1], self.fs[1:])], dim=1)
        return x + self.alpha * f - self._correction(dx + self.alpha * df, df, f)

    def _correction(self, moves: torch.Tensor, df: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """``moves γ`` with ``γ`` the least-squares coefficients of ``f`` on the history ``df``."""
        gram = df.T @ df
        gram = gram + 1e-10 * torch.trace(gram) * torch.eye(
            gram.shape[0], dtype=gram.dtype, device=gram.device
        )
        # solve_ex: no check of the factorisation on the host (the regularised Gram matrix is regular)
        gamma = torch.linalg.solve_ex(gram, df.T @ f)[0]
        return moves @ gamma


class _BatchAnderson(_Anderson):
    """:class:`_Anderson` of every structure of a batch at once: one history of whole-batch iterates,
    each structure's least-squares coefficients from its own atoms (``index``: the structure of each
    atom, ``count`` structures), so each structure steps as its own :class:`_Anderson` would."""

    def __init__(self, history: int, mixing: float, index: torch.Tensor, count: int) -> None:
        super().__init__(history, mixing)
        self.index, self.count = index, count

    def _correction(self, moves: torch.Tensor, df: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        k = df.shape[1]
        gram = df.new_zeros(self.count, k, k).index_add(0, self.index, df[:, :, None] * df[:, None, :])
        rhs = df.new_zeros(self.count, k).index_add(0, self.index, df * f[:, None])
        trace = torch.diagonal(gram, dim1=1, dim2=2).sum(-1)
        gram = gram + 1e-10 * trace[:, None, None] * torch.eye(k, dtype=df.dtype, device=df.device)
        # a structure whose history has stopped moving (frozen, converged) has a zero Gram matrix: its
        # coefficients are not finite, and its caller keeps it where it is
        gamma = torch.linalg.solve_ex(gram, rhs)[0]
        return (moves * gamma[self.index]).sum(-1)


class _BatchGroups:
    """The constraint groups of every structure of a batch numbered through (structure ``b``'s groups
    from ``offsets[b]``, ``sizes[b]`` of them), from each structure's ``(fragment, targets)``: the group
    of each atom, each group's charge and structure, and sums over groups or structures."""

    def __init__(self, groups: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> None:
        self.sizes = [int(t.numel()) for _, t in groups]
        self.offsets = [0]
        for size in self.sizes[:-1]:
            self.offsets.append(self.offsets[-1] + size)
        self.fragment = torch.cat([f + off for (f, _), off in zip(groups, self.offsets)])
        self.targets = torch.cat([t for _, t in groups])
        self.count = int(self.targets.numel())
        self.structures = len(groups)
        self.owner = torch.repeat_interleave(
            torch.arange(self.structures, device=device), torch.tensor(self.sizes, device=device)
        )

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Σ of the atoms' ``values`` over each group."""
        return values.new_zeros(self.count).index_add(0, self.fragment, values)

    def per_structure(self, values: torch.Tensor, index: torch.Tensor, reduce: str) -> torch.Tensor:
        """``values`` reduced (``amax``, ``sum``) into their structures by ``index``."""
        out = values.new_zeros(self.structures)
        return out.scatter_reduce(0, index, values, reduce, include_self=False)

    def of(self, values: torch.Tensor, b: int) -> torch.Tensor:
        """Structure ``b``'s part of per-group ``values``."""
        return values[self.offsets[b] : self.offsets[b] + self.sizes[b]]


@dataclass
class _Structure:
    """Detached per-structure inputs of the iteration."""

    b: int
    atoms: slice
    positions: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    v_app: torch.Tensor
    fragment: torch.Tensor  # [n] the constraint group (fragment) of each atom, 0..C-1
    targets: torch.Tensor  # [C] the charge of each group (Σ = the structure's total charge)
    #: the projected potentials of this (detached) geometry, set up once for the whole iteration
    operator: CoulombOperator | DenseOperator | None = None
    #: (positions, cell, operator) of a differentiable iteration: the operator built once from these
    #: very tensors (autograd through the geometry kept) and applied at every unrolled step
    live: tuple | None = None
    #: the mesh preconditioner of this geometry (:meth:`SelfConsistentHead._mesh`), built on first use
    mesh: MeshPreconditioner | None = None

    @property
    def groups(self) -> int:
        return int(self.targets.numel())

    def group_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Σ of ``values`` [n] over each group, [C]."""
        return values.new_zeros(self.groups).index_add(0, self.fragment, values)


class SelfConsistentHead(Head):
    """Learned fixed-point SCF with constant-Q (Fukui + Newton on μ) or constant-μ control."""

    name = "scf"
    #: Steps between the host's looks at the fixed-point iteration's stopping tests (None: every step on
    #: CPU, :data:`~aiida_emlip.models.heads.solvers.DEVICE_CHECK_EVERY` on an accelerator).
    check_every: int | None = None
    Options = SCFOptions

    @classmethod
    def capabilities(cls, options: SCFOptions) -> frozenset[str]:
        return frozenset({"charges", "fermi_level", "polarizability"})

    def __init__(self, options: SCFOptions, elements, num_scalars, num_vectors) -> None:
        super().__init__(options, elements, num_scalars, num_vectors)
        self.charge_control = "exact" if options.ensemble == "constant_q" else "none"
        n_w = len(options.widths)
        self.local = mlp(num_scalars, 3, options.hidden)  # p_loc, a, b
        self.susceptibility = mlp(num_scalars, n_w, options.hidden)
        if options.update == "linear":
            # start weakly polarisable (χ ≈ 0.05), near the local, insulating limit; the ``mlp`` update
            # keeps χ ≈ 0.7 as the screening that holds its learned nonlinear part stable
            last = self.susceptibility if options.hidden <= 0 else self.susceptibility[-1]
            with torch.no_grad():
                last.bias.fill_(-3.0)
        self.nonlinear = mlp(num_scalars + n_w, 1, options.hidden) if options.update == "mlp" else None
        self._reason = ""  # why the last iteration stopped, for error messages
        self.linear_iterations = 0  # GMRES iterations of the last forward and backward passes
        self._scales_cache: tuple | None = None

    # ------------------------------------------------------------------ pieces of the map
    def _scales(self, inp: HeadInput, like: torch.Tensor) -> torch.Tensor:
        """``[W]`` potential scales of the projection widths (constants: made once per σ, dtype and
        device, since a tensor from host values is a blocking copy on a GPU, once per step otherwise)."""
        sigma = inp.electrostatics.config.sigma
        key = (sigma, tuple(self.options.widths), like.dtype, like.device)
        if self._scales_cache is None or self._scales_cache[0] != key:
            w = torch.tensor(self.options.widths, dtype=like.dtype, device=like.device)
            self._scales_cache = (
                key,
                COULOMB_CONSTANT * math.sqrt(2.0 / math.pi) / torch.sqrt(sigma**2 + w * w),
            )
        return self._scales_cache[1]

    def _operator(self, inp: HeadInput, s: _Structure) -> CoulombOperator | DenseOperator:
        """The projected-potential operator of the structure's detached geometry (built on first use;
        dense matrices up to :data:`DENSE_SOLVE_ATOMS` atoms)."""
        if s.operator is None:
            op = inp.electrostatics.projected_operator(s.positions, s.cell, s.pbc, self.options.widths)
            s.operator = DenseOperator(op) if s.positions.shape[0] <= DENSE_SOLVE_ATOMS else op
        return s.operator

    def _live_operator(self, inp: HeadInput, s: _Structure, positions, cell) -> None:
        """Set up the operator of a differentiable iteration on ``positions`` and ``cell`` (autograd
        kept) once, for :meth:`_projected` to apply at every step."""
        op = CoulombOperator(inp.electrostatics, positions, cell, s.pbc, self.options.widths)
        s.live = (positions, cell, DenseOperator(op) if positions.shape[0] <= DENSE_SOLVE_ATOMS else op)

    def _projected(self, inp: HeadInput, s: _Structure, q: torch.Tensor, positions, cell) -> torch.Tensor:
        if positions is s.positions and cell is s.cell and not q.requires_grad:
            return self._operator(inp, s).potentials(q)  # detached iteration: reuse the set-up
        if s.live is not None and positions is s.live[0] and cell is s.live[1]:
            return s.live[2].potentials(q)  # differentiable iteration: the same set-up every step
        return inp.electrostatics.projected_potentials(q, positions, cell, s.pbc, self.options.widths)

    def _update(self, h: torch.Tensor, chi: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        out = -(chi * u).sum(-1)
        if self.nonlinear is not None:
            out = out + self.nonlinear(torch.cat([h, u], dim=-1))[:, 0]
        return out

    def _slopes(
        self, h: torch.Tensor, chi: torch.Tensor, u: torch.Tensor, create_graph: bool
    ) -> torch.Tensor:
        """``∂U_i/∂u_iw`` [n, W] (U_i depends on row i of u only, so one backward gives all)."""
        if self.nonlinear is None:
            return -chi
        with torch.enable_grad():
            leaf = u if u.requires_grad else u.detach().requires_grad_(True)
            out = self._update(h, chi, leaf)
            return torch.autograd.grad(out.sum(), leaf, create_graph=create_graph)[0]

    def _map(
        self, inp, s: _Structure, loc: dict, q, mu, positions, cell, v_app, create_graph: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``F(q, μ)``, the slopes ``∂U/∂u`` and the scales, for one structure."""
        scales = self._scales(inp, q)
        u = (self._projected(inp, s, q, positions, cell) + v_app[:, None] + mu[s.fragment, None]) / scales
        value = loc["p_loc"] + self._update(loc["h"], loc["chi"], u)
        slopes = self._slopes(loc["h"], loc["chi"], u, create_graph)
        return value, slopes, scales

    def _mesh(self, inp: HeadInput, s: _Structure) -> MeshPreconditioner | None:
        """The mesh preconditioner of the structure's detached geometry (built once), or ``None``:
        ``preconditioner='none'``, point charges, or a cell periodic in fewer than two directions (a
        slab's operator is that of its cell, vacuum included, plus the slab term, which the mesh model
        leaves out: still a positive preconditioner)."""
        if self.options.preconditioner != "mesh":
            return None
        width = mesh_preconditioner_width(inp.electrostatics.config.sigma, s.pbc)
        if width is None:
            return None
        if s.mesh is None:
            s.mesh = MeshPreconditioner(s.positions, s.cell, width, inner_steps=MESH_INNER_STEPS)
        return s.mesh

    def _response_inverse(self, inp: HeadInput, s: _Structure, coef: torch.Tensor):
        """``(J, r ↦ (J + A)⁻¹ r)`` of the linearised response at the slopes ``coef = ∂F/∂φ`` [n, W]:
        ``J = 1/κ`` with ``κ_i = −Σ_w coef_iw`` (at least 1e-8), ``(J + A)⁻¹`` by the mesh preconditioner
        (:meth:`_mesh`, which must apply)."""
        hardness = 1.0 / (-coef.detach()).sum(-1).clamp(min=1e-8)
        sigma = inp.electrostatics.config.sigma
        return hardness, self._mesh(inp, s).with_diagonal(hardness + gaussian_self_potential(sigma))

    def _kerker(self, inp: HeadInput, s: _Structure):
        r"""The preconditioner of the inference iteration's steps, ``None`` where it does not apply.

        Linearised, the map is ``F(q) ≈ F(q₀) − K A (q − q₀)`` with ``K = diag(κ)``,
        ``κ_i = −Σ_w (∂U_i/∂u_iw)/s_w`` and every projection width's Coulomb operator taken as ``A``
        (they differ on short wavelengths only), so the Newton step from the residual ``R = F − q`` is
        ``(I + KA)⁻¹R = (J + A)⁻¹ J R`` with ``J = K⁻¹``. Its smooth modes, where ``A ∝ 1/k²`` makes plain
        mixing slosh and the step counts grow with the cell, come from the mesh preconditioner of
        ``J + A`` (:class:`~aiida_emlip.models.coulomb_operator.MeshPreconditioner`); short wavelengths
        and weakly responding atoms (``κ → 0``) keep the plain step ``R``. Each group's sum of the step
        is that of ``R`` (a uniform shift within the group), so the charge constraint is untouched.
        """
        if self._mesh(inp, s) is None:
            return None
        counts = s.group_sum(torch.ones_like(s.positions[:, 0]))

        def precondition(residual: torch.Tensor, slopes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
            hardness, inverse = self._response_inverse(inp, s, slopes / scales)
            step = inverse(hardness * residual)
            return step + (s.group_sum(residual - step) / counts)[s.fragment]

        return precondition

    def _constrain(
        self, s: _Structure, value: torch.Tensor, slopes: torch.Tensor, scales: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fukui redistribution ``F += f (Q − ΣF)`` per group; returns F, the charge errors and dQ/dμ."""
        dfdmu = (slopes / scales).sum(-1)
        dqdmu = s.group_sum(dfdmu)
        error = s.targets - s.group_sum(value)
        return value + dfdmu * (error / dqdmu)[s.fragment], error, dqdmu

    # ------------------------------------------------------------------ forward
    def forward(self, inp: HeadInput) -> HeadOutput:
        mode = inp.scf_mode
        if mode not in MODES:
            raise ValueError(f"scf_mode must be one of {MODES}, got {mode!r}")
        graph = inp.graph
        h = inp.features.scalars
        local = self.local(h)
        p_loc = local[:, 0]
        chi = torch.nn.functional.softplus(self.susceptibility(h))
        v_app = -(inp.external_field[graph.batch] * inp.positions).sum(-1)
        constant_q = self.options.ensemble == "constant_q"
        groups, fragment_index_, fragment_charges = self._groups(inp, p_loc, chi, constant_q)
        targets = self._target_mu(inp)
        charges, mus, converged, iterations, history = [], [], [], [], []
        batched = None
        dense_batch = self._dense_batch(graph)
        if mode == "unrolled" and (not bool(graph.pbc.any()) or dense_batch):
            batched = self._unrolled_batch(inp, groups, local, chi, v_app, targets)
        elif mode in ("converge", "implicit") and self._converges_as_batch(graph, dense_batch):
            batched = self._converged_batch(inp, groups, local, chi, v_app, targets, mode)
        if batched is not None:
            charges, mus, converged, history = batched
            iterations = [len(res) for res in history]
        # the implicit steps of a batch of small structures as one (one dense factorisation)
        pending: list[tuple[_Structure, torch.Tensor, torch.Tensor]] | None = (
            [] if batched is None and mode != "unrolled" and dense_batch else None
        )
        for b, atoms in graph.structures() if batched is None else ():
            s = _Structure(
                b,
                atoms,
                inp.positions[atoms].detach(),
                inp.cell[b].detach(),
                graph.pbc[b],
                v_app[atoms].detach(),
                *groups[b],
            )
            # constant Q: p_loc (or a warm start) shifted to each group's charge; the map keeps p_loc
            start = self._start(inp, p_loc, atoms, mode)
            if constant_q:
                counts = s.group_sum(torch.ones_like(start))
                start = start + ((s.targets - s.group_sum(start)) / counts)[s.fragment]
            loc = {"p_loc": p_loc[atoms], "start": start, "h": h[atoms], "chi": chi[atoms]}
            if mode == "direct":
                q, mu = self._direct(inp, s, loc, v_app[atoms], targets, b)
                ok, steps, res = True, 1, []
            elif mode == "unrolled":
                q, mu, ok, res = self._iterate(inp, s, loc, v_app[atoms], targets, b, differentiable=True)
                steps = len(res)
            else:
                detached = {k: v.detach() for k, v in loc.items()}
                with torch.no_grad():
                    if self.options.mixer == "newton":
                        q, mu, ok, res = self._newton(inp, s, detached, targets, b)
                    else:
                        q, mu, ok, res = self._iterate(
                            inp, s, detached, s.v_app, targets, b, differentiable=False
                        )
                steps = len(res)
                self._check(ok, b, res, q.dtype)
                if torch.is_grad_enabled() and pending is not None:
                    pending.append((s, q, mu))
                elif torch.is_grad_enabled():
                    q, mu = self._implicit(inp, s, loc, v_app[atoms], q, mu, value=(mode == "implicit"))
            charges.append(q)
            mus.append(self._reported_mu(s, mu))
            converged.append(ok)
            iterations.append(steps)
            history.append(res)
        if pending:
            charges, mus = self._implicit_batch(inp, pending, local, chi, v_app, value=(mode == "implicit"))
        q_all = torch.cat(charges)
        delta = q_all - p_loc
        e_loc = scatter_sum(
            local[:, 1] * delta + 0.5 * local[:, 2] * delta * delta, graph.batch, graph.num_graphs
        )
        dipole = structure_dipoles(inp, q_all)
        energy = e_loc + coulomb_energy(inp, q_all) + field_work(inp, dipole)
        device = inp.positions.device
        n_hist = max((len(r) for r in history), default=0)
        residuals = [
            torch.tensor(
                [r[min(k, len(r) - 1)] if r else 0.0 for r in history], dtype=q_all.dtype, device=device
            )
            for k in range(n_hist)
        ]
        return HeadOutput(
            energy=energy,
            charges=q_all,
            dipole=dipole,
            fermi_level=torch.stack(mus),
            converged=torch.tensor(converged, device=device),
            iterations=torch.tensor(iterations, device=device),
            residuals=residuals,
            fragment_index=fragment_index_,
            fragment_charges=fragment_charges,
        )

    def _groups(
        self, inp: HeadInput, p_loc: torch.Tensor, chi: torch.Tensor, constant_q: bool
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None, torch.Tensor | None]:
        """Per structure, the constraint group of each atom and each group's charge.

        ``integer`` at constant Q: the fragments, at the integer charges nearest the charges that one
        structure-wide linear response would give them (their p_loc plus a share of the excess in
        proportion to their softness Σ χ/s; :func:`~aiida_emlip.models.fragments.fragment_targets`);
        otherwise one group, Q. Also the fragment of each atom and those structure-wide fragment
        charges (differentiable, for training to supervise), or ``None`` with one group.
        """
        graph = inp.graph
        totals = inp.total_charge.detach()
        if not constant_q or self.options.fragments == "shared":
            single = [
                (torch.zeros(a.stop - a.start, dtype=torch.long, device=p_loc.device), totals[b].reshape(1))
                for b, a in graph.structures()
            ]
            return single, None, None
        # each fragment's share of the structure's excess in linear response: its softness Σ χ/s
        softness = (chi / self._scales(inp, chi)).sum(-1)
        fragments = fragment_targets(p_loc, graph, softness)
        out = []
        for _, atoms in graph.structures():
            local = fragments.index[atoms]
            first = int(local.min())
            out.append((local - first, fragments.targets[first : int(local.max()) + 1].detach()))
        return out, fragments.index, fragments.shared

    @staticmethod
    def _start(inp: HeadInput, p_loc: torch.Tensor, atoms: slice, mode: str) -> torch.Tensor:
        """Where the iteration starts: the local guess, or for ``converge``/``implicit`` the warm start
        ``inp.initial_charges`` when it is given and finite (the iteration's result does not depend
        on it beyond the tolerance; the backward pass linearises at the converged solution)."""
        warm = inp.warm_charges(atoms) if mode in ("converge", "implicit") else None
        return p_loc[atoms] if warm is None else warm

    @staticmethod
    def _reported_mu(s: _Structure, mu: torch.Tensor) -> torch.Tensor:
        """The structure's Fermi level: μ of its largest group (the only one without fragments)."""
        return largest_fragment_mu(mu, s.fragment)

    def _target_mu(self, inp: HeadInput) -> torch.Tensor:
        """μ of constant-μ runs (option, else ``graph.fermi_level``) and of ``direct`` mode."""
        if self.options.fermi_level is not None and self.options.ensemble == "constant_mu":
            return torch.full_like(inp.graph.fermi_level, float(self.options.fermi_level))
        return inp.graph.fermi_level

    def _require_mu(self, targets: torch.Tensor, b: int, why: str) -> torch.Tensor:
        mu = targets[b].detach()
        if not bool(torch.isfinite(mu)):
            raise ValueError(
                f"scf: structure {b} has no Fermi level ({why}); set fermi_level in atoms.info "
                "or the head option 'fermi_level'"
            )
        return mu

    def _initial_mu(self, s: _Structure, q: torch.Tensor, targets, b: int, constant_q: bool) -> torch.Tensor:
        """μ = 0 for each group at constant Q; the target Fermi level at constant μ."""
        return (
            q.new_zeros(s.groups) if constant_q else self._require_mu(targets, b, "constant-μ SCF").reshape(1)
        )

    def _check(self, ok: bool, b: int, res: list[float], dtype: torch.dtype) -> None:
        if not ok and self.options.on_failure == "raise":
            last = res[-1] if res else float("nan")
            raise SCFConvergenceError(
                f"scf: structure {b} did not converge ({self._reason}) after {len(res)} steps (last residual "
                f"{last:.3g} e; tolerance {default_tolerance(self.options.tol, dtype):.3g}); raise "
                "max_steps, lower mixing or use on_failure='flag'"
            )

    def _iterate(self, inp, s: _Structure, loc, v_app, targets, b, differentiable: bool):
        """Mixed fixed-point iteration from p_loc; returns q, μ, converged, residual history."""
        o = self.options
        constant_q = o.ensemble == "constant_q"
        q = loc["start"]
        mu = self._initial_mu(s, q, targets, b, constant_q)
        positions = inp.positions[s.atoms] if differentiable else s.positions
        cell = inp.cell[s.b] if differentiable else s.cell
        if differentiable:
            self._live_operator(inp, s, positions, cell)
        tol = default_tolerance(o.tol, q.dtype)
        steps = o.unroll_steps if differentiable else o.max_steps
        history: list[float] = []
        self._reason = f"max_steps = {steps} reached"
        previous = math.inf
        anderson = _Anderson(o.anderson_history, o.mixing)
        precondition = None if differentiable else self._kerker(inp, s)
        # each step's stopping tests stay on the device with its (q, μ); the host reads them every
        # ``every`` steps (every step on CPU) and stops at the first step that converged or failed
        every = solvers.check_interval(q.device, self.check_every)
        pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for step in range(steps):
            value, slopes, scales = self._map(inp, s, loc, q, mu, positions, cell, v_app, differentiable)
            if constant_q:
                abs_sums = s.group_sum(value.detach().abs())
                value, error, dqdmu = self._constrain(s, value, slopes, scales)
                # Newton on μ; the first step (from an arbitrary μ = 0) is not clamped
                mu = mu + (error / dqdmu if step == 0 else torch.clamp(error / dqdmu, -1.0, 1.0))
                err_t = solvers.charge_error_beyond_roundoff(error.detach(), abs_sums).max()
            else:
                err_t = q.new_zeros(())
            change = value - q
            q_old = q
            direction = change if precondition is None else precondition(change, slopes, scales)
            if o.mixer == "anderson" and not differentiable:
                q = anderson.step(q, direction)
            else:
                q = q + o.mixing * direction
            stats = torch.stack(
                [
                    change.detach().abs().max(),
                    err_t,
                    (q - q_old).detach().abs().max(),  # the charge change actually applied
                    torch.isfinite(mu.detach()).all().to(q.dtype),
                    q.detach().sum(),
                ]
            )
            pending.append((step, stats, q, mu))
            if len(pending) < every and step < steps - 1:
                continue
            # every stopping test of the pending steps in one transfer from the device
            for (k, _, q_k, mu_k), values in zip(
                pending, solvers._host(torch.stack([p[1] for p in pending]))
            ):
                largest, err, applied, mu_finite, total = values
                res = max(largest, err) if k else largest
                history.append(res)
                reason = self._stop_reason(k, res, mu_finite == 1.0, applied, previous, total)
                previous = applied
                if reason is not None:
                    self._reason = reason
                    return q_k, mu_k, False, history
                if res < tol and not differentiable:
                    return q_k, mu_k, True, history
            pending = []
        # inference returned at its first converged step; the unrolled steps all run
        return q, mu, differentiable and history[-1] < tol, history

    def _stop_reason(
        self, step: int, res: float, mu_finite: bool, applied: float, previous: float, total: float
    ) -> str | None:
        """Why a fixed-point iteration stops unconverged after this step, or ``None`` to go on.

        ``res``: the step's residual; ``applied``/``previous``: the largest charge change this step and
        the step before actually applied; ``total``: the sum of the charges.
        """
        o = self.options
        if not (math.isfinite(res) and mu_finite):
            return "non-finite charges or μ"
        if step > 0 and applied > previous and applied > o.max_step_change:
            return f"a step changed a charge by {applied:.3g} e > {o.max_step_change:g}"
        if abs(total) > o.max_total_charge:
            return f"|Σq| = {abs(total):.3g} e > {o.max_total_charge:g}"
        return None

    def _look(self, step: int, figures, b: int, history: list[list[float]], previous: list[float]):
        """Structure ``b``'s residual after ``step`` of a batched iteration, from its stopping figures
        (largest change, charge error, largest change applied, non-finite μ, Σq), kept in ``history[b]``;
        ``None`` when :meth:`_stop_reason` stops it there."""
        largest, err, applied, bad, total = figures
        res = max(largest, err) if step else largest
        history[b].append(res)
        reason = self._stop_reason(step, res, bad == 0.0, applied, previous[b], total)
        previous[b] = applied
        return None if reason is not None else res

    @staticmethod
    def _dense_batch(graph) -> bool:
        """Whether the batch is one block-diagonal dense system: every structure up to
        :data:`DENSE_SOLVE_ATOMS` atoms, the batch up to :data:`DENSE_BATCH_ATOMS`."""
        sizes = graph.ptr[1:] - graph.ptr[:-1]
        return graph.num_atoms <= DENSE_BATCH_ATOMS and int(sizes.max()) <= DENSE_SOLVE_ATOMS

    def _unrolled_batch(self, inp, groups, local, chi, v_app, targets):
        """:meth:`_iterate` (differentiable) of every structure of a batch at once.

        The same steps as one :meth:`_iterate` per structure, on the whole batch: one projected-
        potential operator (open boundaries:
        :class:`~aiida_emlip.models.coulomb_operator.OpenBatchOperator`, its pair kernels evaluated
        once; a batch with periodic structures, each of at most :data:`DENSE_SOLVE_ATOMS` atoms:
        :class:`~aiida_emlip.models.coulomb_operator.BlockDenseOperator`, one dense block per structure
        formed once), the constraint groups of all structures numbered through, and one transfer of
        every structure's stopping figures per step. Returns the charges, each structure's reported
        μ, converged flags and residual histories, or ``None`` when a structure stops early
        (divergence), for the per-structure iteration to redo the batch.
        """
        o = self.options
        graph = inp.graph
        constant_q = o.ensemble == "constant_q"
        h = inp.features.scalars
        p_loc = local[:, 0]
        n_struct = graph.num_graphs
        numbered = _BatchGroups(groups, p_loc.device)
        fragment, group_targets, owner = numbered.fragment, numbered.targets, numbered.owner
        group_sum, per_structure = numbered.sum, numbered.per_structure

        if bool(graph.pbc.any()):
            op = BlockDenseOperator(
                inp.electrostatics, inp.positions, inp.cell, graph.pbc, graph.ptr, o.widths
            )
        else:
            op = OpenBatchOperator(inp.electrostatics, inp.positions, graph.ptr, o.widths)
        q = p_loc
        if constant_q:
            counts = group_sum(torch.ones_like(q))
            q = q + ((group_targets - group_sum(q)) / counts)[fragment]
            mu = q.new_zeros(numbered.count)
        else:
            mu = torch.stack([self._require_mu(targets, b, "constant-μ SCF") for b in range(n_struct)])
        scales = self._scales(inp, q)
        tol = default_tolerance(o.tol, q.dtype)
        batch = graph.batch
        history: list[list[float]] = [[] for _ in range(n_struct)]
        previous = [math.inf] * n_struct
        for step in range(o.unroll_steps):
            u = (op.potentials(q) + v_app[:, None] + mu[fragment, None]) / scales
            value = p_loc + self._update(h, chi, u)
            slopes = self._slopes(h, chi, u, True)
            if constant_q:
                dfdmu = (slopes / scales).sum(-1)
                dqdmu = group_sum(dfdmu)
                error = group_targets - group_sum(value)
                excess = solvers.charge_error_beyond_roundoff(error.detach(), group_sum(value.detach().abs()))
                value = value + dfdmu * (error / dqdmu)[fragment]
                mu = mu + (error / dqdmu if step == 0 else torch.clamp(error / dqdmu, -1.0, 1.0))
                err_t = per_structure(excess, owner, "amax")
                mu_bad = per_structure((~torch.isfinite(mu.detach())).to(q.dtype), owner, "sum")
            else:
                err_t = q.new_zeros(n_struct)
                mu_bad = (~torch.isfinite(mu.detach())).to(q.dtype)
            change = value - q
            q_old = q
            q = q + o.mixing * change
            stats = torch.stack(
                [
                    per_structure(change.detach().abs(), batch, "amax"),
                    err_t,
                    per_structure((q - q_old).detach().abs(), batch, "amax"),
                    mu_bad,
                    per_structure(q.detach(), batch, "sum"),
                ]
            ).tolist()
            for b, figures in enumerate(zip(*stats)):
                if self._look(step, figures, b, history, previous) is None:
                    return None  # this structure stops here: the per-structure iteration knows how
        mus = []
        for b, (f, t) in enumerate(groups):
            mu_b = numbered.of(mu, b)
            if mu_b.numel() == 1:
                mus.append(mu_b.reshape(()))
            else:
                mus.append(mu_b[int(torch.bincount(f, minlength=int(t.numel())).argmax())])
        converged = [res[-1] < tol for res in history]
        return [q], mus, converged, history

    def _converges_as_batch(self, graph, dense_batch: bool) -> bool:
        """Whether :meth:`_converged_batch` iterates this batch: several structures forming one dense
        batch (:meth:`_dense_batch`), mixed (``anderson`` or ``linear``; ``newton`` goes structure by
        structure)."""
        return dense_batch and graph.num_graphs > 1 and self.options.mixer != "newton"

    def _converged_batch(self, inp, groups, local, chi, v_app, targets, mode: str):
        """The detached fixed-point iteration (:meth:`_iterate`, ``converge``/``implicit``) of every
        structure of a dense batch at once, then the implicit steps of all (:meth:`_implicit_batch`).

        The projected Coulomb matrices of the whole batch are formed once, block diagonal (open
        boundaries: :meth:`~aiida_emlip.models.coulomb_operator.OpenBatchOperator.matrices`; periodic:
        :class:`~aiida_emlip.models.coulomb_operator.BlockDenseOperator`), so a step is one matrix
        product for every structure; each structure mixes on its own (:class:`_BatchAnderson`), takes
        the same stopping tests as in :meth:`_iterate` from one transfer of every structure's figures
        per step, and stays at the step where it converged while the others go on. Where
        :meth:`_kerker` preconditions a structure's steps (two or more periodic directions), the
        dense batch inverts the same model ``J + A`` exactly, block by block, instead of on the mesh.
        Returns the charges, reported μ, converged flags and residual histories, or ``None`` when a
        structure stops for another reason than its step count (divergence): the per-structure
        iteration then redoes the batch and reports it.
        """
        o = self.options
        graph = inp.graph
        constant_q = o.ensemble == "constant_q"
        n_struct, n_atoms, batch = graph.num_graphs, graph.num_atoms, graph.batch
        h, p_loc = inp.features.scalars.detach(), local[:, 0].detach()
        chi_d = chi.detach()
        sigma = inp.electrostatics.config.sigma
        device = p_loc.device
        items = []
        for b, atoms in graph.structures():
            fragment, group_targets = groups[b]
            items.append(
                _Structure(
                    b,
                    atoms,
                    inp.positions[atoms].detach(),
                    inp.cell[b].detach(),
                    graph.pbc[b],
                    v_app[atoms].detach(),
                    fragment,
                    group_targets,
                )
            )
        numbered = _BatchGroups(groups, device)
        fragment, group_targets, owner = numbered.fragment, numbered.targets, numbered.owner
        group_sum, per_structure = numbered.sum, numbered.per_structure
        kerker = [
            o.preconditioner == "mesh" and mesh_preconditioner_width(sigma, s.pbc) is not None for s in items
        ]
        widths = [float(w) for w in o.widths] + ([sigma] if any(kerker) else [])
        positions, cell = inp.positions.detach(), inp.cell.detach()
        if bool(graph.pbc.any()):
            es = inp.electrostatics
            matrices = BlockDenseOperator(es, positions, cell, graph.pbc, graph.ptr, widths).matrices
        else:
            matrices = OpenBatchOperator(inp.electrostatics, positions, graph.ptr, widths).matrices(n_atoms)
        projected, coulomb = matrices[: len(o.widths)], matrices[-1]
        preconditioned = torch.tensor(kerker, device=device)[batch]
        counts = group_sum(torch.ones_like(p_loc))
        q = torch.cat([self._start(inp, p_loc, s.atoms, mode) for s in items])
        if constant_q:
            q = q + ((group_targets - group_sum(q)) / counts)[fragment]
            mu = q.new_zeros(numbered.count)
        else:
            mu = torch.stack([self._require_mu(targets, b, "constant-μ SCF") for b in range(n_struct)])
        scales = self._scales(inp, q)
        v = v_app.detach()
        tol = default_tolerance(o.tol, q.dtype)
        anderson = _BatchAnderson(o.anderson_history, o.mixing, batch, n_struct)
        history: list[list[float]] = [[] for _ in range(n_struct)]
        previous = [math.inf] * n_struct
        active = [True] * n_struct
        moving = torch.ones(n_struct, dtype=torch.bool, device=device)
        # each step's stopping figures stay on the device with its (q, μ); the host reads them every
        # ``every`` steps (every step on CPU), and a structure that converged at a step it had not yet
        # seen goes back to that step's (q, μ), as :meth:`_iterate` returns it
        every = solvers.check_interval(device, self.check_every)
        pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for step in range(o.max_steps):
                u = ((projected @ q).T + v[:, None] + mu[fragment, None]) / scales
                value = p_loc + self._update(h, chi_d, u)
                slopes = self._slopes(h, chi_d, u, False)
                mu_new = mu
                if constant_q:
                    abs_sums = group_sum(value.abs())
                    dfdmu = (slopes / scales).sum(-1)
                    dqdmu = group_sum(dfdmu)
                    error = group_targets - group_sum(value)
                    value = value + dfdmu * (error / dqdmu)[fragment]
                    mu_new = mu + (error / dqdmu if step == 0 else torch.clamp(error / dqdmu, -1.0, 1.0))
                    excess = solvers.charge_error_beyond_roundoff(error, abs_sums)
                    err_t = per_structure(excess, owner, "amax")
                else:
                    err_t = q.new_zeros(n_struct)
                change = value - q
                direction = change
                if any(kerker):
                    hardness = 1.0 / (-(slopes / scales)).sum(-1).clamp(min=1e-8)
                    solved = torch.linalg.solve_ex(coulomb + torch.diag(hardness), hardness * change)[0]
                    solved = solved + (group_sum(change - solved) / counts)[fragment]
                    direction = torch.where(preconditioned, solved, change)
                stepped = anderson.step(q, direction) if o.mixer == "anderson" else q + o.mixing * direction
                q_new = torch.where(moving[batch], stepped, q)
                if constant_q:
                    mu_new = torch.where(moving[owner], mu_new, mu)
                stats = torch.stack(
                    [
                        per_structure(change.abs(), batch, "amax"),
                        err_t,
                        per_structure((q_new - q).abs(), batch, "amax"),
                        per_structure((~torch.isfinite(mu_new)).to(q.dtype), owner, "sum"),
                        per_structure(q_new, batch, "sum"),
                    ]
                )
                q, mu = q_new, mu_new
                pending.append((step, stats, q, mu))
                if len(pending) < every and step < o.max_steps - 1:
                    continue
                # every stopping test of the pending steps in one transfer from the device
                for (k, _, q_k, mu_k), values in zip(
                    pending, solvers._host(torch.stack([p[1] for p in pending]))
                ):
                    settled = []
                    for b, figures in enumerate(zip(*values)):
                        if not active[b]:
                            continue
                        res = self._look(k, figures, b, history, previous)
                        if res is None:
                            return None  # this structure stops here: the per-structure iteration reports it
                        if res < tol:
                            active[b] = False
                            settled.append(b)
                    if settled and k < step:
                        back = torch.zeros(n_struct, dtype=torch.bool, device=device)
                        back[settled] = True
                        q = torch.where(back[batch], q_k, q)
                        mu = torch.where(back[owner], mu_k, mu)
                pending = []
                if not any(active):
                    break
                moving = torch.tensor(active, device=device)
        self._reason = f"max_steps = {o.max_steps} reached"
        for b in range(n_struct):
            self._check(not active[b], b, history[b], q.dtype)
        solved_items = [(s, q[s.atoms], numbered.of(mu, b)) for b, s in enumerate(items)]
        if torch.is_grad_enabled():
            charges, mus = self._implicit_batch(
                inp, solved_items, local, chi, v_app, value=(mode == "implicit"), matrices=projected
            )
        else:
            charges = [q_s for _, q_s, _ in solved_items]
            mus = [self._reported_mu(s, mu_s) for s, _, mu_s in solved_items]
        return charges, mus, [not a for a in active], history

    def _direct(self, inp, s: _Structure, loc, v_app, targets, b):
        """One differentiable update at the reference charges and Fermi level (training mode).

        At constant Q the Fermi level may be unknown (no label): μ is then the one that makes the
        update conserve Q, found by Newton steps on Σ F(q_ref, μ) = Q (exact in one step for the
        linear update).
        """
        if inp.reference_charges is None:
            raise ValueError("scf_mode='direct' needs reference_charges (and fermi_level in the data)")
        q_ref = inp.reference_charges[s.atoms].to(loc["p_loc"].dtype)
        constant_q = self.options.ensemble == "constant_q"
        if constant_q and not bool(torch.isfinite(targets[b])):
            mu = self._mu_from_constraint(inp, s, loc, q_ref)
        else:
            mu = self._require_mu(targets, b, "scf_mode='direct'").expand(s.groups).clone()
        value, slopes, scales = self._map(
            inp, s, loc, q_ref, mu, inp.positions[s.atoms], inp.cell[s.b], v_app, True
        )
        if constant_q:
            value = self._constrain(s, value, slopes, scales)[0]
        return value, mu

    def _mu_from_constraint(
        self, inp, s: _Structure, loc, q_ref: torch.Tensor, steps: int = 3
    ) -> torch.Tensor:
        """μ of each group with Σ_group F_i(q_ref, μ) = its charge (detached Newton iterations from 0)."""
        detached = {k: v.detach() for k, v in loc.items()}
        mu = q_ref.new_zeros(s.groups)
        with torch.no_grad():
            for _ in range(steps):
                value, slopes, scales = self._map(
                    inp, s, detached, q_ref.detach(), mu, s.positions, s.cell, s.v_app, False
                )
                error = s.targets - s.group_sum(value)
                dqdmu = s.group_sum((slopes / scales).sum(-1))
                if not bool(torch.isfinite(error).all()) or float(dqdmu.abs().min()) < 1e-12:
                    break
                mu = mu + error / dqdmu
                if float(error.abs().max()) < 1e-10:
                    break
        return mu

    def _implicit(self, inp, s: _Structure, loc, v_app, q_star, mu_star, value: bool):
        """Differentiable Newton step ``z* − K⁻¹ g(z*)`` (implicit function theorem)."""
        q_star, mu_star = q_star.detach(), mu_star.detach()
        fq, _, _ = self._map(inp, s, loc, q_star, mu_star, inp.positions[s.atoms], inp.cell[s.b], v_app, True)
        residual = fq - q_star
        with torch.no_grad():
            detached = {k: v.detach() for k, v in loc.items()}
            _, slopes, scales = self._map(
                inp, s, detached, q_star, mu_star, s.positions, s.cell, s.v_app, False
            )
        tol = default_tolerance(self.options.linear_tol, q_star.dtype)
        solve, solve_t = self._linear_solvers(inp, s, slopes, scales, tol)
        dq, dmu = ImplicitStep.apply(residual, solve, solve_t, value, mu_star)
        constant_q = self.options.ensemble == "constant_q"
        return q_star - dq, (mu_star - dmu) if constant_q else mu_star

    def _implicit_batch(self, inp, items, local, chi, v_app, value: bool, matrices=None):
        """:meth:`_implicit` of every structure of a batch of small structures at once.

        ``items``: each structure's detached solution ``(s, q*, μ*)``, in batch order. The residual
        is differentiable as in :meth:`_implicit` (each structure's projected potentials at its
        geometry; a batch with open boundaries only through one
        :class:`~aiida_emlip.models.coulomb_operator.OpenBatchOperator`), and ``K`` of the whole batch
        is block diagonal: one dense factorisation and one
        :class:`~aiida_emlip.models.heads.solvers.ImplicitStep` serve every structure. ``matrices``: the
        batch's detached projected Coulomb matrices ``[W, N, N]`` when the caller has them (else each
        structure's operator forms its block). Returns the charges of each structure and the
        reported μ of each.
        """
        o = self.options
        constant_q = o.ensemble == "constant_q"
        widths = o.widths
        q_star = torch.cat([q.detach() for _, q, _ in items])
        mu_star = torch.cat([mu.detach().reshape(-1) for _, _, mu in items])
        numbered = _BatchGroups([(s.fragment, s.targets) for s, _, _ in items], q_star.device)
        fragment = numbered.fragment
        if bool(inp.graph.pbc.any()):
            # every structure's projected potentials, the Ewald cells that can share a sum together
            graph = inp.graph
            phi = projected_potentials(
                inp.electrostatics, q_star, inp.positions, inp.cell, graph.pbc, graph.ptr, widths
            )
        else:
            op = OpenBatchOperator(inp.electrostatics, inp.positions, inp.graph.ptr, widths)
            phi = op.potentials(q_star)
        scales = self._scales(inp, q_star)
        h = inp.features.scalars
        u = (phi + v_app[:, None] + mu_star[fragment, None]) / scales
        residual = local[:, 0] + self._update(h, chi, u) - q_star
        with torch.no_grad():
            coef = self._slopes(h.detach(), chi.detach(), u.detach(), False) / scales
            if matrices is not None:
                jac = (coef.T[:, :, None] * matrices).sum(0)
            else:
                jac = torch.block_diag(
                    *[_dense_jacobian(self._operator(inp, s), coef[s.atoms]) for s, _, _ in items]
                )
        whole = _Structure(
            -1,
            slice(0, q_star.numel()),
            inp.positions.detach(),
            inp.cell.detach(),
            inp.graph.pbc,
            v_app.detach(),
            fragment,
            numbered.targets,
        )
        solve, solve_t = self._dense_solvers(whole, None, coef, coef.sum(-1), jac=jac)
        dq, dmu = ImplicitStep.apply(residual, solve, solve_t, value, mu_star)
        q = q_star - dq
        mu = (mu_star - dmu) if constant_q else mu_star
        charges = [q[s.atoms] for s, _, _ in items]
        mus = [self._reported_mu(s, numbered.of(mu, b)) for b, (s, _, _) in enumerate(items)]
        return charges, mus

    def _linear_solvers(self, inp, s: _Structure, slopes, scales, tol: float, strict: bool = True):
        """``K⁻¹`` and ``K⁻ᵀ`` (GMRES) of the linearised fixed point at the given slopes.

        ``K = [[∂F/∂q − I, ∂F/∂μ], [Gᵀ, 0]]`` at constant Q (one μ column and one Σq row per
        constraint group, G the atoms' group indicator), ``∂F/∂q − I`` at constant μ, with
        ``∂F/∂q = Σ_w diag(∂U/∂u_w / s_w) A_w`` applied through projected potentials (no N×N matrix).
        """
        coef = slopes / scales  # ∂F_i/∂φ_w,i
        fmu = coef.sum(-1)
        n = coef.shape[0]
        op = self._operator(inp, s)
        constant_q = self.options.ensemble == "constant_q"
        if strict and n <= DENSE_SOLVE_ATOMS:
            return self._dense_solvers(s, op, coef, fmu)

        def jac(x: torch.Tensor) -> torch.Tensor:
            return (coef * op.potentials(x)).sum(-1)

        def jac_t(x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(x)
            for w in range(coef.shape[1]):
                out = out + op.potential(coef[:, w] * x, w)
            return out

        kerker = self._linear_preconditioner(inp, s, coef, n)

        def make(op, transpose: bool):
            precond = None if kerker is None else kerker(transpose)

            def solve(r: torch.Tensor, rhs_mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                if constant_q:

                    def full(z):
                        a, m = z[:n], z[n:]
                        column = m[s.fragment] if transpose else fmu * m[s.fragment]
                        row = s.group_sum(a * fmu) if transpose else s.group_sum(a)
                        return torch.cat([op(a) - a + column, row])

                    rhs = torch.cat([r, rhs_mu.reshape(s.groups)])
                else:

                    def full(z):
                        return op(z) - z

                    rhs = r
                z, info = gmres(full, rhs, tol, self.options.linear_max_iter, precond=precond)
                self.linear_iterations += info.iterations
                if strict and not info.converged:
                    raise SCFConvergenceError(
                        f"scf: the linearised solve of structure {s.b} did not converge "
                        f"(relative residual {info.residual:.3g}); the fixed point may be unstable"
                    )
                return (z[:n], z[n:]) if constant_q else (z, rhs_mu * 0)

            return solve

        return make(jac, False), make(jac_t, True)

    def _linear_preconditioner(self, inp: HeadInput, s: _Structure, coef: torch.Tensor, n: int):
        """``transpose ↦`` the right preconditioner of the linearised solves (``None`` where the mesh
        does not apply): the atoms' block ``∂F/∂q − I ≈ −(I + KA)`` inverted as in :meth:`_kerker`,
        ``−(J + A)⁻¹J`` (``−J(J + A)⁻¹`` for the transpose), the μ entries left as they are."""
        if self._mesh(inp, s) is None:
            return None
        hardness, inverse = self._response_inverse(inp, s, coef)

        def make(transpose: bool):
            def apply(v: torch.Tensor) -> torch.Tensor:
                atoms = -hardness * inverse(v[:n]) if transpose else -inverse(hardness * v[:n])
                return torch.cat([atoms, v[n:]])

            return apply

        return make

    def _dense_solvers(self, s: _Structure, op, coef, fmu, jac: torch.Tensor | None = None):
        """``K⁻¹`` and ``K⁻ᵀ`` of :meth:`_linear_solvers` by one LU factorisation of ``K`` formed densely
        (small structures: the projected Coulomb matrices from ``n`` unit charges, no GMRES), or
        from ``jac`` = ``∂F/∂q`` when given (``s`` then stands for a whole batch, ``s.b`` = −1)."""
        n = coef.shape[0]
        eye = torch.eye(n, dtype=coef.dtype, device=coef.device)
        if jac is None:
            jac = _dense_jacobian(op, coef)
        k = jac - eye
        constant_q = self.options.ensemble == "constant_q"
        if constant_q:
            groups = torch.arange(s.groups, device=coef.device)
            member = (s.fragment[:, None] == groups).to(coef.dtype)  # [n, C]
            corner = coef.new_zeros(s.groups, s.groups)
            k = torch.cat([torch.cat([k, fmu[:, None] * member], 1), torch.cat([member.T, corner], 1)])
        factors = torch.linalg.lu_factor(k)

        def make(transpose: bool):
            def solve(r: torch.Tensor, rhs_mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                rhs = torch.cat([r, rhs_mu.reshape(s.groups)]) if constant_q else r
                z = torch.linalg.lu_solve(*factors, rhs[:, None], adjoint=transpose)[:, 0]
                self.linear_iterations += 1
                if not bool(torch.isfinite(z).all()):
                    where = f"structure {s.b}" if s.b >= 0 else "a structure of the batch"
                    raise SCFConvergenceError(
                        f"scf: the linearised system of {where} is singular; the fixed point may be unstable"
                    )
                return (z[:n], z[n:]) if constant_q else (z, rhs_mu * 0)

            return solve

        return make(False), make(True)

    def _newton(self, inp, s: _Structure, loc, targets, b):
        """Newton–Krylov solution of the fixed point (no autograd): robust where mixing sloshes."""
        o = self.options
        constant_q = o.ensemble == "constant_q"
        q = loc["start"]
        mu = self._initial_mu(s, q, targets, b, constant_q)
        tol = default_tolerance(o.tol, q.dtype)
        linear_floor = default_tolerance(o.linear_tol, q.dtype)
        history: list[float] = []
        self._reason = f"max_steps = {o.max_steps} reached"
        previous = math.inf
        for _ in range(o.max_steps):
            value, slopes, scales = self._map(inp, s, loc, q, mu, s.positions, s.cell, s.v_app, False)
            g_q = value - q
            g_mu = s.group_sum(q) - s.targets if constant_q else q.new_zeros(())
            g_mu_excess = (
                solvers.charge_error_beyond_roundoff(g_mu, s.group_sum(q.abs())) if constant_q else g_mu
            )
            res = max(float(g_q.abs().max()), float(g_mu_excess.max()))
            history.append(res)
            if not math.isfinite(res):
                self._reason = "non-finite charges or μ"
                return q, mu, False, history
            if res < tol:
                return q, mu, True, history
            # inexact Newton: solve the linear system just well enough to land below tol
            rtol = max(linear_floor, min(1e-2, 0.1 * tol / max(res, 1e-300)))
            solve, _ = self._linear_solvers(inp, s, slopes, scales, rtol, strict=False)
            dq, dmu = solve(-g_q, -g_mu)
            step = float(dq.abs().max())
            if step > o.max_step_change and step > previous:
                self._reason = f"a Newton step changed a charge by {step:.3g} e > {o.max_step_change:g}"
                return q, mu, False, history
            previous = step
            q = q + dq
            if constant_q:
                mu = mu + dmu
            if abs(float(q.sum())) > o.max_total_charge:
                self._reason = f"|Σq| = {abs(float(q.sum())):.3g} e > {o.max_total_charge:g}"
                return q, mu, False, history
        return q, mu, False, history


def _dense_jacobian(op: CoulombOperator | DenseOperator, coef: torch.Tensor) -> torch.Tensor:
    """``∂F/∂q`` of one structure as a dense ``[n, n]`` matrix: ``Σ_w coef[:, w] · A_w``, with the
    projected Coulomb matrix ``A_w`` of each width from ``n`` unit charges."""
    n = coef.shape[0]
    eye = torch.eye(n, dtype=coef.dtype, device=coef.device)
    return sum(coef[:, w, None] * op.potential(eye, w) for w in range(coef.shape[1]))
