"""Phonons with phonopy (pure): supercells, displacements, NAC from a model's Born charges, ph.x parsing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase.build import bulk

from aiida_emlip.analysis import phonons as ph
from aiida_emlip.models.model import EmlipModel, ModelConfig
from aiida_emlip.models.response import dielectric_response, model_forces

A_NACL = 5.70


def point_charge_model() -> EmlipModel:
    """Na⁺/Cl⁻ formal charges with a tiny untrained backbone (r_max 3.2 Å)."""
    torch.manual_seed(0)
    return EmlipModel(
        ModelConfig(
            elements=["Na", "Cl"],
            head={"name": "fixed", "formal_charges": {"Na": 1.0, "Cl": -1.0}},
            backbone={"num_channels": 4, "num_interactions": 1, "correlation": 2, "max_ell": 2, "r_max": 3.2},
        )
    )


def test_supercell_widths_and_choice():
    atoms = bulk("NaCl", "rocksalt", a=A_NACL)
    np.testing.assert_allclose(ph.perpendicular_widths(atoms.cell.array), A_NACL / np.sqrt(3))
    assert ph.choose_supercell(atoms.cell.array, 6.4) == [2, 2, 2]
    assert ph.choose_supercell(atoms.cell.array, 3.0) == [1, 1, 1]
    # the conventional cube as a non-diagonal supercell of the primitive cell
    cube = [[-1, 1, 1], [1, -1, 1], [1, 1, -1]]
    np.testing.assert_allclose(ph.supercell_widths(atoms.cell.array, cube), A_NACL)
    with pytest.raises(ValueError, match="non-zero determinant"):
        ph.supercell_widths(atoms.cell.array, [[1, 0, 0], [0, 1, 0], [0, 0, 0]])


def test_displacements_roundtrip_through_json():
    atoms = bulk("NaCl", "rocksalt", a=A_NACL)
    setup, cells = ph.build_displacements(atoms, [2, 2, 2], distance=0.03, reference=True)
    setup = json.loads(json.dumps(setup))
    assert len(cells) == 3 and ph.n_displacements(setup) == 2  # one per inequivalent atom (Oh sites)
    assert setup["n_supercell_atoms"] == 16 and setup["n_primitive_atoms"] == 2
    np.testing.assert_allclose(
        cells[0].positions, ph.to_ase(ph.phonopy_from_setup(setup).supercell).positions
    )
    for cell, entry in zip(cells[1:], setup["dataset"]["first_atoms"]):
        moved = cell.positions - cells[0].positions
        assert np.linalg.norm(moved[entry["number"]]) == pytest.approx(0.03)
        assert np.abs(np.delete(moved, entry["number"], axis=0)).max() < 1e-12


@pytest.fixture(scope="module")
def point_charge_phonons():
    """Phonons of the point-charge model on a 16-atom NaCl supercell, with its own Born charges."""
    model = point_charge_model()
    atoms = bulk("NaCl", "rocksalt", a=A_NACL)
    setup, cells = ph.build_displacements(atoms, [2, 2, 2], distance=0.03)
    forces = [model_forces(model, cell) for cell in cells]
    response = dielectric_response(model, atoms)
    methods = {
        "dft": {"forces": forces},  # the model as its own reference: RMSE exactly 0
        "fixed": {"forces": forces, "born": response.born_charges, "epsilon": response.epsilon},
    }
    settings = {"band_points": 21, "dos_mesh": [6, 6, 6]}
    return ph.analyse(setup, methods, settings), forces


def test_point_charge_phonons_sum_rules_and_lo_to(point_charge_phonons):
    result, forces = point_charge_phonons
    assert ph.net_forces(forces) < 1e-10  # Σ_i F_i = 0: translation invariance of the model
    rows = result["comparison"]
    fixed = rows["fixed"]
    assert fixed["frequency_rmse"] == pytest.approx(0.0, abs=1e-12)
    assert fixed["frequency_rmse_nac"] is None  # the reference has no NAC
    assert fixed["acoustic_residual"] < 1e-3  # THz, before symmetrisation (√ of round-off)
    assert fixed["nac"] and not rows["dft"]["nac"]
    # LO above TO by the non-analytical term; without NAC no splitting
    assert fixed["lo_to_splitting"] > 1.0 and rows["dft"]["lo_to_splitting"] == 0.0
    analytic, corrected = np.sort(fixed["gamma_frequencies"]), np.sort(fixed["gamma_frequencies_nac"])
    # untrained backbone: the triply degenerate TO mode is unstable (negative = imaginary); the NAC lifts
    # one of its three modes (the LO) above every analytic mode and leaves the other two
    transverse = analytic[0]
    assert np.sum(np.abs(corrected - transverse) < 1e-5) == 2
    assert corrected[-1] == pytest.approx(analytic[-1] + fixed["lo_to_splitting"])
    nac = result["methods"]["fixed"]["nac"]
    np.testing.assert_allclose(np.asarray(nac["born"]).sum(axis=0), 0.0, atol=1e-12)
    # the path is the standard fcc one and the bands have 6 branches everywhere
    assert result["path"]["path"].startswith("GX")
    assert all(np.asarray(seg).shape[1] == 6 for seg in result["methods"]["fixed"]["bands"])
    assert sum(result["methods"]["fixed"]["dos"]["total_dos"]) > 0


def test_figures_are_written(point_charge_phonons, tmp_path):
    from aiida_emlip.report.figures_phonons import write_figures

    result, _ = point_charge_phonons
    paths = write_figures(json.loads(json.dumps(result)), tmp_path)
    assert set(paths) == {"bands", "dos"}
    assert all(path.stat().st_size > 5000 for path in paths.values())


def test_nac_parameters_of_a_conventional_unit_cell():
    """Born charges given for an 8-atom cubic unit cell end up on the 2-atom primitive cell."""
    atoms = bulk("NaCl", "rocksalt", a=A_NACL, cubic=True)
    setup, _ = ph.build_displacements(atoms, [1, 1, 1])
    born = np.array([(1.1 if s == "Na" else -1.1) * np.eye(3) for s in atoms.get_chemical_symbols()])
    nac = ph.nac_parameters(setup, born, 2.5 * np.eye(3))
    assert nac["born"].shape == (2, 3, 3)
    np.testing.assert_allclose(sorted(nac["born"][:, 0, 0]), [-1.1, 1.1])
    np.testing.assert_allclose(nac["dielectric"], 2.5 * np.eye(3))


#: ph.x 6.7 (Debian) with an asymmetric entry added to pin the order: rows are the field directions.
PH_OUTPUT_67 = """
          Dielectric constant in cartesian axis

          (       2.507130390       0.010000000      -0.000000000 )
          (       0.010000000       2.507130390      -0.000000000 )
          (      -0.000000000      -0.000000000       2.507130390 )

          Effective charges (d Force / dE) in cartesian axis

           atom      1   Na
      Ex  (        1.08296        0.20000       -0.00000 )
      Ey  (       -0.00000        1.08296       -0.00000 )
      Ez  (       -0.00000       -0.00000        1.08296 )
           atom      2   Cl
      Ex  (       -1.19283       -0.00000        0.00000 )
      Ey  (       -0.00000       -1.19283        0.00000 )
      Ez  (        0.00000        0.00000       -1.19283 )

     PHONON       :      0.27s CPU      1.17s WALL
"""

#: Newer ph.x versions also print the block with the sum rule applied.
PH_OUTPUT_NEW = """
          Dielectric constant in cartesian axis

          (       2.463046452       0.000000000       0.000000000 )
          (       0.000000000       2.463046452       0.000000000 )
          (       0.000000000       0.000000000       2.463046452 )

          Effective charges (d Force / dE) in cartesian axis without acoustic sum rule applied (asymmetric)

           atom      1 Na     Mean Z*:        1.10660
      Ex  (        1.10660        0.00000        0.00000 )
      Ey  (        0.00000        1.10660        0.00000 )
      Ez  (        0.00000        0.00000        1.10660 )
           atom      2 Cl     Mean Z*:       -1.10440
      Ex  (       -1.10440        0.00000        0.00000 )
      Ey  (        0.00000       -1.10440        0.00000 )
      Ez  (        0.00000        0.00000       -1.10440 )

          Effective charges (d Force / dE) in cartesian axis with asr applied:
           atom      1 Na      Mean Z*:        1.10550
      E*x (        1.10550        0.00000        0.00000 )
      E*y (        0.00000        1.10550        0.00000 )
      E*z (        0.00000        0.00000        1.10550 )
           atom      2 Cl      Mean Z*:       -1.10550
      E*x (       -1.10550        0.00000        0.00000 )
      E*y (        0.00000       -1.10550        0.00000 )
      E*z (        0.00000        0.00000       -1.10550 )

     PHONON       :      0.55s CPU      0.60s WALL
"""


def test_parse_ph_dielectric():
    values = ph.parse_ph_dielectric(PH_OUTPUT_67)
    np.testing.assert_allclose(values["epsilon"][0], [2.50713039, 0.01, 0.0])
    raw = np.asarray(values["born_charges_raw"])
    assert raw.shape == (2, 3, 3)
    assert raw[0, 0, 1] == pytest.approx(0.2)  # row Ex: the field, column: the force component
    assert values["asr_residual"] == pytest.approx(0.2)  # the xy entry; the diagonal: 1.19283 − 1.08296
    born = np.asarray(values["born_charges"])  # the sum rule imposed: the mean subtracted
    np.testing.assert_allclose(born.sum(axis=0), 0.0, atol=1e-12)
    assert born[0, 0, 0] == pytest.approx((1.08296 + 1.19283) / 2)
    newer = ph.parse_ph_dielectric(PH_OUTPUT_NEW)
    assert np.asarray(newer["born_charges"])[0, 0, 0] == pytest.approx(1.1055)  # ph.x's own ASR block
    assert np.asarray(newer["born_charges_raw"])[1, 0, 0] == pytest.approx(-1.1044)
    with pytest.raises(ValueError, match="no dielectric constant"):
        ph.parse_ph_dielectric("JOB DONE")
