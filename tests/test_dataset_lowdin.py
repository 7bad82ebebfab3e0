"""Löwdin charges (projwfc.x) in EmlipDatasetWorkChain: a real pw.x + projwfc.x run."""

from __future__ import annotations

import numpy as np
import pytest
from dataset_systems import CHEAP, water

from aiida_emlip import schema
from aiida_emlip.cache_version import PROJWFC_PARSER_REVISION


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
    """pw.x → projwfc.x (emlip.projwfc: its ``lowdin`` output) → lowdin_charges of H2O in the dataset."""
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
    (projwfc,) = [c for c in node.called_descendants if c.process_label == "EmlipProjwfcCalculation"]
    pw_calc = next(n for n in node.called_descendants if n.process_label == "PwCalculation")
    assert projwfc.inputs.parent_folder.uuid == pw_calc.outputs.remote_folder.uuid
    assert projwfc.base.attributes.get("cache_version") == {"parser": PROJWFC_PARSER_REVISION}
    assert projwfc.is_finished_ok, projwfc.exit_message
    # the charges are the calculation's own output (emlip.projwfc): no calcfunction re-reads its stdout
    lowdin = projwfc.outputs.lowdin
    assert lowdin.creator.uuid == projwfc.uuid
    functions = {n.process_label for n in node.called_descendants if isinstance(n, orm.CalcFunctionNode)}
    assert not {label for label in functions if "lowdin" in label}, functions
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
    # the label is Z_val − population with Z_val of the pw.x run's pseudopotentials (O 6, H 1)
    populations = lowdin.get_array("populations")
    assert q == pytest.approx(np.array([6.0, 1.0, 1.0]) - populations, abs=1e-12)
    assert q == pytest.approx(lowdin.get_array("charges"), abs=1e-12)
    assert spilling == pytest.approx(lowdin.base.attributes.get("spilling"))
    assert schema.LOWDIN_CHARGES in results["dataset"].label_keys
    assert np.all(np.isfinite(q))
