"""Processes per machine: ``emlip-train --nproc-per-node N`` starts itself again under ``torchrun``.

No torch and no AiiDA import: the AiiDA calculation and the study spec check the value with
:func:`check_nproc_per_node`; the trainer's command line builds the ``torchrun`` command with
:func:`torchrun_command`.
"""

from __future__ import annotations

import numbers
import os
import sys
from collections.abc import Sequence
from typing import Any

#: The module that ``torchrun`` starts on every rank (``python -m aiida_emlip.training.cli train ...``).
CLI_MODULE = "aiida_emlip.training.cli"
#: Set by ``torchrun`` in every process it starts.
TORCHRUN_VARIABLES = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")


def check_nproc_per_node(value: Any) -> str | None:
    """The problem with ``value`` as a number of training processes on one machine, or ``None``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return (
            f"nproc_per_node must be a whole number of processes (1: plain emlip-train, N > 1: torchrun "
            f"with N processes), got {value!r} ({type(value).__name__})"
        )
    if value < 1:
        return f"nproc_per_node must be at least 1, got {value}"
    return None


def under_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (one of its ranks)."""
    return any(name in os.environ for name in TORCHRUN_VARIABLES)


def torchrun_command(nproc_per_node: int, argv: Sequence[str]) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m aiida_emlip.training.cli train ARGV``, run by this
    Python (``python -m torch.distributed.run`` is what the ``torchrun`` script runs)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(int(nproc_per_node)),
        "-m",
        CLI_MODULE,
        "train",
        *argv,
    ]
