"""End to end in AiiDA: real pw.x labels → ``emlip.dataset`` → two trained designs → comparison."""

from __future__ import annotations

import math

import pytest

from aiida_emlip.workflows.demo import demo_configurations, training_builder


def test_demo_configurations_repeat_geometries_in_three_charge_states():
    configs = demo_configurations(n_geometries=2)
    assert len(configs) == 3 * (2 + 1)
    by_geometry: dict[str, set[float]] = {}
    for name, atoms, charge in configs:
        by_geometry.setdefault(name.split("_")[0], set()).add(charge)
        assert atoms.pbc.all() and atoms.cell.volume == pytest.approx(9.0**3)
    assert all(charges == {-1.0, 0.0, 1.0} for charges in by_geometry.values())


def test_builder_carries_the_concrete_dft_settings_and_checks_train_options(
    pw_code, pseudo_family, train_code
):
    """The dataset namespace gets the dataset builder's protocol_inputs; nproc_per_node is checked when
    train_options are set, before anything runs."""
    from aiida import orm

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain
    from aiida_emlip.workflows.demo import DFT_OVERRIDES

    builder = training_builder(pw_code, train_code, pseudo_family.label, epochs=3, n_geometries=1)
    concrete = builder.dataset.protocol_inputs.get_dict()
    assert concrete == EmlipDatasetWorkChain.get_protocol_inputs("fast", DFT_OVERRIDES)
    builder.train_options = orm.Dict({"nproc_per_node": 2, "max_wallclock_seconds": 600})
    with pytest.raises(ValueError, match="train_options: nproc_per_node must be at least 1, got 0"):
        builder.train_options = orm.Dict({"nproc_per_node": 0})


@pytest.mark.slow
@pytest.mark.pw
def test_dft_to_models(pw_code, pseudo_family, train_code):
    from aiida.engine import run_get_node

    from aiida_emlip.data.model import EmlipModelData

    builder = training_builder(pw_code, train_code, pseudo_family.label, epochs=3, n_geometries=2)
    results, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_status
    frames = results["training_set"].to_ase()
    assert len(frames) == 9
    # MT isolation: the labels are for molecules in open space, stored as non-periodic
    assert not any(atoms.pbc.any() for atoms in frames)
    energies = {a.info["key"]: a.info["energy"] for a in frames}
    # adding an electron to neutral NaCl releases energy (positive electron affinity), removing one costs
    assert energies["nacl0_qm1"] < energies["nacl0_q0"] < energies["nacl0_qp1"]
    assert set(results["models"]) == {"sr", "charges"}
    for label, model in results["models"].items():
        assert isinstance(model, EmlipModelData) and model.head_name == label
        assert (
            model.base.links.get_incoming().first().node.inputs.dataset.uuid == results["training_set"].uuid
        )
    table = results["comparison"].get_dict()["test"]
    assert set(table) == {"sr", "charges"}
    for label in ("sr", "charges"):
        # the comparison carries each design's own test errors, overall and per charge state
        reported = results["metrics"][label].get_dict()["test"]["energy"]
        row = table[label]["energy"]
        assert row["all"]["rmse"] == reported["all"]["rmse"]
        assert math.isfinite(row["all"]["rmse"]) and row["all"]["rmse"] > 0.0
        charge_rows = {group for group in row if group.startswith("total_charge=")}
        assert charge_rows and charge_rows == {g for g in reported if g.startswith("total_charge=")}


def test_designs_are_checked_before_any_dft_or_training(train_code):
    """A design with an unknown head option is refused by the designs port (so before the dataset's
    pw.x runs); with a given training set every design is checked on it (as emlip-train --check) and a
    refused one stops the workchain with 201 before any design is submitted."""
    from pathlib import Path

    from aiida.engine import run_get_node
    from aiida.orm import Dict

    from aiida_emlip.data.dataset import EmlipDatasetData
    from aiida_emlip.workflows.training import EmlipTrainingWorkChain

    good = {
        "seed": 0,
        "device": "cpu",
        "data": {"batch_size": 4},
        "model": {
            "backbone": {"num_channels": 4, "num_interactions": 1, "r_max": 4.0},
            "head": {"name": "sr"},
        },
        "stages": [{"name": "main", "epochs": 1}],
    }
    builder = EmlipTrainingWorkChain.get_builder()
    with pytest.raises(ValueError, match=r"designs.bad: config: model: unknown option\(s\) \['colour'\]"):
        builder.designs = Dict(
            {"sr": good, "bad": {**good, "model": {**good["model"], "head": {"name": "sr", "colour": 1}}}}
        )
    builder.training_set = EmlipDatasetData.from_extxyz(Path(__file__).parent / "data" / "tiny.xyz")
    builder.train_code = train_code
    fixed = {"name": "fixed", "formal_charges": {"H": 1.0, "O": -2.0, "Na": 1.0, "Cl": -1.0}}
    builder.designs = Dict({"sr": good, "fixed": {**good, "model": {**good["model"], "head": fixed}}})
    _, node = run_get_node(builder)
    assert node.exit_status == 201, (node.exit_status, node.exit_message)
    assert "fixed:" in node.exit_message and "cannot represent" in node.exit_message
    assert "sr:" not in node.exit_message and not node.called
