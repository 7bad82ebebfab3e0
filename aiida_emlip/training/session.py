"""One ``emlip-train`` invocation: configuration, trainer, output directory, lock and resume.

Everything that can be refused is checked before the directory is touched: the configuration and
data (building the :class:`~aiida_emlip.training.trainer.Trainer`), the directory and its lock, and
the checkpoint to resume from. Only then are old outputs removed (``--overwrite``) and training starts.
Under ``torchrun`` rank 0 alone prepares the directory and the other ranks follow its decision.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiida_emlip.training import distributed
from aiida_emlip.training.config import TrainConfig, load_config
from aiida_emlip.training.errors import Interrupted, OutputError
from aiida_emlip.training.rundir import Plan, clear, prepare
from aiida_emlip.training.trainer import SIGNALS, Trainer


@contextlib.contextmanager
def _signals_stop() -> Iterator[None]:
    """Outside the training loop, SIGTERM/SIGUSR1 stop with :class:`Interrupted` (so the lock goes)."""

    def stop(signum: int, _frame: Any) -> None:
        raise Interrupted(
            f"signal {signum} received outside the training loop; stopped without a new checkpoint"
        )

    previous: dict[int, Any] = {signal.SIGINT: signal.getsignal(signal.SIGINT)}
    try:
        previous.update({s: signal.signal(s, stop) for s in SIGNALS})
    except ValueError:  # not the main thread: signals cannot be handled here
        previous = {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _agree(trainer: Trainer, failed: bool) -> None:
    """Ranks other than 0 stop when rank 0 did (one collective; nothing on a single process)."""
    if distributed.any_rank(trainer.world, failed, trainer.device) and not failed:
        raise OutputError("rank 0 stopped before training (see its message)")


def _prepare(trainer: Trainer, args: argparse.Namespace) -> Plan | None:
    plan, failed = None, True
    try:
        if trainer.world.is_main:
            plan = prepare(
                trainer.output_dir, trainer.checkpoint_path, args.resume, args.overwrite, args.config
            )
        failed = False
    finally:
        _agree(trainer, failed)
    return plan


def _resume_path(trainer: Trainer, args: argparse.Namespace, plan: Plan | None) -> Path | None:
    if plan is not None:
        return plan.resume
    if args.resume == "auto":
        return trainer.checkpoint_path if trainer.checkpoint_path.is_file() else None
    return Path(args.resume) if args.resume else None


def _start(trainer: Trainer, args: argparse.Namespace, plan: Plan | None) -> None:
    resume = _resume_path(trainer, args, plan)
    if resume is not None:
        trainer.load(resume)
    if getattr(args, "lr_scale", None) is not None:
        trainer.set_lr_scale(args.lr_scale)
    if trainer.nothing_to_train:
        if trainer.world.is_main:
            print(trainer.nothing_to_train)
        return
    failed = True
    try:
        if plan is not None:
            if plan.lock.stale_owner:
                trainer.notes.insert(
                    0, f"took over the stale lock {plan.lock.path} of {plan.lock.stale_owner}"
                )
            removed = clear(trainer.output_dir, plan.clear)
            if removed:
                why = "--overwrite" if args.overwrite else "replacing the previous attempt"
                trainer.notes.insert(0, f"{why}: removed {', '.join(removed)} from {trainer.output_dir}")
        failed = False
    finally:
        _agree(trainer, failed)
    if trainer.config_copy is not None and plan is not None and plan.is_input(trainer.config_copy):
        trainer.config_copy = None
        trainer.notes.append("config.yaml in the output directory is the input configuration: left as it is")
    signal.signal(signal.SIGINT, trainer._on_signal)  # Ctrl-C also checkpoints cleanly
    try:
        trainer.run()
    except OSError as exc:  # train.log on a full disk, ...
        raise OutputError(f"cannot write to {trainer.output_dir}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    """Restore the RNG states and torch's thread count that building a :class:`Trainer` sets."""
    import numpy as np
    import torch

    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        torch.set_num_threads(threads)


def check(config: TrainConfig, device: str | None = None) -> str:
    """``emlip-train --check``: build the trainer (configuration, data, labels, model), train nothing.

    Raises the :class:`~aiida_emlip.training.errors.TrainingError` a run would stop with before its
    first step; returns the one-line summary. Leaves the calling process as it was (RNG states,
    threads), so another program can run it (the AiiDA workchain ``emlip.train.base`` does).
    """
    with _process_state_kept():
        trainer = Trainer(config, device=device)
    return f"ok: {len(trainer.train)} train, {len(trainer.valid)} valid, {len(trainer.test)} test structures"


def run_training(args: argparse.Namespace) -> None:
    """What ``emlip-train`` does with its parsed arguments."""
    config = load_config(args.config)
    if getattr(args, "init_from", None) is not None:
        config.init_from = str(args.init_from)
    if args.epochs is not None:
        config.set_total_epochs(args.epochs)
    if args.check:
        print(check(config, args.device))
        return
    trainer = Trainer(config, output_dir=args.output_dir, device=args.device)
    with _signals_stop():
        plan = _prepare(trainer, args)
        try:
            _start(trainer, args, plan)
        finally:
            if plan is not None:
                plan.lock.release()
