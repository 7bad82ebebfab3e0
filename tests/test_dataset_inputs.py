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
}


@pytest.mark.parametrize("exit_code", sorted(BAD))
def test_bad_input_exit_codes(pw_code, pseudo_family, exit_code):
    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    structures, kwargs = BAD[exit_code]
    node = _run(pw_code, pseudo_family, structures, **kwargs)
    expected = getattr(EmlipDatasetWorkChain.exit_codes, exit_code).status
    assert node.exit_status == expected, node.exit_message


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
