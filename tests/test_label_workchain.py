"""EmlipLabelWorkChain alone on H₂ (real pw.x and pp.x, seconds): labels, Hirshfeld, a failed step.

The molecule lies along z in a 5 Å box at 25 Ry. A pp.x "code" that is ``/bin/false`` stands in for a
broken post-processing run: the pw.x labels must stay, in the label workchain and in the dataset.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from dataset_systems import CHEAP, in_box

from aiida_emlip import schema

pytestmark = pytest.mark.pw

BOND = 0.74  # Å


def _h2() -> Atoms:
    return in_box(Atoms("H2", positions=[[0, 0, 0], [0, 0, BOND]]), box=5.0)


@pytest.fixture(scope="module")
def false_code(pw_code):
    """``/bin/false`` as a pp.x code: the calculation runs, writes nothing and fails in the parser."""
    from aiida.common.exceptions import NotExistent
    from aiida.orm import InstalledCode, load_code

    try:
        return load_code(f"false@{pw_code.computer.label}")
    except NotExistent:
        return InstalledCode(
            computer=pw_code.computer,
            filepath_executable="/bin/false",
            label="false",
            default_calc_job_plugin="quantumespresso.pp",
            with_mpi=False,
        ).store()


def _label_builder(pw_code, pseudo_family, pp_code):
    from aiida import orm

    from aiida_emlip.workflows.label import EmlipLabelWorkChain

    structure = orm.StructureData(ase=_h2())
    kpoints = orm.KpointsData()
    kpoints.set_kpoints_mesh([1, 1, 1])
    options = {
        "resources": {"num_machines": 1, "num_mpiprocs_per_machine": 1},
        "max_wallclock_seconds": 600,
        "withmpi": False,
    }
    builder = EmlipLabelWorkChain.get_builder()
    builder.pw.pw.code = pw_code
    builder.pw.pw.structure = structure
    builder.pw.pw.parameters = orm.Dict(
        {
            "CONTROL": {"calculation": "scf", "tprnfor": True},
            "SYSTEM": {"ecutwfc": 25.0, "ecutrho": 100.0, "occupations": "fixed"},
            "ELECTRONS": {"conv_thr": 1e-8},
        }
    )
    builder.pw.pw.pseudos = pseudo_family.get_pseudos(structure=structure)
    builder.pw.pw.metadata.options = {**options, "parser_name": "emlip.pw"}
    builder.pw.kpoints = kpoints
    builder.pw.max_iterations = orm.Int(1)
    builder.postprocess = orm.Dict({"hirshfeld": True})
    builder.n_electrons = orm.Float(2.0)
    builder.pp_code = pp_code
    builder.postprocess_options = options
    return builder


def test_label_workchain_on_h2(pw_code, pp_code, pseudo_family):
    """pw.x, then pp.x's density and the Hirshfeld partition: energy, forces and multipoles of H₂."""
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.label_runs import called

    results, node = run_get_node(_label_builder(pw_code, pseudo_family, pp_code))
    assert node.is_finished_ok, node.exit_message
    assert called(node, "pw").process_label == "PwBaseWorkChain"
    assert called(node, "density").process_label == "PpCalculation"
    assert called(node, "pp") is None and called(node, "projwfc") is None  # only the step asked for

    parameters = results["pw"]["output_parameters"].get_dict()
    # H₂: −1.17 Ha = −31.8 eV all-electron; the 25 Ry cutoff leaves it a few tenths of an eV higher
    assert -32.5 < parameters["energy"] < -30.0, parameters["energy"]
    forces = results["pw"]["output_trajectory"].get_array("forces")[-1]
    assert np.allclose(forces[0], -forces[1], atol=1e-3)  # Newton's third law along the bond
    assert np.allclose(forces[:, :2], 0.0, atol=1e-3)

    multipoles = results["hirshfeld"]
    assert multipoles.creator.process_label == "hirshfeld_multipoles"
    charges, dipoles = multipoles.get_array("charges"), multipoles.get_array("dipoles")
    assert charges.sum() == pytest.approx(0.0, abs=1e-6)
    assert charges[0] == pytest.approx(charges[1], abs=1e-3)
    # each atom's electrons sit towards the bond: p = −∫ w ρ (r − R) points away from the partner
    assert dipoles[0, 2] < -1e-3 and dipoles[1, 2] > 1e-3
    assert np.allclose(dipoles[0], -dipoles[1], atol=1e-3)


def test_failed_postprocessing_keeps_pw_labels(pw_code, false_code, pseudo_family):
    """pp.x fails: exit status 402, the pw.x outputs are there, no Hirshfeld output."""
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.label import EmlipLabelWorkChain
    from aiida_emlip.workflows.label_runs import called

    results, node = run_get_node(_label_builder(pw_code, pseudo_family, false_code))
    assert node.exit_status == EmlipLabelWorkChain.exit_codes.ERROR_POSTPROCESS_FAILED.status
    assert "hirshfeld: pp.x density failed" in node.exit_message
    density = called(node, "density")
    assert density.exit_status not in (None, 0)
    assert "hirshfeld" not in results
    assert -40.0 < results["pw"]["output_parameters"]["energy"] < -20.0


def test_dataset_reports_a_failed_step_and_keeps_labels(pw_code, false_code, pseudo_family):
    """The dataset workchain: the failed step in ``postprocess_failed`` with the pp.x run, the energy kept."""
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain, labelled_by

    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code,
        {"h2": orm.StructureData(ase=_h2())},
        pseudo_family.label,
        protocol="fast",
        overrides={**CHEAP, "postprocess": {"hirshfeld": True}},
    )
    builder.pp_code = false_code
    results, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    report = results["report"].get_dict()
    assert report["n_finished"] == 1 and report["failed"] == {}
    density = [n for n in node.called_descendants if n.process_label == "PpCalculation"]
    assert len(density) == 1
    failure = report["postprocess_failed"]["h2:hirshfeld"]
    assert failure["step"] == "hirshfeld" and failure["pk"] == density[0].pk
    assert failure["exit_status"] == density[0].exit_status != 0
    assert failure["exit_message"] == (
        density[0].exit_message or f"pp.x density failed ({density[0].exit_status}); no ref_charges"
    )
    label = labelled_by(node, "h2")
    assert label.exit_status == 402
    (h2,) = results["dataset"].to_ase()
    assert h2.info[schema.ENERGY] == pytest.approx(label.outputs.pw.output_parameters["energy"])
    assert schema.CHARGES not in h2.arrays
