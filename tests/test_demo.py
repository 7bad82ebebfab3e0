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
