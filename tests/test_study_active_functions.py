"""The active-learning calcfunctions of the study on synthetic MD frames (no pw.x, no training)."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms

SOURCE_SETTINGS = {
    "water_000_q0": {
        "total_charge": 0.0,
        "config_type": "water",
        "parameters": {"SYSTEM": {"assume_isolated": "mt"}},
    },
    "water_001_qp1": {"total_charge": 1.0, "config_type": "water"},
}


def _frame(key: str, step: int, energy: float, shift: float = 0.0, **info) -> Atoms:
    atoms = Atoms("H2O", positions=np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]) + shift)
    atoms.pbc = False  # the dataset stores isolated molecules without periodicity
    atoms.info.update({"key": key, "md_step": step, "energy": energy, **info})
    atoms.arrays["forces"] = np.zeros((3, 3))
    return atoms


def _sources():
    from aiida import orm

    out = {}
    for key in SOURCE_SETTINGS:
        atoms = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], cell=[8.0] * 3, pbc=True)
        out[f"source_{key}"] = orm.StructureData(ase=atoms)
    return out


def test_committee_selection_makes_structures_with_the_source_settings(aiida_profile):
    from aiida import orm

    from aiida_emlip.data import EmlipDatasetData
    from aiida_emlip.workflows.study_active_functions import select_active

    keys = ["water_000_q0", "water_001_qp1"]
    trajectory = [_frame(k, s, -3.0, shift=0.01 * s) for k in keys for s in (0, 5, 10)]
    # the second member disagrees most on water_001_qp1 at step 10, then water_000_q0 at step 5
    offsets = {("water_000_q0", 5): 0.06, ("water_001_qp1", 10): 0.09, ("water_001_qp1", 5): 0.03}
    member = [
        _frame(a.info["key"], a.info["md_step"], -3.0 + offsets.get((a.info["key"], a.info["md_step"]), 0.0))
        for a in trajectory
    ]
    settings = {
        "selection": "committee",
        "uncertainty": "energy",
        "per_round": 2,
        "min_spacing": 5,
        "round": 1,
        "sources": SOURCE_SETTINGS,
    }
    out = select_active(
        trajectory=EmlipDatasetData(frames=trajectory),
        settings=orm.Dict(settings),
        member_1=EmlipDatasetData(frames=member),
        **_sources(),
    )
    scores = out["scores"].get_dict()
    assert scores["chosen"] == ["water_001_qp1_al1_00", "water_000_q0_al1_01"]
    # std of two energies per atom 0.03 eV/atom apart is 15 meV/atom (|Δ(E/N)| / 2)
    assert scores["summary"]["selected"] == pytest.approx([15.0, 10.0])
    assert (
        scores["summary"]["not_selected_max"] == pytest.approx(5.0) and scores["summary"]["candidates"] == 4
    )
    structure = out["c_water_001_qp1_al1_00"]
    assert structure.pbc == (True, True, True) and np.allclose(structure.cell, np.eye(3) * 8.0)
    assert np.allclose(structure.get_ase().positions, trajectory[5].positions)
    assert out["settings"].get_dict()["water_000_q0_al1_01"] == SOURCE_SETTINGS["water_000_q0"]


def test_scf_selection_takes_stopped_runs_first(aiida_profile):
    from aiida import orm

    from aiida_emlip.data import EmlipDatasetData
    from aiida_emlip.workflows.study_active_functions import select_active

    trajectory = [
        _frame("water_000_q0", s, -3.0, shift=0.01 * s, scf_converged=True, scf_iterations=n)
        for s, n in ((0, 5), (5, 9), (10, 30))
    ]
    stopped = [_frame("water_001_qp1", 7, -3.0, shift=0.5, scf_converged=False, scf_iterations=50)]
    settings = {
        "selection": "scf_failures",
        "per_round": 2,
        "min_spacing": 1,
        "round": 2,
        "sources": SOURCE_SETTINGS,
    }
    out = select_active(
        trajectory=EmlipDatasetData(frames=trajectory),
        settings=orm.Dict(settings),
        stopped=EmlipDatasetData(frames=stopped),
        **_sources(),
    )
    scores = out["scores"].get_dict()
    assert scores["uncertainty"] == "scf" and scores["chosen"] == [
        "water_001_qp1_al2_00",
        "water_000_q0_al2_01",
    ]
    assert np.allclose(out["c_water_001_qp1_al2_00"].get_ase().positions, stopped[0].positions)
    assert np.allclose(out["c_water_000_q0_al2_01"].get_ase().positions, trajectory[2].positions)


def test_merge_refuses_held_out_keys(aiida_profile):
    from aiida import orm

    from aiida_emlip.data import EmlipDatasetData
    from aiida_emlip.workflows.study_active_functions import merge_active

    training = EmlipDatasetData(frames=[_frame("water_000_q0", 0, -3.0)])
    labels = EmlipDatasetData(frames=[_frame("water_000_q0_al1_00", 0, -3.2, source_uuid="x")])
    origins = {"water_000_q0_al1_00": {"source": "water_000_q0", "md_step": 5, "score": 1.5}}
    merged = merge_active(
        training_set=training,
        labels=labels,
        settings=orm.Dict({"round": 1, "held_out_keys": ["water_002_q0"], "origins": origins}),
    )
    frames = merged.to_ase()
    assert [a.info["key"] for a in frames] == ["water_000_q0", "water_000_q0_al1_00"]
    assert frames[1].info["al_source"] == "water_000_q0" and "source_uuid" not in frames[1].info
    held = {"round": 1, "held_out_keys": ["water_000_q0_al1_00"], "origins": origins}
    with pytest.raises(ValueError, match="held out"):
        merge_active(training_set=training, labels=labels, settings=orm.Dict(held))


def test_status_line_of_the_loop():
    from types import SimpleNamespace

    from aiida_emlip.cli.study_status import active_learning_line
    from aiida_emlip.workflows.study_active import PROGRESS

    def study(extras):
        return SimpleNamespace(
            base=SimpleNamespace(extras=SimpleNamespace(get=lambda key, default: extras.get(key)))
        )

    assert active_learning_line(study({}), {"rounds": 2}) == "Active learning: waiting (at most 2 rounds)"
    progress = {"round": 1, "rounds": 2, "dft_calls": 4, "stop": None, "model": "qeq"}
    running = active_learning_line(study({PROGRESS: progress}), {"rounds": 2})
    assert running == "Active learning (qeq): round 1 of at most 2, 4 pw.x runs"
    done = active_learning_line(study({PROGRESS: {**progress, "stop": "rounds spent (2)"}}), {"rounds": 2})
    assert done.endswith("; stopped: rounds spent (2)")
