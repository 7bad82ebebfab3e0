"""Multipole supervision: automatic weights, direct SCF without μ, column mappings, fragment charges."""

from __future__ import annotations

import copy
import json

import ase.io
import numpy as np
import pytest
import torch
from training_helpers import BACKBONE, config_dict, teacher_dataset, write_config

from aiida_emlip import schema
from aiida_emlip.models.graph import build_graph
from aiida_emlip.models.model import EmlipModel, ModelConfig
from aiida_emlip.structures.fragments import long_range_set
from aiida_emlip.training.cli import train_main
from aiida_emlip.training.config import AUTO_MULTIPOLE_WEIGHTS, parse_config
from aiida_emlip.training.errors import ConfigError, DataError, ExitCode
from aiida_emlip.training.presets import CHARGE_WIDTHS, MULTIPOLE_WEIGHTS, PRESETS, preset_config
from aiida_emlip.training.trainer import Trainer

#: Charges of the teacher that labels the fragment data (sum to the fragment's charge).
TEACHER_CHARGES = {"Li": 1.0, "F": -1.0, "O": -0.8, "H": 0.4}


def _labelled_by(model: EmlipModel, frames: list, path) -> None:
    out = []
    for atoms in frames:
        pred = model(build_graph([atoms], model.cutoff), compute_stress=False)
        new = atoms.copy()
        new.info = {k: atoms.info[k] for k in (schema.TOTAL_CHARGE, schema.CONFIG_TYPE, "sampler_params")}
        new.info[schema.ENERGY] = float(pred["energy"][0].detach())
        new.arrays[schema.FORCES] = pred["forces"].detach().numpy()
        new.arrays[schema.CHARGES] = pred["charges"].detach().numpy()
        out.append(new)
    ase.io.write(path, out, format="extxyz")


@pytest.fixture(scope="module")
def fragment_data(tmp_path_factory):
    """Li⁺/F⁻ + water and a water pair at 2–9 Å, labelled by a fixed-charge teacher (charges known)."""
    torch.manual_seed(3)
    teacher = EmlipModel(
        ModelConfig(
            elements=["H", "Li", "O", "F"],
            head={"name": "fixed", "formal_charges": TEACHER_CHARGES},
            backbone=BACKBONE,
        )
    )
    path = tmp_path_factory.mktemp("fragments") / "fragments.xyz"
    _labelled_by(teacher, long_range_set(n_separations=6, orientations=2, seed=1), path)
    return path


def _config(tmp_path, data, head, epochs, **extra):
    values = config_dict(tmp_path, "sr", epochs=epochs)
    values["data"]["train"] = str(data)
    values["model"]["head"] = head
    values.update(extra)
    return parse_config(values)


def test_auto_multipole_weights(tmp_path, fragment_data):
    """Charge-bearing heads train on the data's charges unless told otherwise; latent/fixed/sr do not."""
    assert Trainer(_config(tmp_path, fragment_data, {"name": "charges"}, 1)).auto_weights == {
        "charges": AUTO_MULTIPOLE_WEIGHTS["charges"]
    }
    off = _config(tmp_path, fragment_data, {"name": "charges"}, 1, multipoles="off")
    assert Trainer(off).auto_weights == {}
    named = _config(tmp_path, fragment_data, {"name": "charges"}, 1, loss={"energy": 1.0, "charges": 0.0})
    assert Trainer(named).auto_weights == {}
    for head in ({"name": "latent"}, {"name": "sr"}, {"name": "fixed", "formal_charges": TEACHER_CHARGES}):
        assert Trainer(_config(tmp_path, fragment_data, head, 1)).auto_weights == {}, head
    metrics = Trainer(_config(tmp_path, fragment_data, {"name": "qeq"}, 1)).run()
    assert metrics["loss_weights"]["main"]["charges"] == AUTO_MULTIPOLE_WEIGHTS["charges"]
    assert "charges" in metrics["test"] and "total_charge=+1" in metrics["test"]["charges"]


def _fragment_charge_errors(model: EmlipModel, frames: list) -> np.ndarray:
    """|Σ q_model − Σ q_ref| over the first fragment of each frame."""
    errors = []
    for atoms in frames:
        n_first = json.loads(atoms.info["sampler_params"])["fragments"][0]
        pred = model(build_graph([atoms], model.cutoff), compute_forces=False, compute_stress=False)
        q = pred["charges"].detach().numpy()
        errors.append(abs(q[:n_first].sum() - atoms.arrays[schema.CHARGES][:n_first].sum()))
    return np.array(errors)


#: ``scf`` trains through its direct → implicit stages (several minutes): `make test-all` runs it.
@pytest.mark.parametrize("preset", ["charges", pytest.param("scf", marks=pytest.mark.slow)])
def test_student_recovers_fragment_charges(tmp_path, fragment_data, preset):
    """Teacher–student: with multipole supervision each fragment carries its charge on held-out data.

    ``qeq`` is left out on purpose: one electronegativity equalisation over the whole cell spreads the
    ion's charge onto the far water (its known failure), so it cannot pass this test.
    """
    from aiida_emlip.models.io import load_model

    values = preset_config(
        preset, labels={schema.CHARGES}, epochs=80, lr=0.03, backbone=BACKBONE, batch_size=6
    )
    values["data"].update(train=str(fragment_data), test_fraction=0.25, valid_fraction=0.1)
    values["output_dir"] = str(tmp_path / preset)
    trainer = Trainer(parse_config(values))
    trainer.run()
    model = load_model(tmp_path / preset / "model.safetensors")
    model.eval()
    held_out = [s.index for s in trainer.test]
    frames = ase.io.read(fragment_data, ":")
    errors = _fragment_charge_errors(model, [frames[i] for i in held_out])
    assert errors.max() < 0.1, errors


def test_direct_training_without_fermi_level(tmp_path):
    """Constant-Q scf trains in direct mode on data with charges but no Fermi level (μ from Σq = Q)."""
    data = teacher_dataset(tmp_path, "scf")
    frames = ase.io.read(data, ":")
    for atoms in frames:
        atoms.info.pop(schema.FERMI_LEVEL, None)
    ase.io.write(data, frames, format="extxyz")
    values = config_dict(tmp_path, "scf", stages=[{"name": "direct", "epochs": 2, "scf_mode": "direct"}])
    values["data"]["train"] = str(data)
    metrics = Trainer(parse_config(values)).run()
    rows = metrics["history"]
    assert len(rows) == 2 and rows[1]["valid_loss"] < rows[0]["valid_loss"]


def test_direct_label_checks_before_training(tmp_path, capsys):
    """--check refuses direct mode when a structure lacks charges, or a constant-μ head lacks μ."""
    data = teacher_dataset(tmp_path, "scf")
    frames = ase.io.read(data, ":")
    del frames[3].arrays[schema.CHARGES]
    partial = tmp_path / "partial.xyz"
    ase.io.write(partial, frames, format="extxyz")
    values = config_dict(tmp_path, "scf", stages=[{"name": "direct", "epochs": 2, "scf_mode": "direct"}])
    values["data"]["train"] = str(partial)
    assert train_main([str(write_config(tmp_path, values)), "--check"]) == ExitCode.BAD_INPUT
    assert "every training structure" in capsys.readouterr().err
    for atoms in frames:
        atoms.arrays[schema.CHARGES] = np.zeros(len(atoms))
        atoms.info.pop(schema.FERMI_LEVEL, None)
    ase.io.write(partial, frames, format="extxyz")
    values["model"]["head"] = {"name": "scf", "ensemble": "constant_mu"}
    with pytest.raises(DataError, match="constant-μ"):
        Trainer(parse_config(values))
    # in any mode: the head's μ is each structure's Fermi level, whether it trains direct or implicit
    values["stages"] = [{"name": "implicit", "epochs": 2, "scf_mode": "implicit"}]
    with pytest.raises(DataError, match=r"constant-μ head without the option fermi_level .* train split"):
        Trainer(parse_config(values))
    assert train_main([str(write_config(tmp_path, values)), "--check"]) == ExitCode.BAD_INPUT
    values["model"]["head"]["fermi_level"] = -4.0  # a fixed μ needs no label
    Trainer(parse_config(values))


def _multipole_fixture(path) -> list:
    """Molecules with a 9-column l ≤ 2 multipole array (charge; l = 1 in e3nn's y, z, x order; l = 2)."""
    from ase.build import molecule

    rng = np.random.default_rng(0)
    frames = []
    for name in ("H2O", "NH3", "CH4", "CO2"):
        atoms = molecule(name)
        atoms.center(vacuum=4.0)
        q = rng.normal(0.0, 0.4, len(atoms))
        q -= q.mean()
        p = rng.normal(0.0, 0.1, (len(atoms), 3))
        table = np.zeros((len(atoms), 9))
        table[:, 0] = q
        table[:, 1:4] = p[:, [1, 2, 0]]  # (y, z, x)
        table[:, 4:] = rng.normal(0.0, 0.05, (len(atoms), 5))
        atoms.arrays["REF_multipoles"] = table
        atoms.info["REF_dipole"] = (q[:, None] * atoms.positions).sum(0) + p.sum(0)
        atoms.info["REF_energy"] = 0.0
        atoms.arrays["REF_forces"] = np.zeros((len(atoms), 3))
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")
    return frames


@pytest.mark.parametrize("order, ok", [("yzx", True), ("e3nn", True), ("xyz", False)])
def test_multipole_column_mapping(tmp_path, order, ok):
    """Σ q r + Σ p from the mapped columns reproduces the file's total dipole only in the right order."""
    from aiida_emlip.training.data import load_samples

    path = tmp_path / "multipoles.xyz"
    _multipole_fixture(path)
    config = parse_config(
        {
            "data": {
                "train": str(path),
                "keys": {
                    "energy": "REF_energy",
                    "forces": "REF_forces",
                    "dipole": "REF_dipole",
                    "ref_charges": {"key": "REF_multipoles", "columns": 0},
                    "ref_dipoles": {"key": "REF_multipoles", "columns": [1, 2, 3], "order": order},
                },
            }
        }
    )
    samples = load_samples(path, config.data)
    for s in samples:
        q, p = s.labels[schema.CHARGES], s.labels[schema.ATOMIC_DIPOLES]
        total = (q[:, None] * s.atoms.positions).sum(0) + p.sum(0)
        assert np.allclose(total, s.labels[schema.DIPOLE], atol=1e-10) == ok


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"key": "REF_multipoles", "columns": [1, 2]}, "columns must list 3"),
        ({"key": "REF_multipoles", "columns": [1, 2, 3], "order": "zyx"}, "order must be one of"),
        ({"columns": [1, 2, 3]}, "needs 'key'"),
        ({"key": "m", "columns": [1, 2, 3], "unit": "au"}, "needs 'key'"),
    ],
)
def test_bad_column_mappings(tmp_path, mapping, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"data": {"train": "x.xyz", "keys": {"ref_dipoles": mapping}}})
    with pytest.raises(ConfigError, match="per-atom"):
        parse_config({"data": {"train": "x.xyz", "keys": {"energy": {"key": "m", "columns": 0}}}})


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_valid_configs(name):
    labels = {schema.CHARGES, schema.ATOMIC_DIPOLES}
    values = preset_config(name, labels=labels, epochs=9, elements=["H", "O", "Li"])
    parse_config({**copy.deepcopy(values), "data": {**values["data"], "train": "x.xyz"}})
    supervised = name not in ("sr", "fixed", "latent")
    assert ("charges" in values["loss"]) == supervised
    assert ("atomic_dipoles" in values["loss"]) == (name in ("charges", "split"))
    # induced dipoles: on by default where the long-range benchmark measured a gain in both the far
    # energy and the interaction (charges, split, scf), on request elsewhere, off on request
    assert values["model"].get("induction", {}).get("enabled", False) == (name in ("charges", "split", "scf"))
    assert preset_config(name, induction=True)["model"]["induction"] == {"enabled": True}
    assert "induction" not in preset_config(name, induction=False)["model"]
    if name == "scf":
        assert [s["scf_mode"] for s in values["stages"]] == ["direct", "implicit"]
        assert [s["scf_mode"] for s in preset_config("scf", epochs=9)["stages"]] == ["unrolled", "implicit"]
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("nonsense")


def test_preset_multipole_weights():
    """Each preset's multipole loss weights and charge width: the preset's own or the defaults, one
    weight throughout on request, or one weight per equal share of the epochs (a stage each)."""
    labels = {schema.CHARGES, schema.ATOMIC_DIPOLES}
    for name in PRESETS:
        values = preset_config(name, labels=labels, epochs=9)
        default = MULTIPOLE_WEIGHTS.get(name, (AUTO_MULTIPOLE_WEIGHTS["charges"],))[0]
        assert values["loss"].get("charges", default) == default
        assert values["loss"]["energy"] == 10.0 and values["loss"]["forces"] == 1.0
        width = values["model"].get("electrostatics", {}).get("sigma")
        assert width == CHARGE_WIDTHS.get(name)
    # split: multipole weight 1 and 2 Å Gaussians, measured on the long-range benchmark; the rest as before
    split = preset_config("split", labels=labels, epochs=9)
    assert (split["loss"]["charges"], split["loss"]["atomic_dipoles"]) == (1.0, 1.0)
    assert split["model"]["electrostatics"] == {"sigma": 2.0}
    assert preset_config("charges", labels=labels)["loss"]["charges"] == AUTO_MULTIPOLE_WEIGHTS["charges"]
    old = preset_config("split", labels=labels, multipole_weights=[10.0], charge_width=1.5)
    assert old["loss"]["charges"] == 10.0 and old["model"]["electrostatics"] == {"sigma": 1.5}
    one = preset_config("charges", labels=labels, epochs=9, multipole_weights=[1.0])
    assert (one["loss"]["charges"], one["loss"]["atomic_dipoles"]) == (1.0, 1.0)
    assert [s["epochs"] for s in one["stages"]] == [9]
    assert "charges" not in preset_config("sr", labels=labels, multipole_weights=[1.0])["loss"]
    values = preset_config("split", labels=labels, epochs=9, multipole_weights=(10, 1))
    stages = values["stages"]
    assert [s["epochs"] for s in stages] == [4, 5]
    assert [s["weights"] for s in stages] == [{"charges": w, "atomic_dipoles": w} for w in (10.0, 1.0)]
    config = parse_config({**copy.deepcopy(values), "data": {**values["data"], "train": "x.xyz"}})
    assert [config.weights_at_stage(i)["atomic_dipoles"] for i in range(2)] == [10.0, 1.0]
    # charge-only heads weight the charges alone
    qeq = preset_config("qeq", labels=labels, epochs=9, multipole_weights=(10, 1))["stages"]
    assert [s["weights"] for s in qeq] == [{"charges": 10.0}, {"charges": 1.0}]
    for bad, message in (([], "at least one"), ([-1.0], ">= 0")):
        with pytest.raises(ValueError, match=message):
            preset_config("split", labels=labels, multipole_weights=bad)
    with pytest.raises(ValueError, match="stages of its own"):
        preset_config("scf", labels=labels, multipole_weights=(10, 1))
