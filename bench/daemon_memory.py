"""Resident memory of the AiiDA daemon's workers over a run, and its growth after a warm-up.

:func:`sample_workers` returns ``{pid: rss_MB}`` of the processes running ``verdi -p PROFILE daemon
worker``; :class:`MemoryTrace` samples them in a thread together with a progress count supplied by the
caller, and :func:`growth` reports, per worker, the peak, the resident size once ``warmup`` units of
progress were reached, and the largest growth beyond it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psutil


def sample_workers(profile: str) -> dict[int, float]:
    """RSS (MB) of every daemon worker of ``profile``."""
    out = {}
    for proc in psutil.process_iter(["pid", "cmdline", "memory_info"]):
        cmd = proc.info.get("cmdline") or []
        if "daemon" in cmd and "worker" in cmd and profile in cmd and proc.info.get("memory_info"):
            out[proc.info["pid"]] = proc.info["memory_info"].rss / 2**20
    return out


class MemoryTrace:
    """Samples (time, progress, {pid: rss}) every ``interval`` seconds while the block runs."""

    def __init__(self, profile: str, progress: Callable[[], int], interval: float = 2.0) -> None:
        self.profile, self.progress, self.interval = profile, progress, interval
        self.samples: list[tuple[float, int, dict[int, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.perf_counter()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                done = self.progress()
            except Exception:  # a query racing the workchain's own writes: keep the last count
                done = self.samples[-1][1] if self.samples else 0
            self.samples.append((time.perf_counter() - self._start, done, sample_workers(self.profile)))
            self._stop.wait(self.interval)

    def __enter__(self) -> MemoryTrace:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def growth(samples: list[tuple[float, int, dict[int, float]]], warmup: int) -> dict[str, Any]:
    """Per worker: peak RSS, RSS when ``warmup`` units were done, the largest growth after that."""
    workers: dict[int, dict[str, Any]] = {}
    for _, done, rss in samples:
        for pid, mb in rss.items():
            row = workers.setdefault(pid, {"peak_mb": 0.0, "at_warmup_mb": None, "max_after_warmup_mb": 0.0})
            row["peak_mb"] = max(row["peak_mb"], mb)
            if done >= warmup:
                if row["at_warmup_mb"] is None:
                    row["at_warmup_mb"] = mb
                row["max_after_warmup_mb"] = max(row["max_after_warmup_mb"], mb)
            row["last_mb"] = mb
    for row in workers.values():
        base = row["at_warmup_mb"]
        row["growth_after_warmup"] = (row["max_after_warmup_mb"] - base) / base if base else None
    return {str(pid): row for pid, row in workers.items()}
