"""Electrostatic heads, one small class per design point; importing registers them by name."""

from aiida_emlip.models.heads import charges, fixed, functional, latent, qeq, scf, split, sr
from aiida_emlip.models.heads.base import HEADS, Head, HeadInput, HeadOutput, build_head

__all__ = [
    "HEADS",
    "Head",
    "HeadInput",
    "HeadOutput",
    "build_head",
    "charges",
    "fixed",
    "functional",
    "latent",
    "qeq",
    "scf",
    "split",
    "sr",
]
