"""Inputs of the main demo: DFT labels of molecules in several charge states → two trained designs.

The configurations repeat the *same* geometries in the total charges −1, 0 and +1, so that the
contrast the study is about shows at once: ``sr`` (blind to the total charge) cannot fit the energies,
``charges`` (Σq = Q by construction) can.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ase import Atoms
from ase.build import molecule

BOX = 9.0  # Å; Martyna–Tuckerman isolation needs about twice the molecule's extent
CHARGES = (-1.0, 0.0, 1.0)

#: pw.x settings shared by every demo configuration (low cutoff: a demo, not production labels).
DFT_OVERRIDES: dict[str, Any] = {
    "ecutwfc": 25.0,
    "ecutrho": 200.0,
    "kpoints_distance": 10.0,
    "parameters": {"SYSTEM": {"assume_isolated": "mt"}},
}


def design_config(head: dict[str, Any], epochs: int, seed: int = 0) -> dict[str, Any]:
    """An emlip-train config for one design: a small MACE backbone, the same for every design."""
    return {
        "seed": seed,
        "device": "auto",
        "data": {"valid_fraction": 0.2, "test_fraction": 0.2, "batch_size": 4},
        "model": {
            "dtype": "float64",
            "backbone": {
                "num_channels": 8,
                "num_interactions": 2,
                "correlation": 2,
                "max_ell": 2,
                "r_max": 4.0,
                "mlp_hidden": 8,
            },
            "head": head,
        },
        "optimizer": {"name": "adamw", "lr": 0.01},
        "loss": {"energy": 10.0, "forces": 1.0},
        "stages": [{"name": "main", "epochs": epochs}],
        "checkpoint": {"every": 0},
    }


DESIGNS = {
    "sr": {"name": "sr"},
    "charges": {"name": "charges", "correction": "weighted"},
}


def demo_configurations(n_geometries: int = 3, seed: int = 7) -> list[tuple[str, Atoms, float]]:
    """``(name, atoms, total_charge)``: NaCl dimers and rattled water, each in charges −1, 0, +1."""
    rng = np.random.default_rng(seed)
    geometries: list[tuple[str, Atoms]] = []
    for i, distance in enumerate(np.linspace(2.2, 2.8, n_geometries)):
        geometries.append((f"nacl{i}", Atoms("NaCl", positions=[[0, 0, 0], [0, 0, distance]])))
    for i in range(max(1, n_geometries - 1)):
        water = molecule("H2O")
        water.positions += rng.normal(scale=0.05, size=water.positions.shape)
        geometries.append((f"water{i}", water))
    out = []
    for name, atoms in geometries:
        atoms.set_cell([BOX, BOX, BOX])
        atoms.pbc = True
        atoms.center()
        for charge in CHARGES:
            tag = {-1.0: "m1", 0.0: "0", 1.0: "p1"}[charge]
            out.append((f"{name}_q{tag}", atoms.copy(), charge))
    return out


def training_builder(pw_code, train_code, family_label: str, epochs: int = 40, n_geometries: int = 3):
    """Builder of :class:`~aiida_emlip.workflows.training.EmlipTrainingWorkChain` for the demo."""
    from aiida import orm

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain
    from aiida_emlip.workflows.training import EmlipTrainingWorkChain

    configurations = demo_configurations(n_geometries)
    structures = {name: orm.StructureData(ase=atoms) for name, atoms, _ in configurations}
    settings = {
        name: {"total_charge": charge, "config_type": name.split("_")[0].rstrip("0123456789")}
        for name, _, charge in configurations
    }
    dataset = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code,
        structures,
        family_label,
        protocol="fast",
        overrides=DFT_OVERRIDES,
        structure_settings=settings,
    )
    builder = EmlipTrainingWorkChain.get_builder()
    builder.dataset = {key: dataset[key] for key in dataset if dataset[key] is not None}
    builder.train_code = train_code
    builder.designs = orm.Dict({label: design_config(head, epochs) for label, head in DESIGNS.items()})
    return builder
