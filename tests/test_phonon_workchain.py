"""EmlipPhononWorkChain with real pw.x and ph.x: rock-salt NaCl (two-atom cell, 16-atom supercell).

DFT forces of the displaced supercells, DFT Born charges and ε∞ from ph.x, and a formal point-charge
model (r_max 3.2 Å) through emlip.evaluate with its own Born charges: exact sum rules on the model
side, physical ranges on the DFT side, figures, and every bad input stopped before any compute.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk

from aiida_emlip.models.io import save_model
from aiida_emlip.models.model import EmlipModel, ModelConfig

pytestmark = pytest.mark.pw

A_NACL = 5.70  # Å, the family's PBE lattice constant
SUPERCELL = [2, 2, 2]  # 16 atoms, perpendicular widths 6.58 Å ≥ 2 × 3.2 Å
#: Cheap pw.x: low cutoff, Γ-shifted coarse k-mesh, but an SCF tight enough for 0.03 Å displacements.
DFT_OVERRIDES = {
    "ecutwfc": 25.0,
    "ecutrho": 100.0,
    "conv_thr_per_atom": 1.0e-10,
    "kpoints_distance": 0.8,
    "max_iterations": 1,
    "options": {"max_wallclock_seconds": 900},
}
OVERRIDES = {"band_points": 21, "dos_mesh": [6, 6, 6], "ph_tr2": 1.0e-12}


def _model(tmp_path, name: str, head: dict, elements=("Na", "Cl"), r_max: float = 3.2):
    from aiida_emlip.data.model import EmlipModelData

    torch.manual_seed(0)
    backbone = {"num_channels": 4, "num_interactions": 1, "correlation": 2, "max_ell": 2, "r_max": r_max}
    model = EmlipModel(ModelConfig(elements=list(elements), head=head, backbone=backbone))
    return EmlipModelData(save_model(model, tmp_path / f"{name}.safetensors")).store()


FIXED = {"name": "fixed", "formal_charges": {"Na": 1.0, "Cl": -1.0}}


def _host():
    from aiida import orm

    return orm.StructureData(ase=bulk("NaCl", "rocksalt", a=A_NACL))


def _builder(pw_code, pseudo_family, **kwargs):
    from aiida_emlip.workflows.validate.phonons import EmlipPhononWorkChain

    kwargs.setdefault("supercell", SUPERCELL)
    return EmlipPhononWorkChain.get_builder_from_protocol(
        pw_code,
        _host(),
        pseudo_family.label,
        protocol="fast",
        overrides=OVERRIDES,
        dft_overrides=DFT_OVERRIDES,
        **kwargs,
    )


@pytest.fixture(scope="module")
def phonons(pw_code, ph_code, eval_code, pseudo_family, tmp_path_factory):
    from aiida.engine import run_get_node

    directory = tmp_path_factory.mktemp("phonon-models")
    models = {"fixed": _model(directory, "fixed", FIXED)}
    builder = _builder(pw_code, pseudo_family, models=models, eval_code=eval_code, ph_code=ph_code)
    return run_get_node(builder)


def test_finishes_with_every_output(phonons):
    results, node = phonons
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    for name in ("setup", "supercells", "dft_dataset", "dft_dielectric", "phonons", "comparison"):
        assert name in results, name
    assert set(results["predictions"]) == {"fixed"} and set(results["dielectric"]) == {"fixed"}
    setup = results["setup"].get_dict()
    assert setup["n_supercell_atoms"] == 16 and len(setup["keys"]) == 2
    assert len(results["dft_dataset"]) == 3  # two displaced supercells and the host cell for ph.x
    for label, row in results["comparison"].get_dict().items():  # shown with pytest -s
        numbers = {k: v for k, v in row.items() if k not in ("notes", "epsilon")}
        print(label, numbers, "ε∞", np.diag(row.get("epsilon") or np.eye(3)))


def test_dft_side(phonons):
    results, _ = phonons
    dft = results["comparison"]["dft"]
    assert dft["max_net_force"] < 1e-3  # pw.x removes the net force
    assert dft["acoustic_residual"] < 0.05
    tensors = results["dft_dielectric"].get_dict()
    eps = np.asarray(tensors["epsilon"])
    born = np.asarray(tensors["born_charges"])
    assert 1.5 < eps[0, 0] < 4.0 and np.allclose(eps, eps[0, 0] * np.eye(3), atol=1e-3)  # cubic
    symbols = results["setup"]["unitcell"]["symbols"]
    z_na = born[symbols.index("Na"), 0, 0]
    assert 0.8 < z_na < 1.5, z_na  # NaCl: Z* ≈ 1.1
    np.testing.assert_allclose(born.sum(axis=0), 0.0, atol=1e-10)  # the sum rule imposed on ph.x's Z*
    assert tensors["asr_residual"] < 0.5  # ph.x's own violation at 25 Ry and 3×3×3 k-points
    # polar crystal: LO above TO in the DFT bands with NAC
    assert dft["nac"] and dft["lo_to_splitting"] > 0.5
    gamma = np.sort(dft["gamma_frequencies"])
    assert gamma[3] > 1.0  # stable TO mode (THz)


def test_model_side_exact_rules(phonons):
    results, _ = phonons
    row = results["comparison"]["fixed"]
    assert row["max_net_force"] < 1e-7  # Σ_i F_i = 0 in every supercell (up to the 1e-8 of the extxyz text)
    assert row["born_asr_residual"] == pytest.approx(0.0, abs=1e-12)
    born = np.asarray(results["dielectric"]["fixed"]["born_charges"])
    symbols = results["setup"]["unitcell"]["symbols"]
    formal = np.array([1.0 if s == "Na" else -1.0 for s in symbols])
    np.testing.assert_allclose(born, formal[:, None, None] * np.eye(3), atol=1e-12)
    np.testing.assert_allclose(row["epsilon"], np.eye(3))
    assert row["nac"] and row["lo_to_splitting"] > 0.5
    assert np.isfinite(row["frequency_rmse"]) and np.isfinite(row["frequency_rmse_nac"])
    predictions = results["predictions"]["fixed"].to_ase()
    assert [a.info["key"] for a in predictions] == results["setup"]["keys"]


def test_figures(phonons):
    results, _ = phonons
    for name in ("bands", "dos"):
        node = results["figures"][name]
        content = node.get_content(mode="rb")
        assert content[:8] == b"\x89PNG\r\n\x1a\n" and len(content) > 5000


@pytest.mark.parametrize(
    ("case", "exit_status"),
    [
        ("supercell_too_small", 204),
        ("model_elements", 213),
        ("born_without_charges", 215),
        ("bad_supercell", 203),
    ],
)
def test_bad_inputs_stop_before_compute(case, exit_status, pw_code, eval_code, pseudo_family, tmp_path):
    from aiida.engine import run_get_node

    kwargs = {"eval_code": eval_code}
    if case == "supercell_too_small":
        kwargs.update(supercell=[1, 1, 1], models={"fixed": _model(tmp_path, "fixed", FIXED)})
    elif case == "model_elements":
        kwargs["models"] = {"water": _model(tmp_path, "water", {"name": "sr"}, elements=("H", "O"))}
    elif case == "born_without_charges":
        kwargs.update(models={"sr": _model(tmp_path, "sr", {"name": "sr"})}, nac=True)
    else:
        kwargs["supercell"] = [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    _, node = run_get_node(_builder(pw_code, pseudo_family, **kwargs))
    assert node.exit_status == exit_status, node.exit_message
    assert not node.called  # nothing ran: no displacements, no pw.x, no model
