"""MPI codes in the dataset workchain: a code made with ``--with-mpi`` runs under ``mpirun``.

The protocol's CalcJob options say ``withmpi: false``; AiiDA refuses a calculation whose option and
code disagree (``Inconsistent requirements ...``, the calculation excepts in its presubmit), so before
the code decided, every configuration of a dataset on an MPI code (``aiida-emlip setup --mpi``, a
cluster's ``verdi code create ... --with-mpi``) failed. Here pw.x and pp.x are MPI codes on localhost:
H₂ at 25 Ry, Γ, one MPI process each (seconds).
"""

from __future__ import annotations

import shutil

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
