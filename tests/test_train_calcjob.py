"""``emlip.train``: emlip-train as an AiiDA calculation on localhost, with real pw.x labels."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data" / "tiny.xyz"
CONFIG = {
    "seed": 0,
    "device": "cpu",
    "data": {"valid_fraction": 0.2, "test_fraction": 0.2, "batch_size": 4},
    "model": {
        "backbone": {"num_channels": 4, "num_interactions": 1, "correlation": 2, "max_ell": 2, "r_max": 4.0},
        "head": {"name": "charges"},
    },
    "stages": [{"name": "main", "epochs": 2}],
    "checkpoint": {"every": 0},
}


def _builder(train_code, config):
    from aiida.orm import Dict

    from aiida_emlip.calculations.train import EmlipTrainCalculation
    from aiida_emlip.data.dataset import EmlipDatasetData

    builder = EmlipTrainCalculation.get_builder()
    builder.code = train_code
    builder.dataset = EmlipDatasetData.from_extxyz(DATA)
    builder.config = Dict(config)
    builder.metadata.options.max_wallclock_seconds = 600
    return builder


def test_train_calculation_produces_model(train_code):
    from aiida.engine import run_get_node

    from aiida_emlip.data.model import EmlipModelData

    results, node = run_get_node(_builder(train_code, CONFIG))
    assert node.is_finished_ok, node.exit_status
    model = results["model"]
    assert isinstance(model, EmlipModelData) and model.head_name == "charges"
    assert set(model.base.attributes.get("elements")) == {"H", "O", "Na", "Cl"}
    metrics = results["metrics"].get_dict()
    assert metrics, "metrics are empty"
    # the model node is a provenance child of the dataset it was trained on
    assert node.inputs.dataset.pk in {n.pk for n in node.base.links.get_incoming().all_nodes()}
    loaded = model.load()
    assert loaded.config.head["name"] == "charges"


def test_bad_config_is_refused_before_submission(train_code):
    from aiida.engine import run_get_node

    bad = {**CONFIG, "stages": [{"name": "main", "epochs": 2, "colour": "red"}]}
    with pytest.raises(ValueError, match="colour"):
        run_get_node(_builder(train_code, bad))
    reserved = {**CONFIG, "output_dir": "/tmp/x"}
    with pytest.raises(ValueError, match="set by the calculation"):
        run_get_node(_builder(train_code, reserved))


def test_unknown_head_and_unusable_dataset_are_refused_before_submission(train_code):
    """An unknown head or head option, an empty dataset, a loss on a label the dataset lacks: a
    ValueError naming it when the builder is filled or the calculation launched; nothing submitted."""
    from aiida.engine import run_get_node
    from ase import Atoms

    from aiida_emlip.data.dataset import EmlipDatasetData

    for head, message in (({"name": "nohead"}, "unknown head 'nohead'"), ({"name": "sr", "q": 1}, "'q'")):
        with pytest.raises(ValueError, match=message):
            _builder(train_code, {**CONFIG, "model": {**CONFIG["model"], "head": head}})
    empty = _builder(train_code, CONFIG)
    empty.dataset = EmlipDatasetData.from_ase([])
    with pytest.raises(ValueError, match="holds no configurations"):
        run_get_node(empty)
    unlabelled = _builder(train_code, CONFIG)  # structures without energies or forces
    unlabelled.dataset = EmlipDatasetData.from_ase([Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])])
    with pytest.raises(ValueError, match=r"the loss weights \['energy', 'forces'\] but no configuration"):
        run_get_node(unlabelled)
    polarizability = _builder(train_code, {**CONFIG, "loss": {"energy": 1.0, "polarizability": 1.0}})
    with pytest.raises(ValueError, match=r"the loss weights \['polarizability'\]"):
        run_get_node(polarizability)


def test_non_finite_training_ends_with_its_exit_code(train_code):
    """A training that diverges (learning rate 1e30) stops emlip-train with status 3: exit code 320,
    whose message quotes emlip-train's reason (NaN labels never get this far: the dataset node refuses
    them)."""
    from aiida.engine import run_get_node

    config = {**CONFIG, "optimizer": {"lr": 1.0e30}}
    _, node = run_get_node(_builder(train_code, config))
    assert node.exit_status == 320, node.exit_message
    assert "non-finite loss at epoch" in node.exit_message


def _job_script(builder) -> str:
    """The job script of a dry run of ``builder`` (nothing submitted, nothing stored)."""
    from aiida.engine import run_get_node

    builder.metadata.dry_run = True
    builder.metadata.store_provenance = False
    _, node = run_get_node(builder)
    return (Path(node.dry_run_info["folder"]) / "_aiidasubmit.sh").read_text()


def test_nproc_per_node_reaches_the_command_line(train_code, tmp_path, monkeypatch):
    """Absent or 1: the plain command; N > 1: emlip-train --nproc-per-node N (torchrun inside)."""
    monkeypatch.chdir(tmp_path)  # a dry run writes its folder under ./submit_test
    plain = _job_script(_builder(train_code, CONFIG))
    assert "'config.yaml' '--resume' 'auto' '--exit-status-file' 'exit_status'" in plain
    assert "nproc" not in plain
    one = _builder(train_code, CONFIG)
    one.metadata.options.nproc_per_node = 1
    assert "nproc" not in _job_script(one)
    two = _builder(train_code, CONFIG)
    two.metadata.options.nproc_per_node = 2
    two.lr_scale = 0.5
    line = next(line for line in _job_script(two).splitlines() if "emlip-train" in line)
    command = line.split(" > ")[0].split()
    assert command[1:] == [
        "'config.yaml'",
        "'--resume'",
        "'auto'",
        "'--exit-status-file'",
        "'exit_status'",
        "'--lr-scale'",
        "'0.5'",
        "'--nproc-per-node'",
        "'2'",
    ], line


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "nproc_per_node must be at least 1, got 0"),
        (-2, "nproc_per_node must be at least 1, got -2"),
        (2.5, "nproc_per_node must be a whole number of processes"),
        ("2", "nproc_per_node must be a whole number of processes"),
        (True, "nproc_per_node must be a whole number of processes"),
    ],
)
def test_bad_nproc_per_node_is_refused_before_submission(train_code, value, message):
    """Refused by the builder already, and by the process when the inputs come as a mapping."""
    from aiida.engine import run_get_node

    from aiida_emlip.calculations.train import EmlipTrainCalculation

    builder = _builder(train_code, CONFIG)
    with pytest.raises(ValueError, match=message):
        builder.metadata.options.nproc_per_node = value
    inputs = {key: builder[key] for key in ("code", "dataset", "config")}
    options = {"max_wallclock_seconds": 600, "nproc_per_node": value}
    with pytest.raises(ValueError, match=message):
        run_get_node(EmlipTrainCalculation, **inputs, metadata={"options": options})


def test_nproc_per_node_needs_one_machine(train_code):
    from aiida.engine import run_get_node

    builder = _builder(train_code, CONFIG)
    builder.metadata.options.nproc_per_node = 2
    builder.metadata.options.resources = {"num_machines": 2}
    with pytest.raises(ValueError, match="ask for num_machines 1"):
        run_get_node(builder)


def test_emlip_train_starts_itself_under_torchrun(tmp_path, monkeypatch, capsys):
    """--nproc-per-node N > 1 replaces emlip-train by torchrun with the same arguments; N < 1 is a usage
    error (status 2, written to the status file); under torchrun or with --check it runs as it is."""
    import os
    import sys

    from aiida_emlip.training import cli

    def exec_instead(path, command):
        raise SystemExit(("exec", path, command))

    monkeypatch.setattr(os, "execv", exec_instead)
    for name in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    argv = [str(tmp_path / "config.yaml"), "--resume", "auto", "--nproc-per-node", "3"]
    with pytest.raises(SystemExit) as launched:
        cli.train_main(argv)
    _, path, command = launched.value.code
    assert path == sys.executable
    assert command == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "3",
        "-m",
        "aiida_emlip.training.cli",
        "train",
        *argv,
    ]
    status = tmp_path / "exit_status"
    assert (
        cli.train_main(
            [str(tmp_path / "config.yaml"), "--nproc-per-node", "0", "--exit-status-file", str(status)]
        )
        == 2
    )
    assert "--nproc-per-node: nproc_per_node must be at least 1, got 0" in capsys.readouterr().err
    assert status.read_text().strip() == "2"
    # a rank of torchrun (or --check) does not launch again: it reads its config (missing here: status 2)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert cli.train_main([str(tmp_path / "config.yaml"), "--nproc-per-node", "3"]) == 2
    monkeypatch.delenv("LOCAL_RANK")
    assert cli.train_main([str(tmp_path / "config.yaml"), "--nproc-per-node", "3", "--check"]) == 2


def test_train_calculation_with_two_processes(train_code):
    """nproc_per_node 2: torchrun with two gloo ranks on the CPU; rank 0 writes the model and status."""
    from aiida.engine import run_get_node

    from aiida_emlip.data.model import EmlipModelData

    builder = _builder(train_code, CONFIG)
    builder.metadata.options.nproc_per_node = 2
    results, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_status
    assert isinstance(results["model"], EmlipModelData) and results["model"].head_name == "charges"
    assert results["metrics"]["world_size"] == 2
    assert node.get_option("nproc_per_node") == 2
    # part of the hash: a one-process result is never reused for two processes, nor the other way
    assert node.base.caching.get_objects_to_hash()["attributes"]["nproc_per_node"] == 2
    stderr = node.outputs.retrieved.base.repository.get_object_content("stderr")
    assert "emlip-train: 2 processes: torchrun --standalone --nproc_per_node 2" in stderr


def _subset(indices):
    """An ``emlip.dataset`` of the configurations ``indices`` of tiny.xyz (a new node each time)."""
    from ase.io import read

    from aiida_emlip.data.dataset import EmlipDatasetData

    frames = read(DATA, index=":")
    return EmlipDatasetData.from_ase([frames[i] for i in indices])


#: tiny.xyz split by hand: one structure of each kind in validation and in test, the rest to train on.
VALID, TEST = [5, 9, 13, 18], [4, 8, 12, 20]
TRAIN = [i for i in range(22) if i not in VALID + TEST]


def _energy_rmse_per_atom(model, dataset) -> float:
    """The RMSE (eV/atom) of ``model``'s energies on the structures of ``dataset``."""
    import numpy as np

    from aiida_emlip.analysis.long_range import predict_frames

    frames = dataset.to_ase()
    predicted = predict_frames(model, frames)
    errors = [(p.info["energy"] - f.info["energy"]) / len(f) for p, f in zip(predicted, frames, strict=True)]
    return float(np.sqrt(np.mean(np.square(errors))))


def test_valid_and_test_sets_are_input_nodes(train_code):
    """valid_set and test_set (emlip.dataset nodes) are written into the job folder like the training
    data: the metrics count their structures and the test errors are those of the model on the test
    set's structures. They are part of the hash: another test set is a new run, the same one is reused.
    The model file and the checkpoint are retrieved into the temporary folder only: stored once, as the
    model and checkpoint nodes, not also in retrieved."""
    from aiida.engine import run_get_node
    from aiida.manage.caching import enable_caching

    from aiida_emlip.data.model import EmlipModelData

    config = {**CONFIG, "checkpoint": {"every": 1}}
    builder = _builder(train_code, config)
    builder.dataset = _subset(TRAIN)
    builder.valid_set = _subset(VALID)
    builder.test_set = _subset(TEST)
    results, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    metrics = results["metrics"].get_dict()
    assert metrics["sizes"] == {"train": len(TRAIN), "valid": len(VALID), "test": len(TEST)}
    assert metrics["test"]["energy"]["all"]["count"] == len(TEST)
    expected = _energy_rmse_per_atom(results["model"].load(), builder.test_set)
    assert metrics["test"]["energy"]["all"]["rmse"] == pytest.approx(expected, rel=1e-4)
    # not the errors on the training or validation structures
    for other in (builder.dataset, builder.valid_set):
        assert _energy_rmse_per_atom(results["model"].load(), other) != pytest.approx(expected, rel=1e-2)
    job_config = node.outputs.retrieved.get_object_content("train.log")
    assert "14 train, 4 valid, 4 test structures" in job_config
    # the model and the checkpoint are nodes, not also files of retrieved
    assert isinstance(results["model"], EmlipModelData) and "checkpoint" in results
    kept = set(node.outputs.retrieved.list_object_names())
    assert {"model.safetensors", "checkpoint.pt"}.isdisjoint(kept), kept
    assert {"metrics.json", "train.log", "exit_status", "stderr"} <= kept

    with enable_caching(identifier="aiida.calculations:emlip.train"):
        same = _builder(train_code, config)
        same.dataset, same.valid_set, same.test_set = _subset(TRAIN), _subset(VALID), _subset(TEST)
        _, reused = run_get_node(same)
        assert reused.base.caching.get_cache_source() == node.uuid
        other = _builder(train_code, config)
        other.dataset, other.valid_set, other.test_set = _subset(TRAIN), _subset(VALID), _subset(TEST[:3])
        results, fresh = run_get_node(other)
        assert fresh.is_finished_ok and fresh.base.caching.get_cache_source() is None
        assert results["metrics"]["sizes"]["test"] == 3


@pytest.mark.parametrize("role", ["valid", "test"])
def test_valid_and_test_paths_are_refused(train_code, role):
    """data.valid / data.test given as a path (read on the remote, outside the provenance): refused when
    the builder is filled, with the input to use instead; the fractions stay accepted."""
    config = {**CONFIG, "data": {**CONFIG["data"], role: "/data/split.xyz"}}
    with pytest.raises(ValueError, match=rf"'data.{role}' \('/data/split.xyz'\) is a path .* {role}_set"):
        _builder(train_code, config)
    _builder(train_code, {**CONFIG, "data": {**CONFIG["data"], f"{role}_fraction": 0.3}})


def test_empty_valid_or_test_set_is_refused_before_submission(train_code):
    from aiida.engine import run_get_node

    from aiida_emlip.data.dataset import EmlipDatasetData

    for port in ("valid_set", "test_set"):
        builder = _builder(train_code, CONFIG)
        builder[port] = EmlipDatasetData.from_ase([])
        with pytest.raises(ValueError, match=rf"{port}: an unstored emlip.dataset holds no configurations"):
            run_get_node(builder)
        builder[port].store()
        with pytest.raises(ValueError, match=rf"{port}: emlip.dataset<\d+> holds no configurations"):
            run_get_node(builder)
