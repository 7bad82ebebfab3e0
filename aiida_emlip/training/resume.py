"""Resuming a run: check that a checkpoint is this run's, restore it, extend a finished run.

A checkpoint must match the current data, seed and schedule (:mod:`.identity`); only the epochs of the
last stage may differ. A finished run whose last stage now asks for more epochs continues that stage;
one that asks for no more sets :attr:`Trainer.nothing_to_train`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aiida_emlip.training.errors import CheckpointError
from aiida_emlip.training.identity import differences, last_stage_epochs_key, run_identity
from aiida_emlip.training.state import load_checkpoint, set_rng_state

if TYPE_CHECKING:
    from aiida_emlip.training.trainer import Trainer

DAMAGED_HINT = "resume from another checkpoint, or start again with --overwrite"


def check_identity(trainer: Trainer, path: Path, state: dict[str, Any]) -> None:
    """A :class:`CheckpointError` naming every field in which the checkpoint's run differs from this one."""
    saved_config = state["config"]
    saved = state.get("identity") or run_identity(saved_config, None)
    same_stages = len(saved_config.get("stages", [])) == len(trainer.config.stages)
    allowed = (last_stage_epochs_key(saved_config),) if same_stages else ()
    differ = differences(saved, trainer.identity(), allowed)
    if differ:
        what = "model configuration" if any(d.startswith("model.") for d in differ) else "run"
        raise CheckpointError(
            f"checkpoint {path} was written for a different {what}; it differs in {'; '.join(differ)}. "
            "Resume with the configuration and data it was written for, or start again with "
            "--overwrite (or another --output-dir)"
        )
    if "identity" not in state:
        trainer.notes.append(f"{path} predates data digests: the training data could not be verified")


def restore(trainer: Trainer, path: Path) -> None:
    """Load ``path`` into ``trainer`` (model, optimizer, scheduler, EMA, RNG, position)."""
    from aiida_emlip.training.trainer import Position

    state = load_checkpoint(path)
    check_identity(trainer, path, state)
    try:
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        for group in trainer.optimizer.param_groups:  # this device's choice, not the checkpoint's
            group["foreach"] = trainer.foreach
        if trainer.scheduler is not None and state["scheduler"] is not None:
            trainer.scheduler.load_state_dict(state["scheduler"])
        if trainer.ema is not None and state["ema"] is not None:
            trainer.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        trainer.pos = Position(**state["position"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is damaged ({type(exc).__name__} while restoring it); {DAMAGED_HINT}"
        ) from None
    trainer.notes.append(f"resumed from {path} at epoch {trainer.pos.epoch}")
    if trainer.pos.stage >= len(trainer.config.stages):
        extend(trainer, path, int(state["config"]["stages"][-1]["epochs"]))


def extend(trainer: Trainer, path: Path, trained: int) -> None:
    """The checkpoint's run is finished: continue its last stage up to the new epoch count, if larger.

    A cosine schedule, which ended at ``min_lr``, restarts at the learning rate over the new epochs;
    the other schedules continue. Early stopping gets its full patience again.
    """
    last = trainer.config.stages[-1]
    extra = last.epochs - trained
    pos = trainer.pos
    if extra <= 0:
        trainer.nothing_to_train = (
            f"nothing to train: {path} is a finished run of {pos.epoch} epoch(s); its last stage "
            f"'{last.name}' had {trained} and the configuration asks for {last.epochs}. To train "
            f"longer, resume with more epochs: --epochs N, or more in the last stage"
        )
        return
    pos.stage, pos.epoch_in_stage, pos.stage_started = len(trainer.config.stages) - 1, trained, True
    pos.bad_epochs = 0
    message = (
        f"extending the finished run: {extra} more epoch(s) of stage '{last.name}' "
        f"({trained} -> {last.epochs}; epoch {pos.epoch} -> {pos.epoch + extra})"
    )
    if isinstance(trainer.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
        base = (last.lr if last.lr is not None else trainer.config.optimizer.lr) * pos.lr_scale
        for group in trainer.optimizer.param_groups:
            group["lr"] = group["initial_lr"] = base
        trainer.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            trainer.optimizer, T_max=extra, eta_min=trainer.config.scheduler.min_lr
        )
        message += f"; the cosine schedule restarts at lr {base:g} over the {extra} new epoch(s)"
    trainer.notes.append(message)
