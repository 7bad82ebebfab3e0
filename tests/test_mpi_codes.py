"""MPI codes in the dataset workchain: a code made with ``--with-mpi`` runs under ``mpirun``.

The protocol's CalcJob options say ``withmpi: false``; AiiDA refuses a calculation whose option and
code disagree (``Inconsistent requirements ...``, the calculation excepts in its presubmit), so before
the code decided, every configuration of a dataset on an MPI code (``aiida-emlip setup --mpi``, a
cluster's ``verdi code create ... --with-mpi``) failed. Here pw.x and pp.x are MPI codes on localhost:
H₂ at 25 Ry, Γ, one MPI process each (seconds).
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from ase import Atoms
from dataset_systems import CHEAP, in_box

from aiida_emlip.workflows.pw_inputs import mpi_option

#: OpenMPI's mpirun refuses root unless told (tests run as root in CI)
MPI_ROOT = "export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"


def test_mpi_option_follows_the_code():
    assert mpi_option(True, False) is True
    assert mpi_option(False, True) is False
    assert mpi_option(None, False) is False and mpi_option(None, True) is True


def _mpi_code(pw_code, label: str, executable: str, plugin: str):
    from aiida.common.exceptions import NotExistent
    from aiida.orm import InstalledCode, load_code

    try:
        return load_code(f"{label}@{pw_code.computer.label}")
    except NotExistent:
        code = InstalledCode(
            computer=pw_code.computer,
            filepath_executable=executable,
            label=label,
            default_calc_job_plugin=plugin,
            with_mpi=True,
        )
        code.prepend_text = MPI_ROOT
        return code.store()


@pytest.mark.pw
def test_dataset_runs_mpi_codes_under_mpirun(pw_code, pseudo_family):
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    if shutil.which("mpirun") is None:
        pytest.skip("mpirun missing (apt-get install -y openmpi-bin)")
    pw_mpi = _mpi_code(pw_code, "pw-mpi", pw_code.get_executable().as_posix(), "quantumespresso.pw")
    pp_mpi = _mpi_code(pw_code, "pp-mpi", shutil.which("pp.x") or "/usr/bin/pp.x", "quantumespresso.pp")
    structure = orm.StructureData(ase=in_box(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]), box=5.0))
    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_mpi, {"h2": structure}, pseudo_family.label, protocol="fast", overrides=CHEAP
    )
    assert builder.protocol_inputs["options"]["withmpi"] is False  # the protocol's, overruled by the code
    builder.pp_code = pp_mpi
    _, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    calcs = {n.process_label: n for n in node.called_descendants if isinstance(n, orm.CalcJobNode)}
    assert set(calcs) == {"PwCalculation", "PpCalculation"}
    for calc in calcs.values():
        assert calc.is_finished_ok, (calc.process_label, calc.exit_status, calc.exception)
        script = calc.base.repository.get_object_content("_aiidasubmit.sh")
        assert "'mpirun' '-np' '1'" in script, script


def _pooled_builder(code, pseudo_family, structures, parallelization, resources):
    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    overrides = {
        **CHEAP,
        "parallelization": parallelization,
        "options": {**CHEAP["options"], "resources": resources},
    }
    return EmlipDatasetWorkChain.get_builder_from_protocol(
        code, structures, pseudo_family.label, protocol="fast", overrides=overrides
    )


def _silicon(displace: bool = True):
    from aiida import orm
    from ase.build import bulk

    si = bulk("Si", "diamond", a=5.43)
    if displace:
        si.positions[1] += [0.06, -0.03, 0.02]  # forces that are not zero by symmetry
    return {"si": orm.StructureData(ase=si)}


@pytest.mark.parametrize(
    ("mpi", "parallelization", "resources", "status", "message"),
    [
        (False, {"npool": 2}, {"num_machines": 1}, 207, "needs pw.x under MPI, but pw@localhost runs"),
        (
            True,
            {"npool": 4},
            {"num_machines": 1, "num_mpiprocs_per_machine": 2},
            207,
            "does not divide the 2",
        ),
        # the computer's default processes per machine (1 here) count when resources do not say
        (True, {"npool": 2}, {"num_machines": 1}, 207, "does not divide the 1 MPI process"),
        (True, {"npool": 0}, {"num_machines": 1}, 202, "npool must be a positive whole number"),
    ],
    ids=["serial-code", "more-pools-than-processes", "default-processes", "zero-pools"],
)
def test_parallelization_pw_x_cannot_run_exits_before_pw_x(
    pw_code, pseudo_family, mpi, parallelization, resources, status, message
):
    """A parallelization that pw.x would stop on ends the dataset workchain in its setup: nothing runs."""
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    code = (
        _mpi_code(pw_code, "pw-mpi", pw_code.get_executable().as_posix(), "quantumespresso.pw")
        if mpi
        else pw_code
    )
    builder = EmlipDatasetWorkChain.get_builder()  # not the protocol builder: it refuses bad keys itself
    builder.code = code
    builder.pseudo_family = orm.Str(pseudo_family.label)
    builder.protocol = orm.Str("fast")
    builder.overrides = orm.Dict(
        {**CHEAP, "parallelization": parallelization, "options": {**CHEAP["options"], "resources": resources}}
    )
    builder.structures = _silicon()
    _, node = run_get_node(builder)
    assert node.exit_status == status, node.exit_message
    assert message in node.exit_message, node.exit_message
    assert not node.called_descendants, [n.process_label for n in node.called_descendants]
    assert status != 207 or EmlipDatasetWorkChain.exit_codes.ERROR_INVALID_PARALLELIZATION.status == 207


def test_pools_in_the_preview_and_on_pw_x_command_line(pw_code, pseudo_family, tmp_path, monkeypatch):
    """The preview carries the ``parallelization`` input and its flags; aiida-quantumespresso writes those
    flags on pw.x's command line of the job script (a dry run: nothing is submitted)."""
    from aiida import orm
    from aiida.engine import run_get_node
    from aiida.plugins import CalculationFactory

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain
    from aiida_emlip.workflows.pw_inputs import ConfigurationError

    pw_mpi = _mpi_code(pw_code, "pw-mpi", pw_code.get_executable().as_posix(), "quantumespresso.pw")
    two = {"num_machines": 1, "num_mpiprocs_per_machine": 2}
    structures = _silicon()
    builder = _pooled_builder(pw_mpi, pseudo_family, structures, {"npool": 2}, two)
    assert builder.protocol_inputs["parallelization"] == {"npool": 2}
    preview = EmlipDatasetWorkChain.preview_pw_inputs(builder)["si"]
    assert preview["parallelization"] == {"npool": 2} and preview["cmdline"] == ["-npool", "2"]
    assert preview["kpoints_mesh"] == [3, 3, 3]  # |b| = 2π√3/a = 2.0 1/Å at a spacing of 1.0 1/Å
    plain = EmlipDatasetWorkChain.preview_pw_inputs(
        _pooled_builder(pw_mpi, pseudo_family, structures, {}, two)
    )
    assert plain["si"]["parallelization"] == {} and plain["si"]["cmdline"] == []
    assert plain["si"]["parameters"] == preview["parameters"]  # pools change nothing of the pw.x input
    with pytest.raises(ConfigurationError, match=r"needs pw\.x under MPI") as error:
        EmlipDatasetWorkChain.preview_pw_inputs(
            _pooled_builder(pw_code, pseudo_family, structures, {"npool": 2}, two)
        )
    assert error.value.code == "ERROR_INVALID_PARALLELIZATION"

    calculation = CalculationFactory("quantumespresso.pw").get_builder()
    calculation.code = pw_mpi
    calculation.structure = structures["si"]
    calculation.parameters = orm.Dict(preview["parameters"])
    kpoints = orm.KpointsData()
    kpoints.set_kpoints_mesh(preview["kpoints_mesh"])
    calculation.kpoints = kpoints
    calculation.pseudos = pseudo_family.get_pseudos(structure=structures["si"])
    calculation.parallelization = orm.Dict(preview["parallelization"])
    calculation.metadata.options = {"resources": two, "withmpi": True}
    calculation.metadata.dry_run = True
    calculation.metadata.store_provenance = False
    monkeypatch.chdir(tmp_path)  # a dry run writes its folder into the working directory
    run_get_node(calculation)
    (script,) = tmp_path.glob("submit_test/*/_aiidasubmit.sh")
    line = next(x for x in script.read_text().splitlines() if "pw.x" in x)
    assert "'mpirun' '-np' '2'" in line and "'-npool' '2' '-in' 'aiida.in'" in line, line
    assert " ".join(f"'{flag}'" for flag in preview["cmdline"]) in line


@pytest.mark.pw
@pytest.mark.slow
def test_kpoint_pools_run_and_change_no_label(pw_code, pseudo_family):
    """pw.x under ``mpirun -np 2`` with 2 k-point pools says so (``npool = 2``), and its labels and DFT
    digest are those of the same run in one pool: pools distribute the k-points, nothing else."""
    from aiida import orm
    from aiida.engine import run_get_node

    if shutil.which("mpirun") is None:
        pytest.skip("mpirun missing (apt-get install -y openmpi-bin)")
    pw_mpi = _mpi_code(pw_code, "pw-mpi", pw_code.get_executable().as_posix(), "quantumespresso.pw")
    two = {"num_machines": 1, "num_mpiprocs_per_machine": 2}
    runs = {}
    for name, parallelization in (("one_pool", {}), ("two_pools", {"npool": 2})):
        builder = _pooled_builder(pw_mpi, pseudo_family, _silicon(), parallelization, two)
        _, node = run_get_node(builder)
        assert node.is_finished_ok, node.exit_message
        (calc,) = [n for n in node.called_descendants if isinstance(n, orm.CalcJobNode)]
        assert calc.is_finished_ok, (calc.exit_status, calc.exit_message)
        runs[name] = (node.outputs.dataset, calc)
    (one, one_calc), (two_pools, pooled_calc) = runs["one_pool"], runs["two_pools"]
    script = pooled_calc.base.repository.get_object_content("_aiidasubmit.sh")
    assert "'mpirun' '-np' '2'" in script and "'-npool' '2'" in script, script
    stdout = pooled_calc.outputs.retrieved.base.repository.get_object_content("aiida.out")
    assert re.search(r"running on\s+2 processors", stdout), stdout[:2000]
    assert re.search(r"K-points division:\s+npool\s*=\s*2\b", stdout), stdout[:2000]
    single = one_calc.outputs.retrieved.base.repository.get_object_content("aiida.out")
    assert "'-npool'" not in one_calc.base.repository.get_object_content("_aiidasubmit.sh")
    assert "K-points division" not in single  # one pool: pw.x prints no division
    k_points = int(re.search(r"number of k points=\s+(\d+)", stdout).group(1))
    assert k_points >= 2  # the pools had k-points to share
    assert two_pools.dft_settings["parallelization"] == {"npool": 2}
    assert "parallelization" not in one.dft_settings
    assert "parallelization" not in two_pools.dft_settings["protocol_inputs"]
    digest = one.base.attributes.get("dft_settings_digest")
    assert digest and two_pools.base.attributes.get("dft_settings_digest") == digest
    assert two_pools.dft_settings["digest"] == one.dft_settings["digest"]
    (a,), (b,) = one.to_ase(), two_pools.to_ase()
    assert abs(a.info["energy"] - b.info["energy"]) < 1e-5  # eV: the same SCF to its threshold
    forces = np.asarray(a.arrays["forces"])
    assert np.abs(forces).max() > 0.05  # displaced atom: real forces to compare
    assert np.abs(forces - np.asarray(b.arrays["forces"])).max() < 1e-3  # eV/Å
