"""``emlip.train.base``: emlip-train restarted after known failures, and what emlip-train provides for it.

Real runs (localhost, direct scheduler): a normal run, a run interrupted by SIGTERM after its first
checkpoint (a launcher that sends the signal, first attempt only) that resumes, a config refused before
submission, and the training workchain on a given dataset. The handlers for failures that cannot be
produced on demand (NaN/inf, SCF, out of memory, walltime) are tested by fault injection: the handler
methods are called on stored calculation nodes given that exit status (and stderr, checkpoint).
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "tiny.xyz"
CONFIG = {
    "seed": 0,
    "device": "cpu",
    "data": {"valid_fraction": 0.2, "test_fraction": 0.2, "batch_size": 4},
    "model": {
        "backbone": {"num_channels": 4, "num_interactions": 1, "correlation": 2, "max_ell": 2, "r_max": 4.0},
        "head": {"name": "charges"},
    },
    "optimizer": {"lr": 0.01},
    "stages": [{"name": "main", "epochs": 2}],
    "checkpoint": {"every": 0},
}


def _config(**overrides):
    values = yaml.safe_load(yaml.safe_dump(CONFIG))
    values.update(overrides)
    return values


def _inputs(code, config, **extra):
    from aiida.orm import Dict

    from aiida_emlip.data.dataset import EmlipDatasetData

    train = {
        "code": code,
        "dataset": EmlipDatasetData.from_extxyz(DATA),
        "config": Dict(config),
        "metadata": {"options": {"max_wallclock_seconds": 600}},
    }
    return {"train": {**train, **extra}}


# ------------------------------------------------------------------------------ emlip-train itself
def _cli_config(tmp_path: Path, **overrides) -> Path:
    values = _config(**overrides)
    values["data"] = {**values["data"], "train": str(DATA)}
    values["output_dir"] = str(tmp_path / "run")
    values["progress"] = "log"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _learning_rates(run: Path) -> list[float]:
    with (run / "learning_curve.csv").open() as handle:
        return [float(row["lr"]) for row in csv.DictReader(handle)]


def test_exit_status_file_is_written_by_emlip_train(tmp_path, capsys):
    """The status reaches the file for success, a bad config and a usage error alike."""
    from aiida_emlip.training.cli import train_main

    config = _cli_config(tmp_path)
    status = tmp_path / "exit_status"
    assert train_main([str(config), "--check", "--exit-status-file", str(status)]) == 0
    assert status.read_text() == "0\n"
    bad = _cli_config(tmp_path, stages=[{"name": "main", "epochs": 2, "colour": "red"}])
    assert train_main([str(bad), "--check", "--exit-status-file", str(status)]) == 2
    assert status.read_text() == "2\n"
    with pytest.raises(SystemExit):
        train_main([str(config), "--epochs", "many", "--exit-status-file", str(status)])
    assert status.read_text() == "2\n"
    assert train_main([str(config), "--lr-scale", "0", "--exit-status-file", str(status)]) == 2
    assert "--lr-scale must be a positive number" in capsys.readouterr().err


def test_lr_scale_from_scratch_and_on_resume(tmp_path, capsys):
    """--lr-scale scales the configured rate; on --resume it is relative to the configuration, not the
    checkpoint, and the checkpoint (whose identity does not include it) is accepted."""
    from aiida_emlip.training.cli import train_main

    config = _cli_config(tmp_path, checkpoint={"every": 1})
    run = tmp_path / "run"
    assert train_main([str(config), "--lr-scale", "0.5"]) == 0, capsys.readouterr().err
    assert _learning_rates(run) == pytest.approx([0.005, 0.005])
    assert train_main([str(config), "--resume", "auto", "--epochs", "3", "--lr-scale", "0.25"]) == 0
    assert _learning_rates(run) == pytest.approx([0.005, 0.005, 0.0025])
    metrics = yaml.safe_load((run / "metrics.json").read_text())
    assert metrics["lr_scale"] == 0.25 and metrics["epochs"] == 3
    assert "learning rates at 0.25 times the configured ones" in (run / "train.log").read_text()
    # without --lr-scale a resumed run keeps the checkpoint's factor
    assert train_main([str(config), "--resume", "auto", "--epochs", "4"]) == 0
    assert _learning_rates(run)[-1] == pytest.approx(0.0025)


def test_out_of_memory_is_its_own_exit_status(tmp_path, capsys, monkeypatch):
    """Fault injection: the trainer raises the error torch raises when an allocation fails."""
    from aiida_emlip.training import trainer
    from aiida_emlip.training.cli import train_main
    from aiida_emlip.training.errors import ExitCode

    def fail(self):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer.Trainer, "_loop", fail)
    status = tmp_path / "exit_status"
    assert train_main([str(_cli_config(tmp_path)), "--exit-status-file", str(status)]) == 7
    assert int(ExitCode.OUT_OF_MEMORY) == 7 and status.read_text() == "7\n"
    assert "out of memory" in capsys.readouterr().err


# ---------------------------------------------------------------------------- real AiiDA runs
def test_normal_run_finishes_in_one_iteration(train_code):
    """A user's append_text (here a failing command) no longer decides the exit status."""
    from aiida.engine import run_get_node

    from aiida_emlip.data.model import EmlipModelData
    from aiida_emlip.workflows.train_base import EmlipTrainBaseWorkChain

    inputs = _inputs(train_code, _config())
    inputs["train"]["metadata"]["options"]["append_text"] = "false"
    results, node = run_get_node(EmlipTrainBaseWorkChain, **inputs)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    assert len(node.called) == 1 and node.called[0].is_finished_ok
    assert isinstance(results["model"], EmlipModelData) and results["metrics"]["epochs"] == 2
    reports = " ".join(log.message for log in _reports(node))
    assert "emlip-train --check: ok:" in reports


def _reports(node):
    from aiida.orm import Log

    return Log.collection.get_logs_for(node)


INTERRUPTING_LAUNCHER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from aiida_emlip.training.cli import train_main
from aiida_emlip.training.trainer import Trainer

marker = Path({marker!r})
if not marker.exists():  # first attempt: SIGTERM at the first step after the first checkpoint
    marker.touch()
    run = Trainer.run

    def interrupted_run(self, *args, **kwargs):
        def hook(trainer):
            if trainer.pos.epoch >= 1 and trainer.checkpoint_path.is_file():
                os.kill(os.getpid(), signal.SIGTERM)

        self.after_step = hook
        return run(self, *args, **kwargs)

    Trainer.run = interrupted_run
sys.exit(train_main())
"""


@pytest.fixture
def interrupting_code(train_code, tmp_path):
    """emlip-train that receives SIGTERM after its first checkpoint, on its first attempt only."""
    from aiida.orm import InstalledCode

    launcher = tmp_path / "interrupting_train.py"
    launcher.write_text(INTERRUPTING_LAUNCHER.format(repo=str(REPO), marker=str(tmp_path / "interrupted")))
    script = tmp_path / "emlip-train-interrupting"
    script.write_text(f'#!/bin/sh\nexec {sys.executable} {launcher} "$@"\n')
    script.chmod(0o755)
    return InstalledCode(
        computer=train_code.computer,
        filepath_executable=str(script),
        label=f"emlip-train-interrupting-{tmp_path.name}",
        default_calc_job_plugin="emlip.train",
        with_mpi=False,
    ).store()


def test_interrupted_run_resumes_from_its_checkpoint(interrupting_code):
    """SIGTERM after the first checkpoint: exit 330 with the checkpoint; the restart resumes from it."""
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.train_base import EmlipTrainBaseWorkChain

    config = _config(stages=[{"name": "main", "epochs": 3}], checkpoint={"every": 1})
    inputs = _inputs(interrupting_code, config)
    inputs["train"]["metadata"]["options"]["append_text"] = "true"  # once, this made any job "succeed"
    results, node = run_get_node(EmlipTrainBaseWorkChain, **inputs)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    first, second = sorted(node.called, key=lambda n: n.ctime)
    assert first.exit_status == 330 and "checkpoint" in first.outputs
    assert second.inputs.checkpoint.uuid == first.outputs.checkpoint.uuid
    log = second.outputs.retrieved.get_object_content("train.log")
    assert "resumed from checkpoint.pt at epoch 1" in log
    assert results["metrics"]["epochs"] == 3
    reports = " ".join(log.message for log in _reports(node))
    assert "interrupted by a signal: resuming from its checkpoint" in reports


def test_bad_config_exits_before_submission(train_code):
    """A config that emlip-train --check refuses on the data (a formal-charge head on charged
    molecules): exit 201, no job. What the ports see alone (a head option, a loss on a label the
    dataset lacks, a schema error) is refused when the process is launched."""
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.train_base import EmlipTrainBaseWorkChain

    fixed = {"name": "fixed", "formal_charges": {"H": 1.0, "O": -2.0, "Na": 1.0, "Cl": -1.0}}
    config = _config(model={**CONFIG["model"], "head": fixed})
    _, node = run_get_node(EmlipTrainBaseWorkChain, **_inputs(train_code, config))
    assert node.exit_status == 201 and not node.called
    assert "cannot represent" in node.exit_message and "nothing was submitted" in node.exit_message
    refused_at_launch = [
        (_config(model={**CONFIG["model"], "head": {"name": "charges", "colour": "red"}}), "colour"),
        (_config(loss={"energy": 1.0, "polarizability": 1.0}), "polarizability"),
        (_config(colour="red"), "colour"),
    ]
    for bad, message in refused_at_launch:
        with pytest.raises(ValueError, match=message):
            run_get_node(EmlipTrainBaseWorkChain, **_inputs(train_code, bad))


def test_training_workchain_runs_each_design_through_the_restart_workchain(train_code):
    from aiida.engine import run_get_node
    from aiida.orm import Dict

    from aiida_emlip.data.dataset import EmlipDatasetData
    from aiida_emlip.workflows.training import EmlipTrainingWorkChain

    """Each design is one EmlipTrainBaseWorkChain; the valid_set and test_set given to the training
    workchain reach each design's calculation (its metrics count their structures)."""
    from ase.io import read

    frames = read(DATA, index=":")
    builder = EmlipTrainingWorkChain.get_builder()
    builder.training_set = EmlipDatasetData.from_ase(frames[:14])
    builder.valid_set = EmlipDatasetData.from_ase(frames[14:17])
    builder.test_set = EmlipDatasetData.from_ase(frames[17:])
    builder.train_code = train_code
    builder.designs = Dict({"charges": _config()})
    results, node = run_get_node(builder)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    assert set(results["models"]) == {"charges"} and set(results["metrics"]) == {"charges"}
    assert set(results["comparison"].get_dict()["test"]) == {"charges"}
    (child,) = [n for n in node.called if n.process_label == "EmlipTrainBaseWorkChain"]
    assert [c.process_label for c in child.called] == ["EmlipTrainCalculation"]
    assert results["models"]["charges"].uuid == child.outputs.model.uuid
    (calc,) = child.called
    assert calc.inputs.valid_set.uuid == builder.valid_set.uuid
    assert calc.inputs.test_set.uuid == builder.test_set.uuid
    assert results["metrics"]["charges"]["sizes"] == {"train": 14, "valid": 3, "test": 5}


def test_training_workchain_refuses_valid_and_test_paths(train_code):
    """A design whose data.valid or data.test is a path: refused by the designs port (before any DFT
    or training), naming the input to use instead."""
    from aiida.orm import Dict

    from aiida_emlip.workflows.training import EmlipTrainingWorkChain

    builder = EmlipTrainingWorkChain.get_builder()
    for role in ("valid", "test"):
        config = _config(data={**CONFIG["data"], role: "/scratch/held_out.xyz"})
        with pytest.raises(ValueError, match=rf"designs.charges: config: 'data.{role}' .* {role}_set"):
            builder.designs = Dict({"charges": config})


# ------------------------------------------------------------------ handlers by fault injection
@pytest.fixture
def process(train_code):
    """An ``EmlipTrainBaseWorkChain`` instance after ``setup``, ready for handler calls."""

    def make(config=None):
        from aiida.engine.utils import instantiate_process
        from aiida.manage import get_manager

        from aiida_emlip.workflows.train_base import EmlipTrainBaseWorkChain

        runner = get_manager().get_runner()
        proc = instantiate_process(
            runner, EmlipTrainBaseWorkChain, **_inputs(train_code, config or _config())
        )
        proc.setup()
        proc.ctx.children = []
        return proc

    return make


def failed_calculation(computer, exit_status: int | None, stderr: str = "", checkpoint: bool = False):
    """A stored, finished ``emlip.train`` node with ``exit_status`` (the injected fault)."""
    from aiida.common.links import LinkType
    from aiida.orm import CalcJobNode, FolderData, SinglefileData
    from plumpy import ProcessState

    node = CalcJobNode(computer=computer, process_type="aiida.calculations:emlip.train")
    node.set_process_label("EmlipTrainCalculation")
    node.set_option("resources", {"num_machines": 1})
    node.set_process_state(ProcessState.FINISHED)
    if exit_status is not None:
        node.set_exit_status(exit_status)
    node.store()
    retrieved = FolderData()
    retrieved.base.repository.put_object_from_filelike(io.BytesIO(stderr.encode()), "stderr")
    retrieved.base.links.add_incoming(node, link_type=LinkType.CREATE, link_label="retrieved")
    retrieved.store()
    if checkpoint:
        saved = SinglefileData(io.BytesIO(b"checkpoint bytes"), filename="checkpoint.pt")
        saved.base.links.add_incoming(node, link_type=LinkType.CREATE, link_label="checkpoint")
        saved.store()
    return node


def _inspect(proc, node):
    """What ``inspect_process`` returns for ``node`` as the latest child."""
    proc.ctx.children.append(node)
    proc.ctx.iteration = len(proc.ctx.children)
    return proc.inspect_process()


DIVERGED = "error: non-finite loss at epoch 3, step 1 {'energy': nan}: stopping."


def test_non_finite_halves_the_learning_rate_twice_then_gives_up(process, train_code):
    """Fault injection: three calculations that stop on NaN/inf in training (exit code 320)."""
    proc = process()
    computer = train_code.computer
    first = failed_calculation(computer, 320, DIVERGED, checkpoint=True)
    assert _inspect(proc, first).status == 0
    assert proc.ctx.inputs.lr_scale.value == 0.5
    assert proc.ctx.inputs.checkpoint.uuid == first.outputs.checkpoint.uuid
    second = failed_calculation(computer, 320, DIVERGED, checkpoint=False)
    assert _inspect(proc, second).status == 0
    assert proc.ctx.inputs.lr_scale.value == 0.25 and "checkpoint" not in proc.ctx.inputs
    assert proc.ctx.inputs.config["optimizer"]["lr"] == 0.01  # the config stays the user's
    third = failed_calculation(computer, 320, DIVERGED, checkpoint=True)
    assert _inspect(proc, third).status == 320
    assert proc.ctx.non_finite_restarts == 2


def test_non_finite_data_are_not_retried(process, train_code):
    """Fault injection: NaN in the data at load time (not in training) gives up at once."""
    proc = process()
    node = failed_calculation(
        train_code.computer, 320, "error: train.xyz: label 'energy' contains NaN or inf"
    )
    assert _inspect(proc, node).status == 320 and "lr_scale" not in proc.ctx.inputs


def test_scf_failure_flags_once_then_gives_up(process, train_code):
    """Fault injection: SCF failures (exit code 340) of an ``scf`` head."""
    config = _config(model={**CONFIG["model"], "head": {"name": "scf"}})
    proc = process(config)
    computer = train_code.computer
    assert _inspect(proc, failed_calculation(computer, 340, checkpoint=True)).status == 0
    assert proc.ctx.inputs.config["model"]["head"] == {"name": "scf", "on_failure": "flag"}
    assert "checkpoint" not in proc.ctx.inputs  # the model config changed: from scratch
    assert _inspect(proc, failed_calculation(computer, 340)).status == 340


def test_scf_failure_with_flag_lowers_the_mixing(process, train_code):
    config = _config(model={**CONFIG["model"], "head": {"name": "scf", "on_failure": "flag"}})
    proc = process(config)
    assert _inspect(proc, failed_calculation(train_code.computer, 340)).status == 0
    assert proc.ctx.inputs.config["model"]["head"]["mixing"] == pytest.approx(0.15)


def test_out_of_memory_halves_the_batch_size_down_to_one(process, train_code):
    """Fault injection: emlip-train's out of memory (360) and the scheduler's (110)."""
    proc = process()
    computer = train_code.computer
    assert _inspect(proc, failed_calculation(computer, 360, checkpoint=True)).status == 0
    assert proc.ctx.inputs.config["data"]["batch_size"] == 2 and "checkpoint" not in proc.ctx.inputs
    assert _inspect(proc, failed_calculation(computer, 110)).status == 0
    assert proc.ctx.inputs.config["data"]["batch_size"] == 1
    assert _inspect(proc, failed_calculation(computer, 360)).status == 360


def test_walltime_resumes_or_gives_up_without_a_checkpoint(process, train_code):
    """Fault injection: the scheduler's out of walltime (120), with and without a checkpoint."""
    proc = process()
    computer = train_code.computer
    node = failed_calculation(computer, 120, checkpoint=True)
    assert _inspect(proc, node).status == 0
    assert proc.ctx.inputs.checkpoint.uuid == node.outputs.checkpoint.uuid
    assert _inspect(proc, failed_calculation(computer, 120)).status == 330


def test_parser_keeps_the_scheduler_verdict_without_an_exit_status(train_code):
    """Fault injection: a job killed before emlip-train wrote its exit status (SIGKILL at walltime)."""
    from aiida_emlip.parsers.train import EmlipTrainParser

    killed = failed_calculation(train_code.computer, 120)
    assert EmlipTrainParser(killed).parse() is None  # the scheduler's 120 stays
    unknown = failed_calculation(train_code.computer, None)
    assert EmlipTrainParser(unknown).parse().status == 300


def test_unhandled_failure_is_not_retried_and_handlers_are_ordered(process, train_code):
    """A refused config (310) is not retried; handlers are ordered by priority."""
    from aiida_emlip.workflows.train_base import EmlipTrainBaseWorkChain

    proc = process()
    assert _inspect(proc, failed_calculation(train_code.computer, 310)).status == 402
    priorities = {
        name: getattr(EmlipTrainBaseWorkChain, name).priority
        for name in ("handle_out_of_memory", "handle_non_finite", "handle_scf_failure", "handle_interrupted")
    }
    assert sorted(priorities, key=priorities.get, reverse=True) == list(priorities)
