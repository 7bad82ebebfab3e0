"""Data parallelism over processes started by ``torchrun`` (one node or several), via torch.distributed.

Every rank holds the full model; after each backward pass the gradients are summed with
``all_reduce`` and divided by the number of ranks that had a batch, so ranks with no batch in the last
step of an epoch contribute zeros and never deadlock. CPU runs use ``gloo``, CUDA runs ``nccl``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def init(device_type: str) -> World:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(world: World, values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over ranks (identity on one process)."""
    if world.active:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def average_gradients(world: World, model: torch.nn.Module, has_batch: bool) -> None:
    """Replace each gradient by its mean over the ranks that processed a batch in this step."""
    if not world.active:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    count = torch.tensor([1.0 if has_batch else 0.0], dtype=flat.dtype, device=flat.device)
    flat = all_sum(world, torch.cat([flat, count]))
    flat, count = flat[:-1] / flat[-1].clamp(min=1.0), flat[-1]
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def any_rank(world: World, flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank."""
    if not world.active:
        return flag
    value = all_sum(world, torch.tensor([1.0 if flag else 0.0], device=device))
    return bool(value.item() > 0)
