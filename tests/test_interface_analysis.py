"""Interface analysis, pure: a model identical to the reference matches it everywhere; a model without
response is insulator-like; the capacitance of two charge sheets is the parallel-plate value."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aiida_emlip import schema
from aiida_emlip.analysis import interface as analysis
from aiida_emlip.analysis.planar_potential import model_profile
from aiida_emlip.structures.geometry import vacuum_center
from aiida_emlip.structures.interface_states import default_interface, interface_states

K = schema.COULOMB_CONSTANT


def _states():
    atoms = default_interface({"symbol": "Al", "size": [1, 2, 2], "n_water": 1, "water_thickness": 3.0})
    return interface_states(atoms, [0.1], [-0.2])


def _charges(meta, atoms, respond: bool) -> np.ndarray:
    """Metal screens the field with ±σA on its outer layers; Q sits on the metal's top layer."""
    q = np.zeros(len(atoms))
    metal = np.array(meta["metal"])
    z = atoms.positions[metal, 2]
    top, bottom = metal[z > z.mean()], metal[z < z.mean()]
    if not respond:
        return q
    if meta["state"] == "field":
        induced = meta["value"] * meta["area"] / (4 * math.pi * K)  # ε₀EA
        q[top] += induced / len(top)
        q[bottom] -= induced / len(bottom)
    if meta["state"] == "charge":
        q[top] += meta["value"] / len(top)
    return q


def _method(frames, setup, respond: bool, grid):
    out, profiles = {}, {}
    for atoms in frames:
        key = atoms.info["key"]
        meta = setup[key]
        copy = atoms.copy()
        q = _charges(meta, atoms, respond)
        copy.arrays[schema.CHARGES] = q
        copy.info[schema.ENERGY] = -10.0 + 0.5 * float(q @ q)
        copy.arrays["forces"] = np.zeros((len(atoms), 3))
        out[key] = copy
        profiles[key] = model_profile(
            atoms.get_scaled_positions()[:, 2],
            q,
            meta["area"],
            meta["length"],
            0.5,
            grid[0],
            grid[1],
            field=meta["value"] if meta["state"] == "field" else 0.0,
        ).tolist()
    return out, profiles


def test_identical_model_matches_and_silent_model_is_insulator_like():
    frames, setup = _states()
    grid = (200, vacuum_center(frames[0], 2))
    dft, dft_profiles = _method(frames, setup, True, grid)
    same, same_profiles = _method(frames, setup, True, grid)
    silent, silent_profiles = _method(frames, setup, False, grid)
    result = analysis.analyse_interface(
        setup,
        {"dft": dft, "same": same, "silent": silent},
        {"dft": dft_profiles, "same": same_profiles, "silent": silent_profiles},
    )
    ref = result["methods"]["dft"]
    # perfect screening: the interior field vanishes and α is ε₀At (t the distance of the two layers)
    assert ref["field"]["interior_field_fraction"] == pytest.approx(0.0, abs=1e-9)
    metal_z = frames[0].positions[setup["neutral"]["metal"], 2]
    t = metal_z.max() - metal_z.min()
    area = setup["neutral"]["area"]
    assert ref["field"]["alpha"] == pytest.approx(area * t / (4 * math.pi * K), rel=1e-9)
    assert result["errors"]["same"]["induced_profile_rmse"] == pytest.approx(0.0, abs=1e-9)
    assert result["errors"]["same"]["charge_transfer_mae"] == 0.0
    row = result["verdicts"]["rows"]["same"]
    assert row["interface_field"]["verdict"] == "matches DFT"
    assert row["interface_capacitance"]["verdict"] == "matches DFT"
    # Q on the metal's top layer and its background: the drop grows with −Q, a positive capacitance
    assert ref["capacitance"]["ddrop_dq"] > 0 and ref["capacitance"]["capacitance_uf_cm2"] > 0
    silent_row = result["verdicts"]["rows"]["silent"]
    assert result["methods"]["silent"]["field"]["alpha"] == 0.0
    assert result["methods"]["silent"]["field"]["interior_field_fraction"] == pytest.approx(1.0)
    assert silent_row["interface_field"]["verdict"] == "insulator-like"
    assert result["comparison"]["silent"]["interface_field_verdict"] == "insulator-like"
    # the comparison carries DFT's numbers and each model's beside its ratios
    comparison = result["comparison"]
    assert comparison["dft"]["alpha"] == ref["field"]["alpha"]
    assert comparison["dft"]["ddrop_dq"] == ref["capacitance"]["ddrop_dq"]
    assert comparison["same"]["alpha"] == pytest.approx(ref["field"]["alpha"])
    assert comparison["same"]["interface_field"] == pytest.approx(1.0)
    assert comparison["silent"]["alpha"] == 0.0 and comparison["silent"]["interface_field"] == 0.0
    assert result["errors"]["silent"]["induced_profile_rmse"] > 0.05


def test_induced_profile_ignores_the_sawtooth_window():
    a = np.zeros(100)
    b = np.zeros(100)
    b[40:50] = 5.0  # a difference only inside the excluded window
    assert analysis.profile_rmse(a, b, (0.4, 0.5)) == pytest.approx(0.0)
    assert analysis.profile_rmse(a, b) > 1.0
    with pytest.raises(ValueError, match="different grids"):
        analysis.profile_rmse(a, np.zeros(50))
