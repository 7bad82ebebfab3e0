r"""The charge part of the electrostatics for one geometry: one kernel for every caller.

:class:`ChargeKernel` is the potential of Gaussian (or point) charge channels through
``k_e erf(r/√2 s)/r`` — all pairs for open boundaries, the k = 0-excluded periodic sum by Ewald or
PME otherwise; :class:`SlabTerm` the correction of a slab to the 2D-periodic limit;
:class:`CoulombOperator` combines them into the projected potentials of one or more widths. Each
computes at construction what depends on the geometry alone (the reduced cell, k-vectors, the PME
mesh, interpolation weights and influence function, real-space neighbour pairs, slab heights) and per
call only what depends on the charges. Autograd through ``positions`` and ``cell`` is kept, so that
:class:`~aiida_emlip.models.electrostatics.Electrostatics` builds one for each differentiable
evaluation (energy, forces, stress, double backward) and the iterative solvers of the
self-consistent heads build one per detached geometry and apply it tens of times
(:meth:`Electrostatics.coulomb_operator`, :meth:`Electrostatics.projected_operator`).

torch-pme provides the Ewald sum (:class:`torchpme.EwaldCalculator`), the real-space pair sums, the
Lagrange interpolation weights (``MeshInterpolator``), the mesh k-vectors and the Coulomb kernel with
its self and background terms; the PME spreading, filtering and interpolation of several channels at
once on a mesh chosen from the accuracy (:func:`~aiida_emlip.models.accuracy.pme_parameters`, any
2·3·5-smooth size) are done here, with the weights computed once per geometry. Conventions follow
torch-pme's (``V_i = ½ Σ_j q_j v(r_ij)``, self term and neutralising background subtracted), doubled
to ``∂E/∂q``.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np
import torch
from ase.geometry.minkowski_reduction import minkowski_reduce
from torchpme.lib import generate_kvectors_for_mesh
from torchpme.lib.mesh_interpolator import MeshInterpolator

from aiida_emlip.models import gaussian_dipoles as gd
from aiida_emlip.models.accuracy import (
    coulomb_length,
    kspace_cutoff,
    pme_parameters,
    realspace_cutoff,
    smooth_size,
    split_smearing,
)
from aiida_emlip.models.neighbours import neighbour_list
from aiida_emlip.schema import COULOMB_CONSTANT

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
#: charge channels per PME mesh application (each channel needs its own mesh)
PME_CHANNEL_CHUNK = 8


# --------------------------------------------------------------------------------------------------
# geometry


def reduced_cell(cell: torch.Tensor) -> torch.Tensor:
    """The same lattice in Minkowski-reduced form (ASE), ``U @ cell`` with integer ``U``, det U = +1.

    A 3D periodic sum does not depend on which basis describes the lattice, but a PME mesh along
    strongly skewed vectors is larger and less accurate than one along the reduced vectors.
    Differentiable in ``cell``.
    """
    op = _reduction(tuple(float(x) for x in cell.detach().cpu().double().reshape(-1).tolist()))
    if op is None:
        return cell
    return torch.tensor(op, dtype=cell.dtype, device=cell.device) @ cell


@lru_cache(maxsize=256)
def _reduction(cell_key: tuple) -> tuple | None:
    op = minkowski_reduce(np.array(cell_key).reshape(3, 3))[1]
    if np.linalg.det(op) < 0:
        op = -op
    return None if (op == np.eye(3, dtype=op.dtype)).all() else tuple(map(tuple, op.tolist()))


def pair_width(sigma: float, width: float) -> float:
    """``√(σ² + w²)``: the width of the interaction of Gaussian charges of width ``σ`` with a Gaussian of
    width ``w`` (``w = σ``: the charges' own pair width, √2 σ). Every caller takes it from here, so that
    one width is one float: the kept torch-pme calculators and PME kernels are keyed on it."""
    return math.sqrt(sigma**2 + width**2)


def periodic_dims(pbc: torch.Tensor) -> list[bool]:
    """``pbc`` as a list of three bools."""
    flags = [bool(b) for b in torch.as_tensor(pbc).reshape(-1).tolist()]
    if len(flags) != 3:
        raise ValueError("pbc must have three entries")
    return flags


def slab_geometry(positions: torch.Tensor, cell: torch.Tensor, flags: list[bool]) -> tuple[torch.Tensor, ...]:
    """Heights ``z_i = r_i·n`` along the unit slab normal ``n``, the period ``h = V/A`` and ``V``."""
    a, b = [cell[k] for k in range(3) if flags[k]]
    normal = torch.linalg.cross(a, b)
    area = torch.linalg.norm(normal)
    volume = torch.abs(torch.linalg.det(cell))
    return positions @ (normal / area), volume / area, volume, normal / area


def _neighbour_pairs(
    positions: torch.Tensor, cell: torch.Tensor, cutoff: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Half neighbour list (all three directions periodic, on the positions' device), distances."""
    i, j, shifts = neighbour_list(positions, cell, (True, True, True), cutoff, full_list=False)
    vec = positions[j] - positions[i] + shifts.to(positions.dtype) @ cell
    return torch.stack([i, j], dim=1), torch.linalg.norm(vec, dim=1)


# --------------------------------------------------------------------------------------------------
# kernels


class MeshSpreader:
    """Interpolation of per-atom values onto a periodic mesh and back (torch-pme's Lagrange weights),
    with the weights of a fixed geometry computed once; several channels per call. Differentiable in
    the positions and the cell."""

    def __init__(self, positions: torch.Tensor, cell: torch.Tensor, mesh: tuple[int, int, int], nodes: int):
        ns = torch.tensor(mesh, dtype=torch.long, device=positions.device)
        interp = MeshInterpolator(cell, ns, nodes, method="Lagrange")
        interp.compute_weights(positions)
        w = interp.interpolation_weights
        self.mesh = tuple(int(n) for n in mesh)
        # [p³, N] products of the three 1D weights and the flat mesh index of each
        self.weights = w[interp.x_shifts, :, 0] * w[interp.y_shifts, :, 1] * w[interp.z_shifts, :, 2]
        ny, nz = self.mesh[1], self.mesh[2]
        self.index = ((interp.x_indices * ny + interp.y_indices) * nz + interp.z_indices).reshape(-1)
        self.points = math.prod(self.mesh)

    def to_mesh(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` → ``[C, n_a, n_b, n_c]`` (channel-major throughout: no transposed copies)."""
        values = (self.weights[None] * x.T[:, None, :]).reshape(x.shape[1], -1)
        flat = x.new_zeros(x.shape[1], self.points).index_add_(1, self.index, values)
        return flat.reshape(x.shape[1], *self.mesh)

    def to_points(self, mesh_values: torch.Tensor) -> torch.Tensor:
        """``[C, n_a, n_b, n_c]`` → ``[N, C]``."""
        channels = mesh_values.shape[0]
        values = mesh_values.reshape(channels, -1).index_select(1, self.index)
        return (values.reshape(channels, *self.weights.shape) * self.weights[None]).sum(1).T


class ChargeKernel:
    """``x ↦`` the potential ``[N, C]`` of charge channels ``x`` ``[N, C]`` through
    ``k_e erf(r/√2 s)/r`` (``k_e/r`` for ``s = 0``) in one geometry.

    ``method``: ``direct`` (all pairs, open boundaries) or ``ewald`` / ``pme`` (3D periodic, k = 0
    excluded, no slab term; for ``s = 0`` split with a real-space neighbour list). The on-site term
    ``x k_e√(2/π)/s`` is included when ``include_self`` and ``s > 0``. ``es`` is the
    :class:`~aiida_emlip.models.electrostatics.Electrostatics` (settings, torch-pme calculators).
    """

    def __init__(self, es, positions: torch.Tensor, cell: torch.Tensor, method: str, s_phys: float):
        n_atoms, accuracy = positions.shape[0], es.config.accuracy
        self.method, self.positions, self.cell = method, positions, cell
        self.onsite = 0.0
        if es.config.include_self and s_phys > 0.0:
            self.onsite = COULOMB_CONSTANT * SQRT_2_OVER_PI / s_phys
        if method == "direct":
            i, j = torch.triu_indices(n_atoms, n_atoms, 1, device=positions.device)
            self.pairs = torch.stack([i, j], dim=1)
            self.dist = torch.linalg.norm(positions[j] - positions[i], dim=1)
            self.calc = es._calculator("direct", s_phys, positions)
            return
        self.volume = torch.abs(torch.linalg.det(cell))
        volume = self.volume.detach().item()
        if volume < 1e-8:
            raise ValueError("periodic electrostatics needs a cell with nonzero volume")
        # torch-pme's background term gives −2πs²Q/V; the k = 0-excluded density gives −2π(s²−s_phys²)Q/V
        self.background = 2.0 * math.pi * COULOMB_CONSTANT * s_phys**2
        self.cell = cell = reduced_cell(cell)
        # the range separation: at least the charges' own width (for point charges the Ewald balance)
        smearing = split_smearing(volume, s_phys, n_atoms, method)
        if smearing > s_phys:
            ell = coulomb_length(n_atoms, volume)
            r_cut = realspace_cutoff(1.0 / (math.sqrt(2.0) * smearing), ell, accuracy)
            self.pairs, self.dist = _neighbour_pairs(positions, cell, r_cut)
        else:
            # a Gaussian density as wide as the split: the k-space kernel is the whole interaction
            self.pairs = torch.zeros((0, 2), dtype=torch.long, device=positions.device)
            self.dist = positions.new_zeros(0)
        beta = smearing / math.sqrt(2.0)  # the k-space kernel is e^{−β²k²}/k²
        self.calc = es._calculator(method, smearing, positions, width=s_phys)
        if method == "ewald":
            self.kvectors = gd.half_space_kvectors(cell, kspace_cutoff(cell, beta, n_atoms, accuracy))
            return
        params = pme_parameters(cell, beta, n_atoms, accuracy, es.config.pme_interpolation_nodes)
        self.spreader = MeshSpreader(positions, cell, params.mesh, params.nodes)
        pot = self.calc.potential
        self.kfilter = es.mesh_kernel(smearing, s_phys, cell, params.mesh)
        self.mesh_volume = torch.abs(torch.linalg.det(cell))
        self.self_term = pot.self_contribution()
        self.mesh_background = 2.0 * pot.background_correction()

    def _mesh(self, x: torch.Tensor) -> torch.Tensor:
        """The PME k-space part, ``2 V_i`` in torch-pme's conventions: no self interaction, uniform
        background for ``Σq ≠ 0``."""
        mesh = self.spreader.to_mesh(x)
        hat = torch.fft.rfftn(mesh, norm="backward", dim=(1, 2, 3)) * self.kfilter
        filtered = torch.fft.irfftn(hat, norm="forward", dim=(1, 2, 3), s=mesh.shape[-3:])
        phi = self.spreader.to_points(filtered) / self.mesh_volume
        phi = phi - x * self.self_term
        return phi - self.mesh_background * x.sum(0) / self.mesh_volume

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "pme":
            # one mesh per channel: bound the memory by splitting the channels
            chunks = torch.split(x, PME_CHANNEL_CHUNK, dim=1)
            phi = self._mesh(x) if len(chunks) == 1 else torch.cat([self._mesh(c) for c in chunks], 1)
            if self.pairs.shape[0]:
                phi = phi + 2.0 * self.calc._compute_rspace(x, self.pairs, self.dist)
        else:
            kvectors = self.kvectors if self.method == "ewald" else None
            phi = 2.0 * self.calc(x, self.cell, self.positions, self.pairs, self.dist, kvectors=kvectors)
        if self.method != "direct":
            phi = phi + self.background * x.sum(0, keepdim=True) / self.volume
        if self.onsite:
            phi = phi + x * self.onsite
        return phi


class SlabTerm:
    """The correction of a slab (exactly two periodic directions, vacuum along the third cell vector)
    to the 2D-periodic limit, ``(2πk_e/V)(M_z² − Q M₂ − Q² h²/12)`` with moments of the model density
    (Gaussian charges and dipoles of width ``sigma``) along the slab normal, in one geometry."""

    def __init__(self, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, sigma: float):
        self.z, self.h, self.volume, self.normal = slab_geometry(positions, cell, periodic_dims(pbc))
        self.sigma2 = sigma**2

    def moments(
        self, q: torch.Tensor, dipoles: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Total charge, first and second moment along the normal of the model density, per channel."""
        z = self.z
        total = q.sum(0)
        first = (q * z[:, None]).sum(0)
        second = (q * (z * z + self.sigma2)[:, None]).sum(0)
        if dipoles is not None:
            pz = dipoles @ self.normal
            first = first + pz.sum()
            second = second + 2.0 * (pz * z).sum()
        return total, first, second

    def potential(self, q: torch.Tensor, width2: float, dipoles: torch.Tensor | None = None) -> torch.Tensor:
        """∂E_slab/∂q of the density (charges ``q`` ``[N, C]``), projected on a Gaussian of variance
        ``width2`` at each atom."""
        total, first, second = self.moments(q, dipoles)
        z, h = self.z, self.h
        zz = (z * z + width2)[:, None]
        pref = 4.0 * math.pi * COULOMB_CONSTANT / self.volume
        return pref * (first * z[:, None] - 0.5 * second - 0.5 * total * zz - total * h * h / 12.0)

    def energy(self, charges: torch.Tensor, dipoles: torch.Tensor | None) -> torch.Tensor:
        total, first, second = self.moments(charges[:, None], dipoles)
        pref = 2.0 * math.pi * COULOMB_CONSTANT / self.volume
        return (pref * (first * first - total * second - total * total * self.h * self.h / 12.0)).sum()


class CoulombOperator:
    """``x ↦ A_w x`` in one geometry: the potential of Gaussian charges ``x`` (``[N]`` or ``[N, C]``)
    projected on normalised Gaussians of each width ``w`` (``σ`` gives ``A = ∂²E/∂q∂q``), slab term
    included; one :class:`ChargeKernel` of ``s = √(σ² + w²)`` per width.

    Built by :class:`~aiida_emlip.models.electrostatics.Electrostatics` for each differentiable
    evaluation, and from detached tensors once per geometry for the solvers
    (:meth:`Electrostatics.coulomb_operator`, :meth:`Electrostatics.projected_operator`).
    """

    def __init__(
        self, es, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, widths, method=None
    ):
        self.positions, self.cell, self.pbc = positions, cell, pbc
        self.widths = [float(w) for w in widths]
        self.method = method or es.select_method(positions.shape[0], pbc)
        sigma = es.config.sigma
        self.kernels = [
            ChargeKernel(es, positions, cell, self.method, pair_width(sigma, w)) for w in self.widths
        ]
        self.slab = SlabTerm(positions, cell, pbc, sigma) if es._slab_active(pbc) else None

    def potential(self, x: torch.Tensor, k: int = 0, dipoles: torch.Tensor | None = None) -> torch.Tensor:
        """The projected potential of width ``widths[k]`` of the charges ``x`` (``[N]`` or ``[N, C]``);
        ``dipoles`` enter the slab term only (their field is the caller's)."""
        vector = x.dim() == 1
        xs = x[:, None] if vector else x
        out = self.kernels[k](xs)
        if self.slab is not None:
            out = out + self.slab.potential(xs, self.widths[k] ** 2, dipoles)
        return out[:, 0] if vector else out

    def potentials(self, charges: torch.Tensor, dipoles: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, W]``: every width's projected potential of the charges ``[N]``."""
        return torch.stack([self.potential(charges, k, dipoles) for k in range(len(self.widths))], dim=1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The first width's potential (for :meth:`Electrostatics.coulomb_operator`: ``A x``)."""
        return self.potential(x, 0)


class DenseOperator:
    """A :class:`CoulombOperator` of a small structure as dense matrices: ``A_w`` ``[W, N, N]`` formed
    once from ``N`` unit charges (one application of each width with ``N`` channels), then every
    product is a matrix product. The operator is linear in the charges (slab and background terms
    included), so the numbers are the operator's up to rounding. Autograd through the geometry is
    kept when the operator's positions carry it: one construction then serves every step of an
    unrolled iteration. Charges only (no dipoles).
    """

    def __init__(self, op: CoulombOperator) -> None:
        self.positions, self.cell, self.pbc, self.widths = op.positions, op.cell, op.pbc, op.widths
        n = op.positions.shape[0]
        eye = torch.eye(n, dtype=op.positions.dtype, device=op.positions.device)
        self.matrices = torch.stack([op.potential(eye, k) for k in range(len(op.widths))])  # [W, N, N]

    def potential(self, x: torch.Tensor, k: int = 0, dipoles: torch.Tensor | None = None) -> torch.Tensor:
        """The projected potential of width ``widths[k]`` of the charges ``x`` (``[N]`` or ``[N, C]``)."""
        if dipoles is not None:
            raise ValueError("DenseOperator: charges only")
        return self.matrices[k] @ x

    def potentials(self, charges: torch.Tensor, dipoles: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, W]``: every width's projected potential of the charges ``[N]``."""
        if dipoles is not None:
            raise ValueError("DenseOperator: charges only")
        return (self.matrices @ charges).T

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.potential(x, 0)


class BlockDenseOperator:
    """:class:`DenseOperator` of every structure of a batch as one block-diagonal matrix per width.

    The atoms of structure ``b`` are ``ptr[b]:ptr[b + 1]``, its geometry ``cell[b]`` and ``pbc[b]``
    (periodic or open); each block is formed once, that structure's :class:`DenseOperator` (autograd
    through the geometry kept; the Ewald cells that can share a sum form theirs together,
    :func:`~aiida_emlip.models.ewald_projected.block_matrices`), so that every step of a batched unrolled
    iteration is one matrix product for the whole batch. For small structures only (a dense block each).
    """

    def __init__(self, es, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, ptr, widths):
        # imported here: ewald_projected builds on this module's kernels
        from aiida_emlip.models.ewald_projected import block_matrices

        blocks = block_matrices(es, positions, cell, pbc, ptr, widths)
        self.matrices = torch.stack(
            [torch.block_diag(*[m[k] for m in blocks]) for k in range(len(widths))]
        )  # [W, N, N]

    def potentials(self, charges: torch.Tensor) -> torch.Tensor:
        """``[N, W]``: every width's projected potential of the charges ``[N]``."""
        return (self.matrices @ charges).T


class OpenBatchOperator:
    """:meth:`CoulombOperator.potentials` of a whole batch of open-boundary structures at once.

    The atoms of structure ``b`` are ``ptr[b]:ptr[b + 1]``; every pair within a structure enters once,
    with the kernel ``k_e erf(r/√2 s)/r`` of each width evaluated once at construction, so that each
    application is a gather and a scatter over the batch's pairs for all widths together. Autograd
    through ``positions`` is kept (the kernel values depend on them), so one operator serves every
    step of a differentiable (unrolled) iteration. The numbers are those of one
    :class:`CoulombOperator` per structure: the same pair terms summed in the same order.
    """

    def __init__(self, es, positions: torch.Tensor, ptr: torch.Tensor, widths) -> None:
        bounds = ptr.tolist()
        pairs = [
            torch.triu_indices(stop - start, stop - start, 1, device=positions.device) + start
            for start, stop in itertools.pairwise(bounds)
        ]
        if pairs:
            self.i, self.j = torch.cat(pairs, dim=1)
        else:
            self.i = self.j = torch.zeros(0, dtype=torch.long, device=positions.device)
        dist = torch.linalg.norm(positions[self.j] - positions[self.i], dim=1)
        sigma = es.config.sigma
        kernels, onsite = [], []
        for w in widths:
            s_phys = pair_width(sigma, float(w))
            kernels.append(es._calculator("direct", s_phys, positions).potential.from_dist(dist))
            on = es.config.include_self and s_phys > 0.0
            onsite.append(COULOMB_CONSTANT * SQRT_2_OVER_PI / s_phys if on else 0.0)
        self.kernel = torch.stack(kernels, dim=1)  # [P, W]
        self.onsite = positions.new_tensor(onsite)

    def matrices(self, n: int) -> torch.Tensor:
        """The operator as dense block-diagonal matrices ``[W, n, n]`` (``n`` atoms in the batch): the
        pair kernels off the diagonal, the on-site terms on it."""
        out = self.kernel.new_zeros(self.kernel.shape[1], n, n)
        out[:, self.i, self.j] = self.kernel.T
        out[:, self.j, self.i] = self.kernel.T
        return out + torch.diag_embed(self.onsite[:, None].expand(-1, n))

    def potentials(self, charges: torch.Tensor) -> torch.Tensor:
        """``[N, W]``: every width's projected potential of the charges ``[N]``."""
        out = charges.new_zeros(charges.shape[0], self.kernel.shape[1])
        out = out.index_add(0, self.i, self.kernel * charges[self.j, None])
        out = out.index_add(0, self.j, self.kernel * charges[self.i, None])
        return out + charges[:, None] * self.onsite


def gaussian_self_potential(sigma: float) -> float:
    """``k_e/(σ√π)``: the potential of a unit Gaussian charge of width ``σ`` at its centre, the diagonal
    of the Coulomb operator of Gaussian charges (0 for point charges)."""
    return COULOMB_CONSTANT / (sigma * math.sqrt(math.pi)) if sigma > 0 else 0.0


def mesh_preconditioner_width(sigma: float, pbc: torch.Tensor) -> float | None:
    """The width ``√2 σ`` of the Coulomb operator of charges of width ``σ``, the ``s_phys`` of a
    :class:`MeshPreconditioner` for a cell with ``pbc``, or ``None`` where none applies: point charges,
    or fewer than two periodic directions (a slab's model leaves out the slab term and stays positive)."""
    if sigma <= 0 or sum(periodic_dims(pbc)) < 2:
        return None
    return pair_width(sigma, sigma)


class MeshPreconditioner:
    r"""An approximate inverse of ``H = A + diag(J)`` on a coarse mesh, for conjugate gradients.

    ``A`` acts on long-wavelength charge modes as the mesh operator ``Wᵀ C W`` (``W``: spreading of
    per-atom values on a mesh of ``M`` points, ``C``: the periodic convolution with
    ``ĝ(k) = 4πk_e e^{−s²k²/2}/k²``, eigenvalues ``M ĝ/V``). ``M⁻¹`` is the inverse of the model
    ``H̃ = D + WᵀCW`` (``D = diag H``), by the Woodbury identity

    .. math:: \tilde H^{-1} = D^{-1} − D^{-1}W^TC^{1/2}\,S^{-1}\,C^{1/2}WD^{-1},
        \qquad S = I + C^{1/2}WD^{-1}W^TC^{1/2},

    with the mesh system ``S`` (eigenvalues ≥ 1) solved by ``inner_steps`` conjugate-gradient steps
    from zero, themselves preconditioned by the homogeneous value of ``S``, ``1 + c ĝ`` with
    ``c = Σ_i d_i⁻¹ / V`` (diagonal in k). On the smooth modes, where ``A`` dominates and makes the
    condition number of ``H`` grow like ``L²``, ``H̃`` is exact; on short wavelengths ``ĝ → 0`` and it
    reduces to Jacobi. Where atoms fill the cell unevenly (a void, a slab's vacuum, an interface) the
    inner steps resolve the local density that the homogeneous value misses, so the outer iteration
    counts stay flat in N for every geometry.

    Positive for every geometry and any number of inner steps: conjugate gradients from zero give
    iterates with ``bᵀs_k = s_kᵀ S s_k ≤ bᵀS⁻¹b``, so ``rᵀM⁻¹r ≥ rᵀH̃⁻¹r > 0`` (the Jacobi diagonal
    stays as the fallback against round-off). The inner steps make ``M⁻¹`` depend slightly on ``r``
    unless converged; the outer solvers use the Polak–Ribière ``β``, which tolerates that. No host
    synchronisation; the kernel is widened by ``smoothing`` (Å, ``s² = 2σ² + smoothing²``) to keep the
    coarse mesh small, and the spreading weights are computed once per geometry. The inner iteration
    runs in k-space (real-space inner products by Parseval's identity on the half spectrum), where
    ``C^{1/2}`` and its preconditioner are diagonal: each application costs ``inner_steps + 2`` small
    FFT pairs, spreadings and interpolations on the coarse mesh, and ~25 kernel launches per inner
    step (a launch-bound GPU pays per launch).
    """

    def __init__(
        self,
        positions: torch.Tensor,
        cell: torch.Tensor,
        s_phys: float,
        spacing: float | None = None,
        nodes: int = 3,
        smoothing: float = 0.75,
        inner_steps: int = 8,
    ):
        positions, cell = positions.detach(), reduced_cell(cell.detach())
        s_tot = math.sqrt(s_phys**2 + smoothing**2)
        spacing = 0.8 * s_tot if spacing is None else spacing
        lengths = torch.linalg.norm(cell, dim=1).tolist()
        mesh = tuple(smooth_size(max(math.ceil(length / spacing), nodes)) for length in lengths)
        self.spreader = MeshSpreader(positions, cell, mesh, nodes)
        self.volume = torch.abs(torch.linalg.det(cell))
        ns = torch.tensor(mesh, dtype=torch.long, device=positions.device)
        k2 = (generate_kvectors_for_mesh(cell, ns) ** 2).sum(-1)
        g = 4.0 * math.pi * COULOMB_CONSTANT * torch.exp(-0.5 * s_tot**2 * k2) / k2.clamp(min=1e-300)
        self.g = torch.where(k2 > 0, g, torch.zeros_like(g))
        root = torch.sqrt(self.spreader.points * self.g / self.volume)  # C^{1/2} in k
        self.mesh = mesh
        self.inner_steps = inner_steps
        # Parseval on the half spectrum of rfftn: Σ_x a(x)b(x) = Σ_k w_k Re(conj(â_k) b̂_k), w = 2/M for
        # the planes whose mirror images rfftn leaves out, 1/M for k_c = 0 (and k_c = n_c/2, n_c even)
        w = torch.full((mesh[2] // 2 + 1,), 2.0, dtype=positions.dtype, device=positions.device)
        w[0] = 1.0
        if mesh[2] % 2 == 0:
            w[-1] = 1.0
        # the inner iteration works on ŵ^{1/2}·v̂ (ŵ = w/M), where that inner product is the plain one
        # of the real and imaginary parts; the scaling is folded into C^{1/2}'s multipliers
        # (multipliers of the real and imaginary parts alike: ``[..., 1]`` against ``view_as_real``)
        half = torch.sqrt(w / self.spreader.points)
        self.root_in, self.root_out = (root / half)[..., None], (root * half)[..., None]

    def with_diagonal(self, diag: torch.Tensor) -> MeshPreconditionerApply:
        """``M⁻¹`` for the Jacobi diagonal ``diag = d`` (J plus the Coulomb diagonal), ``[N]``."""
        return MeshPreconditionerApply(self, diag)

    def to_k(self, grid: torch.Tensor) -> torch.Tensor:
        """Real ``[C, n_a, n_b, n_c]`` → its half spectrum (``rfftn``) as real and imaginary parts,
        ``[C, n_a, n_b, n_c//2+1, 2]``: real multipliers then act without complex conversions."""
        return torch.view_as_real(torch.fft.rfftn(grid, dim=(1, 2, 3)))

    def to_real(self, hat: torch.Tensor) -> torch.Tensor:
        """:meth:`to_k`'s layout → real ``[C, n_a, n_b, n_c]`` (``irfftn``)."""
        return torch.fft.irfftn(torch.view_as_complex(hat), s=self.mesh, dim=(1, 2, 3))

    @staticmethod
    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``[C]`` inner products of two scaled half spectra (:attr:`root_in`): ``Σ_x a(x) b(x)``."""
        return (a * b).sum((1, 2, 3, 4))


class MeshPreconditionerApply:
    """``r ↦ M⁻¹ r`` of :class:`MeshPreconditioner` for one Jacobi diagonal ``diag``; ``fallback`` is
    that diagonal, what the solvers continue with should round-off make ``rᵀM⁻¹r`` non-positive."""

    def __init__(self, mesh: MeshPreconditioner, diag: torch.Tensor):
        self.mesh_op = mesh
        self.diag = self.fallback = diag
        self.inv = 1.0 / diag
        self.inner = (1.0 / (1.0 + (self.inv.sum() / mesh.volume) * mesh.g))[..., None]

    def _mesh_system(self, v: torch.Tensor) -> torch.Tensor:
        """``S v = v + C^{1/2} W D⁻¹ Wᵀ C^{1/2} v`` on scaled half spectra (``MeshPreconditioner.to_k``)."""
        m = self.mesh_op
        u = m.spreader.to_points(m.to_real(m.root_in * v))
        return torch.addcmul(v, m.root_out, m.to_k(m.spreader.to_mesh(self.inv[:, None] * u)))

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        vector = r.dim() == 1
        r2 = r[:, None] if vector else r
        m = self.mesh_op
        u = self.inv[:, None] * r2
        b = m.root_out * m.to_k(m.spreader.to_mesh(u))
        # S s = b by preconditioned CG from zero, a fixed number of steps, all channels at once. S is
        # positive definite and the inner preconditioner positive: curvature > 0 and rz ≥ 0, zero
        # only once the mesh system is solved exactly (the clamps then give α = β = 0)
        tiny = torch.finfo(r.dtype).tiny
        s, res = torch.zeros_like(b), b
        z = self.inner * res
        p, rz = z, m.dot(res, z)
        for _ in range(m.inner_steps):
            sp = self._mesh_system(p)
            alpha = (rz / m.dot(p, sp).clamp(min=tiny))[:, None, None, None, None]
            s = torch.addcmul(s, alpha, p)
            res = torch.addcmul(res, alpha, sp, value=-1.0)
            z = self.inner * res
            rz_new = m.dot(res, z)
            p = torch.addcmul(z, (rz_new / rz.clamp(min=tiny))[:, None, None, None, None], p)
            rz = rz_new
        out = u - self.inv[:, None] * m.spreader.to_points(m.to_real(m.root_in * s))
        return out[:, 0] if vector else out
