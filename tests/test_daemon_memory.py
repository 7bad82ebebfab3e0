"""The load benchmark's memory trace: per-worker peak and growth after the warm-up."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from daemon_memory import growth, sample_workers


def test_growth_is_measured_from_the_warmup_on():
    samples = [
        (0.0, 0, {1: 100.0, 2: 80.0}),
        (2.0, 10, {1: 150.0, 2: 90.0}),  # the warm-up: imports, caches
        (4.0, 50, {1: 200.0, 2: 100.0}),
        (6.0, 120, {1: 230.0, 2: 100.0}),
        (8.0, 200, {1: 210.0, 2: 95.0}),
    ]
    rows = growth(samples, warmup=50)
    assert rows["1"]["peak_mb"] == 230.0 and rows["1"]["at_warmup_mb"] == 200.0
    assert rows["1"]["growth_after_warmup"] == pytest.approx(0.15)
    assert rows["1"]["last_mb"] == 210.0
    assert rows["2"]["growth_after_warmup"] == pytest.approx(0.0)
    assert growth(samples, warmup=500)["1"]["growth_after_warmup"] is None  # never warmed up


def test_sample_workers_finds_only_the_named_profiles_workers():
    assert os.getpid() not in sample_workers("no-such-profile-name")
    assert sample_workers("no-such-profile-name") == {}
