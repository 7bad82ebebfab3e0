"""Every study command on a tiny study with real pw.x: launch, status, report (in chromium), list, export,
reproduce into a fresh profile from the cache; and the user's mistakes as messages, not tracebacks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from services_helpers import require_services
from study_helpers import TINY_SPEC, chromium, console_errors, render_in_chromium

pytestmark = pytest.mark.pw


def _ok(proc) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _refused(proc, *fragments: str) -> str:
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert "Traceback" not in text, text
    for fragment in fragments:
        assert fragment in text, text
    return text


@pytest.fixture(scope="module")
def study(cli_aiida_path: Path, emlip_cli, tmp_path_factory):
    """The tiny study launched once through the CLI: (environment, PK, spec path)."""
    env = {"AIIDA_PATH": str(cli_aiida_path)}
    spec = tmp_path_factory.mktemp("spec") / "tiny.yaml"
    spec.write_text(TINY_SPEC)
    out = _ok(emlip_cli("launch", str(spec), env=env, timeout=1200))
    assert "valid; running study 'tiny'" in out
    assert re.search(r"Study<\d+>: DFT: pw.x on 6 configurations", out), out
    assert "finished OK" in out
    pk = re.search(r"Study 'tiny' <(\d+)>: finished OK", out).group(1)
    return env, pk, spec


def test_launch_refuses_a_bad_spec_before_creating_anything(cli_aiida_path, emlip_cli, tmp_path):
    env = {"AIIDA_PATH": str(cli_aiida_path)}
    studies = re.search(r"Studies \(\d+\)", _ok(emlip_cli("list", "studies", env=env))).group(0)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        TINY_SPEC.replace("designs: [sr, charges]", "designs: [sr, qqe]").replace("name:", "nmae:")
    )
    text = _refused(emlip_cli("launch", str(bad), env=env), "bad.yaml: 3 problems")
    assert re.search(r"bad.yaml:1: .*'name'", text) and "unknown preset" in text
    missing = emlip_cli("launch", str(tmp_path / "missing.yaml"), env=env)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    _refused(emlip_cli("status", "999999", env=env), "no node 999999")
    good = tmp_path / "good.yaml"
    good.write_text(TINY_SPEC)
    # the daemon path refuses SQLite (concurrent workers: "database is locked") before the spec is read
    _refused(
        emlip_cli("launch", str(good), "--daemon", env=env),
        "SQLite",
        "database is locked",
        "aiida-emlip setup --services",
    )
    _refused(emlip_cli("report", "1", env=env), "not a study")
    # nothing was stored: the count of studies (other tests may have made some) is unchanged
    assert studies in _ok(emlip_cli("list", "studies", env=env))


def test_daemon_refuses_sqlite_with_a_broker(tmp_path, emlip_cli):
    """An SQLite profile with a broker (as `verdi presto` makes) could start a daemon: launch refuses it."""
    require_services()
    env = {"AIIDA_PATH": str(tmp_path / "aiida")}
    verdi = Path(sys.executable).with_name("verdi")
    made = subprocess.run(
        [str(verdi), "presto", "--profile-name", "presto-sqlite"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    config = json.loads((tmp_path / "aiida" / ".aiida" / "config.json").read_text())["profiles"][
        "presto-sqlite"
    ]
    assert config["storage"]["backend"] == "core.sqlite_dos"
    assert config["process_control"]["backend"] == "core.rabbitmq"
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY_SPEC)
    text = _refused(
        emlip_cli("launch", str(spec), "--daemon", "--profile", "presto-sqlite", env=env),
        "'presto-sqlite' stores its data in SQLite",
        "database is locked",
        "aiida-emlip setup --services",
    )
    assert "has no broker" not in text
    count = (
        "from aiida import load_profile, orm; load_profile('presto-sqlite'); "
        "print(orm.QueryBuilder().append(orm.Node).count())"
    )
    nodes = subprocess.run(
        [sys.executable, "-c", count], capture_output=True, text=True, env={**os.environ, **env}, check=True
    )
    assert nodes.stdout.split()[-1] == "0", nodes.stdout  # nothing was stored


def test_status_list_and_report(study, emlip_cli, tmp_path):
    env, pk, _ = study
    out = _ok(emlip_cli("status", pk, env=env))
    assert f"Study 'tiny' <{pk}>: finished" in out
    assert "6 done, 0 running, 0 failed" in out
    assert re.search(r"sr\s+finished: 3/3 epochs", out) and re.search(r"charges\s+finished", out)
    assert "Report: ready" in out
    listing = _ok(emlip_cli("list", env=env))
    assert re.search(rf"\b{pk}\b.*finished\s+tiny", listing) and "Models (" in listing
    report_dir = tmp_path / "report"
    out = _ok(emlip_cli("report", pk, "--output", str(report_dir), env=env))
    index = report_dir / "index.html"
    assert str(index.resolve()) in out and (report_dir / "figures" / "parity_sr.png").is_file()
    _ok(emlip_cli("report", pk, "--output", str(report_dir), env=env))  # its own report: rewritten
    # the default directory, relative to where the command runs
    (tmp_path / "here").mkdir()
    out = _ok(emlip_cli("report", pk, env=env, cwd=tmp_path / "here"))
    default = tmp_path / "here" / f"study-{pk}-report" / "index.html"
    assert str(default.resolve()) in out and default.read_text() == index.read_text()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "index.html").write_text("someone else's page")
    _refused(emlip_cli("report", pk, "--output", str(foreign), env=env), "holds other files")
    assert (foreign / "index.html").read_text() == "someone else's page"
    if chromium() is None:
        pytest.skip("chromium missing (aiida-emlip setup installs it)")
    dom, console = render_in_chromium(index)
    assert console_errors(console) == []
    assert 'data-status="ok"' in dom, dom[-1500:]


def test_export_and_reproduce_in_a_fresh_profile(study, emlip_cli, tmp_path):
    env, pk, _ = study
    archive = tmp_path / "tiny.aiida"
    out = _ok(emlip_cli("export", pk, str(archive), env=env))
    assert archive.is_file() and "aiida-emlip reproduce" in out
    _refused(emlip_cli("export", pk, str(archive), env=env), "exists")
    fresh = {"AIIDA_PATH": str(tmp_path / "fresh" / ".aiida")}
    _ok(emlip_cli("setup", env=fresh))
    out = _ok(emlip_cli("reproduce", str(archive), env=fresh, timeout=1200))
    assert "The new results match the archived ones" in out, out
    cached, total = map(int, re.search(r"(\d+) of (\d+) calculations reused from the cache", out).groups())
    assert cached == total and total >= 8  # 6 pw.x, 2 trainings, 2 evaluations
    # the study's DFT dataset is the archived one, reused whole: no process per configuration
    assert "1 DFT dataset with the inputs of a finished one reused whole" in out, out


def test_status_reads_epoch_lines_of_every_head():
    """``status`` reads emlip-train's epoch line with and without an SCF mode (only SCF heads log one)."""
    from aiida_emlip.cli.study_status import _epoch_text

    plain = "[12:00:01] epoch 3 (main) train 0.61 valid 0.52 lr 0.001\n"
    scf = (
        "[12:00:01] epoch 7 (implicit, implicit) train 0.4 valid 0.3 lr 0.001\r[12:00:02] epoch 8 (main) x\n"
    )
    assert _epoch_text(plain) == "epoch 3 (main), validation loss 0.52"
    assert _epoch_text(scf) == "epoch 7 (implicit), validation loss 0.3"
    assert _epoch_text("stage 0 'main': 3 epochs\n") is None


def test_an_interrupted_study_stops_with_a_message(aiida_profile, monkeypatch, capsys):
    """Ctrl-C makes AiiDA's runner kill the study; the shell gets one line and exit 130, no traceback."""
    from plumpy.exceptions import KilledError

    import aiida_emlip.workflows.foreground as foreground
    from aiida_emlip.cli.study_common import INTERRUPTED_EXIT, run_in_shell

    def interrupted(builder):
        raise KilledError("Process was killed because the runner received an interrupt")

    monkeypatch.setattr(foreground, "run_get_node", interrupted)
    for cache, kept in ((True, "launching the same spec again reuses them"), (False, "stay in the profile")):
        with pytest.raises(SystemExit) as stopped:
            run_in_shell(None, cache)
        assert stopped.value.code == INTERRUPTED_EXIT
        err = capsys.readouterr().err
        assert "stopped: Process was killed because the runner received an interrupt" in err
        assert kept in err and "Traceback" not in err

    def twice(builder):
        raise KeyboardInterrupt

    monkeypatch.setattr(foreground, "run_get_node", twice)
    with pytest.raises(SystemExit) as stopped:
        run_in_shell(None, True)
    assert stopped.value.code == INTERRUPTED_EXIT
    err = capsys.readouterr().err
    assert "stopped at once by a second interrupt" in err and "verdi process list" in err
    assert "Traceback" not in err
