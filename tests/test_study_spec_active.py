"""The ``active_learning`` block of a study spec: defaults, and every problem with its line."""

from __future__ import annotations

import textwrap

import pytest

from aiida_emlip.spec import SpecError, parse_spec

BASE = textwrap.dedent(
    """\
    name: tiny
    budget: {max_dft_configurations: 12}
    systems:
      water:
        structure: {molecule: H2O, box: 8.0}
        rattle: {n: 3, stdev: 0.05}
        charges: [0, 1]
        isolated: true
    designs: [sr, charges, qeq]
    training: {epochs: 2}
    """
)


def _problems(text: str) -> dict[str, tuple[int, str]]:
    with pytest.raises(SpecError) as info:
        parse_spec(text, "al.yaml")
    assert "Traceback" not in info.value.format()
    return {p.path: (p.line, p.message) for p in info.value.problems}


def test_without_the_block_the_spec_has_no_key():
    assert "active_learning" not in parse_spec(BASE, "al.yaml")


def test_the_documented_block_and_its_defaults():
    spec = parse_spec(
        BASE
        + textwrap.dedent(
            """\
            active_learning:
              rounds: 2
              model: best
              committee: 3
              selection: committee
              md: {temperature: 600, steps: 200, interval: 10, timestep: 0.5}
              per_round: 3
              target_error: 5.0
            """
        ),
        "al.yaml",
    )
    block = spec["active_learning"]
    assert block["rounds"] == 2 and block["committee"] == 3 and block["per_round"] == 3
    assert block["target_error"] == 5.0 and block["uncertainty"] == "energy"
    assert block["md"] == {
        "temperature": 600.0,
        "steps": 200,
        "interval": 10,
        "timestep": 0.5,
        "ensemble": "langevin",
        "seed": 0,
    }
    assert block["min_spacing"] == 20  # two frames apart by default
    minimal = parse_spec(BASE + "active_learning: {}\n", "al.yaml")["active_learning"]
    assert minimal["rounds"] == 1 and minimal["model"] == "best" and minimal["per_round"] == 4
    assert minimal["md"]["steps"] == 100 and minimal["min_spacing"] == 20 and "target_error" not in minimal


def test_scf_failures_with_a_self_consistent_design():
    spec = parse_spec(BASE + "active_learning: {selection: scf_failures, model: qeq}\n", "al.yaml")
    assert spec["active_learning"]["selection"] == "scf_failures"


def test_bad_block_reports_every_problem_with_its_line():
    text = BASE + textwrap.dedent(
        """\
        active_learning:
          rounds: 0
          model: mace
          committee: 1
          selection: greedy
          colour: red
          md:
            temperature: -5
            steps: 20
            interval: 50
            thermostat: nose
          per_round: 2
          target_error: 0
          min_spacing: 0
        """
    )
    problems = _problems(text)
    assert problems["active_learning.rounds"] == (12, "must be at least 1")
    assert (
        problems["active_learning.model"][0] == 13
        and "'best' or a design: sr, charges, qeq" in (problems["active_learning.model"][1])
    )
    assert problems["active_learning.selection"] == (15, "choose from committee, scf_failures")
    assert (
        problems["active_learning.colour"][0] == 16 and "unknown key" in problems["active_learning.colour"][1]
    )
    assert problems["active_learning.md.temperature"] == (18, "must be positive (K)")
    assert (
        problems["active_learning.md.interval"][0] == 20
        and "larger than md.steps" in (problems["active_learning.md.interval"][1])
    )
    assert problems["active_learning.md.thermostat"][0] == 21
    assert problems["active_learning.target_error"] == (23, "must be positive (meV/atom)")
    assert problems["active_learning.min_spacing"] == (24, "must be at least 1 (MD steps)")
    # the committee size is checked once the selection is one that uses it
    committee = _problems(BASE + "active_learning:\n  committee: 1\n  per_round: 2\n")
    assert committee == {
        "active_learning.committee": (12, "a committee needs at least 2 members (seeds)"),
    }


def test_wrong_types_and_scf_failures_without_a_self_consistent_head():
    problems = _problems(BASE + "active_learning: {rounds: two, md: fast, per_round: 2}\n")
    assert problems["active_learning.rounds"] == (11, "must be an integer, got a string")
    assert problems["active_learning.md"] == (11, "must be a mapping, got a string")
    problems = _problems(BASE + "active_learning: {selection: scf_failures, model: charges, per_round: 2}\n")
    assert "charges is charges" in problems["active_learning.model"][1]
    only_sr = BASE.replace("designs: [sr, charges, qeq]", "designs: [sr]")
    problems = _problems(only_sr + "active_learning: {selection: scf_failures, per_round: 2}\n")
    assert "needs a design with a self-consistent head" in problems["active_learning.selection"][1]


def test_the_budget_must_leave_room_for_a_round():
    # 6 configurations planned, a budget of 12: six pw.x runs left
    assert (
        parse_spec(BASE + "active_learning: {per_round: 6}\n", "al.yaml")["active_learning"]["per_round"] == 6
    )
    problems = _problems(BASE + "active_learning:\n  per_round: 7\n")
    line, message = problems["active_learning.per_round"]
    assert line == 12
    assert message == "the budget (12) leaves 6 pw.x runs after the study's 6: not enough for one round of 7"


def test_warm_start_keys_defaults_and_problems():
    minimal = parse_spec(BASE + "active_learning: {}\n", "al.yaml")["active_learning"]
    assert minimal["warm_start"] is True and "retrain_epochs" not in minimal
    given = parse_spec(BASE + "active_learning: {warm_start: false, retrain_epochs: 5}\n", "al.yaml")
    assert given["active_learning"]["warm_start"] is False and given["active_learning"]["retrain_epochs"] == 5
    problems = _problems(BASE + "active_learning:\n  warm_start: yes please\n  retrain_epochs: 0\n")
    assert problems == {
        "active_learning.warm_start": (12, "must be true or false, got a string"),
        "active_learning.retrain_epochs": (13, "must be at least 1"),
    }
    assert parse_spec(BASE + "active_learning: {retrain_lr: 0.002}\n", "al.yaml")["active_learning"][
        "retrain_lr"
    ] == pytest.approx(0.002)
    problems = _problems(BASE + "active_learning:\n  retrain_lr: -1\n")
    assert problems == {"active_learning.retrain_lr": (12, "must be positive")}
    problems = _problems(BASE + "active_learning:\n  warm_start: false\n  retrain_lr: 0.001\n")
    assert problems == {
        "active_learning.retrain_lr": (13, "applies to warm-started retrainings: warm_start is false")
    }


def test_warm_learning_rate_resets_every_rate():
    """The optimizer's rate and every stage's reset take retrain_lr; a scheduler floor above it drops."""
    from aiida_emlip.spec_active import warm_learning_rate

    config = {
        "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.0},
        "scheduler": {"name": "cosine", "min_lr": 0.005},
        "stages": [{"epochs": 4}, {"epochs": 2, "lr": 0.003}],
    }
    warm = warm_learning_rate(config, 0.002)
    assert warm["optimizer"] == {"name": "adamw", "lr": 0.002, "weight_decay": 0.0}
    assert warm["scheduler"] == {"name": "cosine", "min_lr": 0.002}
    assert warm["stages"] == [{"epochs": 4}, {"epochs": 2, "lr": 0.002}]
    assert config["optimizer"]["lr"] == 0.01 and config["stages"][1]["lr"] == 0.003  # not changed
    low = warm_learning_rate({"scheduler": {"name": "cosine", "min_lr": 1e-5}}, 0.002)
    assert low["scheduler"]["min_lr"] == 1e-5 and low["optimizer"] == {"lr": 0.002}


def test_retraining_configs_of_a_round():
    """retrain_epochs: a preset shares them among its stages, a config design's stages are scaled; the
    previous model's architecture is compared with the retraining's config."""
    from types import SimpleNamespace

    from aiida_emlip.spec_active import scaled_stages
    from aiida_emlip.workflows.study_active import ActiveLearningSteps

    assert [s["epochs"] for s in scaled_stages([{"epochs": 10}, {"epochs": 20}], 9)] == [3, 6]
    assert [s["epochs"] for s in scaled_stages([{"epochs": 1}, {"epochs": 99}], 4)] == [0, 4]
    assert scaled_stages([{"name": "a", "epochs": 10, "scf_mode": "direct"}], 3) == [
        {"name": "a", "epochs": 3, "scf_mode": "direct"}
    ]

    spec = parse_spec(BASE + "active_learning: {}\n", "al.yaml")
    spec["designs"]["own"] = {"config": {"model": {"head": {"name": "sr"}}, "stages": [{"epochs": 4}] * 2}}
    dataset = SimpleNamespace(elements=["H", "O"], label_keys=["energy", "forces", "ref_charges"])
    steps = ActiveLearningSteps()
    steps.ctx = SimpleNamespace(spec=spec, al_merged=dataset, held_out=dataset)
    scf = steps._retrain_design("qeq", 6)["config"]
    assert sum(s["epochs"] for s in scf["stages"]) == 6 and scf["model"]["elements"] == ["H", "O"]
    assert scf["scheduler"] == {"name": "cosine", "min_lr": 1e-4}
    assert [s["epochs"] for s in steps._retrain_design("own", 3)["config"]["stages"]] == [2, 1]
    assert [s["epochs"] for s in steps._retrain_design("sr", None)["config"]["stages"]] == [2]

    config = steps._retrain_design("sr", 1)["config"]
    model = SimpleNamespace(
        base=SimpleNamespace(attributes={"elements": ["H", "O"], "config": dict(config["model"])})
    )
    assert steps._architecture_change(model, config) == ""
    backbone = {**config["model"]["backbone"], "r_max": 5.0}
    wider = {**config, "model": {**config["model"], "backbone": backbone}}
    assert steps._architecture_change(model, wider) == "model.backbone.r_max (init model 4.0, config 5.0)"
