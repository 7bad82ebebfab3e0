"""Active learning (pure): score MD frames by uncertainty, pick the most uncertain ones, decide when to stop.

Two measures of how little a model can be trusted on a frame:

- **committee disagreement**: models of one design trained with different seeds predict the frame;
  the spread of their energies per atom (population standard deviation, meV/atom) and the largest
  disagreement on one atom's force (root-mean-square deviation of the force vectors from the
  committee's mean, max over atoms, meV/Å). Members that agree give zero for both.
- **SCF non-convergence**: a self-consistent head flags the frames whose charge equilibration did not
  converge; those come first, then the frames that needed the most iterations.

:func:`select_frames` takes the ``k`` highest scores, greedily, skipping frames of the same MD run
closer than ``min_spacing`` steps to a frame already taken (consecutive frames are nearly the same
configuration: labelling both wastes a DFT run).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms

from aiida_emlip import schema
from aiida_emlip.analysis.study import ALL, held_out_errors

#: What a candidate frame is ranked by (the ``uncertainty`` option of a study's active learning).
UNCERTAINTIES = ("energy", "forces")
SELECTED, TOO_CLOSE, NOT_SELECTED = "selected", "too_close", "not_selected"


def frame_disagreement(energies: Sequence[float], forces: Sequence[np.ndarray]) -> tuple[float, float]:
    """``(energy std in meV/atom, max force disagreement in meV/Å)`` of one frame's committee.

    ``energies``: one total energy per member (eV); ``forces``: one ``(n_atoms, 3)`` array per member
    (eV/Å). The energy spread is the population standard deviation of E/N; the force disagreement of
    an atom is ``sqrt(mean over members of |F_m − F̄|²)``, and the frame's is the largest over its atoms.
    """
    values = np.asarray(energies, dtype=float)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"a committee needs at least two members, got {values.size}")
    stack = np.asarray(forces, dtype=float)
    if stack.ndim != 3 or stack.shape[0] != values.size or stack.shape[2] != 3:
        raise ValueError(f"forces must be (members, atoms, 3) for {values.size} members, got {stack.shape}")
    n_atoms = stack.shape[1]
    energy_std = 1000.0 * float(np.std(values / n_atoms))
    deviation = stack - stack.mean(axis=0, keepdims=True)
    per_atom = np.sqrt((deviation**2).sum(axis=2).mean(axis=0))
    return energy_std, 1000.0 * float(per_atom.max()) if n_atoms else 0.0


def scf_scores(converged: Sequence[bool | None], iterations: Sequence[int | None]) -> list[float]:
    """Scores of frames of a self-consistent head: non-converged first, then by SCF iterations.

    A converged frame scores its iteration count; a frame whose SCF did not converge scores the most
    iterations of any frame plus one plus its own, so that every non-converged frame ranks above every
    converged one.
    """
    counts = [int(n or 0) for n in iterations]
    top = max(counts, default=0) + 1
    return [float(n + (top if ok is False else 0)) for ok, n in zip(converged, counts)]


def select_frames(
    scores: Sequence[float],
    runs: Sequence[Any],
    steps: Sequence[int],
    k: int,
    min_spacing: int,
) -> tuple[list[int], list[str]]:
    """The ``k`` highest-scoring frames at least ``min_spacing`` steps apart within one MD run.

    Greedy, best first (ties: the earlier frame); a frame closer than ``min_spacing`` steps to one
    already taken from the same run (``runs``: any label of the run) is skipped, as are non-finite
    scores. Returns the chosen indices (best first) and each frame's status: ``selected``,
    ``too_close`` (skipped for the spacing) or ``not_selected``.
    """
    if not len(scores) == len(runs) == len(steps):
        raise ValueError("scores, runs and steps must have the same length")
    if k < 0 or min_spacing < 1:
        raise ValueError("k must be ≥ 0 and min_spacing ≥ 1")
    finite = [math.isfinite(float(s)) for s in scores]
    order = sorted(
        range(len(scores)), key=lambda i: (not finite[i], -float(scores[i]) if finite[i] else 0.0, i)
    )
    chosen: list[int] = []
    status = [NOT_SELECTED] * len(scores)
    for i in order:
        if len(chosen) >= k or not finite[i]:
            break
        if any(runs[j] == runs[i] and abs(int(steps[j]) - int(steps[i])) < min_spacing for j in chosen):
            status[i] = TOO_CLOSE
            continue
        chosen.append(i)
        status[i] = SELECTED
    return chosen, status


@dataclass(frozen=True)
class Candidate:
    """An MD frame that may be labelled: where it comes from and how uncertain the model is there."""

    index: int  # in the trajectory
    source: str  # key of the training configuration the MD started from
    md_step: int
    score: float
    energy_std: float | None = None  # meV/atom (committee)
    force_max: float | None = None  # meV/Å (committee)
    scf_converged: bool | None = None
    scf_iterations: int | None = None

    def row(self, status: str) -> dict[str, Any]:
        out = {
            "index": self.index,
            "source": self.source,
            "md_step": self.md_step,
            "score": self.score,
            "status": status,
        }
        for name in ("energy_std", "force_max", "scf_converged", "scf_iterations"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def _md_frames(trajectory: Sequence[Atoms]) -> list[int]:
    """Indices of the frames that moved (md_step > 0: step 0 is the training structure itself) with a
    finite energy."""
    out = []
    for i, atoms in enumerate(trajectory):
        energy = atoms.info.get(schema.ENERGY)
        if int(atoms.info.get("md_step", 0)) <= 0 or energy is None or not math.isfinite(float(energy)):
            continue
        out.append(i)
    return out


def committee_candidates(
    trajectory: Sequence[Atoms], members: Sequence[Sequence[Atoms]], uncertainty: str = "energy"
) -> list[Candidate]:
    """Candidates of an MD trajectory scored by the disagreement of the committee.

    ``trajectory``: the MD frames with the first member's energies and forces; ``members``: the other
    members' single points on the same frames, in the same order. ``uncertainty`` picks the score:
    the energy spread (``energy``) or the force disagreement (``forces``).
    """
    if uncertainty not in UNCERTAINTIES:
        raise ValueError(f"uncertainty must be one of {UNCERTAINTIES}, got {uncertainty!r}")
    for member in members:
        if len(member) != len(trajectory):
            raise ValueError(f"a member predicted {len(member)} frames of {len(trajectory)}")
    out = []
    for i in _md_frames(trajectory):
        frames = [trajectory[i], *(member[i] for member in members)]
        energies = [f.info.get(schema.ENERGY) for f in frames]
        if any(e is None or not math.isfinite(float(e)) for e in energies):
            continue
        forces = [np.asarray(f.arrays[schema.FORCES], dtype=float) for f in frames]
        energy_std, force_max = frame_disagreement([float(e) for e in energies], forces)
        score = energy_std if uncertainty == "energy" else force_max
        out.append(_candidate(trajectory[i], i, score, energy_std=energy_std, force_max=force_max))
    return out


def scf_candidates(trajectory: Sequence[Atoms], stopped: Sequence[Atoms] = ()) -> list[Candidate]:
    """Candidates scored by the SCF of a self-consistent head (:func:`scf_scores`).

    ``stopped``: the final frames of MD runs that stopped because the SCF did not converge (they are
    not in the trajectory: the run ends before writing them); they count as not converged.
    """
    frames = [(i, trajectory[i]) for i in _md_frames(trajectory)]
    frames += [
        (len(trajectory) + j, atoms)
        for j, atoms in enumerate(stopped)
        if int(atoms.info.get("md_step", 0)) > 0
    ]
    converged = [False if i >= len(trajectory) else atoms.info.get("scf_converged") for i, atoms in frames]
    iterations = [atoms.info.get("scf_iterations") for _, atoms in frames]
    scores = scf_scores(converged, iterations)
    return [
        _candidate(
            atoms,
            i,
            score,
            scf_converged=None if ok is None else bool(ok),
            scf_iterations=None if n is None else int(n),
        )
        for (i, atoms), score, ok, n in zip(frames, scores, converged, iterations)
    ]


def _candidate(atoms: Atoms, index: int, score: float, **values: Any) -> Candidate:
    return Candidate(
        index=index,
        source=str(atoms.info.get("key")),
        md_step=int(atoms.info.get("md_step", 0)),
        score=float(score),
        **values,
    )


def choose(candidates: Sequence[Candidate], k: int, min_spacing: int) -> tuple[list[Candidate], list[dict]]:
    """The chosen candidates (best first) and one row per candidate with its status (selected first)."""
    chosen, status = select_frames(
        [c.score for c in candidates],
        [c.source for c in candidates],
        [c.md_step for c in candidates],
        k,
        min_spacing,
    )
    rows = [c.row(s) for c, s in zip(candidates, status)]
    rows.sort(key=lambda r: (r["status"] != SELECTED, -r["score"], r["index"]))
    return [candidates[i] for i in chosen], rows


def uncertainty_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Scores of the chosen frames against the others: ``selected`` (list), min, max of the rest, counts."""
    picked = [float(r["score"]) for r in rows if r["status"] == SELECTED]
    others = [float(r["score"]) for r in rows if r["status"] == NOT_SELECTED]
    close = [float(r["score"]) for r in rows if r["status"] == TOO_CLOSE]
    return {
        "candidates": len(rows),
        "selected": picked,
        "selected_min": min(picked) if picked else None,
        "selected_mean": float(np.mean(picked)) if picked else None,
        "not_selected_max": max(others) if others else None,
        "too_close": len(close),
    }


def best_design(metrics: Mapping[str, Mapping[str, Any]], candidates: Sequence[str]) -> str:
    """The candidate with the lowest validation energy RMSE (its trainer's own validation split).

    Designs without a validation error rank last; ties keep the order of ``candidates``.
    """
    if not candidates:
        raise ValueError("no design to choose from")

    def error(label: str) -> float:
        value = (((metrics.get(label) or {}).get("valid") or {}).get("energy") or {}).get(ALL, {}).get("rmse")
        return float(value) if value is not None and math.isfinite(float(value)) else math.inf

    return min(candidates, key=lambda label: (error(label), list(candidates).index(label)))


def held_out_rmse(reference: Sequence[Atoms], predictions: Mapping[str, Sequence[Atoms]]) -> dict[str, Any]:
    """Held-out energy (meV/atom) and force (meV/Å) RMSE of every design's predictions."""
    out = {}
    for label, predicted in predictions.items():
        errors = held_out_errors(reference, predicted)
        out[label] = {
            quantity: ((errors.get(quantity) or {}).get(ALL) or {}).get("rmse")
            for quantity in ("energy", "forces")
        }
    return out


def stop_reason(
    *,
    completed: int,
    rounds: int,
    test_error: float | None,
    target_error: float | None,
    spent: int,
    per_round: int,
    available: int | None,
) -> str | None:
    """Why no further round runs (``None``: run one more).

    ``completed`` rounds of ``rounds``; ``test_error`` of the active-learning model (meV/atom) against
    ``target_error``; ``spent`` pw.x runs of active learning so far, ``available`` to it in all (``None``:
    no budget), ``per_round`` per round.
    """
    if target_error is not None and test_error is not None and test_error <= target_error:
        return f"target error met: {test_error:.2f} ≤ {target_error:g} meV/atom"
    if completed >= rounds:
        return f"rounds spent ({rounds})"
    if available is not None and spent + per_round > available:
        return (
            f"DFT budget: {spent} of the {available} pw.x runs left to active learning used; "
            f"a round needs {per_round}"
        )
    return None


def merge_labels(
    training: Sequence[Atoms],
    labelled: Sequence[Atoms],
    held_out_keys: Sequence[str],
    origins: Mapping[str, Mapping[str, Any]],
    round_number: int,
) -> list[Atoms]:
    """The training set with the labelled frames appended, each marked with its round and origin.

    ``origins``: key → ``source`` (the training configuration its MD started from), ``md_step`` and
    ``score``. A labelled key that is held out or already in the training set is an error: the
    held-out structures never enter training, and nothing is labelled twice.
    """
    held = set(held_out_keys)
    present = {str(a.info.get("key")) for a in training}
    out = [a.copy() for a in training]
    for atoms in labelled:
        key = str(atoms.info.get("key"))
        if key in held:
            raise ValueError(f"{key} is held out: it never enters training")
        if key in present:
            raise ValueError(f"{key} is already in the training set")
        origin = origins.get(key)
        if origin is None:
            raise ValueError(f"{key} has no recorded origin in the MD")
        if str(origin["source"]) in held:
            raise ValueError(f"{key} comes from the held-out {origin['source']}")
        frame = atoms.copy()
        frame.info["al_round"] = int(round_number)
        frame.info["al_source"] = str(origin["source"])
        frame.info["al_md_step"] = int(origin["md_step"])
        frame.info["al_score"] = float(origin["score"])
        out.append(frame)
        present.add(key)
    return out


def summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """The comparison's view of an ``active_learning`` record: per round the model's held-out error,
    the pw.x runs and the chosen frames' scores."""
    model = record.get("model")
    rounds = []
    for entry in record.get("rounds") or []:
        errors = entry.get("test_error") or {}
        rounds.append(
            {
                "round": entry.get("round"),
                "model_energy_error": (errors.get(model) or {}).get("energy"),
                "energy_error": {label: e.get("energy") for label, e in errors.items()},
                "dft_calls": entry.get("dft_calls", 0),
                "labelled": entry.get("labelled", 0),
                "training_size": entry.get("training_size"),
                "selected_scores": (entry.get("uncertainty") or {}).get("selected", []),
            }
        )
    return {
        "model": model,
        "selection": record.get("selection"),
        "uncertainty": record.get("uncertainty"),
        "rounds": rounds,
        "rounds_run": record.get("rounds_run", 0),
        "dft_calls": record.get("dft_calls", 0),
        "stop_reason": record.get("stop_reason"),
    }


def verdict(record: Mapping[str, Any]) -> list[str]:
    """One sentence on what active learning did: rounds, labels, the model's error before and after."""
    view = summary(record)
    errors = [r["model_energy_error"] for r in view["rounds"] if r["model_energy_error"] is not None]
    how = (
        f"committee of {record.get('committee')} {view['model']} models"
        if view["selection"] == "committee"
        else f"SCF failures of {view['model']}"
    )
    labelled = sum(int(r["labelled"] or 0) for r in view["rounds"])
    text = (
        f"Active learning ({how}): {view['rounds_run']} round{'s' * (view['rounds_run'] != 1)}, "
        f"{labelled} configurations labelled by {view['dft_calls']} pw.x runs"
    )
    if len(errors) >= 2:
        text += f"; {view['model']}'s held-out energy error {errors[0]:.1f} → {errors[-1]:.1f} meV/atom"
    elif errors:
        text += f"; {view['model']}'s held-out energy error {errors[0]:.1f} meV/atom"
    return [f"{text}; stopped: {view['stop_reason']}."]
