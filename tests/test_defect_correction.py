"""Freysoldt correction: exact for a Gaussian defect charge, one lattice term, each method's alignment."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ase import Atoms
from ase.units import Bohr

from aiida_emlip import schema
from aiida_emlip.analysis import defects as analysis
from aiida_emlip.analysis.defect_correction import (
    flat_potentials,
    freysoldt,
    model_potentials,
)
from aiida_emlip.analysis.periodic_potential import planar_potentials


def _open_minus_periodic(cell: np.ndarray, position: np.ndarray, sigma: float) -> float:
    """E(isolated) − E(periodic, k = 0-excluded) of one Gaussian charge, from the models' electrostatics."""
    import torch

    from aiida_emlip.models.electrostatics import Electrostatics, ElectrostaticsConfig

    es = Electrostatics(ElectrostaticsConfig(sigma=sigma, method="ewald", accuracy=1e-10))
    args = (
        torch.tensor([1.0], dtype=torch.float64),
        torch.tensor(position[None], dtype=torch.float64),
        torch.tensor(cell, dtype=torch.float64),
    )
    periodic = es.energy(*args, torch.tensor([True] * 3)).item()
    isolated = es.energy(*args, torch.tensor([False] * 3)).item()
    return isolated - periodic


@pytest.mark.parametrize(
    ("length", "sigma", "tolerance"),
    [
        (8.0, Bohr / math.sqrt(2), 5e-5),
        (12.0, Bohr / math.sqrt(2), 2e-5),
        (12.0, 1.0, 2e-5),
        (8.0, 1.0, 5e-4),
    ],
)
def test_gaussian_defect_charge_is_corrected_exactly(length, sigma, tolerance):
    """A lone Gaussian charge in an empty host: the correction is its isolated minus its periodic energy.

    With the model charge's width (1 bohr) the alignment only removes the G = 0 convention; with a
    wider charge it also carries the width difference — both totals must equal the exact value.
    """
    cell = np.diag([length, 1.1 * length, 0.9 * length])
    fractional = np.array([0.3, 0.4, 0.6])
    grid = (96, 100, 90)
    defect = planar_potentials(cell, fractional[None], [1.0], grid, sigma=sigma)
    result = freysoldt(cell, 1.0, 1.0, defect, flat_potentials(grid), fractional)
    exact = _open_minus_periodic(cell, fractional @ cell, sigma)
    assert result["total"] == pytest.approx(exact, abs=tolerance)
    assert result["total"] == pytest.approx(result["lattice"] + result["alignment"], abs=1e-9)
    assert result["lattice"] > 1.0  # eV: the image interaction of +1 e in ≤ 12 Å cells is large


def test_dielectric_screening_and_neutral_state():
    cell = np.eye(3) * 10.0
    grid = (60, 60, 60)
    flat = flat_potentials(grid)
    bare = freysoldt(cell, 1.0, 1.0, flat, flat, [0.5, 0.5, 0.5])
    screened = freysoldt(cell, 1.0, 4.0, flat, flat, [0.5, 0.5, 0.5])
    assert screened["lattice"] == pytest.approx(bare["lattice"] / 4.0, rel=1e-4)
    assert freysoldt(cell, 2.0, 1.0, flat, flat, [0.5, 0.5, 0.5])["lattice"] == pytest.approx(
        4.0 * bare["lattice"], rel=1e-4
    )
    assert freysoldt(cell, 0.0, 1.0, flat, flat, [0.5, 0.5, 0.5])["total"] == 0.0
    with pytest.raises(ValueError, match="different grids"):
        freysoldt(cell, 1.0, 1.0, flat, flat_potentials((60, 60, 61)), [0.5, 0.5, 0.5])


def _cube_frames(charges_host, charges_vacancy, with_charges=True):
    a = 6.0
    positions = np.array([[0.0, 0.0, 0.0], [3.0, 3.0, 3.0], [3.0, 0.0, 0.0], [0.0, 3.0, 3.0]])
    host = Atoms("NaClNaCl", positions=positions, cell=np.eye(3) * a, pbc=True)
    host.info[schema.ENERGY] = -10.0
    vacancy = host[[0, 2, 3]]  # the Cl at (3, 3, 3) removed
    vacancy.info[schema.ENERGY] = -6.0
    if with_charges:
        host.arrays[schema.CHARGES] = np.asarray(charges_host, dtype=float)
        vacancy.arrays[schema.CHARGES] = np.asarray(charges_vacancy, dtype=float)
    return host, vacancy


def test_each_method_aligns_with_its_own_potential():
    """DFT's potentials made from the same charges as one model: that model's alignment equals DFT's,
    a model without charges (flat potential) differs, and all share the lattice term."""
    host_q, vacancy_q = [0.8, -0.8, 0.8, -0.8], [0.6, 0.2, 0.2]
    host, vacancy = _cube_frames(host_q, vacancy_q)
    sigma = 0.5
    grid = (48, 48, 48)
    dft_host = model_potentials(host, sigma, grid)
    dft_vacancy = model_potentials(vacancy, sigma, grid)
    bare_host, bare_vacancy = _cube_frames(None, None, with_charges=False)
    setup = {
        "cell": host.cell[:].tolist(),
        "pristine_positions": host.positions.tolist(),
        "pristine_symbols": host.get_chemical_symbols(),
        "site": 1,
        "element": "Cl",
        "charges": [1.0],
        "vbm": 0.0,
        "cbm": 5.0,
        "dielectric_constant": 1.0,
        "sigmas": {"same": sigma},
        "potentials": {
            "host": {str(k): v.tolist() for k, v in dft_host.items()},
            "defects": {"1.0": {str(k): v.tolist() for k, v in dft_vacancy.items()}},
        },
    }
    reference = {"host": host, "defects": {1.0: vacancy}}
    models = {
        "same": {"host": host, "defects": {1.0: vacancy}},
        "sr": {"host": bare_host, "defects": {1.0: bare_vacancy}},
    }
    totals, info, breakdown = analysis.method_corrections(reference, models, setup, [1.0])
    assert info["scheme"].startswith("Freysoldt") and info["grid"] == list(grid)
    for part in ("total", "alignment"):
        assert breakdown["same"]["+1"][part] == pytest.approx(breakdown["dft"]["+1"][part], abs=1e-12)
    lattice = breakdown["dft"]["+1"]["lattice"]
    assert breakdown["sr"]["+1"]["lattice"] == lattice
    # the removed Cl and the charge moved onto Na shift the potential far from the site
    assert abs(breakdown["sr"]["+1"]["alignment"] - breakdown["dft"]["+1"]["alignment"]) > 0.05
    assert totals["sr"][1.0] == pytest.approx(lattice + breakdown["sr"]["+1"]["alignment"])
    # the analysis reports the alignment errors per model
    full = analysis.analyse_vacancy(reference, models, {**setup, "shell_tolerance": 0.1})
    assert full["comparison"]["same"]["alignment_error"]["+1"] == pytest.approx(0.0, abs=1e-12)
    assert abs(full["comparison"]["sr"]["alignment_error"]["+1"]) > 0.05


def test_without_dft_potentials_every_method_gets_makov_payne():
    host, vacancy = _cube_frames([0.8, -0.8, 0.8, -0.8], [0.6, 0.2, 0.2])
    setup = {"cell": host.cell[:].tolist(), "charges": [1.0], "dielectric_constant": 2.0}
    totals, info, _ = analysis.method_corrections(
        {"host": host, "defects": {1.0: vacancy}},
        {"m": {"host": host, "defects": {1.0: vacancy}}},
        setup,
        [1.0],
    )
    expected = analysis.point_charge_correction(host.cell[:], 1.0, 2.0)
    assert info["scheme"].startswith("point charge") and info["reason"] == "no DFT potentials"
    assert totals["dft"][1.0] == totals["m"][1.0] == pytest.approx(expected)
    setup["potentials"] = {"host": {"0": [0.0], "1": [0.0], "2": [0.0]}, "defects": {}}
    _, info, _ = analysis.method_corrections({"host": host, "defects": {1.0: vacancy}}, {}, setup, [1.0])
    assert info["reason"] == "no DFT potential for q = +1"
