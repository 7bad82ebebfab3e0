"""Exceptions of the trainer and the exit status each one maps to."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit statuses of ``emlip-train`` and ``emlip-eval`` (documented in docs/training.md)."""

    OK = 0
    INTERNAL = 1  # an unexpected error (a bug): traceback printed
    BAD_INPUT = 2  # bad configuration, dataset, output directory or checkpoint; or output unwritable
    NON_FINITE = 3  # NaN/inf in the data, the loss or the gradients: stopped cleanly
    INTERRUPTED = 4  # SIGTERM/SIGUSR1/SIGINT received: checkpoint written, resume with --resume
    SCF_FAILED = 5  # a self-consistent head did not converge or diverged (head option on_failure='raise')
    NOT_CONVERGED = 6  # emlip-eval: a relaxation stopped at max_steps above fmax (results written)
    OUT_OF_MEMORY = 7  # the host or the GPU ran out of memory (lower data.batch_size)


class ReferenceEnergyWarning(UserWarning):
    """``reference_energies: fit`` could not determine every element's E0 and fell back (see the message)."""


class DataWarning(UserWarning):
    """The data are usable but probably not what was meant (e.g. no total charge for a head that uses it)."""


class TrainingError(Exception):
    """Base class; ``exit_code`` says how the command line tools exit."""

    exit_code: ExitCode = ExitCode.INTERNAL


class ConfigError(TrainingError, ValueError):
    """The YAML configuration is malformed (unknown key, wrong type, bad value)."""

    exit_code = ExitCode.BAD_INPUT


class DataError(TrainingError, ValueError):
    """A dataset is empty, misses a key, or holds values in implausible units."""

    exit_code = ExitCode.BAD_INPUT


class OutputError(TrainingError):
    """The output directory holds another run, is locked by a running one, or cannot be written."""

    exit_code = ExitCode.BAD_INPUT


class CheckpointError(ConfigError):
    """A checkpoint is unreadable (truncated, corrupt) or belongs to another run."""

    exit_code = ExitCode.BAD_INPUT


class NonFiniteError(TrainingError, FloatingPointError):
    """A NaN or inf appeared in the data, a loss or a gradient."""

    exit_code = ExitCode.NON_FINITE


class Interrupted(TrainingError):
    """A batch-scheduler signal stopped training after a checkpoint was written."""

    exit_code = ExitCode.INTERRUPTED


class ScfFailedError(TrainingError, RuntimeError):
    """A self-consistent head did not converge or diverged."""

    exit_code = ExitCode.SCF_FAILED


class RelaxNotConvergedError(TrainingError, RuntimeError):
    """A relaxation of ``emlip-eval`` reached ``max_steps`` before ``fmax`` (its results are written)."""

    exit_code = ExitCode.NOT_CONVERGED
