"""emlip.dataset node: extxyz round trip, attributes, strictness, verdi data commands."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import molecule

from aiida_emlip import schema


def _frames():
    frames = []
    for i, charge in enumerate((0.0, -1.0)):
        atoms = molecule("H2O")
        atoms.center(vacuum=3.0)
        atoms.pbc = True
        atoms.info.update(
            {
                schema.ENERGY: -466.1 - i,
                schema.STRESS: np.diag([0.1, 0.2, 0.3]),
                schema.DIPOLE: np.array([0.0, 0.0, 0.38]),
                schema.TOTAL_CHARGE: charge,
                schema.TOTAL_SPIN: 0.0,
                schema.FERMI_LEVEL: -5.5,
                schema.FERMI_REFERENCE: "cell_average",
                schema.EXTERNAL_FIELD: np.array([0.0, 0.0, 0.1]),
                schema.CONFIG_TYPE: "water",
                "seed": 3,
            }
        )
        atoms.arrays[schema.FORCES] = np.arange(9.0).reshape(3, 3) * 0.1
        atoms.arrays[schema.CHARGES] = np.array([-0.8, 0.4, 0.4])
        frames.append(atoms)
    return frames


def test_round_trip_and_attributes(aiida_profile, tmp_path):
    from aiida import orm

    from aiida_emlip.data import EmlipDatasetData

    node = EmlipDatasetData.from_ase(_frames(), dft_settings={"ecutwfc": 30}).store()
    loaded = orm.load_node(node.pk)
    assert loaded.n_configurations == 2
    assert loaded.elements == ["H", "O"]
    assert loaded.total_charges == [-1.0, 0.0]
    assert {"energy", "forces", "stress", "ref_charges", "fermi_level", "total_charge"} <= set(
        loaded.label_keys
    )
    attrs = loaded.base.attributes.all
    assert attrs["units"]["forces"] == "eV/Å" and attrs["dft_settings_digest"]
    assert attrs["config_types"] == {"water": 2}
    frames = loaded.to_ase()
    ref = _frames()
    for got, want in zip(frames, ref):
        assert got.calc is None
        assert got.info["energy"] == pytest.approx(want.info["energy"])
        assert np.allclose(got.arrays["forces"], want.arrays["forces"])
        assert np.allclose(got.info["stress"], want.info["stress"]) and got.info["stress"].shape == (3, 3)
        assert np.allclose(got.info["dipole"], want.info["dipole"])
        assert got.info["total_charge"] == want.info["total_charge"]
        assert got.info["fermi_reference"] == "cell_average"
        assert np.allclose(got.positions, want.positions)
    path = loaded.export(tmp_path / "out.extxyz")
    again = EmlipDatasetData.from_extxyz(path)
    assert again.get_text() == loaded.get_text()
    assert again.base.attributes.get("sha256") == attrs["sha256"]


def test_strict_keys_and_shapes(aiida_profile):
    from aiida_emlip.data import EmlipDatasetData

    frames = _frames()
    frames[0].info["mystery"] = 1.0
    with pytest.raises(ValueError, match="unknown info key 'mystery'"):
        EmlipDatasetData.from_ase(frames)
    assert EmlipDatasetData.from_ase(frames, strict=False).n_configurations == 2
    frames = _frames()
    frames[1].info[schema.FERMI_REFERENCE] = "somewhere"
    with pytest.raises(ValueError, match="fermi_reference"):
        EmlipDatasetData.from_ase(frames)


@pytest.mark.parametrize(
    ("where", "key", "value", "message"),
    [
        ("info", schema.ENERGY, float("nan"), "configuration 1: energy contains NaN or inf"),
        ("info", schema.STRESS, np.full((3, 3), np.inf), "stress contains NaN or inf"),
        ("info", schema.TOTAL_CHARGE, "plus_one", "total_charge must be numeric, got 'plus_one'"),
        ("arrays", schema.FORCES, np.full((3, 3), np.nan), "forces contains NaN or inf"),
        # forces in meV/Å: eV/Å × 1000
        ("arrays", schema.FORCES, np.arange(9.0).reshape(3, 3) * 100.0, "wrong units"),
        ("arrays", schema.CHARGES, np.array([np.nan, 0.4, 0.4]), "ref_charges contains NaN"),
    ],
)
def test_non_finite_non_numeric_and_implausible_labels_are_refused(aiida_profile, where, key, value, message):
    """The node refuses labels the trainer would refuse anyway: nothing is stored."""
    from aiida_emlip.data import EmlipDatasetData

    frames = _frames()
    getattr(frames[1], where)[key] = value
    for strict in (True, False):
        with pytest.raises(ValueError, match=message):
            EmlipDatasetData.from_ase(frames, strict=strict)


def test_a_models_non_finite_prediction_is_stored_as_it_is(aiida_profile):
    """emlip-eval's output (marked with model_sha256) keeps a NaN: emlip.evaluate flags it with 320."""
    from aiida_emlip.data import EmlipDatasetData

    frames = _frames()
    frames[1].info.update({schema.ENERGY: float("nan"), "model_sha256": "0" * 64})
    frames[1].arrays[schema.FORCES] = np.full((3, 3), 500.0)
    (_, predicted) = EmlipDatasetData.from_ase(frames).to_ase()
    assert np.isnan(predicted.info[schema.ENERGY]) and predicted.arrays[schema.FORCES].max() == 500.0


def test_calculator_labels_are_moved_to_schema_keys(aiida_profile):
    from ase.calculators.singlepoint import SinglePointCalculator

    from aiida_emlip.data import EmlipDatasetData

    atoms = molecule("H2O")
    atoms.center(vacuum=3.0)
    atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.ones((3, 3)))
    (frame,) = EmlipDatasetData.from_ase([atoms]).to_ase()
    assert frame.info["energy"] == -1.0 and np.allclose(frame.arrays["forces"], 1.0)


def test_verdi_data_commands(aiida_profile, tmp_path):
    from aiida.cmdline.commands.cmd_data import verdi_data
    from click.testing import CliRunner

    from aiida_emlip.data import EmlipDatasetData

    node = EmlipDatasetData.from_ase(_frames()).store()
    runner = CliRunner()
    result = runner.invoke(verdi_data, ["emlip.dataset", "list"], catch_exceptions=False)
    assert result.exit_code == 0 and str(node.pk) in result.output
    result = runner.invoke(verdi_data, ["emlip.dataset", "show", str(node.pk)], catch_exceptions=False)
    assert '"n_configurations": 2' in result.output
    out = tmp_path / "x.extxyz"
    result = runner.invoke(
        verdi_data, ["emlip.dataset", "export", str(node.pk), str(out)], catch_exceptions=False
    )
    assert result.exit_code == 0 and out.read_text() == node.get_text()


def test_verdi_data_export_never_replaces_a_file_silently(aiida_profile, tmp_path):
    """An existing PATH is refused without --overwrite; a folder that does not exist is one line, exit 1."""
    from aiida.cmdline.commands.cmd_data import verdi_data
    from click.testing import CliRunner

    from aiida_emlip.data import EmlipDatasetData

    node = EmlipDatasetData.from_ase(_frames()).store()
    runner = CliRunner()
    labels = tmp_path / "reference.xyz"
    labels.write_text("the user's reference labels")
    result = runner.invoke(verdi_data, ["emlip.dataset", "export", str(node.pk), str(labels)])
    assert result.exit_code == 1 and "already exists; use --overwrite" in result.output
    assert labels.read_text() == "the user's reference labels"
    result = runner.invoke(verdi_data, ["emlip.dataset", "export", str(node.pk), str(labels), "--overwrite"])
    assert result.exit_code == 0 and labels.read_text() == node.get_text()
    missing = tmp_path / "no" / "such" / "folder.xyz"
    result = runner.invoke(verdi_data, ["emlip.dataset", "export", str(node.pk), str(missing)])
    assert result.exit_code == 1 and result.exception is not None
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    assert f"cannot write {missing}: No such file or directory" in result.output
    assert not list(tmp_path.glob(".*.tmp"))
