"""Base charges measured on the data (``formal_charges: mean``): ``split``, and ``qeq`` with bonds."""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
import pytest
from training_helpers import config_dict, write_config

from aiida_emlip import schema
from aiida_emlip.models.io import load_model
from aiida_emlip.models.model import EmlipModel, ModelConfig
from aiida_emlip.training.cli import train_main
from aiida_emlip.training.config import ConfigError, check_model_section, label_needs, parse_config
from aiida_emlip.training.errors import DataError
from aiida_emlip.training.presets import preset_config
from aiida_emlip.training.trainer import Trainer

LONG_RANGE = Path(__file__).parent.parent / "bench" / "data" / "long_range.xyz"
BACKBONE = {
    "num_channels": 4,
    "num_interactions": 2,
    "correlation": 2,
    "r_max": 4.0,
    "mlp_hidden": 4,
    "max_L": 1,
}


def _data(tmp_path: Path, count: int = 10, charges: bool = True) -> Path:
    """Li⁺ + water and water-pair cells labelled by pw.x with Hirshfeld charges (or without them)."""
    frames = ase.io.read(LONG_RANGE, f":{count}")
    if not charges:
        for atoms in frames:
            del atoms.arrays[schema.CHARGES]
            del atoms.arrays[schema.ATOMIC_DIPOLES]
    path = tmp_path / "cells.xyz"
    ase.io.write(path, frames, format="extxyz")
    return path


def _gap(atoms) -> float:
    """Closest distance (Å, minimum image) between the two fragments of a Li⁺ + water or water pair."""
    from ase.geometry import get_distances

    first = 1 if len(atoms) == 4 else 3
    _, distances = get_distances(atoms.positions[:first], atoms.positions[first:], atoms.cell, atoms.pbc)
    return float(distances.min())


def _values(tmp_path: Path, data: Path, head: dict, **extra) -> dict:
    values = config_dict(tmp_path, "split", epochs=1, **extra)
    values["data"] = {"train": str(data), "batch_size": 4, "valid_fraction": 0.2, "test_fraction": 0.0}
    values["model"]["head"] = head
    values["model"]["backbone"] = dict(BACKBONE)
    return values


@pytest.mark.parametrize(
    "head",
    [
        {"name": "split", "formal_charges": "mean"},
        {"name": "qeq", "fragments": "bonds", "formal_charges": "mean"},
    ],
    ids=["split", "qeq-bonds"],
)
def test_the_trainer_writes_each_elements_mean_training_charge_into_the_model(tmp_path, head):
    values = _values(tmp_path, _data(tmp_path), head)
    trainer = Trainer(parse_config(values))
    # the atoms of structures whose fragments stand apart (closest atoms beyond r_max = 4 Å)
    apart = [s for s in trainer.train if _gap(s.atoms) > 4.0]
    assert 0 < len(apart) < len(trainer.train)
    expected = {}
    for element in ("H", "Li", "O"):
        charges = []
        for sample in apart:
            first = 1 if len(sample.atoms) == 4 else 3
            q = np.array(sample.labels[schema.CHARGES], dtype=float)
            for part in (slice(0, first), slice(first, None)):  # each fragment at its integer charge
                q[part] += (np.rint(q[part].sum()) - q[part].sum()) / len(q[part])
            charges += [x for symbol, x in zip(sample.atoms.get_chemical_symbols(), q) if symbol == element]
        expected[element] = float(np.mean(charges))
    assert len(trainer.valid) > 0  # the means of the training split only
    resolved = trainer.model.config.head["formal_charges"]
    assert resolved == pytest.approx(expected, abs=1e-12)
    # a Li⁺ and a water alone need no correction of their total charge (DFT partition noise only);
    # the means over every atom would not give that (contact cells hold Li at 0.78 e)
    assert resolved["Li"] == pytest.approx(1.0, abs=1e-12)
    assert resolved["O"] + 2 * resolved["H"] == pytest.approx(0.0, abs=1e-12)
    every_li = [
        q
        for s in trainer.train
        for sym, q in zip(s.atoms.get_chemical_symbols(), s.labels[schema.CHARGES])
        if sym == "Li"
    ]
    assert np.mean(every_li) < 0.97
    table = dict(zip(trainer.model.config.elements, trainer.model.head.formal.tolist()))
    assert table == pytest.approx(expected, abs=1e-7)  # the head's table is float32
    trainer.run()
    model = load_model(tmp_path / "run" / "model.safetensors")
    assert model.config.head["formal_charges"] == pytest.approx(expected, abs=1e-12)

    # the charges barely change as the ion's last bond to the water crosses the cutoff: the two
    # fragments need no correction apart, nor together
    from aiida_emlip.models.graph import build_graph

    far = next(s.atoms for s in apart if s.atoms.get_chemical_symbols()[0] == "Li")

    def charges_at(distance: float) -> np.ndarray:
        atoms = far.copy()
        gaps = np.linalg.norm(atoms.positions[1:] - atoms.positions[0], axis=1)
        nearest = atoms.positions[1 + int(np.argmin(gaps))]
        direction = (atoms.positions[0] - nearest) / gaps.min()
        atoms.positions[0] = nearest + distance * direction
        out = model(build_graph([atoms], model.cutoff, model.dtype, model.device), compute_stress=False)
        return out["charges"].detach().numpy()

    inside, outside = charges_at(4.0 - 1e-7), charges_at(4.0 + 1e-7)
    assert outside[0] == pytest.approx(1.0, abs=1e-9)  # alone: an integer charge
    assert np.abs(inside - outside).max() < 1e-6
    assert inside.sum() == pytest.approx(1.0, abs=1e-9)


def test_a_warm_start_keeps_the_base_charges_of_its_initial_model(tmp_path):
    first = _values(tmp_path / "a", _data(tmp_path), {"name": "split", "formal_charges": "mean"})
    Trainer(parse_config(first)).run()
    init = tmp_path / "a" / "run" / "model.safetensors"
    before = load_model(init).config.head["formal_charges"]
    other = tmp_path / "b"
    other.mkdir()
    second = _values(
        other, _data(other, count=6), {"name": "split", "formal_charges": "mean"}, init_from=str(init)
    )
    trainer = Trainer(parse_config(second))
    assert dict(zip(trainer.model.config.elements, trainer.model.head.formal.tolist())) == pytest.approx(
        before
    )


def test_mean_base_charges_without_reference_charges_are_refused_before_training(tmp_path, capsys):
    values = _values(tmp_path, _data(tmp_path, charges=False), {"name": "split", "formal_charges": "mean"})
    assert train_main([str(write_config(tmp_path, values)), "--check"]) == 2
    assert "no training structure with reference charges contains ['H', 'Li', 'O']" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    config = parse_config(values)
    assert any(need.key == schema.CHARGES for need in label_needs(config))
    with pytest.raises(
        DataError, match=r"no training structure with reference charges contains \['H', 'Li', 'O'\]"
    ):
        Trainer(config)


def test_a_model_outside_training_needs_numbers_and_other_words_are_refused():
    check_model_section({"head": {"name": "split", "formal_charges": "mean"}, "backbone": dict(BACKBONE)})
    config = ModelConfig.from_dict(
        {
            "elements": ["H", "O"],
            "head": {"name": "split", "formal_charges": "mean"},
            "backbone": dict(BACKBONE),
        }
    )
    with pytest.raises(ValueError, match="measured on the training data by emlip-train"):
        EmlipModel(config)
    with pytest.raises(ConfigError, match="formal_charges must map elements to charges"):
        check_model_section(
            {"head": {"name": "split", "formal_charges": "formal"}, "backbone": dict(BACKBONE)}
        )
    with pytest.raises(ConfigError, match="formal charges must map elements to numbers"):
        check_model_section({"head": {"name": "fixed", "formal_charges": "mean"}, "backbone": dict(BACKBONE)})


def test_the_split_preset_measures_its_base_charges_when_the_data_have_charges():
    with_charges = preset_config("split", labels={schema.CHARGES}, elements=["H", "O"])
    assert with_charges["model"]["head"]["formal_charges"] == schema.MEAN_CHARGES
    without = preset_config("split", labels=set(), elements=["H", "O"])
    assert without["model"]["head"]["formal_charges"] == {"H": 1.0, "O": -2.0}
    given = preset_config("split", labels={schema.CHARGES}, elements=["H", "O"], formal_charges={"O": -1.0})
    assert given["model"]["head"]["formal_charges"] == {"O": -1.0}


def test_equilibrating_presets_with_bonds_take_base_charges_like_split():
    bonds = preset_config("qeq", labels={schema.CHARGES}, elements=["H", "O"], fragments="bonds")
    assert bonds["model"]["head"]["formal_charges"] == schema.MEAN_CHARGES
    without = preset_config("functional", labels=set(), elements=["H", "O", "Zn"], fragments="bonds")
    assert without["model"]["head"]["formal_charges"] == {"H": 1.0, "O": -2.0, "Zn": 0.0}
    assert (
        "formal_charges" not in preset_config("qeq", labels={schema.CHARGES}, elements=["H"])["model"]["head"]
    )
