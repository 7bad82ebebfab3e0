r"""Induced atomic dipoles: a polarisable response to the field of the head's multipoles at any range.

Every head's charges (and dipoles) come from features of a finite receptive field, or, for the
self-consistent heads, from a response that may move charge between atoms. Neither lets a molecule
far from an ion polarise without charge leaving it. This optional term of the model adds that
response, first order in the field and without charge transfer:

* each atom gets an isotropic polarisability ``α_i = softplus(g(h_i)) ≥ 0`` (Å³, Gaussian units), read
  out from its backbone scalars, so it depends on the environment and can vanish;
* ``E_i`` is the electric field (V/Å) at atom i of every other charge and dipole of the head's Gaussian
  density (periodic images, slab correction and applied field included; an atom's own density exerts no
  field on itself), taken as ``−∂E_H/∂p_i`` with a probe dipole ``p_i = 0``, so it comes from the same
  tested solver as the Hartree energy;
* the induced dipoles are ``μ_i = (α_i/k_e) E_i`` (e·Å) and the energy ``−½ Σ_i (α_i/k_e) |E_i|²`` (eV):
  the minimum of ``Σ_i |μ_i|² k_e/(2α_i) − μ_i·E_i`` over μ, i.e. polarisable points that do not
  polarise each other (no mutual induction, so no polarisation catastrophe).

Charges are untouched, so a fragment's charge stays where the head put it however far another
fragment is; the energy of an ion at distance r from a neutral molecule of polarisability α gains
``−½ α k_e q²/r⁴``, the ion–induced-dipole term a local model cannot see beyond its cutoff.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from aiida_emlip.models import gaussian_dipoles as gd
from aiida_emlip.models.heads.base import HeadInput, mlp, scatter_sum
from aiida_emlip.schema import COULOMB_CONSTANT


@dataclass
class InductionConfig:
    """Settings of :class:`Induction` (the model's ``induction`` section)."""

    enabled: bool = False
    hidden: int = 16  # width of the polarisability readout's hidden layer (0: linear)
    initial_polarizability: float = 0.5  # Å³ per atom at initialisation

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"induction.enabled must be true or false, got {self.enabled!r}")
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, int):
            raise ValueError(f"induction.hidden must be an integer, got {self.hidden!r}")
        if isinstance(self.initial_polarizability, bool) or not isinstance(
            self.initial_polarizability, (int, float)
        ):
            raise ValueError(
                f"induction.initial_polarizability must be a number (Å³), got {self.initial_polarizability!r}"
            )
        if self.hidden < 0:
            raise ValueError(f"induction.hidden must be >= 0, got {self.hidden}")
        if not self.initial_polarizability > 0.0:
            raise ValueError(
                f"induction.initial_polarizability must be > 0 Å³, got {self.initial_polarizability}"
            )


class Induction(torch.nn.Module):
    """First-order induced dipoles in the field of the head's density (see the module docstring)."""

    def __init__(self, config: InductionConfig, num_scalars: int) -> None:
        super().__init__()
        self.config = config
        self.readout = mlp(num_scalars, 1, config.hidden)
        last = self.readout if isinstance(self.readout, torch.nn.Linear) else self.readout[-1]
        with torch.no_grad():
            last.weight.mul_(0.1)
            # softplus(b) = α₀
            last.bias.fill_(math.log(math.expm1(config.initial_polarizability)))

    def polarizabilities(self, inp: HeadInput) -> torch.Tensor:
        """``α_i`` [N] in Å³."""
        return torch.nn.functional.softplus(self.readout(inp.features.scalars)[:, 0])

    def fields(self, inp: HeadInput, charges: torch.Tensor, dipoles: torch.Tensor | None) -> torch.Tensor:
        """Field ``E_i`` [N, 3] (V/Å) of the density (charges, dipoles) and the applied field at each atom."""
        solver = inp.electrostatics
        graph = inp.graph
        probe = charges.new_zeros((graph.num_atoms, 3)).requires_grad_(True)
        total = probe if dipoles is None else dipoles + probe
        # the charge–charge term does not depend on the dipoles: left out of the energy differentiated,
        # except in an open-boundary batch, whose energy is one pair sum for every term
        open_batch = not bool(graph.pbc.any())
        energy = solver.energies(
            charges, inp.positions, inp.cell, graph.pbc, graph.ptr, total, charge_term=open_batch
        ).sum()
        if solver.config.include_self:
            # the Gaussian dipole's own Hartree energy is no field of the others
            energy = energy - gd.dipole_self_energy(total, solver.config.sigma)
        (grad,) = torch.autograd.grad(energy, probe, create_graph=True)
        return -grad + inp.external_field[graph.batch]

    def forward(
        self, inp: HeadInput, charges: torch.Tensor, dipoles: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Energy [B] (eV), induced dipoles [N, 3] (e·Å) and polarisabilities [N] (Å³)."""
        alpha = self.polarizabilities(inp)
        field = self.fields(inp, charges, dipoles)
        susceptibility = (alpha / COULOMB_CONSTANT)[:, None]
        induced = susceptibility * field
        energy = -0.5 * scatter_sum((induced * field).sum(-1), inp.graph.batch, inp.graph.num_graphs)
        return energy, induced, alpha
