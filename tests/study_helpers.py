"""A tiny study (a few pw.x runs at a low cutoff, two designs, a few epochs) shared by the study tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from tiny_study import tiny_spec

#: The spec of the benchmarks that launch a real study (``bench/tiny_study.py``), said to be a test.
TINY_SPEC = tiny_spec(description="water in two charge states, two designs (a test, not a study)")

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def chromium() -> str | None:
    """The headless browser of the machine, if any."""
    for name in CHROMIUM:
        found = shutil.which(name)
        if found:
            return found
    return None


def render_in_chromium(index: Path, timeout: float = 120) -> tuple[str, str]:
    """``(dom, console)``: the page's DOM after load and the browser's console log (stderr)."""
    exe = chromium()
    assert exe is not None, "chromium missing"
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
        "--dump-dom",
        index.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    return proc.stdout, proc.stderr


def console_errors(console: str) -> list[str]:
    """Console lines that mean the page is broken (script errors, resources that failed to load)."""
    markers = ("Uncaught", "Failed to load", "net::ERR", "SyntaxError", "ReferenceError")
    return [line for line in console.splitlines() if "CONSOLE" in line and any(m in line for m in markers)]
