"""EmlipChargedDefectWorkChain: bad inputs stop before any compute; a rock-salt Cl vacancy with real pw.x."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk

from aiida_emlip import schema

#: Cheap pw.x for the 8-atom NaCl cube (about 2 s per run at 25 Ry, 2×2×2 k-points).
CHEAP_DFT = {
    "ecutwfc": 25.0,
    "ecutrho": 100.0,
    "conv_thr_per_atom": 1.0e-9,
    "kpoints_distance": 1.0,
    "max_iterations": 1,
    "options": {"max_wallclock_seconds": 600},
}


def nacl_cube():
    return bulk("NaCl", "rocksalt", a=5.64, cubic=True)


def test_parse_band_edges():
    from aiida_emlip.parsers.pw import parse_band_edges

    text = "     highest occupied, lowest unoccupied level (ev):    -1.1886    2.1256\n"
    assert parse_band_edges("junk\n" + text) == (-1.1886, 2.1256)
    assert parse_band_edges("     highest occupied level (ev):     3.5000\n") == (3.5, None)
    assert parse_band_edges("nothing") == (None, None)


def test_vacancy_keys():
    from aiida_emlip.workflows.validate.defect_functions import vacancy_key

    assert [vacancy_key(q) for q in (0, 1, -2)] == ["vacancy_q0", "vacancy_qp1", "vacancy_qm2"]


def test_protocols_and_builder(pw_code, pseudo_family):
    from aiida import orm

    from aiida_emlip.workflows.protocol import OverrideError, ProtocolError
    from aiida_emlip.workflows.validate.defect import EmlipChargedDefectWorkChain

    assert set(EmlipChargedDefectWorkChain.get_available_protocols()) == {"fast", "balanced", "stringent"}
    assert EmlipChargedDefectWorkChain.get_default_protocol() == "balanced"
    fast = EmlipChargedDefectWorkChain.get_protocol_inputs("fast")
    assert fast["dft_protocol"] == "fast" and fast["supercell_min_length"] == 8.0
    builder = EmlipChargedDefectWorkChain.get_builder_from_protocol(
        pw_code, orm.StructureData(ase=nacl_cube()), "Cl", [1, 0], pseudo_family.label, protocol="precise"
    )
    assert builder.protocol.value == "stringent" and builder.dft.protocol.value == "stringent"
    with pytest.raises(ProtocolError):
        EmlipChargedDefectWorkChain.get_builder_from_protocol(
            pw_code, orm.StructureData(ase=nacl_cube()), "Cl", [0], pseudo_family.label, protocol="nope"
        )
    with pytest.raises(OverrideError):
        EmlipChargedDefectWorkChain.get_builder_from_protocol(
            pw_code, orm.StructureData(ase=nacl_cube()), "Cl", [0], pseudo_family.label, overrides={"x": 1}
        )


def _model_node(tmp_path, elements, formal):
    import torch

    from aiida_emlip.data.model import EmlipModelData
    from aiida_emlip.models.io import save_model
    from aiida_emlip.models.model import EmlipModel, ModelConfig

    config = ModelConfig(
        elements=elements,
        head={"name": "fixed", "formal_charges": formal},
        backbone={"num_channels": 4, "num_interactions": 1, "correlation": 1, "max_ell": 1, "r_max": 3.0},
        electrostatics={"sigma": 0.0, "accuracy": 1e-10},
    )
    model = EmlipModel(config)
    with torch.no_grad():  # a silent backbone: the energy is the point charges' Ewald energy alone
        for parameter in model.backbone.parameters():
            parameter.zero_()
    path = save_model(model, tmp_path / f"{'-'.join(elements)}.safetensors")
    return EmlipModelData(path).store()


BAD_INPUTS = {
    "element_absent": ({"element": "F"}, "ERROR_ELEMENT_NOT_IN_HOST"),
    "no_electrons": ({"charge_states": [0, 40]}, "ERROR_NO_ELECTRONS"),
    "model_elements": ({"model": (["H", "O"], {"O": -2.0, "H": 1.0})}, "ERROR_MODEL_ELEMENTS"),
    "site_of_other_element": ({"site": 0}, "ERROR_INVALID_SITE"),
    "fractional_charge": ({"charge_states": [0, 0.5]}, "ERROR_INVALID_CHARGE_STATES"),
    "bad_supercell": ({"supercell": [1, 0, 1]}, "ERROR_INVALID_SUPERCELL"),
    "unknown_protocol": ({"protocol": "sloppy"}, "ERROR_UNKNOWN_PROTOCOL"),
    "unknown_override": ({"overrides": {"supercell": 3}}, "ERROR_INVALID_OVERRIDES"),
    "negative_dielectric": ({"dielectric_constant": -1.0}, "ERROR_INVALID_REFERENCE"),
    "relax_unknown_model": ({"overrides": {"relax_models": ["charge"]}}, "ERROR_INVALID_RELAX_MODELS"),
    "relax_not_a_flag": ({"overrides": {"relax_models": "yes"}}, "ERROR_INVALID_RELAX_MODELS"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_exit_before_any_compute(case, pw_code, pseudo_family, tmp_path):
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.validate.defect import EmlipChargedDefectWorkChain

    change, exit_code = BAD_INPUTS[case]
    builder = EmlipChargedDefectWorkChain.get_builder_from_protocol(
        pw_code,
        orm.StructureData(ase=nacl_cube()),
        change.get("element", "Cl"),
        change.get("charge_states", [0, 1]),
        pseudo_family.label,
        protocol="fast",
        dft_overrides=CHEAP_DFT,
        supercell=[1, 1, 1],
    )
    if "supercell" in change:
        builder.supercell = orm.List(change["supercell"])
    if "site" in change:
        builder.site = orm.Int(change["site"])
    if "protocol" in change:
        builder.protocol = orm.Str(change["protocol"])
    if "overrides" in change:
        builder.overrides = orm.Dict(change["overrides"])
    if "dielectric_constant" in change:
        builder.dielectric_constant = orm.Float(change["dielectric_constant"])
    if "model" in change:
        builder.models = {"water": _model_node(tmp_path, *change["model"])}
    _, node = run_get_node(builder)
    assert node.exit_status == getattr(EmlipChargedDefectWorkChain.exit_codes, exit_code).status, (
        node.exit_message
    )
    assert not node.called_descendants, "no process may run before the inputs are checked"


@pytest.fixture(scope="module")
def chlorine_vacancy(pw_code, pp_code, pseudo_family):
    """V_Cl in the 8-atom NaCl cube, q = 0 and +1, with Hirshfeld charges (pw.x runs once per module)."""
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.validate.defect import EmlipChargedDefectWorkChain

    builder = EmlipChargedDefectWorkChain.get_builder_from_protocol(
        pw_code,
        orm.StructureData(ase=nacl_cube()),
        "Cl",
        [0, 1],
        pseudo_family.label,
        protocol="fast",
        dft_overrides=CHEAP_DFT,
        supercell=[1, 1, 1],
        pp_code=pp_code,
        dielectric_constant=2.5,
    )
    return run_get_node(builder)


@pytest.mark.pw
def test_chlorine_vacancy_dft(chlorine_vacancy):
    from aiida_emlip.analysis.defects import point_charge_correction

    results, node = chlorine_vacancy
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    frames = {a.info["key"]: a for a in results["dft_dataset"].to_ase()}
    assert set(frames) == {"pristine", "vacancy_q0", "vacancy_qp1"}
    pristine = frames["pristine"]
    assert len(pristine) == 8 and len(frames["vacancy_q0"]) == 7
    # same geometry in every charge state: the vacancy cell is the pristine cell without one Cl
    site = results["cells"]["site"]
    assert np.allclose(np.delete(pristine.positions, site, axis=0), frames["vacancy_qp1"].positions)
    edges = results["band_edges"].get_dict()
    assert edges["source"] == "pristine" and 2.0 < edges["gap"] < 8.0  # NaCl: PBE gap ≈ 5 eV
    analysis = results["analysis"].get_dict()
    dft = analysis["methods"]["dft"]
    e = {k: a.info[schema.ENERGY] for k, a in frames.items()}
    assert dft["delta_e"]["+1"] == pytest.approx(e["vacancy_qp1"] - e["vacancy_q0"])
    # Freysoldt's correction from pp.x's planar-averaged potentials of the three cells
    dataset_node = next(n for n in node.called if n.process_label == "EmlipDatasetWorkChain")
    potentials = dataset_node.outputs.planar_potentials
    assert set(potentials) == {"pristine", "vacancy_q0", "vacancy_qp1"}
    grid = potentials["pristine"]["grid"]
    assert [len(potentials["vacancy_qp1"]["axes"][str(i)]) for i in range(3)] == grid
    assert analysis["correction"]["scheme"].startswith("Freysoldt")
    own = dft["correction"]["+1"]
    correction = own["total"]
    assert correction == pytest.approx(own["lattice"] + own["alignment"], abs=1e-9)
    assert analysis["correction"]["values"]["+1"] == pytest.approx(correction)
    # the lattice term of a 1-bohr Gaussian is the point-charge (Makov–Payne) term less its
    # finite-width part; the alignment is q times the mean of three axes' potential shifts
    assert own["lattice"] == pytest.approx(point_charge_correction(pristine.cell[:], 1.0, 2.5), rel=0.05)
    assert own["alignment"] == pytest.approx(np.mean(own["shifts"]), abs=1e-9)
    # V_Cl keeps the cube's symmetry: the three axes' planar averages, and so their shifts, agree
    assert np.ptp(own["shifts"]) < 1e-3, own["shifts"]
    assert 0.0 < abs(own["alignment"]) < 3.0  # eV; 1.05 measured (in the 8-atom cube nothing is far)
    assert dft["correction"]["0"]["total"] == 0.0
    # ε(+1/0) = E_f(0) − E_f(+1) at E_F = VBM
    level = dft["transition_levels"]["+1/0"]
    formation = dft["formation_energy_vbm"]
    assert level == pytest.approx(formation["0"] - formation["+1"])
    assert level == pytest.approx(e["vacancy_q0"] - e["vacancy_qp1"] - correction - edges["vbm"])
    # Hirshfeld charges: Σq = Q in every cell, and the profile's sum rule Σ Δq = q + q_Cl
    for key, q in (("pristine", 0.0), ("vacancy_q0", 0.0), ("vacancy_qp1", 1.0)):
        assert frames[key].arrays[schema.CHARGES].sum() == pytest.approx(q, abs=1e-6)
    for label, q in (("0", 0.0), ("+1", 1.0)):
        profile = dft["profiles"][label]
        assert profile["sum_delta_q"] == pytest.approx(q + profile["removed_charge"], abs=1e-6)
        # the six Na neighbours are three atoms in the 8-atom cube (±a/2 are images of one another)
        assert profile["shells"]["count"][0] == 3
    assert dft["charge_source"] == schema.CHARGES
    assert set(results["comparison"].get_dict()) == {"dft"}
    for name in ("formation_energy", "delta_e_parity", "charge_profile"):
        content = results["figures"][name].get_content(mode="rb")
        assert content[:4] == b"\x89PNG" and len(content) > 5000


def _train_charges_model(train_code, dataset):
    """A tiny ``charges`` model trained on the DFT labels of the vacancy run (the test's own data)."""
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.calculations.train import EmlipTrainCalculation
    from aiida_emlip.workflows.demo import design_config

    config = design_config({"name": "charges", "correction": "weighted"}, epochs=20)
    config["data"] = {"valid_fraction": 0.0, "test_fraction": 0.0, "batch_size": 3}
    config["model"]["backbone"].update(num_channels=4, num_interactions=1, mlp_hidden=4)
    builder = EmlipTrainCalculation.get_builder()
    builder.code = train_code
    builder.dataset = dataset
    builder.config = orm.Dict(config)
    builder.metadata.options = {"resources": {"num_machines": 1}, "max_wallclock_seconds": 600}
    results, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    return results["model"]


@pytest.fixture(scope="module")
def vacancy_with_models(
    chlorine_vacancy, pw_code, pp_code, pseudo_family, train_code, eval_code, tmp_path_factory
):
    """The same vacancy again, now with two models; pw.x and pp.x come from the cache of the first run."""
    from aiida import orm
    from aiida.engine import run_get_node
    from aiida.manage.caching import enable_caching

    from aiida_emlip.workflows.validate.defect import EmlipChargedDefectWorkChain

    first, _ = chlorine_vacancy
    models = {
        "pointcharge": _model_node(tmp_path_factory.mktemp("models"), ["Na", "Cl"], {"Na": 1.0, "Cl": -1.0}),
        "charges": _train_charges_model(train_code, first["dft_dataset"]),
    }
    builder = EmlipChargedDefectWorkChain.get_builder_from_protocol(
        pw_code,
        orm.StructureData(ase=nacl_cube()),
        "Cl",
        [0, 1],
        pseudo_family.label,
        protocol="fast",
        dft_overrides=CHEAP_DFT,
        supercell=[1, 1, 1],
        pp_code=pp_code,
        dielectric_constant=2.5,
        models=models,
        eval_code=eval_code,
    )
    # the trained model also relaxes the vacancy cells (the point charges alone would collapse them)
    builder.overrides = orm.Dict(
        {"relax_models": ["charges"], "relax_parameters": {"mode": "relax", "fmax": 0.1, "max_steps": 40}}
    )
    with enable_caching(identifier="aiida.calculations:quantumespresso.*"):
        return run_get_node(builder)


@pytest.mark.pw
def test_chlorine_vacancy_models(vacancy_with_models, chlorine_vacancy):
    from aiida_emlip.analysis.defects import MADELUNG_SIMPLE_CUBIC

    results, node = vacancy_with_models
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    from aiida.common.links import LinkType

    called = {
        link.link_label: link.node
        for link in node.base.links.get_outgoing(link_type=LinkType.CALL_WORK).all()
    }
    pw = [n for n in called["dft"].called_descendants if n.process_label == "PwCalculation"]
    assert pw and all(n.base.caching.is_created_from_cache for n in pw)
    assert set(results["predictions"]) == {"pointcharge", "charges"}
    # the formal-charge model only sees the cells whose formal charges add up: pristine and V_Cl⁺
    keys = {a.info["key"] for a in results["predictions"]["pointcharge"].to_ase()}
    assert keys == {"pristine", "vacancy_qp1"}
    comparison = results["comparison"].get_dict()
    assert set(comparison) == {"dft", "pointcharge", "charges"}
    assert comparison["pointcharge"]["missing_charge_states"] == ["0"]
    # exact: the point-charge model's E(+1) − E_host = α_M k_e / r₀ + E_M(+1) in the 5.64 Å cube
    point = results["analysis"]["methods"]["pointcharge"]["relative_energy"]["+1"]
    k_e, a = schema.COULOMB_CONSTANT, 5.64
    assert point == pytest.approx(
        1.7475645946 * k_e / (a / 2) - MADELUNG_SIMPLE_CUBIC * k_e / (2 * a), abs=1e-5
    )
    row = comparison["charges"]
    assert set(row["delta_e_error"]) == {"+1"} and np.isfinite(row["delta_e_error"]["+1"])
    assert np.isfinite(row["transition_level_error"]["+1/0"])
    assert set(row["delta_q_rmse"]) == {"0", "+1"}
    # the DFT numbers are those of the first run (same cells, cached pw.x)
    assert results["analysis"]["methods"]["dft"]["delta_e"] == pytest.approx(
        chlorine_vacancy[0]["analysis"]["methods"]["dft"]["delta_e"]
    )
    for name in ("formation_energy", "delta_e_parity", "charge_profile"):
        assert len(results["figures"][name].get_content(mode="rb")) > 5000
    # the trained model relaxes the vacancy cells; DFT single points at its geometries. In the 8-atom
    # cube every atom sits on an inversion centre of the vacancy's periodic images: the forces vanish
    # by symmetry, nothing moves, and both paths must give the unrelaxed numbers exactly
    assert set(results["relaxed"]) == {"charges"}
    relaxed = results["relaxed_comparison"].get_dict()["charges"]
    assert set(relaxed["states"]) == {"0", "1"} and not relaxed["missing"]
    for state in relaxed["states"].values():
        assert state["max_displacement"] < 1e-6 and state["relax_converged"]
        assert state["model_relaxation_energy"] == pytest.approx(0.0, abs=1e-8)
        assert state["dft_energy_change"] == pytest.approx(0.0, abs=1e-6)
    assert relaxed["delta_e"]["1"]["error"] == pytest.approx(row["delta_e_error"]["+1"], abs=1e-6)
    assert len(results["relaxed_dft_dataset"].to_ase()) == 2


def test_formal_charge_models_see_only_representable_cells():
    from aiida_emlip.workflows.validate.evaluate import representable

    formal = {"Na": 1.0, "Cl": -1.0}
    symbols = ["Na"] * 4 + ["Cl"] * 3
    assert representable(symbols, 1.0, formal) and not representable(symbols, 0.0, formal)
    assert representable(symbols, 0.0, None)  # heads without formal charges take any total charge
