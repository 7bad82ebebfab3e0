"""The backbone's last-layer layout: l = 1 outputs only for heads that read them, recorded in the model
config; files written before the key existed load with the layout their weights have."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models_helpers import ELEMENTS, evaluate, nacl_cell, water_cluster
from scipy.spatial.transform import Rotation
from training_helpers import config_dict, write_config

from aiida_emlip.models.file_format import read_metadata
from aiida_emlip.models.file_layout import explicit_layout, state_shapes
from aiida_emlip.models.graph import build_graph
from aiida_emlip.models.io import _serialise, load_model, save_model, versions
from aiida_emlip.models.model import EmlipModel, ModelConfig
from aiida_emlip.training.cli import train_main

#: The MACE size of bench/bench_training.py, whose mace_run_train model has 46,560 parameters.
BENCH = {
    "num_channels": 16,
    "max_L": 1,
    "correlation": 3,
    "num_interactions": 2,
    "r_max": 5.0,
    "mlp_hidden": 16,
}
#: A small backbone whose last layer can keep l = 1 features (two layers, max_L = 1).
SMALL = {
    "num_channels": 4,
    "num_interactions": 2,
    "correlation": 2,
    "max_ell": 2,
    "r_max": 4.0,
    "mlp_hidden": 4,
}
DIPOLES = {"name": "charges", "dipoles": True}


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_backbone_has_the_parameters_of_bare_mace():
    """sr and the dipole heads build MACE's default last layer (46,560 parameters at the bench size, as
    mace_run_train); keeping l = 1 outputs there (the earlier layout) costs 4,992 more."""
    sr = EmlipModel(ModelConfig(elements=ELEMENTS, head={"name": "sr"}, backbone=dict(BENCH)))
    assert sr.config.backbone["last_layer_vectors"] is False
    assert _count(sr) == 46_560
    old = EmlipModel(
        ModelConfig(elements=ELEMENTS, head={"name": "sr"}, backbone={**BENCH, "last_layer_vectors": True})
    )
    assert _count(old) == 51_552
    dipoles = EmlipModel(ModelConfig(elements=ELEMENTS, head=DIPOLES, backbone=dict(BENCH)))
    assert _count(dipoles.backbone) == 46_560
    explicit = {**BENCH, "last_layer_vectors": True}
    earlier = EmlipModel(ModelConfig(elements=ELEMENTS, head=DIPOLES, backbone=explicit))
    assert _count(earlier.backbone) == 51_552


@pytest.mark.parametrize(
    ("head", "value"),
    [
        ({"name": "sr"}, None),
        ({"name": "qeq"}, None),
        (DIPOLES, None),
        ({"name": "split", "formal_charges": {"Na": 1.0, "Cl": -1.0}, "dipoles": True}, None),
        (DIPOLES, True),
        ({"name": "sr"}, True),
    ],
)
def test_layout_is_resolved_and_recorded(tmp_path, head, value):
    """Left out, the layout is false for every head; either way it is written into the file."""
    backbone = dict(SMALL) if value is None else {**SMALL, "last_layer_vectors": value}
    config = ModelConfig(elements=ELEMENTS, head=head, backbone=backbone)
    expected = bool(value)
    assert config.backbone["last_layer_vectors"] is expected
    assert ("last_layer_vectors" in backbone) is (value is not None)  # the caller's mapping is left alone
    model = EmlipModel(config)
    # the l = 1 channels of both layers, or of the first only
    assert model.backbone.num_vectors == 4 * (2 if expected else 1)
    path = save_model(model, tmp_path / "m.safetensors")
    assert read_metadata(path)["config"]["backbone"]["last_layer_vectors"] is expected


def test_dipole_heads_read_last_layer_vectors_when_asked():
    """The earlier layout: the dipole readout reads the l = 1 channels of both layers."""
    torch.manual_seed(2)
    backbone = {**SMALL, "last_layer_vectors": True}
    model = EmlipModel(ModelConfig(elements=ELEMENTS, head=DIPOLES, backbone=backbone))
    atoms = water_cluster()
    out = evaluate(model, atoms)
    assert float(out["dipoles"].abs().max()) > 1e-6
    graph = build_graph([atoms], model.cutoff, model.dtype)
    vectors = model.backbone(graph, graph.positions, graph.cell).vectors.detach()
    assert vectors.shape == (len(atoms), 8, 3)
    assert float(vectors[:, 4:].abs().max()) > 1e-6  # the last layer's l = 1 channels are there


@pytest.mark.parametrize(
    ("head", "value", "message"),
    [
        ({"name": "sr"}, "yes", "backbone.last_layer_vectors must be true or false"),
        ({"name": "sr"}, 1, "backbone.last_layer_vectors must be true or false"),
    ],
)
def test_impossible_layouts_are_refused(head, value, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(elements=ELEMENTS, head=head, backbone={**SMALL, "last_layer_vectors": value})


@pytest.mark.parametrize("backbone", [{"num_interactions": 1}, {"max_L": 0}])
@pytest.mark.parametrize("value", [None, True, False])
def test_a_dipole_head_needs_l1_features_in_some_layer(backbone, value):
    """MACE's single layer has scalar outputs only, whatever the layout; max_L 0 none anywhere."""
    backbone = {**SMALL, **backbone} if value is None else {**SMALL, **backbone, "last_layer_vectors": value}
    with pytest.raises(ValueError, match="which this backbone has in no layer: it needs max_L 1 and two"):
        ModelConfig(elements=ELEMENTS, head=DIPOLES, backbone=backbone)


@pytest.mark.parametrize("head", [DIPOLES, {"name": "split", "formal_charges": {"Na": 1.0, "Cl": -1.0}}])
def test_dipole_readouts_of_the_earlier_layers_alone(tmp_path, head):
    """The default layout with a dipole head: the last layer is sr's (same parameters), the dipoles read
    the first layer's l = 1 features, rotate with the structure and survive a file."""
    torch.manual_seed(4)
    model = EmlipModel(ModelConfig(elements=ELEMENTS, head=head, backbone=dict(SMALL)))
    sr = EmlipModel(ModelConfig(elements=ELEMENTS, head={"name": "sr"}, backbone=dict(SMALL)))
    assert _count(model.backbone) == _count(sr.backbone)
    assert model.backbone.num_vectors == 4  # the first layer's l = 1 channels
    atoms = water_cluster()
    rotation = torch.tensor(Rotation.random(random_state=3).as_matrix())
    turned = atoms.copy()
    turned.positions = atoms.positions @ rotation.numpy().T
    out, out_turned = evaluate(model, atoms), evaluate(model, turned)
    assert float(out["dipoles"].abs().max()) > 1e-4
    torch.testing.assert_close(out_turned["dipoles"], out["dipoles"] @ rotation.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(out_turned["charges"], out["charges"], atol=1e-10, rtol=0)
    torch.testing.assert_close(out_turned["energy"], out["energy"], atol=1e-9, rtol=0)
    loaded = load_model(save_model(model, tmp_path / "early.safetensors"))
    assert loaded.config.backbone["last_layer_vectors"] is False
    again = evaluate(loaded, atoms)
    for key in ("energy", "forces", "charges", "dipoles"):
        assert torch.equal(again[key], out[key]), key


def _without_key(model: EmlipModel, path: Path) -> Path:
    """``model`` saved as a file written before ``backbone.last_layer_vectors`` existed (no key)."""
    config = model.config.to_dict()
    config["backbone"].pop("last_layer_vectors")
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": "aiida-emlip-model/1",
        "config": json.dumps(config),
        "versions": json.dumps(versions()),
        "extra": "{}",
    }
    path.write_bytes(_serialise(tensors, metadata, str(path)))
    return path


def _predictions(model: EmlipModel) -> dict[str, torch.Tensor]:
    out = evaluate(model, [nacl_cell(), water_cluster()])
    return {"energy": out["energy"], "forces": out["forces"], "stress": out["stress"][0]}  # [1]: a molecule


@pytest.mark.parametrize("old_layout", [True, False])
def test_files_without_the_key_load_with_the_layout_of_their_weights(tmp_path, old_layout):
    """sr files of both generations load and predict bit for bit as the model that wrote them."""
    torch.manual_seed(5)
    backbone = {**SMALL, "last_layer_vectors": old_layout}
    source = EmlipModel(ModelConfig(elements=ELEMENTS, head={"name": "sr"}, backbone=backbone))
    source.reference_energies.copy_(torch.tensor([-13.0, -430.0, -1290.0, -410.0], dtype=torch.float64))
    path = _without_key(source, tmp_path / "old.safetensors")
    assert "last_layer_vectors" not in read_metadata(path)["config"]["backbone"]
    loaded = load_model(path)
    assert loaded.config.backbone["last_layer_vectors"] is old_layout
    ours, theirs = _predictions(loaded), _predictions(source)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert float(ours["energy"].abs().max()) > 100  # reference energies included
    # the two layouts really differ in their weights (a model of the resolved layout could not hold them)
    resolved = EmlipModel(ModelConfig(elements=ELEMENTS, head={"name": "sr"}, backbone=dict(SMALL)))
    fits = state_shapes(resolved.state_dict()) == state_shapes(source.state_dict())
    assert fits is not old_layout
    # saved again, the file records its layout
    again = save_model(loaded, tmp_path / "again.safetensors")
    assert read_metadata(again)["config"]["backbone"]["last_layer_vectors"] is old_layout


def test_explicit_layout_keeps_the_random_state():
    torch.manual_seed(7)
    old = EmlipModel(
        ModelConfig(elements=ELEMENTS, head={"name": "sr"}, backbone={**SMALL, "last_layer_vectors": True})
    )
    config = old.config.to_dict()
    config["backbone"].pop("last_layer_vectors")
    state = torch.random.get_rng_state()
    resolved = explicit_layout(config, state_shapes(old.state_dict()))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert resolved["backbone"]["last_layer_vectors"] is True
    assert explicit_layout({"elements": ["H"], "head": {"name": "nohead"}}, {}) == {
        "elements": ["H"],
        "head": {"name": "nohead"},
    }


def _small_config(tmp_path: Path, head: str = "sr", **backbone) -> dict:
    values = config_dict(tmp_path, head, epochs=1)
    values["model"]["backbone"] = {**SMALL, **backbone}
    return values


def test_warm_start_from_an_old_layout_file_is_refused_unless_asked(tmp_path, capsys):
    torch.manual_seed(3)
    source = EmlipModel(
        ModelConfig(elements=ELEMENTS, head={"name": "sr"}, backbone={**SMALL, "last_layer_vectors": True})
    )
    old = _without_key(source, tmp_path / "old.safetensors")
    values = _small_config(tmp_path)
    values["init_from"] = str(old)
    assert train_main([str(write_config(tmp_path, values)), "--check"]) == 2
    err = capsys.readouterr().err
    assert "model.backbone.last_layer_vectors (init model True, config False)" in err
    assert "in 1 key(s)" in err and "model.backbone.last_layer_vectors: true keeps" in err
    values["model"]["backbone"]["last_layer_vectors"] = True
    assert train_main([str(write_config(tmp_path, values)), "--check"]) == 0
    # a file of the later generation (no key, no l = 1 last layer) warm-starts an sr run as it is
    torch.manual_seed(3)
    new = EmlipModel(ModelConfig(elements=ELEMENTS, head={"name": "sr"}, backbone=dict(SMALL)))
    values = _small_config(tmp_path)
    values["init_from"] = str(_without_key(new, tmp_path / "new.safetensors"))
    assert train_main([str(write_config(tmp_path, values)), "--check"]) == 0


def test_warm_start_from_a_dipole_model_of_the_earlier_layout(tmp_path, capsys):
    """A dipole head's file whose last layer keeps l = 1 outputs (recorded true) continues only with the
    key set true; the default layout is refused with the key named and the hint, before any compute."""
    torch.manual_seed(6)
    backbone = {**SMALL, "last_layer_vectors": True}
    earlier = EmlipModel(ModelConfig(elements=ELEMENTS, head=DIPOLES, backbone=backbone))
    path = save_model(earlier, tmp_path / "earlier.safetensors")
    values = _small_config(tmp_path, "charges")
    values["model"]["head"] = dict(DIPOLES)
    values["init_from"] = str(path)
    assert train_main([str(write_config(tmp_path, values)), "--check"]) == 2
    err = capsys.readouterr().err
    assert "model.backbone.last_layer_vectors (init model True, config False)" in err
    assert "model.backbone.last_layer_vectors: true keeps" in err
    values["model"]["backbone"]["last_layer_vectors"] = True
    assert train_main([str(write_config(tmp_path, values)), "--check"]) == 0
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("head", "value", "code", "message"),
    [
        ("sr", True, 0, "ok:"),
        ("sr", False, 0, "ok:"),
        ("sr", "true", 2, "backbone.last_layer_vectors must be true or false, got 'true'"),
        ("dipoles", False, 0, "ok:"),  # the first layer's l = 1 features
        ("dipoles, one layer", False, 2, "which this backbone has in no layer"),
        ("dipoles", True, 0, "ok:"),
    ],
)
def test_check_validates_the_layout_key(tmp_path, capsys, head, value, code, message):
    layers = {"num_interactions": 1} if head.endswith("one layer") else {}
    base = "charges" if head.startswith("dipoles") else head
    values = _small_config(tmp_path, base, last_layer_vectors=value, **layers)
    if head.startswith("dipoles"):
        values["model"]["head"] = dict(DIPOLES)
    assert train_main([str(write_config(tmp_path, values)), "--check"]) == code
    captured = capsys.readouterr()
    assert message in (captured.out if code == 0 else captured.err)
    assert not (tmp_path / "run").exists()
