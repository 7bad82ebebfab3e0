"""Warm start through AiiDA: ``emlip.train``'s ``initial_model``, the training workchain's
``initial_models`` per design, the check before submission, and caching keyed on the initial model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data" / "tiny.xyz"
BACKBONE = {"num_channels": 4, "num_interactions": 1, "correlation": 2, "max_ell": 2, "r_max": 4.0}
CONFIG = {
    "seed": 0,
    "device": "cpu",
    "data": {"valid_fraction": 0.2, "test_fraction": 0.2, "batch_size": 4},
    "model": {"backbone": BACKBONE, "head": {"name": "charges"}},
    "stages": [{"name": "main", "epochs": 1}],
    "checkpoint": {"every": 0},
}


def _model_node(path: Path, shift: float = 0.0, **backbone):
    from aiida_emlip.data.model import EmlipModelData
    from aiida_emlip.models.io import save_model
    from aiida_emlip.models.model import EmlipModel, ModelConfig

    torch.manual_seed(7)
    model = EmlipModel(
        ModelConfig(
            elements=["H", "O", "Na", "Cl"], head={"name": "charges"}, backbone={**BACKBONE, **backbone}
        )
    )
    with torch.no_grad():
        model.reference_energies.copy_(torch.tensor([-13.0, -430.0, -1290.0, -410.0], dtype=torch.float64))
        next(model.head.parameters()).add_(shift)
    return EmlipModelData(save_model(model, path)).store()


@pytest.fixture(scope="module")
def initial_models(aiida_profile, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("initial")
    return {
        "first": _model_node(tmp / "first.safetensors"),
        "second": _model_node(tmp / "second.safetensors", shift=0.1),
        "wide": _model_node(tmp / "wide.safetensors", num_channels=8),
    }


def test_calculation_with_an_initial_model_runs_and_caching_follows_the_model(train_code, initial_models):
    """emlip.train with an initial model starts from it (metrics, log, model file), the model is part of
    the hash, and the same inputs come from the cache."""
    from aiida.engine import run_get_node
    from aiida.manage.caching import enable_caching
    from aiida.orm import Dict

    from aiida_emlip.calculations.train import INIT_FILE, EmlipTrainCalculation
    from aiida_emlip.data.dataset import EmlipDatasetData

    first = initial_models["first"]
    builder = EmlipTrainCalculation.get_builder()
    builder.code = train_code
    builder.dataset = EmlipDatasetData.from_extxyz(DATA)
    builder.config = Dict(CONFIG)
    builder.initial_model = first
    builder.metadata.options = {"resources": {"num_machines": 1}, "max_wallclock_seconds": 600}
    results, calc = run_get_node(builder)
    assert calc.is_finished_ok, (calc.exit_status, calc.exit_message)
    metrics = results["metrics"].get_dict()
    assert metrics["init_from"]["sha256"] == first.sha256 and metrics["init_from"]["path"].endswith(INIT_FILE)
    assert metrics["epochs"] == 1
    log = calc.outputs.retrieved.get_object_content("train.log")
    assert f"{INIT_FILE} (sha256 {first.sha256[:12]}…)" in log and "warm start: weights" in log
    assert INIT_FILE not in calc.outputs.retrieved.base.repository.list_object_names()
    model = results["model"]
    assert model.base.attributes.get("extra")["training"]["init_from"]["sha256"] == first.sha256

    # the initial model enters the hash: another model (the same architecture) gives another hash
    inputs = calc.base.caching.get_objects_to_hash()["inputs"]
    assert inputs["initial_model"] == first.base.caching.compute_hash()
    assert first.base.caching.compute_hash() != initial_models["second"].base.caching.compute_hash()
    with enable_caching(identifier="aiida.calculations:emlip.train"):
        _, cached = run_get_node(calc.get_builder_restart())
    assert cached.base.caching.is_created_from_cache and cached.is_finished_ok
    assert cached.base.caching.get_cache_source() == calc.uuid


def test_initial_models_reach_the_calculation_and_a_mismatch_is_refused_before_submission(
    train_code, initial_models
):
    """emlip.training checks each design's initial model as emlip-train --check does before it submits
    any design, and emlip.train.base does the same when run alone: another architecture ends either
    with 201 before any job."""
    from aiida.engine import run_get_node
    from aiida.orm import Dict

    from aiida_emlip.data.dataset import EmlipDatasetData
    from aiida_emlip.workflows.train_base import EmlipTrainBaseWorkChain
    from aiida_emlip.workflows.training import EmlipTrainingWorkChain

    dataset = EmlipDatasetData.from_extxyz(DATA)
    builder = EmlipTrainingWorkChain.get_builder()
    builder.training_set = dataset
    builder.train_code = train_code
    builder.designs = Dict({"charges": CONFIG})
    builder.initial_models = {"charges": initial_models["wide"]}
    _, node = run_get_node(builder)
    assert node.exit_status == 201 and not node.called
    assert "model.backbone.num_channels (init model 8, config 4)" in node.exit_message
    inputs = {
        "code": train_code,
        "dataset": dataset,
        "config": Dict(CONFIG),
        "initial_model": initial_models["wide"],
        "metadata": {"options": {"max_wallclock_seconds": 600}},
    }
    _, base = run_get_node(EmlipTrainBaseWorkChain, train=inputs)
    assert base.inputs.train.initial_model.uuid == initial_models["wide"].uuid
    assert base.exit_status == 201 and not base.called
    assert "model.backbone.num_channels (init model 8, config 4)" in base.exit_message
    # init_from is the calculation's to set
    inputs = {**inputs, "config": Dict({**CONFIG, "init_from": "x"})}
    inputs.pop("initial_model")
    with pytest.raises(ValueError, match="'init_from' is set by the calculation"):
        run_get_node(EmlipTrainBaseWorkChain, train=inputs)
    # an initial model for a design that is not there
    builder.initial_models = {"sr": initial_models["first"]}
    _, node = run_get_node(builder)
    assert node.exit_status == 201 and not node.called
    assert "initial_models for designs that are not given: sr" in node.exit_message
