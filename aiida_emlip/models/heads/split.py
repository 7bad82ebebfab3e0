"""``split``: local split charges — antisymmetric charge transfers along edges, plus local dipoles."""

from __future__ import annotations

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
from aiida_emlip.models.heads.edges import bessel_radial, cosine_envelope
from aiida_emlip.schema import MEAN_CHARGES

#: How transfers vanish at the cutoff (:attr:`SplitOptions.envelope`).
ENVELOPES = ("cosine", "step")


@dataclass
class SplitOptions(HeadOptions):
    #: Å; transfers vanish smoothly at this bond length. None: the backbone's r_max (resolved by the
    #: model's config), the length of the longest edge the graph has, so that no transfer jumps to zero.
    cutoff: float | None = None
    #: How each transfer goes to zero at the cutoff: ``cosine`` multiplies it by ½(cos(πr/r_c) + 1), so
    #: charges, energy and forces are continuous as a bond crosses the cutoff; ``step`` (model files
    #: written before the envelope existed) keeps it whole up to the cutoff.
    envelope: str = "cosine"
    #: Base charges q⁰ per element (e; missing ones 0), or ``"mean"`` in a training config: each
    #: element's mean DFT charge over the training structures, measured by the trainer and written
    #: into the model as numbers. Transfers then describe each atom's departure from its element's
    #: usual charge, small and local; from formal oxidation states (H +1, O −2) they must carry the
    #: whole ionicity of every covalent bond and fall from it to nearly nothing between a bond and a
    #: hydrogen bond, which the few contact structures of a training set do not pin down.
    formal_charges: dict[str, float] | str = field(default_factory=dict)
    dipoles: bool = True
    hidden: int = 16
    num_radial: int = 8
    fragments: str = "integer"  # integer | shared: how Σq⁰ = Q is met across separate fragments

    def __post_init__(self) -> None:
        if self.cutoff is not None and not self.cutoff > 0:
            raise ValueError(f"cutoff must be positive (Å), got {self.cutoff!r}")
        if self.envelope not in ENVELOPES:
            raise ValueError(f"envelope must be one of {ENVELOPES}, got {self.envelope!r}")
        if self.fragments not in FRAGMENTS:
            raise ValueError(f"fragments must be one of {FRAGMENTS}, got {self.fragments!r}")
        if isinstance(self.formal_charges, str) and self.formal_charges != MEAN_CHARGES:
            raise ValueError(
                f"formal_charges must map elements to charges (e) or be {MEAN_CHARGES!r}, "
                f"got {self.formal_charges!r}"
            )


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
        if options.cutoff is None:
            raise ValueError(
                "split: the transfer cutoff is not resolved (build the head through its ModelConfig)"
            )
        if options.formal_charges == MEAN_CHARGES:
            raise ValueError(
                f"split: formal_charges {MEAN_CHARGES!r} is measured on the training data by emlip-train; "
                "a model built outside training needs the charges per element"
            )
        self.register_buffer("formal", element_table(options.formal_charges, elements, "formal charges"))
        self.transfer = mlp(2 * num_scalars + options.num_radial, 1, options.hidden)
        if options.dipoles:
            if num_vectors == 0:
                raise ValueError("dipoles need l = 1 backbone features (backbone max_L = 1)")
            self.dipole_weights = torch.nn.Linear(num_vectors, 1, bias=False)

    def _envelope(self, lengths: torch.Tensor) -> torch.Tensor:
        return cosine_envelope(lengths, self.options.cutoff)

    def _radial(self, lengths: torch.Tensor) -> torch.Tensor:
        return bessel_radial(lengths, self.options.cutoff, self.options.num_radial)

    def transfers(self, inp: HeadInput) -> tuple[torch.Tensor, torch.Tensor]:
        """Charge moved along each edge (sender → receiver) and the edge vectors."""
        sender, receiver = inp.graph.edge_index
        vectors = inp.graph.edge_vectors(inp.positions, inp.cell)
        lengths = torch.linalg.vector_norm(vectors, dim=-1)
        radial = self._radial(lengths)
        h = inp.features.scalars
        forward = self.transfer(torch.cat([h[sender], h[receiver], radial], dim=-1))[:, 0]
        reverse = inp.graph.reverse_edges()
        if reverse is not None:
            # the reverse edge's readout is this edge's backward one (same features, same length)
            backward = forward[reverse]
        else:
            backward = self.transfer(torch.cat([h[receiver], h[sender], radial], dim=-1))[:, 0]
        if self.options.envelope == "cosine":
            weight = self._envelope(lengths)
        else:  # whole up to the cutoff
            weight = (radial.abs().sum(-1) > 0).to(h.dtype)
        return (forward - backward) * weight, vectors

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
