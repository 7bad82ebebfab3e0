"""End to end in AiiDA: real pw.x labels → ``emlip.dataset`` → two trained designs → comparison."""

from __future__ import annotations

import math

import pytest

from aiida_emlip.workflows.demo import demo_configurations, training_builder


def test_demo_configurations_repeat_geometries_in_three_charge_states():
    configs = demo_configurations(n_geometries=2)
    assert len(configs) == 3 * (2 + 1)
    by_geometry: dict[str, set[float]] = {}
    for name, atoms, charge in configs:
        by_geometry.setdefault(name.split("_")[0], set()).add(charge)
        assert atoms.pbc.all() and atoms.cell.volume == pytest.approx(9.0**3)
    assert all(charges == {-1.0, 0.0, 1.0} for charges in by_geometry.values())


def test_builder_carries_the_concrete_dft_settings_and_checks_train_options(
    pw_code, pseudo_family, train_code
):
    """The dataset namespace gets the dataset builder's protocol_inputs; nproc_per_node is checked when
    train_options are set, before anything runs."""
    from aiida import orm

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain
    from aiida_emlip.workflows.demo import DFT_OVERRIDES

    builder = training_builder(pw_code, train_code, pseudo_family.label, epochs=3, n_geometries=1)
    concrete = builder.dataset.protocol_inputs.get_dict()
    assert concrete == EmlipDatasetWorkChain.get_protocol_inputs("fast", DFT_OVERRIDES)
    builder.train_options = orm.Dict({"nproc_per_node": 2, "max_wallclock_seconds": 600})
    with pytest.raises(ValueError, match="train_options: nproc_per_node must be at least 1, got 0"):
        builder.train_options = orm.Dict({"nproc_per_node": 0})


@pytest.mark.slow
@pytest.mark.pw
def test_dft_to_models(pw_code, pseudo_family, train_code):
    from aiida.engine import run_get_node

    from aiida_emlip.data.model import EmlipModelData

    builder = training_builder(pw_code, train_code, pseudo_family.label, epochs=3, n_geometries=2)
    results, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_status
    frames = results["training_set"].to_ase()
    assert len(frames) == 9
    # MT isolation: the labels are for molecules in open space, stored as non-periodic
    assert not any(atoms.pbc.any() for atoms in frames)
    energies = {a.info["key"]: a.info["energy"] for a in frames}
    # adding an electron to neutral NaCl releases energy (positive electron affinity), removing one costs
    assert energies["nacl0_qm1"] < energies["nacl0_q0"] < energies["nacl0_qp1"]
    assert set(results["models"]) == {"sr", "charges"}
    for label, model in results["models"].items():
        assert isinstance(model, EmlipModelData) and model.head_name == label
        assert (
            model.base.links.get_incoming().first().node.inputs.dataset.uuid == results["training_set"].uuid
        )
    table = results["comparison"].get_dict()["test"]
    assert set(table) == {"sr", "charges"}
    for label in ("sr", "charges"):
        # the comparison carries each design's own test errors, overall and per charge state
        reported = results["metrics"][label].get_dict()["test"]["energy"]
        row = table[label]["energy"]
        assert row["all"]["rmse"] == reported["all"]["rmse"]
        assert math.isfinite(row["all"]["rmse"]) and row["all"]["rmse"] > 0.0
        charge_rows = {group for group in row if group.startswith("total_charge=")}
        assert charge_rows and charge_rows == {g for g in reported if g.startswith("total_charge=")}


def test_designs_are_checked_before_any_dft_or_training(train_code):
    """A design with an unknown head option is refused by the designs port (so before the dataset's
    pw.x runs); with a given training set every design is checked on it (as emlip-train --check) and a
    refused one stops the workchain with 201 before any design is submitted."""
    from pathlib import Path

    from aiida.engine import run_get_node
    from aiida.orm import Dict

    from aiida_emlip.data.dataset import EmlipDatasetData
    from aiida_emlip.workflows.training import EmlipTrainingWorkChain

    good = {
        "seed": 0,
        "device": "cpu",
        "data": {"batch_size": 4},
        "model": {
            "backbone": {"num_channels": 4, "num_interactions": 1, "r_max": 4.0},
            "head": {"name": "sr"},
        },
        "stages": [{"name": "main", "epochs": 1}],
    }
    builder = EmlipTrainingWorkChain.get_builder()
    with pytest.raises(ValueError, match=r"designs.bad: config: model: unknown option\(s\) \['colour'\]"):
        builder.designs = Dict(
            {"sr": good, "bad": {**good, "model": {**good["model"], "head": {"name": "sr", "colour": 1}}}}
        )
    builder.training_set = EmlipDatasetData.from_extxyz(Path(__file__).parent / "data" / "tiny.xyz")
    builder.train_code = train_code
    fixed = {"name": "fixed", "formal_charges": {"H": 1.0, "O": -2.0, "Na": 1.0, "Cl": -1.0}}
    builder.designs = Dict({"sr": good, "fixed": {**good, "model": {**good["model"], "head": fixed}}})
    _, node = run_get_node(builder)
    assert node.exit_status == 201, (node.exit_status, node.exit_message)
    assert "fixed:" in node.exit_message and "cannot represent" in node.exit_message
    assert "sr:" not in node.exit_message and not node.called


# ------------------------------------------------------------- labels the labelling will produce


def _design(head: str = "sr", loss: dict | None = None, **sections) -> dict:
    """A tiny emlip-train config of ``head`` with the loss weights ``loss``."""
    return {
        "seed": 0,
        "device": "cpu",
        "data": {"batch_size": 4},
        "model": {
            "backbone": {"num_channels": 4, "num_interactions": 1, "r_max": 4.0},
            "head": {"name": head},
        },
        "loss": loss or {"energy": 1.0, "forces": 10.0},
        "stages": [{"name": "main", "epochs": 1}],
        **sections,
    }


def _structures() -> dict:
    """A water molecule in an 8 Å box, a rock-salt NaCl crystal and a three-layer Al(111) slab."""
    from aiida import orm
    from ase.build import bulk, fcc111, molecule

    water = molecule("H2O")
    water.set_cell([8.0, 8.0, 8.0])
    water.center()
    water.pbc = True
    return {
        "water": orm.StructureData(ase=water),
        "nacl": orm.StructureData(ase=bulk("NaCl", "rocksalt", a=5.64)),
        "slab": orm.StructureData(ase=fcc111("Al", size=(1, 1, 3), vacuum=6.0, periodic=True)),
    }


def _labelling(pw_code, family: str, names: tuple[str, ...], overrides: dict | None = None, **codes):
    """The ``dataset`` inputs of the training workchain: ``names`` of :func:`_structures`, protocol fast."""
    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain
    from aiida_emlip.workflows.demo import DFT_OVERRIDES

    structures = _structures()
    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code,
        {name: structures[name] for name in names},
        family,
        protocol="fast",
        overrides={**DFT_OVERRIDES, **(overrides or {})},
    )
    inputs = {key: builder[key] for key in builder if builder[key] is not None}
    return {**inputs, **codes}


def _pw_calculations() -> int:
    from aiida.orm import CalcJobNode, QueryBuilder

    query = QueryBuilder().append(
        CalcJobNode, filters={"process_type": "aiida.calculations:quantumespresso.pw"}
    )
    return query.count()


def test_label_plan_follows_protocol_and_configurations(pw_code, pseudo_family, pp_code, projwfc_code):
    """What the dataset workchain will store, from its inputs alone (nothing runs): the stress of periodic
    bulk only, the dipole of slabs (dipole correction), Hirshfeld and Löwdin charges as post-processed,
    Fermi levels from the vacuum on slabs with postprocess.vacuum_level; and what each design lacks."""
    from aiida import orm

    from aiida_emlip import schema
    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain
    from aiida_emlip.workflows.training import labelling_problems

    family = pseudo_family.label
    plan = EmlipDatasetWorkChain.plan_labels(_labelling(pw_code, family, ("water",), pp_code=pp_code))
    assert plan.counts[schema.ENERGY] == plan.counts[schema.FERMI_LEVEL] == 1
    assert plan.produces(schema.CHARGES) and plan.produces(schema.ATOMIC_DIPOLES)  # on by default
    assert plan.produces(schema.STRESS) is False and plan.produces(schema.DIPOLE) is False
    assert plan.produces(schema.LOWDIN_CHARGES) is False and plan.produces(schema.POLARIZABILITY) is False
    assert plan.fermi_references == {"cell_average": 1}
    designs = {
        "sr": _design(),
        "stress": _design(loss={"energy": 1.0, "forces": 10.0, "stress": 1.0}),
        "dipole": _design("charges", loss={"energy": 1.0, "dipole": 1.0}),
        "lowdin": _design(
            "charges", loss={"energy": 1.0, "charges": 10.0}, data={"keys": {"ref_charges": "lowdin_charges"}}
        ),
        "alpha": _design(loss={"energy": 1.0, "polarizability": 1.0}),
        "hirshfeld": _design("charges", loss={"energy": 1.0, "charges": 10.0}),
    }
    problems = labelling_problems(designs, plan)
    assert [p.split(":")[0] for p in problems] == [
        "design stress",
        "design dipole",
        "design lowdin",
        "design alpha",
    ], problems
    stress, dipole, lowdin, alpha = problems
    assert "the loss weight of stress needs the label 'stress'" in stress
    assert "periodic bulk configurations only" in stress and "none of the 1 configurations" in stress
    assert "'dipole'" in dipole and "dipole_correction: true" in dipole
    assert "'lowdin_charges'" in lowdin and "postprocess.lowdin is off" in lowdin and "projwfc_code" in lowdin
    assert "emlip.dataset does not compute 'polarizability'" in alpha

    # a crystal brings the stress, a slab the dipole; Löwdin charges with postprocess.lowdin
    inputs = _labelling(
        pw_code,
        family,
        ("water", "nacl", "slab"),
        {"postprocess": {"lowdin": True}},
        pp_code=pp_code,
        projwfc_code=projwfc_code,
    )
    plan = EmlipDatasetWorkChain.plan_labels(inputs)
    assert plan.counts[schema.ENERGY] == 3
    assert plan.counts[schema.STRESS] == 1 and plan.counts[schema.DIPOLE] == 1
    assert plan.counts[schema.LOWDIN_CHARGES] == 3
    assert labelling_problems({k: v for k, v in designs.items() if k != "alpha"}, plan) == []

    # the vacuum level re-measures the slab's Fermi level: a design that uses it would mix references
    inputs = _labelling(
        pw_code, family, ("water", "slab"), {"postprocess": {"vacuum_level": True}}, pp_code=pp_code
    )
    plan = EmlipDatasetWorkChain.plan_labels(inputs)
    assert plan.fermi_references == {"cell_average": 1, "vacuum": 1}
    fermi = _design("charges", loss={"energy": 1.0, "fermi_level": 1.0})
    [mixed] = labelling_problems({"sr": _design(), "fermi": fermi}, plan)
    assert mixed.startswith("design fermi: the loss weight of fermi_level use(s) the Fermi level")
    assert "cell_average (1 configuration(s)), vacuum (1 configuration(s))" in mixed

    # a sampler's configurations are not known before it runs: nothing is refused for them
    inputs = _labelling(pw_code, family, ("water",), pp_code=pp_code)
    inputs.pop("structures")
    inputs["sampler"] = orm.Dict({"name": "rattle", "kwargs": {}})
    plan = EmlipDatasetWorkChain.plan_labels(inputs)
    assert plan.counts is None and plan.produces(schema.STRESS) is None
    assert [p.split(":")[0] for p in labelling_problems(designs, plan)] == ["design lowdin", "design alpha"]


def test_designs_are_checked_against_the_labels_before_any_dft(pw_code, pseudo_family, pp_code, train_code):
    """Given structures to label, a design whose loss needs Hirshfeld charges stops the workchain with 201
    when the dataset protocol turns Hirshfeld off (or skips it for want of a pp_code): no pw.x is run."""
    from aiida.engine import run_get_node
    from aiida.orm import Dict

    from aiida_emlip.workflows.training import EmlipTrainingWorkChain

    designs = {
        "sr": _design(),
        "charges": _design("charges", loss={"energy": 1.0, "forces": 10.0, "charges": 10.0}),
    }
    before = _pw_calculations()
    for overrides, codes, setting in (
        ({"postprocess": {"hirshfeld": False}}, {"pp_code": pp_code}, "postprocess.hirshfeld is off"),
        (
            {},
            {},
            "postprocess.hirshfeld is skipped (on by default; no pp_code given): give the dataset a pp_code",
        ),
    ):
        builder = EmlipTrainingWorkChain.get_builder()
        builder.dataset = _labelling(pw_code, pseudo_family.label, ("water",), overrides, **codes)
        builder.train_code = train_code
        builder.designs = Dict(designs)
        _, node = run_get_node(builder)
        assert node.exit_status == 201, (node.exit_status, node.exit_message)
        message = node.exit_message
        assert message.startswith(
            "design(s) need labels the labelling will not produce, nothing was submitted"
        )
        assert "design charges: the loss weight of charges needs the label 'ref_charges'" in message
        assert setting in message and "design sr" not in message
        assert not node.called
    assert _pw_calculations() == before


def test_designs_whose_labels_will_be_produced_pass_setup(pw_code, pp_code, train_code):
    """With Hirshfeld on (and a pp_code) the same design passes setup and the labelling starts: here
    it stops at once at its own check of an unknown pseudo family (301, the dataset's 205), before any
    pw.x; with Hirshfeld off the same inputs stop at setup (201)."""
    from aiida.engine import run_get_node
    from aiida.orm import Dict

    from aiida_emlip.workflows.training import EmlipTrainingWorkChain

    designs = {"charges": _design("charges", loss={"energy": 1.0, "forces": 10.0, "charges": 10.0})}
    before = _pw_calculations()
    for hirshfeld, status in ((True, 301), (False, 201)):
        builder = EmlipTrainingWorkChain.get_builder()
        builder.dataset = _labelling(
            pw_code, "no-such-family", ("water",), {"postprocess": {"hirshfeld": hirshfeld}}, pp_code=pp_code
        )
        builder.train_code = train_code
        builder.designs = Dict(designs)
        _, node = run_get_node(builder)
        assert node.exit_status == status, (node.exit_status, node.exit_message)
        if hirshfeld:
            [labelling] = node.called
            assert labelling.process_label == "EmlipDatasetWorkChain" and labelling.exit_status == 205
        else:
            assert "'ref_charges'" in node.exit_message and not node.called
    assert _pw_calculations() == before
