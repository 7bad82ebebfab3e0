"""``aiida-emlip`` command line: help, doctor, demo input errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from aiida_emlip.cli.main import cli


def test_help_lists_commands() -> None:
    """The group lists setup, doctor and demo."""
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in ("setup", "doctor", "demo"):
        assert name in result.output


def test_doctor_reports_everything(cli_aiida_path: Path, emlip_cli) -> None:
    """After setup, doctor reports every essential as present and exits 0."""
    proc = emlip_cli("doctor", env={"AIIDA_PATH": str(cli_aiida_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "pw.x" in out and "PWSCF v.6" in out
    assert "ld1.x" in out and "LD1 v.6" in out
    assert "torch" in out and "device:" in out
    assert "profile    emlip" in out
    assert "core.sqlite_dos" in out
    assert "broker     none" in out
    assert "pw@localhost" in out
    assert "emlip-ld1-pbe-v1: " in out and " H," in out and " O" in out
    assert "MISSING" not in out
    assert "All essentials present." in out


def test_doctor_before_setup(tmp_path: Path, emlip_cli) -> None:
    """Without a profile, doctor exits 1, names the fix and creates nothing."""
    aiida_path = tmp_path / "aiida"
    proc = emlip_cli("doctor", env={"AIIDA_PATH": str(aiida_path)})
    assert proc.returncode == 1
    assert "MISSING" in proc.stdout
    assert "fix: aiida-emlip setup" in proc.stdout
    assert not aiida_path.exists()


def test_demo_before_setup(tmp_path: Path, emlip_cli) -> None:
    """Without a profile, demo says to run setup first and creates nothing."""
    aiida_path = tmp_path / "aiida"
    proc = emlip_cli("demo", env={"AIIDA_PATH": str(aiida_path)})
    assert proc.returncode != 0
    assert "aiida-emlip setup" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not aiida_path.exists()


def test_demo_unknown_element_lists_available(cli_aiida_path: Path, emlip_cli) -> None:
    """A molecule with an element outside the family (N in NH3) fails, listing available elements."""
    proc = emlip_cli("demo", "--pw-only", "--molecule", "NH3", env={"AIIDA_PATH": str(cli_aiida_path)})
    assert proc.returncode != 0
    assert "N" in proc.stderr and "available" in proc.stderr
    assert "H, " in proc.stderr and "O" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_unknown_molecule(cli_aiida_path: Path, emlip_cli) -> None:
    """An unknown molecule name is a clear error, not a traceback."""
    proc = emlip_cli(
        "demo", "--pw-only", "--molecule", "NotAMolecule", env={"AIIDA_PATH": str(cli_aiida_path)}
    )
    assert proc.returncode != 0
    assert "unknown molecule" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args", [("--epochs", "-3"), ("--pw-only", "--ecutwfc", "-5"), ("--pw-only", "--box", "0")]
)
def test_demo_refuses_impossible_numbers(cli_aiida_path: Path, emlip_cli, args) -> None:
    """Negative epochs, cutoffs or boxes are refused by the option parser before anything runs."""
    proc = emlip_cli("demo", *args, env={"AIIDA_PATH": str(cli_aiida_path)}, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"Invalid value for '{args[-2]}'" in proc.stderr
    assert "Traceback" not in proc.stderr and "PwBaseWorkChain" not in proc.stdout
