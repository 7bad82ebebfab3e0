"""The electrostatic MLIP: backbone + head + electrostatics, with forces and stress by autograd."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from aiida_emlip.models.backbone import BackboneConfig, MaceBackbone
from aiida_emlip.models.electrostatics import Electrostatics, ElectrostaticsConfig
from aiida_emlip.models.graph import Graph
from aiida_emlip.models.heads import HeadInput, build_head
from aiida_emlip.models.heads.base import head_capabilities, head_class, scatter_sum, structure_dipoles
from aiida_emlip.models.induction import Induction, InductionConfig

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _strict(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; known: {sorted(known)}")
    return values


def reads_vectors(head: dict[str, Any]) -> bool:
    """Whether a model with ``head`` (name and options) reads l = 1 backbone features.

    Only heads with atomic-dipole readouts do (:meth:`~aiida_emlip.models.heads.base.Head.needs_vectors`);
    the induced-dipole term and the rest of the model read the invariant features alone.
    """
    cls, options = head_class(head)
    return cls.needs_vectors(options)


def earlier_layer_vectors(backbone: dict[str, Any]) -> bool:
    """Whether the backbone's layers before the last have l = 1 features: ``max_L`` 1 and two or more
    interactions (MACE gives a single layer scalar outputs only, whatever ``last_layer_vectors``)."""
    max_l = backbone.get("max_L", BackboneConfig.max_L)
    return max_l == 1 and backbone.get("num_interactions", BackboneConfig.num_interactions) >= 2


def resolve_transfer_cutoff(head: dict[str, Any], backbone: dict[str, Any]) -> dict[str, Any]:
    """``head`` with the ``split`` head's transfer cutoff and envelope explicit: the backbone's r_max and
    the cosine envelope when left out.

    Transfers ride on the graph's edges, which end at r_max; a cutoff beyond it would leave a transfer
    that jumps to zero as a bond crosses r_max. Model files written before the envelope existed keep
    theirs (:func:`~aiida_emlip.models.file_layout.explicit_head`); training refuses a cutoff beyond
    r_max (:class:`~aiida_emlip.training.config.TrainConfig`).
    """
    r_max = float(backbone.get("r_max", BackboneConfig.r_max))
    if head.get("name") == "split":
        if head.get("cutoff") is None:
            head["cutoff"] = r_max
        head.setdefault("envelope", "cosine")
    elif head.get("fragments") == "bonds" and head.get("bond_cutoff") is None:
        head["bond_cutoff"] = r_max  # the equilibrating heads' conductances, likewise on the edges
    return head


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; serialised as JSON next to the weights.

    ``backbone.last_layer_vectors`` is false when left out, for every head: the last layer is MACE's
    default (scalar), as in ``sr``, and atomic-dipole readouts read the l = 1 features of the layers
    before it. It is then always explicit in ``to_dict`` and in model files.
    """

    elements: list[str]
    head: dict[str, Any] = field(default_factory=lambda: {"name": "sr"})
    backbone: dict[str, Any] = field(default_factory=dict)
    electrostatics: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float64"
    #: induced atomic dipoles in the field of the head's density (:mod:`~aiida_emlip.models.induction`)
    induction: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        _strict(BackboneConfig, {**self.backbone, "elements": self.elements}, "backbone")
        self.backbone = self._resolve_last_layer_vectors(dict(self.backbone))
        self.head = resolve_transfer_cutoff(dict(self.head), self.backbone)
        _strict(ElectrostaticsConfig, self.electrostatics, "electrostatics")
        InductionConfig(**_strict(InductionConfig, self.induction, "induction"))

    def _resolve_last_layer_vectors(self, backbone: dict[str, Any]) -> dict[str, Any]:
        value = backbone.setdefault("last_layer_vectors", False)
        if not isinstance(value, bool):
            raise ValueError(f"backbone.last_layer_vectors must be true or false, got {value!r}")
        if reads_vectors(self.head) and not earlier_layer_vectors(backbone):
            raise ValueError(
                f"head {self.head.get('name')!r} reads atomic dipoles from l = 1 features, which this "
                f"backbone has in no layer: it needs max_L 1 and two or more interactions"
            )
        return backbone

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        return cls(**_strict(cls, dict(values), "model config"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EmlipModel(torch.nn.Module):
    """E = Σ_i E0[Z_i] + E_SR(backbone) + E_head; F = -∂E/∂r; σ = (1/V) ∂E/∂ε (ASE sign)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = MaceBackbone(BackboneConfig(elements=config.elements, **config.backbone))
        self.electrostatics = Electrostatics(ElectrostaticsConfig(**config.electrostatics))
        self.head = build_head(
            config.head, config.elements, self.backbone.num_scalars, self.backbone.num_vectors
        )
        induction = InductionConfig(**config.induction)
        self.induction = Induction(induction, self.backbone.num_scalars) if induction.enabled else None
        self.register_buffer("reference_energies", torch.zeros(len(config.elements)))
        self.to(DTYPES[config.dtype])

    @property
    def dtype(self) -> torch.dtype:
        return self.reference_energies.dtype

    @property
    def device(self) -> torch.device:
        return self.reference_energies.device

    @property
    def cutoff(self) -> float:
        return self.backbone.config.r_max

    def forward(
        self,
        graph: Graph,
        compute_forces: bool = True,
        compute_stress: bool = True,
        compute_potential: bool = False,
        create_graph: bool | None = None,
        scf_mode: str = "converge",
        reference_charges: torch.Tensor | None = None,
        reference_dipoles: torch.Tensor | None = None,
        initial_charges: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Evaluate a batch.

        ``create_graph`` (default: ``self.training``) keeps forces and stress differentiable for
        training. ``scf_mode``, the reference multipoles and ``initial_charges`` (a warm start: the
        converged charges of a nearby geometry) only matter for self-consistent heads (see
        :class:`~aiida_emlip.models.heads.base.HeadInput`).
        """
        create_graph = self.training if create_graph is None else create_graph
        graph = graph.to(self.device, self.dtype)
        with torch.enable_grad():
            # positions that already carry a graph (response properties: Born charges ∂d/∂r) stay connected
            positions = (
                graph.positions
                if graph.positions.requires_grad
                else graph.positions.detach().requires_grad_(compute_forces)
            )
            strain = torch.zeros_like(graph.cell).requires_grad_(compute_stress)
            if compute_stress:
                sym = 0.5 * (strain + strain.transpose(1, 2))
                eye = torch.eye(3, dtype=self.dtype, device=self.device)
                strained_pos = positions + torch.einsum("ni,nij->nj", positions, sym[graph.batch])
                cell = torch.einsum("bij,bjk->bik", graph.cell, eye + sym)
            else:  # a zero strain that nothing differentiates: the same numbers without its work
                strained_pos, cell = positions, graph.cell
            species = self.backbone.species(graph.numbers)
            feats = self.backbone(graph, strained_pos, cell, species)
            inp = HeadInput(
                graph,
                strained_pos,
                cell,
                feats,
                species,
                self.electrostatics,
                scf_mode=scf_mode,
                reference_charges=reference_charges,
                reference_dipoles=reference_dipoles,
                initial_charges=None
                if initial_charges is None
                else initial_charges.to(self.device, self.dtype),
            )
            head = self.head(inp)
            long_range, dipoles, dipole, polarizabilities = head.energy, head.dipoles, head.dipole, None
            if self.induction is not None:
                charges = head.charges if head.charges is not None else positions.new_zeros(graph.num_atoms)
                induced_energy, induced, polarizabilities = self.induction(inp, charges, head.dipoles)
                long_range = long_range + induced_energy
                if dipole is None:
                    dipole = structure_dipoles(inp, head.charges, head.dipoles)
                dipole = dipole + scatter_sum(induced, graph.batch, graph.num_graphs)
                dipoles = induced if dipoles is None else dipoles + induced
            node_energy = feats.node_energy + self.reference_energies[species]
            energy = scatter_sum(node_energy, graph.batch, graph.num_graphs) + long_range
            wrt = [t for t, need in ((positions, compute_forces), (strain, compute_stress)) if need]
            grads = (
                torch.autograd.grad(energy.sum(), wrt, create_graph=create_graph, allow_unused=True)
                if wrt
                else []
            )
        out: dict[str, Any] = {
            "energy": energy,
            "node_energy": node_energy,
            "charges": head.charges,
            "dipoles": dipoles,
            "polarizabilities": polarizabilities,
            "fermi_level": head.fermi_level,
            "converged": head.converged,
            "iterations": head.iterations,
            "residuals": head.residuals,
        }
        if head.fragment_charges is not None:
            out["fragment_index"], out["fragment_charges"] = head.fragment_index, head.fragment_charges
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]
        if compute_forces:
            out["forces"] = -grads[0]
        if compute_stress:
            volume = torch.linalg.det(graph.cell).abs()
            stress = grads[-1] / volume[:, None, None]
            periodic = graph.pbc.all(dim=1)
            out["stress"] = torch.where(
                periodic[:, None, None], stress, torch.full_like(stress, float("nan"))
            )
        out["dipole"] = dipole if dipole is not None else structure_dipoles(inp, head.charges, head.dipoles)
        if compute_potential and head.charges is not None:
            out["potential"] = self._potential(inp, head.charges.detach(), dipoles)
        return out

    def _potential(self, inp: HeadInput, charges: torch.Tensor, dipoles: torch.Tensor | None) -> torch.Tensor:
        parts = []
        for b, atoms in inp.graph.structures():
            parts.append(
                self.electrostatics.potential(
                    charges[atoms],
                    inp.positions[atoms].detach(),
                    inp.cell[b].detach(),
                    inp.graph.pbc[b],
                    None if dipoles is None else dipoles[atoms].detach(),
                )
            )
        return torch.cat(parts).detach()


def model_capabilities(config: dict[str, Any]) -> frozenset[str]:
    """What a model of ``config`` (a model section: ``head`` and ``induction``) predicts besides E, F, σ.

    The head's capabilities (:data:`~aiida_emlip.models.heads.base.CAPABILITIES`), plus atomic dipoles
    and a polarisability when induced dipoles are enabled.
    """
    found = head_capabilities(dict(config.get("head") or {"name": "sr"}))
    if InductionConfig(**dict(config.get("induction") or {})).enabled:
        found = found | {"atomic_dipoles", "polarizability"}
    return found


def predicts_dipole(out: dict[str, Any]) -> bool:
    """Whether ``out["dipole"]`` is a prediction of the model's head.

    A head without charges and atomic dipoles (``sr``) leaves a zero placeholder there: it must not be
    compared with reference dipoles or reported as the model's dipole.
    """
    return out.get("charges") is not None or out.get("dipoles") is not None
