"""EmlipInterfaceWorkChain: bad inputs stop before any compute; Al(111)/water with real pw.x.

The real runs take minutes each and are marked ``slow`` (``make test-all``); the bad-input checks
run in the default suite. The defect workchain's test is the default suite's real end-to-end path.
"""

from __future__ import annotations

import numpy as np
import pytest
from validation_helpers import silent_model_node, train_qeq_on_pw_labels

from aiida_emlip import schema

#: Cheap pw.x for a two-layer Al slab with one water molecule: 20 Ry, a few k-points, smeared.
CHEAP_DFT = {
    "ecutwfc": 20.0,
    "ecutrho": 80.0,
    "conv_thr_per_atom": 1.0e-8,
    "kpoints_distance": 1.0,
    "max_iterations": 1,
    "degauss": 0.03,
    "mixing_beta": 0.3,
    "electron_maxstep": 300,
    "options": {"max_wallclock_seconds": 600},
}
#: Neutral, E = ±0.1 V/Å and Q = −0.2 e: four states.
TINY = {"fields": [0.1], "charges": [-0.2]}
FORMAL = {"H": 1.0, "O": -2.0, "Al": 0.0}


def _model_node(tmp_path, head, elements=("H", "O", "Al"), sigma=0.0, hardness=None):
    return silent_model_node(tmp_path, head, elements, sigma, hardness)


def test_protocols():
    from aiida_emlip.workflows.validate.interface import EmlipInterfaceWorkChain

    assert set(EmlipInterfaceWorkChain.get_available_protocols()) == {"fast", "balanced", "stringent"}
    fast = EmlipInterfaceWorkChain.get_protocol_inputs("fast")
    assert fast["fields"] == [0.1] and fast["charges"] == [-0.2]
    assert fast["interface"]["size"] == [1, 2, 2] and fast["interface"]["n_water"] == 1
    assert EmlipInterfaceWorkChain.get_protocol_inputs("precise")["interface"]["size"] == [2, 2, 4]


def test_states_share_one_geometry():
    from aiida_emlip.structures.interface_states import default_interface, interface_states

    atoms = default_interface({"symbol": "Al", "size": [1, 2, 2], "n_water": 1, "water_thickness": 3.0})
    frames, setup = interface_states(atoms, [0.1], [-0.2, 0.0])
    assert list(setup) == ["neutral", "field_0p", "field_0m", "charge_0m"]
    for frame in frames:
        assert np.allclose(frame.positions, atoms.positions)
    assert setup["field_0m"]["value"] == -0.1 and setup["charge_0m"]["value"] == -0.2
    assert np.allclose(frames[1].info["external_field"], [0, 0, 0.1])
    assert frames[3].info["total_charge"] == -0.2
    assert setup["neutral"]["metal"] == [0, 1, 2, 3] and setup["neutral"]["metal_symbols"] == ["Al"]
    assert setup["neutral"]["length"] == pytest.approx(atoms.cell[2, 2])


def _no_vacuum():
    from aiida_emlip.structures.interface_states import default_interface

    atoms = default_interface({"symbol": "Al", "size": [1, 2, 2], "n_water": 1, "water_thickness": 3.0})
    top = atoms.positions[:, 2].max()
    atoms.cell[2, 2] = top + 1.5
    return atoms


BAD_INPUTS = {
    "no_vacuum": ({"interface": True}, "ERROR_NO_VACUUM"),
    "field_along_periodic": ({"overrides": {"field_axis": 0}}, "ERROR_FIELD_ALONG_PERIODIC"),
    "no_electrons": ({"overrides": {"charges": [40.0]}}, "ERROR_NO_ELECTRONS"),
    "model_elements": ({"model": ("H", "O")}, "ERROR_MODEL_ELEMENTS"),
    "negative_field": ({"overrides": {"fields": [-0.1]}}, "ERROR_INVALID_STATES"),
    "no_metal": ({"metal_symbols": ["Cu"]}, "ERROR_INVALID_STATES"),
    "unknown_protocol": ({"protocol": "sloppy"}, "ERROR_UNKNOWN_PROTOCOL"),
    "unknown_override": ({"overrides": {"field": 1}}, "ERROR_INVALID_OVERRIDES"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_exit_before_any_compute(case, pw_code, eval_code, pseudo_family, tmp_path):
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.validate.interface import EmlipInterfaceWorkChain

    change, exit_code = BAD_INPUTS[case]
    builder = EmlipInterfaceWorkChain.get_builder_from_protocol(
        pw_code, pseudo_family.label, protocol="fast", dft_overrides=CHEAP_DFT
    )
    if "overrides" in change:
        builder.overrides = orm.Dict(change["overrides"])
    if "protocol" in change:
        builder.protocol = orm.Str(change["protocol"])
    if "interface" in change:
        builder.interface = orm.StructureData(ase=_no_vacuum())
    if "metal_symbols" in change:
        builder.metal_symbols = orm.List(change["metal_symbols"])
    if "model" in change:
        builder.models = {"m": _model_node(tmp_path, {"name": "qeq"}, elements=change["model"], sigma=0.5)}
        builder.eval_code = eval_code
    _, node = run_get_node(builder)
    assert node.exit_status == getattr(EmlipInterfaceWorkChain.exit_codes, exit_code).status, (
        node.exit_message
    )
    assert not node.called_descendants, "no process may run before the inputs are checked"


def _training_frames():
    """Held out from the validation states: rattled geometries, other field and charge values."""
    from aiida_emlip.structures.interface_states import default_interface

    base = default_interface(
        {"symbol": "Al", "size": [1, 2, 2], "n_water": 1, "water_thickness": 3.0, "vacuum": 8.0}
    )
    frames = []
    for i, (charge, field) in enumerate([(0.0, None), (0.0, 0.05), (0.1, None), (-0.1, -0.05)]):
        atoms = base.copy()
        atoms.rattle(stdev=0.05, seed=i + 1)
        atoms.info = {"total_charge": charge}
        if field is not None:
            atoms.info["external_field"] = [0.0, 0.0, field]
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def trained_qeq(pw_code, pp_code, pseudo_family, train_code):
    """A small ``qeq`` model trained (energies, forces, Hirshfeld charges) on its own pw.x labels."""
    codes = {"pw": pw_code, "pp": pp_code, "train": train_code}
    return train_qeq_on_pw_labels(_training_frames(), codes, pseudo_family.label, CHEAP_DFT)


@pytest.fixture(scope="module")
def small_interface(pw_code, pp_code, eval_code, pseudo_family, trained_qeq, tmp_path_factory):
    """Al(111), two layers, one water molecule: neutral, ±0.1 V/Å, Q = −0.2 e; a fixed model, a conductor-like
    qeq and a qeq trained on held-out pw.x data."""
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.validate.interface import EmlipInterfaceWorkChain

    tmp = tmp_path_factory.mktemp("interface-models")
    models = {
        "fixed": _model_node(tmp, {"name": "fixed", "formal_charges": FORMAL}),
        # J → min_hardness: an ideal conductor everywhere (metal and water alike)
        "conductor": _model_node(tmp, {"name": "qeq", "min_hardness": 0.1}, sigma=0.5, hardness=-40.0),
        "trained": trained_qeq,
    }
    builder = EmlipInterfaceWorkChain.get_builder_from_protocol(
        pw_code,
        pseudo_family.label,
        protocol="fast",
        overrides=TINY,
        dft_overrides=CHEAP_DFT,
        models=models,
        eval_code=eval_code,
        pp_code=pp_code,
    )
    return run_get_node(builder)


@pytest.mark.slow
@pytest.mark.pw
def test_small_interface_run(small_interface):
    results, node = small_interface
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    setup = results["setup"].get_dict()
    assert sorted(setup) == ["charge_0m", "field_0m", "field_0p", "neutral"]
    analysis = results["analysis"].get_dict()
    dft = analysis["methods"]["dft"]
    print("\n", results["verdicts"]["text"])
    print({k: v for k, v in dft.items() if k != "states"}, analysis["errors"])
    # DFT: Hirshfeld charges sum to each state's total charge; the metal screens the field
    for key, row in dft["states"].items():
        assert ("electrolyte_charge" in row and "induced_profile" in row) or key == "neutral"
    assert dft["field"]["alpha"] > 0
    assert abs(dft["field"]["interior_field_fraction"]) < 0.3
    # the pp.x profile: a field raises the electron energy along +z outside the sawtooth
    induced = np.asarray(dft["states"]["field_0p"]["induced_profile"])
    assert len(induced) == analysis["grid"]["n_points"]
    # the fixed model: no induced dipole, no charge transfer, the bare field's profile
    fixed = analysis["methods"]["fixed"]
    assert fixed["field"]["alpha"] == pytest.approx(0.0, abs=1e-6)
    assert fixed["field"]["interior_field_fraction"] == pytest.approx(1.0, abs=1e-6)
    assert "charge_0m" not in fixed["states"]  # formal charges cannot carry Q = −0.2
    # DFT: a positive double-layer capacitance of the order of tens of μF/cm², μ rises as electrons come
    assert 5.0 < dft["capacitance"]["capacitance_uf_cm2"] < 100.0
    assert dft["charging"]["dmu_dq"] < 0
    # the conductor-like qeq: screens the field inside the metal; with water as conducting as the
    # metal there is hardly a potential drop between them
    conductor = analysis["methods"]["conductor"]
    assert abs(conductor["field"]["interior_field_fraction"]) < 0.15  # two layers of Gaussians (σ = 0.5 Å)
    assert abs(conductor["capacitance"]["ddrop_dq"]) < 0.2 * dft["capacitance"]["ddrop_dq"]
    table = results["verdicts"].get_dict()
    assert set(table["rows"]) == {"fixed", "conductor", "trained"}
    assert table["rows"]["fixed"]["interface_field"]["verdict"] == "insulator-like"
    assert table["rows"]["conductor"]["interface_capacitance"]["verdict"] == "metal-like"
    # the trained qeq: every state evaluated, errors against DFT on held-out states reported
    errors = analysis["errors"]["trained"]
    assert errors["n_states"] == 4
    assert errors["force_rmse"] < analysis["errors"]["conductor"]["force_rmse"]
    assert errors["charge_transfer_mae"] < 0.1
    for row in table["rows"].values():
        for cell in row.values():
            assert cell["verdict"] in ("metal-like", "insulator-like", "matches DFT", "skipped")
    for name in ("potential_profiles", "dipole_vs_field", "drop_vs_charge", "charge_transfer"):
        content = results["figures"][name].get_content(mode="rb")
        assert content[:4] == b"\x89PNG" and len(content) > 5000
    assert schema.CHARGES in results["dft_dataset"].to_ase()[0].arrays
