"""Fast tests of the offline ld1.x family: generation, cutoffs, AiiDA family, one tiny pw.x SCF."""

from __future__ import annotations

import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

from aiida_emlip.pseudos.generate import (
    ELEMENTS,
    Ld1Error,
    Ld1NotFoundError,
    UnknownElementError,
    generate_family,
    recommended_cutoffs,
    upf_filename,
)

needs_ld1 = pytest.mark.skipif(
    shutil.which("ld1.x") is None, reason="ld1.x (Debian quantum-espresso) missing"
)

#: valence charge of each element's UPF, as designed in inputs/<El>.in
VALENCE = {"H": 1, "Li": 3, "C": 4, "O": 6, "F": 7, "Na": 1, "Mg": 2, "Al": 3, "Si": 4, "Cl": 7, "Cu": 11}
ULTRASOFT = {"Li", "C", "O", "F", "Cu"}


def _header(path: Path) -> dict[str, str]:
    text = path.read_text()
    header = re.search(r"<PP_HEADER(.*?)/>", text, re.DOTALL)
    assert header is not None, f"{path} has no PP_HEADER"
    return {k: v.strip() for k, v in re.findall(r'(\w+)="([^"]*)"', header.group(1))}


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("ld1.x") is None:
        pytest.skip("ld1.x (Debian quantum-espresso) missing")
    directory = tmp_path_factory.mktemp("emlip_family")
    generate_family(directory)
    return directory


def test_elements_cover_the_brief() -> None:
    assert set(ELEMENTS) == set(VALENCE)


@needs_ld1
def test_generated_upfs_parse(family_dir: Path) -> None:
    for element in ELEMENTS:
        path = family_dir / upf_filename(element)
        header = _header(path)
        assert header["element"] == element
        assert float(header["z_valence"]) == VALENCE[element]
        assert header["functional"].upper() == "PBE"
        assert (header["is_ultrasoft"] == "true") == (element in ULTRASOFT)
        assert (path.parent / (path.name + ".sha256")).is_file()


@needs_ld1
def test_upfs_load_as_aiida_pseudo_upfdata(family_dir: Path) -> None:
    from aiida_pseudo.data.pseudo.upf import parse_element, parse_z_valence

    for element in ELEMENTS:
        content = (family_dir / upf_filename(element)).read_text()
        assert parse_element(content) == element
        assert parse_z_valence(content) == VALENCE[element]


@needs_ld1
def test_generation_is_idempotent(family_dir: Path, tmp_path: Path) -> None:
    mtimes = {p.name: p.stat().st_mtime_ns for p in family_dir.glob("*.UPF")}
    # a second call must not run ld1.x at all: a missing executable would raise otherwise
    paths = generate_family(family_dir, ld1=str(tmp_path / "no-such-ld1.x"))
    assert set(paths) == set(ELEMENTS)
    assert {p.name: p.stat().st_mtime_ns for p in family_dir.glob("*.UPF")} == mtimes
    # a stale input hash triggers regeneration of that element only
    stamp = family_dir / (upf_filename("H") + ".sha256")
    stamp.write_text("0" * 64 + "\n")
    generate_family(family_dir, ["H", "O"])
    assert (family_dir / upf_filename("H")).stat().st_mtime_ns != mtimes[upf_filename("H")]
    assert (family_dir / upf_filename("O")).stat().st_mtime_ns == mtimes[upf_filename("O")]
    assert stamp.read_text().strip() != "0" * 64


def test_missing_ld1_names_debian_package(tmp_path: Path) -> None:
    with pytest.raises(Ld1NotFoundError, match="quantum-espresso"):
        generate_family(tmp_path, ["H"], ld1=str(tmp_path / "no-such-ld1.x"))


def test_failing_ld1_is_detected(tmp_path: Path) -> None:
    fake = tmp_path / "fake_ld1.x"
    fake.write_text(
        "#!/bin/sh\ncat > /dev/null\necho ' %%%%%%%%%%%%%%%%'\necho ' Error in routine ld1_setup'\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(Ld1Error, match=r"ld1\.x failed for H"):
        generate_family(tmp_path / "out", ["H"], ld1=str(fake))
    silent = tmp_path / "silent_ld1.x"
    silent.write_text("#!/bin/sh\ncat > /dev/null\nexit 0\n")
    silent.chmod(silent.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(Ld1Error, match="UPF written: False"):
        generate_family(tmp_path / "out", ["H"], ld1=str(silent))
    assert not (tmp_path / "out" / upf_filename("H")).exists()


@needs_ld1
def test_ld1_runs_without_the_mpi_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An Open MPI ``ld1.x`` started alone needs ``orted`` on the ``PATH`` to start unless it runs
    isolated: with a ``PATH`` that holds no ``orted`` the family is still generated."""
    ld1 = shutil.which("ld1.x")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("OMPI_MCA_ess_singleton_isolated", raising=False)
    generate_family(tmp_path / "out", ["H"], ld1=str(ld1))
    assert _header(tmp_path / "out" / upf_filename("H"))["z_valence"].startswith("1")
    # the daemon is what fails without the setting (the failure seen on busy machines)
    monkeypatch.setenv("OMPI_MCA_ess_singleton_isolated", "0")
    with pytest.raises(Ld1Error, match="Unable to start a daemon"):
        generate_family(tmp_path / "again", ["H"], ld1=str(ld1))


def test_unknown_element_lists_available(tmp_path: Path) -> None:
    with pytest.raises(UnknownElementError) as excinfo:
        generate_family(tmp_path, ["H", "Xe"])
    message = str(excinfo.value)
    assert "Xe" in message
    assert all(el in message for el in ELEMENTS)
    assert isinstance(excinfo.value, ValueError)
    with pytest.raises(UnknownElementError, match=r"available elements: .*Cu"):
        recommended_cutoffs("U")


def test_recommended_cutoffs() -> None:
    for element in ELEMENTS:
        wfc, rho = recommended_cutoffs(element)
        assert 20 <= wfc <= 120
        assert rho == pytest.approx((8 if element in ULTRASOFT else 4) * wfc)
    # the soft, core-corrected Na is cheaper than the hard (ultrasoft) F
    assert recommended_cutoffs("F")[0] > recommended_cutoffs("Na")[0]


@needs_ld1
@pytest.mark.pw
@pytest.mark.skipif(shutil.which("pw.x") is None, reason="pw.x (Debian quantum-espresso) missing")
def test_h2_scf_with_pw(family_dir: Path) -> None:
    """Three Γ-point SCF runs of H2 in a 6 Å box: the bond and total energy must be PBE-like."""
    from aiida_emlip.pseudos.pwtools import run_pw

    pseudos = {"H": family_dir / upf_filename("H")}
    wfc, rho = recommended_cutoffs("H")
    bonds = np.array([0.70, 0.75, 0.80])
    energies = []
    for d in bonds:
        atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, d]], cell=[6.0, 6.2, 6.4])
        atoms.center()
        result = run_pw(atoms, pseudos, wfc, rho)
        assert result.scf_iterations > 0
        energies.append(result.energy_ry)
    coeffs = np.polyfit(bonds, energies, 2)
    bond = -coeffs[1] / (2 * coeffs[0])
    assert coeffs[0] > 0
    assert bond == pytest.approx(0.750, abs=0.015)  # PBE H2 bond 0.750 Å
    assert min(energies) == pytest.approx(H2_ENERGY_RY, abs=0.01)


#: measured H2 total energy at 0.75 Å, 6 Å box, recommended cutoff (PBE all-electron: -2.3326 Ry)
H2_ENERGY_RY = -2.33


@needs_ld1
def test_install_family(aiida_profile, family_dir: Path, aiida_code_installed) -> None:
    """Install under a label of its own: the session's fixtures keep the default family and profile."""
    from aiida import orm
    from aiida.plugins import GroupFactory, WorkflowFactory
    from ase.build import bulk

    from aiida_emlip.pseudos.family import FAMILY_LABEL, check_elements, family_elements, install_family

    assert FAMILY_LABEL == "emlip-ld1-pbe-v1"
    label = "emlip-ld1-pbe-test-install"
    family = install_family(family_dir, label=label)
    assert isinstance(family, GroupFactory("pseudo.family.cutoffs"))
    assert family.label == label
    assert sorted(family.elements) == sorted(ELEMENTS)
    assert install_family(family_dir, label=label).pk == family.pk  # idempotent
    assert family_elements(label) == sorted(ELEMENTS)
    wfc, rho = family.get_recommended_cutoffs(elements=("Na", "Cl"), unit="Ry")
    assert (wfc, rho) == (
        max(recommended_cutoffs("Na")[0], recommended_cutoffs("Cl")[0]),
        max(recommended_cutoffs("Na")[1], recommended_cutoffs("Cl")[1]),
    )
    assert family.get_cutoffs_unit() == "Ry"
    assert family.get_default_stringency() == "normal"
    check_elements(label, ["Na", "Cl"])
    with pytest.raises(UnknownElementError, match=r"Fe.*available elements: Al, C, Cl, Cu, F, H, Li"):
        check_elements(label, ["Na", "Fe"])

    code = aiida_code_installed(
        default_calc_job_plugin="quantumespresso.pw", filepath_executable="/usr/bin/pw.x"
    )
    structure = orm.StructureData(ase=bulk("NaCl", "rocksalt", a=5.70))
    builder = WorkflowFactory("quantumespresso.pw.base").get_builder_from_protocol(
        code, structure, protocol="fast", overrides={"pseudo_family": label}
    )
    parameters = builder.pw.parameters.get_dict()
    assert parameters["SYSTEM"]["ecutwfc"] == pytest.approx(wfc)
    assert parameters["SYSTEM"]["ecutrho"] == pytest.approx(rho)
    assert {k: v.filename for k, v in builder.pw.pseudos.items()} == {
        "Na": upf_filename("Na"),
        "Cl": upf_filename("Cl"),
    }


def test_birch_murnaghan_fit_recovers_synthetic_minimum() -> None:
    from aiida_emlip.pseudos.pwtools import fit_birch_murnaghan

    v0, e0, b0, bp = 40.0, -10.0, 0.5, 4.5
    volumes = v0 * np.array([0.91, 0.955, 1.0, 1.045, 1.09])
    eta = (v0 / volumes) ** (2.0 / 3.0)
    energies = e0 + 9 * v0 * b0 / 16 * ((eta - 1) ** 3 * bp + (eta - 1) ** 2 * (6 - 4 * eta))
    fit_v0, fit_e0, fit_b0 = fit_birch_murnaghan(volumes, energies)
    assert fit_v0 == pytest.approx(v0, rel=1e-4)
    assert fit_e0 == pytest.approx(e0, abs=1e-6)
    assert fit_b0 == pytest.approx(b0, rel=0.05)
    with pytest.raises(ValueError, match="no minimum"):
        fit_birch_murnaghan(volumes, -energies + 0.01 * volumes)
