"""``charges``: charges (and dipoles) read out from local features (PhysNet/SpookyNet/CACE-LR style)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aiida_emlip.models.fragments import FRAGMENTS, fragment_corrected
from aiida_emlip.models.heads.base import (
    Head,
    HeadInput,
    HeadOptions,
    HeadOutput,
    correct_total_charge,
    coulomb_energy,
    field_work,
    mlp,
    structure_dipoles,
)

CORRECTIONS = ("uniform", "weighted", "none")


@dataclass
class ChargesOptions(HeadOptions):
    correction: str = "uniform"  # uniform | weighted | none (Σq = Q only through the loss)
    fragments: str = "integer"  # integer | shared (see FRAGMENTS)
    dipoles: bool = False  # also read out atomic dipoles from the l = 1 features
    hidden: int = 16

    def __post_init__(self) -> None:
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {CORRECTIONS}, got {self.correction!r}")
        if self.fragments not in FRAGMENTS:
            raise ValueError(f"fragments must be one of {FRAGMENTS}, got {self.fragments!r}")


class LocalChargesHead(Head):
    """q_i = f(h_i) (+ p_i = Σ_c w_c v_ic); E = E_SR + E_H[q, p] - E·d.

    With ``correction='uniform'`` or ``'weighted'`` the total charge equals Q exactly; with
    ``'none'`` Σq is whatever the readout gives and is reported (the study's loss-only variant).
    With ``fragments='integer'`` (the default) the correction acts fragment by fragment and each
    fragment that no edge joins to another carries an integer charge: charge cannot move further than
    the backbone's receptive field.
    """

    name = "charges"
    Options = ChargesOptions

    def __init__(self, options: ChargesOptions, elements, num_scalars, num_vectors) -> None:
        super().__init__(options, elements, num_scalars, num_vectors)
        self.charge_control = "loss" if options.correction == "none" else "exact"
        n_out = 2 if options.correction == "weighted" else 1
        self.readout = mlp(num_scalars, n_out, options.hidden)
        if options.dipoles:
            if num_vectors == 0:
                raise ValueError("dipoles need l = 1 backbone features (backbone max_L = 1)")
            self.dipole_weights = torch.nn.Linear(num_vectors, 1, bias=False)

    @classmethod
    def needs_vectors(cls, options: ChargesOptions) -> bool:
        return options.dipoles

    @classmethod
    def capabilities(cls, options: ChargesOptions) -> frozenset[str]:
        return frozenset({"charges", "atomic_dipoles"} if options.dipoles else {"charges"})

    def forward(self, inp: HeadInput) -> HeadOutput:
        out = self.readout(inp.features.scalars)
        charges = out[:, 0]
        index = shared = None
        if self.options.correction != "none":
            weights = None
            if self.options.correction == "weighted":
                weights = torch.nn.functional.softplus(out[:, 1]) + 1e-3
            if self.options.fragments == "integer":
                charges, index, shared = fragment_corrected(charges, inp.graph, weights)
            else:
                charges = correct_total_charge(charges, inp, weights)
        dipoles = None
        if self.options.dipoles:
            dipoles = self.dipole_weights(inp.features.vectors.transpose(1, 2)).squeeze(-1)
        dipole = structure_dipoles(inp, charges, dipoles)
        energy = coulomb_energy(inp, charges, dipoles) + field_work(inp, dipole)
        return HeadOutput(
            energy=energy,
            charges=charges,
            dipoles=dipoles,
            dipole=dipole,
            fragment_index=index,
            fragment_charges=shared,
        )
