"""Exponential moving average of weights, RNG state capture and checkpoint files (weights_only)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


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


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (temporary file + rename) so a kill during the write leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint; ``weights_only=True`` is always explicit (mace sets a global override)."""
    return torch.load(path, map_location="cpu", weights_only=True)
