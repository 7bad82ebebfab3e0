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

import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torchpme import Calculator, EwaldCalculator
from torchpme.lib import generate_kvectors_for_mesh

from aiida_emlip.models import dipole_mesh as dm
from aiida_emlip.models import ewald_batch as eb
from aiida_emlip.models import gaussian_dipoles as gd
from aiida_emlip.models.accuracy import PME_FORCE, dipole_mesh_parameters, kspace_cutoff
from aiida_emlip.models.coulomb_operator import (
    SQRT_2_OVER_PI,
    ChargeKernel,
    CoulombOperator,
    SlabTerm,
    pair_width,
    periodic_dims,
    reduced_cell,
)
from aiida_emlip.models.kernels import (
    GaussianCoulombPotential,
    GaussianSplitCoulombPotential,
    HalfSpaceCoulombPotential,
)
from aiida_emlip.schema import COULOMB_CONSTANT

__all__ = [
    "Electrostatics",
    "ElectrostaticsConfig",
    "field_energy",
    "periodic_dims",
    "reduced_cell",
    "total_dipole",
]

METHODS = ("auto", "ewald", "pme", "direct")
#: PME k-space kernels kept per model for reuse at the same cell (:meth:`Electrostatics.mesh_kernel`)
MESH_KERNELS_KEPT = 4


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
# helpers


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
        self._mesh_kernels: OrderedDict[tuple, torch.Tensor] = OrderedDict()

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

    def _calculator(self, method: str, smearing: float, like: torch.Tensor, width: float = 0.0) -> Calculator:
        """torch-pme's calculator of the charge kernel (cached per width, dtype and device): the
        direct pair sum, Ewald, or for PME the potential and its real-space sum (the mesh part is
        :class:`~aiida_emlip.models.coulomb_operator.ChargeKernel`'s). For Ewald and PME,
        ``smearing`` is the range separation and ``width`` the charges' own pair width (≤ smearing)."""
        key = (method, smearing, width, like.dtype, like.device)
        if key not in self._calculators:
            if method == "direct":
                calc = Calculator(GaussianCoulombPotential(smearing, prefactor=COULOMB_CONSTANT))
            elif method == "ewald":
                # k-vectors are passed per call (half sphere, see ChargeKernel): lr_wavelength unused
                pot = HalfSpaceCoulombPotential(smearing=smearing, width=width, prefactor=COULOMB_CONSTANT)
                calc = EwaldCalculator(pot, lr_wavelength=1.0)
            else:
                pot = GaussianSplitCoulombPotential(smearing, width, prefactor=COULOMB_CONSTANT)
                calc = Calculator(pot)
            self._calculators[key] = calc.to(device=like.device, dtype=like.dtype)
        return self._calculators[key]

    def mesh_kernel(
        self, smearing: float, width: float, cell: torch.Tensor, mesh: tuple[int, int, int]
    ) -> torch.Tensor:
        """The PME k-space kernel ``[n_a, n_b, n_c//2 + 1]`` of the charge kernel of range separation
        ``smearing`` and pair width ``width`` on ``mesh`` of ``cell`` (torch-pme's kernel on the mesh's
        |k|², as its ``KSpaceFilter``).

        It depends on the cell alone, so for a cell without autograd the last
        :data:`MESH_KERNELS_KEPT` are kept and reused for the same cell: the operator of a solver and
        the energy of one evaluation share one, and so do the steps of MD at fixed cell (building it
        costs more than a mesh application: 0.08 s on a 240³ mesh on two CPU cores). Nothing is kept
        under ``torch.inference_mode``.
        """
        key = None
        # nothing kept from inference mode: its tensors cannot enter a later autograd graph
        if not cell.requires_grad and not torch.is_inference_mode_enabled():
            key = (smearing, width, cell.dtype, cell.device, tuple(mesh), tuple(cell.reshape(-1).tolist()))
            kernel = self._mesh_kernels.get(key)
            if kernel is not None:
                self._mesh_kernels.move_to_end(key)
                return kernel
        pot = self._calculator("pme", smearing, cell, width=width).potential
        ns = torch.tensor(mesh, dtype=torch.long, device=cell.device)
        kernel = pot.kernel_from_k_sq(torch.linalg.norm(generate_kvectors_for_mesh(cell, ns), dim=3) ** 2)
        if key is not None:
            self._mesh_kernels[key] = kernel
            while len(self._mesh_kernels) > MESH_KERNELS_KEPT:
                self._mesh_kernels.popitem(last=False)
        return kernel

    def _slab_active(self, pbc: torch.Tensor) -> bool:
        return self.config.slab_correction and sum(periodic_dims(pbc)) == 2

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
        method = self.select_method(positions.shape[0], pbc)
        kernel = ChargeKernel(self, positions, cell, method, pair_width(self.config.sigma, self.config.sigma))
        e = 0.5 * (q * kernel(q)).sum()
        if dipoles is not None:
            e = e + self._dipole_energy(charges, dipoles, positions, cell, pbc)
        return self._with_slab_term(e, charges, dipoles, positions, cell, pbc)

    def dipole_terms(
        self,
        charges: torch.Tensor,
        dipoles: torch.Tensor,
        positions: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`energy` of one structure without its charge–charge term, which does not depend on the
        dipoles: the same derivatives with respect to them (the field at each atom is minus the gradient)
        for one charge sum less."""
        e = self._dipole_energy(charges, dipoles, positions, cell, pbc)
        return self._with_slab_term(e, charges, dipoles, positions, cell, pbc)

    def _with_slab_term(
        self,
        e: torch.Tensor,
        charges: torch.Tensor,
        dipoles: torch.Tensor | None,
        positions: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
    ) -> torch.Tensor:
        """``e`` plus the slab correction of a slab (exactly two periodic directions); else ``e``."""
        if self._slab_active(pbc):
            e = e + SlabTerm(positions, cell, pbc, self.config.sigma).energy(charges, dipoles)
        return e

    def energies(
        self,
        charges: torch.Tensor,
        positions: torch.Tensor,
        cells: torch.Tensor,
        pbc: torch.Tensor,
        ptr: torch.Tensor,
        dipoles: torch.Tensor | None = None,
        charge_term: bool = True,
    ) -> torch.Tensor:
        """Electrostatic energies (eV, ``[B]``) of a batch: structure ``b`` holds atoms
        ``ptr[b]:ptr[b + 1]`` in ``cells[b]`` with periodicity ``pbc[b]``.

        Each is :meth:`energy` of the structure, or :meth:`dipole_terms` (the energy without its
        charge–charge term) where ``charge_term`` is false. An open-boundary batch is one pair sum
        (:meth:`open_energies`); the structures that use the Ewald method are summed together
        (:mod:`~aiida_emlip.models.ewald_batch`), the others one at a time.
        """
        if not charge_term and dipoles is None:
            raise ValueError("without the charge-charge term the energy needs dipoles")
        if charge_term and not bool(pbc.any()):
            return self.open_energies(charges, positions, ptr, dipoles)
        groups, others = eb.members(self, positions, cells, pbc, ptr, dipoles is not None, charge_term)
        index: list[int] = []
        values: list[torch.Tensor] = []
        for group in groups:
            index.extend(member.index for member in group)
            values.append(eb.group_energies(self, group, charges, positions, dipoles))
        bounds = ptr.tolist()
        for b in others:
            atoms = slice(bounds[b], bounds[b + 1])
            p = None if dipoles is None else dipoles[atoms]
            if charge_term:
                value = self.energy(charges[atoms], positions[atoms], cells[b], pbc[b], p)
            else:
                value = self.dipole_terms(charges[atoms], p, positions[atoms], cells[b], pbc[b])
            index.append(b)
            values.append(value.reshape(1))
        order = torch.tensor(index, device=charges.device)
        return charges.new_zeros(len(bounds) - 1).index_add(0, order, torch.cat(values))

    def open_energies(
        self,
        charges: torch.Tensor,
        positions: torch.Tensor,
        ptr: torch.Tensor,
        dipoles: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Electrostatic energies (eV, ``[B]``) of a batch of open-boundary structures.

        :meth:`energy`'s ``direct`` method for every structure at once: one pair sum over the pairs
        within each structure (atoms ``ptr[b]:ptr[b + 1]``), each structure's energy summed from its
        atoms (its pairs' dipole terms from the pairs, with ``dipoles``). The same numbers as one call
        per structure up to the order of the last sums.
        """
        bounds = ptr.tolist()
        pairs = [
            torch.triu_indices(stop - start, stop - start, 1, device=positions.device) + start
            for start, stop in itertools.pairwise(bounds)
        ]
        i, j = torch.cat(pairs, dim=1)
        s_phys = pair_width(self.config.sigma, self.config.sigma)
        calc = self._calculator("direct", s_phys, positions)
        dist = torch.linalg.norm(positions[j] - positions[i], dim=1)
        q = charges[:, None]
        cell = positions.new_zeros(3, 3)  # unused by the pair sum
        phi = 2.0 * calc(q, cell, positions, torch.stack([i, j], dim=1), dist)
        if self.config.include_self and s_phys > 0.0:
            phi = phi + q * (COULOMB_CONSTANT * SQRT_2_OVER_PI / s_phys)
        batch = torch.repeat_interleave(torch.diff(ptr))
        energies = 0.5 * q.new_zeros(len(bounds) - 1).index_add(0, batch, (q * phi)[:, 0])
        if dipoles is None:
            return energies
        sigma = self._require_dipole_width()
        pairs = gd.dipole_pair_energies(charges, dipoles, positions, i, j, sigma)
        energies = energies + torch.zeros_like(energies).index_add(0, batch[i], pairs)
        if self.config.include_self:
            own = gd.dipole_self_energies(dipoles, sigma)
            energies = energies + torch.zeros_like(energies).index_add(0, batch, own)
        return energies

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
        out = CoulombOperator(self, positions, cell, pbc, widths.tolist()).potentials(charges, dipoles)
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
        return CoulombOperator(self, positions, cell, pbc, [self.config.sigma], method)(x)

    def coulomb_operator(
        self, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor
    ) -> CoulombOperator:
        """``x ↦ A x`` (:meth:`coulomb_matvec`) of one geometry, set up once for many products (no
        autograd through the geometry): for the iterative solvers."""
        return CoulombOperator(self, positions.detach(), cell.detach(), pbc, [self.config.sigma])

    def projected_operator(
        self, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, widths
    ) -> CoulombOperator:
        """:meth:`projected_potentials` (charges only) of one geometry, set up once: its
        ``potentials(q)`` is ``[N, W]``, ``potential(x, k)`` the ``k``-th width of ``x`` ``[N, C]``."""
        return CoulombOperator(self, positions.detach(), cell.detach(), pbc, [float(w) for w in widths])

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
