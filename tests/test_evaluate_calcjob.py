"""``emlip.evaluate``: emlip-eval as an AiiDA calculation on localhost, and its parser's exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from evaluate_helpers import charged_cluster, nacl_cell, save_tiny_model, water

from aiida_emlip.models.calculator import EmlipCalculator


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("eval-models")
    return {head: save_tiny_model(directory, head) for head in ("charges", "scf-stuck")}


@pytest.fixture(scope="module")
def model_nodes(aiida_profile, model_files):
    from aiida_emlip.data.model import EmlipModelData

    return {head: EmlipModelData(path).store() for head, path in model_files.items()}


def _builder(eval_code, model, parameters=None, dataset=None, structures=None, conditions=None):
    from aiida.orm import Dict, StructureData

    from aiida_emlip.calculations.evaluate import EmlipEvaluateCalculation
    from aiida_emlip.data.dataset import EmlipDatasetData

    builder = EmlipEvaluateCalculation.get_builder()
    builder.code = eval_code
    builder.model = model
    if dataset is not None:
        builder.dataset = EmlipDatasetData.from_ase(dataset)
    if structures is not None:
        builder.structures = {label: StructureData(ase=atoms) for label, atoms in structures.items()}
    if conditions is not None:
        builder.conditions = Dict(conditions)
    if parameters is not None:
        builder.parameters = Dict(parameters)
    builder.metadata.options.max_wallclock_seconds = 600
    return builder


# ------------------------------------------------------------------------------- real runs


def test_single_point_from_a_dataset_and_caching(eval_code, model_nodes, model_files):
    from aiida.engine import run_get_node
    from aiida.manage.caching import enable_caching

    from aiida_emlip.calculations.evaluate import EmlipEvaluateCalculation

    frames = [nacl_cell(), charged_cluster()]
    builder = _builder(eval_code, model_nodes["charges"], {"device": "cpu"}, dataset=frames)
    results, node = run_get_node(builder)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    predictions = results["predictions"]
    attributes = predictions.base.attributes
    assert attributes.get("model_uuid") == model_nodes["charges"].uuid
    assert attributes.get("eval_mode") == "single_point"
    assert attributes.get("model_sha256") == model_nodes["charges"].sha256
    assert node.base.attributes.get("cache_version") == {"calc_job": EmlipEvaluateCalculation.CACHE_VERSION}
    assert "trajectory" not in results
    calc = EmlipCalculator(model_files["charges"], device="cpu")
    for atoms, pred in zip(frames, predictions.to_ase()):
        atoms = atoms.copy()
        atoms.calc = calc
        assert pred.info["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(pred.arrays["forces"], atoms.get_forces(), atol=1e-7)
        assert pred.info["eval_mode"] == "single_point"
    summary = results["summary"].get_dict()
    assert summary["n_structures"] == 2 and summary["parameters"]["device"] == "cpu"
    # same inputs → the second calculation is taken from the cache
    with enable_caching(identifier="aiida.calculations:emlip.evaluate"):
        again = _builder(eval_code, model_nodes["charges"], {"device": "cpu"})
        again.dataset = node.inputs.dataset
        _, cached = run_get_node(again)
    assert cached.base.caching.is_created_from_cache and cached.is_finished_ok


def test_relax_of_a_structure_namespace_with_conditions(eval_code, model_nodes):
    from aiida.engine import run_get_node

    structures = {"cluster": charged_cluster(), "water": water()}
    conditions = {"cluster": {"total_charge": 1.0, "external_field": [0.0, 0.0, 0.05]}}
    parameters = {"mode": "relax", "device": "cpu", "fmax": 0.05, "max_steps": 300, "trajectory_stride": 10}
    results, node = run_get_node(
        _builder(eval_code, model_nodes["charges"], parameters, None, structures, conditions)
    )
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    relaxed = {atoms.info["key"]: atoms for atoms in results["predictions"].to_ase()}
    assert set(relaxed) == {"cluster", "water"}
    cluster = relaxed["cluster"]
    assert cluster.info["total_charge"] == 1.0 and cluster.info["relax_converged"] is True
    np.testing.assert_allclose(cluster.info["external_field"], [0.0, 0.0, 0.05])
    assert cluster.arrays["ref_charges"].sum() == pytest.approx(1.0, abs=1e-6)
    assert relaxed["water"].arrays["ref_charges"].sum() == pytest.approx(0.0, abs=1e-6)
    assert np.sqrt((cluster.arrays["forces"] ** 2).sum(axis=1)).max() < 0.05
    trajectory = results["trajectory"]
    assert trajectory.base.attributes.get("eval_mode") == "relax" and len(trajectory) >= 4
    rows = results["summary"]["structures"]
    assert all(row["relax"]["final_energy"] < row["relax"]["initial_energy"] for row in rows)


def test_md_trajectory_and_drift(eval_code, model_nodes):
    from aiida.engine import run_get_node

    parameters = {"mode": "md", "device": "cpu", "steps": 20, "timestep_fs": 0.25, "trajectory_stride": 10}
    results, node = run_get_node(
        _builder(eval_code, model_nodes["charges"], parameters, dataset=[charged_cluster()])
    )
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    steps = [atoms.info["md_step"] for atoms in results["trajectory"].to_ase()]
    assert steps == [0, 10, 20]
    md = results["summary"]["structures"][0]["md"]
    assert abs(md["energy_drift_eV_per_atom_per_ps"]) < 5e-3


def test_scf_not_converged_fails_with_outputs_attached(eval_code, model_nodes):
    from aiida.engine import run_get_node

    results, node = run_get_node(
        _builder(eval_code, model_nodes["scf-stuck"], {"device": "cpu"}, dataset=[water()])
    )
    assert node.exit_status == 340, node.exit_message
    (atoms,) = results["predictions"].to_ase()
    assert atoms.info["scf_converged"] is False
    assert results["summary"]["n_scf_not_converged"] == 1


def test_bad_inputs_are_refused_before_submission(eval_code, model_nodes):
    from aiida.engine import run_get_node
    from ase import Atoms

    model = model_nodes["charges"]
    fluorine = [Atoms("FH", positions=[[0, 0, 0], [0, 0, 0.9]])]
    cases = [
        ((model, {"mode": "md", "fmax": 0.1}, [water()]), "applies to mode relax"),
        ((model, {"mode": "relax"}), "either 'dataset'"),
        ((model, None, [water()], {"w": water()}), "either 'dataset'"),
        ((model, None, None, {"w": water()}, {"x": {"total_charge": 1}}), "not a label"),
        ((model, None, None, {"w": water()}, {"w": {"charge": 1}}), "unknown key"),
        ((model, None, None, {"w": water()}, {"w": {"external_field": 1.0}}), "3-vector"),
        ((model, None, [water()], None, {"w": {"total_charge": 1}}), "carries its own"),
        ((model, None, fluorine), "does not know"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            run_get_node(_builder(eval_code, *args))


# ------------------------------------------------------------------------------- parser


def _predictions_text(**info) -> str:
    from aiida_emlip.extxyz import frames_to_text

    atoms = water()
    atoms.info.update({"energy": -1.0, "eval_mode": "single_point", **info})
    atoms.arrays["forces"] = np.zeros((3, 3))
    return frames_to_text([atoms])


def _summary(**counts) -> str:
    values = {"mode": "single_point", "n_non_finite": 0, "n_scf_not_converged": 0, "n_relax_not_converged": 0}
    values.update(counts)
    return json.dumps({**values, "structures": [{"index": 0, "energy": float("nan")}]})


def _parse(model, files: dict[str, str]):
    """Run the parser on a calculation node whose retrieved folder holds ``files`` (a mock of emlip-eval)."""
    from aiida import orm
    from aiida.common.links import LinkType
    from aiida.orm import load_computer

    from aiida_emlip.parsers.evaluate import EmlipEvaluateParser

    node = orm.CalcJobNode(
        computer=load_computer("localhost"), process_type="aiida.calculations:emlip.evaluate"
    )
    node.set_option("resources", {"num_machines": 1})
    node.base.links.add_incoming(model, LinkType.INPUT_CALC, "model")
    node.store()
    retrieved = orm.FolderData()
    for name, content in files.items():
        retrieved.base.repository.put_object_from_bytes(content.encode(), name)
    retrieved.base.links.add_incoming(node, LinkType.CREATE, "retrieved")
    retrieved.store()
    results, calcfunction = EmlipEvaluateParser.parse_from_node(node, store_provenance=False)
    return results, calcfunction.exit_status, calcfunction.exit_message


OK_FILES = {"exit_status": "0\n", "predictions.xyz": _predictions_text(), "summary.json": _summary()}


@pytest.mark.parametrize(
    ("files", "status", "attached"),
    [
        pytest.param(OK_FILES, 0, {"predictions", "summary"}, id="ok"),
        pytest.param(
            {**OK_FILES, "trajectory.xyz": _predictions_text()},
            0,
            {"predictions", "summary", "trajectory"},
            id="ok-trajectory",
        ),
        pytest.param({"predictions.xyz": _predictions_text()}, 300, set(), id="no-exit-status"),
        pytest.param(
            {"exit_status": "0\n", "summary.json": _summary()}, 301, set(), id="missing-predictions"
        ),
        pytest.param(
            {**OK_FILES, "predictions.xyz": _predictions_text(colour="red")},
            302,
            set(),
            id="invalid-predictions",
        ),
        pytest.param({**OK_FILES, "summary.json": "{not json"}, 302, set(), id="invalid-summary"),
        pytest.param({"exit_status": "2\n"}, 310, set(), id="bad-input"),
        pytest.param(
            {**OK_FILES, "exit_status": "3\n", "summary.json": _summary(n_non_finite=1)},
            320,
            {"predictions", "summary"},
            id="non-finite",
        ),
        pytest.param({"exit_status": "4\n"}, 330, set(), id="interrupted"),
        pytest.param(
            {
                **OK_FILES,
                "exit_status": "5\n",
                "predictions.xyz": _predictions_text(scf_converged=False),
                "summary.json": _summary(n_scf_not_converged=1),
            },
            340,
            {"predictions", "summary"},
            id="scf-not-converged",
        ),
        pytest.param(
            {**OK_FILES, "summary.json": _summary(n_scf_not_converged=1)},
            340,
            {"predictions", "summary"},
            id="scf-flag-despite-status-0",
        ),
        pytest.param(
            {**OK_FILES, "exit_status": "6\n", "summary.json": _summary(n_relax_not_converged=2)},
            341,
            {"predictions", "summary"},
            id="relax-not-converged",
        ),
        pytest.param({"exit_status": "1\n"}, 350, set(), id="internal-error"),
        pytest.param({"exit_status": "137\n"}, 350, set(), id="killed"),
    ],
)
def test_parser_exit_codes(eval_code, model_nodes, files, status, attached):  # eval_code: localhost
    results, exit_status, message = _parse(model_nodes["charges"], files)
    assert exit_status == status, message
    assert set(results) == attached
    if "predictions" in results:
        assert results["predictions"].base.attributes.get("model_uuid") == model_nodes["charges"].uuid
    if status == 340:
        assert "scf_converged=False" in message
    if "summary" in results:
        assert results["summary"]["structures"][0]["energy"] is None  # NaN is stored as None


@pytest.mark.parametrize(
    ("files", "status", "quoted"),
    [
        pytest.param(
            {
                "exit_status": "2\n",
                "stderr": "warning: something else\nerror: model.safetensors is corrupted: the checksum "
                "of its weights and header does not match the one stored when it was saved\n",
            },
            310,
            "model.safetensors is corrupted: the checksum",
            id="corrupted-model",
        ),
        pytest.param(
            {"exit_status": "2\n", "stderr": "error: structures.xyz, structure 3: overlapping atoms\n"},
            310,
            "structure 3: overlapping atoms",
            id="overlapping-atoms",
        ),
        pytest.param({"exit_status": "2\n"}, 310, "see the stderr", id="no-stderr"),
        pytest.param(
            {
                **OK_FILES,
                "exit_status": "3\n",
                "summary.json": _summary(n_non_finite=1),
                "stderr": "error: non-finite (NaN or inf) predictions for structure 0: energy, forces; ...\n",
            },
            320,
            "structure 0: energy, forces",
            id="non-finite",
        ),
    ],
)
def test_parser_quotes_the_error_of_emlip_eval(eval_code, model_nodes, files, status, quoted):
    """A refused model file, overlapping atoms or a NaN prediction: the exit message says which."""
    _, exit_status, message = _parse(model_nodes["charges"], files)
    assert exit_status == status and quoted in message, message
