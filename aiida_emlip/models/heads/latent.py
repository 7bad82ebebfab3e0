"""``latent``: latent charges learned from energies and forces only (Latent Ewald Summation style)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from aiida_emlip.models.electrostatics import Electrostatics
from aiida_emlip.models.heads.base import (
    Head,
    HeadInput,
    HeadOptions,
    HeadOutput,
    coulomb_energy,
    field_work,
    mlp,
    structure_dipoles,
)


@dataclass
class LatentOptions(HeadOptions):
    pair_width: float = 1.0  # σ of the LES pair kernel exp(-σ²k²/2), Å; each Gaussian is σ/√2 wide
    hidden: int = 16


class LatentChargesHead(Head):
    """E = E_SR + E_H[q_latent] with q_latent = f(h_i); no charge constraint, Σq is reported.

    The charges are latent variables fitted to energies and forces: they carry no reference data
    and relate to physical charges only up to a scale (≈ √ε∞ in the LES papers).
    """

    name = "latent"
    Options = LatentOptions
    charge_control = "none"
    learns_multipoles = False

    @classmethod
    def capabilities(cls, options: LatentOptions) -> frozenset[str]:
        return frozenset({"charges"})

    def __init__(self, options: LatentOptions, elements, num_scalars, num_vectors) -> None:
        super().__init__(options, elements, num_scalars, num_vectors)
        self.readout = mlp(num_scalars, 1, options.hidden)
        self._solver: Electrostatics | None = None

    def _electrostatics(self, inp: HeadInput) -> Electrostatics:
        if self._solver is None:
            config = replace(inp.electrostatics.config, sigma=self.options.pair_width / math.sqrt(2.0))
            self._solver = Electrostatics(config)
        return self._solver

    def forward(self, inp: HeadInput) -> HeadOutput:
        charges = self.readout(inp.features.scalars)[:, 0]
        dipole = structure_dipoles(inp, charges)
        energy = coulomb_energy(inp, charges, electrostatics=self._electrostatics(inp))
        return HeadOutput(energy=energy + field_work(inp, dipole), charges=charges, dipole=dipole)
