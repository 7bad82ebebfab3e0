"""``emlip.train``: emlip-train as an AiiDA calculation on localhost, with real pw.x labels."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data" / "tiny.xyz"
CONFIG = {
    "seed": 0,
    "device": "cpu",
    "data": {"valid_fraction": 0.2, "test_fraction": 0.2, "batch_size": 4},
    "model": {
        "backbone": {"num_channels": 4, "num_interactions": 1, "correlation": 2, "max_ell": 2, "r_max": 4.0},
        "head": {"name": "charges"},
    },
    "stages": [{"name": "main", "epochs": 2}],
    "checkpoint": {"every": 0},
}


def _builder(train_code, config):
    from aiida.orm import Dict

    from aiida_emlip.calculations.train import EmlipTrainCalculation
    from aiida_emlip.data.dataset import EmlipDatasetData

    builder = EmlipTrainCalculation.get_builder()
    builder.code = train_code
    builder.dataset = EmlipDatasetData.from_extxyz(DATA)
    builder.config = Dict(config)
    builder.metadata.options.max_wallclock_seconds = 600
    return builder


def test_train_calculation_produces_model(train_code):
    from aiida.engine import run_get_node

    from aiida_emlip.data.model import EmlipModelData

    results, node = run_get_node(_builder(train_code, CONFIG))
    assert node.is_finished_ok, node.exit_status
    model = results["model"]
    assert isinstance(model, EmlipModelData) and model.head_name == "charges"
    assert set(model.base.attributes.get("elements")) == {"H", "O", "Na", "Cl"}
    metrics = results["metrics"].get_dict()
    assert metrics, "metrics are empty"
    # the model node is a provenance child of the dataset it was trained on
    assert node.inputs.dataset.pk in {n.pk for n in node.base.links.get_incoming().all_nodes()}
    loaded = model.load()
    assert loaded.config.head["name"] == "charges"


def test_bad_config_is_refused_before_submission(train_code):
    from aiida.engine import run_get_node

    bad = {**CONFIG, "stages": [{"name": "main", "epochs": 2, "colour": "red"}]}
    with pytest.raises(ValueError, match="colour"):
        run_get_node(_builder(train_code, bad))
    reserved = {**CONFIG, "output_dir": "/tmp/x"}
    with pytest.raises(ValueError, match="set by the calculation"):
        run_get_node(_builder(train_code, reserved))


def test_non_finite_training_ends_with_its_exit_code(train_code, tmp_path):
    """A NaN label stops emlip-train with status 3, which becomes exit code 320."""
    from aiida.engine import run_get_node
    from ase.io import read, write

    from aiida_emlip.data.dataset import EmlipDatasetData

    frames = read(DATA, index=":")
    frames[0].calc.results["energy"] = float("nan")
    path = tmp_path / "nan.xyz"
    write(path, frames, format="extxyz")
    builder = _builder(train_code, CONFIG)
    try:
        builder.dataset = EmlipDatasetData.from_extxyz(path)
    except ValueError:
        pytest.skip("the dataset node already refuses NaN labels (checked in its own tests)")
    _, node = run_get_node(builder)
    assert node.exit_status == 320, node.exit_message
