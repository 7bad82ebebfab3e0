"""The short-range backbone: MACE (mace-torch) behind a small interface (no AiiDA)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from ase.data import atomic_numbers as ASE_NUMBERS

from aiida_emlip.models.graph import Graph
from aiida_emlip.models.mace_import import (  # mace before e3nn, without side effects
    mace_modules,
    o3,
    quiet_third_party,
)


@dataclass
class BackboneConfig:
    """Hyperparameters of the MACE backbone."""

    elements: list[str] = field(default_factory=list)
    kind: str = "mace"
    r_max: float = 5.0
    num_channels: int = 16
    max_L: int = 1
    max_ell: int = 3
    correlation: int = 3
    num_interactions: int = 2
    num_bessel: int = 8
    num_polynomial_cutoff: int = 5
    mlp_hidden: int = 16
    avg_num_neighbors: float = 8.0
    #: Keep l = 1 features in the last layer too (MACE's ``keep_last_layer_irreps``), for readouts of
    #: atomic dipoles: the layout of model files of earlier versions. Without them (the default of every
    #: head) the backbone is exactly MACE's default and costs the same, and dipole readouts read the l = 1
    #: features of the layers before the last.
    last_layer_vectors: bool = False

    def __post_init__(self) -> None:
        unknown = [e for e in self.elements if e not in ASE_NUMBERS]
        if unknown or not self.elements:
            raise ValueError(f"backbone needs a non-empty list of chemical symbols, got {self.elements}")
        if self.kind != "mace":
            raise ValueError(f"unknown backbone kind {self.kind!r}; available: 'mace'")
        if self.max_L not in (0, 1):
            raise ValueError("max_L must be 0 or 1 (l ≤ 1 features)")
        if not isinstance(self.last_layer_vectors, bool):
            raise ValueError(f"last_layer_vectors must be true or false, got {self.last_layer_vectors!r}")


@dataclass
class BackboneOutput:
    """Per-atom outputs of a backbone evaluated on (possibly strained) positions."""

    node_energy: torch.Tensor  # [N] short-range energy per atom, eV
    scalars: torch.Tensor  # [N, S] invariant features of all layers
    vectors: torch.Tensor  # [N, V, 3] l = 1 features, Cartesian (x, y, z) (tested); V may be 0


def mace_arguments(config: BackboneConfig) -> dict:
    """Keyword arguments of mace-torch's ``MACE`` for ``config`` (also for building the same model with
    other kernels, e.g. ``cueq_config``)."""
    interaction = mace_modules().interaction_classes["RealAgnosticResidualInteractionBlock"]
    numbers = [ASE_NUMBERS[e] for e in config.elements]
    c = config.num_channels
    return {
        "r_max": config.r_max,
        "num_bessel": config.num_bessel,
        "num_polynomial_cutoff": config.num_polynomial_cutoff,
        "max_ell": config.max_ell,
        "interaction_cls": interaction,
        "interaction_cls_first": interaction,
        "num_interactions": config.num_interactions,
        "num_elements": len(numbers),
        "hidden_irreps": o3.Irreps(f"{c}x0e" if config.max_L == 0 else f"{c}x0e + {c}x1o"),
        "MLP_irreps": o3.Irreps(f"{config.mlp_hidden}x0e"),
        "atomic_energies": np.zeros(len(numbers)),
        "avg_num_neighbors": config.avg_num_neighbors,
        "atomic_numbers": numbers,
        "correlation": config.correlation,
        "gate": torch.nn.functional.silu,
        "keep_last_layer_irreps": config.last_layer_vectors,
        # e3nn's coupling basis whatever is installed: mace-torch's default (True) switches to a smaller
        # basis, with other weight shapes, wherever cuEquivariance is importable
        "use_reduced_cg": False,
    }


#: Kernels of MACE's equivariant products: e3nn's (the saved layout) or NVIDIA cuEquivariance's.
KERNELS = ("e3nn", "cueq")
CUEQ_MISSING = (
    "kernels 'cueq' need NVIDIA cuEquivariance: pip install 'aiida-emlip[cueq]' (cuequivariance-torch), "
    "and on a GPU also its CUDA kernels, cuequivariance-ops-torch-cu12 or -cu13 to match torch's CUDA"
)


def cueq_mace(backbone: MaceBackbone) -> torch.nn.Module:
    """The backbone's MACE rebuilt with cuEquivariance kernels (layout ``ir_mul``) and its weights moved
    over by mace-torch's converter; on the device and dtype of the backbone. ImportError (with
    :data:`CUEQ_MISSING`) without cuEquivariance."""
    try:
        import cuequivariance_torch  # noqa: F401
        from mace.cli.convert_e3nn_cueq import transfer_weights
        from mace.modules.wrapper_ops import CuEquivarianceConfig
    except ImportError:
        raise ImportError(CUEQ_MISSING) from None
    config = backbone.config
    parameter = next(backbone.mace.parameters())
    cueq = CuEquivarianceConfig(
        enabled=True,
        layout="ir_mul",
        group="O3_e3nn",
        optimize_all=True,
        conv_fusion=parameter.device.type == "cuda",
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(parameter.dtype)  # mace builds its constants in the default dtype
    try:
        with quiet_third_party():
            target = mace_modules().MACE(**mace_arguments(config), cueq_config=cueq)
    finally:
        torch.set_default_dtype(default)
    target = target.to(device=parameter.device, dtype=parameter.dtype)
    product_irreps = 0 if config.max_L == 0 else 1  # mace's len(hidden_irreps.slices()) - 1
    transfer_weights(
        backbone.mace, target, product_irreps, config.correlation, config.num_interactions,
        False, config.last_layer_vectors,
    )  # fmt: skip
    return target.train(backbone.training)


class MaceBackbone(torch.nn.Module):
    """A MACE model used as a feature extractor and short-range energy."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        modules = mace_modules()
        self.config = config
        numbers = [ASE_NUMBERS[e] for e in config.elements]
        c = config.num_channels
        with quiet_third_party():
            self.mace = modules.MACE(**mace_arguments(config))
        lookup = torch.full((119,), -1, dtype=torch.long)
        lookup[torch.tensor(numbers)] = torch.arange(len(numbers))
        self.register_buffer("species_of_number", lookup, persistent=False)
        self.num_scalars = c * config.num_interactions
        self.num_vectors = c * sum(width > c for width in self._layer_widths())
        self.kernels = "e3nn"

    def use_kernels(self, kernels: str) -> None:
        """Run MACE's equivariant products with ``kernels`` (:data:`KERNELS`), same weights and results.

        ``'cueq'`` (NVIDIA cuEquivariance, for inference on a GPU: the realistic backbone's energy and
        forces 1.7× faster on an H200 at 4k atoms, forces equal to 2e-4 meV/Å, measured with
        mace-torch's reduced coupling basis) cannot be undone and a model running it cannot be saved:
        reload the file for e3nn's layout.
        """
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
        if kernels == self.kernels:
            return
        if kernels == "e3nn":
            raise ValueError("a backbone on cuEquivariance kernels goes back to e3nn by reloading the model")
        self.mace = cueq_mace(self)
        self.kernels = kernels

    def species(self, numbers: torch.Tensor) -> torch.Tensor:
        """Indices of ``numbers`` into the model's element list; error for unknown elements."""
        species = self.species_of_number[numbers]
        if (species < 0).any():
            missing = sorted({int(z) for z in numbers[species < 0]})
            raise ValueError(
                f"structure contains atomic numbers {missing} unknown to this model; "
                f"it knows {self.config.elements}"
            )
        return species

    def forward(
        self,
        graph: Graph,
        positions: torch.Tensor,
        cell: torch.Tensor,
        species: torch.Tensor | None = None,
    ) -> BackboneOutput:
        """Evaluate MACE on ``positions`` and ``cell``; ``species``: :meth:`species` of the graph's
        numbers where the caller has them already."""
        if species is None:
            species = self.species(graph.numbers)
        node_attrs = torch.nn.functional.one_hot(species, len(self.config.elements)).to(positions.dtype)
        # MACE forms the edge vectors itself from the positions and these Cartesian lattice shifts
        shifts = graph.edge_shifts(cell)
        data = {
            "positions": positions,
            "node_attrs": node_attrs,
            "edge_index": graph.edge_index,
            "shifts": shifts,
            "unit_shifts": graph.unit_shifts,
            "cell": cell.reshape(-1, 3),
            "batch": graph.batch,
            "ptr": graph.ptr,
        }
        out = self.mace(data, training=self.training, compute_force=False)
        scalars, vectors = self._split_features(out["node_feats"])
        return BackboneOutput(out["node_energy"], scalars, vectors)

    def _layer_widths(self) -> list[int]:
        """Feature width of each layer: the last one is scalar unless asked for (never with one layer)."""
        c, n = self.config.num_channels, self.config.num_interactions
        if self.config.max_L == 0 or n == 1:
            return [c] * n
        return [4 * c] * (n - 1) + [4 * c if self.config.last_layer_vectors else c]

    def _split_features(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, n_atoms = self.config.num_channels, feats.shape[0]
        scalars, vectors = [], []
        for layer in torch.split(feats, self._layer_widths(), dim=-1):
            scalars.append(layer[:, :c])
            if layer.shape[-1] > c and self.kernels == "cueq":  # layout ir_mul: [3, c]
                vectors.append(layer[:, c:].reshape(n_atoms, 3, c).transpose(1, 2))
            elif layer.shape[-1] > c:  # e3nn's mul_ir: [c, 3]
                vectors.append(layer[:, c:].reshape(n_atoms, c, 3))
        vectors_out = torch.cat(vectors, dim=1) if vectors else feats.new_zeros(n_atoms, 0, 3)
        return torch.cat(scalars, dim=-1), vectors_out
