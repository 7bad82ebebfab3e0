"""Electrostatic heads, one small class per design point; importing registers them by name."""

from aiida_emlip.models.heads import charges, fixed, functional, latent, qeq, scf, split, sr
from aiida_emlip.models.heads.base import (
    CAPABILITIES,
    HEADS,
    Head,
    HeadInput,
    HeadOutput,
    build_head,
    head_capabilities,
)

__all__ = [
    "CAPABILITIES",
    "HEADS",
    "Head",
    "HeadInput",
    "HeadOutput",
    "build_head",
    "charges",
    "fixed",
    "functional",
    "head_capabilities",
    "latent",
    "qeq",
    "scf",
    "split",
    "sr",
]
