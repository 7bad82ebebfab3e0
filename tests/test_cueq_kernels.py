"""MACE on NVIDIA cuEquivariance kernels (``kernels='cueq'``): the same model, the same results.

On the CPU cuEquivariance runs its reference (non-CUDA) implementation, which checks the weight
transfer and the feature layout; speed is measured on a GPU (``bench/bench_gpu_backbone.py``).
"""

from __future__ import annotations

import copy
import sys
import warnings

import numpy as np
import pytest
import torch
from models_helpers import HEAD_CONFIGS, evaluate, nacl_cell, tiny_model, water_cluster

from aiida_emlip.models import backbone
from aiida_emlip.models.backbone import CUEQ_MISSING
from aiida_emlip.models.calculator import EmlipCalculator
from aiida_emlip.models.io import save_model
from aiida_emlip.training import eval_params
from aiida_emlip.training.errors import ConfigError
from aiida_emlip.training.eval_params import parse_parameters
from aiida_emlip.training.evaluate import load_for_inference

pytest.importorskip("cuequivariance_torch", reason="cuEquivariance is part of the test extras")


def _on_cueq(model):
    other = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "cuequivariance_ops_torch is not available" on the CPU
        other.backbone.use_kernels("cueq")
    return other


@pytest.mark.parametrize("head", ["sr", "charges-weighted-dipoles", "qeq"])
def test_same_energy_forces_charges_and_dipoles(head):
    """float64: energy, forces, charges and atomic dipoles (read from the l = 1 features,
    whose layout differs between the two kernels) agree to 1e-9 relative."""
    model = tiny_model(HEAD_CONFIGS[head], seed=3)
    cueq = _on_cueq(model)
    assert cueq.backbone.kernels == "cueq" and model.backbone.kernels == "e3nn"
    for atoms in (nacl_cell(1), water_cluster(1.0)):
        ref, out = evaluate(model, atoms), evaluate(cueq, atoms)
        for key in ("energy", "forces", "charges", "atomic_dipoles"):
            if ref.get(key) is None:
                continue
            a, b = ref[key].detach().numpy(), out[key].detach().numpy()
            assert np.abs(a).max() > 0, key
            np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-9 * np.abs(a).max(), err_msg=key)


def test_calculator_and_eval_loader_take_kernels(tmp_path):
    model = tiny_model(HEAD_CONFIGS["charges"], seed=1)
    path = save_model(model, tmp_path / "m.safetensors")
    atoms = water_cluster()
    atoms.calc = EmlipCalculator(path, device="cpu")
    energy = atoms.get_potential_energy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calc = EmlipCalculator(path, device="cpu", kernels="cueq")
        loaded = load_for_inference(path, "cpu", "cueq")
    assert calc.model.backbone.kernels == "cueq" and loaded.backbone.kernels == "cueq"
    other = water_cluster()
    other.calc = calc
    assert other.get_potential_energy() == pytest.approx(energy, rel=1e-10)


def test_a_model_on_cueq_is_not_saved_and_does_not_go_back(tmp_path):
    cueq = _on_cueq(tiny_model(HEAD_CONFIGS["sr"]))
    with pytest.raises(ValueError, match="save it before switching kernels"):
        save_model(cueq, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    with pytest.raises(ValueError, match="reloading the model"):
        cueq.backbone.use_kernels("e3nn")
    with pytest.raises(ValueError, match="kernels must be one of e3nn, cueq"):
        cueq.backbone.use_kernels("triton")


def test_missing_cuequivariance_is_a_clear_error(tmp_path, monkeypatch):
    path = save_model(tiny_model(HEAD_CONFIGS["sr"]), tmp_path / "m.safetensors")
    monkeypatch.setitem(sys.modules, "cuequivariance_torch", None)  # import fails
    with pytest.raises(ConfigError) as err:
        load_for_inference(path, "cpu", "cueq")
    assert str(err.value) == CUEQ_MISSING and "pip install" in CUEQ_MISSING
    model = load_for_inference(path, "cpu")  # e3nn needs nothing else
    assert model.backbone.kernels == "e3nn"


def test_emlip_eval_without_cuequivariance_exits_2_before_writing(tmp_path, monkeypatch, capsys):
    from aiida_emlip.training.cli import eval_main

    path = save_model(tiny_model(HEAD_CONFIGS["sr"]), tmp_path / "m.safetensors")
    data = tmp_path / "w.xyz"
    water_cluster().write(data)
    monkeypatch.setitem(sys.modules, "cuequivariance_torch", None)
    out = tmp_path / "out.xyz"
    assert eval_main([str(path), str(data), "-o", str(out), "--device", "cpu", "--kernels", "cueq"]) == 2
    assert "need NVIDIA cuEquivariance" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "w.xyz"]


def test_eval_parameter():
    # the parameter check keeps its own list (it must not import MACE): the same as the backbone's
    assert eval_params.KERNELS == backbone.KERNELS
    assert parse_parameters({}).kernels == "e3nn"
    params = parse_parameters({"mode": "md", "kernels": "cueq"})
    assert params.kernels == "cueq" and params.to_dict()["kernels"] == "cueq"
    with pytest.raises(ConfigError, match="kernels"):
        parse_parameters({"kernels": "triton"})


def test_float32_on_cueq_agrees_with_e3nn():
    model = tiny_model(HEAD_CONFIGS["sr"], seed=2).to(torch.float32)
    cueq = _on_cueq(model)
    ref, out = evaluate(model, nacl_cell(2)), evaluate(cueq, nacl_cell(2))
    np.testing.assert_allclose(out["forces"].numpy(), ref["forces"].numpy(), atol=1e-5)


def test_the_e3nn_model_does_not_depend_on_cuequivariance_being_installed():
    """mace-torch builds a smaller coupling basis (other weight shapes) wherever cuEquivariance is
    importable unless told otherwise: the same seed must give the same weights without it, or a model
    file would not load on a machine with the other set of packages."""
    import subprocess

    script = (
        "import sys; sys.modules['cuequivariance_torch'] = None; sys.modules['cuequivariance'] = None\n"
        "sys.path.insert(0, 'tests')\n"
        "from models_helpers import tiny_model\n"
        "m = tiny_model({'name': 'charges'}, seed=5)\n"
        "print({k: list(v.shape) for k, v in m.state_dict().items()})\n"
        "print(repr(sum(float(p.double().sum()) for p in m.parameters())))\n"
    )
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, check=True)
    shapes, total = out.stdout.strip().splitlines()[-2:]
    model = tiny_model({"name": "charges"}, seed=5)
    assert shapes == str({k: list(v.shape) for k, v in model.state_dict().items()})
    assert float(total) == sum(float(p.double().sum()) for p in model.parameters())
