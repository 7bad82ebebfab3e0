"""The dataset workchain's checkpoints do not carry the pw.x inputs of configurations already submitted.

Every step of the workchain (one per labelling process that ends) saves a checkpoint of its context; the
pw.x parameters and k-point mesh of every configuration in it would make each checkpoint grow with the
dataset, and the run's checkpointing with its square. Real pw.x on three water molecules, one at a time.
"""

from __future__ import annotations

import pytest
from dataset_systems import CHEAP, water

from aiida_emlip.workflows.dataset import SUBMITTED_ONLY, EmlipDatasetWorkChain

pytestmark = pytest.mark.pw

KEYS = ("w0", "w1", "w2")


def test_checkpoints_keep_the_inputs_of_pending_configurations_only(pw_code, pseudo_family, monkeypatch):
    from aiida import orm
    from aiida.engine import run_get_node

    snapshots = []
    save = EmlipDatasetWorkChain._save_checkpoint

    def recorded(self):
        configs = self.ctx.get("configs")
        if configs:
            snapshots.append(({key: set(record) for key, record in configs.items()}, list(self.ctx.pending)))
        save(self)

    monkeypatch.setattr(EmlipDatasetWorkChain, "_save_checkpoint", recorded)
    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code,
        {key: orm.StructureData(ase=water()) for key in KEYS},
        pseudo_family.label,
        protocol="fast",
        overrides=CHEAP,
        max_concurrent=1,
    )
    results, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    assert len(results["dataset"].to_ase()) == len(KEYS)  # every label is there

    assert len(snapshots) >= len(KEYS)
    for records, pending in snapshots:
        for key, record in records.items():
            assert {"structure", "meta"} <= record  # what the final assembly reads
            if key in pending:
                assert set(SUBMITTED_ONLY) <= record
            else:
                assert not set(SUBMITTED_ONLY) & record, f"{key}: {sorted(record)}"
    # the first checkpoint after the first submission already holds one configuration without its inputs
    assert any(len(pending) == len(KEYS) - 1 for _, pending in snapshots)
