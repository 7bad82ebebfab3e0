"""A tiny study (a few pw.x runs at a low cutoff, two designs, a few epochs) shared by the study tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

TINY_SPEC = """\
name: tiny
description: water in two charge states, two designs (a test, not a study)
dft:
  protocol: fast
  max_concurrent: 3
  overrides: {ecutwfc: 20.0, ecutrho: 160.0, conv_thr_per_atom: 1.0e-8, max_iterations: 1}
budget: {max_dft_configurations: 10}
systems:
  water:
    structure: {molecule: H2O, box: 8.0}
    rattle: {n: 3, stdev: 0.05}
    charges: [0, 1]
    isolated: true
split: {held_out_fraction: 0.3, seed: 0}
training:
  epochs: 3
  backbone: {num_channels: 4, max_L: 0, max_ell: 1, correlation: 1, num_interactions: 1, r_max: 3.5,
             mlp_hidden: 4}
  options: {environment_variables: {OMP_NUM_THREADS: "1"}}
designs: [sr, charges]
report: {title: Tiny study}
"""

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
