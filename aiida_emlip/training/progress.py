"""Progress output: a bar on a terminal, plain timestamped log lines in batch jobs."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO


class Progress:
    """Reports steps and epochs; ``mode`` is ``bar``, ``log`` or ``auto`` (bar only on a TTY)."""

    def __init__(
        self,
        mode: str = "auto",
        enabled: bool = True,
        logfile: Path | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.bar = mode == "bar" or (mode == "auto" and self.stream.isatty())
        self.enabled = enabled
        self.logfile = logfile
        self.start = time.perf_counter()

    def log(self, message: str) -> None:
        """A plain log line (also appended to the log file)."""
        if not self.enabled:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        if self.bar:
            self.stream.write("\r\033[K")
        print(line, file=self.stream, flush=True)
        if self.logfile is not None:
            with self.logfile.open("a") as handle:
                handle.write(line + "\n")

    def step(self, epoch: int, step: int, total: int, loss: float) -> None:
        """A bar update (terminal only)."""
        if not (self.enabled and self.bar):
            return
        width = 30
        done = int(width * (step + 1) / max(total, 1))
        bar = "#" * done + "." * (width - done)
        self.stream.write(f"\repoch {epoch:4d} [{bar}] {step + 1}/{total} loss {loss:.4g}")
        self.stream.flush()
