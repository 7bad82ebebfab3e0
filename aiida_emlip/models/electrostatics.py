r"""Electrostatics shared by every model head: Gaussian (or point) charges and Gaussian dipoles.

Conventions (derived and tested in ``docs/electrostatics.md``): units eV, Å, e, V/Å;
``k_e = COULOMB_CONSTANT``. Every atom carries a Gaussian charge ``q_i`` and optionally a Gaussian
dipole ``p_i`` of width σ; two Gaussian charges interact through ``k_e erf(r/2σ)/r``.

* **periodic (3D)**: the k = 0-excluded Hartree energy of the model density (tin-foil boundary,
  neutralising background for charged cells), plus the Gaussian self-energies when ``include_self``.
  torch-pme's background term ``−πs²Q²k_e/V`` is replaced by this convention (``+2πσ²Q²k_e/V``).
* **slab** (exactly two periodic directions, vacuum along the third cell vector): the 3D result plus a
  correction to the 2D-periodic limit, ``(2πk_e/V)(M_z² − Q M₂ − Q² h²/12)`` with moments of the
  model density along the slab normal (Yeh–Berkowitz for Q = 0, Ballenegger–Arnold–Cerdà for Q ≠ 0).
* **open**: direct all-pairs sum.

The charge–dipole and dipole–dipole terms follow the charges' method: the k-space sum of
:mod:`~aiida_emlip.models.gaussian_dipoles` with Ewald, the smooth-PME mesh of
:mod:`~aiida_emlip.models.dipole_mesh` with PME, the direct sum for open boundaries.

``potential`` is ``∂E/∂q`` (V, i.e. eV/e); ``coulomb_matrix`` the Hessian ``∂²E/∂q∂q``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from ase.geometry.minkowski_reduction import minkowski_reduce
from torchpme import Calculator, CoulombPotential, EwaldCalculator

from aiida_emlip.models import dipole_mesh as dm
from aiida_emlip.models import gaussian_dipoles as gd
from aiida_emlip.models.accuracy import (
    PME_FORCE,
    coulomb_length,
    dipole_mesh_parameters,
    ewald_alpha,
    kspace_cutoff,
    pme_parameters,
    realspace_cutoff,
)
from aiida_emlip.models.coulomb_operator import CoulombOperator
from aiida_emlip.models.kernels import GaussianCoulombPotential, HalfSpaceCoulombPotential
from aiida_emlip.models.neighbours import neighbour_list
from aiida_emlip.models.pme import MeshPMECalculator
from aiida_emlip.schema import COULOMB_CONSTANT

__all__ = [
    "Electrostatics",
    "ElectrostaticsConfig",
    "field_energy",
    "total_dipole",
]

METHODS = ("auto", "ewald", "pme", "direct")
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
#: charge channels per PME call in ``coulomb_matvec`` (each channel needs its own mesh)
PME_CHANNEL_CHUNK = 8


@dataclass
class ElectrostaticsConfig:
    """Settings of :class:`Electrostatics` (widths in Å)."""

    sigma: float = 1.5
    method: str = "auto"
    accuracy: float = 1e-6
    pme_min_atoms: int = 700  # measured crossover, docs/electrostatics.md
    slab_correction: bool = True
    include_self: bool = True
    pme_interpolation_nodes: int | None = None  # None: chosen with the mesh from the accuracy

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.sigma < 0.0:
            raise ValueError("sigma must be >= 0")
        if not 0.0 < self.accuracy < 1.0:
            raise ValueError("accuracy must lie in (0, 1)")
        if self.pme_interpolation_nodes is not None and self.pme_interpolation_nodes not in PME_FORCE:
            raise ValueError(f"pme_interpolation_nodes must be one of {sorted(PME_FORCE)} or None")


# --------------------------------------------------------------------------------------------------
# geometry helpers


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


def total_dipole(
    charges: torch.Tensor, positions: torch.Tensor, dipoles: torch.Tensor | None = None
) -> torch.Tensor:
    """``d = Σ q_i r_i + Σ p_i`` (e·Å), ``[3]``; origin-dependent when ``Σ q ≠ 0``."""
    d = (charges[:, None] * positions).sum(0)
    if dipoles is not None:
        d = d + dipoles.sum(0)
    return d


def field_energy(
    charges: torch.Tensor,
    positions: torch.Tensor,
    external_field: torch.Tensor,
    dipoles: torch.Tensor | None = None,
) -> torch.Tensor:
    """Energy in a homogeneous applied field, ``−E·d`` (eV; E in V/Å, physical sign ``E = −∇V``).

    The force on a charge is ``+qE``: moving a positive charge along ``E`` lowers the energy.
    """
    return -(external_field * total_dipole(charges, positions, dipoles)).sum()


# --------------------------------------------------------------------------------------------------
# the module


class Electrostatics(torch.nn.Module):
    """Energy, potential and Coulomb operator of atom-centred Gaussian charges and dipoles.

    One structure per call. Inputs: ``charges [N]``, ``positions [N, 3]``, ``cell [3, 3]`` (rows are
    lattice vectors), ``pbc [3]`` bool, ``dipoles [N, 3]`` or ``None``. Differentiable w.r.t. all
    floating inputs; runs on the device and dtype of ``positions``.
    """

    def __init__(self, config: ElectrostaticsConfig | None = None):
        super().__init__()
        self.config = config if config is not None else ElectrostaticsConfig()
        self._calculators: dict[tuple, Calculator] = {}

    # ---------------------------------------------------------------- method selection

    def select_method(self, n_atoms: int, pbc: torch.Tensor) -> str:
        """``direct`` | ``ewald`` | ``pme`` for a structure of ``n_atoms`` with periodicity ``pbc``."""
        flags = periodic_dims(pbc)
        n_periodic = sum(flags)
        if n_periodic == 1:
            raise NotImplementedError("one periodic direction (wires) is not supported")
        if n_periodic == 0:
            return "direct"
        method = self.config.method
        if method == "direct":
            raise ValueError("method='direct' needs pbc = [False, False, False]")
        if method == "auto":
            return "pme" if n_atoms >= self.config.pme_min_atoms else "ewald"
        return method

    def _calculator(self, method: str, smearing: float, like: torch.Tensor, nodes: int = 0) -> Calculator:
        key = (method, smearing, nodes, like.dtype, like.device)
        if key not in self._calculators:
            if method == "direct":
                calc = Calculator(GaussianCoulombPotential(smearing, prefactor=COULOMB_CONSTANT))
            elif method == "ewald":
                # k-vectors are passed per call (half sphere, see _phi_periodic): lr_wavelength unused
                pot = HalfSpaceCoulombPotential(smearing=smearing, prefactor=COULOMB_CONSTANT)
                calc = EwaldCalculator(pot, lr_wavelength=1.0)
            else:
                pot = CoulombPotential(smearing=smearing, prefactor=COULOMB_CONSTANT)
                calc = MeshPMECalculator(pot, interpolation_nodes=nodes)
            self._calculators[key] = calc.to(device=like.device, dtype=like.dtype)
        return self._calculators[key]

    # ---------------------------------------------------------------- charge part (linear in q)

    def _phi_charges(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
        s_phys: float,
        method: str | None = None,
    ) -> torch.Tensor:
        """Potential ``[N, C]`` of charge channels ``x`` through ``k_e erf(r/√2 s)/r`` (3D or open).

        Periodic: k = 0-excluded (no slab term). On-site term included when ``include_self`` and s > 0.
        """
        method = method or self.select_method(positions.shape[0], pbc)
        if method == "direct":
            i, j = torch.triu_indices(positions.shape[0], positions.shape[0], 1, device=positions.device)
            dist = torch.linalg.norm(positions[j] - positions[i], dim=1)
            calc = self._calculator("direct", s_phys, positions)
            phi = 2.0 * calc(x, cell, positions, torch.stack([i, j], dim=1), dist)
        else:
            phi = self._phi_periodic(x, positions, cell, method, s_phys)
        if self.config.include_self and s_phys > 0.0:
            phi = phi + x * (COULOMB_CONSTANT * SQRT_2_OVER_PI / s_phys)
        return phi

    def _phi_periodic(
        self, x: torch.Tensor, positions: torch.Tensor, cell: torch.Tensor, method: str, s_phys: float
    ) -> torch.Tensor:
        volume = torch.abs(torch.linalg.det(cell))
        if volume.detach().item() < 1e-8:
            raise ValueError("periodic electrostatics needs a cell with nonzero volume")
        n_atoms, accuracy = positions.shape[0], self.config.accuracy
        cell = reduced_cell(cell)
        if s_phys > 0.0:
            # Gaussian density: the torch-pme long-range kernel at s = s_phys is the whole interaction
            smearing = s_phys
            pairs = torch.zeros((0, 2), dtype=torch.long, device=positions.device)
            dist = positions.new_zeros(0)
        else:
            alpha = ewald_alpha(n_atoms, volume.detach().item())
            smearing = 1.0 / (math.sqrt(2.0) * alpha)
            r_cut = realspace_cutoff(alpha, coulomb_length(n_atoms, volume.detach().item()), accuracy)
            pairs, dist = _neighbour_pairs(positions, cell, r_cut)
        beta = smearing / math.sqrt(2.0)  # the k-space kernel is e^{−β²k²}/k²
        if method == "ewald":
            calc = self._calculator(method, smearing, positions)
            kvectors = gd.half_space_kvectors(cell, kspace_cutoff(cell, beta, n_atoms, accuracy))
            phi = 2.0 * calc(x, cell, positions, pairs, dist, kvectors=kvectors)
        else:
            params = pme_parameters(cell, beta, n_atoms, accuracy, self.config.pme_interpolation_nodes)
            calc = self._calculator(method, smearing, positions, params.nodes)
            calc.mesh = params.mesh
            # PME holds one mesh per channel: bound its memory by splitting the channels
            phi = torch.cat(
                [
                    2.0 * calc(xc, cell, positions, pairs, dist)
                    for xc in torch.split(x, PME_CHANNEL_CHUNK, dim=1)
                ],
                1,
            )
        # torch-pme's background term gives −2πs²Q/V; the k = 0-excluded density gives −2π(s²−s_phys²)Q/V
        return phi + (2.0 * math.pi * COULOMB_CONSTANT * s_phys**2) * x.sum(0, keepdim=True) / volume

    def _slab_active(self, pbc: torch.Tensor) -> bool:
        return self.config.slab_correction and sum(periodic_dims(pbc)) == 2

    def _slab_moments(
        self, q: torch.Tensor, z: torch.Tensor, normal: torch.Tensor, dipoles: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Total charge, first and second moment along the normal of the model density, per channel."""
        sigma2 = self.config.sigma**2
        total = q.sum(0)
        first = (q * z[:, None]).sum(0)
        second = (q * (z * z + sigma2)[:, None]).sum(0)
        if dipoles is not None:
            pz = dipoles @ normal
            first = first + pz.sum()
            second = second + 2.0 * (pz * z).sum()
        return total, first, second

    def _slab_phi(
        self,
        q: torch.Tensor,
        positions: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
        width2: float,
        dipoles: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """∂E_slab/∂q of the density, projected on a Gaussian of variance ``width2`` at each atom."""
        z, h, volume, normal = slab_geometry(positions, cell, periodic_dims(pbc))
        total, first, second = self._slab_moments(q, z, normal, dipoles)
        zz = (z * z + width2)[:, None]
        pref = 4.0 * math.pi * COULOMB_CONSTANT / volume
        return pref * (first * z[:, None] - 0.5 * second - 0.5 * total * zz - total * h * h / 12.0)

    def _slab_energy(
        self,
        charges: torch.Tensor,
        positions: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
        dipoles: torch.Tensor | None,
    ) -> torch.Tensor:
        z, h, volume, normal = slab_geometry(positions, cell, periodic_dims(pbc))
        total, first, second = self._slab_moments(charges[:, None], z, normal, dipoles)
        pref = 2.0 * math.pi * COULOMB_CONSTANT / volume
        return (pref * (first * first - total * second - total * total * h * h / 12.0)).sum()

    # ---------------------------------------------------------------- dipole part

    def _require_dipole_width(self) -> float:
        if self.config.sigma <= 0.0:
            raise ValueError("Gaussian dipoles need sigma > 0")
        return self.config.sigma

    def _dipole_energy(
        self, charges: torch.Tensor, dipoles: torch.Tensor, positions: torch.Tensor, cell: torch.Tensor, pbc
    ) -> torch.Tensor:
        sigma = self._require_dipole_width()
        self_energy = gd.dipole_self_energy(dipoles, sigma)
        method = self.select_method(positions.shape[0], pbc)
        if method == "direct":
            e = gd.dipole_direct_energy(charges, dipoles, positions, sigma)
            return e + self_energy if self.config.include_self else e
        cell = reduced_cell(cell)
        n_atoms, accuracy = positions.shape[0], self.config.accuracy
        if method == "pme":
            params = dipole_mesh_parameters(cell, sigma, n_atoms, accuracy)
            e = dm.dipole_mesh_energy(charges, dipoles, positions, cell, sigma, params.mesh, params.nodes)
        else:
            k_cut = kspace_cutoff(cell, sigma, n_atoms, accuracy, dipoles=True)
            e = gd.dipole_kspace_energy(charges, dipoles, positions, cell, sigma, k_cut)
        return e if self.config.include_self else e - self_energy

    def _dipole_phi(
        self, dipoles: torch.Tensor, positions: torch.Tensor, cell: torch.Tensor, pbc, widths: torch.Tensor
    ) -> torch.Tensor:
        sigma = self._require_dipole_width()
        method = self.select_method(positions.shape[0], pbc)
        if method == "direct":
            return gd.dipole_direct_potential(dipoles, positions, sigma, widths)
        # the projected kernel is e^{−(σ²+w²)k²/2}: the narrowest width sets the cutoff or mesh
        beta = min(sigma, math.sqrt(0.5 * (sigma**2 + float(widths.min()) ** 2)))
        cell = reduced_cell(cell)
        n_atoms, accuracy = positions.shape[0], self.config.accuracy
        if method == "pme":
            params = dipole_mesh_parameters(cell, beta, n_atoms, accuracy)
            return dm.dipole_mesh_potential(
                dipoles, positions, cell, sigma, widths, params.mesh, params.nodes
            )
        k_cut = kspace_cutoff(cell, beta, n_atoms, accuracy, dipoles=True)
        return gd.dipole_kspace_potential(dipoles, positions, cell, sigma, widths, k_cut)

    # ---------------------------------------------------------------- public API

    def energy(
        self,
        charges: torch.Tensor,
        positions: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
        dipoles: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Electrostatic energy (eV, scalar) of one structure."""
        q = charges[:, None]
        phi = self._phi_charges(q, positions, cell, pbc, math.sqrt(2.0) * self.config.sigma)
        e = 0.5 * (q * phi).sum()
        if dipoles is not None:
            e = e + self._dipole_energy(charges, dipoles, positions, cell, pbc)
        if self._slab_active(pbc):
            e = e + self._slab_energy(charges, positions, cell, pbc, dipoles)
        return e

    def potential(
        self,
        charges: torch.Tensor,
        positions: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
        dipoles: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``∂E/∂q_i`` (V = eV/e), ``[N]``."""
        widths = positions.new_tensor([self.config.sigma])
        return self.projected_potentials(charges, positions, cell, pbc, widths, dipoles)[:, 0]

    def projected_potentials(
        self,
        charges: torch.Tensor,
        positions: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
        widths: torch.Tensor | list[float],
        dipoles: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Potential of the density projected on a normalised Gaussian of width ``w`` at each atom.

        ``[N, len(widths)]`` (V). Charges enter through ``k_e erf(r/√(2(σ²+w²)))/r``; the atom's own
        density is included iff ``include_self``, so ``w = σ`` reproduces :meth:`potential`.
        """
        widths = torch.as_tensor(widths, dtype=positions.dtype, device=positions.device).reshape(-1)
        q = charges[:, None]
        slab = self._slab_active(pbc)
        columns = []
        for w in widths.tolist():
            s_phys = math.sqrt(self.config.sigma**2 + w * w)
            phi = self._phi_charges(q, positions, cell, pbc, s_phys)[:, 0]
            if slab:
                phi = phi + self._slab_phi(q, positions, cell, pbc, w * w, dipoles)[:, 0]
            columns.append(phi)
        out = torch.stack(columns, dim=1)
        if dipoles is not None:
            out = out + self._dipole_phi(dipoles, positions, cell, pbc, widths)
        return out

    def coulomb_matvec(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
        method: str | None = None,
    ) -> torch.Tensor:
        """``A @ x`` with ``A = ∂²E/∂q∂q`` (eV/e²) for ``x`` ``[N]`` or ``[N, C]``, without forming ``A``.

        ``method`` overrides the automatic choice (``"ewald"`` / ``"pme"``; periodic cells only).
        """
        vector = x.dim() == 1
        xs = x[:, None] if vector else x
        out = self._phi_charges(xs, positions, cell, pbc, math.sqrt(2.0) * self.config.sigma, method)
        if self._slab_active(pbc):
            out = out + self._slab_phi(xs, positions, cell, pbc, self.config.sigma**2)
        return out[:, 0] if vector else out

    def coulomb_operator(
        self, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor
    ) -> CoulombOperator:
        """``x ↦ A x`` (:meth:`coulomb_matvec`) of one geometry, set up once for many products (no
        autograd through the geometry): for the iterative solvers."""
        return CoulombOperator(self, positions, cell, pbc, [self.config.sigma])

    def projected_operator(
        self, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, widths
    ) -> CoulombOperator:
        """:meth:`projected_potentials` (charges only) of one geometry, set up once: its
        ``potentials(q)`` is ``[N, W]``, ``potential(x, k)`` the ``k``-th width of ``x`` ``[N, C]``."""
        return CoulombOperator(self, positions, cell, pbc, [float(w) for w in widths])

    def coulomb_matrix(self, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor) -> torch.Tensor:
        """Dense ``A = ∂²E/∂q_i∂q_j`` ``[N, N]``; diagonal includes ``k_e/(σ√π)`` when ``include_self``.

        Periodic cells use Ewald unless ``method="pme"`` is configured (N channels of PME meshes would
        be large); ``coulomb_matvec`` may then use PME and differ from it by the PME error.
        """
        n = positions.shape[0]
        eye = torch.eye(n, dtype=positions.dtype, device=positions.device)
        method = None
        if sum(periodic_dims(pbc)) > 0 and self.config.method == "auto":
            method = "ewald"
        a = self.coulomb_matvec(eye, positions, cell, pbc, method)
        return 0.5 * (a + a.transpose(0, 1))


def _neighbour_pairs(
    positions: torch.Tensor, cell: torch.Tensor, cutoff: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Half neighbour list (all three directions periodic, on the positions' device), distances."""
    i, j, shifts = neighbour_list(positions, cell, (True, True, True), cutoff, full_list=False)
    vec = positions[j] - positions[i] + shifts.to(positions.dtype) @ cell
    return torch.stack([i, j], dim=1), torch.linalg.norm(vec, dim=1)
