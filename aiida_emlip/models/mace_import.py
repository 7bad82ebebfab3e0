"""mace-torch and e3nn, imported without side effects on the user's process.

``import mace`` sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for the whole process (so that e3nn 0.4.4
can load its own constants under torch ≥ 2.6), which would let any later ``torch.load`` in the user's
session unpickle arbitrary objects; and importing ``mace.modules`` prints a notice about
cuEquivariance on stdout. Here mace and e3nn are imported with the variable set only while e3nn loads
its constants (the previous value is restored), and the notice is swallowed.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from types import ModuleType

_KEY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def _restore(previous: str | None) -> None:
    if previous is None:
        os.environ.pop(_KEY, None)
    else:
        os.environ[_KEY] = previous


_previous = os.environ.get(_KEY)
try:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f"Environment variable {_KEY}")
        import mace  # noqa: F401  # sets the variable: must precede e3nn
        from e3nn import o3  # noqa: F401  # loads its constants with torch.load
finally:
    _restore(_previous)


def mace_modules() -> ModuleType:
    """``mace.modules`` (MACE and its interaction blocks), imported quietly."""
    previous = os.environ.get(_KEY)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import mace.modules
    finally:
        _restore(previous)
    return mace.modules
