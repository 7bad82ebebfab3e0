"""The ``active_learning`` block of a study spec (pure: no AiiDA).

::

    active_learning:
      rounds: 2              # at most this many rounds
      model: best            # or a design label; best: lowest validation energy error
      committee: 3           # seeds of that design for the disagreement (selection: committee)
      selection: committee   # committee | scf_failures
      md: {temperature: 600, steps: 200, interval: 10, timestep: 0.5}
      per_round: 4           # configurations labelled by DFT per round
      target_error: 5.0      # meV/atom on the held-out set: stop when reached
      warm_start: true       # retrain each design from its previous model (false: from scratch)
      retrain_epochs: 25     # epochs of the retrainings (default: each design's own)
      retrain_lr: 0.002      # learning rate of the warm-started retrainings (default: each design's own)

The keys and types are checked by the spec's block checker (:data:`ACTIVE_KEYS`, :data:`MD_KEYS`);
:func:`check_active_learning` checks what the values mean against the rest of the spec and fills the
defaults that depend on other values (``min_spacing``).
"""

from __future__ import annotations

from typing import Any

from aiida_emlip.analysis.active_learning import UNCERTAINTIES

SELECTIONS = ("committee", "scf_failures")
ENSEMBLES = ("langevin", "nve")
#: Heads that solve for their charges iteratively and flag frames whose SCF did not converge.
ITERATIVE_HEADS = ("scf", "qeq", "functional")

ACTIVE_KEYS: dict[str, tuple[tuple[type, ...], Any]] = {
    "rounds": ((int,), 1),
    "model": ((str,), "best"),
    "committee": ((int,), 3),
    "selection": ((str,), "committee"),
    "uncertainty": ((str,), "energy"),
    "md": ((dict,), {}),
    "per_round": ((int,), 4),
    "min_spacing": ((int,), None),
    "target_error": ((float, int), None),
    "warm_start": ((bool,), True),
    "retrain_epochs": ((int,), None),
    "retrain_lr": ((float, int), None),
}
MD_KEYS: dict[str, tuple[tuple[type, ...], Any]] = {
    "temperature": ((float, int), 300.0),
    "steps": ((int,), 100),
    "interval": ((int,), 10),
    "timestep": ((float, int), 0.5),
    "ensemble": ((str,), "langevin"),
    "seed": ((int,), 0),
}

Problems = list[tuple[tuple[Any, ...], str]]


def check_active_learning(block: dict[str, Any], heads: dict[str, str]) -> Problems:
    """Problems of a checked ``active_learning`` block (paths relative to it); fills ``min_spacing``.

    ``heads``: design label → head name (of the spec's designs).
    """
    problems: Problems = []
    for key in ("rounds", "per_round"):
        if block.get(key, 1) < 1:
            problems.append(((key,), "must be at least 1"))
    selection = block.get("selection")
    if selection not in SELECTIONS:
        problems.append((("selection",), f"choose from {', '.join(SELECTIONS)}"))
    if selection == "committee":
        if block.get("committee", 2) < 2:
            problems.append((("committee",), "a committee needs at least 2 members (seeds)"))
        if block.get("uncertainty") not in UNCERTAINTIES:
            problems.append((("uncertainty",), f"choose from {', '.join(UNCERTAINTIES)}"))
    if block.get("retrain_epochs", 1) < 1:
        problems.append((("retrain_epochs",), "must be at least 1"))
    if block.get("retrain_lr") is not None:
        if block["retrain_lr"] <= 0:
            problems.append((("retrain_lr",), "must be positive"))
        elif not block.get("warm_start", True):
            problems.append((("retrain_lr",), "applies to warm-started retrainings: warm_start is false"))
    target = block.get("target_error")
    if target is not None and target <= 0:
        problems.append((("target_error",), "must be positive (meV/atom)"))
    problems += _model(block, heads)
    md = block.get("md") or {}
    if md.get("temperature", 1.0) <= 0:
        problems.append((("md", "temperature"), "must be positive (K)"))
    if md.get("timestep", 1.0) <= 0:
        problems.append((("md", "timestep"), "must be positive (fs)"))
    for key in ("steps", "interval"):
        if md.get(key, 1) < 1:
            problems.append((("md", key), "must be at least 1"))
    if md.get("interval", 1) > md.get("steps", 1) >= 1:
        problems.append((("md", "interval"), f"larger than md.steps ({md['steps']}): no frame to score"))
    if md.get("ensemble") not in ENSEMBLES:
        problems.append((("md", "ensemble"), f"choose from {', '.join(ENSEMBLES)}"))
    if "min_spacing" not in block:
        block["min_spacing"] = 2 * int(md.get("interval", 1))
    elif block["min_spacing"] < 1:
        problems.append((("min_spacing",), "must be at least 1 (MD steps)"))
    return problems


def _model(block: dict[str, Any], heads: dict[str, str]) -> Problems:
    model = block.get("model")
    if not heads:
        return []
    if model != "best" and model not in heads:
        return [(("model",), f"'best' or a design: {', '.join(heads)}")]
    if block.get("selection") != "scf_failures":
        return []
    iterative = [label for label, head in heads.items() if head in ITERATIVE_HEADS]
    if model == "best" and not iterative:
        return [
            (
                ("selection",),
                f"scf_failures needs a design with a self-consistent head ({', '.join(ITERATIVE_HEADS)}); "
                f"none of {', '.join(heads)} has one",
            )
        ]
    if model != "best" and heads[model] not in ITERATIVE_HEADS:
        return [
            (
                ("model",),
                f"scf_failures needs a self-consistent head ({', '.join(ITERATIVE_HEADS)}); "
                f"{model} is {heads[model]}",
            )
        ]
    return []


def candidate_designs(block: dict[str, Any], heads: dict[str, str]) -> list[str]:
    """The designs the active-learning model may be (all for ``best``, unless SCF failures select)."""
    if block["model"] != "best":
        return [block["model"]]
    if block["selection"] == "scf_failures":
        return [label for label, head in heads.items() if head in ITERATIVE_HEADS]
    return list(heads)


def warm_learning_rate(config: dict[str, Any], lr: float) -> dict[str, Any]:
    """``config`` (an emlip-train config) retrained at learning rate ``lr``: the optimizer's, and every
    stage's that resets it; a scheduler's floor (``min_lr``) above ``lr`` is lowered to ``lr``."""
    out = dict(config)
    out["optimizer"] = {**(config.get("optimizer") or {}), "lr": float(lr)}
    scheduler = dict(config.get("scheduler") or {})
    if scheduler.get("min_lr") is not None and float(scheduler["min_lr"]) > lr:
        scheduler["min_lr"] = float(lr)
    if scheduler:
        out["scheduler"] = scheduler
    if config.get("stages"):
        out["stages"] = [
            {**stage, "lr": float(lr)} if stage.get("lr") is not None else dict(stage)
            for stage in config["stages"]
        ]
    return out


def room_for_rounds(budget: int | None, planned: int) -> int | None:
    """pw.x runs left to active learning by a budget after the ``planned`` ones (``None``: no budget)."""
    return None if budget is None else max(0, int(budget) - int(planned))


def scaled_stages(stages: list[dict[str, Any]], epochs: int) -> list[dict[str, Any]]:
    """``stages`` (of an emlip-train config) with ``epochs`` in all, shared in their proportions.

    Cumulative rounding: the stages' epochs sum to ``epochs`` exactly, and a stage keeps its place in
    the schedule (a stage may get none when ``epochs`` is smaller than the number of stages).
    """
    total = sum(int(stage.get("epochs", 10)) for stage in stages)
    out, done, before = [], 0, 0
    for stage in stages:
        done += int(stage.get("epochs", 10))
        upto = round(done * epochs / total) if total else (epochs if stage is stages[-1] else 0)
        out.append({**stage, "epochs": upto - before})
        before = upto
    return out
