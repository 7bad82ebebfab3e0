"""Shared fixtures: an isolated throw-away AiiDA profile, the real ``pw.x`` code and the pseudo family.

Isolation: ``AIIDA_PATH`` points into a temporary directory *before* anything imports :mod:`aiida`,
and ``aiida.tools.pytest_fixtures`` then creates its own temporary SQLite profile (no broker) for the
session. Neither the user's ``~/.aiida`` nor the project's ``.aiida`` demo profile is touched.

``pw_code`` and ``pseudo_family`` are session-scoped nodes of that profile: a test that empties the
storage (``aiida_profile_clean``) deletes them for every later test, so do not combine the two.
Markers: ``pw`` tests are skipped without ``pw.x`` (under ``CI=true`` the run fails instead),
``cuda`` tests without a CUDA device.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

# Tiny models: one intra-op thread is faster than two, and far faster when pw.x runs beside the test
# (oversubscribed OpenMP threads spin). Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

_AIIDA_TMP = Path(tempfile.mkdtemp(prefix="emlip-pytest-aiida-"))
os.environ["AIIDA_PATH"] = str(_AIIDA_TMP)
atexit.register(shutil.rmtree, _AIIDA_TMP, ignore_errors=True)

pytest_plugins = ["aiida.tools.pytest_fixtures"]

#: pw.x of the tests (``EMLIP_TEST_PW_X`` overrides the search, e.g. to check the CI rule below)
PW_EXE = os.environ.get("EMLIP_TEST_PW_X") or shutil.which("pw.x") or "/usr/bin/pw.x"
LD1_EXE = shutil.which("ld1.x") or "/usr/bin/ld1.x"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``cuda`` tests without a CUDA device and ``pw`` tests without ``pw.x``."""
    need_cuda = any(item.get_closest_marker("cuda") for item in items)
    no_cuda = need_cuda and not _cuda_available()
    no_pw = not Path(PW_EXE).is_file()
    in_ci = os.environ.get("CI", "").lower() == "true"
    if no_pw and in_ci and any(item.get_closest_marker("pw") for item in items):
        # in CI the real pw.x tests are the point: a missing Quantum ESPRESSO fails the run, never skips
        pytest.exit(f"CI=true but pw.x is missing ({PW_EXE}): install quantum-espresso", returncode=1)
    for item in items:
        if no_cuda and item.get_closest_marker("cuda"):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (torch.cuda is not available)"))
        if no_pw and item.get_closest_marker("pw"):
            item.add_marker(pytest.mark.skip(reason="pw.x missing (apt-get install -y quantum-espresso)"))


@pytest.fixture(scope="session")
def pw_code(aiida_profile):
    """The real ``pw.x`` as ``pw@localhost`` (core.local, core.direct, withmpi False) in the test profile."""
    from aiida.common.exceptions import NotExistent
    from aiida.orm import Computer, InstalledCode, load_code, load_computer

    from aiida_emlip.cli.setup import singleton_prepend

    try:
        computer = load_computer("localhost")
    except NotExistent:
        workdir = Path(tempfile.mkdtemp(prefix="work-", dir=_AIIDA_TMP))
        computer = Computer(
            label="localhost",
            hostname="localhost",
            transport_type="core.local",
            scheduler_type="core.direct",
            workdir=str(workdir),
        ).store()
        computer.set_minimum_job_poll_interval(0.0)
        computer.set_default_mpiprocs_per_machine(1)
        computer.configure(safe_interval=0.0)
    try:
        return load_code("pw@localhost")
    except NotExistent:
        return InstalledCode(
            computer=computer,
            filepath_executable=PW_EXE,
            label="pw",
            default_calc_job_plugin="quantumespresso.pw",
            with_mpi=False,
            prepend_text=singleton_prepend("quantumespresso.pw", mpi=False),
        ).store()


@pytest.fixture(scope="session")
def pseudo_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """UPF files of the project family, generated once (cached across sessions in the pytest cache;
    without it, in pytest's own temporary folders, which it prunes)."""
    from aiida_emlip.pseudos.generate import generate_family

    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")  # one folder per xdist worker: no race
    base = (
        cache.mkdir(f"emlip-pseudos-{worker}") if cache is not None else tmp_path_factory.mktemp("emlip-upf")
    )
    generate_family(Path(base), ld1=LD1_EXE)
    return Path(base)


@pytest.fixture(scope="session")
def pseudo_family(aiida_profile, pseudo_dir: Path):
    """The project's pseudo family installed in the test profile (an aiida-pseudo family group)."""
    from aiida_emlip.pseudos.family import FAMILY_LABEL, install_family

    return install_family(pseudo_dir, label=FAMILY_LABEL)


@pytest.fixture(scope="session")
def emlip_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``aiida-emlip ARGS`` in a subprocess (in ``cwd``); keyword ``env`` entries update the environment.

    Subprocesses keep the CLI's own AiiDA configuration apart from the test session's loaded profile.
    """

    def run(
        *args: str, env: dict[str, str] | None = None, timeout: float = 600, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, **(env or {})}
        cmd = [sys.executable, "-m", "aiida_emlip.cli", *args]
        return subprocess.run(
            cmd, capture_output=True, text=True, env=full_env, timeout=timeout, check=False, cwd=cwd
        )

    return run


@pytest.fixture(scope="session")
def cli_aiida_path(tmp_path_factory: pytest.TempPathFactory, emlip_cli) -> Path:
    """An ``AIIDA_PATH`` in which ``aiida-emlip setup`` has run once (profile, computer, code, family)."""
    path = tmp_path_factory.mktemp("cli-aiida") / ".aiida"
    proc = emlip_cli("setup", env={"AIIDA_PATH": str(path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return path


def _installed_code(computer, label: str, executable: str, plugin: str):
    """``label@localhost`` of the test profile, created once (no mpirun)."""
    from aiida.common.exceptions import NotExistent
    from aiida.orm import InstalledCode, load_code

    from aiida_emlip.cli.setup import singleton_prepend

    try:
        return load_code(f"{label}@{computer.label}")
    except NotExistent:
        return InstalledCode(
            computer=computer,
            filepath_executable=executable,
            label=label,
            default_calc_job_plugin=plugin,
            with_mpi=False,
            prepend_text=singleton_prepend(plugin, mpi=False),
        ).store()


def _qe_code(pw_code, label: str):
    from aiida_emlip.cli.setup import QE_POSTPROCESSING

    program, plugin = QE_POSTPROCESSING[label]
    return _installed_code(pw_code.computer, label, shutil.which(program) or f"/usr/bin/{program}", plugin)


def _emlip_code(pw_code, label: str):
    from aiida_emlip.cli.setup import EMLIP_PROGRAMS, emlip_executable

    program, plugin = EMLIP_PROGRAMS[label]
    return _installed_code(pw_code.computer, label, str(emlip_executable(program)), plugin)


@pytest.fixture(scope="session")
def pp_code(pw_code):
    """The real pp.x as ``pp@localhost``."""
    return _qe_code(pw_code, "pp")


@pytest.fixture(scope="session")
def projwfc_code(pw_code):
    """The real projwfc.x as ``projwfc@localhost``."""
    return _qe_code(pw_code, "projwfc")


@pytest.fixture(scope="session")
def ph_code(pw_code):
    """The real ph.x as ``ph@localhost``."""
    return _qe_code(pw_code, "ph")


@pytest.fixture(scope="session")
def train_code(pw_code):
    """``emlip-train`` of this venv as an installed code on the test profile's localhost."""
    return _emlip_code(pw_code, "emlip-train")


@pytest.fixture(scope="session")
def eval_code(pw_code):
    """``emlip-eval`` of this venv as an installed code on the test profile's localhost."""
    return _emlip_code(pw_code, "emlip-eval")


@pytest.fixture(autouse=True)
def _aiida_logging_restored():
    """Give the next test AiiDA's logging as the profile had it: a ``verdi`` command run in-process
    (click's CliRunner) reconfigures logging for a terminal and drops the handler that stores process
    reports in the database, so a later test reading a workchain's reports would find none."""
    yield
    log = sys.modules.get("aiida.common.log")
    if log is None:
        return
    import logging

    stored = any(type(h).__name__ == "DBLogHandler" for h in logging.getLogger("aiida").handlers)
    if stored and not log.CLI_ACTIVE:
        return
    log.CLI_ACTIVE = None
    log.CLI_LOG_LEVEL = None
    log.configure_logging(with_orm=True)
