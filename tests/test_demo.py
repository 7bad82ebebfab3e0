"""The demo job: a real pw.x ``PwBaseWorkChain`` on H₂O through AiiDA (no broker)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aiida_emlip.cli.demo import demo_builder, molecule_structure, run_demo


def test_molecule_structure() -> None:
    """H₂O is centred in a periodic cubic box; a too small box is refused."""
    structure = molecule_structure("H2O", 8.0)
    assert sorted(site.kind_name for site in structure.sites) == ["H", "H", "O"]
    assert np.allclose(structure.cell, 8.0 * np.eye(3))
    assert structure.pbc == (True, True, True)
    with pytest.raises(ValueError, match="too small"):
        molecule_structure("H2O", 3.0)


def test_unknown_element_lists_available(pw_code, pseudo_family) -> None:
    """An element outside the family is refused before anything runs, listing what is available."""
    from aiida_emlip.pseudos.generate import UnknownElementError

    with pytest.raises(UnknownElementError, match=r"available elements: .*\bH\b.*\bO\b") as info:
        demo_builder(pw_code, molecule_structure("NH3"), pseudo_family.label)
    assert "N" in info.value.elements


@pytest.mark.pw
def test_demo_h2o_pw(pw_code, pseudo_family) -> None:
    """PwBaseWorkChain finishes OK; H₂O energy is about −466 eV; forces are (3, 3) and sum to ~0."""
    from aiida.orm import load_node

    result = run_demo(pw_code, pseudo_family.label)
    node = load_node(result.pk)
    assert node.process_label == "PwBaseWorkChain"
    assert node.is_finished_ok, node.exit_message
    # Valence-only PBE H2O (8 electrons): about -34.4 Ry = -468 eV; the exact value depends on the
    # pseudopotentials and the cutoff, so allow a generous window around it.
    assert np.isfinite(result.energy)
    assert -490.0 < result.energy < -445.0, result.energy
    assert result.forces.shape == (3, 3)
    assert np.all(np.isfinite(result.forces))
    assert np.abs(result.forces.sum(axis=0)).max() < 0.05
    assert np.abs(result.forces).max() < 5.0


@pytest.mark.pw
def test_demo_cli(cli_aiida_path: Path, emlip_cli) -> None:
    """``aiida-emlip demo --pw-only`` prints energy, forces and the workchain PK."""
    proc = emlip_cli("demo", "--pw-only", env={"AIIDA_PATH": str(cli_aiida_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Total energy:" in proc.stdout and " eV" in proc.stdout
    assert "Forces (eV/Å):" in proc.stdout
    assert "Workchain PK:" in proc.stdout
    assert "exit status 0" in proc.stdout


@pytest.mark.pw
@pytest.mark.slow
def test_demo_study_cli(cli_aiida_path: Path, emlip_cli, tmp_path: Path) -> None:
    """``aiida-emlip demo`` (the README's main job): the demo study, its verdict and its report."""
    report = tmp_path / "report"
    env = {"AIIDA_PATH": str(cli_aiida_path)}
    proc = emlip_cli("demo", "--epochs", "2", "--output", str(report), env=env, timeout=3000)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Demo study 'demo'" in proc.stdout
    assert "DFT: pw.x on 41 configurations" in proc.stdout
    assert "Study 'demo' <" in proc.stdout and "finished OK" in proc.stdout
    assert "On the charged structures" in proc.stdout
    assert f"Report: {(report / 'index.html').resolve()}" in proc.stdout
    assert (report / "figures" / "validation_defect_formation_energy.png").is_file() or any(
        p.name.startswith("validation_defect") for p in (report / "figures").iterdir()
    )


@pytest.fixture
def demo_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``aiida-emlip demo`` with the profile, the code and the study stubbed: what it got to, in order."""
    import aiida.orm

    import aiida_emlip.cli.demo as demo_module

    calls: list[str] = []
    monkeypatch.setattr(demo_module, "target_or_exit", lambda name: calls.append("profile") or object())
    monkeypatch.setattr(demo_module, "load_or_create_profile", lambda target, create: None)
    monkeypatch.setattr(aiida.orm, "load_code", lambda label: object())
    monkeypatch.setattr(demo_module, "run_study_demo", lambda *args: calls.append("study"))
    return calls


def _demo(output: Path):
    from click.testing import CliRunner

    from aiida_emlip.cli.demo import demo

    return CliRunner().invoke(demo, ["--epochs", "1", "--output", str(output)])


def test_demo_refuses_a_foreign_output_before_the_study(tmp_path: Path, demo_calls: list[str]) -> None:
    """A directory with other files (another page's ``index.html`` too), or a file, is refused before the
    profile is loaded and the study starts; what is there stays as it was."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (foreign / "index.html").write_text("<html><title>my page</title></html>")
    result = _demo(foreign)
    assert result.exit_code == 1, result.output
    assert f"{foreign} exists and holds other files (not an aiida-emlip report)" in result.output
    assert "give an empty or new directory" in result.output and result.exception is not None
    assert "Traceback" not in result.output
    assert demo_calls == []
    assert sorted(p.name for p in foreign.iterdir()) == ["index.html", "notes.txt"]
    assert (foreign / "index.html").read_text() == "<html><title>my page</title></html>"
    a_file = tmp_path / "report.txt"
    a_file.write_text("mine")
    result = _demo(a_file)
    assert result.exit_code == 2 and "is a file" in result.output, result.output  # click's own check
    assert demo_calls == [] and a_file.read_text() == "mine"


def test_demo_accepts_its_earlier_report_and_new_or_empty_output(
    tmp_path: Path, demo_calls: list[str]
) -> None:
    """An earlier report (with or without the generator tag), an empty and a missing directory."""
    from aiida_emlip.report.html import render_report

    earlier = tmp_path / "demo-report"
    (earlier / "figures").mkdir(parents=True)
    page = render_report({}, {}, {"pk": 7, "nodes": {"study": "abc"}})["index.html"].decode()
    assert '<meta name="generator" content="aiida-emlip ' in page
    (earlier / "index.html").write_text(page)
    (earlier / "figures" / "parity_sr.png").write_bytes(b"png")
    older = tmp_path / "older-report"
    older.mkdir()
    (older / "index.html").write_text(page.replace('<meta name="generator"', '<meta name="x"'))
    empty = tmp_path / "empty"
    empty.mkdir()
    for output in (earlier, older, empty, tmp_path / "new"):
        result = _demo(output)
        assert result.exit_code == 0, result.output
    assert demo_calls == ["profile", "study"] * 4


def test_report_dir_check_with_a_study_wants_that_study(tmp_path: Path) -> None:
    """``report PK`` (the check given the study) accepts only that study's report; without a study any
    aiida-emlip report passes; a file is refused either way."""
    from types import SimpleNamespace

    import click

    from aiida_emlip.cli.study_common import check_report_dir
    from aiida_emlip.report.html import render_report

    study = SimpleNamespace(pk=7, uuid="11111111-aaaa")
    other = SimpleNamespace(pk=8, uuid="22222222-bbbb")
    output = tmp_path / "report"
    output.mkdir()
    page = render_report({}, {}, {"pk": 7, "nodes": {"study": study.uuid}})["index.html"]
    (output / "index.html").write_bytes(page)
    assert check_report_dir(output, study) == output.resolve()
    assert check_report_dir(output) == output.resolve()
    with pytest.raises(click.ClickException, match="not a report of study 8"):
        check_report_dir(output, other)
    (tmp_path / "file").write_text("x")
    with pytest.raises(click.ClickException, match="is a file"):
        check_report_dir(tmp_path / "file")
