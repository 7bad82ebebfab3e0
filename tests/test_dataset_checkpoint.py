"""The dataset workchain's checkpoints carry each distinct pw.x input and metadata once, not once per
configuration.

Every step of the workchain (one per labelling process that ends) saves a checkpoint of its context; the
pw.x parameters, k-point mesh and metadata of every configuration in it would make each checkpoint grow
with the dataset, and the run's checkpointing with its square. Real pw.x on three water molecules, one
at a time (the same inputs), and on one more whose pw.x parameters differ.
"""

from __future__ import annotations

import pytest
from dataset_systems import CHEAP, water

from aiida_emlip.workflows.dataset import SHARED_RECORD, EmlipDatasetWorkChain

pytestmark = pytest.mark.pw

KEYS = ("w0", "w1", "w2")


def test_checkpoints_hold_each_distinct_value_once(pw_code, pseudo_family, monkeypatch):
    from aiida import orm
    from aiida.engine import run_get_node

    snapshots = []
    save = EmlipDatasetWorkChain._save_checkpoint

    def recorded(self):
        configs = self.ctx.get("configs")
        if configs:
            snapshots.append(({key: dict(record) for key, record in configs.items()}, self.ctx.record_values))
        save(self)

    monkeypatch.setattr(EmlipDatasetWorkChain, "_save_checkpoint", recorded)
    structures = {key: orm.StructureData(ase=water()) for key in (*KEYS, "mixed")}
    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code,
        structures,
        pseudo_family.label,
        protocol="fast",
        overrides=CHEAP,
        max_concurrent=1,
        structure_settings={"mixed": {"parameters": {"ELECTRONS": {"mixing_beta": 0.3}}}},
    )
    results, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    frames = results["dataset"].to_ase()
    assert len(frames) == len(structures)  # every label is there

    assert len(snapshots) >= len(structures)
    for records, values in snapshots:
        for record in records.values():
            assert set(record) == {"structure", "refs"} and set(record["refs"]) == set(SHARED_RECORD)
        # three molecules share every entry; the fourth shares their mesh and metadata, not its parameters
        refs = [records[key]["refs"] for key in KEYS]
        assert refs[0] == refs[1] == refs[2]
        mixed = records["mixed"]["refs"]
        assert (mixed["mesh"], mixed["meta"]) == (refs[0]["mesh"], refs[0]["meta"])
        assert mixed["parameters"] != refs[0]["parameters"]
        assert len(values) == 4
        assert values[mixed["parameters"]]["ELECTRONS"]["mixing_beta"] == 0.3
        assert values[refs[0]["parameters"]]["ELECTRONS"]["mixing_beta"] != 0.3


def test_records_checkpointed_with_their_values_are_still_read():
    """A run checkpointed before the values were shared (each record holding its own) reads on."""
    from types import SimpleNamespace

    from aiida.common.extendeddicts import AttributeDict

    meta = {"slab": False, "n_electrons": 8.0}
    ctx = AttributeDict(
        {
            "configs": {
                "old": {"structure": "u0", "meta": meta, "parameters": {"SYSTEM": {}}, "mesh": [2, 2, 2]},
                "new": {"structure": "u1", "refs": {"parameters": 0, "mesh": 1, "meta": 2}},
            },
            "record_values": [{"SYSTEM": {"tot_charge": 1.0}}, [1, 1, 1], {"slab": True}],
        }
    )
    workchain = SimpleNamespace(ctx=ctx)
    read = EmlipDatasetWorkChain._record
    assert read(workchain, "old", "meta") == meta and read(workchain, "old", "mesh") == [2, 2, 2]
    assert read(workchain, "new", "parameters") == {"SYSTEM": {"tot_charge": 1.0}}
    assert read(workchain, "new", "mesh") == [1, 1, 1] and read(workchain, "new", "meta") == {"slab": True}
