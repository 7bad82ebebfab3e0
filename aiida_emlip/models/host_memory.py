"""How the process's C allocator treats freed host memory, for models evaluated on the CPU (no AiiDA).

glibc's ``malloc`` serves every request above 32 MiB with a fresh ``mmap`` and gives it back to the
system when it is freed. A MACE evaluation of a large cell makes many such tensors (per-edge
features: ~200 MB each at 16k atoms), so each evaluation touches its memory anew, one page fault per
4 KiB page, and the kernel's page handling grows to most of the time: on the 2-core development
machine an energy + forces evaluation of 17.6k-atom NaCl spent 9.5 of its 10.5 s in the kernel
(3.2 million page faults), while the 4k-atom cell spent 0.4 of 1.1 s.

:func:`retain_freed_memory` makes ``malloc`` keep freed memory for the next request instead
(``mallopt``: no ``mmap`` for large blocks, no trimming of the heap), so repeated evaluations reuse
it without faults once the heap has grown to their pattern, after two or three evaluations: the same
17.6k-atom evaluation then takes 2.7–3.5 s. The price is a higher peak resident memory (freed blocks
that do not fit a later request stay in the process), +10 % at 4k atoms and +56–74 % at 8k–17.6k
atoms on the benchmark cells, and memory that is not returned to the system until the process ends.
``EMLIP_HOST_MEMORY=release`` in the environment keeps the allocator's default behaviour wherever
aiida-emlip would change it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import warnings

#: glibc's ``mallopt`` parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: Free space at the top of the heap above which glibc gives memory back: ``mallopt`` reads -1 as the
#: largest ``size_t``, so never.
TRIM_THRESHOLD = -1
#: The environment variable, its value that keeps the allocator's default behaviour and the default's.
ENV_VARIABLE, RELEASE, RETAIN = "EMLIP_HOST_MEMORY", "release", "retain"

_applied: bool | None = None


def released_by_environment() -> bool:
    """Whether ``EMLIP_HOST_MEMORY=release`` asks to keep the allocator's default behaviour; another
    value than ``release`` or ``retain`` is ignored with a warning (a misspelt opt-out would otherwise
    go unnoticed)."""
    value = os.environ.get(ENV_VARIABLE, "").strip().lower()
    if value not in ("", RELEASE, RETAIN):
        warnings.warn(
            f"{ENV_VARIABLE}={value!r} is neither {RELEASE!r} nor {RETAIN!r}: ignored, freed memory is kept",
            stacklevel=3,
        )
    return value == RELEASE


def retain_freed_memory() -> bool:
    """Keep freed host memory in the process for later tensors (see the module); whether it applies.

    Only on Linux with glibc (elsewhere nothing changes: ``False``), and not with
    ``EMLIP_HOST_MEMORY=release``. Applies to the whole process and stays for its lifetime; calling
    it again does nothing more.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if released_by_environment() or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the trim threshold first, so that nothing is given back meanwhile
    _applied = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and mallopt(M_MMAP_MAX, 0) == 1
    return _applied


def retain_on_cpu(device) -> bool:
    """:func:`retain_freed_memory` where ``device`` (a ``torch.device`` or its name) is the CPU, as
    aiida-emlip does wherever it evaluates models (the calculator, ``emlip-eval``); whether it applies.
    On an accelerator nothing changes (its host allocations are small)."""
    return str(device).split(":")[0] == "cpu" and retain_freed_memory()
