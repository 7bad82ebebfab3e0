"""Tiny training configurations on the shipped pw.x dataset (tests/data/tiny.xyz)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from aiida_emlip.training.config import TrainConfig, parse_config

DATA = Path(__file__).parent / "data" / "tiny.xyz"

HEADS: dict[str, dict[str, Any]] = {
    "sr": {"name": "sr"},
    "fixed": {"name": "fixed", "formal_charges": {"Na": 1.0, "Cl": -1.0}},
    "charges": {"name": "charges"},
    "latent": {"name": "latent"},
    "split": {"name": "split", "formal_charges": {"Na": 1.0, "Cl": -1.0}},
    # self-consistent heads: tests skip them until the head is registered
    "qeq": {"name": "qeq"},
    "scf": {"name": "scf", "on_failure": "flag"},
    "functional": {"name": "functional"},
}
SELF_CONSISTENT = ("qeq", "scf", "functional")

BACKBONE = {
    "num_channels": 4,
    "num_interactions": 1,
    "correlation": 2,
    "r_max": 4.0,
    "mlp_hidden": 4,
    "max_L": 0,
}


def config_dict(tmp_path: Path, head: str = "charges", epochs: int = 3, **overrides: Any) -> dict[str, Any]:
    """A small configuration as a mapping; ``overrides`` replace top-level sections."""
    values: dict[str, Any] = {
        "data": {"train": str(DATA), "batch_size": 4, "valid_fraction": 0.2, "test_fraction": 0.1},
        "model": {"head": copy.deepcopy(HEADS[head]), "backbone": dict(BACKBONE), "dtype": "float64"},
        "loss": {"energy": 10.0, "forces": 1.0},
        "optimizer": {"name": "adamw", "lr": 0.01},
        "ema": {"enabled": True, "decay": 0.9},
        "stages": [{"name": "main", "epochs": epochs}],
        "output_dir": str(tmp_path / "run"),
        "progress": "log",
        "checkpoint": {"every": 0},
    }
    if head == "split":
        # split reads atomic dipoles from l = 1 features (max_L = 1 needs >= 2 interactions)
        values["model"]["backbone"].update(max_L=1, num_interactions=2)
    if head in FORMAL:
        values["data"]["train"] = str(neutral_dataset(tmp_path))
    values.update(overrides)
    return values


#: Heads whose formal charges cannot represent the charged molecules of the tiny set.
FORMAL = ("fixed", "split")


def neutral_dataset(tmp_path: Path) -> Path:
    """The neutral structures of the tiny set (for heads with formal charges)."""
    import ase.io

    path = tmp_path / "neutral.xyz"
    if not path.exists():
        tmp_path.mkdir(parents=True, exist_ok=True)
        frames = [a for a in ase.io.read(DATA, ":") if a.info["total_charge"] == 0]
        ase.io.write(path, frames, format="extxyz")
    return path


def make_config(tmp_path: Path, head: str = "charges", epochs: int = 3, **overrides: Any) -> TrainConfig:
    return parse_config(config_dict(tmp_path, head, epochs, **overrides))


def write_config(tmp_path: Path, values: dict[str, Any], name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


def teacher_dataset(tmp_path: Path, head: str, seed: int = 1, perturb: float = 0.0) -> Path:
    """Label the tiny structures with a random tiny model of ``head`` (teacher–student, decision 11).

    The teacher converges from the local guess; its charges and Fermi level become the reference
    multipoles (``ref_charges``, ``fermi_level``) that ``direct`` training needs. ``perturb`` adds
    Gaussian noise of that width to every parameter of the teacher's head: a freshly initialised
    student then starts far from the teacher's charges (without it, the two heads' charges agree to a
    few 0.01 e before any training, so matching them proves nothing).
    """
    import ase.io
    import torch

    from aiida_emlip import schema
    from aiida_emlip.models.graph import build_graph
    from aiida_emlip.models.model import EmlipModel, ModelConfig

    torch.manual_seed(seed)
    teacher = EmlipModel(
        ModelConfig(elements=["H", "O", "Na", "Cl"], head=dict(HEADS[head]), backbone=BACKBONE)
    )
    if perturb:
        with torch.no_grad():
            for name, parameter in teacher.named_parameters():
                if name.startswith("head."):
                    parameter.add_(perturb * torch.randn_like(parameter))
    frames = ase.io.read(DATA, ":")
    labelled = []
    for atoms in frames:
        out = teacher(build_graph([atoms], teacher.cutoff), compute_stress=False, scf_mode="converge")
        new = atoms.copy()
        new.calc = None
        new.info = {k: atoms.info[k] for k in (schema.TOTAL_CHARGE, schema.CONFIG_TYPE)}
        new.info[schema.ENERGY] = float(out["energy"][0])
        new.arrays[schema.FORCES] = out["forces"].detach().numpy()
        if out["charges"] is not None:
            new.arrays[schema.CHARGES] = out["charges"].detach().numpy()
        if out["fermi_level"] is not None:
            new.info[schema.FERMI_LEVEL] = float(out["fermi_level"][0])
        labelled.append(new)
    path = tmp_path / f"teacher-{head}.xyz"
    ase.io.write(path, labelled, format="extxyz")
    return path
