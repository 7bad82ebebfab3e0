"""The study's comparison and report without AiiDA runs: errors per group, the verdict, the HTML page."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms

from aiida_emlip.analysis.study import held_out_errors, verdict
from aiida_emlip.report.html import render_report
from aiida_emlip.report.study_figures import study_figures


def _frame(key: str, charge: float, energy: float, config_type: str = "water") -> Atoms:
    atoms = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    atoms.info.update(key=key, total_charge=charge, energy=energy, config_type=config_type)
    atoms.arrays["forces"] = np.zeros((3, 3))
    return atoms


def test_held_out_errors_group_by_charge_and_type():
    reference = [_frame("a_q0", 0.0, -10.0), _frame("a_qp1", 1.0, -5.0), _frame("b_q0", 0.0, -9.0, "salt")]
    predicted = [_frame("a_q0", 0.0, -10.3), _frame("a_qp1", 1.0, -5.0 + 0.6)]
    errors = held_out_errors(reference, predicted)
    assert errors["missing"] == ["b_q0"]
    energy = errors["energy"]
    assert energy["total_charge=+0"]["rmse"] == pytest.approx(100.0)  # 0.3 eV over 3 atoms, meV/atom
    assert energy["total_charge=+1"]["rmse"] == pytest.approx(200.0)
    assert energy["charged"]["n"] == 1 and energy["config_type=water"]["n"] == 2
    assert errors["forces"]["all"]["rmse"] == 0.0


def test_verdict_names_the_ratio_to_sr():
    def row(head, charged, neutral):
        return {
            "head": head,
            "held_out": {
                "energy": {
                    "all": {"rmse": charged + neutral},
                    "charged": {"rmse": charged},
                    "neutral": {"rmse": neutral},
                }
            },
        }

    lines = verdict(
        {"sr": row("sr", 400.0, 5.0), "qeq": row("qeq", 20.0, 4.0), "charges": row("charges", 40.0, 5.0)}
    )
    assert any(
        "best electrostatic design, qeq, has an energy error 20.0× lower than sr's" in line for line in lines
    )


def test_report_page_is_static_and_escaped():
    reference = [_frame("a_q0", 0.0, -10.0), _frame("a_qp1", 1.0, -5.0)]
    predicted = [_frame("a_q0", 0.0, -10.1), _frame("a_qp1", 1.0, -5.2)]
    comparison = {
        "designs": {"sr": {"head": "sr", "held_out": held_out_errors(reference, predicted)}},
        "verdict": ["<b>not bold</b>"],
        "split": {"held_out_structures": {"a_q0": "uuid-1"}},
    }
    histories = {"sr": [{"epoch": 1, "valid_loss": 2.0, "train_loss": 3.0}, {"epoch": 2, "valid_loss": 1.0}]}
    figures = study_figures(comparison, histories, reference, {"sr": predicted})
    assert set(figures) == {"errors_by_charge", "learning_curves", "parity_sr"}
    files = render_report(
        comparison, figures, {"study": {"name": "t"}, "reproduce": ["aiida-emlip reproduce x"]}
    )
    page = files["index.html"].decode()
    assert "&lt;b&gt;not bold&lt;/b&gt;" in page and "<b>not bold" not in page
    assert "http" not in page.replace('lang="en"', "")
    assert all(f"figures/{name}.png" in files for name in figures)
    assert files["figures/parity_sr.png"].startswith(b"\x89PNG")


def test_active_learning_rounds_table_and_figure():
    """The rounds of an active-learning record: one row per round, each design's held-out error (the
    best of the round highlighted), the chosen frames' scores, and the figure; absent without rounds."""
    from aiida_emlip.analysis.active_learning import summary

    record = {
        "model": "charges",
        "selection": "committee",
        "uncertainty": "energy",
        "committee": 2,
        "stop_reason": "rounds done",
        "rounds_run": 1,
        "dft_calls": 2,
        "rounds": [
            {
                "round": 0,
                "dft_calls": 0,
                "training_size": 4,
                "test_error": {"sr": {"energy": 120.0}, "charges": {"energy": 80.0}},
            },
            {
                "round": 1,
                "dft_calls": 2,
                "labelled": 2,
                "training_size": 6,
                "uncertainty": {"selected": [0.0421, 0.0307]},
                "test_error": {"sr": {"energy": 95.0}, "charges": {"energy": 41.5}},
            },
        ],
    }
    comparison = {"designs": {}, "verdict": [], "split": {}, "active_learning": summary(record)}
    figures = study_figures(comparison, {}, [], {})
    assert set(figures) == {"active_learning"} and figures["active_learning"].startswith(b"\x89PNG")
    page = render_report(comparison, figures, {"study": {"name": "t"}})["index.html"].decode()
    section = page[page.index('<h2 id="active">') : page.index('<h2 id="cost">')]
    assert '<a href="#active">' in page and "committee disagreement (energy) of charges models" in section
    rows = section.split("<tr>")[2:]
    assert len(rows) == 2
    assert '<td class="best">80.0</td>' in rows[0] and "<td>120.0</td>" in rows[0]
    assert '<td class="best">41.5</td>' in rows[1] and "<td>95.0</td>" in rows[1]
    assert "<td>6</td><td>2</td><td>2</td>" in rows[1] and "0.042, 0.031" in rows[1]
    assert 'src="figures/active_learning.png"' in section
    plain = render_report({"designs": {}}, {}, {"study": {"name": "t"}})["index.html"].decode()
    assert 'id="active"' not in plain and "#active" not in plain


def test_validation_closest_to_dft_measures_from_dft():
    """A ratio to DFT is closest at 1 and a quantity at DFT's own value (not at 0); the report shows DFT
    first and highlights the design closest to it."""
    from aiida_emlip.analysis.study import validation_verdict

    summaries = {
        "insulating": {"α ÷ DFT": 0.0, "α": 0.0, "MAE": 0.2},
        "close": {"α ÷ DFT": 0.9, "α": 0.45, "MAE": 0.05},
        "none": {"α ÷ DFT": None, "α": None, "MAE": None},
    }
    references = {"α ÷ DFT": 1.0, "α": 0.5}
    lines = validation_verdict("interface", summaries, references)
    assert "interface: closest to DFT in α ÷ DFT: close (0.9; DFT 1)." in lines
    assert "interface: closest to DFT in α: close (0.45; DFT 0.5)." in lines
    assert "interface: closest to DFT in MAE: close (0.05)." in lines
    assert validation_verdict("interface", summaries)[0].startswith("interface: closest to DFT in MAE")
    comparison = {
        "designs": {
            label: {"head": label, "validations": {"interface": row}} for label, row in summaries.items()
        },
        "validations": {"interface": {}},
        "validation_references": {"interface": references},
    }
    page = render_report(comparison, {}, {})["index.html"].decode()
    table = page.split("<h3>interface</h3>", 1)[1].split("</table>", 1)[0]
    rows = table.split("<tr>")[2:]
    assert rows[0].startswith("<td>DFT</td>") and "best" not in rows[0]
    assert rows[0].count("<td>–</td>") == 1  # MAE: no DFT value
    assert rows[2].startswith("<td>close</td>") and rows[2].count('class="best"') == 3
    assert 'class="best"' not in rows[1]


def _response_verdicts():
    """A response verdict table (as the workchain's ``verdicts`` output) for split, qeq and sr."""
    from aiida_emlip.analysis.verdicts import verdict_table
    from aiida_emlip.workflows.study_registry import VALIDATIONS

    probes = {
        "field_water": {"dft": {"alpha": 2.0}, "split": {"alpha": 1.8}, "qeq": {"alpha": 6.0}},
        "dissociation": {
            "dft": {"far_charge": 0.98, "fractional": 0.02},
            "split": {"far_charge": 0.97, "fractional": 0.03, "rmse_vs_dft": 0.02},
            "qeq": {"far_charge": 0.55, "fractional": 0.45, "rmse_vs_dft": 0.3},
        },
        "polarizability": {
            "dft": {"exponent": 1.0, "alpha_per_molecule": 1.0},
            "split": {"exponent": 1.02, "alpha_per_molecule": 1.1},
            "qeq": {"exponent": 1.6, "alpha_per_molecule": 3.0},
        },
    }
    skipped = {"sr": {c: "no charges" for c in probes}}
    verdicts = verdict_table(probes, ["split", "qeq", "sr"], skipped=skipped)
    return verdicts, VALIDATIONS["response"]


def test_response_verdicts_reach_the_study_with_dft_values():
    """The response workchain's verdict table becomes the study's rows, with DFT's values as references:
    the design closest to DFT is chosen by distance to DFT, not by the smallest value."""
    from aiida_emlip.analysis.study import validation_verdict

    verdicts, entry = _response_verdicts()
    assert entry.output == "verdicts"
    table = entry.table(verdicts)
    assert table["dft"] == {"field_water": 2.0, "dissociation": 0.98, "polarizability": 1.0}
    summaries = {d: entry.summary(table[d]) for d in ("split", "qeq", "sr")}
    assert summaries["split"] == pytest.approx(
        {"response field_water": 0.9, "response dissociation": 0.97, "response polarizability": 1.02}
    )
    assert set(summaries["sr"].values()) == {None}  # skipped cells are no numbers
    references = entry.reference(table)
    assert references == {
        "response field_water": 1.0,
        "response dissociation": 0.98,
        "response polarizability": 1.0,
    }
    lines = validation_verdict("response", summaries, references)
    assert "response: closest to DFT in response dissociation: split (0.97; DFT 0.98)." in lines
    assert "response: closest to DFT in response field_water: split (0.9; DFT 1)." in lines


def test_compare_study_takes_the_response_verdicts(aiida_profile):
    """``compare_study`` (the study's calcfunction) on a response ``verdicts`` node: rows, DFT, verdict."""
    from aiida import orm

    from aiida_emlip.data import EmlipDatasetData
    from aiida_emlip.workflows.study_functions import compare_study

    verdicts, _ = _response_verdicts()
    held_out = EmlipDatasetData(frames=[_frame("a_q0", 0.0, -10.0)])
    settings = {
        "designs": {d: {"head": d, "preset": d} for d in ("split", "qeq", "sr")},
        "split": {},
        "validation_summaries": {},
    }
    out = compare_study(held_out, orm.Dict(settings), validation_response=orm.Dict(verdicts)).get_dict()
    assert out["validations"]["response"]["dft"]["dissociation"] == 0.98
    assert out["designs"]["qeq"]["validations"]["response"]["response dissociation"] == 0.55
    assert out["validation_references"]["response"]["response field_water"] == 1.0
    assert "response: closest to DFT in response dissociation: split (0.97; DFT 0.98)." in out["verdict"]
