"""Bad inputs refused as a user meets them: the command lines in subprocesses, one ``error:`` line, exit 2.

The input of ``emlip-eval`` is never overwritten, whatever path names it; a non-numeric total charge
stops ``emlip-train``; a pickle payload given as a model file or a checkpoint is refused by every entry
point that loads one, and never unpickled (the payload would create a marker file).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from evaluate_helpers import save_tiny_model, water, write_structures
from training_helpers import DATA, config_dict, write_config

from aiida_emlip.training.errors import ExitCode

REPO_ROOT = Path(__file__).resolve().parent.parent


def _cli(command: str, *args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m aiida_emlip.training.cli train|eval ...`` with this checkout's code, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "aiida_emlip.training.cli", command, *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=600, check=False)


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """Exit 2 with exactly one line on stderr, ``error: ...``, and no traceback.

    One-line ``warning:`` notes may precede it (the tiny data leave reference energies underdetermined).
    """
    assert result.returncode == ExitCode.BAD_INPUT == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"), "sr")


# --------------------------------------------------------------------- emlip-eval -o INPUT


def test_eval_never_overwrites_its_input(model, tmp_path):
    data = write_structures(tmp_path / "s.xyz", [water()])
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.xyz").symlink_to(data)
    os.link(data, tmp_path / "hard.xyz")
    content = data.read_bytes()
    for output in (data, tmp_path / "sub" / ".." / "s.xyz", Path("s.xyz"), tmp_path / "link.xyz", "hard.xyz"):
        line = _one_error_line(_cli("eval", model, data, "-o", output, "--device", "cpu", cwd=tmp_path))
        assert f"output {output} is the input file" in line
        assert data.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.xyz", "link.xyz", "s.xyz", "sub"]


def test_eval_default_trajectory_never_overwrites_its_input(model, tmp_path):
    """``-o p.xyz`` writes ``p_traj.xyz`` beside it: that name may be the input's."""
    data = write_structures(tmp_path / "p_traj.xyz", [water()])
    content = data.read_bytes()
    result = _cli("eval", model, data, "-o", tmp_path / "p.xyz", "--mode", "md", "--steps", "2")
    assert "is the input file" in _one_error_line(result)
    assert data.read_bytes() == content and not (tmp_path / "p.xyz").exists()
    line = _one_error_line(_cli("eval", model, data, "-o", tmp_path / "q.xyz", "--summary", data))
    assert f"output {data} is the input file" in line
    single = _cli("eval", model, data, "-o", tmp_path / "p.xyz", "--device", "cpu")  # no trajectory
    assert single.returncode == 0, single.stderr
    assert data.read_bytes() == content and (tmp_path / "p.xyz").is_file()


# --------------------------------------------------------------------- emlip-train data


def test_train_non_numeric_total_charge(tmp_path):
    text = DATA.read_text()
    assert "total_charge=1.0" in text
    bad = tmp_path / "bad.xyz"
    bad.write_text(text.replace("total_charge=1.0", "total_charge=plus_one", 1))
    comments = [line for line in text.splitlines() if "Properties=" in line]
    index = next(i for i, line in enumerate(comments) if "total_charge=1.0" in line)
    values = config_dict(tmp_path, "charges", epochs=1)
    values["data"]["train"] = str(bad)
    line = _one_error_line(_cli("train", write_config(tmp_path, values)))
    assert f"{bad}, structure {index}: total_charge must be numeric, got 'plus_one'" in line
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "config.yaml").exists()


def _with_fermi_levels(path: Path, references: list[str]) -> Path:
    """The tiny data with a Fermi level on every structure, measured from ``references`` in turn."""
    import ase.io

    frames = ase.io.read(DATA, ":")
    for i, atoms in enumerate(frames):
        atoms.info["fermi_level"] = -4.0 - 0.1 * i
        atoms.info["fermi_reference"] = references[i % len(references)]
    ase.io.write(path, frames, format="extxyz")
    return path


def test_train_refuses_fermi_levels_of_different_references(tmp_path):
    """A run that trains on μ refuses data whose Fermi levels have different references; a run that
    does not use them (no fermi_level weight) trains on the same data."""
    mixed = _with_fermi_levels(tmp_path / "mixed.xyz", ["cell_average", "vacuum"])
    values = config_dict(tmp_path, "qeq", epochs=1)
    values["data"]["train"] = str(mixed)
    values["loss"] = {"energy": 1.0, "forces": 10.0, "fermi_level": 1.0}
    line = _one_error_line(_cli("train", write_config(tmp_path, values), "--check"))
    assert "mix Fermi levels measured from different references: cell_average (11 structure(s)), " in line
    assert "vacuum (11 structure(s))" in line
    one = _with_fermi_levels(tmp_path / "one.xyz", ["vacuum"])
    values["data"]["train"] = str(one)
    assert _cli("train", write_config(tmp_path, values), "--check").returncode == 0
    values["data"]["train"] = str(mixed)
    values["loss"] = {"energy": 1.0, "forces": 10.0}
    assert _cli("train", write_config(tmp_path, values), "--check").returncode == 0


def test_train_warns_when_no_structure_has_a_total_charge(tmp_path):
    """A charge-aware head on data without any total_charge: a one-line warning, then it trains on
    neutral structures (silent before); an sr head is not warned."""
    bare = tmp_path / "bare.xyz"
    lines = DATA.read_text().splitlines()
    bare.write_text(
        "\n".join(" ".join(w for w in ln.split(" ") if not w.startswith("total_charge=")) for ln in lines)
    )
    for head, warned in (("charges", True), ("sr", False)):
        values = config_dict(tmp_path, head, epochs=1)
        values["data"]["train"] = str(bare)
        result = _cli("train", write_config(tmp_path, values), "--check")
        assert result.returncode == 0, result.stderr
        warning = (
            "warning: no structure of the data has a total charge (looked for 'total_charge' in atoms.info"
        )
        assert (warning in result.stderr) is warned, result.stderr
        if warned:
            assert f"the '{head}' head takes every structure as neutral" in result.stderr


def test_train_warns_when_a_weighted_fermi_level_is_in_no_structure(tmp_path):
    """A fermi_level loss weight on data without Fermi levels: that term is zero, and a one-line warning
    says so (silent before); with Fermi levels in the data, no warning."""
    values = config_dict(tmp_path, "qeq", epochs=1)
    values["loss"] = {"energy": 1.0, "forces": 10.0, "fermi_level": 1.0}
    warning = "warning: the loss weights fermi_level but no training structure has a Fermi level"
    result = _cli("train", write_config(tmp_path, values), "--check")
    assert result.returncode == 0 and warning in result.stderr, result.stderr
    values["data"]["train"] = str(_with_fermi_levels(tmp_path / "one.xyz", ["vacuum"]))
    result = _cli("train", write_config(tmp_path, values), "--check")
    assert result.returncode == 0 and warning not in result.stderr, result.stderr


# --------------------------------------------------------------------- pickle payloads


class _Payload:
    """Unpickling this creates the file ``marker``: proof that a loader ran the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _payloads(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    marker = tmp_path / "UNPICKLED"
    content = {"format": "aiida-emlip-checkpoint/2", "model": _Payload(marker)}
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(content))
    zipped = tmp_path / "zipped.pt"
    torch.save(content, zipped)  # torch's own zip layout around the same pickle
    return marker, {"raw": raw, "zipped": zipped}


def test_pickle_payload_is_refused_by_emlip_eval(tmp_path):
    marker, files = _payloads(tmp_path)
    data = write_structures(tmp_path / "s.xyz", [water()])
    for path in files.values():
        line = _one_error_line(_cli("eval", path, data, "-o", tmp_path / "p.xyz", "--device", "cpu"))
        assert f"{path} is not a safetensors model file (pickled checkpoints are refused" in line
    assert not marker.exists() and not (tmp_path / "p.xyz").exists()


def test_pickle_payload_is_refused_by_emlip_train_resume(tmp_path):
    marker, files = _payloads(tmp_path)
    config = write_config(tmp_path, config_dict(tmp_path, "sr", epochs=1))
    line = _one_error_line(_cli("train", config, "--resume", files["zipped"]))
    assert "is not an aiida-emlip checkpoint: it holds the Python object io.open" in line
    assert "unpickling can run code (refused)" in line
    line = _one_error_line(_cli("train", config, "--resume", files["raw"]))
    assert f"checkpoint {files['raw']} is truncated, corrupt or not an aiida-emlip checkpoint" in line
    assert not marker.exists() and not (tmp_path / "run" / "model.safetensors").exists()


def test_pickle_payload_is_refused_by_the_model_node_and_the_calculator(aiida_profile, tmp_path):
    from aiida_emlip.data.model import EmlipModelData
    from aiida_emlip.models.calculator import EmlipCalculator
    from aiida_emlip.models.file_format import ModelFileError

    marker, files = _payloads(tmp_path)
    for path in files.values():
        for load in (EmlipModelData, EmlipCalculator):
            with pytest.raises(ModelFileError, match="pickled checkpoints are refused: they can run code"):
                load(path)
    assert not marker.exists()
