"""``split``: local split charges — antisymmetric charge transfers along edges, plus local dipoles."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from aiida_emlip.models.fragments import FRAGMENTS, correct_fragment_charges
from aiida_emlip.models.heads.base import (
    Head,
    HeadInput,
    HeadOptions,
    HeadOutput,
    correct_total_charge,
    coulomb_energy,
    element_table,
    field_work,
    mlp,
    scatter_sum,
)


@dataclass
class SplitOptions(HeadOptions):
    cutoff: float = 5.0  # Å; transfers vanish smoothly at this bond length
    formal_charges: dict[str, float] = field(default_factory=dict)  # base charges q⁰ per element
    dipoles: bool = True
    hidden: int = 16
    num_radial: int = 8
    fragments: str = "integer"  # integer | shared: how Σq⁰ = Q is met across separate fragments

    def __post_init__(self) -> None:
        if self.fragments not in FRAGMENTS:
            raise ValueError(f"fragments must be one of {FRAGMENTS}, got {self.fragments!r}")


class SplitChargesHead(Head):
    """q_i = q⁰_i + Σ_{e: s→i} t_e − Σ_{e: i→r} t_e with t_e antisymmetric in (s, r).

    q⁰ are formal charges shifted uniformly so that Σq⁰ = Q (fragment by fragment, each fragment that
    no edge joins to another at an integer charge, unless ``fragments='shared'``); each transfer moves
    charge from the sender to the receiver of an edge, so Σq = Q holds exactly for any weights. The
    polarisation P = Σ_i (p_i + q⁰_i r_i) + Σ_e t_e (r_r − r_s + S·cell) uses minimum-image bond
    vectors and is well defined in periodic cells (Born charges Z* = ∂P/∂r). Charge cannot move
    beyond the cutoff.
    """

    name = "split"
    Options = SplitOptions
    charge_control = "exact"

    def __init__(self, options: SplitOptions, elements, num_scalars, num_vectors) -> None:
        super().__init__(options, elements, num_scalars, num_vectors)
        self.register_buffer("formal", element_table(options.formal_charges, elements, "formal charges"))
        self.transfer = mlp(2 * num_scalars + options.num_radial, 1, options.hidden)
        if options.dipoles:
            if num_vectors == 0:
                raise ValueError("dipoles need l = 1 backbone features (backbone max_L = 1)")
            self.dipole_weights = torch.nn.Linear(num_vectors, 1, bias=False)

    def _radial(self, lengths: torch.Tensor) -> torch.Tensor:
        """Bessel basis times a cosine cutoff, [E, num_radial]; zero beyond the cutoff."""
        rc = self.options.cutoff
        n = torch.arange(1, self.options.num_radial + 1, dtype=lengths.dtype, device=lengths.device)
        x = lengths.clamp(min=1e-9)[:, None]
        bessel = torch.sin(n * math.pi * x / rc) / x
        envelope = torch.where(x < rc, 0.5 * (torch.cos(math.pi * x / rc) + 1.0), torch.zeros_like(x))
        return bessel * envelope

    def transfers(self, inp: HeadInput) -> tuple[torch.Tensor, torch.Tensor]:
        """Charge moved along each edge (sender → receiver) and the edge vectors."""
        sender, receiver = inp.graph.edge_index
        vectors = inp.features.edge_vectors
        radial = self._radial(torch.linalg.vector_norm(vectors, dim=-1))
        h = inp.features.scalars
        forward = self.transfer(torch.cat([h[sender], h[receiver], radial], dim=-1))[:, 0]
        reverse = inp.graph.reverse_edges()
        if reverse is not None:
            # the reverse edge's readout is this edge's backward one (same features, same length)
            backward = forward[reverse]
        else:
            backward = self.transfer(torch.cat([h[receiver], h[sender], radial], dim=-1))[:, 0]
        cutoff = (radial.abs().sum(-1) > 0).to(h.dtype)
        return (forward - backward) * cutoff, vectors

    @classmethod
    def needs_vectors(cls, options: SplitOptions) -> bool:
        return options.dipoles

    @classmethod
    def capabilities(cls, options: SplitOptions) -> frozenset[str]:
        return frozenset({"charges", "atomic_dipoles"} if options.dipoles else {"charges"})

    def forward(self, inp: HeadInput) -> HeadOutput:
        graph = inp.graph
        formal = self.formal.to(inp.positions.dtype)[inp.species]
        if self.options.fragments == "integer":
            base = correct_fragment_charges(formal, graph)
        else:
            base = correct_total_charge(formal, inp)
        t, vectors = self.transfers(inp)
        sender, receiver = graph.edge_index
        n = graph.num_atoms
        charges = base + scatter_sum(t, receiver, n) - scatter_sum(t, sender, n)
        dipoles = None
        local = base[:, None] * inp.positions
        if self.options.dipoles:
            dipoles = self.dipole_weights(inp.features.vectors.transpose(1, 2)).squeeze(-1)
            local = local + dipoles
        bonds = scatter_sum(t[:, None] * vectors, graph.batch[sender], graph.num_graphs)
        polarization = scatter_sum(local, graph.batch, graph.num_graphs) + bonds
        energy = coulomb_energy(inp, charges, dipoles) + field_work(inp, polarization)
        return HeadOutput(energy=energy, charges=charges, dipoles=dipoles, dipole=polarization)
