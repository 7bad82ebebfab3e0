"""``aiida-emlip setup``: isolation, idempotency and the bad-input messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from services_helpers import require_services

from aiida_emlip.cache_version import CACHED_PROCESSES
from aiida_emlip.profile import PROFILE_NAME, ProfileNotFoundError, resolve_aiida_path, select_profile


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def test_resolve_aiida_path(tmp_path: Path) -> None:
    """``AIIDA_PATH`` resolves like aiida does: ``.aiida`` appended, first existing entry wins."""
    assert resolve_aiida_path(str(tmp_path)) == (tmp_path / ".aiida").resolve()
    assert resolve_aiida_path(str(tmp_path / ".aiida")) == (tmp_path / ".aiida").resolve()
    (tmp_path / "b" / ".aiida").mkdir(parents=True)
    value = os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")])
    assert resolve_aiida_path(value) == (tmp_path / "b" / ".aiida").resolve()


def test_select_profile_respects_aiida_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``AIIDA_PATH`` set, the isolated profile lives there, under the name ``emlip``."""
    monkeypatch.setenv("AIIDA_PATH", str(tmp_path))
    # Hide the loaded aiida so that select_profile does not re-point the test session's configuration.
    monkeypatch.delitem(sys.modules, "aiida.manage.configuration.settings", raising=False)
    target = select_profile(None)
    assert target.name == PROFILE_NAME
    assert target.isolated
    assert target.config_dir == (tmp_path / ".aiida").resolve()
    assert target.pseudo_dir == target.config_dir / "pseudos"


def test_setup_creates_then_reuses(cli_aiida_path: Path, emlip_cli) -> None:
    """First run (in the ``cli_aiida_path`` fixture) created everything; a second run reuses all, fast."""
    config = json.loads((cli_aiida_path / "config.json").read_text())
    assert PROFILE_NAME in config["profiles"]
    profile = config["profiles"][PROFILE_NAME]
    assert profile["storage"]["backend"] == "core.sqlite_dos"
    assert profile.get("process_control", {}).get("backend") is None
    assert any((cli_aiida_path / "pseudos").glob("*.UPF"))

    before = _tree(cli_aiida_path / "pseudos")
    start = time.perf_counter()
    proc = emlip_cli("setup", env={"AIIDA_PATH": str(cli_aiida_path)})
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    items = [line.split()[0] for line in lines]
    assert items == ["profile", "computer", *["code"] * 6, "pseudos"], proc.stdout
    assert all(line.endswith(": reused") for line in lines), proc.stdout
    assert "pw@localhost" in proc.stdout and "withmpi=False" in proc.stdout
    for code in ("pp", "projwfc", "ph", "emlip-train", "emlip-eval"):
        assert f"{code}@localhost" in proc.stdout, code
    assert _tree(cli_aiida_path / "pseudos") == before
    assert elapsed < 30, f"second setup took {elapsed:.1f} s"


def test_serial_qe_codes_run_without_the_mpi_daemon(tmp_path: Path) -> None:
    """The ``prepend_text`` of a Quantum ESPRESSO code without ``mpirun`` lets its Open MPI build
    start with no ``orted`` on the ``PATH``; a value set by the user wins; other codes get none."""
    from aiida_emlip.cli.setup import singleton_prepend
    from aiida_emlip.pseudos.generate import upf_filename

    assert singleton_prepend("quantumespresso.pw", mpi=True) == ""
    assert singleton_prepend("emlip.train", mpi=False) == ""
    prepend = singleton_prepend("quantumespresso.pw", mpi=False)
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}
    proc = _ld1(prepend, tmp_path, env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "run" / upf_filename("H")).stat().st_size > 0
    env["OMPI_MCA_ess_singleton_isolated"] = "0"
    shown = subprocess.run(
        ["/bin/bash", "-c", f"{prepend}\necho $OMPI_MCA_ess_singleton_isolated"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert shown.stdout.strip() == "0"


def _ld1(script_head: str, tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``ld1.x`` on the H input after ``script_head``, in ``tmp_path/run``."""
    from aiida_emlip.pseudos.generate import input_path

    ld1 = shutil.which("ld1.x")
    if ld1 is None:
        pytest.skip("ld1.x (Debian quantum-espresso) missing")
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    script = f"{script_head}\nexec {ld1} < {input_path('H')}"
    return subprocess.run(["/bin/bash", "-c", script], env=env, cwd=run, capture_output=True, text=True)


def test_serial_qe_codes_keep_their_mpi_session_in_their_own_directory(tmp_path: Path) -> None:
    """Open MPI 4 singletons share one session directory under ``$TMPDIR`` and remove it when they end,
    which fails a singleton starting at that moment. Made unusable here (a file in its place), it stops a
    program with the daemon setting alone; with the code's ``prepend_text`` the program keeps its session
    in its working directory and runs, and leaves nothing there; a value set by the user still wins."""
    import socket

    from aiida_emlip.cli.setup import singleton_prepend
    from aiida_emlip.pseudos.mpi_env import MPI_SINGLETON_ENV, SESSION_DIR_VARIABLE, singleton_env

    shared = tmp_path / "tmp"
    shared.mkdir()
    (shared / f"ompi.{socket.gethostname()}.{os.getuid()}").write_text("in the way")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TMPDIR": str(shared)}
    daemon_only = "\n".join(f"export {key}={value}" for key, value in MPI_SINGLETON_ENV.items())
    proc = _ld1(daemon_only, tmp_path, env)
    assert proc.returncode != 0 and "unable to create the desired directory" in proc.stdout + proc.stderr

    prepend = singleton_prepend("quantumespresso.ld1", mpi=False)
    proc = _ld1(prepend, tmp_path, env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not list((tmp_path / "run").glob("ompi.*")), "the session directory was not removed"
    # the Python runs (ld1.x of the family, pw.x of the validation helpers) get the same
    assert singleton_env(tmp_path / "run", env)[SESSION_DIR_VARIABLE] == str(tmp_path / "run")
    assert (
        singleton_env(tmp_path / "run", {SESSION_DIR_VARIABLE: "/scratch"})[SESSION_DIR_VARIABLE]
        == "/scratch"
    )
    shown = subprocess.run(
        ["/bin/bash", "-c", f"{prepend}\necho ${SESSION_DIR_VARIABLE}"],
        env={**env, SESSION_DIR_VARIABLE: "/scratch"},
        capture_output=True,
        text=True,
    )
    assert shown.stdout.strip() == "/scratch"


def test_setup_replaces_its_own_code_of_an_earlier_prepend(pw_code) -> None:
    """A code that setup made with an earlier ``prepend_text`` is relabelled and made anew (a stored code
    cannot change); a code the user made under the label keeps theirs."""
    from aiida.orm import InstalledCode, load_code

    from aiida_emlip.cli.setup import REUSED, ensure_code, singleton_prepend

    computer, exe = pw_code.computer, pw_code.get_executable()
    ours = "Quantum ESPRESSO pw.x (created by aiida-emlip setup)"
    label = f"pw-{uuid.uuid4().hex[:8]}"
    old = InstalledCode(
        computer=computer,
        filepath_executable=str(exe),
        label=label,
        description=ours,
        default_calc_job_plugin="quantumespresso.pw",
        prepend_text='export OMPI_MCA_ess_singleton_isolated="${OMPI_MCA_ess_singleton_isolated:-1}"',
    ).store()
    code, status = ensure_code(computer, exe, label=label)
    assert status == f"replaced (previous code relabelled {label}-{old.pk}@{computer.label})"
    assert code.pk != old.pk and code.prepend_text == singleton_prepend("quantumespresso.pw", mpi=False)
    assert load_code(f"{label}-{old.pk}@{computer.label}").pk == old.pk
    assert ensure_code(computer, exe, label=label) == (code, REUSED)

    mine = InstalledCode(
        computer=computer,
        filepath_executable=str(exe),
        label=f"{label}-mine",
        description="my pw.x",
        default_calc_job_plugin="quantumespresso.pw",
        prepend_text="module load qe",
    ).store()
    assert ensure_code(computer, exe, label=f"{label}-mine") == (mine, REUSED)


def test_setup_without_pw_fails_clearly(tmp_path: Path, emlip_cli) -> None:
    """No pw.x on PATH and no --pw: exit code != 0, one message naming the package and --pw."""
    aiida_path = tmp_path / "aiida"
    env = {"PATH": str(Path(sys.executable).parent), "AIIDA_PATH": str(aiida_path)}
    proc = emlip_cli("setup", env=env)
    assert proc.returncode != 0
    assert "quantum-espresso" in proc.stderr
    assert "--pw" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not aiida_path.exists(), "nothing may be created when pw.x is missing"


def test_setup_with_bad_pw_path(tmp_path: Path, emlip_cli) -> None:
    """``--pw`` pointing nowhere fails with the same hint."""
    bad = str(tmp_path / "nope" / "pw.x")
    proc = emlip_cli("setup", "--pw", bad, env={"AIIDA_PATH": str(tmp_path / "a")})
    assert proc.returncode != 0
    assert "quantum-espresso" in proc.stderr and "--pw" in proc.stderr


def test_nonexistent_profile(tmp_path: Path, emlip_cli) -> None:
    """``--profile`` with an unknown name: clear message, exit != 0, nothing created anywhere."""
    aiida_path = tmp_path / "aiida"
    home = tmp_path / "home"
    home.mkdir()
    env = {"AIIDA_PATH": str(aiida_path), "HOME": str(home)}
    for command in ("setup", "doctor", "demo"):
        proc = emlip_cli(command, "--profile", "no-such-profile", env=env)
        assert proc.returncode != 0, command
        assert "'no-such-profile' does not exist" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not aiida_path.exists()
    assert _tree(home) == []


def test_nonexistent_profile_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """:func:`select_profile` lists where it looked and the profiles found there."""
    monkeypatch.setenv("AIIDA_PATH", str(tmp_path))
    with pytest.raises(ProfileNotFoundError, match=r"(?s)'x' does not exist.*no profiles"):
        select_profile("x")
    assert _tree(tmp_path) == []


def test_existing_profile_option(cli_aiida_path: Path, emlip_cli) -> None:
    """``--profile NAME`` of an existing profile is used as is (reused, not created)."""
    proc = emlip_cli("setup", "--profile", PROFILE_NAME, env={"AIIDA_PATH": str(cli_aiida_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "profile   emlip" in proc.stdout and ": created" not in proc.stdout


def test_services_options_need_the_flag(tmp_path: Path, emlip_cli) -> None:
    """The connection options belong to --services: a usage error without it, and nothing is created."""
    aiida_path = tmp_path / "aiida"
    proc = emlip_cli("setup", "--db-port", "5999", env={"AIIDA_PATH": str(aiida_path)})
    assert proc.returncode == 2 and "--db-port need --services" in proc.stderr
    assert not aiida_path.exists()


def test_services_unreachable(tmp_path: Path, emlip_cli) -> None:
    """Neither service answers (closed ports): exit 3, what to run for each, nothing created or installed."""
    aiida_path = tmp_path / "aiida"
    args = ("setup", "--services", "--db-port", "1", "--broker-port", "2")
    proc = emlip_cli(*args, env={"AIIDA_PATH": str(aiida_path)})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "PostgreSQL is not reachable at 127.0.0.1:1." in proc.stderr
    assert "RabbitMQ is not reachable at 127.0.0.1:2." in proc.stderr
    assert "service postgresql start" in proc.stderr or "apt-get install -y postgresql" in proc.stderr
    assert "Nothing was created" in proc.stderr and "Traceback" not in proc.stderr
    assert "$ " not in proc.stdout  # no command was run: installing needs --install-services
    assert not aiida_path.exists()


def _delete_services_profile(aiida_path: Path, name: str) -> None:
    code = (
        "from aiida_emlip.profile import select_services_profile\n"
        "from aiida_emlip.services.profile import delete_services_profile\n"
        f"delete_services_profile(select_services_profile({name!r}).name)\n"
    )
    env = {**os.environ, "AIIDA_PATH": str(aiida_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.daemon
def test_services_profile_created_then_reused(cli_aiida_path: Path, emlip_cli, tmp_path: Path) -> None:
    """With the services: a psql_dos + RabbitMQ profile with the SQLite profile's set-up, then reused."""
    require_services()
    name = f"emlip-test-{uuid.uuid4().hex[:6]}"
    env = {"AIIDA_PATH": str(cli_aiida_path)}
    try:
        first = emlip_cli("setup", "--services", "--profile", name, env=env)
        assert first.returncode == 0, first.stdout + first.stderr
        config = json.loads((cli_aiida_path / "config.json").read_text())["profiles"][name]
        assert config["storage"]["backend"] == "core.psql_dos"
        assert config["process_control"]["backend"] == "core.rabbitmq"
        assert config["storage"]["config"]["database_name"].startswith("emlip_emlip_test_")
        assert config["options"]["daemon.timeout"] == 20 and config["options"]["runner.poll.interval"] == 1
        assert config["options"]["caching.enabled_for"] == list(CACHED_PROCESSES)
        assert f"profile   {name} (core.psql_dos, core.rabbitmq)" in first.stdout
        assert "created (database locale " in first.stdout
        assert f"verdi -p {name} daemon start 2" in first.stdout
        second = emlip_cli("setup", "--services", "--profile", name, env=env)
        assert second.returncode == 0, second.stdout + second.stderr
        lines = [
            line
            for line in second.stdout.splitlines()
            if line.split()[0] in ("profile", "computer", "code", "pseudos")
        ]
        # the same computer, codes and family as the SQLite profile's set-up, all reused now
        assert [line.split()[0] for line in lines] == ["profile", "computer", *["code"] * 6, "pseudos"]
        assert all(line.endswith(": reused") for line in lines), second.stdout
        doctor = emlip_cli("doctor", "--profile", name, env=env)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "core.psql_dos" in doctor.stdout and "core.rabbitmq reachable" in doctor.stdout
        consumer = next(line for line in doctor.stdout.splitlines() if "] consumer" in line)
        assert "consumer_timeout" in consumer
        # the daemon path accepts this profile: launch goes on to check the spec (and stops there)
        bad = tmp_path / "bad.yaml"
        bad.write_text("name: x\n")
        launch = emlip_cli("launch", str(bad), "--daemon", "--profile", name, env=env)
        assert launch.returncode == 1 and "SQLite" not in launch.stderr and "bad.yaml" in launch.stderr
    finally:
        _delete_services_profile(cli_aiida_path, name)
    assert name not in json.loads((cli_aiida_path / "config.json").read_text())["profiles"]


def test_ci_fails_rather_than_skips_without_pw(tmp_path):
    """Under CI=true a missing pw.x stops the test run with an error instead of skipping its tests."""
    import subprocess

    test_file = Path(__file__).parent / "test_qe_conventions.py"
    env = {**os.environ, "CI": "true", "EMLIP_TEST_PW_X": str(tmp_path / "no-pw.x")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--co", str(test_file)],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parent.parent,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "CI=true but pw.x is missing" in proc.stdout + proc.stderr
