"""EmlipPhononWorkChain with real pw.x and ph.x: rock-salt NaCl (two-atom cell, 16-atom supercell).

DFT forces of the displaced supercells, DFT Born charges and ε∞ from ph.x, and three models through
emlip.evaluate with their own Born charges: a formal point-charge model (exact sum rules), a small
``charges`` model trained in the test on pw.x labels of strained and rattled two-atom cells (never on
the phonon supercells) and its untrained twin. Physical ranges on the DFT side, the trained model
against DFT and the untrained twin, figures, and every bad input stopped before any compute.

The real runs take minutes each and are marked ``slow`` (``make test-all``); the bad-input checks
run in the default suite. The defect workchain's test is the default suite's real end-to-end path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import units
from ase.build import bulk
from validation_helpers import train_on_pw_labels, untrained_twin

from aiida_emlip import schema
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
#: The trained model: a ``charges`` head on a 4-channel, one-interaction backbone whose cutoff fits the
#: supercell (2 × 3.2 Å ≤ 6.58 Å), energies, forces and Hirshfeld charges, 20 epochs.
TRAINED_HEAD = {"name": "charges", "correction": "weighted"}
TRAINED_BACKBONE = {"r_max": 3.2}
TRAINED_EPOCHS = 20


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


def _training_frames():
    """Six strained (±3 %) and rattled (0.08 Å) two-atom cells: held out from the 16-atom supercells."""
    from aiida_emlip.structures import strain

    frames = strain(bulk("NaCl", "rocksalt", a=A_NACL), 6, max_strain=0.03, stdev=0.08, seed=3)
    for atoms in frames:
        atoms.info["total_charge"] = 0.0
    return frames


@pytest.fixture(scope="module")
def trained(pw_code, pp_code, pseudo_family, train_code):
    """A small ``charges`` model trained on its own pw.x labels (energies, forces, Hirshfeld charges)."""
    codes = {"pw": pw_code, "pp": pp_code, "train": train_code}
    return train_on_pw_labels(
        _training_frames(),
        codes,
        pseudo_family.label,
        DFT_OVERRIDES,
        TRAINED_HEAD,
        epochs=TRAINED_EPOCHS,
        backbone=TRAINED_BACKBONE,
    )


@pytest.fixture(scope="module")
def phonons(pw_code, ph_code, eval_code, pseudo_family, trained, tmp_path_factory):
    from aiida.engine import run_get_node

    directory = tmp_path_factory.mktemp("phonon-models")
    models = {
        "fixed": _model(directory, "fixed", FIXED),
        "trained": trained,
        "untrained": untrained_twin(trained, directory),
    }
    builder = _builder(pw_code, pseudo_family, models=models, eval_code=eval_code, ph_code=ph_code)
    return run_get_node(builder)


@pytest.mark.slow
def test_finishes_with_every_output(phonons):
    results, node = phonons
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    for name in ("setup", "supercells", "dft_dataset", "dft_dielectric", "phonons", "comparison"):
        assert name in results, name
    assert set(results["predictions"]) == set(results["dielectric"]) == {"fixed", "trained", "untrained"}
    setup = results["setup"].get_dict()
    assert setup["n_supercell_atoms"] == 16 and len(setup["keys"]) == 2
    assert len(results["dft_dataset"]) == 3  # two displaced supercells and the host cell for ph.x
    for label, row in results["comparison"].get_dict().items():  # shown with pytest -s
        numbers = {k: v for k, v in row.items() if k not in ("notes", "epsilon")}
        print(label, numbers, "ε∞", np.diag(row.get("epsilon") or np.eye(3)))


@pytest.mark.slow
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


@pytest.mark.slow
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


def _lo_to_squared(born_na: float, epsilon: float, setup: dict) -> float:
    """ν_LO² − ν_TO² (THz²) of a cubic diatomic crystal: Z*² e² / (ε0 ε∞ μ V) / (2π)²."""
    from aiida_emlip.analysis.phonons import unitcell_of

    cell = unitcell_of(setup)
    masses = cell.get_masses()
    reduced = masses.prod() / masses.sum()  # amu
    omega2 = 4 * np.pi * schema.COULOMB_CONSTANT * born_na**2 / (epsilon * reduced * cell.get_volume())
    return omega2 * units._e / (units._amu * 1e-20) / (2 * np.pi * 1e12) ** 2  # eV/(amu Å²) → THz²


@pytest.mark.slow
def test_trained_model_physics(phonons, trained):
    """The trained ``charges`` model against DFT and against its untrained twin (same architecture)."""
    results, _ = phonons
    setup = results["setup"].get_dict()
    # held out: the model never saw a 16-atom cell, let alone one of the displaced supercells
    training = trained.creator.inputs.dataset.to_ase()
    assert len(training) == 6 and {len(a) for a in training} == {2} and setup["n_supercell_atoms"] == 16
    comparison = results["comparison"].get_dict()
    dft, model, untrained = comparison["dft"], comparison["trained"], comparison["untrained"]
    symbols = setup["unitcell"]["symbols"]
    na = symbols.index("Na")
    # Born charges: the sum rule holds exactly, Na is the cation, and a model whose charges were
    # trained on Hirshfeld charges has Z* close to them (NaCl: q_H ≈ 0.19 e, far below ph.x's 1.14 e)
    born = np.asarray(results["dielectric"]["trained"]["born_charges"])
    assert model["born_asr_residual"] == pytest.approx(0.0, abs=1e-10)
    np.testing.assert_allclose(born[na], born[na, 0, 0] * np.eye(3), atol=1e-8)  # cubic site
    hirshfeld = np.mean([a.arrays[schema.CHARGES][a.symbols == "Na"].mean() for a in training])
    assert born[na, 0, 0] > 0.1 and born[na, 0, 0] == pytest.approx(hirshfeld, abs=0.05)
    assert np.allclose(model["epsilon"], np.eye(3))  # the charges head has no electronic response
    # Γ: acoustic modes at zero (translational invariance of the model; before the sum rule is imposed,
    # up to the 1e-8 eV/Å of the forces' extxyz text: 2e-3 THz), the TO mode within 20 % of DFT
    gamma = np.sort(model["gamma_frequencies"])
    assert model["acoustic_residual"] < 1e-2 and np.abs(gamma[:3]).max() < 1e-3
    to_dft, to_model = np.sort(dft["gamma_frequencies"])[3], gamma[3]
    assert 0.8 < to_model / to_dft < 1.25, (to_model, to_dft)
    assert np.sort(untrained["gamma_frequencies"])[3] < 0.5 * to_dft  # untrained: no stable TO mode
    # LO–TO from each method's own Z* and ε∞: ν_LO² − ν_TO² = Z*² e² / (ε0 ε∞ μ V) (cubic diatomic)
    for row, z, eps in (
        (dft, results["dft_dielectric"]["born_charges"][na][0][0], dft["epsilon"][0][0]),
        (model, born[na, 0, 0], 1.0),
    ):
        to, lo = max(row["gamma_frequencies"]), max(row["gamma_frequencies_nac"])
        assert lo**2 - to**2 == pytest.approx(_lo_to_squared(z, eps, setup), rel=1e-3)
    assert 0.05 < model["lo_to_splitting"] < 0.5 * dft["lo_to_splitting"]
    # bands along the whole path: training halves the error of the untrained twin at least
    assert model["frequency_rmse"] < 2.0 and model["frequency_rmse"] < 0.5 * untrained["frequency_rmse"]
    assert model["frequency_rmse_nac"] < 0.5 * untrained["frequency_rmse_nac"]
    assert model["max_net_force"] < 1e-7


@pytest.mark.slow
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
