"""Response probes, pure: exact physics of model heads in fields, the fits and the verdict rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase import Atoms

from aiida_emlip import schema
from aiida_emlip.analysis import response as analysis
from aiida_emlip.analysis import verdicts
from aiida_emlip.structures import response as builders


def _silent_model(head: dict, elements: list[str], sigma: float = 0.0):
    """A model whose backbone (and head readout) is zero: the head's constants alone act."""
    from aiida_emlip.models.model import EmlipModel, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(
        elements=elements,
        head=head,
        backbone={"num_channels": 4, "num_interactions": 1, "correlation": 1, "max_ell": 1, "r_max": 3.0},
        electrostatics={"sigma": sigma, "accuracy": 1e-10},
        dtype="float64",
    )
    model = EmlipModel(config)
    with torch.no_grad():
        for parameter in model.backbone.parameters():
            parameter.zero_()
        for name, parameter in model.head.named_parameters():
            if "readout" in name:
                parameter.zero_()
    return model


def _evaluate(model, atoms: Atoms, field: float, axis: int = 2) -> dict:
    from aiida_emlip.models.graph import build_graph

    atoms = atoms.copy()
    vector = np.zeros(3)
    vector[axis] = field
    atoms.info[schema.EXTERNAL_FIELD] = vector
    model.eval()
    graph = build_graph([atoms], model.cutoff, model.dtype)
    out = model(graph, compute_forces=False, compute_stress=False)
    return {k: v.detach().numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}


# ----------------------------------------------------------------------------- structures


def test_probe_structures():
    slab = builders.metal_slab("Al", size=(1, 2, 2), vacuum=8.0)
    from aiida_emlip.structures.geometry import vacuum_axes

    assert vacuum_axes(slab) == [2]
    assert list(builders.model_cell(slab).pbc) == [True, True, False]
    assert builders.slab_thickness(slab) == pytest.approx(2.338, abs=0.01)  # Al(111) layer spacing
    chain = builders.water_chain(3)
    assert chain.get_chemical_formula() == "H6O3" and not builders.model_cell(chain).pbc.any()
    oxygens = chain.positions[chain.symbols == "O"]
    assert np.allclose(np.diff(oxygens[:, 0]), builders.WATER_SPACING)
    pairs = builders.ion_pair_scan("Li", "F", [1.6, 4.0, 10.0])
    assert {tuple(a.cell.lengths().round(6)) for a in pairs} == {(7.0, 7.0, 20.0)}
    assert [round(a.get_distance(0, 1), 6) for a in pairs] == [1.6, 4.0, 10.0]
    assert min(a.get_distance(0, 1, mic=True) for a in pairs) == pytest.approx(1.6)
    assert pairs[-1].get_distance(0, 1, mic=True) == pytest.approx(10.0)  # images no closer


# ----------------------------------------------------------------------------- exact physics


def test_fixed_head_has_no_induced_dipole():
    """Formal point charges do not move: d(E) = d(0) exactly, α = 0, and autograd α = 0."""
    from aiida_emlip.models.response import polarizability

    model = _silent_model({"name": "fixed", "formal_charges": {"O": -2.0, "H": 1.0}}, ["H", "O"])
    chain = builders.model_cell(builders.water_chain(2))
    d = {e: _evaluate(model, chain, e, axis=0)["dipole"][0] for e in (-0.1, 0.0, 0.1)}
    np.testing.assert_allclose(d[0.1], d[0.0], atol=1e-12)
    np.testing.assert_allclose(d[-0.1], d[0.0], atol=1e-12)
    np.testing.assert_allclose(polarizability(model, chain), 0.0, atol=0)
    summary = analysis.field_response([(-0.1, d[-0.1][0]), (0.1, d[0.1][0])], 10.0, 2.0)
    assert summary["alpha"] == pytest.approx(0.0, abs=1e-12)


#: Tolerance on E_in/E of the ideal-conductor qeq slab (Gaussians of σ = 0.5 Å, layers 2.34 Å apart, J = 0.1).
SCREENING_TOLERANCE = 0.03


def test_soft_qeq_screens_the_field_inside_a_slab():
    """A charge-equilibration head with vanishing hardness is an ideal conductor: E_in/E → 0.

    Four Al(111) layers, open along z (the model's slab electrostatics), E = 0.1 V/Å along z. The
    interior field from the induced charges (sheet formula) vanishes to SCREENING_TOLERANCE, the
    screened fraction α/(ε₀At) is 1 within the same tolerance (charges on the outer layers), and
    the finite-field α equals the autograd α.
    """
    from aiida_emlip.models.response import polarizability

    model = _silent_model({"name": "qeq", "min_hardness": 0.1}, ["Al"], sigma=0.5)
    with torch.no_grad():
        model.head.hardness0.fill_(-40.0)  # softplus(−40) ≈ 0: J = min_hardness
    slab = builders.model_cell(builders.metal_slab("Al", size=(2, 2, 4), vacuum=10.0))
    e = 0.1
    plus, minus = _evaluate(model, slab, e), _evaluate(model, slab, -e)
    z = slab.positions[:, 2]
    area = builders.plane_area(slab)
    fraction = analysis.interior_field_fraction(z, 0.5 * (plus["charges"] - minus["charges"]), area, e)
    assert abs(fraction) < SCREENING_TOLERANCE, fraction
    # the charge sits on the outer layers only
    inner = (z > z.min() + 0.5) & (z < z.max() - 0.5)
    assert np.abs(plus["charges"][inner]).max() < 0.15 * np.abs(plus["charges"]).max()
    alpha = (plus["dipole"][0, 2] - minus["dipole"][0, 2]) / (2 * e)
    s = analysis.screened_fraction(alpha, area, builders.slab_thickness(slab))
    assert s == pytest.approx(1.0, abs=0.1)  # the Gaussians put a little charge beyond the outer nuclei
    assert polarizability(model, slab)[2, 2] == pytest.approx(alpha, rel=1e-6)
    # screening is what charge equilibration does with any ordinary hardness (J = 8 eV/e² still leaves
    # < 2 % of the field): the sheet modes' Coulomb energy dwarfs it; only J of 10³ eV/e² stops it
    with torch.no_grad():
        model.head.hardness0.fill_(8.0)
    plus, minus = _evaluate(model, slab, e), _evaluate(model, slab, -e)
    assert (
        abs(analysis.interior_field_fraction(z, 0.5 * (plus["charges"] - minus["charges"]), area, e)) < 0.02
    )
    with torch.no_grad():
        model.head.hardness0.fill_(1000.0)
    plus, minus = _evaluate(model, slab, e), _evaluate(model, slab, -e)
    stiff = analysis.interior_field_fraction(z, 0.5 * (plus["charges"] - minus["charges"]), area, e)
    assert stiff > 0.5


def test_interior_field_of_charge_sheets():
    """Two sheets ±ε₀EA at the faces cancel E inside exactly; none leave E."""
    area, field = 12.0, 0.3
    sigma = analysis.EPSILON_0 * area * field
    z = [0.0, 1.0, 2.0]
    assert analysis.interior_field_fraction(z, [-sigma, 0.0, sigma], area, field) == pytest.approx(
        0.0, abs=1e-12
    )
    assert analysis.interior_field_fraction(z, [0.0, 0.0, 0.0], area, field) == 1.0
    assert analysis.interior_field_fraction(z, [-sigma / 2, 0.0, sigma / 2], area, field) == pytest.approx(
        0.5
    )
    # ideal conductor: d = σ t → s = 1
    assert analysis.screened_fraction(sigma * 2.0 / field, area, 2.0) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- fits


def test_growth_exponent_on_synthetic_data():
    sizes = [1, 2, 3, 4, 6, 8]
    linear = analysis.growth_exponent(sizes, [0.1 * n for n in sizes])
    assert linear["exponent"] == pytest.approx(1.0, abs=1e-12)
    assert linear["alpha_per_molecule"] == pytest.approx(0.1)
    assert linear["alpha_volume_per_molecule"] == pytest.approx(0.1 * schema.COULOMB_CONSTANT)
    cubic = analysis.growth_exponent(sizes, [0.02 * n**3 for n in sizes])
    assert cubic["exponent"] == pytest.approx(3.0, abs=1e-12)
    offset = analysis.growth_exponent(sizes, [0.1 * n + 0.05 for n in sizes])  # end effects: sublinear
    assert 0.7 < offset["exponent"] < 1.0
    assert analysis.growth_exponent([1, 2], [0.0, 0.0])["exponent"] is None
    assert analysis.growth_exponent([2], [0.3])["exponent"] is None


def test_charging_curve_and_dissociation():
    charges = [-0.2, 0.0, 0.2]
    # electrons added (Q < 0) raise μ: dμ/dQ < 0, C = −1/(dμ/dQ) > 0
    curve = analysis.charging_curve([(q, -4.0 - 2.0 * q) for q in charges], area=10.0)
    assert curve["dmu_dq"] == pytest.approx(-2.0) and curve["capacitance"] == pytest.approx(0.5)
    assert curve["capacitance_uf_cm2"] == pytest.approx(0.05 * analysis.E_PER_V_A2_IN_UF_PER_CM2)
    d = analysis.dissociation([(10.0, 0.38), (1.6, 0.85), (4.0, 0.6)])
    assert d["distances"] == [1.6, 4.0, 10.0] and d["far_charge"] == 0.38
    assert d["fractional"] == pytest.approx(0.38)
    assert analysis.curve_rmse({1.0: 0.0, 2.0: 1.0}, {1.0: 0.3, 2.0: 0.6, 3.0: 9.0}) == pytest.approx(
        math.sqrt((0.09 + 0.16) / 2)
    )


def test_analyse_response_end_to_end_numbers():
    """analyse_method on hand-made frames: the field slope, the interior field, μ(Q), fragments, α(N)."""
    slab = builders.metal_slab("Al", size=(1, 2, 2))
    area, t = builders.plane_area(slab), builders.slab_thickness(slab)
    setup, frames = {}, {}
    sigma = analysis.EPSILON_0 * area
    z = slab.positions[:, 2]
    for sign in (1, -1):
        e = 0.05 * sign
        atoms = slab.copy()
        q = np.where(z > z.mean(), sigma * e, -sigma * e)  # perfect screening, 2 atoms per layer
        q = q / 2
        atoms.arrays[schema.CHARGES] = q
        atoms.info[schema.DIPOLE] = [0.0, 0.0, float(q @ z)]
        key = f"field_metal_{'p' if sign > 0 else 'm'}"
        setup[key] = {"probe": "field_metal", "value": e, "axis": 2, "area": area, "thickness": t}
        frames[key] = atoms
    for i, q_tot in enumerate((-0.5, 0.0, 0.5)):
        atoms = slab.copy()
        atoms.info[schema.FERMI_LEVEL] = -4.2 + 0.8 * q_tot
        setup[f"charge_{i}"] = {"probe": "charging", "value": q_tot, "area": area, "thickness": t}
        frames[f"charge_{i}"] = atoms
    for i, (r, qa) in enumerate(((1.6, 0.9), (10.0, 0.0))):
        atoms = builders.ion_pair("Li", "F", r)
        atoms.arrays[schema.CHARGES] = np.array([qa, -qa])
        setup[f"pair_{i}"] = {"probe": "dissociation", "value": r, "n_first": 1}
        frames[f"pair_{i}"] = atoms
    for n in (1, 2):
        for sign in (1, -1):
            atoms = builders.water_chain(n)
            atoms.info[schema.DIPOLE] = [0.1 * n * 0.02 * sign + 0.3, 0.0, 0.0]
            key = f"chain{n}_{sign}"
            setup[key] = {"probe": "polarizability", "value": n, "axis": 0, "field": 0.02 * sign}
            frames[key] = atoms
    result, notes = analysis.analyse_method(setup, frames)
    assert not notes
    assert result["field_metal"]["screened_fraction"] == pytest.approx(1.0)
    assert result["field_metal"]["interior_field_fraction"] == pytest.approx(0.0, abs=1e-12)
    assert result["charging"]["dmu_dq"] == pytest.approx(0.8)
    assert result["dissociation"]["far_charge"] == 0.0
    assert result["polarizability"]["alpha"] == pytest.approx([0.1, 0.2])
    assert result["polarizability"]["exponent"] == pytest.approx(1.0)
    full = analysis.analyse_response(setup, {"dft": frames, "m": frames})
    assert full["probes"]["dissociation"]["m"]["rmse_vs_dft"] == 0.0


# ----------------------------------------------------------------------------- verdicts


def test_verdict_rules():
    tol = verdicts.DEFAULT_TOLERANCES
    probes = {
        "field_metal": {
            "dft": {"alpha": 1.0, "screened_fraction": 1.2},
            "qeq": {"alpha": 1.1, "screened_fraction": 1.3},
            "fixed": {"alpha": 0.0, "screened_fraction": 0.0},
        },
        "field_water": {"dft": {"alpha": 0.1}, "qeq": {"alpha": 0.5}, "fixed": {"alpha": 0.0}},
        "charging": {"dft": {"dmu_dq": 2.0}, "qeq": {"dmu_dq": 2.2}},
        "dissociation": {
            "dft": {"far_charge": 0.02, "fractional": 0.02},
            "qeq": {"far_charge": 0.4, "fractional": 0.4, "rmse_vs_dft": 0.3},
            "fixed": {"far_charge": 1.0, "fractional": 0.0, "rmse_vs_dft": 0.8},
        },
        "polarizability": {
            "dft": {"exponent": 1.02, "alpha_per_molecule": 0.1},
            "qeq": {"exponent": 1.9, "alpha_per_molecule": 0.3},
            "fixed": {"exponent": None, "alpha_per_molecule": 0.0},
        },
    }
    table = verdicts.verdict_table(
        probes, ["qeq", "fixed"], skipped={"fixed": {"charging": "head fixed has no fermi_level"}}
    )
    assert table["columns"] == list(verdicts.COLUMNS)
    qeq, fixed = table["rows"]["qeq"], table["rows"]["fixed"]
    assert qeq["field_metal"]["verdict"] == verdicts.MATCH
    assert fixed["field_metal"]["verdict"] == verdicts.INSULATOR
    assert qeq["field_water"]["verdict"] == verdicts.METAL and qeq["field_water"]["value"] == pytest.approx(
        5.0
    )
    assert fixed["field_water"]["verdict"] == verdicts.INSULATOR
    assert qeq["charging"]["verdict"] == verdicts.MATCH
    assert fixed["charging"]["verdict"] == verdicts.SKIPPED and "fermi_level" in fixed["charging"]["reason"]
    assert qeq["dissociation"]["verdict"] == verdicts.METAL
    assert fixed["dissociation"]["verdict"] == verdicts.INSULATOR
    assert qeq["polarizability"]["verdict"] == verdicts.METAL
    assert fixed["polarizability"]["verdict"] == verdicts.INSULATOR
    assert table["dft"]["polarizability"]["value"] == 1.02
    # charging: stiff is insulator-like, soft metal-like
    assert verdicts.charging_verdict({"dmu_dq": 5.0}, {"dmu_dq": 2.0}, tol)["verdict"] == verdicts.INSULATOR
    assert verdicts.charging_verdict({"dmu_dq": 0.5}, {"dmu_dq": 2.0}, tol)["verdict"] == verdicts.METAL
    # dissociation within tolerance of DFT
    match = verdicts.dissociation_verdict({"far_charge": 0.05, "fractional": 0.05}, None, tol, rmse=0.04)
    assert match["verdict"] == verdicts.MATCH
    # no DFT: a metal slab's screened fraction decides
    cell = verdicts.field_verdict({"alpha": 1.0, "screened_fraction": 0.9}, None, "metal", tol)
    assert cell["verdict"] == verdicts.METAL and cell["note"] == "no DFT"
    assert "qeq" in verdicts.format_table(table)
