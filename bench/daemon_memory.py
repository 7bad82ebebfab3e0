"""A throw-away profile's daemon seen from the operating system: its processes, their memory.

:func:`daemon_processes` finds the circus arbiter, its statistics process and the workers of a
profile's daemon; :func:`sample_workers` returns ``{pid: rss_MB}`` of the workers; :class:`Sampler`
calls a method every few seconds in a thread while a block runs, and :class:`MemoryTrace` records the
workers' memory with it, together with a progress count supplied by the caller; :func:`growth`
reports, per worker, the peak, the resident size once ``warmup`` units of progress were reached, and
the largest growth beyond it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil


def daemon_processes(profile: str) -> list[psutil.Process]:
    """The OS processes of ``profile``'s daemon: its circus arbiter, its statistics process, its workers
    (``proc.info["cmdline"]`` is filled in)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        text = " ".join(cmdline)
        daemon = "daemon" in cmdline and {"start-circus", "worker"} & set(cmdline)
        stats = "circus import stats" in text  # circusd-stats, named by its log file
        if profile in text and (daemon or stats):
            found.append(proc)
    return found


def sample_workers(profile: str) -> dict[int, float]:
    """RSS (MB) of every daemon worker of ``profile``."""
    out = {}
    for proc in daemon_processes(profile):
        if "worker" in (proc.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):  # a worker that just ended
                out[proc.pid] = proc.memory_info().rss / 2**20
    return out


class Sampler:
    """Calls :meth:`sample` every ``interval`` seconds in a thread while the ``with`` block runs."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class MemoryTrace(Sampler):
    """Samples (time, progress, {pid: rss}) of ``profile``'s workers every ``interval`` seconds."""

    def __init__(self, profile: str, progress: Callable[[], int] = lambda: 0, interval: float = 2.0) -> None:
        super().__init__(interval)
        self.profile, self.progress = profile, progress
        self.samples: list[tuple[float, int, dict[int, float]]] = []
        self._start = time.perf_counter()

    def sample(self) -> None:
        try:
            done = self.progress()
        except Exception:  # a query racing the workchain's own writes: keep the last count
            done = self.samples[-1][1] if self.samples else 0
        self.samples.append((time.perf_counter() - self._start, done, sample_workers(self.profile)))


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
