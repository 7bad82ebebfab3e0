"""Tiny saved models and small structures for the emlip-eval and emlip.evaluate tests (no AiiDA)."""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
import torch
from ase import Atoms
from ase.build import bulk, molecule

from aiida_emlip.models.io import save_model
from aiida_emlip.models.model import EmlipModel, ModelConfig

ELEMENTS = ["H", "O", "Na", "Cl"]
BACKBONE = {
    "num_channels": 8,
    "num_interactions": 1,
    "correlation": 2,
    "max_L": 0,
    "r_max": 4.0,
    "mlp_hidden": 8,
}
HEADS = {
    "charges": {"name": "charges"},
    "sr": {"name": "sr"},
    # one SCF step with a tolerance no step can meet: never converges
    "scf-stuck": {"name": "scf", "max_steps": 1, "tol": 1e-14},
}


def save_tiny_model(directory: Path, head: str = "charges", seed: int = 0) -> Path:
    """An untrained 8-channel model of ``head`` saved as ``directory/HEAD.safetensors``."""
    torch.manual_seed(seed)
    model = EmlipModel(ModelConfig(elements=ELEMENTS, head=dict(HEADS[head]), backbone=dict(BACKBONE)))
    directory.mkdir(parents=True, exist_ok=True)
    return save_model(model, directory / f"{head}.safetensors")


def nacl_cell(seed: int = 1) -> Atoms:
    """The rattled 8-atom rock-salt cell (periodic)."""
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    atoms.rattle(0.1, seed=seed)
    atoms.info["config_type"] = "bulk"
    return atoms


def charged_cluster() -> Atoms:
    """H2O + Na⁺, not periodic, total charge +1."""
    atoms = molecule("H2O")
    atoms += Atoms("Na", positions=[[2.4, 0.2, 0.1]])
    atoms.info["total_charge"] = 1.0
    atoms.info["config_type"] = "cluster"
    return atoms


def water() -> Atoms:
    """A neutral, slightly bent-out water molecule."""
    atoms = molecule("H2O")
    atoms.positions[1] += [0.05, 0.0, 0.05]
    return atoms


def slab() -> Atoms:
    """Two rattled NaCl(001) layers with vacuum along z (periodic in x and y; z in 0–2.8 Å + vacuum)."""
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    atoms = atoms[[i for i, z in enumerate(atoms.positions[:, 2]) if z < 3.0]]
    atoms.cell[2, 2] = 12.0
    atoms.rattle(0.08, seed=3)
    atoms.positions[:, 2] += 1.0
    return atoms


def write_structures(path: Path, frames: list[Atoms]) -> Path:
    ase.io.write(path, frames, format="extxyz")
    return path


def max_force(forces: np.ndarray) -> float:
    return float(np.sqrt((np.asarray(forces) ** 2).sum(axis=1)).max())
