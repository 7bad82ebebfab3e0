"""Trainer: every head learns, bit-for-bit resume, NaN exit status, clear input errors, CLI tools."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from training_helpers import DATA, HEADS, SELF_CONSISTENT, config_dict, make_config, write_config

from aiida_emlip.models.heads import HEADS as REGISTERED
from aiida_emlip.models.io import load_model
from aiida_emlip.training.cli import eval_main, train_main
from aiida_emlip.training.config import load_config, parse_config
from aiida_emlip.training.errors import ConfigError, ExitCode, Interrupted, NonFiniteError
from aiida_emlip.training.trainer import Trainer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _needs_head(name: str) -> None:
    assert name in REGISTERED, f"head {name!r} is not registered"


# ------------------------------------------------------------------------------- learning


@pytest.mark.parametrize("head", list(HEADS))
def test_training_lowers_validation_loss(tmp_path, head):
    """A few epochs on the pw.x dataset lower the validation loss of every head."""
    _needs_head(head)
    trainer = Trainer(make_config(tmp_path, head, epochs=5))
    metrics = trainer.run()
    losses = [row["valid_loss"] for row in metrics["history"]]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] and min(losses) < 0.95 * losses[0], losses
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert metrics["test"]["energy"]["all"]["count"] >= 1


def test_outputs_and_reference_energies(tmp_path, capsys):
    trainer = Trainer(make_config(tmp_path, "charges", epochs=2))
    metrics = trainer.run()
    log = capsys.readouterr()
    stages = [line for line in (log.out + log.err).splitlines() if "stage 0 " in line]
    # a head that does not iterate has no SCF mode to report
    assert stages and all("epochs" in line and "scf_mode" not in line for line in stages), stages
    assert metrics["scf"]["test_convergence"] == {}
    run = tmp_path / "run"
    for name in (
        "model.safetensors",
        "metrics.json",
        "learning_curve.csv",
        "test_errors.txt",
        "checkpoint.pt",
    ):
        assert (run / name).is_file(), name
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["sizes"] == {"train": 16, "valid": 4, "test": 2}
    groups = set(saved["test"]["energy"]) | set(saved["valid"]["energy"])
    assert "all" in groups and any(g.startswith("config_type=") for g in groups)
    assert any(g.startswith("total_charge=") for g in groups)
    curve = (run / "learning_curve.csv").read_text().splitlines()
    assert curve[0].startswith("epoch,stage,scf_mode,lr,train_loss,valid_loss") and len(curve) == 3
    # E0 fit by least squares: it reproduces the mean energy per composition well enough
    model = load_model(run / "model.safetensors")
    e0 = dict(zip(model.config.elements, model.reference_energies.tolist()))
    assert e0 == pytest.approx(metrics["reference_energies"])
    assert -20 < e0["H"] < -5 and -600 < e0["O"] < -300  # pseudopotential energies, eV


def test_given_reference_energies(tmp_path):
    given = {"H": -10.0, "O": -400.0, "Na": -1300.0, "Cl": -400.0}
    values = config_dict(tmp_path, "sr", epochs=0)
    values["data"]["reference_energies"] = given
    trainer = Trainer(parse_config(values))
    assert trainer.reference_energies == given


def test_splits_are_deterministic(tmp_path):
    a = Trainer(make_config(tmp_path, "sr", epochs=0, seed=3))
    b = Trainer(make_config(tmp_path, "sr", epochs=0, seed=3))
    c = Trainer(make_config(tmp_path, "sr", epochs=0, seed=4))
    assert [s.index for s in a.valid] == [s.index for s in b.valid]
    assert [s.index for s in a.valid] != [s.index for s in c.valid]
    # the initial weights follow from the seed too
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_stages_chain_modes_and_weights(tmp_path):
    stages = [
        {"name": "first", "epochs": 1, "scf_mode": "unrolled", "weights": {"energy": 1.0}},
        {"name": "late", "epochs": 2, "scf_mode": "implicit", "weights": {"energy": 1000.0}, "lr": 0.001},
    ]
    trainer = Trainer(make_config(tmp_path, "charges", stages=stages))
    metrics = trainer.run()
    rows = metrics["history"]
    assert [r["stage"] for r in rows] == ["first", "late", "late"]
    assert [r["scf_mode"] for r in rows] == ["unrolled", "implicit", "implicit"]
    # a head that does not iterate: its log names the stage, not an SCF mode
    log = (trainer.output_dir / "train.log").read_text()
    assert "epoch 1 (first) train" in log and "unrolled" not in log and "implicit" not in log
    assert rows[1]["lr"] == pytest.approx(0.001)
    assert trainer.config.weights_at_stage(1)["energy"] == 1000.0
    assert trainer.config.weights_at_stage(1)["forces"] == 1.0


def test_early_stopping_ends_stage(tmp_path):
    cfg = make_config(
        tmp_path, "sr", epochs=30, optimizer={"lr": 1e-9}, early_stopping={"patience": 2, "min_delta": 1e-3}
    )
    metrics = Trainer(cfg).run()
    assert len(metrics["history"]) < 30


# -------------------------------------------------------------------------- checkpoints


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


#: Per head, a batch size that gives every epoch at least three steps, so that the interrupt (second
#: epoch, second step) lands inside an epoch: the formal charges of `split` leave it the 6 neutral
#: structures of the tiny set (4 to train on), one batch of 4 per epoch at the default size.
RESUME_BATCH_SIZE = {"charges": 4, "scf": 4, "split": 1}


@pytest.mark.parametrize("head", list(RESUME_BATCH_SIZE))
def test_resume_reproduces_uninterrupted_run(tmp_path, head):
    """SIGUSR1 mid-epoch → checkpoint, exit status 4; resuming gives bit-identical weights and curve."""
    sections = {"scheduler": {"name": "cosine"}, "checkpoint": {"every": 1}}

    def config(path: Path):
        values = config_dict(path, head, epochs=3, **sections)
        values["data"]["batch_size"] = RESUME_BATCH_SIZE[head]
        return parse_config(values)

    full = Trainer(config(tmp_path / "a"))
    full_metrics = full.run()
    steps_per_epoch = full_metrics["steps_per_epoch"]
    assert steps_per_epoch >= 3, steps_per_epoch

    first = Trainer(config(tmp_path / "b"))
    steps = {"n": 0}

    def interrupt(trainer: Trainer) -> None:
        steps["n"] += 1
        if steps["n"] == steps_per_epoch + 2:  # second epoch, second step
            os.kill(os.getpid(), signal.SIGUSR1)

    first.after_step = interrupt
    with pytest.raises(Interrupted) as info:
        first.run()
    assert info.value.exit_code == ExitCode.INTERRUPTED
    assert (first.pos.epoch, first.pos.step) == (1, 2)  # inside the second epoch
    checkpoint = first.checkpoint_path
    assert checkpoint.is_file()

    resumed = Trainer(config(tmp_path / "b"))
    resumed_metrics = resumed.run(resume=checkpoint)
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    def curve(metrics: dict) -> str:
        return json.dumps([{k: v for k, v in row.items() if k != "elapsed_s"} for row in metrics["history"]])

    assert len(resumed_metrics["history"]) == 3
    assert curve(full_metrics) == curve(resumed_metrics)


def test_foreach_optimizer_and_clipping_match_one_parameter_at_a_time(tmp_path, monkeypatch):
    """On the CPU the optimizer and the clipping act on all parameters at once (``foreach``): the same
    weights, bit for bit, as torch's default there; a checkpoint without it resumes with it."""
    values = config_dict(tmp_path, "sr", epochs=2, clip_grad_norm=1e-3)  # small: every step is clipped
    fast = Trainer(parse_config(values))
    assert fast.foreach is True
    assert all(group["foreach"] for group in fast.optimizer.param_groups)
    fast.run()
    monkeypatch.setattr(Trainer, "foreach", property(lambda self: None))
    values["output_dir"] = str(tmp_path / "default")
    slow = Trainer(parse_config(values))
    assert slow.optimizer.param_groups[0]["foreach"] is None
    slow.run()
    a, b = _state(fast), _state(slow)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    monkeypatch.undo()
    resumed = Trainer(parse_config({**values, "stages": [{"name": "main", "epochs": 3}]}))
    resumed.load(slow.checkpoint_path)
    assert all(group["foreach"] for group in resumed.optimizer.param_groups)


def test_resume_refuses_other_model(tmp_path):
    trainer = Trainer(make_config(tmp_path, "sr", epochs=1))
    trainer.run()
    other = Trainer(make_config(tmp_path, "charges", epochs=1))
    with pytest.raises(ConfigError, match="different model"):
        other.load(trainer.checkpoint_path)


# ------------------------------------------------------------------------------- NaN / inf


def test_nan_in_data_gives_nan_exit_status(tmp_path, capsys):
    frames = ase.io.read(DATA, ":")
    frames[3].calc.results["energy"] = float("nan")
    bad = tmp_path / "nan.xyz"
    ase.io.write(bad, frames, format="extxyz")
    values = config_dict(tmp_path, "sr")
    values["data"]["train"] = str(bad)
    assert train_main([str(write_config(tmp_path, values))]) == ExitCode.NON_FINITE == 3
    assert "structure 3" in capsys.readouterr().err


def test_nan_during_training_stops_cleanly(tmp_path):
    """A NaN that reaches the loss (here injected after the input checks) stops training."""
    trainer = Trainer(make_config(tmp_path, "sr", epochs=2, data={"train": str(DATA), "batch_size": 100}))
    trainer.train[0].labels["energy"] = np.array(float("nan"))
    before = _state(trainer)
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        trainer.run()
    after = _state(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no NaN step was applied


def _one_gradient(trainer: Trainer, value: float) -> None:
    """Make the first parameter's gradient ``value`` everywhere (the loss stays finite)."""
    first = next(trainer.model.parameters())
    first.register_hook(lambda grad: torch.full_like(grad, value))


def test_nan_gradient_stops_cleanly(tmp_path):
    """A non-finite gradient behind a finite loss stops training before the optimizer steps."""
    trainer = Trainer(make_config(tmp_path, "sr", epochs=1, data={"train": str(DATA), "batch_size": 100}))
    _one_gradient(trainer, float("nan"))
    before = _state(trainer)
    with pytest.raises(NonFiniteError, match="non-finite gradient"):
        trainer.run()
    after = _state(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_finite_gradient_whose_norm_overflows_is_clipped(tmp_path):
    """Finite gradients whose total norm overflows are not refused as non-finite: they are clipped."""
    values = {"train": str(DATA), "batch_size": 100}
    trainer = Trainer(make_config(tmp_path, "sr", epochs=1, data=values))
    _one_gradient(trainer, 1e300)  # finite in float64, its square is not
    trainer.run()
    assert trainer.pos.epoch == 1


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v: v.update(unknown_section=1), "unknown key(s) ['unknown_section']"),
        (lambda v: v["optimizer"].update(momentum=0.9), "unknown key(s) ['momentum'] in optimizer"),
        (lambda v: v["loss"].update(enrgy=1.0), "unknown loss quantity ['enrgy']"),
        (lambda v: v["data"].update(batch_size="four"), "data.batch_size must be int"),
        (lambda v: v["data"].pop("train"), "data.train"),
        (lambda v: v["data"].update(energy_unit="kJ"), "data.energy_unit must be one of"),
        (lambda v: v["stages"][0].update(scf_mode="fast"), "scf_mode must be one of"),
        (lambda v: v["model"]["head"].update(name="nohead"), "unknown head 'nohead'"),
        (lambda v: v["model"]["backbone"].update(channels=4), "unknown key(s) ['channels'] in backbone"),
        (lambda v: v["model"].update(induction={"enable": True}), "model.induction: unknown option(s)"),
        (
            lambda v: v["model"].update(induction={"enabled": True, "initial_polarizability": 0}),
            "model.induction.initial_polarizability must be > 0",
        ),
    ],
)
def test_malformed_config_exit_status_2(tmp_path, capsys, change, message):
    values = config_dict(tmp_path, "charges")
    change(values)
    code = train_main([str(write_config(tmp_path, values))])
    err = capsys.readouterr().err
    assert code == ExitCode.BAD_INPUT, err
    assert message in err
    assert not (tmp_path / "run").exists()  # failed before any output or compute


def _with_data(tmp_path, frames_or_text, **data):
    path = tmp_path / "data.xyz"
    if isinstance(frames_or_text, str):
        path.write_text(frames_or_text)
    else:
        ase.io.write(path, frames_or_text, format="extxyz")
    values = config_dict(tmp_path, "charges")
    values["data"].update(train=str(path), **data)
    return train_main([str(write_config(tmp_path, values))])


def test_empty_dataset(tmp_path, capsys):
    assert _with_data(tmp_path, "") == ExitCode.BAD_INPUT
    assert "is empty" in capsys.readouterr().err


def test_missing_file(tmp_path, capsys):
    values = config_dict(tmp_path, "charges")
    values["data"]["train"] = str(tmp_path / "nope.xyz")
    assert train_main([str(write_config(tmp_path, values))]) == ExitCode.BAD_INPUT
    assert "does not exist" in capsys.readouterr().err


def test_missing_label_key(tmp_path, capsys):
    assert _with_data(tmp_path, ase.io.read(DATA, ":"), keys={"forces": "REF_forces"}) == ExitCode.BAD_INPUT
    err = capsys.readouterr().err
    assert "'forces'" in err and "REF_forces" in err


def test_wrong_force_units(tmp_path, capsys):
    frames = ase.io.read(DATA, ":")
    for atoms in frames:
        atoms.calc.results["forces"] = atoms.calc.results["forces"] * 1000.0  # meV/Å
    assert _with_data(tmp_path, frames) == ExitCode.BAD_INPUT
    assert "wrong units" in capsys.readouterr().err


def test_energy_unit_conversion(tmp_path):
    frames = ase.io.read(DATA, ":")
    for atoms in frames:
        atoms.calc.results["energy"] /= 27.211386245988
        atoms.calc.results["forces"] /= 27.211386245988
    path = tmp_path / "ha.xyz"
    ase.io.write(path, frames, format="extxyz")
    values = config_dict(tmp_path, "sr", epochs=0)
    values["data"].update(train=str(path), energy_unit="Ha")
    converted = Trainer(parse_config(values))
    reference = Trainer(make_config(tmp_path, "sr", epochs=0))
    for a, b in zip(converted.train, reference.train):
        assert a.labels["energy"] == pytest.approx(b.labels["energy"], rel=1e-12)


def test_direct_mode_needs_reference_charges(tmp_path, capsys):
    values = config_dict(tmp_path, "charges")
    values["stages"] = [{"epochs": 1, "scf_mode": "direct"}]
    assert train_main([str(write_config(tmp_path, values))]) == ExitCode.BAD_INPUT
    assert "ref_charges" in capsys.readouterr().err


def test_label_needs_are_what_the_checks_refuse(tmp_path):
    """One account of the labels a config cannot train without (the trainer's checks and the training
    workchain's check of the labels to come use it): loss weights under data.keys, the reference
    charges of direct training, μ of a constant-μ head trained directly, charges_from_dipoles."""
    from aiida_emlip.training.config import fermi_level_uses, label_needs

    def needs(values: dict) -> list[tuple[str, str, bool]]:
        return [(n.key, n.file_key, n.every) for n in label_needs(parse_config(values))]

    values = config_dict(tmp_path, "charges")
    values["loss"] = {"energy": 1.0, "forces": 0.0, "charges": 5.0}
    values["stages"] = [{"name": "main", "epochs": 1, "weights": {"stress": 1.0, "fermi_level": 1.0}}]
    values["data"]["keys"] = {"ref_charges": "lowdin_charges"}
    assert needs(values) == [
        ("energy", "energy", False),
        ("stress", "stress", False),
        ("ref_charges", "lowdin_charges", False),
    ]  # the Fermi level may come from a head option: not a need of the loss weight
    assert fermi_level_uses(parse_config(values)) == ["the loss weight of fermi_level"]

    values = config_dict(tmp_path, "scf", stages=[{"name": "d", "epochs": 1, "scf_mode": "direct"}])
    values["model"]["head"] = {"name": "scf", "ensemble": "constant_mu"}
    values["data"]["charges_from_dipoles"] = True
    assert needs(values)[2:] == [
        ("ref_charges", "ref_charges", True),
        ("fermi_level", "fermi_level", True),
        ("ref_charges", "ref_charges", True),
        ("ref_dipoles", "ref_dipoles", True),
    ]
    assert fermi_level_uses(parse_config(values)) == [
        "the constant-μ head",
        "'direct' training (stage(s) ['d'])",
    ]
    values["model"]["head"]["fermi_level"] = -4.5  # μ from the head option: no Fermi level needed
    assert ("fermi_level", "fermi_level", True) not in needs(values)
    values["stages"][0]["epochs"] = 0  # a direct stage without epochs trains nothing
    assert needs(values)[2:] == [("ref_charges", "ref_charges", True), ("ref_dipoles", "ref_dipoles", True)]


# ------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("main", [train_main, eval_main])
def test_help(main, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "exit status" in out and "NaN" in out


def test_train_then_eval_cli(tmp_path, capsys):
    values = config_dict(tmp_path, "charges", epochs=1)
    assert train_main([str(write_config(tmp_path, values))]) == 0
    model = tmp_path / "run" / "model.safetensors"
    out = tmp_path / "pred.xyz"
    errors = tmp_path / "errors.json"
    assert eval_main([str(model), str(DATA), "-o", str(out), "--errors", str(errors), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "energy" in printed and "total_charge=+1" in printed
    frames = ase.io.read(out, ":")
    assert len(frames) == 22
    assert "emlip_energy" in frames[0].info and "emlip_dipole" in frames[0].info
    assert frames[0].arrays["emlip_forces"].shape == (3, 3)
    charges = frames[-1].arrays["emlip_charges"]
    assert charges.sum() == pytest.approx(frames[-1].info["total_charge"], abs=1e-8)
    table = json.loads(errors.read_text())
    assert table["forces"]["all"]["count"] == sum(3 * len(f) for f in frames)


def test_eval_rejects_pickle(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    torch.save({"a": 1}, bad)
    assert eval_main([str(bad), str(DATA)]) == ExitCode.BAD_INPUT
    assert "safetensors" in capsys.readouterr().err


# ------------------------------------------------------------------- self-consistent heads


#: Teacher–student: test-split RMSE of the trained student against the teacher, as a fraction of the
#: untrained student's (same seed, no epoch), after direct 10 → unrolled 5 → implicit 3 epochs on a
#: teacher whose head parameters carry noise of width 0.5. Measured (charges, energy): scf 0.22, 0.13;
#: functional 0.47, 0.19; qeq 0.96, 0.14 (qeq's charges are not recovered in 18 epochs: no charge
#: bound for it). A recipe whose gradients do not reach the head, or that trains on other labels,
#: stays near 1.
TEACHER_STUDENT_BOUNDS = {"scf": (0.4, 0.3), "functional": (0.7, 0.35), "qeq": (None, 0.35)}


@pytest.mark.parametrize(
    "head", [pytest.param(h, marks=pytest.mark.slow) if h != "scf" else h for h in SELF_CONSISTENT]
)
def test_self_consistent_modes_teacher_student(tmp_path, head):
    """direct → unrolled → implicit on labels of a known teacher: the student recovers the teacher's
    charges and energies (errors against the teacher well below the untrained student's); drift from
    the trained density reported."""
    _needs_head(head)
    from training_helpers import teacher_dataset

    data = teacher_dataset(tmp_path, head, perturb=0.5)
    stages = [
        {"name": "direct", "epochs": 10, "scf_mode": "direct"},
        {"name": "unrolled", "epochs": 5, "scf_mode": "unrolled"},
        {"name": "implicit", "epochs": 3, "scf_mode": "implicit"},
    ]

    def run(stages, name):
        values = config_dict(tmp_path, head, stages=stages, output_dir=str(tmp_path / name))
        values["data"].update(train=str(data), valid_fraction=0.2, test_fraction=0.2)
        values["loss"] = {"energy": 10.0, "forces": 1.0, "charges": 10.0}
        return Trainer(parse_config(values)).run()

    untrained = run([{"name": "none", "epochs": 0, "scf_mode": "direct"}], "untrained")
    metrics = run(stages, "run")
    rows = metrics["history"]
    assert [r["scf_mode"] for r in rows] == ["direct"] * 10 + ["unrolled"] * 5 + ["implicit"] * 3
    assert rows[-1]["valid_loss"] < rows[0]["valid_loss"]
    assert metrics["sizes"]["test"] == untrained["sizes"]["test"] == 4  # the same split (seed 0)
    charge_bound, energy_bound = TEACHER_STUDENT_BOUNDS[head]
    before, after = untrained["test"], metrics["test"]  # errors against the teacher's labels
    energy = after["energy"]["all"]["rmse"] / before["energy"]["all"]["rmse"]
    assert energy < energy_bound, (after["energy"]["all"], before["energy"]["all"])
    if charge_bound is not None:
        charges = after["charges"]["all"]["rmse"] / before["charges"]["all"]["rmse"]
        assert charges < charge_bound, (after["charges"]["all"], before["charges"]["all"])
    drift = metrics["scf"]["drift"]
    assert drift is not None and drift["trained_mode"] == "implicit"
    assert 0.0 <= drift["converged_fraction"] <= 1.0 and "charges_rms_drift" in drift
    tested = metrics["scf"]["test_convergence"]  # summed and mean iterations, each named so
    assert tested["structures"] == metrics["sizes"]["test"]
    assert tested["iterations_mean"] == pytest.approx(tested["iterations_total"] / tested["structures"])
    assert tested["iterations_mean"] >= 1.0


def test_formal_charge_head_on_charged_data_is_bad_input(tmp_path, capsys):
    """Refused by --check as by the run (--check once passed and the run stopped at its first batch)."""
    values = config_dict(tmp_path, "fixed")
    values["data"]["train"] = str(DATA)  # holds charged molecules the formal charges cannot sum to
    config = str(write_config(tmp_path, values))
    assert train_main([config, "--check"]) == ExitCode.BAD_INPUT
    assert "cannot represent" in capsys.readouterr().err
    assert train_main([config]) == ExitCode.BAD_INPUT
    assert "cannot represent" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.yaml")))
def test_examples_are_valid(name):
    """Every example parses and points at existing data; one per head."""
    config = load_config(EXAMPLES / f"{name}.yaml")
    assert Path(config.data.train).is_file()
    assert config.model["head"]["name"] == name


def test_one_example_per_head():
    assert {p.stem for p in EXAMPLES.glob("*.yaml")} >= set(HEADS)


# ---------------------------------------------------------------------------------- physics

PHYSICS_HEADS = {
    # head config, minimum ratio sr-RMSE / head-RMSE (measured: charges 2.3, qeq 130), epochs
    "charges": ({"name": "charges", "correction": "weighted"}, 1.8, 100),
    "qeq": ({"name": "qeq"}, 10.0, 50),
    "scf": ({"name": "scf", "on_failure": "flag"}, 3.0, 100),
    "functional": ({"name": "functional"}, 10.0, 100),
}


def _fit_energy_rmse(tmp_path, head: dict, epochs: int) -> float:
    """Energy RMSE (eV/atom) on the whole tiny set after fitting it (energy-weighted loss)."""
    values = config_dict(tmp_path, "sr", epochs=epochs)
    values["data"].update(valid_fraction=0.0, test_fraction=0.0, batch_size=6)
    values["model"].update(
        head=head, backbone={**values["model"]["backbone"], "num_channels": 8, "mlp_hidden": 8}
    )
    values.update(
        loss={"energy": 100.0, "forces": 0.1},
        optimizer={"lr": 0.03},
        scheduler={"name": "cosine"},
        ema={"enabled": False},
    )
    metrics = Trainer(parse_config(values)).run()
    return metrics["valid"]["energy"]["all"]["rmse"]


@pytest.fixture(scope="module")
def sr_energy_rmse(tmp_path_factory) -> float:
    # sr's error is set by the data (same geometry, different energies): 50 epochs reach its floor
    return _fit_energy_rmse(tmp_path_factory.mktemp("sr-physics"), {"name": "sr"}, 50)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n != "qeq" else n for n in PHYSICS_HEADS],
)
def test_mixed_charge_states_need_charge_aware_head(tmp_path, sr_energy_rmse, name):
    """Same geometries in charge states -1/0/+1: sr (blind to Q) cannot fit the energies, these heads can."""
    head, ratio, epochs = PHYSICS_HEADS[name]
    _needs_head(head["name"])
    assert sr_energy_rmse > 1.0  # eV/atom: the charge states differ by ~10 eV per 2-3 atom molecule
    rmse = _fit_energy_rmse(tmp_path, head, epochs)
    assert sr_energy_rmse / rmse > ratio, (sr_energy_rmse, rmse)


# ------------------------------------------------------------------------------- several ranks


def test_two_process_cpu_ddp(tmp_path):
    """torchrun with 2 CPU ranks (gloo): trains, lowers the loss, rank 0 writes the outputs."""
    import subprocess
    import sys

    values = config_dict(tmp_path, "charges", epochs=3)
    values["data"]["batch_size"] = 2
    config = write_config(tmp_path, values)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "aiida_emlip.training.cli", "train", str(config), "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    losses = [row["valid_loss"] for row in metrics["history"]]
    assert losses[-1] < losses[0]
    assert metrics["sizes"]["train"] == 15 or metrics["sizes"]["train"] == 16


def test_polarizability_is_dipole_field_derivative():
    """The polarisability the loss uses (autograd through the applied field) matches finite differences."""
    _needs_head("qeq")
    from models_helpers import tiny_model, water_cluster

    from aiida_emlip.training.config import DataConfig
    from aiida_emlip.training.data import attach_graphs, collate, to_sample
    from aiida_emlip.training.losses import predict

    model = tiny_model({"name": "qeq"})
    atoms = water_cluster()
    atoms.info["external_field"] = [0.01, -0.02, 0.03]

    def batch_for(field):
        a = atoms.copy()
        a.info["external_field"] = list(field)
        sample = to_sample(a, 0, DataConfig(train="x"), "test")
        attach_graphs([sample], model.cutoff)
        return collate([sample], torch.float64)

    batch = batch_for(atoms.info["external_field"])
    out = predict(model, batch, {"polarizability"}, "converge", training=False)
    pol = out["polarizability"][0].detach().numpy()
    assert np.abs(pol).max() > 1e-3  # QEq charges respond to the field
    h = 1e-4
    for j in range(3):
        fields = []
        for sign in (1, -1):
            field = np.array(atoms.info["external_field"], dtype=float)
            field[j] += sign * h
            fields.append(predict(model, batch_for(field), set(), "converge", training=False)["dipole"][0])
        fd = ((fields[0] - fields[1]) / (2 * h)).detach().numpy()
        np.testing.assert_allclose(pol[:, j], fd, rtol=1e-5, atol=1e-8)


def test_float32_training_and_check_flag(tmp_path, capsys):
    values = config_dict(tmp_path, "charges", epochs=2)
    values["model"]["dtype"] = "float32"
    path = write_config(tmp_path, values)
    assert train_main([str(path), "--check"]) == 0
    assert "ok: 16 train" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()
    assert train_main([str(path), "--device", "cpu"]) == 0
    model = load_model(tmp_path / "run" / "model.safetensors")
    assert model.dtype == torch.float32
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["history"][-1]["valid_loss"] < metrics["history"][0]["valid_loss"] * 1.5
