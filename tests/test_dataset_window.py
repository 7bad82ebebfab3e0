"""The dataset workchain throttles itself with a rolling window of ``max_concurrent`` label workchains.

One slow configuration (H₂ in a 9 Å box at 80 Ry) and five fast ones (H₂ bond lengths in a 5 Å box at
25 Ry), Hirshfeld charges (pp.x) on, ``max_concurrent = 2``. The creation and last-change times of the
label workchains show at most two running at once and each new one starting as soon as a slot freed:
the second fast one takes the slot of the first while the slow one still runs (batches would wait for
the slow one).
"""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from dataset_systems import CHEAP, in_box

from aiida_emlip import schema

pytestmark = pytest.mark.pw

N_FAST = 5
LIMIT = 2
SLOW = "a_slow"  # first in natural order: it takes the first slot


def most_at_once(intervals) -> int:
    """Largest number of [start, end] intervals that overlap at one instant."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in events:  # at equal times an end (-1) sorts before a start (+1)
        running += step
        peak = max(peak, running)
    return peak


@pytest.fixture(scope="module")
def windowed(pw_code, pp_code, pseudo_family):
    """The workchain on the slow and the five fast configurations, two at a time."""
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    structures = {
        f"h2_{i}": orm.StructureData(
            ase=in_box(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.60 + 0.02 * i]]), box=5.0)
        )
        for i in range(N_FAST)
    }
    structures[SLOW] = orm.StructureData(ase=in_box(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]), 9.0))
    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code,
        structures,
        pseudo_family.label,
        protocol="fast",
        overrides={**CHEAP, "postprocess": {"hirshfeld": True}},
        structure_settings={SLOW: {"parameters": {"SYSTEM": {"ecutwfc": 80.0, "ecutrho": 320.0}}}},
        max_concurrent=LIMIT,
    )
    builder.pp_code = pp_code
    _, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    return node


def _labels(node) -> dict:
    """The label workchains by configuration key, from their call link labels."""
    from aiida.common.links import LinkType

    from aiida_emlip.workflows.dataset import LABEL_PREFIX

    links = node.base.links.get_outgoing(link_type=LinkType.CALL_WORK).all()
    return {
        link.link_label.removeprefix(LABEL_PREFIX): link.node
        for link in links
        if link.link_label.startswith(LABEL_PREFIX)
    }


def test_rolling_window(windowed):
    """Never more than max_concurrent at once; a freed slot is filled at once, not after a batch."""
    labels = _labels(windowed)
    assert len(labels) == N_FAST + 1
    assert all(label.is_finished_ok for label in labels.values())
    assert all(label.process_label == "EmlipLabelWorkChain" for label in labels.values())
    assert len({label.inputs.postprocess.pk for label in labels.values()}) == 1  # one node, the same steps
    assert most_at_once([(n.ctime, n.mtime) for n in labels.values()]) == LIMIT
    # the configurations start in the order of the dataset, the first two at once
    starts = sorted(labels, key=lambda key: labels[key].ctime)
    assert starts == [SLOW] + [f"h2_{i}" for i in range(N_FAST)]
    ends = sorted(n.mtime for n in labels.values())
    shortest = min(n.mtime - n.ctime for n in labels.values())
    for k, key in enumerate(starts[LIMIT:]):
        start = labels[key].ctime
        # the (k+1)-th start after the first window needs k+1 ends before it (the limit) ...
        assert ends[k] <= start, key
        # ... and follows the last end before it sooner than any configuration takes to run
        last_end = max(end for end in ends if end <= start)
        assert start - last_end < shortest, (key, start - last_end, shortest)
    # batches of two would start h2_1 only once both the slow one and h2_0 ended: here it takes the slot
    # of h2_0 while the slow one still runs
    assert labels["h2_0"].mtime <= labels["h2_1"].ctime < labels[SLOW].mtime


def test_progress_reported_per_step(windowed):
    """One progress line per step of the window; the running count never exceeds max_concurrent."""
    import re

    from aiida.orm import Log

    messages = [log.message for log in Log.collection.get_logs_for(windowed)]
    counts = [
        tuple(int(v) for v in match.groups())
        for match in (
            re.search(r"progress: (\d+) done, (\d+) running, (\d+) failed, (\d+) waiting of (\d+)", m)
            for m in messages
        )
        if match
    ]
    assert counts[0] == (0, LIMIT, 0, N_FAST + 1 - LIMIT, N_FAST + 1)
    assert counts[-1] == (N_FAST + 1, 0, 0, 0, N_FAST + 1)
    assert all(running <= LIMIT for _, running, _, _, _ in counts)
    assert all(done + running + failed + waiting == total for done, running, failed, waiting, total in counts)
    dones = [done for done, *_ in counts]
    assert dones == sorted(dones) and len(counts) >= 4  # wakes as configurations end, not per batch
    assert windowed.base.extras.get("emlip_progress") == {
        "done": N_FAST + 1,
        "running": 0,
        "failed": 0,
        "waiting": 0,
        "total": N_FAST + 1,
    }


def test_window_labels(windowed):
    """All labelled; compressed H₂ (0.60-0.68 Å < 0.75 Å) is pushed apart, less so as it stretches;
    the Hirshfeld charges of the symmetric molecule vanish."""
    frames = [a for a in windowed.outputs.dataset.to_ase() if a.info["key"] != SLOW]
    frames.sort(key=lambda a: a.get_distance(0, 1))
    assert len(frames) == N_FAST
    energies = [a.info[schema.ENERGY] for a in frames]
    assert np.all(np.diff(energies) < 0)
    push = [a.arrays[schema.FORCES][1, 2] for a in frames]  # on the upper atom, along the bond (+z)
    assert all(f > 0 for f in push) and np.all(np.diff(push) < 0)
    for atoms in frames:
        assert np.allclose(atoms.arrays[schema.FORCES][0], -atoms.arrays[schema.FORCES][1], atol=1e-3)
        charges = atoms.arrays[schema.CHARGES]
        assert abs(charges.sum()) < 1e-3 and np.all(np.abs(charges) < 0.02)
    # the dataset keeps the order of its configurations
    assert [a.info["key"] for a in windowed.outputs.dataset.to_ase()] == [SLOW] + [
        f"h2_{i}" for i in range(N_FAST)
    ]
