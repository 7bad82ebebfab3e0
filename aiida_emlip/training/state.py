"""Exponential moving average of weights, RNG state capture and checkpoint files (weights_only)."""

from __future__ import annotations

import io
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aiida_emlip.training.atomic import write_bytes_atomic
from aiida_emlip.training.errors import CheckpointError


class Ema:
    """Shadow copy of the floating parameters: ``shadow ← d·shadow + (1-d)·param`` after each step."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: p.detach().clone() for k, p in model.named_parameters()}
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        # warm-up as in common practice: early averages are not dominated by the random start
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for k, p in model.named_parameters():
            self.shadow[k].mul_(decay).add_(p.detach(), alpha=1 - decay)

    @torch.no_grad()
    def swap(self, model: torch.nn.Module) -> None:
        """Exchange the model's parameters with the shadow (call twice to undo)."""
        for k, p in model.named_parameters():
            tmp = p.detach().clone()
            p.copy_(self.shadow[k])
            self.shadow[k].copy_(tmp)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as plain tensors/lists (loadable with weights_only)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


#: Checkpoint formats this version reads; /1 lacks the run identity (data digests).
CHECKPOINT_FORMAT = "aiida-emlip-checkpoint/2"
READABLE_FORMATS = ("aiida-emlip-checkpoint/1", CHECKPOINT_FORMAT)
#: Entries every readable checkpoint holds.
CHECKPOINT_KEYS = ("config", "model", "optimizer", "scheduler", "ema", "rng", "position")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (temporary file + rename) so a kill during the write leaves the old file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(path, buffer.getvalue())


#: How torch's weights-only unpickler names a global (class, function) it refused to load.
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _refused_global(exc: BaseException) -> str | None:
    """The object a weights-only ``torch.load`` refused to unpickle (e.g. ``io.open``), if any."""
    match = _REFUSED_GLOBAL.search(str(exc))
    return match.group(1) if match else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint (``weights_only=True``); an unreadable one is a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    hint = "resume from another checkpoint, or start again with --overwrite"
    try:
        # weights_only is always explicit: mace sets a global override; torch's remarks on the pickle
        # protocol of a foreign file say nothing the error below does not
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... on bad bytes
        name = _refused_global(exc)
        if name is not None:
            raise CheckpointError(
                f"checkpoint {path} is not an aiida-emlip checkpoint: it holds the Python object {name}, "
                f"which only unpickling could restore, and unpickling can run code (refused); {hint}"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is truncated, corrupt or not an aiida-emlip checkpoint "
            f"({type(exc).__name__}); {hint}"
        ) from None
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path} is not an aiida-emlip checkpoint; {hint}")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (no {', '.join(missing)}); {hint}")
    return state
