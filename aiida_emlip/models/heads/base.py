"""The interface every electrostatic head implements, and helpers they share (no AiiDA)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from aiida_emlip.models.backbone import BackboneOutput
from aiida_emlip.models.coulomb_operator import OpenBatchOperator
from aiida_emlip.models.electrostatics import Electrostatics
from aiida_emlip.models.ewald_projected import shared_blocks
from aiida_emlip.models.graph import Graph

HEADS: dict[str, type[Head]] = {}

#: What a head can predict besides energy, forces and stress. ``charges``: atomic charges (and with
#: them a total dipole and Born charges ∂d/∂r); ``atomic_dipoles``: l = 1 multipoles;
#: ``fermi_level``: μ = −∂E/∂Q; ``polarizability``: the density responds to an applied field
#: (electronic polarisability ∂d/∂E at clamped ions, ε∞).
CAPABILITIES = ("charges", "atomic_dipoles", "fermi_level", "polarizability")


class ChargeConstraintError(ValueError):
    """A structure's requested total charge cannot be met by a head."""


@dataclass
class HeadInput:
    """What a head sees: the batch, differentiable geometry, backbone features and the solver."""

    graph: Graph
    positions: torch.Tensor  # [N, 3], strained, carries autograd to forces
    cell: torch.Tensor  # [B, 3, 3], strained, carries autograd to stress
    features: BackboneOutput
    species: torch.Tensor  # [N] index into the model's element list
    electrostatics: Electrostatics
    #: How self-consistent heads find the density: ``converge`` (inference, start from the local
    #: guess), ``direct`` (one update at the reference multipoles and Fermi level), ``unrolled``
    #: (K differentiable steps) or ``implicit`` (converge, then a linearised differentiable solve).
    scf_mode: str = "converge"
    reference_charges: torch.Tensor | None = None  # [N] e, for ``direct`` training
    reference_dipoles: torch.Tensor | None = None  # [N, 3] e·Å, for ``direct`` training
    #: [N] e: the converged charges of a nearby geometry (the previous MD or optimiser step), where
    #: ``converge``/``implicit`` iterations of self-consistent heads start instead of the local guess
    initial_charges: torch.Tensor | None = None

    def warm_charges(self, atoms: slice) -> torch.Tensor | None:
        """``initial_charges`` of the atoms ``atoms`` (one structure), detached, when they are given for
        every atom of the batch and finite there; else ``None`` (the solver starts cold)."""
        warm = self.initial_charges
        if warm is None or warm.shape != (self.graph.num_atoms,):
            return None
        warm = warm[atoms].detach()
        return warm if bool(torch.isfinite(warm).all()) else None

    @property
    def total_charge(self) -> torch.Tensor:
        return self.graph.total_charge

    @property
    def external_field(self) -> torch.Tensor:
        return self.graph.external_field


@dataclass
class HeadOutput:
    """What a head returns. ``energy`` is added to the backbone's short-range energy."""

    energy: torch.Tensor  # [B] eV
    charges: torch.Tensor | None = None  # [N] e
    dipoles: torch.Tensor | None = None  # [N, 3] e·Å
    dipole: torch.Tensor | None = None  # [B, 3] e·Å; when None the model uses Σ q r + Σ p
    fermi_level: torch.Tensor | None = None  # [B] eV (μ, Lagrange multiplier of Σq = Q)
    converged: torch.Tensor | None = None  # [B] bool for iterative heads
    iterations: torch.Tensor | None = None  # [B] steps taken
    residuals: list[torch.Tensor] = field(default_factory=list)  # convergence history, [B] per step
    #: Heads that give fragments integer charges: the fragment of each atom [N] and the charge each
    #: fragment would carry under one structure-wide correction [F] (what decides its integer; training
    #: supervises it with the reference charges so that the assignment is learned).
    fragment_index: torch.Tensor | None = None
    fragment_charges: torch.Tensor | None = None


@dataclass
class HeadOptions:
    """Base class of each head's options; unknown keys are an error."""

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> HeadOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for this head; known: {sorted(known)}")
        return cls(**options)


class Head(torch.nn.Module):
    """One point of the design space: how the multipoles of the shared density are obtained.

    Subclasses set ``name``, ``Options`` and ``charge_control`` (``none``, ``exact``, ``loss``,
    ``formal``) and implement :meth:`forward`.
    """

    name: ClassVar[str]
    Options: ClassVar[type[HeadOptions]] = HeadOptions
    charge_control: ClassVar[str] = "none"
    #: Whether the head's charges (and dipoles) are meant to match DFT multipoles, so that training
    #: supervises them when the data carry them (``multipoles: auto``); False for latent variables and
    #: for fixed formal charges.
    learns_multipoles: ClassVar[bool] = True

    def __init__(self, options: HeadOptions, elements: list[str], num_scalars: int, num_vectors: int) -> None:
        super().__init__()
        self.options = options
        self.elements = list(elements)
        self.num_scalars = num_scalars
        self.num_vectors = num_vectors

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            HEADS[cls.name] = cls

    @classmethod
    def needs_vectors(cls, options: HeadOptions) -> bool:
        """Whether the head reads l = 1 features of the backbone's last layer (dipole readouts)."""
        return False

    @classmethod
    def capabilities(cls, options: HeadOptions) -> frozenset[str]:
        """What the head predicts besides energy, forces and stress (see :data:`CAPABILITIES`)."""
        return frozenset()

    def forward(self, inp: HeadInput) -> HeadOutput:  # pragma: no cover - interface
        raise NotImplementedError


def head_class(config: dict[str, Any]) -> tuple[type[Head], HeadOptions]:
    """The head class named by ``config['name']`` and its options parsed from the other keys."""
    config = dict(config)
    name = config.pop("name", None)
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; available heads: {', '.join(sorted(HEADS))}")
    cls = HEADS[name]
    return cls, cls.Options.from_dict(config)


def head_capabilities(config: dict[str, Any]) -> frozenset[str]:
    """Capabilities (:data:`CAPABILITIES`) of the head described by ``config`` (name and options)."""
    cls, options = head_class(config)
    return cls.capabilities(options)


def build_head(config: dict[str, Any], elements: list[str], num_scalars: int, num_vectors: int) -> Head:
    """Instantiate the head named ``config['name']`` with the remaining keys as options."""
    cls, options = head_class(config)
    return cls(options, elements, num_scalars, num_vectors)


# ----------------------------------------------------------------------------- shared helpers


def mlp(n_in: int, n_out: int, hidden: int) -> torch.nn.Module:
    """A one-hidden-layer SiLU perceptron (a plain linear map when ``hidden`` is 0)."""
    if hidden <= 0:
        return torch.nn.Linear(n_in, n_out)
    return torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, n_out))


def element_table(values: dict[str, float], elements: list[str], what: str) -> torch.Tensor:
    """A per-element tensor from ``{symbol: value}`` (missing ones 0); unknown symbols are an error."""
    if not isinstance(values, dict):
        raise ValueError(f"{what} must map elements to numbers, got {values!r}")
    unknown = sorted(set(values) - set(elements))
    if unknown:
        raise ValueError(f"{what} given for elements {unknown} not in the model {elements}")
    return torch.tensor([float(values.get(e, 0.0)) for e in elements])


def scatter_sum(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Sum ``values`` [N, ...] into ``size`` bins given by ``index`` [N]."""
    out = values.new_zeros((size, *values.shape[1:]))
    return out.index_add(0, index, values)


def correct_total_charge(
    charges: torch.Tensor, inp: HeadInput, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Shift ``charges`` so that each structure sums to its total charge exactly.

    The excess is spread uniformly, or in proportion to positive ``weights`` [N].
    """
    graph = inp.graph
    excess = inp.total_charge - scatter_sum(charges, graph.batch, graph.num_graphs)
    if weights is None:
        counts = torch.diff(graph.ptr).to(charges.dtype)
        return charges + (excess / counts)[graph.batch]
    norm = scatter_sum(weights, graph.batch, graph.num_graphs)
    return charges + excess[graph.batch] * weights / norm[graph.batch]


def coulomb_energy(
    inp: HeadInput,
    charges: torch.Tensor,
    dipoles: torch.Tensor | None = None,
    electrostatics: Electrostatics | None = None,
) -> torch.Tensor:
    """Hartree energy of the Gaussian multipoles of each structure, [B] eV."""
    solver = electrostatics or inp.electrostatics
    graph = inp.graph
    return solver.energies(charges, inp.positions, inp.cell, graph.pbc, graph.ptr, dipoles)


def batch_coulomb_matrix(inp: HeadInput, differentiable: bool = False) -> torch.Tensor:
    """The batch's block-diagonal Coulomb matrix ``A`` [N, N] of charges of width σ: an open-boundary
    batch's from one :class:`~aiida_emlip.models.coulomb_operator.OpenBatchOperator`, else each
    structure's :meth:`~aiida_emlip.models.electrostatics.Electrostatics.coulomb_matrix` as its block
    (small Ewald cells that can share a sum formed together,
    :func:`~aiida_emlip.models.ewald_projected.shared_blocks`); with autograd through the geometry where
    ``differentiable``."""
    graph, es = inp.graph, inp.electrostatics
    pos = inp.positions if differentiable else inp.positions.detach()
    if not bool(graph.pbc.any()):
        return OpenBatchOperator(es, pos, graph.ptr, [es.config.sigma]).matrices(graph.num_atoms)[0]
    cells = inp.cell if differentiable else inp.cell.detach()
    # small Ewald cells that can share a sum: together
    shared = shared_blocks(es, pos, cells, graph.pbc, graph.ptr, [es.config.sigma])
    blocks = {b: 0.5 * (m[0] + m[0].transpose(0, 1)) for b, m in shared.items()}
    for b, atoms in graph.structures():
        if b not in blocks:
            blocks[b] = es.coulomb_matrix(pos[atoms], cells[b], graph.pbc[b])
    return torch.block_diag(*[blocks[b] for b in range(graph.num_graphs)])


def structure_dipoles(
    inp: HeadInput, charges: torch.Tensor | None, dipoles: torch.Tensor | None = None
) -> torch.Tensor:
    """Total dipole Σ q_i r_i + Σ p_i of each structure, [B, 3] e·Å."""
    graph = inp.graph
    q = charges if charges is not None else inp.positions.new_zeros(graph.num_atoms)
    dipole = scatter_sum(q[:, None] * inp.positions, graph.batch, graph.num_graphs)
    return dipole if dipoles is None else dipole + scatter_sum(dipoles, graph.batch, graph.num_graphs)


def field_work(inp: HeadInput, dipole: torch.Tensor) -> torch.Tensor:
    """Energy of the total dipoles [B, 3] in the applied fields: ``-E·d`` (force on a charge is qE)."""
    return -(inp.external_field * dipole).sum(-1)


def solved_output(
    inp: HeadInput,
    energy: torch.Tensor,
    charges: torch.Tensor,
    dipole: torch.Tensor,
    record: tuple[list[torch.Tensor], list[bool], list[int], list[list[float]]],
    **fragments: torch.Tensor | None,
) -> HeadOutput:
    """The head's output from each structure's solve ``record``: its μ, whether it converged, its
    iterations and the history of its residuals (padded with the last one to the longest)."""
    mus, converged, iterations, history = record
    device = inp.positions.device
    residuals = [
        torch.tensor([h[min(k, len(h) - 1)] for h in history], dtype=inp.positions.dtype, device=device)
        for k in range(max(len(h) for h in history))
    ]
    return HeadOutput(
        energy=energy,
        charges=charges,
        dipole=dipole,
        fermi_level=torch.stack(mus).reshape(-1),
        converged=torch.tensor(converged, device=device),
        iterations=torch.tensor(iterations, device=device),
        residuals=residuals,
        **fragments,
    )
