"""emlip-train never mixes or loses runs: occupied directories, --overwrite, the lock, atomic outputs,
checkpoints that know their data, seed and schedule, extending a finished run, corrupt checkpoints."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_helpers import DATA, config_dict, write_config

from aiida_emlip.training import atomic
from aiida_emlip.training.cli import train_main
from aiida_emlip.training.errors import ExitCode, OutputError
from aiida_emlip.training.lock import LOCK_NAME, acquire
from aiida_emlip.training.trainer import Trainer

OWN_FILES = (
    "model.safetensors",
    "metrics.json",
    "learning_curve.csv",
    "test_errors.txt",
    "checkpoint.pt",
    "config.yaml",
    "train.log",
)


def _config(tmp_path: Path, epochs: int = 1, name: str = "config.yaml", **overrides) -> Path:
    values = config_dict(tmp_path, "sr", epochs=epochs, **overrides)
    return write_config(tmp_path, values, name)


def _train(capsys, *argv) -> tuple[int, str, str]:
    code = train_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def _error_line(err: str) -> str:
    # one-line ``warning:`` notes (e.g. underdetermined reference energies) may precede the error
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished one-epoch run (model, checkpoint, config copy, ...) to copy from."""
    tmp = tmp_path_factory.mktemp("finished")
    assert train_main([str(_config(tmp))]) == 0
    return tmp / "run"


def _copy_run(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


# ------------------------------------------------------------------------- occupied directory


@pytest.mark.parametrize("present", ["all", "model.safetensors", "checkpoint.pt", "config.yaml"])
def test_directory_with_a_run_is_refused(finished, tmp_path, capsys, present):
    run = _copy_run(finished, tmp_path)
    if present != "all":
        for path in run.iterdir():
            if path.name != present:
                path.unlink()
    before = _snapshot(run)
    code, _, err = _train(capsys, _config(tmp_path))
    assert code == ExitCode.BAD_INPUT == 2
    line = _error_line(err)
    assert "already holds a run" in line and ("model.safetensors" if present == "all" else present) in line
    assert "--resume auto" in line and "--overwrite" in line
    assert _snapshot(run) == before


def test_overwrite_removes_only_own_files(finished, tmp_path, capsys):
    run = _copy_run(finished, tmp_path)
    (run / "notes.txt").write_text("mine")
    (run / ".model.safetensors.abc123.tmp").write_bytes(b"half a model")
    old_model = (run / "model.safetensors").read_bytes()
    code, _, err = _train(capsys, _config(tmp_path, epochs=2), "--overwrite")
    assert code == 0, err
    assert (run / "notes.txt").read_text() == "mine"
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))
    assert (run / "model.safetensors").read_bytes() != old_model
    log = (run / "train.log").read_text()
    assert log.count("training on") == 1  # the old log went with the old run
    assert "--overwrite: removed model.safetensors" in log and "notes.txt" not in log
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2


def test_overwrite_and_resume_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train_main([str(_config(tmp_path)), "--overwrite", "--resume", "auto"])
    assert info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change",
    [
        lambda v: v.update(colour="red"),  # bad configuration
        lambda v: v["data"].update(keys={"energy": "no_such_key"}),  # data without the label
    ],
)
def test_failing_run_leaves_an_older_run_untouched(finished, tmp_path, capsys, change):
    run = _copy_run(finished, tmp_path)
    before = _snapshot(run)
    values = config_dict(tmp_path, "sr", epochs=1)
    change(values)
    for flags in (["--overwrite"], ["--resume", "auto"], []):
        code, _, err = _train(capsys, write_config(tmp_path, values), *flags)
        assert code == ExitCode.BAD_INPUT, err
        assert _snapshot(run) == before  # no config copy, no partial file, no lock
        assert not (run / LOCK_NAME).exists()


def test_resume_auto_replaces_a_run_that_stopped_before_its_first_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("old: copy\n")
    (run / "train.log").write_text("[00:00:00] training on cpu\n")
    code, _, err = _train(capsys, _config(tmp_path, name="input.yaml"), "--resume", "auto")
    assert code == 0, err
    log = (run / "train.log").read_text()
    assert "replacing the previous attempt: removed config.yaml, train.log" in log
    assert log.count("training on") == 1


def test_resume_auto_without_checkpoint_keeps_a_finished_model(finished, tmp_path, capsys):
    run = _copy_run(finished, tmp_path)
    (run / "checkpoint.pt").unlink()
    before = _snapshot(run)
    code, _, err = _train(capsys, _config(tmp_path), "--resume", "auto")
    assert code == ExitCode.BAD_INPUT
    assert "no checkpoint checkpoint.pt" in _error_line(err)
    assert _snapshot(run) == before


def test_resume_from_elsewhere_into_another_run_is_refused(finished, tmp_path, capsys):
    run = _copy_run(finished, tmp_path)
    before = _snapshot(run)
    code, _, err = _train(capsys, _config(tmp_path), "--resume", finished / "checkpoint.pt")
    assert code == ExitCode.BAD_INPUT
    assert "holds another run" in _error_line(err)
    assert _snapshot(run) == before


def test_input_config_inside_the_output_directory(tmp_path, capsys):
    """The layout of the emlip.train calculation: config.yaml is the input, --resume auto."""
    job = tmp_path / "job"
    job.mkdir()
    values = config_dict(tmp_path, "sr", epochs=1)
    values["output_dir"] = str(job)
    config = write_config(job, values)
    text = config.read_text()
    code, _, err = _train(capsys, config, "--resume", "auto")
    assert code == 0, err
    assert config.read_text() == text  # the input is never overwritten
    assert (job / "model.safetensors").is_file() and not (job / LOCK_NAME).exists()
    code, out, err = _train(capsys, config, "--resume", "auto")  # a requeued job that had finished
    assert code == 0, err
    assert "nothing to train" in out


# ------------------------------------------------------------------------------------ lock


def test_lock_is_exclusive_and_released(tmp_path):
    lock = acquire(tmp_path)
    content = json.loads((tmp_path / LOCK_NAME).read_text())
    assert content["pid"] == os.getpid() and content["host"] == socket.gethostname()
    with pytest.raises(OutputError, match=f"locked by the running process {os.getpid()}"):
        acquire(tmp_path)
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    acquire(tmp_path).release()


def _write_lock(run: Path, pid: int, host: str | None = None) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))
    return path


def test_concurrent_run_is_refused(tmp_path, capsys):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = _write_lock(tmp_path / "run", other.pid)
        code, _, err = _train(capsys, _config(tmp_path))
        assert code == ExitCode.BAD_INPUT
        line = _error_line(err)
        assert str(lock) in line and f"running process {other.pid}" in line
        assert lock.is_file() and json.loads(lock.read_text())["pid"] == other.pid
        assert not (tmp_path / "run" / "config.yaml").exists()
    finally:
        other.kill()
        other.wait()


def test_lock_of_another_host_is_never_taken(tmp_path, capsys):
    lock = _write_lock(tmp_path / "run", 1, host="elsewhere.example")
    code, _, err = _train(capsys, _config(tmp_path))
    assert code == ExitCode.BAD_INPUT
    assert "on host elsewhere.example" in _error_line(err) and lock.is_file()


def test_stale_lock_is_reported_and_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = _write_lock(tmp_path / "run", dead.pid)
    code, _, err = _train(capsys, _config(tmp_path))
    assert code == 0, err
    assert f"took over the stale lock {lock} of pid {dead.pid}" in err
    assert "stale lock" in (tmp_path / "run" / "train.log").read_text()
    assert not lock.exists()


def test_lock_released_on_signal_and_on_error(tmp_path, capsys, monkeypatch):
    original = Trainer._epoch
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}

    def terminated(self, *args):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_epoch", terminated)
    code, _, err = _train(capsys, _config(tmp_path, epochs=2))
    assert code == ExitCode.INTERRUPTED, err
    run = tmp_path / "run"
    assert (run / "checkpoint.pt").is_file() and not (run / LOCK_NAME).exists()

    def broken(self, *args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Trainer, "_epoch", broken)
    code, _, err = _train(capsys, _config(tmp_path, epochs=2), "--resume", "auto")
    assert code == ExitCode.INTERNAL and "a bug" in err
    assert not (run / LOCK_NAME).exists()
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # handlers restored


# -------------------------------------------------------------------------- atomic outputs


def test_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def half_then_full_disk(tmp: Path) -> None:
        tmp.write_text("ne")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match=r"cannot write .*metrics.json: No space left on device"):
        atomic.write_atomic(target, half_then_full_disk)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_full_disk_at_the_end_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    replace = os.replace

    def full(src, dst):
        if Path(dst).name == "model.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", full)
    code, _, err = _train(capsys, _config(tmp_path))
    assert code == ExitCode.BAD_INPUT
    assert "model.safetensors: No space left on device" in err and "Traceback" not in err
    run = tmp_path / "run"
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert not (run / "model.safetensors").exists() and not (run / LOCK_NAME).exists()


def test_output_directory_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = _train(capsys, _config(tmp_path), "--output-dir", blocker / "run")
    assert code == ExitCode.BAD_INPUT
    assert "cannot create output directory" in _error_line(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        code, _, err = _train(capsys, _config(tmp_path))
    finally:
        run.chmod(0o755)
    assert code == ExitCode.BAD_INPUT
    assert "cannot write to output directory" in _error_line(err)


# ------------------------------------------------------------------------ checkpoint identity


def test_checkpoint_records_data_seed_and_schedule(finished):
    state = torch.load(finished / "checkpoint.pt", weights_only=True)
    identity = state["identity"]
    assert len(identity["data.sha256.train"]) == 64 and identity["seed"] == 0
    assert identity["stages[0].epochs"] == 1 and identity["data.batch_size"] == 4
    assert identity["model.head.name"] == "sr" and "optimizer.lr" in identity
    assert "output_dir" not in identity and "device" not in identity


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda v, tmp: v.update(seed=1), "seed (checkpoint 0, now 1)"),
        (lambda v, tmp: v["optimizer"].update(lr=0.02), "optimizer.lr (checkpoint 0.01, now 0.02)"),
        (lambda v, tmp: v["data"].update(batch_size=2), "data.batch_size"),
        (lambda v, tmp: v["model"]["backbone"].update(num_channels=8), "model.backbone.num_channels"),
        (lambda v, tmp: v.update(stages=[{"name": "a", "epochs": 1}, {"name": "b"}]), "stages[1].name"),
        (lambda v, tmp: v["data"].update(train=str(_edited_data(tmp))), "data.sha256.train"),
    ],
)
def test_resume_refuses_another_runs_checkpoint(finished, tmp_path, capsys, change, field):
    run = _copy_run(finished, tmp_path)
    before = _snapshot(run)
    values = config_dict(tmp_path, "sr", epochs=1)
    change(values, tmp_path)
    code, _, err = _train(capsys, write_config(tmp_path, values), "--resume", "auto")
    assert code == ExitCode.BAD_INPUT
    line = _error_line(err)
    assert "was written for a different" in line and field in line
    assert _snapshot(run) == before


def _edited_data(tmp_path: Path) -> Path:
    """The same structures with one energy rounded: the configuration is the same, the data are not."""
    path = tmp_path / "edited.xyz"
    text = DATA.read_text()
    assert "energy=-448.7666458491914" in text
    path.write_text(text.replace("energy=-448.7666458491914", "energy=-448.7666", 1))
    return path


def test_extending_a_finished_run_equals_training_longer(finished, tmp_path, capsys):
    run = _copy_run(finished, tmp_path)
    code, _, err = _train(capsys, _config(tmp_path), "--resume", "auto", "--epochs", "3")
    assert code == 0, err
    assert "extending the finished run: 2 more epoch(s)" in (run / "train.log").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and len(metrics["history"]) == 3

    straight = tmp_path / "straight"
    assert train_main([str(_config(tmp_path, epochs=3, name="c3.yaml")), "--output-dir", str(straight)]) == 0
    a = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(straight / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    before = _snapshot(run)
    code, out, err = _train(capsys, _config(tmp_path, epochs=3), "--resume", "auto")
    assert code == 0, err
    assert "nothing to train" in out and "--epochs" in out
    assert _snapshot(run) == before


def test_extending_restarts_a_cosine_schedule(tmp_path, capsys):
    config = _config(tmp_path, scheduler={"name": "cosine", "min_lr": 0.0})
    assert train_main([str(config)]) == 0
    code, _, err = _train(capsys, config, "--resume", "auto", "--epochs", "3")
    assert code == 0, err
    log = (tmp_path / "run" / "train.log").read_text()
    assert "the cosine schedule restarts at lr 0.01 over the 2 new epoch(s)" in log
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert history[1]["lr"] == pytest.approx(0.01) and 0 < history[2]["lr"] < 0.01


def test_checkpoint_without_identity_is_compared_on_its_configuration(finished, tmp_path, capsys):
    """A checkpoint of the first format (no data digests) still resumes when its configuration matches."""
    run = _copy_run(finished, tmp_path)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    del state["identity"]
    state["format"] = "aiida-emlip-checkpoint/1"
    torch.save(state, run / "checkpoint.pt")
    code, _, err = _train(capsys, _config(tmp_path, seed=5), "--resume", "auto")
    assert code == ExitCode.BAD_INPUT and "seed (checkpoint 0, now 5)" in _error_line(err)
    code, _, err = _train(capsys, _config(tmp_path), "--resume", "auto", "--epochs", "2")
    assert code == 0, err
    assert "predates data digests" in (run / "train.log").read_text()


def test_epochs_flag_cannot_cut_earlier_stages(tmp_path, capsys):
    stages = [{"name": "a", "epochs": 2}, {"name": "b", "epochs": 1}]
    code, _, err = _train(capsys, _config(tmp_path, stages=stages), "--epochs", "1")
    assert code == ExitCode.BAD_INPUT
    assert "--epochs 1: must be at least 1 and at least the 2 epoch(s)" in _error_line(err)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ corrupt checkpoints


class _Opaque:
    pass


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncated, "truncated, corrupt"),
        (lambda p: p.write_bytes(b""), "truncated, corrupt"),
        (lambda p: p.write_bytes(os.urandom(4096)), "truncated, corrupt"),
        (lambda p: torch.save({"x": _Opaque()}, p), "unpickling can run code (refused)"),
        (lambda p: p.write_bytes(pickle.dumps({"format": "x"})), "truncated, corrupt"),
        (lambda p: torch.save({"format": "something else"}, p), "is not an aiida-emlip checkpoint"),
        (lambda p: torch.save({"format": "aiida-emlip-checkpoint/2"}, p), "is incomplete"),
    ],
)
def test_corrupt_checkpoint_is_a_clear_error(finished, tmp_path, capsys, damage, message):
    run = _copy_run(finished, tmp_path)
    damage(run / "checkpoint.pt")
    for resume in ("auto", str(run / "checkpoint.pt")):
        code, _, err = _train(capsys, _config(tmp_path), "--resume", resume)
        assert code == ExitCode.BAD_INPUT
        line = _error_line(err)
        assert message in line and "weights_only" not in err
        assert not (run / LOCK_NAME).exists()


def test_help_documents_flags_and_exit_statuses(capsys):
    with pytest.raises(SystemExit):
        train_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in (
        "--overwrite",
        "--resume CHECKPOINT",
        "--epochs N",
        "emlip-train.lock",
        "locked by a running",
    ):
        assert text in out, text
    assert "nothing left to train" in out and "truncated, corrupt or another run's" in out
