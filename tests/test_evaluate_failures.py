"""``emlip-eval`` on broken inputs: model files, NaN predictions, overlapping atoms; no dipole of ``sr``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import safetensors.torch
import torch
from ase import Atoms
from evaluate_helpers import charged_cluster, nacl_cell, save_tiny_model, water, write_structures

from aiida_emlip.models.file_format import CHECKSUM_KEY, parse_header
from aiida_emlip.models.io import load_model, save_model
from aiida_emlip.training.cli import eval_main
from aiida_emlip.training.errors import ExitCode

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("models")
    return {head: save_tiny_model(directory, head) for head in ("charges", "sr")}


def _cli(*args: str | Path) -> subprocess.CompletedProcess:
    """``python -m aiida_emlip.training.cli eval ...`` as a user runs it (stderr as the user sees it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "aiida_emlip.training.cli", "eval", *map(str, args), "--device", "cpu"]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


# ------------------------------------------------------------------------------- model files


def _broken_files(model: Path, directory: Path) -> dict[str, Path]:
    blob = model.read_bytes()
    header = parse_header(blob, len(blob), str(model))
    flipped = bytearray(blob)
    flipped[(header.data_start + header.data_end) // 2] ^= 0x10
    files = {
        "corrupted": flipped,
        "truncated": blob[: header.data_end - 100],
        "not a safetensors model": b"energy: -1.0\nforces: []\n",
    }
    paths = {}
    for message, content in files.items():
        paths[message] = directory / f"{message.replace(' ', '_')}.safetensors"
        paths[message].write_bytes(bytes(content))
    return paths


def test_broken_model_file_is_one_line_and_exit_2(models, tmp_path):
    data = write_structures(tmp_path / "s.xyz", [water()])
    out = tmp_path / "p.xyz"
    for message, path in _broken_files(models["charges"], tmp_path).items():
        result = _cli(path, data, "-o", out)
        assert result.returncode == ExitCode.BAD_INPUT, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert message in lines[0] and str(path) in lines[0]
        assert "Traceback" not in result.stderr and "weights_only" not in result.stderr
        assert not out.exists()


def test_model_file_without_checksum_warns_and_evaluates(models, tmp_path, capsys):
    path = tmp_path / "old.safetensors"
    blob = models["sr"].read_bytes()
    metadata = dict(parse_header(blob, len(blob), "model").metadata)
    del metadata[CHECKSUM_KEY]
    tensors = safetensors.torch.load_file(str(models["sr"]))
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    data = write_structures(tmp_path / "s.xyz", [water()])
    assert eval_main([str(path), str(data), "-o", str(tmp_path / "p.xyz"), "--device", "cpu"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "no checksum" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")


# ------------------------------------------------------------------------------- NaN predictions


def _nan_energy_model(directory: Path) -> Path:
    """An ``sr`` model whose reference energies are NaN: energies NaN, forces and stress finite."""
    path = save_tiny_model(directory, "sr")
    model = load_model(path)
    with torch.no_grad():
        model.reference_energies.fill_(float("nan"))
    return save_model(model, path)


def test_non_finite_prediction_names_structure_and_quantity(tmp_path, capsys):
    model = _nan_energy_model(tmp_path)
    data = write_structures(tmp_path / "s.xyz", [water(), nacl_cell()])
    out = tmp_path / "p.xyz"
    status = eval_main([str(model), str(data), "-o", str(out), "--device", "cpu"])
    assert status == ExitCode.NON_FINITE
    err = capsys.readouterr().err
    assert "structure 0: energy; structure 1: energy;" in err and "forces" not in err
    summary = json.loads(out.with_name("p_summary.json").read_text())
    assert [row["non_finite"] for row in summary["structures"]] == [["energy"], ["energy"]]
    assert len(ase.io.read(out, ":")) == 2  # every result is still written


def test_non_finite_in_a_relaxation_exit_3(tmp_path, capsys):
    model = _nan_energy_model(tmp_path)
    data = write_structures(tmp_path / "s.xyz", [charged_cluster()])
    out = tmp_path / "r.xyz"
    status = eval_main([str(model), str(data), "-o", str(out), "--device", "cpu", "--mode", "relax"])
    assert status == ExitCode.NON_FINITE
    assert "structure 0: energy" in capsys.readouterr().err
    row = json.loads(out.with_name("r_summary.json").read_text())["structures"][0]
    assert row["finite"] is False and row["relax"]["converged"] is False
    assert "non-finite (NaN or inf) energy" in row["stop_reason"]


# ------------------------------------------------------------------------------- overlapping atoms


def test_overlapping_atoms_exit_2_with_the_structure_index(models, tmp_path, capsys):
    crowded = water()
    crowded += Atoms("H", positions=[crowded.positions[0] + [0.0, 0.0, 0.3]])
    across = nacl_cell()  # two atoms 0.2 Å apart only through the periodic boundary (minimum image)
    across.positions[1] = across.positions[0] + [across.cell[0, 0] - 0.2, 0.0, 0.0]
    for frames, index in (([water(), charged_cluster(), crowded], 2), ([across], 0)):
        data = write_structures(tmp_path / "s.xyz", frames)
        out = tmp_path / "p.xyz"
        assert eval_main([str(models["charges"]), str(data), "-o", str(out)]) == ExitCode.BAD_INPUT
        err = capsys.readouterr().err
        assert f"structure {index}: overlapping atoms" in err and "Å apart" in err, err
        assert not out.exists()


# ------------------------------------------------------------------------------- dipole of sr


def test_no_dipole_error_row_for_a_head_without_dipole(models, tmp_path, capsys):
    frames = []
    for atoms in (water(), charged_cluster()):
        atoms = atoms.copy()
        atoms.info["energy"] = -10.0
        atoms.arrays["forces"] = np.zeros((len(atoms), 3))
        atoms.info["dipole"] = np.array([0.1, -0.2, 0.3])
        frames.append(atoms)
    data = write_structures(tmp_path / "labelled.xyz", frames)
    tables = {}
    for head in ("sr", "charges"):
        out, errors = tmp_path / f"{head}.xyz", tmp_path / f"{head}_errors.json"
        args = [str(models[head]), str(data), "-o", str(out), "--errors", str(errors), "--device", "cpu"]
        assert eval_main(args) == 0
        printed = capsys.readouterr().out
        rows = [line.split()[0] for line in printed.splitlines() if line.startswith(("energy", "dipole"))]
        tables[head] = (set(rows), set(json.loads(errors.read_text())))
        predicted = ase.io.read(out, ":")
        assert ("emlip_dipole" in predicted[0].info) == (head == "charges")
    assert tables["sr"] == ({"energy"}, {"energy", "forces"})
    assert "dipole" in tables["charges"][0] and "dipole" in tables["charges"][1]


def test_exit_status_file_is_written_by_emlip_eval(models, tmp_path):
    """The status a batch job reads: written by emlip-eval itself, for a refusal and for a success."""
    data = write_structures(tmp_path / "s.xyz", [water()])
    status = tmp_path / "exit_status"
    status.write_text("99\n")  # a stale status of an earlier attempt must not survive
    broken = _broken_files(models["charges"], tmp_path)["truncated"]
    result = _cli(broken, data, "-o", tmp_path / "p.xyz", "--exit-status-file", status)
    assert result.returncode == ExitCode.BAD_INPUT and status.read_text() == "2\n"
    result = _cli(models["charges"], data, "-o", tmp_path / "q.xyz", "--exit-status-file", status)
    assert result.returncode == 0, result.stderr
    assert status.read_text() == "0\n"
