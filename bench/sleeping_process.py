"""A calcfunction that sleeps in the daemon worker, for ``consumer_timeout_probe.py``.

Its own module (no side effects on import) so that a daemon worker can import it.
"""

from __future__ import annotations

import os
import time

from aiida.engine import calcfunction
from aiida.orm import Int, Str


@calcfunction
def sleeping_calcfunction(seconds: Int, marker: Str) -> Int:
    """Sleep ``seconds`` in the daemon worker, appending one line to the file ``marker`` per execution."""
    with open(marker.value, "a") as handle:
        handle.write(f"{os.getpid()} {time.time():.1f}\n")
    time.sleep(seconds.value)
    return Int(seconds.value)
