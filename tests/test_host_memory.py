"""Freed host memory kept for the next tensors: no page faults on reuse, opt-out, who turns it on."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only"
)

#: Repeats one evaluation-like round of large tensors (64, 40 and 96 MiB, every page written, freed in
#: another order than made) and prints the minor page faults of the last round: with glibc's default
#: every round maps them anew, one fault per 4 KiB page; retained, the heap settles after a few rounds.
FAULTS = textwrap.dedent(
    """
    import json, resource, sys, torch
    from aiida_emlip.models import host_memory
    applied = host_memory.retain_freed_memory() if sys.argv[1] == "retain" else None
    def one_round():
        a = torch.ones(16 * 2**20)
        b = torch.ones(10 * 2**20)
        c = a[: 10 * 2**20] + b
        del a
        d = torch.ones(24 * 2**20)
        del b, c, d
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        one_round()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"applied": applied, "faults": faults}))
    """
)
#: 4 KiB pages of one round's tensors
PAGES = (16 + 10 + 10 + 24) * 2**20 * 4 // 4096


def _run(script: str, *args: str, env: dict | None = None) -> dict:
    full_env = {**os.environ, **(env or {})}
    out = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=full_env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_retained_memory_is_reused_without_page_faults():
    default = _run(FAULTS, "default")
    retained = _run(FAULTS, "retain")
    assert default["faults"] > 0.9 * PAGES
    assert retained["applied"] is True
    assert retained["faults"] < 0.01 * PAGES


def test_environment_keeps_the_default():
    released = _run(FAULTS, "retain", env={"EMLIP_HOST_MEMORY": "release"})
    assert released["applied"] is False
    assert released["faults"] > 0.9 * PAGES


CALCULATOR = textwrap.dedent(
    """
    import json, sys, torch
    from ase.build import molecule
    from aiida_emlip.models import host_memory
    from aiida_emlip.models.calculator import EmlipCalculator
    from aiida_emlip.models.model import EmlipModel, ModelConfig
    torch.manual_seed(0)
    model = EmlipModel(ModelConfig(elements=["H", "O"], head={"name": "charges"},
                       backbone={"num_channels": 8, "num_interactions": 1, "r_max": 4.0}))
    retain = {"default": None, "on": True, "off": False}[sys.argv[1]]
    atoms = molecule("H2O")
    atoms.calc = EmlipCalculator(model, device="cpu", retain_memory=retain)
    energy = atoms.get_potential_energy()
    print(json.dumps({"applied": host_memory._applied, "energy": float(energy)}))
    """
)


def test_calculator_retains_on_the_cpu_unless_told_not_to():
    default, on, off = (_run(CALCULATOR, mode) for mode in ("default", "on", "off"))
    assert default["applied"] is True and on["applied"] is True
    assert off["applied"] is None  # never asked
    # the allocator changes where tensors live, not what is computed
    assert default["energy"] == off["energy"]


EVAL = textwrap.dedent(
    """
    import json, sys, torch
    from aiida_emlip.models import host_memory
    from aiida_emlip.models.io import save_model
    from aiida_emlip.models.model import EmlipModel, ModelConfig
    from aiida_emlip.training.evaluate import load_for_inference
    torch.manual_seed(0)
    model = EmlipModel(ModelConfig(elements=["H", "O"], head={"name": "sr"},
                       backbone={"num_channels": 8, "num_interactions": 1, "r_max": 4.0}))
    save_model(model, sys.argv[1])
    load_for_inference(sys.argv[1], device="cpu")
    print(json.dumps({"applied": host_memory._applied}))
    """
)


def test_emlip_eval_retains_on_the_cpu(tmp_path):
    path = str(tmp_path / "model.safetensors")
    assert _run(EVAL, path)["applied"] is True
    assert _run(EVAL, path, env={"EMLIP_HOST_MEMORY": "release"})["applied"] is False


def test_a_misspelt_environment_value_is_reported(monkeypatch):
    from aiida_emlip.models import host_memory

    monkeypatch.setenv("EMLIP_HOST_MEMORY", "relase")
    with pytest.warns(UserWarning, match="'relase' is neither 'release' nor 'retain'"):
        assert host_memory.released_by_environment() is False
    monkeypatch.setenv("EMLIP_HOST_MEMORY", " Release ")
    assert host_memory.released_by_environment() is True
