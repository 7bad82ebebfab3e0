"""``emlip.model`` nodes: a stored model round-trips bit for bit and is listed by verdi."""

from __future__ import annotations

import pytest
import torch
from models_helpers import HEAD_CONFIGS, evaluate, nacl_cell, tiny_model

from aiida_emlip.models.io import ModelFileError, save_model


def test_model_node_roundtrip(aiida_profile, tmp_path):
    from aiida.orm import load_node

    from aiida_emlip.data.model import EmlipModelData

    model = tiny_model(HEAD_CONFIGS["split"], seed=9)
    path = save_model(model, tmp_path / "m.safetensors", extra={"rmse_energy": 0.01})
    node = EmlipModelData(path).store()
    loaded = load_node(node.pk)
    assert loaded.head_name == "split"
    assert loaded.base.attributes.get("extra") == {"rmse_energy": 0.01}
    assert len(loaded.sha256) == 64
    a, b = evaluate(model, nacl_cell()), evaluate(loaded.load(), nacl_cell())
    assert torch.equal(a["energy"], b["energy"]) and torch.equal(a["forces"], b["forces"])


def test_model_node_refuses_pickles(aiida_profile, tmp_path):
    from aiida_emlip.data.model import EmlipModelData

    path = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ModelFileError, match="pickled"):
        EmlipModelData(path)


def test_verdi_data_emlip_model(aiida_profile, tmp_path):
    from aiida.cmdline.commands.cmd_data import verdi_data
    from click.testing import CliRunner

    from aiida_emlip.data.model import EmlipModelData

    node = EmlipModelData(save_model(tiny_model(HEAD_CONFIGS["sr"]), tmp_path / "a.safetensors")).store()
    runner = CliRunner()
    listed = runner.invoke(verdi_data, ["emlip.model", "list"])
    assert listed.exit_code == 0, listed.output
    assert str(node.pk) in listed.output and "sr" in listed.output
    shown = runner.invoke(verdi_data, ["emlip.model", "show", str(node.pk)])
    assert '"sha256"' in shown.output
    out = tmp_path / "exported.safetensors"
    exported = runner.invoke(verdi_data, ["emlip.model", "export", str(node.pk), str(out)])
    assert exported.exit_code == 0, exported.output
    assert out.read_bytes() == (tmp_path / "a.safetensors").read_bytes()


def test_verdi_data_emlip_refuses_a_node_of_another_type(aiida_profile, tmp_path):
    """A dataset PK given to ``emlip.model export`` (and vice versa) is a usage error, not "Success"."""
    from aiida import orm
    from aiida.cmdline.commands.cmd_data import verdi_data
    from ase import Atoms
    from click.testing import CliRunner

    from aiida_emlip.data import EmlipDatasetData
    from aiida_emlip.data.model import EmlipModelData

    dataset = EmlipDatasetData.from_ase([Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])]).store()
    model = EmlipModelData(save_model(tiny_model(HEAD_CONFIGS["sr"]), tmp_path / "m.safetensors")).store()
    number = orm.Int(3).store()
    runner = CliRunner()
    for group, wrong in (("emlip.model", dataset), ("emlip.model", number), ("emlip.dataset", model)):
        for command in ("export", "show"):
            out = tmp_path / f"{group}-{wrong.pk}.out"
            args = [group, command, str(wrong.pk)] + ([str(out)] if command == "export" else [])
            result = runner.invoke(verdi_data, args)
            assert result.exit_code == 2, result.output
            assert "Success" not in result.output and not out.exists()
            assert f"{wrong.pk}" in result.output and "Invalid value for 'DATUM'" in result.output


def test_verdi_data_emlip_model_export_keeps_an_existing_file(aiida_profile, tmp_path):
    """``emlip.model export`` onto an existing file: refused without --overwrite, the file unchanged."""
    from aiida.cmdline.commands.cmd_data import verdi_data
    from click.testing import CliRunner

    from aiida_emlip.data.model import EmlipModelData

    model = EmlipModelData(save_model(tiny_model(HEAD_CONFIGS["sr"]), tmp_path / "m.safetensors")).store()
    runner = CliRunner()
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"another model")
    result = runner.invoke(verdi_data, ["emlip.model", "export", str(model.pk), str(other)])
    assert result.exit_code == 1 and "already exists; use --overwrite" in result.output
    assert "Success" not in result.output and other.read_bytes() == b"another model"
    result = runner.invoke(verdi_data, ["emlip.model", "export", str(model.pk), str(other), "-o"])
    assert result.exit_code == 0 and other.read_bytes() == (tmp_path / "m.safetensors").read_bytes()
    result = runner.invoke(verdi_data, ["emlip.model", "export", str(model.pk), str(tmp_path / "x" / "m")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "cannot write" in result.output
