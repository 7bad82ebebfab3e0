"""Model files are verified on every read (checksum, truncation, foreign files); NaN is never returned."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from ase.calculators.calculator import CalculationFailed
from models_helpers import HEAD_CONFIGS, evaluate, nacl_cell, tiny_model, water_cluster

from aiida_emlip.models.calculator import EmlipCalculator, NonFinitePredictionError
from aiida_emlip.models.file_format import CHECKSUM_KEY, ModelFileError, ModelFileWarning, parse_header
from aiida_emlip.models.io import load_model, read_metadata, save_model

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    return save_model(tiny_model(HEAD_CONFIGS["charges"], seed=1), path, extra={"note": "x"})


def _header(blob: bytes):
    return parse_header(blob, len(blob), "model")


def _refused(path: Path, match: str) -> str:
    """Both readers refuse ``path`` with a one-line :class:`ModelFileError` matching ``match``."""
    for read in (read_metadata, load_model):
        with pytest.raises(ModelFileError, match=match) as info:
            read(path)
        message = str(info.value)
        assert "\n" not in message and "weights_only" not in message
    return message


def test_checksum_is_stored_and_verified_without_warning(saved):
    header = _header(saved.read_bytes())
    assert len(header.metadata[CHECKSUM_KEY]) == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelFileWarning)  # an intact file loads without our warning
        loaded = load_model(saved)
    a, b = evaluate(tiny_model(HEAD_CONFIGS["charges"], seed=1), nacl_cell()), evaluate(loaded, nacl_cell())
    assert torch.equal(a["energy"], b["energy"])


def _flip(blob: bytes, where: str) -> bytearray:
    header = _header(blob)
    out = bytearray(blob)
    if where.startswith("weights"):
        span = header.data_end - header.data_start
        offset = {"weights-first": 0, "weights-middle": span // 2, "weights-last": span - 1}[where]
        out[header.data_start + offset] ^= 0x01
    elif where == "config":  # still valid JSON and a valid config: only the checksum can tell
        start = blob.index(b'\\"Cl\\"', 8, header.data_start)
        out[start + 2 : start + 4] = b"Cm"
    else:  # a digit of the stored checksum itself
        start = blob.index(header.metadata[CHECKSUM_KEY].encode())
        out[start] = ord("0") if out[start] != ord("0") else ord("1")
    return out


@pytest.mark.parametrize("where", ["weights-first", "weights-middle", "weights-last", "config", "checksum"])
def test_flipped_byte_is_refused(saved, tmp_path, where):
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(_flip(saved.read_bytes(), where))
    message = _refused(broken, "corrupted")
    assert "checksum" in message


def test_truncated_file_is_refused(saved, tmp_path):
    blob = saved.read_bytes()
    header = _header(blob)
    for size in (0, 5, 12, header.data_start - 3, header.data_start + 10, len(blob) - 1):
        cut = tmp_path / f"cut{size}.safetensors"
        cut.write_bytes(blob[:size])
        _refused(cut, "truncated" if size >= 9 else "not a safetensors model")


def test_foreign_files_are_refused(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("this is not a model\n")
    _refused(text, "not a safetensors model")
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    _refused(noise, "not a safetensors model")
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, str(other), metadata={"format": "pt"})
    _refused(other, "not an aiida-emlip-model/1 model")
    pickled = tmp_path / "checkpoint.pt"
    torch.save({"w": torch.zeros(3)}, pickled)
    _refused(pickled, "pickled checkpoints are refused")


def _legacy_file(model, path: Path) -> Path:
    """A file as aiida-emlip wrote them before checksums: same layout, no ``sha256`` entry."""
    saved = save_model(model, path)
    metadata = dict(_header(saved.read_bytes()).metadata)
    del metadata[CHECKSUM_KEY]
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def test_file_without_checksum_loads_with_a_warning(tmp_path):
    model = tiny_model(HEAD_CONFIGS["sr"], seed=2)
    path = _legacy_file(model, tmp_path / "old.safetensors")
    with pytest.warns(ModelFileWarning, match="no checksum"):
        loaded = load_model(path)
    assert torch.equal(evaluate(model, nacl_cell())["energy"], evaluate(loaded, nacl_cell())["energy"])


def test_interrupted_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_model(tiny_model(HEAD_CONFIGS["sr"]), path)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- NaN predictions


def _nan_model(head: str, where: str):
    model = tiny_model(HEAD_CONFIGS[head], seed=3)
    with torch.no_grad():
        if where == "reference_energies":
            model.reference_energies.fill_(float("nan"))
        else:
            for p in model.head.parameters():
                p.fill_(float("nan"))
    return model


def test_calculator_raises_instead_of_returning_nan():
    atoms = nacl_cell()
    atoms.calc = EmlipCalculator(_nan_model("sr", "reference_energies"), device="cpu")
    with pytest.raises(NonFinitePredictionError, match=r"non-finite \(NaN or inf\) energy for ") as info:
        atoms.get_potential_energy()
    assert isinstance(info.value, CalculationFailed) and info.value.quantities == ("energy",)
    assert atoms.calc.results == {}  # nothing cached: asking again raises again
    with pytest.raises(NonFinitePredictionError):
        atoms.get_forces()

    cluster = water_cluster()
    cluster.calc = EmlipCalculator(_nan_model("charges", "head"), device="cpu")
    with pytest.raises(NonFinitePredictionError) as info:
        cluster.get_forces()
    assert {"energy", "forces", "charges", "dipole"} <= set(info.value.quantities)
    assert "charges" in str(info.value)


# ------------------------------------------------------------------------------- emlip.model node


def test_model_node_refuses_a_corrupted_file(aiida_profile, saved, tmp_path):
    from aiida_emlip.data.model import EmlipModelData

    broken = tmp_path / "model.safetensors"
    broken.write_bytes(_flip(saved.read_bytes(), "weights-middle"))
    with pytest.raises(ValueError, match="corrupted: the checksum"):
        EmlipModelData(broken)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(saved.read_bytes()[:-7])
    with pytest.raises(ValueError, match="truncated"):
        EmlipModelData(truncated)
    node = EmlipModelData(saved).store()
    assert node.base.attributes.get("extra") == {"note": "x"}


def test_model_data_plugin_imports_without_torch():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    code = "import sys, aiida_emlip.data.model; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT, check=True
    )
    assert result.stdout.strip() == "False", result.stderr
