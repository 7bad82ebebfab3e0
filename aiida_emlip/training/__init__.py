"""Training of aiida-emlip models in plain PyTorch (no AiiDA): dataset, losses, trainer, CLI."""

from aiida_emlip.training.errors import ExitCode, TrainingError

__all__ = ["ExitCode", "TrainingError"]
