"""Building a model leaves the user's process as it was: no torch.load override, nothing on stdout, no
third-party remarks on stderr."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import os
from ase.build import molecule
from aiida_emlip.models.calculator import EmlipCalculator
from aiida_emlip.models.model import EmlipModel, ModelConfig
model = EmlipModel(ModelConfig(elements=["H", "O"], head={"name": "charges"}))
atoms = molecule("H2O")
atoms.info["total_charge"] = 0.0
atoms.calc = EmlipCalculator(model, device="cpu")
atoms.get_potential_energy()
print("FLAG", os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"))
"""


def test_model_import_has_no_process_wide_side_effects():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines == ["FLAG None"], proc.stdout  # mace's variable restored; its cuEquivariance notice gone
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in proc.stderr


def test_building_a_model_prints_no_torchscript_remarks():
    """e3nn and mace-torch script their modules on import and construction; torch remarks on each (about
    a hundred lines). A plain Python session that builds and runs a model sees none of them, even with
    every warning shown (``-W always``), while its own warnings still reach it."""
    script = SCRIPT + "import warnings; warnings.warn('still shown')\n"
    proc = subprocess.run(
        [sys.executable, "-W", "always", "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TorchScript" not in proc.stderr and "torch.jit.script" not in proc.stderr, proc.stderr[-2000:]
    assert "still shown" in proc.stderr
