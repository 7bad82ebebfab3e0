"""``fixed``: formal charges per element plus their Coulomb energy."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from aiida_emlip.models.heads.base import (
    ChargeConstraintError,
    Head,
    HeadInput,
    HeadOptions,
    HeadOutput,
    coulomb_energy,
    element_table,
    field_work,
    scatter_sum,
    structure_dipoles,
)


@dataclass
class FixedOptions(HeadOptions):
    formal_charges: dict[str, float] = field(default_factory=dict)  # e per element; missing = 0


class FixedChargeHead(Head):
    """E = E_SR + E_H[q⁰] - E·d with q⁰ the formal charge of each element.

    Polarisation is left to the backbone. A structure whose formal charges do not sum to its
    total charge is refused (:class:`ChargeConstraintError`).
    """

    name = "fixed"
    Options = FixedOptions
    charge_control = "formal"
    learns_multipoles = False

    @classmethod
    def capabilities(cls, options: FixedOptions) -> frozenset[str]:
        return frozenset({"charges"})

    def __init__(self, options: FixedOptions, elements, num_scalars, num_vectors) -> None:
        super().__init__(options, elements, num_scalars, num_vectors)
        self.register_buffer("formal", element_table(options.formal_charges, elements, "formal charges"))

    def forward(self, inp: HeadInput) -> HeadOutput:
        charges = self.formal.to(inp.positions.dtype)[inp.species]
        total = scatter_sum(charges, inp.graph.batch, inp.graph.num_graphs)
        # formal charges such as -0.8476 do not add up exactly in float32: allow the rounding of N terms
        tolerance = 1e-6 + 4 * torch.finfo(charges.dtype).eps * torch.diff(inp.graph.ptr).to(charges.dtype)
        bad = (total - inp.total_charge).abs() > tolerance
        if bad.any():
            b = int(torch.nonzero(bad)[0])
            raise ChargeConstraintError(
                f"structure {b}: formal charges sum to {float(total[b]):+g} e but its total charge is "
                f"{float(inp.total_charge[b]):+g} e; the 'fixed' head cannot represent it"
            )
        dipole = structure_dipoles(inp, charges)
        energy = coulomb_energy(inp, charges) + field_work(inp, dipole)
        return HeadOutput(energy=energy, charges=charges, dipole=dipole)
