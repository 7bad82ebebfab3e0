"""EmlipResponseWorkChain: bad inputs stop before any compute; LiF and water chains with real pw.x.

The real runs take minutes each and are marked ``slow`` (``make test-all``); the bad-input checks
run in the default suite. The defect workchain's test is the default suite's real end-to-end path.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from validation_helpers import silent_model_node, train_qeq_on_pw_labels

from aiida_emlip import schema

#: Cheap pw.x: 20 Ry, Γ (every probe structure is a molecule in a box).
CHEAP_DFT = {
    "ecutwfc": 20.0,
    "ecutrho": 80.0,
    "conv_thr_per_atom": 1.0e-8,
    "kpoints_distance": 1.0,
    "max_iterations": 1,
    # separated Li + F: smeared (Li is a metal for `electronic_type: auto`), slow to converge at 0.01 Ry
    "degauss": 0.03,
    "mixing_beta": 0.2,
    "electron_maxstep": 300,
    "options": {"max_wallclock_seconds": 600},
}
#: Four distances, chains of one and two molecules, one field value.
TINY = {
    "distances": [1.6, 3.0, 5.0, 8.0],
    "pair_box": [6.0, 6.0],
    "water_sizes": [1, 2],
    "chain_vacuum": 6.0,
    "chain_field": 0.05,
}
FORMAL = {"H": 1.0, "O": -2.0, "Li": 1.0, "F": -1.0, "Al": 0.0}


def _model_node(tmp_path, head, elements=("H", "Li", "O", "F", "Al"), sigma=0.0):
    return silent_model_node(tmp_path, head, elements, sigma)


def test_protocols():
    from aiida_emlip.workflows.validate.response import EmlipResponseWorkChain

    assert set(EmlipResponseWorkChain.get_available_protocols()) == {"fast", "balanced", "stringent"}
    fast = EmlipResponseWorkChain.get_protocol_inputs("fast")
    assert fast["fields"] == [0.1] and fast["metal"]["size"] == [1, 2, 2] and fast["water_sizes"] == [1, 2, 3]
    assert EmlipResponseWorkChain.get_protocol_inputs("precise")["water_sizes"][-1] == 8


def _slab(vacuum_axis):
    from aiida_emlip.structures.response import metal_slab

    atoms = metal_slab("Al", size=(1, 2, 2))
    if vacuum_axis is None:
        return bulk("Al", "fcc", a=4.05, cubic=True)
    return atoms


BAD_INPUTS = {
    "slab_without_vacuum": ({"metal_slab": None}, "ERROR_NO_VACUUM"),
    "field_along_periodic": ({"overrides": {"field_axis": 0}}, "ERROR_FIELD_ALONG_PERIODIC"),
    "no_electrons": ({"overrides": {"charges": [0.0, 40.0]}}, "ERROR_NO_ELECTRONS"),
    "model_elements": ({"model": ({"name": "qeq"}, ("H", "O"))}, "ERROR_MODEL_ELEMENTS"),
    "mu_of_fixed_head": (
        {"probes": ["charging"], "model": ({"name": "fixed", "formal_charges": FORMAL}, None)},
        "ERROR_NO_FERMI_LEVEL",
    ),
    "unknown_probe": ({"probes": ["phonons"]}, "ERROR_INVALID_PROBES"),
    "one_chain_size": ({"overrides": {"water_sizes": [2]}}, "ERROR_INVALID_PROBES"),
    "unknown_protocol": ({"protocol": "sloppy"}, "ERROR_UNKNOWN_PROTOCOL"),
    "unknown_override": ({"overrides": {"field": 1}}, "ERROR_INVALID_OVERRIDES"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_exit_before_any_compute(case, pw_code, eval_code, pseudo_family, tmp_path):
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.validate.response import EmlipResponseWorkChain

    change, exit_code = BAD_INPUTS[case]
    builder = EmlipResponseWorkChain.get_builder_from_protocol(
        pw_code, pseudo_family.label, protocol="fast", dft_overrides=CHEAP_DFT, probes=change.get("probes")
    )
    if "overrides" in change:
        builder.overrides = orm.Dict(change["overrides"])
    if "protocol" in change:
        builder.protocol = orm.Str(change["protocol"])
    if "metal_slab" in change:
        builder.metal_slab = orm.StructureData(ase=_slab(None))
    if "model" in change:
        head, elements = change["model"]
        kwargs = {"elements": elements} if elements else {}
        builder.models = {
            "m": _model_node(tmp_path, head, sigma=0.5 if head["name"] == "qeq" else 0.0, **kwargs)
        }
        builder.eval_code = eval_code
    _, node = run_get_node(builder)
    assert node.exit_status == getattr(EmlipResponseWorkChain.exit_codes, exit_code).status, node.exit_message
    assert not node.called_descendants, "no process may run before the inputs are checked"


@pytest.fixture(scope="module")
def small_response(pw_code, pp_code, eval_code, pseudo_family, tmp_path_factory):
    """LiF at four distances and water chains of 1–2 molecules, with a fixed and a qeq model."""
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.validate.response import EmlipResponseWorkChain

    tmp = tmp_path_factory.mktemp("response-models")
    models = {
        "fixed": _model_node(tmp, {"name": "fixed", "formal_charges": FORMAL}),
        "qeq": _model_node(tmp, {"name": "qeq"}, sigma=0.5),
    }
    builder = EmlipResponseWorkChain.get_builder_from_protocol(
        pw_code,
        pseudo_family.label,
        protocol="fast",
        overrides=TINY,
        dft_overrides=CHEAP_DFT,
        probes=["dissociation", "polarizability"],
        models=models,
        eval_code=eval_code,
        pp_code=pp_code,
    )
    return run_get_node(builder)


@pytest.mark.slow
@pytest.mark.pw
def test_small_response_run(small_response):
    results, node = small_response
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    setup = results["setup"].get_dict()
    assert len(setup) == 4 + 2 * 2
    from aiida_emlip.workflows.validate.response_functions import dft_frames

    frames = dft_frames(results["dft_dataset"], results["configurations"])
    assert set(frames) == set(setup)
    # Hirshfeld charges sum to the (zero) total charge; the field is the one applied
    for atoms in frames.values():
        assert atoms.arrays[schema.CHARGES].sum() == pytest.approx(0.0, abs=5e-3)  # stored precision
    assert np.allclose(frames["chain2_p"].info[schema.EXTERNAL_FIELD], [0.05, 0.0, 0.0])
    probes = results["analysis"]["probes"]
    print("\n", results["verdicts"]["text"], "\n", {p: probes[p] for p in probes})
    dft_pol = probes["polarizability"]["dft"]
    # water: α ≈ 1.4–1.6 Å³ per molecule (PBE, finite field), positive and growing with N
    assert 0.5 < dft_pol["alpha_volume"][0] < 3.0, dft_pol
    assert dft_pol["alpha"][1] > dft_pol["alpha"][0]
    dft_pair = probes["dissociation"]["dft"]
    assert dft_pair["distances"] == TINY["distances"] and 0.3 < dft_pair["near_charge"] < 1.0
    # the fixed model: formal charges at every distance, no induced dipole (finite field and autograd)
    fixed_pair = probes["dissociation"]["fixed"]
    assert fixed_pair["fragment_charge"] == pytest.approx([1.0] * 4)
    fixed_pol = probes["polarizability"]["fixed"]
    assert fixed_pol["alpha"] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert results["autograd_polarizability"]["fixed"].get_dict() == {"1": 0.0, "2": 0.0}
    # qeq: finite-field α equals autograd α
    qeq_pol = probes["polarizability"]["qeq"]
    assert qeq_pol["alpha"] == pytest.approx(qeq_pol["alpha_autograd"], rel=1e-3, abs=1e-6)
    table = results["verdicts"].get_dict()
    assert table["columns"] == ["dissociation", "polarizability"]
    assert set(table["rows"]) == {"fixed", "qeq"}
    assert table["rows"]["fixed"]["polarizability"]["verdict"] == "insulator-like"
    assert table["rows"]["fixed"]["dissociation"]["verdict"] == "insulator-like"
    for row in table["rows"].values():
        for cell in row.values():
            assert cell["verdict"] in ("metal-like", "insulator-like", "matches DFT", "skipped")
    print("\n" + table["text"])
    print({k: v for k, v in dft_pol.items()}, dft_pair)
    print(qeq_pol, probes["dissociation"]["qeq"])
    for name in ("dissociation", "polarizability"):
        content = results["figures"][name].get_content(mode="rb")
        assert content[:4] == b"\x89PNG" and len(content) > 5000


def _pair_and_chain_training_frames():
    """Held out from the probes: LiF at other distances, water chains of 1–2 molecules in other fields."""
    from aiida_emlip.structures.response import ion_pair_scan, water_chain

    frames = []
    for atoms in ion_pair_scan("Li", "F", [2.2, 4.0, 7.0], TINY["pair_box"]):
        atoms.set_cell([*TINY["pair_box"], 16.0], scale_atoms=False)
        atoms.info = {"total_charge": 0.0}
        frames.append(atoms)
    for n, field in ((1, 0.03), (2, -0.03)):
        atoms = water_chain(n, vacuum=TINY["chain_vacuum"])
        atoms.rattle(stdev=0.03, seed=n)
        atoms.info = {"total_charge": 0.0, "external_field": [field, 0.0, 0.0]}
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def trained_response_model(pw_code, pp_code, pseudo_family, train_code):
    """A small ``qeq`` model trained (energies, forces, Hirshfeld charges) on its own pw.x labels."""
    codes = {"pw": pw_code, "pp": pp_code, "train": train_code}
    return train_qeq_on_pw_labels(
        _pair_and_chain_training_frames(), codes, pseudo_family.label, CHEAP_DFT, sigma=0.5
    )


@pytest.mark.slow
@pytest.mark.pw
def test_trained_model_on_held_out_probes(trained_response_model, pw_code, pp_code, eval_code, pseudo_family):
    """The trained qeq on LiF and the chains (the DFT comes from the cache of the first run)."""
    from aiida.engine import run_get_node
    from aiida.manage.caching import enable_caching

    from aiida_emlip.workflows.validate.response import EmlipResponseWorkChain

    builder = EmlipResponseWorkChain.get_builder_from_protocol(
        pw_code,
        pseudo_family.label,
        protocol="fast",
        overrides=TINY,
        dft_overrides=CHEAP_DFT,
        probes=["dissociation", "polarizability"],
        models={"trained": trained_response_model},
        eval_code=eval_code,
        pp_code=pp_code,
    )
    with enable_caching(identifier="aiida.calculations:quantumespresso.*"):
        results, node = run_get_node(builder)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    probes = results["analysis"]["probes"]
    pair, dft_pair = probes["dissociation"]["trained"], probes["dissociation"]["dft"]
    print("\n" + results["verdicts"]["text"], pair, dft_pair, probes["polarizability"]["trained"])
    # trained on Hirshfeld charges at 2.2, 4 and 7 Å: Li carries a positive charge that falls with R
    assert 0.0 < pair["far_charge"] < pair["near_charge"] < 1.0
    assert pair["rmse_vs_dft"] < 0.5
    pol, dft_pol = probes["polarizability"]["trained"], probes["polarizability"]["dft"]
    assert pol["alpha"] == pytest.approx(pol["alpha_autograd"], rel=1e-3, abs=1e-6)
    assert all(a > 0 for a in pol["alpha"])  # charge equilibration responds to the field
    # ... and, as a conductor, superlinearly with the chain's length: the known pathology of qeq
    assert pol["exponent"] > dft_pol["exponent"] + 0.15
    assert results["verdicts"]["rows"]["trained"]["polarizability"]["verdict"] == "metal-like"


@pytest.mark.slow
@pytest.mark.pw
def test_field_and_charging_probes_against_pw(pw_code, pp_code, eval_code, pseudo_family, tmp_path):
    """Two-layer Al(111) slab and a one-molecule water film in ±0.1 V/Å, the slab at Q = −0.2, 0, +0.2 e.

    DFT screens the field in the metal (interior field ≈ 0) and gives a positive capacitance from μ(Q);
    a fixed model has no induced dipole; a conductor-like qeq screens like the metal.
    """
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.validate.response import EmlipResponseWorkChain

    models = {
        "fixed": _model_node(tmp_path, {"name": "fixed", "formal_charges": FORMAL}),
        "qeq": _model_node(tmp_path, {"name": "qeq", "min_hardness": 0.1}, sigma=0.5),
    }
    builder = EmlipResponseWorkChain.get_builder_from_protocol(
        pw_code,
        pseudo_family.label,
        protocol="fast",
        overrides={"probes": ["field", "charging"]},  # from the protocol: μ-less heads are skipped
        dft_overrides=CHEAP_DFT,
        models=models,
        eval_code=eval_code,
        pp_code=pp_code,
    )
    builder.dft.overrides = orm.Dict({**CHEAP_DFT, "postprocess": {"vacuum_level": True, "hirshfeld": True}})
    results, node = run_get_node(builder)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    probes = results["analysis"]["probes"]
    print("\n" + results["verdicts"]["text"], {p: probes[p].get("dft") for p in probes})
    metal, water = probes["field_metal"], probes["field_water"]
    assert abs(metal["dft"]["interior_field_fraction"]) < 0.2  # the metal screens
    assert metal["dft"]["screened_fraction"] > 0.5
    assert 0 < water["dft"]["alpha"] < metal["dft"]["alpha"]  # water polarises, far less than a metal
    assert metal["fixed"]["alpha"] == pytest.approx(0.0, abs=1e-6)
    assert abs(metal["qeq"]["interior_field_fraction"]) < 0.15
    assert probes["charging"]["dft"]["dmu_dq"] < 0 < probes["charging"]["dft"]["capacitance"]
    table = results["verdicts"].get_dict()
    assert table["rows"]["fixed"]["field_metal"]["verdict"] == "insulator-like"
    assert table["rows"]["fixed"]["charging"]["verdict"] == "skipped"
