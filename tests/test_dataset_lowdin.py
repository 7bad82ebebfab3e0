"""Löwdin charges (projwfc.x) in EmlipDatasetWorkChain: the stdout parser and a real pw.x + projwfc.x run."""

from __future__ import annotations

import numpy as np
import pytest
from dataset_systems import CHEAP, water

from aiida_emlip import schema
from aiida_emlip.workflows.lowdin import parse_lowdin

#: projwfc.x 6.7 on H2O in a 6 Å box (ecutwfc 25 Ry), trimmed.
STDOUT_H2O = """
 k =   0.0000000000  0.0000000000  0.0000000000
==== e(   4) =    -6.62882 eV ====
     psi = 0.990*[#   3]
    |psi|^2 = 0.990

Lowdin Charges:

     Atom #   1: total charge =   6.6922, s =  1.6609,
     Atom #   1: total charge =   6.6922, p =  5.0314, pz=  1.6973, px=  1.9799, py=  1.3542,
     Atom #   2: total charge =   0.5943, s =  0.5943,
     Atom #   2: total charge =   0.5943, p =  0.0000, pz=  0.0000, px=  0.0000, py=  0.0000,
     Atom #   3: total charge =   0.5943, s =  0.5943,
     Atom #   3: total charge =   0.5943, p =  0.0000, pz=  0.0000, px=  0.0000, py=  0.0000,
     Spilling Parameter:   0.0149

     PROJWFC      :      0.13s CPU      0.14s WALL
"""

#: The same molecule spin-polarised (nspin 2, tot_magnetization 2), trimmed to two atoms.
STDOUT_H2O_SPIN = """
Lowdin Charges:

     Atom #   1: total charge =   6.0744, s =  1.7826, p =  4.2919,
                 spin up      =   3.6213, s =  0.9484,
                 spin up      =   3.6213, p =  2.6729, pz=  0.9410, px=  0.9940, py=  0.7380,
                 spin down    =   2.4531, s =  0.8342,
                 spin down    =   2.4531, p =  1.6189, pz=  0.8853, px=  0.0000, py=  0.7337,
                 polarization =   1.1682, s =  0.1142, p =  1.0540,
     Atom #   2: total charge =   0.7711, s =  0.7711, p =  0.0000,
                 spin up      =   0.5251, s =  0.5251,
                 spin down    =   0.2460, s =  0.2460,
                 polarization =   0.2790, s =  0.2790, p =  0.0000,
     Spilling Parameter:   0.0479
"""


def test_parse_lowdin_populations():
    populations, spilling = parse_lowdin(STDOUT_H2O)
    assert populations == pytest.approx([6.6922, 0.5943, 0.5943])
    assert spilling == pytest.approx(0.0149)
    # the populations miss about spilling x N_valence electrons
    assert 8.0 - populations.sum() == pytest.approx(0.0149 * 8.0, abs=2e-3)


def test_parse_lowdin_spin_polarised_reads_totals():
    populations, spilling = parse_lowdin(STDOUT_H2O_SPIN)
    assert populations == pytest.approx([6.0744, 0.7711])
    assert spilling == pytest.approx(0.0479)


def test_parse_lowdin_rejects_missing_block():
    with pytest.raises(ValueError, match="no 'Lowdin Charges:'"):
        parse_lowdin("     PROJWFC      :      0.13s CPU\n   JOB DONE.\n")
    with pytest.raises(ValueError, match="incomplete"):
        parse_lowdin("Lowdin Charges:\n     Atom #   2: total charge =   0.5943, s =  0.5943,\n")


@pytest.mark.pw
def test_lowdin_needs_projwfc_code(pw_code, pseudo_family):
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code,
        {"h2o": orm.StructureData(ase=water())},
        pseudo_family.label,
        overrides={"postprocess": {"lowdin": True}},
    )
    _, node = run_get_node(builder)
    assert node.exit_status == EmlipDatasetWorkChain.exit_codes.ERROR_MISSING_POSTPROCESS_CODE.status
    assert "projwfc_code" in node.exit_message


@pytest.mark.pw
def test_lowdin_charges_of_water(pw_code, projwfc_code, pseudo_family):
    """pw.x → projwfc.x (a ProjwfcCalculation in the graph) → lowdin_charges of H2O in the dataset."""
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code,
        {"h2o": orm.StructureData(ase=water())},
        pseudo_family.label,
        protocol="fast",
        overrides={**CHEAP, "clean_workdir": True, "postprocess": {"lowdin": True}},
    )
    builder.projwfc_code = projwfc_code
    results, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    assert not results["report"]["postprocess_failed"]
    (projwfc,) = [c for c in node.called if c.process_label == "ProjwfcCalculation"]
    pw_calc = next(n for n in node.called_descendants if n.process_label == "PwCalculation")
    assert projwfc.inputs.parent_folder.uuid == pw_calc.outputs.remote_folder.uuid
    creator = next(n for n in node.called if n.process_label == "lowdin_charges")
    assert creator.inputs.retrieved.uuid == projwfc.outputs.retrieved.uuid
    # clean_workdir is deferred until projwfc.x has read the pw.x folder, then done for both
    assert pw_calc.outputs.remote_folder.is_empty and projwfc.outputs.remote_folder.is_empty

    (h2o,) = results["dataset"].to_ase()
    q = h2o.arrays[schema.LOWDIN_CHARGES]
    spilling = h2o.info["lowdin_spilling"]
    # Σq = 0 up to the electrons the incomplete atomic basis misses (≈ spilling × 8 valence electrons)
    assert abs(q.sum()) < 0.2
    assert q.sum() == pytest.approx(spilling * 8.0, abs=0.01)
    assert q[0] < 0 < q[1] and q[2] > 0
    assert q[1] == pytest.approx(q[2], abs=1e-3)
    assert schema.LOWDIN_CHARGES in results["dataset"].label_keys
    assert np.all(np.isfinite(q))
