"""Small structures and model factories shared by the model tests (no AiiDA)."""

from __future__ import annotations

import copy
import json

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk, molecule

from aiida_emlip.models.graph import build_graph
from aiida_emlip.models.model import EmlipModel, ModelConfig

ELEMENTS = ["H", "O", "Na", "Cl"]

HEAD_CONFIGS = {
    "sr": {"name": "sr"},
    "fixed": {"name": "fixed", "formal_charges": {"Na": 1.0, "Cl": -1.0}},
    "charges": {"name": "charges"},
    "charges-weighted-dipoles": {"name": "charges", "correction": "weighted", "dipoles": True},
    "charges-loss": {"name": "charges", "correction": "none"},
    "latent": {"name": "latent"},
    "split": {"name": "split", "formal_charges": {"Na": 1.0, "Cl": -1.0}},
}


def tiny_model(head: dict, seed: int = 0, dtype: str = "float64", **electrostatics) -> EmlipModel:
    """A 4-channel, 2-layer model with randomised (non-zero) head weights (a fresh copy each call)."""
    key = json.dumps([head, seed, dtype, electrostatics], sort_keys=True)
    if key not in _CACHE:
        _CACHE[key] = _build(head, seed, dtype, electrostatics)
    return copy.deepcopy(_CACHE[key])


_CACHE: dict[str, EmlipModel] = {}


def _build(head: dict, seed: int, dtype: str, electrostatics: dict) -> EmlipModel:
    torch.manual_seed(seed)
    config = ModelConfig(
        elements=ELEMENTS,
        head=head,
        backbone={"num_channels": 4, "num_interactions": 2, "correlation": 2, "r_max": 4.0, "mlp_hidden": 4},
        electrostatics=electrostatics,
        dtype=dtype,
    )
    model = EmlipModel(config)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def nacl_cell(seed: int = 0) -> Atoms:
    """A rattled, sheared 8-atom rock-salt cell (periodic)."""
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    rng = np.random.default_rng(seed)
    atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.02 * rng.normal(size=(3, 3))), scale_atoms=True)
    return atoms


def water_cluster(charge: float = 0.0) -> Atoms:
    """An H2O + Na + Cl cluster without periodicity; ``total_charge`` set in ``info``."""
    atoms = molecule("H2O")
    atoms += Atoms("NaCl", positions=[[2.6, 0.3, 0.2], [-2.4, 0.5, -0.4]])
    atoms.info["total_charge"] = charge
    return atoms


def evaluate(model: EmlipModel, atoms: Atoms | list[Atoms], **kwargs) -> dict:
    """Run ``model`` on ``atoms`` and return detached outputs."""
    atoms_list = atoms if isinstance(atoms, list) else [atoms]
    graph = build_graph(atoms_list, model.cutoff, model.dtype)
    out = model(graph, **kwargs)
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
