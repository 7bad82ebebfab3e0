"""EmlipDatasetWorkChain with real pw.x: molecules, ions, a charged cluster, a slab, a failure."""

from __future__ import annotations

import numpy as np
import pytest
from dataset_systems import CHEAP, al_slab_water, hydronium, hydroxide, nacl, water

from aiida_emlip import schema
from aiida_emlip.cache_version import PW_PARSER_REVISION

pytestmark = pytest.mark.pw

SYSTEMS = {
    "h2o": (water, {}),
    "oh_minus": (hydroxide, {"total_charge": -1}),
    "h3o_plus": (hydronium, {"total_charge": 1}),
    "nacl": (nacl, {"config_type": "NaCl"}),
    "nacl_plus": (nacl, {"total_charge": 1, "config_type": "NaCl"}),
    "slab": (al_slab_water, {"config_type": "Al/water"}),
    "slab_nodip": (al_slab_water, {"config_type": "Al/water", "dipole_correction": False}),
    # pw.x stops at once: fewer bands than occupied states
    "broken": (water, {"parameters": {"SYSTEM": {"nbnd": 2}}}),
}


def _structures():
    from aiida import orm

    return {key: orm.StructureData(ase=factory()) for key, (factory, _) in SYSTEMS.items()}


@pytest.fixture(scope="module")
def labelled(pw_code, pseudo_family):
    """One workchain run over all systems (module scope: pw.x runs once)."""
    from aiida.engine import run_get_node

    results, node = run_get_node(_builder(pw_code, pseudo_family))
    return results, node


def _builder(pw_code, pseudo_family):
    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    return EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code,
        _structures(),
        pseudo_family.label,
        protocol="fast",
        overrides=CHEAP,
        structure_settings={key: settings for key, (_, settings) in SYSTEMS.items() if settings},
        max_concurrent=4,
    )


def test_failure_report_keeps_finished_labels(labelled):
    results, node = labelled
    assert node.is_finished_ok, node.exit_message
    report = results["report"].get_dict()
    assert set(report["failed"]) == {"broken"}
    failure = report["failed"]["broken"]
    assert failure["exit_status"] != 0 and failure["calcjob_exit_status"] not in (None, 0)
    assert report["n_finished"] == len(SYSTEMS) - 1
    dataset = results["dataset"]
    frames = {atoms.info["key"]: atoms for atoms in dataset.to_ase()}
    assert set(frames) == set(SYSTEMS) - {"broken"}
    # progress counts are reported and kept in the extras for `verdi process show` / monitoring
    assert node.base.extras.get("emlip_progress") == {
        "done": len(SYSTEMS) - 1,
        "running": 0,
        "failed": 1,
        "waiting": 0,
        "total": len(SYSTEMS),
    }


def test_labels_and_conventions(labelled):
    results, _ = labelled
    dataset = results["dataset"]
    frames = {atoms.info["key"]: atoms for atoms in dataset.to_ase()}
    assert dataset.total_charges == [-1.0, 0.0, 1.0]
    for key, atoms in frames.items():
        assert atoms.info[schema.TOTAL_CHARGE] == float(SYSTEMS[key][1].get("total_charge", 0))
        assert atoms.arrays[schema.FORCES].shape == (len(atoms), 3)
        assert atoms.info[schema.FERMI_REFERENCE] == "cell_average"
        assert np.isfinite(atoms.info[schema.FERMI_LEVEL])
        assert schema.STRESS not in atoms.info  # vacuum everywhere: no stress label
        if not key.startswith("slab"):
            assert np.abs(atoms.arrays[schema.FORCES].sum(axis=0)).max() < 0.05
    e = {key: atoms.info[schema.ENERGY] for key, atoms in frames.items()}
    # removing a proton costs ~17 eV minus the ~3 eV Madelung term of a 6 Å box; adding one gains ~7 eV + 3 eV
    assert 8.0 < e["oh_minus"] - e["h2o"] < 20.0
    assert -16.0 < e["h3o_plus"] - e["h2o"] < -4.0
    # NaCl -> NaCl+ : an ionisation energy of a few eV (plus the background term), doublet
    assert 3.0 < e["nacl_plus"] - e["nacl"] < 12.0
    assert abs(frames["nacl_plus"].info[schema.TOTAL_SPIN]) == pytest.approx(1.0, abs=0.1)
    assert frames["h2o"].info[schema.TOTAL_SPIN] == 0.0


def test_slab_dipole_correction(labelled):
    results, _ = labelled
    frames = {atoms.info["key"]: atoms for atoms in results["dataset"].to_ase()}
    corrected, plain = frames["slab"], frames["slab_nodip"]
    assert schema.DIPOLE in corrected.info and schema.DIPOLE not in plain.info
    dipole = corrected.info[schema.DIPOLE]
    assert dipole[0] == 0.0 and dipole[1] == 0.0 and abs(dipole[2]) > 1e-3
    assert corrected.info[schema.ENERGY] != pytest.approx(plain.info[schema.ENERGY], abs=1e-5)
    assert abs(corrected.info[schema.ENERGY] - plain.info[schema.ENERGY]) < 0.5


def test_planned_labels_are_the_labels_stored(labelled, pw_code, pseudo_family):
    """What plan_labels works out from the inputs alone (nothing run) is what the run stored: energy,
    forces and Fermi level for every configuration, the dipole of the slab with the dipole correction
    only, no stress (vacuum everywhere), no Hirshfeld charges (skipped without pp_code)."""
    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    results, node = labelled
    assert node.is_finished_ok, node.exit_message
    plan = EmlipDatasetWorkChain.plan_labels(_builder(pw_code, pseudo_family))
    frames = results["dataset"].to_ase()
    assert plan.n_configurations == len(SYSTEMS) == len(frames) + 1  # "broken" fails
    for key in (schema.ENERGY, schema.FORCES, schema.FERMI_LEVEL):
        assert plan.counts[key] == len(SYSTEMS)
        assert all(key in atoms.info or key in atoms.arrays for atoms in frames), key
    stored = {
        key: sum(key in atoms.info or key in atoms.arrays for atoms in frames)
        for key in (
            schema.STRESS,
            schema.DIPOLE,
            schema.CHARGES,
            schema.ATOMIC_DIPOLES,
            schema.LOWDIN_CHARGES,
        )
    }
    assert (
        stored
        == {key: plan.counts.get(key, 0) for key in stored}
        == {**dict.fromkeys(stored, 0), schema.DIPOLE: 1}
    )
    assert plan.skipped == results["report"]["postprocess_skipped"]
    assert plan.fermi_references == {"cell_average": len(SYSTEMS)}
    assert results["report"]["fermi_references"] == ["cell_average"]


def test_dft_settings_and_provenance(labelled):
    from aiida_emlip.workflows.dataset import labelled_by, pw_run

    results, node = labelled
    dataset = results["dataset"]
    settings = dataset.dft_settings
    assert settings["ecutwfc"] == 25.0 and settings["protocol_inputs"]["protocol"] == "fast"
    assert dataset.base.attributes.get("dft_settings_digest") == settings["digest"] or settings["digest"]
    creator = dataset.creator
    assert creator.process_label == "assemble_dataset"
    # no post-processing (Hirshfeld skipped without pp_code): one PwBaseWorkChain per configuration,
    # called by the dataset workchain itself, no label workchain
    assert not [c for c in node.called_descendants if c.process_label == "EmlipLabelWorkChain"]
    pw_runs = {key: pw_run(node, key) for key in SYSTEMS}
    assert all(run.pk == labelled_by(node, key).pk for key, run in pw_runs.items())
    assert all(run.process_label == "PwBaseWorkChain" for run in pw_runs.values())
    assert pw_runs["h2o"].inputs.pw.structure.get_formula() == "H2O"
    assert len({run.pk for run in pw_runs.values()}) == len(SYSTEMS)
    # inputs of the same value are one node shared by the configurations, each with its own structure
    for port in ("max_iterations", "on_unhandled_failure", "clean_workdir"):
        assert len({run.inputs[port].pk for run in pw_runs.values()}) == 1, port
    meshes = {tuple(run.inputs.kpoints.get_kpoints_mesh()[0]) for run in pw_runs.values()}
    assert len({run.inputs.kpoints.pk for run in pw_runs.values()}) == len(meshes)
    assert len({run.inputs.pw.structure.pk for run in pw_runs.values()}) == len(SYSTEMS)
    # the assembly reads the source calculation of every configuration's labels
    sources = {str(atoms.info["key"]): atoms.info["source_uuid"] for atoms in dataset.to_ase()}
    assert "broken" not in sources and len(sources) == len(SYSTEMS) - 1
    assert sources == {key: pw_runs[key].outputs.output_parameters.creator.uuid for key in sources}


def test_caching_reuses_pw_results(labelled, pw_code, pseudo_family):
    from aiida import orm
    from aiida.engine import run_get_node
    from aiida.manage.caching import enable_caching

    from aiida_emlip.workflows.dataset import PW_CACHE_IDENTIFIER, EmlipDatasetWorkChain

    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code,
        {"h2o": orm.StructureData(ase=water())},
        pseudo_family.label,
        protocol="fast",
        overrides=CHEAP,
    )
    with enable_caching(identifier=PW_CACHE_IDENTIFIER):
        results, node = run_get_node(builder)
    assert node.is_finished_ok
    calcs = [n for n in node.called_descendants if n.process_label == "PwCalculation"]
    assert len(calcs) == 1 and calcs[0].base.caching.is_created_from_cache
    # the emlip.pw parser's revision is part of every pw.x run's hash
    assert calcs[0].base.attributes.get("cache_version") == {"parser": PW_PARSER_REVISION}
    (frame,) = results["dataset"].to_ase()
    first = {a.info["key"]: a for a in labelled[0]["dataset"].to_ase()}["h2o"]
    assert frame.info[schema.ENERGY] == pytest.approx(first.info[schema.ENERGY])


def test_protocol_and_overrides_alone_label_as_the_builder(labelled, pw_code, pseudo_family):
    """The module's run came from get_builder_from_protocol (the concrete protocol_inputs); the same
    configurations from protocol + overrides alone (the workchain merges them) run the very same pw.x
    inputs, so every pw.x calculation comes from the cache of the first run, and label alike. The
    builder's preview is what ran."""
    from aiida import orm
    from aiida.engine import run_get_node
    from aiida.manage.caching import enable_caching

    from aiida_emlip.workflows.dataset import PW_CACHE_IDENTIFIER, EmlipDatasetWorkChain, pw_run

    keys = ("h2o", "oh_minus", "nacl_plus")
    results_first, first = labelled
    assert "protocol_inputs" in first.inputs and "overrides" in first.inputs
    builder = EmlipDatasetWorkChain.get_builder()
    builder.code = pw_code
    builder.pseudo_family = orm.Str(pseudo_family.label)
    builder.protocol = orm.Str("fast")
    builder.overrides = orm.Dict(CHEAP)
    builder.structures = {key: orm.StructureData(ase=SYSTEMS[key][0]()) for key in keys}
    builder.structure_settings = orm.Dict({key: SYSTEMS[key][1] for key in keys if SYSTEMS[key][1]})
    with enable_caching(identifier=PW_CACHE_IDENTIFIER):
        results, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    assert "protocol_inputs" not in node.inputs
    calcs = [n for n in node.called_descendants if n.process_label == "PwCalculation"]
    assert len(calcs) == len(keys) and all(n.base.caching.is_created_from_cache for n in calcs)
    ran = {a.info["key"]: a for a in results["dataset"].to_ase()}
    before = {a.info["key"]: a for a in results_first["dataset"].to_ase()}
    for key in keys:
        assert ran[key].info[schema.ENERGY] == before[key].info[schema.ENERGY], key
        assert np.array_equal(ran[key].arrays[schema.FORCES], before[key].arrays[schema.FORCES]), key
    settings, settings_first = results["dataset"].dft_settings, results_first["dataset"].dft_settings
    assert settings["protocol_inputs"] == settings_first["protocol_inputs"]
    # what ran is the builder's protocol_inputs, but for the default Hirshfeld step, skipped without pp_code
    # (the scheduler options and pw.x's parallelisation are recorded apart: they do not change the labels)
    given = first.inputs.protocol_inputs.get_dict()
    concrete = {k: v for k, v in given.items() if k not in ("options", "parallelization")}
    assert concrete["postprocess"]["hirshfeld"] is True
    concrete["postprocess"]["hirshfeld"] = False
    assert settings["protocol_inputs"] == concrete
    assert results["report"]["postprocess_skipped"] == results_first["report"]["postprocess_skipped"]
    preview = EmlipDatasetWorkChain.preview_pw_inputs(builder)
    for key in keys:
        ran_parameters = pw_run(node, key).called[0].inputs.parameters.get_dict()
        ran_parameters["CONTROL"].pop("max_seconds")  # PwBaseWorkChain's, from the wallclock limit
        assert preview[key]["parameters"] == ran_parameters, key
        assert preview[key]["kpoints_mesh"] == list(pw_run(node, key).inputs.kpoints.get_kpoints_mesh()[0])


def test_slab_fermi_level_relative_to_vacuum(labelled, pw_code, pp_code, pseudo_family):
    """pp.x potential → planar average → vacuum level; the slab's μ is then measured from the vacuum.

    The pw.x runs come from the cache of the module's run (same inputs); pp.x reads their outputs.
    """
    from aiida import orm
    from aiida.engine import run_get_node
    from aiida.manage.caching import enable_caching

    from aiida_emlip.workflows.dataset import PW_CACHE_IDENTIFIER, EmlipDatasetWorkChain

    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code,
        {"slab": orm.StructureData(ase=al_slab_water()), "h2o": orm.StructureData(ase=water())},
        pseudo_family.label,
        protocol="fast",
        overrides={**CHEAP, "postprocess": {"vacuum_level": True, "hirshfeld": False}},
    )
    builder.pp_code = pp_code
    with enable_caching(identifier=PW_CACHE_IDENTIFIER):
        results, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    pp_runs = [c for c in node.called_descendants if c.process_label == "PpCalculation"]
    assert len(pp_runs) == 1 and pp_runs[0].caller.caller.pk == node.pk  # the slab's label workchain
    pw_runs = [n for n in node.called_descendants if n.process_label == "PwCalculation"]
    assert len(pw_runs) == 2 and all(n.base.caching.is_created_from_cache for n in pw_runs)
    frames = {a.info["key"]: a for a in results["dataset"].to_ase()}
    slab, molecule = frames["slab"], frames["h2o"]
    assert slab.info[schema.FERMI_REFERENCE] == "vacuum"
    assert molecule.info[schema.FERMI_REFERENCE] == "cell_average"
    # E_F − V_vac = −(work function); Al(100) ≈ 4.2 eV, water and low cutoffs shift it by < 1.5 eV
    assert -6.0 < slab.info[schema.FERMI_LEVEL] < -2.5
    raw = slab.info["fermi_level_cell_average"]
    assert slab.info[schema.FERMI_LEVEL] == pytest.approx(raw - slab.info["vacuum_level_top"])
    # the water dipole and the dipole correction make the two vacuum levels differ by ~4π d/A
    assert abs(slab.info["vacuum_level_top"] - slab.info["vacuum_level_bottom"]) > 0.05
    assert results["dataset"].base.attributes.get("fermi_references") == ["cell_average", "vacuum"]


@pytest.mark.parametrize("step", ["vacuum_level", "hirshfeld"])
def test_postprocessing_asked_for_needs_pp_code(pw_code, pseudo_family, step):
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code,
        {"h2o": orm.StructureData(ase=water())},
        pseudo_family.label,
        overrides={"postprocess": {step: True}},
    )
    _, node = run_get_node(builder)
    assert node.exit_status == EmlipDatasetWorkChain.exit_codes.ERROR_MISSING_POSTPROCESS_CODE.status


def test_default_hirshfeld_skipped_without_pp_code(labelled):
    """Hirshfeld is on by default; without pp_code it is skipped with a report line, labels kept."""
    results, node = labelled
    assert node.is_finished_ok, node.exit_message
    assert results["report"]["postprocess_skipped"] == {"hirshfeld": "on by default; no pp_code given"}
    assert schema.CHARGES not in results["dataset"].label_keys


def test_hirshfeld_reference_multipoles(labelled, pw_code, pp_code, pseudo_family):
    """pp.x density + the UPFs' free-atom densities → ref_charges and ref_dipoles of water and OH⁻.

    The pw.x runs come from the cache of the module's run (same inputs); pp.x reads their outputs.
    """
    from aiida import orm
    from aiida.engine import run_get_node
    from aiida.manage.caching import enable_caching

    from aiida_emlip.workflows.dataset import PW_CACHE_IDENTIFIER, EmlipDatasetWorkChain

    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code,
        {"h2o": orm.StructureData(ase=water()), "oh": orm.StructureData(ase=hydroxide())},
        pseudo_family.label,
        protocol="fast",
        overrides={**CHEAP, "postprocess": {"hirshfeld": True}},
        structure_settings={"oh": {"total_charge": -1}},
    )
    builder.pp_code = pp_code
    with enable_caching(identifier=PW_CACHE_IDENTIFIER):
        results, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    assert not results["report"]["postprocess_failed"]
    pw_runs = [n for n in node.called_descendants if n.process_label == "PwCalculation"]
    assert len(pw_runs) == 2 and all(n.base.caching.is_created_from_cache for n in pw_runs)
    frames = {a.info["key"]: a for a in results["dataset"].to_ase()}
    h2o, oh = frames["h2o"], frames["oh"]
    q = h2o.arrays[schema.CHARGES]
    assert q.sum() == pytest.approx(0.0, abs=1e-6) and oh.arrays[schema.CHARGES].sum() == pytest.approx(
        -1.0, abs=1e-6
    )
    assert -0.6 < q[0] < -0.15 and np.all(q[1:] > 0.05) and q[1] == pytest.approx(q[2], abs=0.02)
    # molecular dipole from the multipoles: Σ q_i R_i + Σ p_i, along the C2 axis towards the hydrogens
    positions = h2o.positions
    dipole = q @ positions + h2o.arrays[schema.ATOMIC_DIPOLES].sum(axis=0)
    axis = positions[1:].mean(axis=0) - positions[0]
    axis /= np.linalg.norm(axis)
    assert 0.25 < dipole @ axis < 0.55  # e·Å; experiment 0.385 (1.85 D)
    assert np.linalg.norm(dipole - (dipole @ axis) * axis) < 0.02
    assert {"ref_charges", "ref_dipoles"} <= set(results["dataset"].label_keys)
