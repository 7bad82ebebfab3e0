"""Warm start (``init_from``): the loaded model predicts as its source, a mismatch is refused at --check,
new elements and broken files are refused, ``--resume`` continues only a run of the same initial model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from training_helpers import BACKBONE, HEADS, config_dict, write_config

from aiida_emlip.models.file_format import file_sha256, read_metadata, verify
from aiida_emlip.models.io import load_model, save_model
from aiida_emlip.models.model import EmlipModel, ModelConfig
from aiida_emlip.training.cli import train_main
from aiida_emlip.training.config import parse_config
from aiida_emlip.training.data import collate
from aiida_emlip.training.trainer import Trainer
from aiida_emlip.training.warmstart import architecture_differences

ELEMENTS = ["H", "O", "Na", "Cl"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A model of the ``charges`` design trained for two epochs on the tiny set."""
    tmp = tmp_path_factory.mktemp("source")
    Trainer(parse_config(config_dict(tmp, "charges", epochs=2))).run()
    return tmp / "run" / "model.safetensors"


def _random_model(path: Path, elements=ELEMENTS, head: str = "charges", **backbone) -> Path:
    torch.manual_seed(3)
    model = EmlipModel(
        ModelConfig(elements=list(elements), head=dict(HEADS[head]), backbone={**BACKBONE, **backbone})
    )
    model.reference_energies.copy_(torch.linspace(-400.0, -10.0, len(elements), dtype=torch.float64))
    return save_model(model, path)


def _predict(model, samples):
    batch = collate(samples, torch.float64)
    model.eval()
    out = model(batch.graph, compute_stress=False)
    return {k: out[k].detach() for k in ("energy", "forces", "charges")}


def test_init_from_predicts_as_the_source_model(tmp_path, source):
    """Right after loading, and after a run of 0 epochs, the model is the source model (to 1e-10)."""
    values = config_dict(tmp_path, "charges", epochs=0, init_from=str(source))
    trainer = Trainer(parse_config(values))
    reference = load_model(source)
    samples = trainer.train + trainer.valid + trainer.test
    ours, theirs = _predict(trainer.model, samples), _predict(reference, samples)
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], rtol=0, atol=1e-10), key
    assert float(theirs["energy"].abs().max()) > 10  # real energies (reference energies included)
    assert trainer.reference_energies == dict(zip(ELEMENTS, reference.reference_energies.tolist()))

    metrics = trainer.run()
    written = load_model(tmp_path / "run" / "model.safetensors")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(written.state_dict()[name], tensor), name
    record = metrics["init_from"]
    assert record["sha256"] == file_sha256(source) and record["epochs"] == 2
    assert record["weights_sha256"] == verify(source)["sha256"] != record["sha256"]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["init_from"]["sha256"] == record["sha256"]
    extra = read_metadata(tmp_path / "run" / "model.safetensors")["extra"]
    assert extra["training"]["init_from"] == {k: record[k] for k in ("sha256", "weights_sha256")}
    assert "warm start: weights and reference energies from" in (tmp_path / "run" / "train.log").read_text()


def test_warm_start_begins_where_the_source_ended(tmp_path, source):
    """One epoch of a warm start validates below the source's last epoch, far below a cold first epoch."""
    cold = Trainer(parse_config(config_dict(tmp_path / "cold", "charges", epochs=1))).run()
    values = config_dict(tmp_path / "warm", "charges", epochs=1, init_from=str(source))
    warm = Trainer(parse_config(values)).run()["history"][0]["valid_loss"]
    ended = json.loads((source.parent / "metrics.json").read_text())["history"][-1]["valid_loss"]
    assert warm < ended < cold["history"][0]["valid_loss"] and warm < 0.9 * cold["history"][0]["valid_loss"]


def test_explicit_reference_energies_replace_those_of_the_model(tmp_path):
    model = _random_model(tmp_path / "m.safetensors")
    given = {"H": -13.0, "O": -430.0, "Na": -1290.0, "Cl": -410.0}
    values = config_dict(tmp_path, "charges", epochs=0, init_from=str(model))
    values["data"]["reference_energies"] = given
    trainer = Trainer(parse_config(values))
    assert trainer.model.reference_energies.tolist() == [given[e] for e in ELEMENTS]


def test_mismatched_architecture_is_refused_at_check(tmp_path, capsys):
    """--check (before any epoch, nothing created) names every differing key with both values."""
    model = _random_model(tmp_path / "m.safetensors")
    values = config_dict(tmp_path, "charges", epochs=1)
    values["model"]["backbone"]["num_channels"] = 8
    values["model"]["dtype"] = "float32"
    config = write_config(tmp_path, values)
    assert train_main([str(config), "--check", "--init-from", str(model)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: init_from: the model") and "in 2 key(s)" in err
    assert "model.dtype (init model 'float64', config 'float32')" in err
    assert "model.backbone.num_channels (init model 4, config 8)" in err
    assert not (tmp_path / "run").exists()
    # a head option and another head; defaults count as given (dipoles: false is the default)
    values = config_dict(tmp_path, "charges", epochs=1, init_from=str(model))
    values["model"]["head"] = {"name": "charges", "dipoles": False}
    assert train_main([str(write_config(tmp_path, values)), "--check"]) == 0
    values["model"]["head"] = {"name": "latent"}
    assert train_main([str(write_config(tmp_path, values)), "--check"]) == 2
    assert "model.head.name (init model 'charges', config 'latent')" in capsys.readouterr().err
    # the same architecture passes, relative to the configuration file
    values["model"]["head"] = {"name": "charges"}
    values["init_from"] = "m.safetensors"
    assert train_main([str(write_config(tmp_path, values)), "--check"]) == 0
    assert capsys.readouterr().out.startswith("ok:")


def test_architecture_differences_resolve_defaults():
    base = {"elements": ["H", "O"], "head": {"name": "sr"}, "backbone": {"num_channels": 16}}
    assert architecture_differences(base, {**base, "backbone": {}, "dtype": "float64"}) == []
    assert architecture_differences(base, {**base, "elements": ["O", "H"]}) == [
        "model.elements (init model ['H', 'O'], config ['O', 'H'])"
    ]
    assert architecture_differences(base, {**base, "electrostatics": {"sigma": 1.0}}) == [
        "model.electrostatics.sigma (init model 1.5, config 1.0)"
    ]
    assert architecture_differences(base, {**base, "induction": {"enabled": True}}) == [
        "model.induction.enabled (init model False, config True)"
    ]


def test_new_element_is_refused(tmp_path, capsys):
    """Data with an element the initial model lacks: exit 2 naming the element, before any compute."""
    model = _random_model(tmp_path / "water.safetensors", elements=["H", "O"])
    values = config_dict(tmp_path, "charges", epochs=1, init_from=str(model))
    assert train_main([str(write_config(tmp_path, values)), "--check"]) == 2
    err = capsys.readouterr().err
    assert "the data contain element(s) ['Cl', 'Na'] that the initial model" in err
    assert "lacks (its elements: ['H', 'O'])" in err and "train from scratch" in err


def test_broken_init_model_is_refused(tmp_path, capsys):
    model = _random_model(tmp_path / "m.safetensors")
    blob = bytearray(model.read_bytes())
    blob[-3] ^= 0xFF
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(bytes(blob))
    values = config_dict(tmp_path, "charges", epochs=1)
    config = write_config(tmp_path, values)
    assert train_main([str(config), "--check", "--init-from", str(broken)]) == 2
    assert "error: init_from: " in (err := capsys.readouterr().err) and "corrupted: the checksum" in err
    assert train_main([str(config), "--check", "--init-from", str(tmp_path / "none.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert train_main([str(write_config(tmp_path, {**values, "init_from": ""})), "--check"]) == 2


def test_resume_wins_only_for_the_same_initial_model(tmp_path, capsys):
    """--resume continues a warm start from its checkpoint; another initial model, or a cold run's
    checkpoint, is refused naming init_from.sha256."""
    first = _random_model(tmp_path / "first.safetensors")
    other = load_model(first)
    with torch.no_grad():
        next(other.head.parameters()).add_(0.1)
    second = save_model(other, tmp_path / "second.safetensors")
    values = config_dict(tmp_path, "charges", epochs=1, init_from=str(first))
    config = str(write_config(tmp_path, values))
    assert train_main([config]) == 0
    assert train_main([config, "--resume", "auto", "--epochs", "2"]) == 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert "the checkpoint continues that run" in log and "extending the finished run" in log
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["init_from"]["sha256"] == file_sha256(first)
    capsys.readouterr()
    assert train_main([config, "--resume", "auto", "--epochs", "3", "--init-from", str(second)]) == 2
    err = capsys.readouterr().err
    assert f"init_from.sha256 (checkpoint {file_sha256(first)[:12]}…, now {file_sha256(second)[:12]}…)" in err
    # a cold run's checkpoint does not become a warm start
    cold = config_dict(tmp_path / "cold", "charges", epochs=1)
    cold_config = str(write_config(tmp_path, cold, "cold.yaml"))
    assert train_main([cold_config]) == 0
    capsys.readouterr()
    assert train_main([cold_config, "--resume", "auto", "--epochs", "2", "--init-from", str(first)]) == 2
    assert "init_from.sha256 (checkpoint absent, now" in capsys.readouterr().err
