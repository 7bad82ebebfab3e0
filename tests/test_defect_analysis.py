"""Charged-vacancy analysis (pure): Ewald/Madelung, the correction, levels, formation energies, profiles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

from aiida_emlip import schema
from aiida_emlip.analysis import defects as analysis
from aiida_emlip.structures.defects import supercell_repeat, vacancy_cells

#: Madelung constant of rock salt (referred to the nearest-neighbour distance).
MADELUNG_ROCK_SALT = 1.7475645946
K_E = schema.COULOMB_CONSTANT
A_NACL = 5.64


def rock_salt(a: float = A_NACL) -> Atoms:
    return bulk("NaCl", "rocksalt", a=a, cubic=True)


# ------------------------------------------------------------------------------------ Ewald


@pytest.mark.parametrize("length", [5.0, 7.3])
def test_madelung_energy_of_a_point_charge_in_a_cube(length):
    energy = analysis.madelung_energy(np.eye(3) * length, 1.0)
    assert energy == pytest.approx(-analysis.MADELUNG_SIMPLE_CUBIC * K_E / (2 * length), rel=1e-9)
    assert analysis.madelung_energy(np.eye(3) * length, 2.0) == pytest.approx(4 * energy, rel=1e-12)


def test_ewald_rock_salt_lattice_energy_and_origin_independence():
    atoms = rock_salt()
    q = np.where(np.array(atoms.get_chemical_symbols()) == "Na", 1.0, -1.0)
    energy = analysis.ewald_energy(atoms.cell[:], atoms.positions, q)
    expected = -len(atoms) / 2 * MADELUNG_ROCK_SALT * K_E / (A_NACL / 2)
    assert energy == pytest.approx(expected, rel=1e-9)
    shifted = analysis.ewald_energy(atoms.cell[:], atoms.positions + np.array([0.3, -1.1, 0.7]), q)
    assert shifted == pytest.approx(energy, rel=1e-11)


def test_correction_in_a_skewed_cell_does_not_depend_on_the_cell_choice():
    """The same lattice described by a sheared cell gives the same Madelung energy."""
    cell = np.array([[6.0, 0, 0], [0, 6.0, 0], [0, 0, 6.0]])
    sheared = cell.copy()
    sheared[1] += cell[0]
    assert analysis.point_charge_correction(sheared, 1.0) == pytest.approx(
        analysis.point_charge_correction(cell, 1.0), rel=1e-9
    )
    assert analysis.point_charge_correction(cell, 1.0, 4.0) == pytest.approx(
        analysis.MADELUNG_SIMPLE_CUBIC * K_E / (2 * 6.0) / 4.0, rel=1e-9
    )
    assert analysis.point_charge_correction(cell, 0.0) == 0.0
    with pytest.raises(ValueError):
        analysis.point_charge_correction(cell, 1.0, 0.0)


# ------------------------------------------------------------------------------------ a point-charge model


def point_charge_model():
    """The ``fixed`` head with point charges (σ = 0) and a silent backbone: E is the Ewald energy alone."""
    from aiida_emlip.models.model import EmlipModel, ModelConfig

    config = ModelConfig(
        elements=["Na", "Cl"],
        head={"name": "fixed", "formal_charges": {"Na": 1.0, "Cl": -1.0}},
        backbone={"num_channels": 4, "num_interactions": 1, "correlation": 1, "max_ell": 1, "r_max": 3.0},
        electrostatics={"sigma": 0.0, "accuracy": 1e-10},
    )
    model = EmlipModel(config)
    with torch.no_grad():
        for parameter in model.backbone.parameters():
            parameter.zero_()
    return model


def model_energy(model, atoms: Atoms, total_charge: float) -> float:
    from aiida_emlip.models.calculator import EmlipCalculator

    atoms = atoms.copy()
    atoms.info[schema.TOTAL_CHARGE] = total_charge
    atoms.calc = EmlipCalculator(model, device="cpu")
    return float(atoms.get_potential_energy())


@pytest.mark.parametrize("repeat", [(1, 1, 1), (2, 2, 2)])
def test_fixed_point_charge_vacancy_equals_the_analytic_madelung_value(repeat):
    """V_Cl⁺ of a formal-charge point-charge model: E(+1) − E_host + E_corr(+1) = α_M k_e / r₀ exactly.

    Removing Cl⁻ costs −q_Cl φ(Cl site) = α_M k_e / r₀ in the infinite crystal; in the supercell the
    missing charge's images and their background add E_M(+1), which the point-charge correction removes
    exactly, whatever the supercell.
    """
    model = point_charge_model()
    cells = vacancy_cells(rock_salt(), "Cl", supercell=repeat)
    host = model_energy(model, cells.pristine, 0.0)
    vacancy = model_energy(model, cells.defect, 1.0)
    ewald_host = analysis.ewald_energy(
        cells.pristine.cell[:], cells.pristine.positions, np.where(cells.pristine.numbers == 11, 1.0, -1.0)
    )
    assert host == pytest.approx(ewald_host, rel=1e-8)  # the model is the point-charge Ewald energy
    correction = analysis.point_charge_correction(cells.pristine.cell[:], 1.0)
    isolated = MADELUNG_ROCK_SALT * K_E / (A_NACL / 2)
    assert vacancy - host + correction == pytest.approx(isolated, abs=1e-6)
    # ... and the uncorrected value is off by exactly E_M(+1) = −α_sc k_e / 2L for the cubic supercell
    length = A_NACL * repeat[0]
    madelung = -analysis.MADELUNG_SIMPLE_CUBIC * K_E / (2 * length)
    assert vacancy - host == pytest.approx(isolated + madelung, abs=1e-6)


# ------------------------------------------------------------------------------------ levels, formation


def test_transition_levels_and_formation_energies():
    energies = {0.0: -100.0, 1.0: -104.0, 2.0: -107.0}
    corrections = {0.0: 0.0, 1.0: 0.5, 2.0: 2.0}
    out = analysis.energetics(energies, host_energy=-110.0, corrections=corrections, mu=-5.0, vbm=1.0)
    # E_f(q, 0) = E(q) − E_host + μ + q E_VBM + E_corr
    assert out["formation_energy_vbm"] == pytest.approx({"0": 5.0, "+1": 2.5, "+2": 2.0})
    # ε(q/q') = [E_f(q') − E_f(q)] / (q − q'), adjacent states
    assert out["transition_levels"] == pytest.approx({"+2/+1": 0.5, "+1/0": 2.5})
    assert out["delta_e"] == pytest.approx({"0": 0.0, "+1": -4.0, "+2": -7.0})
    assert out["corrected_delta_e"] == pytest.approx({"0": 0.0, "+1": -3.5, "+2": -5.0})
    lines = analysis.formation_lines({0.0: 5.0, 1.0: 2.5, 2.0: 2.0}, gap=3.0, n_points=4)
    assert lines["stable_charge"] == ["+2", "+1", "+1", "0"]  # E_F = 0, 1, 2, 3 eV
    assert lines["lowest"][0] == pytest.approx(2.0) and lines["lowest"][-1] == pytest.approx(5.0)


def test_chemical_potential_defaults():
    symbols = ["Si", "Si", "O", "O", "O", "O"]
    assert analysis.chemical_potential("O", symbols, -60.0, {"O": -4.0}) == (-4.0, "given")
    mu, how = analysis.chemical_potential("O", symbols, -60.0, {"Si": -10.0})
    assert mu == pytest.approx(-10.0) and how.startswith("host equilibrium")
    mu, how = analysis.chemical_potential("O", symbols, -60.0, free_atom_energy=-430.0)
    assert mu == -430.0 and how.startswith("free atom")
    mu, how = analysis.chemical_potential("O", symbols, -60.0)
    assert mu == pytest.approx(-10.0) and how == "host energy per atom"


def test_free_atom_energy_from_the_upf_header():
    from aiida_emlip.pseudos.upf_header import free_atom_energy

    header = '<PP_HEADER element="O" z_valence="6.0" total_psenergy="-31.605744887098030" l_max="1"/>'
    assert free_atom_energy(header) == pytest.approx(-31.605744887098030 * schema.RYDBERG_IN_EV)
    assert free_atom_energy('<PP_HEADER element="O"/>') is None


def test_charge_labels():
    assert [analysis.charge_label(q) for q in (0, 1.0, -2)] == ["0", "+1", "-2"]
    assert analysis.level_label(1, 0) == "+1/0"


# ------------------------------------------------------------------------------------ profiles


def test_radial_profile_shells_and_sum_rule():
    cells = vacancy_cells(rock_salt(), "Cl", supercell=(2, 2, 2))
    q0 = np.where(cells.pristine.numbers == 11, 0.8, -0.8)
    rng = np.random.default_rng(0)
    q1 = np.delete(q0, cells.site) + rng.normal(0, 0.01, len(q0) - 1)
    q1 += (1.0 - q1.sum()) / len(q1)  # total charge +1
    profile = analysis.radial_profile(cells.pristine.cell[:], cells.pristine.positions, cells.site, q0, q1)
    shells = profile["shells"]
    expected = [A_NACL / 2, A_NACL / math.sqrt(2), A_NACL * math.sqrt(3) / 2]
    assert shells["radius"][:3] == pytest.approx(expected)
    assert shells["count"][:3] == [6, 12, 8]  # rock salt: 6 Na, 12 Cl, 8 Na around a Cl site
    assert sum(shells["count"]) == len(q1)
    # Σ Δq = q + q_removed
    assert profile["sum_delta_q"] == pytest.approx(1.0 + profile["removed_charge"], abs=1e-12)
    assert shells["cumulative"][-1] == pytest.approx(profile["sum_delta_q"], abs=1e-12)
    with pytest.raises(ValueError):
        analysis.radial_profile(cells.pristine.cell[:], cells.pristine.positions, cells.site, q0, q0)


# ------------------------------------------------------------------------------------ cells


def test_vacancy_cells_keep_geometry_and_order():
    host = rock_salt()
    cells = vacancy_cells(host, "Cl", site=5, supercell=(2, 1, 1))
    assert len(cells.pristine) == 16 and len(cells.defect) == 15
    assert cells.pristine.get_chemical_symbols()[cells.site] == "Cl" and cells.site == 5
    for j in range(len(cells.defect)):
        assert np.allclose(cells.defect.positions[j], cells.pristine.positions[cells.pristine_index(j)])
    assert supercell_repeat(host, 10.0) == (2, 2, 2) and supercell_repeat(host, 5.0) == (1, 1, 1)
    with pytest.raises(ValueError, match="no F atom"):
        vacancy_cells(host, "F")
    with pytest.raises(ValueError, match="is Na"):
        vacancy_cells(host, "Cl", site=0)


# ------------------------------------------------------------------------------------ whole analysis, figures


def _labelled(atoms: Atoms, energy: float, charges: np.ndarray | None, key: str) -> Atoms:
    atoms = atoms.copy()
    atoms.info[schema.ENERGY] = energy
    if charges is not None:
        atoms.arrays[key] = np.asarray(charges, dtype=float)
    return atoms


def synthetic_case():
    """DFT and two models on V_Cl (q = 0, +1) of a 2×1×1 rock-salt cell; model 'b' lacks q = 0."""
    cells = vacancy_cells(rock_salt(), "Cl", supercell=(2, 1, 1))
    q_host = np.where(cells.pristine.numbers == 11, 0.7, -0.7)
    rest = np.delete(q_host, cells.site)

    def frames(energies, shift, key, missing=()):
        host = _labelled(cells.pristine, energies["host"], q_host, key)
        defects = {}
        for q in (0.0, 1.0):
            if q in missing:
                continue
            charges = rest + shift
            charges += (q - charges.sum()) / len(charges)
            defects[q] = _labelled(cells.defect, energies[q], charges, key)
        return {"host": host, "defects": defects}

    reference = frames({"host": -100.0, 0.0: -95.0, 1.0: -99.0}, 0.0, schema.CHARGES)
    models = {
        "a": frames({"host": -100.2, 0.0: -95.1, 1.0: -99.3}, 0.0, "charges"),
        "b": frames({"host": -100.0, 1.0: -98.5}, 0.0, "charges", missing=(0.0,)),
    }
    setup = {
        "cell": cells.pristine.cell[:].tolist(),
        "pristine_positions": cells.pristine.positions.tolist(),
        "pristine_symbols": cells.pristine.get_chemical_symbols(),
        "site": cells.site,
        "element": "Cl",
        "charges": [0, 1],
        "vbm": 2.0,
        "cbm": 7.0,
        "dielectric_constant": 2.0,
        "chemical_potentials": {"Cl": -3.0},
        "fermi_points": 11,
    }
    return reference, models, setup, cells


def test_analyse_vacancy_rows_and_errors():
    reference, models, setup, cells = synthetic_case()
    out = analysis.analyse_vacancy(reference, models, setup)
    result, comparison = out["analysis"], out["comparison"]
    correction = analysis.point_charge_correction(cells.pristine.cell[:], 1.0, 2.0)
    assert result["correction"]["values"] == pytest.approx({"0": 0.0, "+1": correction})
    assert result["chemical_potential"] == -3.0 and result["gap"] == 5.0
    dft = result["methods"]["dft"]
    assert dft["delta_e"]["+1"] == pytest.approx(-4.0)
    # E_f(+1, 0) = −99 + 100 − 3 + 2 + corr; E_f(0, 0) = 5 − 3 = 2; ε(+1/0) = E_f(0) − E_f(+1)
    assert dft["formation_energy_vbm"]["+1"] == pytest.approx(0.0 + correction)
    assert dft["transition_levels"]["+1/0"] == pytest.approx(2.0 - correction)
    assert dft["charge_source"] == schema.CHARGES and set(dft["profiles"]) == {"0", "+1"}
    row = comparison["a"]
    assert row["delta_e_error"] == pytest.approx({"+1": -0.2})  # (−99.3 + 95.1) − (−4)
    assert row["relative_energy_error"] == pytest.approx({"0": 0.1, "+1": -0.1})
    assert row["transition_level_error"]["+1/0"] == pytest.approx(0.2)
    assert row["delta_q_rmse"]["+1"] == pytest.approx(0.0, abs=1e-12)
    assert comparison["b"]["missing_charge_states"] == ["0"] and comparison["b"]["delta_e_error"] == {}
    assert comparison["b"]["relative_energy_error"] == pytest.approx({"+1": 0.5})
    assert set(comparison) == {"dft", "a", "b"}


def test_figures_are_written(tmp_path):
    from aiida_emlip.report.figures_defects import FIGURES, write_figures

    reference, models, setup, _ = synthetic_case()
    result = analysis.analyse_vacancy(reference, models, setup)["analysis"]
    paths = write_figures(result, tmp_path)
    assert set(paths) == set(FIGURES)
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    # DFT alone (no models) still gives every figure
    alone = analysis.analyse_vacancy(reference, {}, setup)["analysis"]
    assert all(p.stat().st_size > 3000 for p in write_figures(alone, tmp_path / "alone").values())


def test_select_frames_never_uses_unconverged_structures():
    cells = vacancy_cells(rock_salt(), "Cl", supercell=(1, 1, 1))
    host = _labelled(cells.pristine, -10.0, None, schema.CHARGES)
    host.info["key"] = "pristine"
    good = _labelled(cells.defect, -8.0, None, schema.CHARGES)
    good.info.update(key="vacancy_q0", scf_converged=True)
    bad = _labelled(cells.defect, -7.0, None, schema.CHARGES)
    bad.info.update(key="vacancy_qp1", scf_converged=False)
    keys = {"host": "pristine", "defects": {"0": "vacancy_q0", "+1": "vacancy_qp1", "-1": "vacancy_qm1"}}
    selected, notes = analysis.select_frames([host, good, bad], keys)
    assert selected["host"] is host and set(selected["defects"]) == {0.0}
    assert notes == ["vacancy_qp1: SCF not converged", "vacancy_qm1: missing"]
    # frames without keys are matched by order
    for atoms in (host, good, bad):
        del atoms.info["key"]
    selected, _ = analysis.select_frames([host, good], keys, fallback_order=["pristine", "vacancy_q0"])
    assert selected["host"] is host and selected["defects"][0.0] is good


def test_relaxed_energetics_on_numbers_worked_by_hand():
    """Relaxation energies, DFT's change along the same displacement and ΔE(q) at the model's cells."""
    from ase import Atoms

    from aiida_emlip.analysis.defect_relax import max_displacement, relaxed_energetics

    def frame(energy, shift=0.0):
        atoms = Atoms("NaCl", positions=[[0, 0, 0], [2.8 + shift, 0, 0]], cell=[5.6, 5.6, 5.6], pbc=True)
        atoms.info["energy"] = energy
        return atoms

    # the model moves Cl by 0.1 Å; across the boundary the minimum image counts
    assert max_displacement(frame(0.0, 0.1), frame(0.0)) == pytest.approx(0.1)
    wrapped = frame(0.0)
    wrapped.positions[0] = [5.55, 0, 0]
    assert max_displacement(wrapped, frame(0.0)) == pytest.approx(0.05)
    result = relaxed_energetics(
        [0, 1],
        model_relaxed={0: frame(-10.2, 0.1), 1: frame(-7.5, 0.1)},
        dft_relaxed={0: frame(-11.05, 0.1), 1: frame(-8.2, 0.1)},
        model_unrelaxed={0: frame(-10.0), 1: frame(-7.4)},
        dft_unrelaxed={0: frame(-11.0), 1: frame(-8.3)},
    )
    zero, one = result["states"]["0"], result["states"]["1"]
    assert zero["model_relaxation_energy"] == pytest.approx(-0.2)
    assert zero["dft_energy_change"] == pytest.approx(-0.05)
    assert one["dft_energy_change"] == pytest.approx(0.1)  # the model's geometry is worse for DFT
    assert result["dft_lowered"] is False
    assert result["relaxation_energy_mae"] == pytest.approx((0.15 + 0.2) / 2)
    # ΔE(+1): model −7.5 − (−10.2) = 2.7, DFT −8.2 − (−11.05) = 2.85
    assert result["delta_e"]["1"]["error"] == pytest.approx(-0.15)
    assert result["delta_e_mae"] == pytest.approx(0.15)
    partial = relaxed_energetics(
        [0, 2], {0: frame(-1.0)}, {0: frame(-1.0)}, {0: frame(-1.0)}, {0: frame(-1.0)}
    )
    assert partial["missing"] == [2] and "delta_e_mae" not in partial
