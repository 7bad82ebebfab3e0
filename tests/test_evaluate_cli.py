"""``emlip-eval`` modes on CPU: single points against the ASE calculator, relaxation, MD, SCF flags."""

from __future__ import annotations

import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.filters import FrechetCellFilter
from evaluate_helpers import (
    charged_cluster,
    max_force,
    nacl_cell,
    save_tiny_model,
    slab,
    water,
    write_structures,
)

from aiida_emlip.models.calculator import EmlipCalculator
from aiida_emlip.training.cli import eval_main, eval_parameters, eval_parser
from aiida_emlip.training.errors import ConfigError, ExitCode
from aiida_emlip.training.eval_params import parse_parameters


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("models")
    return {head: save_tiny_model(directory, head) for head in ("charges", "sr", "scf-stuck")}


def _run(model: Path, data: Path, out: Path, *args: str) -> tuple[int, list, dict]:
    status = eval_main([str(model), str(data), "-o", str(out), "--device", "cpu", "--schema-keys", *args])
    frames = ase.io.read(out, ":") if out.exists() else []
    summary_path = out.with_name(out.stem + "_summary.json")
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return status, frames, summary


def _calc(model: Path) -> EmlipCalculator:
    return EmlipCalculator(model, device="cpu")


# ------------------------------------------------------------------------------- parameters


def test_parameters_defaults_and_messages():
    relax = parse_parameters({"mode": "relax", "optimizer": "bfgs", "constraints": {"z_max": 2.0}})
    assert relax.relax.optimizer == "BFGS" and relax.relax.fmax == 0.05 and relax.constraints.z_max == 2.0
    assert parse_parameters({}).mode == "single_point"
    md = parse_parameters({"mode": "md", "ensemble": "Langevin"}).to_dict()
    assert (
        md["ensemble"] == "langevin" and md["timestep_fs"] == 0.5 and md["constraints"]["fixed_indices"] == []
    )
    for values, message in (
        ({"mode": "dance"}, "mode"),
        ({"mode": "md", "fmax": 0.1}, "'fmax' applies to mode relax, not md"),
        ({"fmax": 0.1}, "applies to mode relax"),
        ({"mode": "relax", "colour": 1}, "unknown parameter 'colour'"),
        ({"mode": "relax", "fmax": -1}, "positive"),
        ({"mode": "relax", "max_steps": 2.5}, "integer"),
        ({"mode": "relax", "relax_cell": "yes"}, "true or false"),
        ({"mode": "relax", "optimizer": "LBFGS"}, "FIRE, BFGS"),
        ({"mode": "md", "ensemble": "npt"}, "nve, langevin"),
        ({"mode": "md", "ensemble": "langevin", "friction": 0}, "friction"),
        ({"mode": "md", "constraints": {"z_min": 3, "z_max": 1}}, "z_min"),
        ({"mode": "md", "constraints": {"fixed": [1]}}, "unknown key"),
        ({"device": "tpu"}, "auto, cpu, cuda"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_parameters(values)


def test_flags_override_the_parameter_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("mode: relax\nfmax: 0.1\nconstraints: {fixed_indices: [0]}\n")
    args = eval_parser().parse_args(["m", "d", "--params", str(path), "--fmax", "0.02", "--fix-z-max", "2"])
    values = eval_parameters(args)
    assert values == {"mode": "relax", "fmax": 0.02, "constraints": {"fixed_indices": [0], "z_max": 2.0}}
    params = parse_parameters(values)
    assert params.relax.fmax == 0.02 and params.constraints.fixed_indices == (0,)


def test_device_auto_picks_cuda_when_available(models, tmp_path):
    data = write_structures(tmp_path / "s.xyz", [water()])
    out = tmp_path / "p.xyz"
    assert eval_main([str(models["sr"]), str(data), "-o", str(out)]) == 0
    summary = json.loads((tmp_path / "p_summary.json").read_text())
    assert summary["parameters"]["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------- single points


def test_single_point_equals_the_ase_calculator(models, tmp_path):
    frames = [nacl_cell(), charged_cluster(), water()]
    data = write_structures(tmp_path / "s.xyz", frames)
    status, predicted, summary = _run(models["charges"], data, tmp_path / "p.xyz")
    assert status == 0
    calc = _calc(models["charges"])
    for atoms, pred in zip(frames, predicted):
        atoms = atoms.copy()
        atoms.calc = calc
        assert pred.get_potential_energy() == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(pred.get_forces(), atoms.get_forces(), atol=1e-7)  # %.8f in extxyz
        np.testing.assert_allclose(pred.arrays["ref_charges"], calc.results["charges"], atol=1e-7)
        assert pred.arrays["ref_charges"].sum() == pytest.approx(
            atoms.info.get("total_charge", 0.0), abs=1e-8
        )
        assert pred.info["eval_mode"] == "single_point" and len(pred.info["model_sha256"]) == 64
        assert "scf_converged" not in pred.info  # the charges head is not iterative
    assert predicted[0].get_stress().shape == (6,)
    assert predicted[1].info["total_charge"] == 1.0 and predicted[1].info["config_type"] == "cluster"
    assert summary["n_structures"] == 3 and summary["timings"]["total_s"] > 0
    assert [row["energy"] for row in summary["structures"]] == pytest.approx(
        [p.get_potential_energy() for p in predicted]
    )


def test_single_point_default_keys_keep_the_old_layout(models, tmp_path):
    data = write_structures(tmp_path / "s.xyz", [charged_cluster()])
    out = tmp_path / "p.xyz"
    assert eval_main([str(models["charges"]), str(data), "-o", str(out), "--device", "cpu"]) == 0
    (atoms,) = ase.io.read(out, ":")
    assert {"emlip_energy", "emlip_dipole", "eval_mode"} <= set(atoms.info)
    assert atoms.arrays["emlip_forces"].shape == (4, 3)


# ------------------------------------------------------------------------------- relaxation


def test_relax_lowers_the_energy_and_reaches_fmax(models, tmp_path):
    frames = [charged_cluster(), nacl_cell()]
    data = write_structures(tmp_path / "s.xyz", frames)
    calc = _calc(models["charges"])
    initial = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calc
        initial.append(atoms.get_potential_energy())
    args = ("--mode", "relax", "--fmax", "0.05", "--max-steps", "300", "--trajectory-stride", "5")
    status, relaxed, summary = _run(models["charges"], data, tmp_path / "r.xyz", *args)
    assert status == 0, summary
    for before, atoms, row in zip(initial, relaxed, summary["structures"]):
        assert atoms.info["relax_converged"] is True and atoms.info["relax_steps"] == row["relax"]["steps"]
        assert atoms.get_potential_energy() < before - 1e-4
        assert max_force(atoms.get_forces()) < 0.05
        fresh = atoms.copy()
        fresh.calc = calc
        assert max_force(fresh.get_forces()) < 0.05
    trajectory = ase.io.read(tmp_path / "r_traj.xyz", ":")
    first = [t for t in trajectory if t.info["structure_index"] == 0]
    assert (
        first[0].info["relax_steps"] == 0
        and first[-1].info["relax_steps"] == summary["structures"][0]["relax"]["steps"]
    )
    assert first[-1].get_potential_energy() <= first[0].get_potential_energy()


def test_relax_cell_with_bfgs(models, tmp_path):
    data = write_structures(tmp_path / "s.xyz", [nacl_cell()])
    args = ("--mode", "relax", "--optimizer", "BFGS", "--relax-cell", "--fmax", "0.05", "--max-steps", "200")
    status, (atoms,), summary = _run(models["charges"], data, tmp_path / "r.xyz", *args)
    assert status == 0, summary
    assert not np.allclose(atoms.cell.array, nacl_cell().cell.array)  # the cell moved
    fresh = atoms.copy()
    fresh.calc = _calc(models["charges"])
    assert max_force(FrechetCellFilter(fresh).get_forces()) < 0.05  # atoms and cell (virial / N)
    assert np.abs(fresh.get_stress()).max() * fresh.get_volume() / len(fresh) < 0.05


def test_fixed_atoms_do_not_move_in_relax_and_md(models, tmp_path):
    data = write_structures(tmp_path / "s.xyz", [slab()])
    source = ase.io.read(data)  # positions as written (8 decimals), to compare exactly
    bottom = [i for i, z in enumerate(source.positions[:, 2]) if z <= 2.0]
    fixed = sorted({*bottom, 5})
    assert 0 < len(bottom) < len(source)
    for mode, args in (
        ("relax", ("--fmax", "0.05", "--max-steps", "60", "--trajectory-stride", "10")),
        ("md", ("--steps", "20", "--trajectory-stride", "5", "--temperature-K", "600")),
    ):
        out = tmp_path / f"{mode}.xyz"
        status, (final,), summary = _run(
            models["charges"], data, out, "--mode", mode, "--fix-z-max", "2.0", "--fix-indices", "5", *args
        )
        assert status in (0, ExitCode.NOT_CONVERGED), summary
        row = summary["structures"][0]
        assert row[mode]["fixed_atoms"] == len(fixed)
        frames = [final, *ase.io.read(out.with_name(f"{mode}_traj.xyz"), ":")]
        for frame in frames:
            np.testing.assert_array_equal(frame.positions[fixed], source.positions[fixed])
        free = [i for i in range(len(source)) if i not in fixed]
        assert np.abs(final.positions[free] - source.positions[free]).max() > 1e-3


def test_relax_not_converged_is_flagged_with_status_6(models, tmp_path, capsys):
    data = write_structures(tmp_path / "s.xyz", [charged_cluster()])
    status, (atoms,), summary = _run(
        models["charges"], data, tmp_path / "r.xyz", "--mode", "relax", "--max-steps", "1"
    )
    assert status == ExitCode.NOT_CONVERGED
    assert atoms.info["relax_converged"] is False and summary["n_relax_not_converged"] == 1
    assert "max_steps" in summary["structures"][0]["stop_reason"]
    assert "relax_converged=False" in capsys.readouterr().err


# ------------------------------------------------------------------------------- molecular dynamics


def test_nve_conserves_energy(models, tmp_path):
    data = write_structures(tmp_path / "s.xyz", [charged_cluster()])
    args = (
        "--mode",
        "md",
        "--steps",
        "60",
        "--timestep-fs",
        "0.25",
        "--trajectory-stride",
        "20",
        "--seed",
        "3",
    )
    status, (final,), summary = _run(models["charges"], data, tmp_path / "m.xyz", *args)
    assert status == 0, summary
    md = summary["structures"][0]["md"]
    assert abs(md["energy_drift_eV_per_atom_per_ps"]) < 2e-3
    assert md["total_energy_final"] == pytest.approx(md["total_energy_initial"], abs=2e-4)
    assert md["temperature_initial_K"] > 50  # it did move
    assert final.info["md_step"] == 60 and final.info["time_fs"] == pytest.approx(15.0)
    trajectory = ase.io.read(tmp_path / "m_traj.xyz", ":")
    assert [t.info["md_step"] for t in trajectory] == [0, 20, 40, 60]
    assert all("ref_charges" in t.arrays and "temperature" in t.info for t in trajectory)


def test_langevin_thermostat_and_seed(models, tmp_path):
    data = write_structures(tmp_path / "s.xyz", [nacl_cell()])
    args = (
        "--mode",
        "md",
        "--ensemble",
        "langevin",
        "--steps",
        "40",
        "--timestep-fs",
        "2",
        "--friction",
        "0.05",
    )
    results = []
    for name in ("a", "b"):
        status, (final,), summary = _run(
            models["sr"], data, tmp_path / f"{name}.xyz", *args, "--trajectory-stride", "0"
        )
        assert status == 0
        results.append((final, summary["structures"][0]["md"]))
    (first, md), (second, _) = results
    np.testing.assert_array_equal(first.positions, second.positions)  # same seed, same trajectory
    assert 100.0 < md["temperature_mean_second_half_K"] < 900.0
    assert not (tmp_path / "a_traj.xyz").exists()


# ------------------------------------------------------------------------------- failures


def test_scf_not_converged_is_flagged_never_hidden(models, tmp_path, capsys):
    data = write_structures(tmp_path / "s.xyz", [water(), charged_cluster()])
    status, frames, summary = _run(models["scf-stuck"], data, tmp_path / "p.xyz")
    assert status == ExitCode.SCF_FAILED
    assert len(frames) == 2 and all(f.info["scf_converged"] is False for f in frames)
    assert all(f.info["scf_iterations"] == 1 for f in frames)
    assert summary["n_scf_not_converged"] == 2
    assert [row["scf_converged"] for row in summary["structures"]] == [False, False]
    assert "scf_converged=False" in capsys.readouterr().err
    # a relaxation stops at the first unconverged SCF and says why
    status, _, summary = _run(models["scf-stuck"], data, tmp_path / "r.xyz", "--mode", "relax")
    assert status == ExitCode.SCF_FAILED
    row = summary["structures"][0]
    assert (
        row["scf_converged"] is False and row["relax"]["converged"] is False and "SCF" in row["stop_reason"]
    )


def test_non_finite_outputs_exit_3(tmp_path):
    from aiida_emlip.models.io import load_model, save_model

    model_path = save_tiny_model(tmp_path, "sr")
    model = load_model(model_path)
    with torch.no_grad():
        model.reference_energies.fill_(float("nan"))
    save_model(model, model_path)
    data = write_structures(tmp_path / "s.xyz", [water()])
    status, frames, summary = _run(model_path, data, tmp_path / "p.xyz")
    assert status == ExitCode.NON_FINITE
    assert summary["n_non_finite"] == 1 and summary["structures"][0]["energy"] is None and len(frames) == 1


def test_bad_input_is_refused_before_any_compute(models, tmp_path, capsys):
    data = write_structures(tmp_path / "s.xyz", [charged_cluster()])
    out = tmp_path / "p.xyz"
    for args, message in (
        (("--mode", "relax", "--relax-cell"), "relax_cell needs a structure periodic"),
        (("--mode", "md", "--fix-indices", "9"), "fixed_indices holds 9"),
        (("--mode", "md", "--fix-indices", "0,1,2,3"), "fix every atom"),
        (("--mode", "md", "--fmax", "0.1"), "applies to mode relax"),
        (("--fix-indices", "a"), "comma-separated"),
    ):
        assert eval_main([str(models["charges"]), str(data), "-o", str(out), *args]) == ExitCode.BAD_INPUT
        assert message in capsys.readouterr().err
        assert not out.exists()
    other = write_structures(tmp_path / "f.xyz", [Atoms("FH", positions=[[0, 0, 0], [0, 0, 0.95]])])
    assert eval_main([str(models["charges"]), str(other), "-o", str(out)]) == ExitCode.BAD_INPUT
    assert "does not know" in capsys.readouterr().err
    labels = data.read_bytes()
    assert eval_main([str(models["charges"]), str(data), "-o", str(data)]) == ExitCode.BAD_INPUT
    assert "is the input file" in capsys.readouterr().err
    assert data.read_bytes() == labels  # the reference labels are untouched
