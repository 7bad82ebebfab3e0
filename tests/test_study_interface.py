"""A study with the metal–water interface validation, end to end with real pw.x and pp.x.

Two designs (``sr`` without charges, ``charges``) trained a few epochs on water and bulk Al; the
``interface`` validation runs the smallest interface its ``fast`` protocol builds (Al(111) 1×2, two
layers, one water molecule; neutral, ±0.1 V/Å, Q = −0.2 e) with every model; its numbers reach the
study's comparison beside DFT's, and its figures the report.
"""

from __future__ import annotations

import math
import re
import time

import pytest

#: Cheap pw.x everywhere: 20 Ry, coarse k-points, smeared (the metal), one attempt.
CHEAP = """{ecutwfc: 20.0, ecutrho: 80.0, conv_thr_per_atom: 1.0e-8, kpoints_distance: 1.0,
              max_iterations: 1, degauss: 0.03, mixing_beta: 0.3, electron_maxstep: 300"""

SPEC = f"""\
name: tiny-interface
description: water and bulk Al, two designs, the metal–water interface validation (a test)
dft:
  protocol: fast
  max_concurrent: 2
  overrides: {CHEAP}, postprocess: {{hirshfeld: false}}}}
budget: {{max_dft_configurations: 12}}
systems:
  water:
    structure: {{molecule: H2O, box: 8.0}}
    rattle: {{n: 3, stdev: 0.05}}
    charges: [0, 1]
    isolated: true
  aluminium:
    structure: {{bulk: Al, a: 4.05}}
    supercell: [2, 1, 1]
    rattle: {{n: 2, stdev: 0.05}}
split: {{held_out_fraction: 0.3, seed: 0}}
training:
  epochs: 3
  backbone: {{num_channels: 4, max_L: 0, max_ell: 1, correlation: 1, num_interactions: 1, r_max: 3.5,
             mlp_hidden: 4}}
  options: {{environment_variables: {{OMP_NUM_THREADS: "1"}}}}
designs: [sr, charges]
validations:
  interface:
    protocol: fast
    fields: [0.1]
    charges: [-0.2]
    dft_overrides: {CHEAP}}}
report: {{title: Tiny interface study}}
"""

INTERFACE_METRICS = (
    "interface charge-transfer MAE (e)",
    "interface dΔφ/dQ ÷ DFT",
    "interface α ÷ DFT",
)


@pytest.fixture(scope="module")
def interface_study(pw_code, pp_code, pseudo_family, train_code, eval_code):
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.spec import parse_spec
    from aiida_emlip.workflows.study import EmlipStudyWorkChain

    spec = parse_spec(SPEC, "tiny-interface.yaml")
    assert spec["validations"]["interface"]["symbol"] == "Al"  # the defaults are filled in
    builder = EmlipStudyWorkChain.get_builder()
    builder.spec = orm.Dict(spec)
    builder.spec_text = orm.Str(SPEC)
    builder.pw_code, builder.train_code, builder.eval_code = pw_code, train_code, eval_code
    builder.pp_code = pp_code
    wall, cpu = time.perf_counter(), time.process_time()
    _, node = run_get_node(builder)
    print(
        f"\nstudy with the interface validation: {time.perf_counter() - wall:.0f} s wall, "
        f"{time.process_time() - cpu:.0f} s CPU of this process"
    )
    return node


def test_spec_costs_the_interface():
    from aiida_emlip.spec import dft_configuration_count, parse_spec

    counts = dft_configuration_count(parse_spec(SPEC, "tiny-interface.yaml"))
    # neutral, ±0.1 V/Å, Q = −0.2 e
    assert counts["validations.interface"] == 4 and sum(counts.values()) == 12


@pytest.mark.pw
@pytest.mark.slow
def test_study_runs_the_interface_validation(interface_study, tmp_path):
    node = interface_study
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    # the validation ran as a child of the study, with every design's model
    child = node.base.links.get_outgoing(link_label_filter="validate_interface").one().node
    assert child.process_label == "EmlipInterfaceWorkChain" and child.is_finished_ok
    assert set(child.inputs.models) == {"sr", "charges"}
    assert {child.inputs.models[k].uuid for k in ("sr", "charges")} == {
        node.outputs.models[k].uuid for k in ("sr", "charges")
    }
    assert set(child.outputs.setup.get_dict()) == {"neutral", "field_0p", "field_0m", "charge_0m"}

    comparison = node.outputs.comparison.get_dict()
    print(comparison["validations"]["interface"], comparison["verdict"])
    table = comparison["validations"]["interface"]
    # DFT's own numbers beside the designs': α, the elastance of the drop, the charge transfer
    dft = table["dft"]
    assert dft["alpha"] > 0 and math.isfinite(dft["alpha"])
    assert dft["ddrop_dq"] != 0 and math.isfinite(dft["ddrop_dq"])
    assert math.isfinite(dft["capacitance_uf_cm2"])
    assert abs(dft["charge_transfer_neutral"]) < 0.5
    # charges: every interface quantity, finite, and its ratio to DFT
    charges = table["charges"]
    for key in (
        "alpha",
        "ddrop_dq",
        "charge_transfer_neutral",
        "charge_transfer_mae",
        "energy_mae_per_atom",
        "force_rmse",
    ):
        assert math.isfinite(charges[key]), (key, charges)
    assert charges["interface_field"] == pytest.approx(charges["alpha"] / dft["alpha"])
    assert charges["interface_capacitance"] == pytest.approx(charges["ddrop_dq"] / dft["ddrop_dq"])
    assert charges["interface_field_verdict"] in ("metal-like", "insulator-like", "matches DFT")
    # sr predicts no charges: its charge quantities are skipped, not zero; its energies are compared
    sr = table["sr"]
    for column in ("interface_field", "interface_capacitance", "charge_transfer"):
        assert sr[column] is None and sr[f"{column}_verdict"] == "skipped", (column, sr)
    assert (
        sr.get("charge_transfer_mae") is None
        and math.isfinite(sr["energy_mae_per_atom"])
        and sr["n_states"] == 4
    )
    # the design rows carry the summary: numbers for charges, none for sr
    summary = comparison["designs"]["charges"]["validations"]["interface"]
    assert all(math.isfinite(summary[m]) for m in INTERFACE_METRICS), summary
    sr_summary = comparison["designs"]["sr"]["validations"]["interface"]
    assert all(sr_summary.get(m) is None for m in INTERFACE_METRICS), sr_summary
    lines = [line for line in comparison["verdict"] if line.startswith("interface:")]
    assert lines and all("charges" in line for line in lines)

    # the report: the interface section with the validation's figures, every image on disk
    node.outputs.report.copy_tree(tmp_path)
    html = (tmp_path / "index.html").read_text()
    section = html.split('<h2 id="validation">', 1)[1].split("<h2", 1)[0]
    assert "<h3>interface</h3>" in section
    for metric in INTERFACE_METRICS:
        assert metric in section
    images = re.findall(r'<img src="([^"]+)"', section)
    names = {src.rsplit("/", 1)[-1] for src in images}
    for figure in ("potential_profiles", "dipole_vs_field", "drop_vs_charge", "charge_transfer"):
        assert f"validation_interface_{figure}.png" in names, names
    for src in re.findall(r'<img src="([^"]+)"', html):
        path = tmp_path / src
        assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG", src
