"""Bad input ends in a distinct exit code before any pw.x run; sampler recipes as input."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from dataset_systems import CHEAP, in_box, water

from aiida_emlip import schema


def _run(pw_code, pseudo_family, structures, protocol="fast", overrides=None, settings=None, raw=False):
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    builder = EmlipDatasetWorkChain.get_builder()
    builder.code = pw_code
    builder.pseudo_family = orm.Str(pseudo_family.label)
    builder.protocol = orm.Str(protocol)
    builder.overrides = orm.Dict(CHEAP if overrides is None else overrides)
    builder.structures = {k: orm.StructureData(ase=a) for k, a in structures.items()}
    if settings:
        builder.structure_settings = orm.Dict(settings)
    _, node = run_get_node(builder)
    ran = {c.process_label for c in node.called_descendants}
    assert not ran & {"EmlipLabelWorkChain", "PwBaseWorkChain", "PwCalculation"}, "pw.x must not run"
    return node


BAD = {
    "ERROR_UNKNOWN_PROTOCOL": ({"w": water()}, {"protocol": "ultra"}),
    "ERROR_INVALID_OVERRIDES": ({"w": water()}, {"overrides": {"ecut": 30}}),
    "ERROR_INVALID_CONFIGURATIONS": ({"w": water()}, {"settings": {"w": {"charge": 1}}}),
    "ERROR_ELEMENT_NOT_IN_FAMILY": ({"ar": in_box(Atoms("Ar"))}, {}),
    "ERROR_NO_ELECTRONS": ({"h": in_box(Atoms("H"))}, {"settings": {"h": {"total_charge": 1}}}),
    "ERROR_ATOMS_TOO_CLOSE": ({"o2": in_box(Atoms("O2", positions=[[0, 0, 0], [0, 0, 0.3]]))}, {}),
    "ERROR_ZERO_VOLUME": (
        {
            "flat": Atoms(
                "H2", positions=[[0, 0, 0], [0.75, 0, 0]], cell=[[5, 0, 0], [0, 5, 0], [5, 5, 0]], pbc=False
            )
        },
        {},
    ),
    "ERROR_INVALID_FIELD": (
        {"bulk": Atoms("Al", cell=np.eye(3) * 2.9, pbc=True)},
        {"settings": {"bulk": {"external_field": [0.1, 0, 0]}}},
    ),
    "ERROR_IMPOSSIBLE_CHARGE_OR_SPIN": (
        {"h2": in_box(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]))},
        {"settings": {"h2": {"total_charge": -50}}},
    ),
}


@pytest.mark.parametrize("exit_code", sorted(BAD))
def test_bad_input_exit_codes(pw_code, pseudo_family, exit_code):
    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    structures, kwargs = BAD[exit_code]
    node = _run(pw_code, pseudo_family, structures, **kwargs)
    expected = getattr(EmlipDatasetWorkChain.exit_codes, exit_code).status
    assert node.exit_status == expected, node.exit_message


@pytest.mark.parametrize(
    "settings",
    [{"total_charge": "plus_one"}, {"external_field": [0.0, 0.1]}, {"total_spin": [1, 2]}],
    ids=["non-numeric-charge", "two-component-field", "list-spin"],
)
def test_settings_of_the_wrong_type_exit_203(pw_code, pseudo_family, settings):
    """A non-numeric or misshapen per-structure setting is exit 203 naming it, not an exception."""
    node = _run(pw_code, pseudo_family, {"w": water()}, settings={"w": settings})
    assert node.exit_status == 203, (node.exit_status, node.exit_message)
    assert "configuration w" in node.exit_message and next(iter(settings)) in node.exit_message


def test_exit_codes_are_distinct():
    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    statuses = [getattr(EmlipDatasetWorkChain.exit_codes, name).status for name in BAD]
    assert len(set(statuses)) == len(statuses)


def test_builder_rejects_unknown_protocol_and_overrides(pw_code, pseudo_family):
    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain
    from aiida_emlip.workflows.protocol import OverrideError, ProtocolError

    with pytest.raises(ProtocolError):
        EmlipDatasetWorkChain.get_builder_from_protocol(pw_code, {}, pseudo_family.label, protocol="ultra")
    with pytest.raises(OverrideError, match="SYSTEMS"):
        EmlipDatasetWorkChain.get_builder_from_protocol(
            pw_code, {}, pseudo_family.label, overrides={"parameters": {"SYSTEMS": {}}}
        )
    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code, {}, pseudo_family.label, protocol="precise"
    )
    assert builder.protocol.value == "stringent"
    assert builder.protocol_inputs["protocol"] == "stringent"


def test_builder_holds_the_concrete_settings(pw_code, pseudo_family):
    """Every setting of the run is in the builder before submission: the merged protocol inputs."""
    from aiida import orm

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    overrides = {**CHEAP, "parameters": {"SYSTEM": {"assume_isolated": "mt"}}}
    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code,
        {"w": orm.StructureData(ase=water())},
        pseudo_family.label,
        protocol="fast",
        overrides=overrides,
    )
    concrete = builder.protocol_inputs.get_dict()
    assert concrete == EmlipDatasetWorkChain.get_protocol_inputs("fast", overrides)
    assert builder.overrides.get_dict() == overrides  # the origin, kept
    assert concrete["ecutwfc"] == 25.0 and concrete["ecutrho"] == 100.0
    assert concrete["kpoints_distance"] == 1.0 and concrete["conv_thr_per_atom"] == 1.0e-7
    assert concrete["cutoff_scale"] == 0.75  # the fast protocol's (unused: ecutwfc is set)
    assert concrete["smearing"] == "cold" and concrete["degauss"] == 0.01 and concrete["mixing_beta"] == 0.4
    assert concrete["max_iterations"] == 1 and concrete["electron_maxstep"] == 100
    assert concrete["postprocess"] == {
        "vacuum_level": False,
        "planar_potentials": False,
        "hirshfeld": True,
        "lowdin": False,
    }
    assert concrete["options"]["max_wallclock_seconds"] == 600
    assert concrete["options"]["resources"] == {"num_machines": 1, "num_mpiprocs_per_machine": 1}
    assert concrete["parameters"] == {"SYSTEM": {"assume_isolated": "mt"}}
    shown = str(builder)
    for key in ("conv_thr_per_atom", "kpoints_distance", "mixing_beta", "degauss", "max_iterations"):
        assert key in shown, key


def test_preview_of_the_per_configuration_pw_inputs(pw_code, pseudo_family):
    """What depends on each structure (charge, spin, mesh, conv_thr) is previewed without any run."""
    from aiida import orm
    from aiida.orm import QueryBuilder, WorkflowNode

    from aiida_emlip.data import EmlipDatasetData
    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain
    from aiida_emlip.workflows.pw_inputs import ConfigurationError

    before = QueryBuilder().append(WorkflowNode).count()
    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code,
        {
            "w": orm.StructureData(ase=water()),
            "oh": orm.StructureData(ase=in_box(Atoms("OH", [[0, 0, 0], [0, 0, 0.97]]))),
        },
        pseudo_family.label,
        protocol="fast",
        overrides=CHEAP,
        structure_settings={"oh": {"total_charge": -1}},
    )
    preview = EmlipDatasetWorkChain.preview_pw_inputs(builder)
    assert list(preview) == ["oh", "w"]  # the order the workchain runs them in
    water_system = preview["w"]["parameters"]["SYSTEM"]
    assert water_system["ecutwfc"] == 25.0 and water_system["ecutrho"] == 100.0
    assert water_system["occupations"] == "fixed" and "tot_charge" not in water_system
    assert preview["w"]["parameters"]["ELECTRONS"]["conv_thr"] == pytest.approx(3 * 1.0e-7)
    assert preview["w"]["kpoints_mesh"] == [1, 1, 1]  # vacuum along every axis: Γ only
    assert preview["oh"]["parameters"]["SYSTEM"]["tot_charge"] == -1.0 and preview["oh"]["n_electrons"] == 8.0
    assert preview["oh"]["nspin"] == 1 and preview["w"]["is_metal"] is False
    assert QueryBuilder().append(WorkflowNode).count() == before  # nothing ran
    hydroxide = in_box(Atoms("OH", [[0, 0, 0], [0, 0, 0.97]]))
    hydroxide.info["total_charge"] = -1.0
    from_dataset = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code, EmlipDatasetData(frames=[water(), hydroxide]), pseudo_family.label, "fast", CHEAP
    )
    previewed = EmlipDatasetWorkChain.preview_pw_inputs(from_dataset)
    assert list(previewed) == ["c0000", "c0001"]
    assert previewed["c0000"]["parameters"] == preview["w"]["parameters"]
    assert previewed["c0001"]["parameters"] == preview["oh"]["parameters"]
    builder.structure_settings = orm.Dict({"oh": {"total_charge": 8}})
    with pytest.raises(ConfigurationError, match="configuration oh") as error:
        EmlipDatasetWorkChain.preview_pw_inputs(builder)
    assert error.value.code == "ERROR_NO_ELECTRONS"
    builder.sampler = orm.Dict({"name": "rattle", "kwargs": {"n": 2}})
    with pytest.raises(ValueError, match="sampler"):
        EmlipDatasetWorkChain.preview_pw_inputs(builder)


def _run_builder(builder):
    from aiida.engine import run_get_node

    _, node = run_get_node(builder)
    ran = {c.process_label for c in node.called_descendants}
    assert not ran & {"EmlipLabelWorkChain", "PwBaseWorkChain", "PwCalculation"}, "pw.x must not run"
    return node


@pytest.mark.parametrize("change", ["protocol", "overrides", "incomplete", "unknown_key"])
def test_protocol_inputs_that_disagree_are_refused(pw_code, pseudo_family, change):
    """A builder whose protocol or overrides were changed after get_builder_from_protocol, or whose
    protocol_inputs were cut or given an unknown key, ends with 202 before any pw.x run."""
    from aiida import orm

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code, {"w": orm.StructureData(ase=water())}, pseudo_family.label, protocol="fast", overrides=CHEAP
    )
    concrete = builder.protocol_inputs.get_dict()
    expected = {
        "protocol": "resolved for protocol 'fast' but the protocol is 'stringent'",
        "overrides": "overrides that protocol_inputs do not hold: ecutwfc",
        "incomplete": "protocol_inputs lack kpoints_distance",
        "unknown_key": "unknown override key 'ecut'",
    }[change]
    if change == "protocol":
        builder.protocol = orm.Str("stringent")
    elif change == "overrides":
        builder.overrides = orm.Dict({**CHEAP, "ecutwfc": 40.0})
    elif change == "incomplete":
        builder.protocol_inputs = orm.Dict({k: v for k, v in concrete.items() if k != "kpoints_distance"})
    else:
        builder.protocol_inputs = orm.Dict({**concrete, "ecut": 30})
    node = _run_builder(builder)
    assert node.exit_status == EmlipDatasetWorkChain.exit_codes.ERROR_INVALID_OVERRIDES.status
    assert expected in node.exit_message


def test_unknown_failure_action_is_refused(pw_code, pseudo_family):
    """on_unhandled_failure must be one of aiida-core's choices: 202 before any pw.x run."""
    from aiida import orm

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code,
        {"w": orm.StructureData(ase=water())},
        pseudo_family.label,
        protocol="fast",
        overrides={**CHEAP, "on_unhandled_failure": "retry"},
    )
    node = _run_builder(builder)
    assert node.exit_status == EmlipDatasetWorkChain.exit_codes.ERROR_INVALID_OVERRIDES.status
    assert "on_unhandled_failure 'retry': choose from abort, pause, restart_once" in node.exit_message
    assert node.called == []


def test_unknown_sampler(pw_code, pseudo_family):
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    builder = EmlipDatasetWorkChain.get_builder()
    builder.code = pw_code
    builder.pseudo_family = orm.Str(pseudo_family.label)
    builder.sampler = orm.Dict({"name": "teleport", "kwargs": {}})
    _, node = run_get_node(builder)
    assert node.exit_status == EmlipDatasetWorkChain.exit_codes.ERROR_INVALID_SAMPLER.status


@pytest.mark.pw
def test_sampler_recipe_runs_with_provenance(pw_code, pseudo_family):
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    builder = EmlipDatasetWorkChain.get_builder()
    builder.code = pw_code
    builder.pseudo_family = orm.Str(pseudo_family.label)
    builder.protocol = orm.Str("fast")
    builder.overrides = orm.Dict(CHEAP)
    builder.sampler = orm.Dict({"name": "rattle", "kwargs": {"n": 2, "stdev": 0.03, "seed": 11}})
    builder.sampler_structure = orm.StructureData(ase=water())
    results, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    sampled = results["configurations"]
    assert sampled.creator.process_label == "sample_configurations"
    frames = results["dataset"].to_ase()
    assert len(frames) == 2 and all(f.info["seed"] == 11 and f.info["sampler"] == "rattle" for f in frames)
    assert frames[0].info[schema.ENERGY] != pytest.approx(frames[1].info[schema.ENERGY], abs=1e-6)


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ({"name": "quartz_oxygen_vacancy", "kwargs": {"charges": [0, 1, 2], "seed": 5}}, 3),
        ({"name": "metal_water_interface", "kwargs": {"symbol": "Al", "size": [2, 2, 3], "seed": 9}}, 1),
    ],
)
def test_sampler_calcfunctions_record_seed(aiida_profile, recipe, expected):
    from aiida import orm

    from aiida_emlip.workflows.functions import sample_configurations

    dataset = sample_configurations(recipe=orm.Dict(recipe))
    assert dataset.creator.process_label == "sample_configurations"
    frames = dataset.to_ase()
    assert len(frames) == expected
    assert all(f.info["seed"] == recipe["kwargs"]["seed"] for f in frames)
    if recipe["name"] == "quartz_oxygen_vacancy":
        assert dataset.total_charges == [0.0, 1.0, 2.0]


def test_study_dataset_builder_is_concrete(pw_code, pseudo_family):
    """The study (and its active-learning rounds) builds its dataset workchains with
    get_builder_from_protocol: the spec's dft protocol and overrides, resolved in the builder."""
    from types import SimpleNamespace

    from aiida import orm
    from aiida.common import AttributeDict

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain
    from aiida_emlip.workflows.study import EmlipStudyWorkChain

    spec = {
        "pseudo_family": pseudo_family.label,
        "dft": {"protocol": "fast", "overrides": {"ecutwfc": 20.0}, "max_concurrent": 2},
    }
    study = SimpleNamespace(ctx=AttributeDict({"spec": spec}), inputs=AttributeDict({"pw_code": pw_code}))
    structures = {"w": orm.StructureData(ase=water())}
    builder = EmlipStudyWorkChain._dataset_builder(study, structures, {"w": {"total_charge": 0.0}})
    assert builder.protocol.value == "fast" and builder.overrides.get_dict() == {"ecutwfc": 20.0}
    assert builder.protocol_inputs.get_dict() == EmlipDatasetWorkChain.get_protocol_inputs(
        "fast", {"ecutwfc": 20.0}
    )
    assert EmlipDatasetWorkChain.preview_pw_inputs(builder)["w"]["parameters"]["SYSTEM"]["ecutwfc"] == 20.0


def test_which_workchains_take_protocol_inputs(aiida_profile):
    """The training workchain passes a dataset builder's inputs on, protocol_inputs included; the
    validation workchains take dft.protocol and dft.overrides, which they read and extend themselves."""
    from aiida_emlip.workflows.training import EmlipTrainingWorkChain
    from aiida_emlip.workflows.validate.defect import EmlipChargedDefectWorkChain
    from aiida_emlip.workflows.validate.interface import EmlipInterfaceWorkChain
    from aiida_emlip.workflows.validate.phonons import EmlipPhononWorkChain
    from aiida_emlip.workflows.validate.response import EmlipResponseWorkChain

    assert "protocol_inputs" in EmlipTrainingWorkChain.spec().inputs["dataset"]
    for workchain in (
        EmlipChargedDefectWorkChain,
        EmlipInterfaceWorkChain,
        EmlipPhononWorkChain,
        EmlipResponseWorkChain,
    ):
        dft = workchain.spec().inputs["dft"]
        assert "protocol_inputs" not in dft and {"protocol", "overrides"} <= set(dft), workchain.__name__
