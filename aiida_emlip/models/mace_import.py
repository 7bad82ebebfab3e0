"""mace-torch and e3nn, imported without side effects on the user's process.

``import mace`` sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for the whole process (so that e3nn 0.4.4
can load its own constants under torch ≥ 2.6), which would let any later ``torch.load`` in the user's
session unpickle arbitrary objects; and importing ``mace.modules`` prints a notice about
cuEquivariance on stdout. Here mace and e3nn are imported with the variable set only while e3nn loads
its constants (the previous value is restored), and the notice is swallowed. TorchScript's remarks
on e3nn's and mace-torch's modules while they are imported and built (:data:`QUIET_WARNINGS`) are
silenced there, in every caller's process: they say nothing about the user's run.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from types import ModuleType

_KEY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"

#: Third-party warnings that say nothing about the user's run: e3nn loading its own constants while
#: mace-torch's TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set (aiida-emlip never unpickles a file), and
#: TorchScript's remarks on e3nn's and mace-torch's modules (which newer torch versions also call
#: deprecated).
QUIET_WARNINGS = (
    f"Environment variable {_KEY}",
    "The TorchScript type system doesn't support instance-level annotations",
    "`torch.jit.script` is deprecated",
)


@contextlib.contextmanager
def quiet_third_party():
    """Silence :data:`QUIET_WARNINGS` (and only those) inside the block."""
    with warnings.catch_warnings():
        for text in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=text)
        yield


def _restore(previous: str | None) -> None:
    if previous is None:
        os.environ.pop(_KEY, None)
    else:
        os.environ[_KEY] = previous


_previous = os.environ.get(_KEY)
try:
    with quiet_third_party():
        import mace  # noqa: F401  # sets the variable: must precede e3nn
        from e3nn import o3  # noqa: F401  # loads its constants with torch.load
finally:
    _restore(_previous)


def mace_modules() -> ModuleType:
    """``mace.modules`` (MACE and its interaction blocks), imported quietly."""
    previous = os.environ.get(_KEY)
    try:
        with contextlib.redirect_stdout(io.StringIO()), quiet_third_party():
            import mace.modules
    finally:
        _restore(previous)
    return mace.modules
