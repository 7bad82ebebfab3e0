"""Radial functions of the graph's edges for heads that read out one number per bond (no AiiDA)."""

from __future__ import annotations

import math

import torch


def cosine_envelope(lengths: torch.Tensor, cutoff: float) -> torch.Tensor:
    """½(cos(πr/r_c) + 1) below the cutoff r_c, zero beyond: smooth to first order at r_c."""
    smooth = 0.5 * (torch.cos(math.pi * lengths / cutoff) + 1.0)
    return torch.where(lengths < cutoff, smooth, torch.zeros_like(lengths))


def bessel_radial(lengths: torch.Tensor, cutoff: float, num: int) -> torch.Tensor:
    """Bessel basis sin(nπr/r_c)/r times the cosine envelope, ``[E, num]``; zero beyond the cutoff."""
    n = torch.arange(1, num + 1, dtype=lengths.dtype, device=lengths.device)
    x = lengths.clamp(min=1e-9)[:, None]
    return torch.sin(n * math.pi * x / cutoff) / x * cosine_envelope(lengths, cutoff)[:, None]
