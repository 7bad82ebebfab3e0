"""Two active-learning rounds of a tiny study with real pw.x: MD, committee, new DFT labels, retraining
(warm-started from the round before, the committee too)."""

from __future__ import annotations

import numpy as np
import pytest

#: Three rattled water molecules (one held out), one design, a committee of two, short MD, two rounds.
ACTIVE_SPEC = """\
name: tiny-active
dft:
  protocol: fast
  max_concurrent: 2
  overrides: {ecutwfc: 20.0, ecutrho: 160.0, conv_thr_per_atom: 1.0e-8, max_iterations: 1}
budget: {max_dft_configurations: 7}
systems:
  water:
    structure: {molecule: H2O, box: 8.0}
    rattle: {n: 3, stdev: 0.05}
    charges: [0]
    isolated: true
split: {held_out_fraction: 0.3, seed: 0}
training:
  epochs: 3
  backbone: {num_channels: 4, max_L: 0, max_ell: 1, correlation: 1, num_interactions: 1, r_max: 3.5,
             mlp_hidden: 4}
  options: {environment_variables: {OMP_NUM_THREADS: "1"}}
designs: [sr]
active_learning:
  rounds: 2
  model: best
  committee: 2
  selection: committee
  md: {temperature: 600, steps: 20, interval: 5, timestep: 0.5}
  min_spacing: 5
  per_round: 2
  target_error: 0.001
  retrain_epochs: 2
  retrain_lr: 0.002
"""
PER_ROUND = 2


@pytest.fixture(scope="module")
def active_study(pw_code, pseudo_family, train_code, eval_code):
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.spec import parse_spec
    from aiida_emlip.workflows.study import EmlipStudyWorkChain

    spec = parse_spec(ACTIVE_SPEC, "tiny-active.yaml")
    builder = EmlipStudyWorkChain.get_builder()
    builder.spec = orm.Dict(spec)
    builder.spec_text = orm.Str(ACTIVE_SPEC)
    builder.pw_code, builder.train_code, builder.eval_code = pw_code, train_code, eval_code
    _, node = run_get_node(builder)
    return node


def _child(node, label: str):
    found = [link.node for link in node.base.links.get_outgoing().all() if link.link_label == label]
    assert len(found) == 1, (label, [link.link_label for link in node.base.links.get_outgoing().all()])
    return found[0]


@pytest.mark.pw
@pytest.mark.slow
def test_rounds_label_the_most_uncertain_md_frames(active_study):
    from aiida import orm

    node = active_study
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    record = node.outputs.active_learning.get_dict()
    assert record["model"] == "sr" and record["rounds_run"] == 2
    assert record["stop_reason"] == "rounds spent (2)"
    assert record["dft_calls"] == 2 * PER_ROUND and record["dft_available"] == 4  # 7 − 3 planned

    # the training set grew by per_round labelled configurations; the held-out set never entered it
    split = node.outputs.split.get_dict()
    initial = set(split["training_keys"])
    final = node.outputs.training_set.to_ase()
    added = [a for a in final if a.info["key"] not in initial]
    assert len(final) == len(initial) + 2 * PER_ROUND and len(added) == 2 * PER_ROUND
    assert not {a.info["key"] for a in final} & set(split["held_out_keys"])
    assert all(np.isfinite(a.info["energy"]) and "forces" in a.arrays for a in added)

    # they came from the MD: the positions of the chosen trajectory frames, started from training structures
    (round0, round1, round2) = record["rounds"]
    for number, entry in ((1, round1), (2, round2)):
        trajectory = orm.load_node(entry["md"]["trajectory"]).to_ase()
        assert _child(node, f"al{number}_md").outputs.trajectory.uuid == entry["md"]["trajectory"]
        chosen = {row["key"]: row for row in entry["selected"]}
        mine = [a for a in added if a.info["al_round"] == number]
        assert set(chosen) == {a.info["key"] for a in mine} and len(mine) == PER_ROUND
        for atoms in mine:
            row = chosen[atoms.info["key"]]
            frame = trajectory[row["index"]]
            assert frame.info["md_step"] == row["md_step"] == atoms.info["al_md_step"] > 0
            assert frame.info["key"] == row["source"] == atoms.info["al_source"]
            assert np.allclose(frame.positions, atoms.positions, atol=1e-6)
    assert {row["source"] for row in round1["selected"]} <= initial

    # the chosen frames disagree at least as much as every frame left out (no spacing exclusions here)
    candidates = round1["candidates"]
    assert len(candidates) == 2 * 4  # two MD runs, frames at steps 5, 10, 15, 20
    statuses = {row["status"] for row in candidates}
    assert statuses == {"selected", "not_selected"}
    picked = [row["energy_std"] for row in candidates if row["status"] == "selected"]
    others = [row["energy_std"] for row in candidates if row["status"] == "not_selected"]
    assert len(picked) == PER_ROUND and min(picked) >= max(others) and max(picked) > 0
    assert round1["uncertainty"]["selected_min"] == min(picked)

    # held-out errors of every design per round, and the retrained model is the study's model
    rounds = (round0, round1, round2)
    assert all(entry["test_error"]["sr"]["energy"] > 0 for entry in rounds)
    assert record["model_energy_error"] == [entry["test_error"]["sr"]["energy"] for entry in rounds]
    sizes = [len(initial), len(initial) + PER_ROUND, len(final)]
    assert [entry["training_size"] for entry in rounds] == sizes
    assert node.outputs.models.sr.uuid == round2["models"]["sr"] != round1["models"]["sr"]
    assert round1["models"]["sr"] != round0["models"]["sr"]
    assert len(round1["committee"]) == 2 and round1["committee"][0] == round0["models"]["sr"]
    assert len(round2["committee"]) == 2 and round2["committee"][0] == round1["models"]["sr"]
    # each retraining started from the model of the round before (warm_start by default), for
    # retrain_epochs at retrain_lr
    for number, (before, entry) in enumerate(((round0, round1), (round1, round2)), start=1):
        assert entry["warm_start"] == {"sr": before["models"]["sr"]} and entry["retrain_epochs"] == {"sr": 2}
        (retrain,) = _child(_child(node, f"al{number}_training"), "train_sr").called
        assert retrain.inputs.initial_model.uuid == before["models"]["sr"]
        assert retrain.inputs.config.get_dict()["optimizer"]["lr"] == pytest.approx(0.002)
    # the committee's other seed: from scratch in round 1, from its own round-1 model in round 2
    assert round1["committee_warm_start"] == {"sr_seed1": None}
    assert round2["committee_warm_start"] == {"sr_seed1": round1["committee"][1]}
    first, second = (_child(_child(node, f"al{n}_committee"), "train_sr_seed1").called[0] for n in (1, 2))
    assert "initial_model" not in first.inputs and first.inputs.config.get_dict()["seed"] == 1
    assert second.inputs.initial_model.uuid == round1["committee"][1]
    assert second.inputs.config.get_dict()["seed"] == 1
    assert second.inputs.config.get_dict()["optimizer"]["lr"] == pytest.approx(0.002)
    metrics = node.outputs.metrics.sr.get_dict()
    assert metrics["epochs"] == 2 and metrics["init_from"]["sha256"] == retrain.inputs.initial_model.sha256
    # the final held-out predictions are those of the last round (not evaluated twice)
    assert node.outputs.predictions.sr.uuid == _child(node, "al2_evaluate_sr").outputs.predictions.uuid
    comparison = node.outputs.comparison.get_dict()
    assert comparison["active_learning"]["rounds_run"] == 2
    assert any(
        line.startswith("Active learning (committee of 2 sr models): 2 rounds, 4 configurations")
        for line in comparison["verdict"]
    ), comparison["verdict"]
