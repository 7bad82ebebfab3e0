"""The dataset's final assembly in parts (``aiida_emlip.workflows.assembly``): the same dataset and report,
byte for byte, whether one ``assemble_dataset`` collects every configuration or several collect parts that
``merge_datasets`` joins; a failed configuration is reported alike."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import molecule

from aiida_emlip import schema

N = 7
FAILED = "c0003"


@pytest.fixture(scope="module")
def labels(aiida_profile):
    """``{key: {"structure", "parameters", "trajectory"}}`` of six water molecules, the labels made by a
    calcfunction (an entry's source is its labels' creator), and the settings of the assembly."""
    from aiida import orm
    from aiida.engine import calcfunction

    @calcfunction
    def fake_pw(structure, energy):  # no annotations: the calcfunction resolves them at run time
        rng = np.random.default_rng(int(-energy.value * 1000))
        trajectory = orm.TrajectoryData(structurelist=[structure.clone()])
        trajectory.set_array("forces", rng.normal(size=(1, len(structure.sites), 3)))
        parameters = orm.Dict({"energy": energy.value, "highest_occupied_level": -7.0 + energy.value / 100})
        return {"parameters": parameters, "trajectory": trajectory}

    out, configurations = {}, {}
    for i in range(N):
        key = f"c{i:04d}"
        configurations[key] = {"periodic_bulk": False, schema.TOTAL_CHARGE: float(i % 2), "config_type": "w"}
        if key == FAILED:
            continue
        atoms = molecule("H2O")
        atoms.positions += 0.01 * i
        atoms.center(vacuum=3.0)
        atoms.pbc = True
        structure = orm.StructureData(ase=atoms).store()
        outputs = fake_pw(structure, orm.Float(-400.0 - i))
        out[key] = {"structure": structure, **outputs}
    settings = {
        "dft_settings": {"ecutwfc": 25.0},
        "configurations": configurations,
        "order": list(configurations),
        "failures": {FAILED: {"exit_status": 402, "message": "failed"}},
        "postprocess_failures": {},
        "postprocess_skipped": {},
    }
    return out, settings


def test_parts_give_the_same_dataset_and_report(labels):
    from aiida_emlip.workflows.assembly import assemble

    nodes, settings = labels
    whole = assemble(settings, nodes, part=100)
    parts = assemble(settings, nodes, part=2)
    assert whole["dataset"].creator.process_label == "assemble_dataset"
    merge = parts["dataset"].creator
    assert merge.process_label == "merge_datasets"
    # six finished configurations: three parts of two, each made by its own assemble_dataset
    names = sorted(name for name in merge.inputs if name.startswith("part_"))
    assert [merge.inputs[name].n_configurations for name in names] == [2, 2, 2]
    assert {merge.inputs[name].creator.process_label for name in names} == {"assemble_dataset"}
    assert parts["dataset"].base.attributes.get("sha256") == whole["dataset"].base.attributes.get("sha256")
    assert parts["dataset"].get_text() == whole["dataset"].get_text()
    assert parts["report"].get_dict() == whole["report"].get_dict()
    report = whole["report"].get_dict()
    assert (
        report["n_configurations"] == N
        and report["n_finished"] == N - 1
        and set(report["failed"]) == {FAILED}
    )
    frames = whole["dataset"].to_ase()
    assert [a.info["key"] for a in frames] == [f"c{i:04d}" for i in range(N) if f"c{i:04d}" != FAILED]
    assert [a.info[schema.ENERGY] for a in frames] == [-400.0 - i for i in (0, 1, 2, 4, 5, 6)]
    for atoms in frames:
        source = nodes[atoms.info["key"]]["parameters"].creator
        assert atoms.info["source_uuid"] == source.uuid


def test_one_part_is_one_assembly(labels):
    """At most a part's number of configurations: one ``assemble_dataset``, as without parts."""
    from aiida_emlip.workflows.assembly import assemble

    nodes, settings = labels
    outputs = assemble(settings, nodes, part=N - 1)
    assert outputs["dataset"].creator.process_label == "assemble_dataset"
    assert outputs["dataset"].n_configurations == N - 1


def test_dict_inputs_are_compared_with_dicts_only(labels, monkeypatch):
    """aiida-core checks each new input link against the earlier ones as ``earlier == new``, and a ``Dict``
    compares by content (a database read): with the ``Dict`` labels linked last, none is compared with
    another kind of node (only the ``settings``, which the calcfunction links first, is)."""
    from aiida import orm

    from aiida_emlip.workflows.assembly import assemble

    nodes, settings = labels
    compared = []
    original = orm.Dict.__eq__

    def counting(self, other):
        compared.append(("dft_settings" in self.keys(), isinstance(other, orm.Dict)))
        return original(self, other)

    monkeypatch.setattr(orm.Dict, "__eq__", counting)
    assemble(settings, nodes, part=100)
    labels_compared = [with_dict for is_settings, with_dict in compared if not is_settings]
    assert labels_compared and all(labels_compared)
    # the six parameter sets among themselves (aiida-core checks each link twice: each pair at most
    # twice), not with the other twelve inputs
    assert len(labels_compared) <= 6 * 5
