"""The dataset workchain throttles itself: pw.x runs, then pp.x runs, in batches of ``max_concurrent``.

Five H₂ molecules (5 Å box, low cutoff: seconds each) with ``max_concurrent = 2``: the creation and
last-change times of the child processes show at most two running at once, and each batch starting
only after the previous one ended.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from ase import Atoms
from dataset_systems import CHEAP, in_box

from aiida_emlip import schema

pytestmark = pytest.mark.pw

N_CONFIGURATIONS = 5
LIMIT = 2


def most_at_once(intervals) -> int:
    """Largest number of [start, end] intervals that overlap at one instant."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in events:  # at equal times an end (-1) sorts before a start (+1)
        running += step
        peak = max(peak, running)
    return peak


def batches(nodes, size: int) -> list[list]:
    ordered = sorted(nodes, key=lambda n: n.ctime)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


@pytest.fixture(scope="module")
def batched(pw_code, pp_code, pseudo_family):
    """The workchain on five H₂ bond lengths with Hirshfeld charges (pp.x) on, two at a time."""
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    structures = {
        f"h2_{i}": orm.StructureData(
            ase=in_box(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.60 + 0.02 * i]]), box=5.0)
        )
        for i in range(N_CONFIGURATIONS)
    }
    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code,
        structures,
        pseudo_family.label,
        protocol="fast",
        overrides={**CHEAP, "postprocess": {"hirshfeld": True}},
        max_concurrent=LIMIT,
    )
    builder.pp_code = pp_code
    _, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    return node


def _children(node, prefix: str):
    from aiida.common.links import LinkType

    links = node.base.links.get_outgoing(link_type=(LinkType.CALL_WORK, LinkType.CALL_CALC)).all()
    return [link.node for link in links if link.link_label.startswith(prefix)]


@pytest.mark.parametrize("prefix", ["pw_", "density_"])
def test_children_run_in_batches(batched, prefix):
    """pw.x (PwBaseWorkChain) and then pp.x: never more than max_concurrent at once, batch after batch."""
    children = _children(batched, prefix)
    assert len(children) == N_CONFIGURATIONS
    assert all(child.is_finished_ok for child in children)
    assert most_at_once([(c.ctime, c.mtime) for c in children]) == LIMIT
    groups = batches(children, LIMIT)
    assert [len(g) for g in groups] == [2, 2, 1]
    for before, after in pairwise(groups):
        assert min(c.ctime for c in after) >= max(c.mtime for c in before)


def test_batched_labels(batched):
    """All five labelled; compressed H₂ (0.60-0.68 Å < 0.75 Å) is pushed apart, less so as it stretches;
    the Hirshfeld charges of the symmetric molecule vanish."""
    frames = sorted(batched.outputs.dataset.to_ase(), key=lambda a: a.get_distance(0, 1))
    assert len(frames) == N_CONFIGURATIONS
    energies = [a.info[schema.ENERGY] for a in frames]
    assert np.all(np.diff(energies) < 0)
    push = [a.arrays[schema.FORCES][1, 2] for a in frames]  # on the upper atom, along the bond (+z)
    assert all(f > 0 for f in push) and np.all(np.diff(push) < 0)
    for atoms in frames:
        assert np.allclose(atoms.arrays[schema.FORCES][0], -atoms.arrays[schema.FORCES][1], atol=1e-3)
        charges = atoms.arrays[schema.CHARGES]
        assert abs(charges.sum()) < 1e-3 and np.all(np.abs(charges) < 0.02)
