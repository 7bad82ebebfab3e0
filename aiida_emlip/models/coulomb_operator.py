r"""Coulomb operators built once per geometry, for the iterative solvers of the self-consistent heads.

A QEq conjugate-gradient solve or an SCF iteration applies the Coulomb operator of one fixed
geometry tens of times. :meth:`Electrostatics.coulomb_matvec` recomputes for every call what depends
on the geometry only — the reduced cell, the PME mesh and its influence function, the interpolation
weights, the k-vectors, the host synchronisations of the parameter choice. The operators here do that
once (no autograd: inference solves and the detached iterations), and per call only spread the
charges on the mesh, Fourier-filter and interpolate back. The values are those of
:meth:`Electrostatics.coulomb_matvec` / :meth:`Electrostatics.projected_potentials` (without
dipoles) to round-off.
"""

from __future__ import annotations

import math

import torch
from torchpme.lib.mesh_interpolator import MeshInterpolator

from aiida_emlip.models import gaussian_dipoles as gd
from aiida_emlip.models.accuracy import kspace_cutoff, pme_parameters
from aiida_emlip.schema import COULOMB_CONSTANT

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class MeshSpreader:
    """Interpolation of per-atom values onto a periodic mesh and back (torch-pme's Lagrange weights),
    with the weights of a fixed geometry computed once; several channels per call."""

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
        """``[N, C]`` → ``[C, n_a, n_b, n_c]``."""
        values = (self.weights[:, :, None] * x[None]).reshape(-1, x.shape[1])
        flat = x.new_zeros(self.points, x.shape[1]).index_add_(0, self.index, values)
        return flat.T.reshape(x.shape[1], *self.mesh)

    def to_points(self, mesh_values: torch.Tensor) -> torch.Tensor:
        """``[C, n_a, n_b, n_c]`` → ``[N, C]``."""
        flat = mesh_values.reshape(mesh_values.shape[0], -1).T
        values = flat[self.index].reshape(*self.weights.shape, -1)
        return (values * self.weights[:, :, None]).sum(0)


class _PeriodicKernel:
    """``x ↦`` the k = 0-excluded periodic potential of Gaussian charges of width ``s`` (PME or Ewald),
    as :meth:`Electrostatics._phi_periodic` with ``s > 0`` (no self term, no slab term)."""

    def __init__(self, es, positions: torch.Tensor, cell: torch.Tensor, method: str, s_phys: float):
        n_atoms, accuracy = positions.shape[0], es.config.accuracy
        self.method = method
        self.volume = torch.abs(torch.linalg.det(cell))
        beta = s_phys / math.sqrt(2.0)
        self.background = (2.0 * math.pi * COULOMB_CONSTANT * s_phys**2) / self.volume
        self.positions, self.cell = positions, cell
        if method == "ewald":
            self.calc = es._calculator(method, s_phys, positions)
            self.kvectors = gd.half_space_kvectors(cell, kspace_cutoff(cell, beta, n_atoms, accuracy))
            self.pairs = torch.zeros((0, 2), dtype=torch.long, device=positions.device)
            self.dist = positions.new_zeros(0)
            return
        params = pme_parameters(cell, beta, n_atoms, accuracy, es.config.pme_interpolation_nodes)
        calc = es._calculator(method, s_phys, positions, params.nodes)
        self.spreader = MeshSpreader(positions, cell, params.mesh, params.nodes)
        kfilter = calc.kspace_filter
        kfilter.update(cell, torch.tensor(params.mesh, dtype=torch.long, device=positions.device))
        self.kfilter = kfilter._kfilter.clone()
        pot = calc.potential
        self.self_term = pot.self_contribution()
        self.pme_background = 2.0 * pot.background_correction() / self.volume

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "ewald":
            phi = 2.0 * self.calc(x, self.cell, self.positions, self.pairs, self.dist, kvectors=self.kvectors)
        else:
            mesh = self.spreader.to_mesh(x)
            hat = torch.fft.rfftn(mesh, norm="backward", dim=(1, 2, 3)) * self.kfilter
            filtered = torch.fft.irfftn(hat, norm="forward", dim=(1, 2, 3), s=mesh.shape[-3:])
            phi = self.spreader.to_points(filtered) / self.volume
            # torch-pme's conventions (self interaction and background removed), as MeshPMECalculator
            phi = phi - x * self.self_term - self.pme_background * x.sum(0)
        return phi + self.background * x.sum(0, keepdim=True)


class CoulombOperator:
    """``x ↦ A_w x`` for a fixed geometry: the potential of Gaussian charges ``x`` (``[N]`` or ``[N, C]``)
    projected on normalised Gaussians of each width ``w`` (``σ`` gives ``A = ∂²E/∂q∂q``).

    Built by :meth:`Electrostatics.coulomb_operator` / :meth:`Electrostatics.projected_operator`;
    no autograd through the geometry (the positions and cell are detached).
    """

    def __init__(self, es, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, widths):
        from aiida_emlip.models.electrostatics import periodic_dims, reduced_cell

        positions, cell = positions.detach(), cell.detach()
        self.es, self.positions, self.cell, self.pbc = es, positions, cell, pbc
        self.widths = [float(w) for w in widths]
        self.method = es.select_method(positions.shape[0], pbc)
        self.slab = es._slab_active(pbc)
        sigma = es.config.sigma
        self.s_phys = [math.sqrt(sigma**2 + w * w) for w in self.widths]
        self.kernels: list = []
        if self.method in ("ewald", "pme") and min(self.s_phys) > 0.0:
            if float(torch.abs(torch.linalg.det(cell))) < 1e-8:
                raise ValueError("periodic electrostatics needs a cell with nonzero volume")
            reduced = reduced_cell(cell)
            self.kernels = [_PeriodicKernel(es, positions, reduced, self.method, s) for s in self.s_phys]
        elif self.method == "direct":
            n = positions.shape[0]
            i, j = torch.triu_indices(n, n, 1, device=positions.device)
            self.pairs = torch.stack([i, j], dim=1)
            self.dist = torch.linalg.norm(positions[j] - positions[i], dim=1)
        if self.slab:
            from aiida_emlip.models.electrostatics import slab_geometry

            self.z, h, volume, _ = slab_geometry(positions, cell, periodic_dims(pbc))
            self.slab_pref = 4.0 * math.pi * COULOMB_CONSTANT / volume
            self.slab_h2 = h * h / 12.0
            self.slab_sigma2 = sigma**2

    def _charges(self, x: torch.Tensor, k: int) -> torch.Tensor:
        s = self.s_phys[k]
        if self.kernels:
            phi = self.kernels[k](x)
        elif self.method == "direct":
            calc = self.es._calculator("direct", s, self.positions)
            phi = 2.0 * calc(x, self.cell, self.positions, self.pairs, self.dist)
        else:  # point charges (σ = 0, w = 0): the split Ewald/PME sum of the module
            return self.es._phi_charges(x, self.positions, self.cell, self.pbc, s, self.method)
        if self.es.config.include_self and s > 0.0:
            phi = phi + x * (COULOMB_CONSTANT * SQRT_2_OVER_PI / s)
        return phi

    def _slab_phi(self, x: torch.Tensor, width2: float) -> torch.Tensor:
        z = self.z[:, None]
        total = x.sum(0)
        first = (x * z).sum(0)
        second = (x * (z * z + self.slab_sigma2)).sum(0)
        zz = z * z + width2
        return self.slab_pref * (first * z - 0.5 * second - 0.5 * total * zz - total * self.slab_h2)

    def potential(self, x: torch.Tensor, k: int = 0) -> torch.Tensor:
        """The projected potential of width ``widths[k]`` of the charges ``x`` (``[N]`` or ``[N, C]``)."""
        vector = x.dim() == 1
        xs = x[:, None] if vector else x
        out = self._charges(xs, k)
        if self.slab:
            out = out + self._slab_phi(xs, self.widths[k] ** 2)
        return out[:, 0] if vector else out

    def potentials(self, charges: torch.Tensor) -> torch.Tensor:
        """``[N, W]``: every width's projected potential of the charges ``[N]`` (as
        :meth:`Electrostatics.projected_potentials` without dipoles)."""
        return torch.stack([self.potential(charges, k) for k in range(len(self.widths))], dim=1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The first width's potential (for :meth:`Electrostatics.coulomb_operator`: ``A x``)."""
        return self.potential(x, 0)


class MeshPreconditioner:
    r"""An approximate inverse of ``H = A + diag(J)`` on a coarse mesh, for conjugate gradients.

    ``A`` acts on long-wavelength charge modes as the mesh convolution ``Wᵀ G W`` (``W``: spreading on
    the mesh, ``G``: ``ĝ(k) = 4πk_e e^{−s²k²/2}/k²``). With ``D = diag(H)`` the Woodbury identity
    gives ``H⁻¹ = D⁻¹ − D⁻¹Wᵀ(G⁻¹ + W D⁻¹ Wᵀ)⁻¹W D⁻¹``; replacing ``W D⁻¹ Wᵀ`` by its
    long-wavelength value ``c = Σ_i d_i⁻¹ / V`` makes the inner inverse diagonal in k:

    .. math:: M^{-1} = D^{-1} − D^{-1} W^T \mathcal F^{-1}\,\frac{ĝ}{1 + c\,ĝ}\,\mathcal F\, W D^{-1}.

    For a homogeneous system this is exact on the smooth modes, where ``A`` dominates and makes the
    condition number of ``H`` grow like ``L²``; on short wavelengths ``ĝ → 0`` and it reduces to
    Jacobi. The kernel is widened by ``smoothing`` (Å, ``s² = 2σ² + smoothing²``): molecules put two or
    three atoms on one coarse-mesh cell, and with the narrow kernel their common modes were
    over-corrected (M⁻¹ indefinite for water at J ≈ 2 eV/e²); the long wavelengths are unchanged.

    ``M⁻¹`` is symmetric and positive in the continuum limit (``1/(d(1 + n ĝ/d))`` per mode) but not
    for every geometry: where the atoms fill the cell unevenly (a void, a slab's vacuum, an
    interface) the mean ``c`` underestimates the local density and the smooth modes are
    over-corrected. The solvers therefore check ``rᵀM⁻¹r > 0`` at every step and continue with
    Jacobi from the current iterate otherwise. Fully periodic cells only. One coarse-mesh spreading,
    two small FFTs and one interpolation per application; the weights are computed once per geometry.
    """

    def __init__(
        self,
        positions: torch.Tensor,
        cell: torch.Tensor,
        s_phys: float,
        spacing: float | None = None,
        nodes: int = 3,
        smoothing: float = 3.0,
    ):
        from torchpme.lib import generate_kvectors_for_mesh

        from aiida_emlip.models.accuracy import smooth_size
        from aiida_emlip.models.electrostatics import reduced_cell

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
        self.mesh = mesh

    def with_diagonal(self, diag: torch.Tensor) -> MeshPreconditionerApply:
        """``M⁻¹`` for the Jacobi diagonal ``diag = d`` (J plus the Coulomb diagonal), ``[N]``."""
        return MeshPreconditionerApply(self, diag)


class MeshPreconditionerApply:
    """``r ↦ M⁻¹ r`` of :class:`MeshPreconditioner` for one diagonal; ``diag`` is the Jacobi fallback."""

    def __init__(self, mesh: MeshPreconditioner, diag: torch.Tensor):
        self.mesh_op = mesh
        self.diag = diag
        self.inv = 1.0 / diag
        c = self.inv.sum() / mesh.volume
        self.kernel = mesh.g / (1.0 + c * mesh.g)

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        vector = r.dim() == 1
        r2 = r[:, None] if vector else r
        u = self.inv[:, None] * r2
        m = self.mesh_op
        grid = m.spreader.to_mesh(u)
        hat = torch.fft.rfftn(grid, norm="backward", dim=(1, 2, 3)) * self.kernel
        back = torch.fft.irfftn(hat, norm="forward", dim=(1, 2, 3), s=grid.shape[-3:])
        z = u - self.inv[:, None] * m.spreader.to_points(back) / m.volume
        return z[:, 0] if vector else z
