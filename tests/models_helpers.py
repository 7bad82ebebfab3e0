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
    "qeq": {"name": "qeq"},
    "qeq-cg": {"name": "qeq", "solver": "cg", "tol": 1e-12},
    "functional": {"name": "functional", "newton_tol": 1e-12},
    "scf": {"name": "scf", "tol": 1e-11},
    "scf-mlp": {"name": "scf", "update": "mlp", "tol": 1e-11},
}


def tiny_model(head: dict, seed: int = 0, dtype: str = "float64", **electrostatics) -> EmlipModel:
    """A 4-channel, 2-layer model whose head weights are randomised by ``seed`` (a fresh copy)."""
    key = json.dumps([head, dtype, electrostatics], sort_keys=True)
    if key not in _CACHE:
        torch.manual_seed(0)
        config = ModelConfig(
            elements=ELEMENTS,
            head=head,
            backbone={
                "num_channels": 4,
                "num_interactions": 2,
                "correlation": 2,
                "max_ell": 2,
                "r_max": 4.0,
                "mlp_hidden": 4,
            },
            electrostatics=electrostatics,
            dtype=dtype,
        )
        _CACHE[key] = EmlipModel(config)
    model = copy.deepcopy(_CACHE[key])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


_CACHE: dict[str, EmlipModel] = {}


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


def molecules_batch(model: EmlipModel):
    """Four open structures of charges 0, 0, +1 and −1 and of 3 and 5 atoms, one graph."""
    molecules = []
    for k, charge in enumerate((0.0, 1.0, -1.0)):
        atoms = water_cluster(charge)
        atoms.positions += np.random.default_rng(k).normal(scale=0.1, size=atoms.positions.shape)
        molecules.append(atoms)
    water = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    water.info["total_charge"] = 0.0
    molecules.insert(1, water)
    return build_graph(molecules, model.cutoff, model.dtype)


def periodic_batch(model: EmlipModel):
    """Two rattled NaCl cells (neutral, +1) and a cation cluster without periodicity, one graph."""
    charged = nacl_cell(1)
    charged.info["total_charge"] = 1.0
    return build_graph([nacl_cell(0), water_cluster(1.0), charged], model.cutoff, model.dtype)


def spy_on(monkeypatch, cls: type, name: str) -> list[bool]:
    """Record, per call of the method ``cls.name``, whether it returned a result (not ``None``)."""
    original = getattr(cls, name)
    used: list[bool] = []

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        used.append(result is not None)
        return result

    monkeypatch.setattr(cls, name, spy)
    return used


def evaluate(model: EmlipModel, atoms: Atoms | list[Atoms], **kwargs) -> dict:
    """Run ``model`` on ``atoms`` and return detached outputs."""
    atoms_list = atoms if isinstance(atoms, list) else [atoms]
    graph = build_graph(atoms_list, model.cutoff, model.dtype)
    out = model(graph, **kwargs)
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


def gradient_and_central_difference(loss, weight: torch.Tensor, entry=(0, 1), h: float = 1e-6) -> tuple:
    """``∂loss/∂weight[entry]`` by autograd and by central differences (the weight is restored)."""
    grad = float(torch.autograd.grad(loss(), weight)[0][entry])
    values = []
    for step in (h, -2 * h):
        with torch.no_grad():
            weight[entry] += step
        values.append(float(loss().detach()))
    with torch.no_grad():
        weight[entry] += h
    return grad, (values[0] - values[1]) / (2 * h)
