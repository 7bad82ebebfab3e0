"""EmlipStudyWorkChain end to end with real pw.x: split, two designs, held-out errors, report in chromium."""

from __future__ import annotations

import re

import pytest
from study_helpers import TINY_SPEC, chromium, console_errors, render_in_chromium


@pytest.fixture(scope="module")
def tiny_study(pw_code, pseudo_family, train_code, eval_code):
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.spec import parse_spec
    from aiida_emlip.workflows.study import EmlipStudyWorkChain

    spec = parse_spec(TINY_SPEC, "tiny.yaml")
    builder = EmlipStudyWorkChain.get_builder()
    builder.spec = orm.Dict(spec)
    builder.spec_text = orm.Str(TINY_SPEC)
    builder.pw_code, builder.train_code, builder.eval_code = pw_code, train_code, eval_code
    _, node = run_get_node(builder)
    return node


@pytest.mark.pw
@pytest.mark.slow
def test_tiny_study_outputs(tiny_study):
    node = tiny_study
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    split = node.outputs.split.get_dict()
    held, trained = set(split["held_out_keys"]), set(split["training_keys"])
    assert held and trained and not held & trained
    # whole geometries are held out: both charge states of a held-out geometry
    assert {k.rsplit("_q", 1)[0] for k in held} == set(split["held_out_geometries"])
    training_keys = {a.info["key"] for a in node.outputs.training_set.to_ase()}
    assert training_keys == trained
    assert all(uuid for uuid in split["held_out_structures"].values())
    comparison = node.outputs.comparison.get_dict()
    assert set(comparison["designs"]) == {"sr", "charges"}
    row = comparison["designs"]["charges"]
    assert row["held_out"]["energy"]["total_charge=+1"]["n"] == 1
    assert row["training"]["epochs"] == 3 and row["cost_per_md_step_ms"] > 0
    assert comparison["verdict"]
    names = node.outputs.report.base.repository.list_object_names()
    assert "index.html" in names and "figures" in names


@pytest.mark.pw
@pytest.mark.slow
def test_tiny_study_report_renders_in_chromium(tiny_study, tmp_path):
    if chromium() is None:
        pytest.skip("chromium missing (aiida-emlip setup installs it; apt-get install -y chromium)")
    tiny_study.outputs.report.copy_tree(tmp_path)
    index = tmp_path / "index.html"
    html = index.read_text()
    assert "http://" not in html and "https://" not in html  # nothing from the network
    dom, console = render_in_chromium(index)
    assert console_errors(console) == []
    match = re.search(r'id="figure-check" data-status="(\w+)" class="muted" data-images="(\d+)"', dom)
    assert match, dom[-2000:]
    assert match.group(1) == "ok" and int(match.group(2)) >= 4
    assert "Tiny study" in dom and "Verdict" in dom
