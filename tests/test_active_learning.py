"""Active learning (pure): committee disagreement, SCF scores, the spaced top-k picker, stopping, merging."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ase import Atoms

from aiida_emlip.analysis import active_learning as al


def _frame(key: str, step: int, energy: float, forces: np.ndarray, **info) -> Atoms:
    atoms = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    atoms.info.update({"key": key, "md_step": step, "energy": energy, **info})
    atoms.arrays["forces"] = np.asarray(forces, dtype=float)
    return atoms


def test_agreeing_committee_has_zero_disagreement():
    forces = np.arange(9.0).reshape(3, 3)
    energy_std, force_max = al.frame_disagreement([-10.0, -10.0, -10.0], [forces, forces, forces])
    assert energy_std == 0.0 and force_max == 0.0


def test_disagreement_in_mev_per_atom_and_mev_per_angstrom():
    zeros = np.zeros((3, 3))
    shifted = zeros.copy()
    shifted[1] = [0.3, 0.0, 0.4]  # |ΔF| = 0.5 eV/Å on atom 1 only
    # energies per atom -1.0 and -1.1 eV: population std 0.05 eV/atom = 50 meV/atom
    energy_std, force_max = al.frame_disagreement([-3.0, -3.3], [zeros, shifted])
    assert energy_std == pytest.approx(50.0)
    # each member is 0.25 eV/Å from the mean force of atom 1: rms 0.25 eV/Å = 250 meV/Å
    assert force_max == pytest.approx(250.0)
    with pytest.raises(ValueError, match="at least two members"):
        al.frame_disagreement([-3.0], [zeros])


def test_committee_candidates_skip_the_start_and_rank_by_the_chosen_measure():
    zeros = np.zeros((3, 3))
    trajectory = [_frame("a", s, -3.0, zeros) for s in (0, 10, 20)]
    kick = zeros.copy()
    kick[0] = [1.0, 0.0, 0.0]
    member = [_frame("a", 0, -2.7, zeros), _frame("a", 10, -3.03, zeros), _frame("a", 20, -3.0, kick)]
    candidates = al.committee_candidates(trajectory, [member], "energy")
    assert [c.md_step for c in candidates] == [10, 20]  # step 0 is the training structure itself
    assert candidates[0].score == pytest.approx(5.0)  # |Δ(E/N)| = 10 meV/atom, std 5
    assert candidates[1].score == 0.0 and candidates[1].force_max == pytest.approx(500.0)
    by_forces = al.committee_candidates(trajectory, [member], "forces")
    assert [c.score for c in by_forces] == pytest.approx([0.0, 500.0])
    with pytest.raises(ValueError, match="predicted 2 frames of 3"):
        al.committee_candidates(trajectory, [member[:2]])


def test_spaced_top_k_picker():
    scores = [9.0, 8.0, 7.0, 1.0, 6.0, 5.0]
    runs = ["a", "a", "a", "a", "b", "b"]
    steps = [10, 20, 40, 60, 10, 20]
    chosen, status = al.select_frames(scores, runs, steps, k=3, min_spacing=20)
    # 8.0 is 10 steps from 9.0 in run a: skipped; 7.0 is 30 steps away; run b is another run
    assert chosen == [0, 2, 4]
    assert status == ["selected", "too_close", "selected", "not_selected", "selected", "not_selected"]
    # spacing of one step: the plain top k
    assert al.select_frames(scores, runs, steps, k=3, min_spacing=1)[0] == [0, 1, 2]
    # fewer eligible frames than k; non-finite scores are never chosen
    chosen, status = al.select_frames([1.0, math.nan, 2.0], ["a"] * 3, [0, 50, 100], k=5, min_spacing=60)
    assert chosen == [2, 0] and status[1] == "not_selected"
    with pytest.raises(ValueError):
        al.select_frames([1.0], ["a"], [0], k=1, min_spacing=0)


def test_choose_rows_put_the_chosen_first_and_every_unchosen_eligible_frame_scores_lower():
    rng = np.random.default_rng(3)
    candidates = [
        al.Candidate(index=i, source=f"s{i % 3}", md_step=10 * (i // 3 + 1), score=float(rng.random()))
        for i in range(30)
    ]
    chosen, rows = al.choose(candidates, k=5, min_spacing=20)
    assert len(chosen) == 5 and [r["status"] for r in rows[:5]] == ["selected"] * 5
    summary = al.uncertainty_summary(rows)
    assert summary["selected_min"] >= summary["not_selected_max"]
    assert summary["candidates"] == 30 and summary["too_close"] > 0
    for row in rows:
        if row["status"] == "too_close":  # within the spacing of a better chosen frame of its run
            assert any(
                c.source == row["source"] and abs(c.md_step - row["md_step"]) < 20 and c.score >= row["score"]
                for c in chosen
            )


def test_scf_scores_rank_non_converged_first():
    scores = al.scf_scores([True, False, True, None], [12, 3, 30, None])
    assert scores == [12.0, 34.0, 30.0, 0.0]
    zeros = np.zeros((3, 3))
    trajectory = [
        _frame("a", 0, -3.0, zeros, scf_converged=True, scf_iterations=5),
        _frame("a", 10, -3.0, zeros, scf_converged=True, scf_iterations=25),
        _frame("a", 20, -3.0, zeros, scf_converged=True, scf_iterations=8),
    ]
    stopped = [_frame("b", 7, -3.0, zeros, scf_converged=False, scf_iterations=100)]
    candidates = al.scf_candidates(trajectory, stopped)
    assert [(c.source, c.md_step) for c in candidates] == [("a", 10), ("a", 20), ("b", 7)]
    assert candidates[2].index == 3 and candidates[2].scf_converged is False
    chosen, _ = al.choose(candidates, k=2, min_spacing=1)
    assert [c.source for c in chosen] == ["b", "a"] and chosen[1].md_step == 10


def test_best_design_by_validation_energy_error():
    def metrics(rmse):
        return {"valid": {"energy": {"all": {"rmse": rmse}}}}

    table = {"sr": metrics(12.0), "qeq": metrics(4.0), "scf": {"valid": {}}}
    assert al.best_design(table, ["sr", "qeq", "scf"]) == "qeq"
    assert al.best_design(table, ["sr", "scf"]) == "sr"
    assert al.best_design({}, ["scf", "qeq"]) == "scf"  # none has an error: the first


def test_stop_reasons():
    common = {"rounds": 3, "target_error": 5.0, "per_round": 4}
    assert al.stop_reason(completed=0, test_error=9.0, spent=0, available=None, **common) is None
    met = al.stop_reason(completed=1, test_error=4.2, spent=4, available=None, **common)
    assert met == "target error met: 4.20 ≤ 5 meV/atom"
    assert (
        al.stop_reason(completed=3, test_error=9.0, spent=12, available=None, **common) == "rounds spent (3)"
    )
    budget = al.stop_reason(completed=1, test_error=9.0, spent=4, available=7, **common)
    assert budget.startswith("DFT budget: 4 of the 7") and "needs 4" in budget
    assert al.stop_reason(completed=1, test_error=9.0, spent=4, available=8, **common) is None


def test_held_out_rmse_and_merge_keeps_held_out_structures_out():
    zeros = np.zeros((3, 3))
    reference = [_frame("h1", 0, -3.0, zeros), _frame("h2", 0, -6.0, zeros)]
    predicted = [_frame("h1", 0, -3.03, zeros), _frame("h2", 0, -5.97, zeros)]
    errors = al.held_out_rmse(reference, {"sr": predicted})
    assert errors["sr"]["energy"] == pytest.approx(10.0) and errors["sr"]["forces"] == 0.0
    training = [_frame("t1", 0, -3.0, zeros)]
    new = _frame("t1_al1_00", 0, -3.1, zeros)
    origins = {"t1_al1_00": {"source": "t1", "md_step": 30, "score": 2.5}}
    merged = al.merge_labels(training, [new], ["h1", "h2"], origins, 1)
    assert [a.info["key"] for a in merged] == ["t1", "t1_al1_00"]
    assert merged[1].info["al_round"] == 1 and merged[1].info["al_md_step"] == 30
    with pytest.raises(ValueError, match="held out"):
        al.merge_labels(training, [_frame("h1", 0, -3.0, zeros)], ["h1"], {"h1": origins["t1_al1_00"]}, 1)
    with pytest.raises(ValueError, match="comes from the held-out"):
        al.merge_labels(training, [new], ["t1"], origins, 1)
    with pytest.raises(ValueError, match="already in the training set"):
        al.merge_labels(merged, [new], [], origins, 2)


def test_verdict_sentence():
    record = {
        "model": "sr",
        "selection": "committee",
        "committee": 3,
        "rounds_run": 1,
        "dft_calls": 4,
        "stop_reason": "rounds spent (1)",
        "rounds": [
            {"round": 0, "test_error": {"sr": {"energy": 12.34}}},
            {"round": 1, "test_error": {"sr": {"energy": 8.0}}, "dft_calls": 4, "labelled": 4},
        ],
    }
    (line,) = al.verdict(record)
    assert line == (
        "Active learning (committee of 3 sr models): 1 round, 4 configurations labelled by 4 pw.x runs; "
        "sr's held-out energy error 12.3 → 8.0 meV/atom; stopped: rounds spent (1)."
    )
