"""The pure layers (models, training, structures) must work without AiiDA installed or configured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PURE = ("models", "training", "structures")
ROOT = Path(__file__).resolve().parent.parent


def test_pure_layers_never_import_aiida():
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for package in PURE
        for path in (ROOT / "aiida_emlip" / package).rglob("*.py")
    )
    assert len(modules) > 10
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'aiida' or m.startswith('aiida.'))\n"
        "print(len(bad)); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_training_tools_do_not_import_pymatgen():
    """emlip-train and emlip-eval start without pymatgen (seconds per job), which only defect samplers use."""
    code = (
        "import sys\n"
        "import aiida_emlip.training.cli, aiida_emlip.training.trainer, aiida_emlip.training.eval_run\n"
        "from aiida_emlip.structures import min_interatomic_distance\n"
        "assert not [m for m in sys.modules if m.startswith('pymatgen')], 'pymatgen imported'\n"
        "from aiida_emlip.structures import vacancy_cells\n"
        "assert 'pymatgen.analysis.defects.generators' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
