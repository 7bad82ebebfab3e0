"""A configuration without post-processing is labelled by its ``PwBaseWorkChain`` alone, called by the dataset
workchain; one with Hirshfeld charges by an ``EmlipLabelWorkChain`` around it (real pw.x and pp.x).

The same two configurations, water and a water whose pw.x stops at once (fewer bands than occupied
states; the protocol restarts it once), run once without post-processing and once with Hirshfeld: the
process trees differ by the label workchain only, the pw.x calculations have the same inputs (the same
hash), the entries the same labels but for the Hirshfeld charges and dipoles, and the failed
configuration is recorded alike.
"""

from __future__ import annotations

import numpy as np
import pytest
from dataset_systems import CHEAP, water

from aiida_emlip import schema

pytestmark = pytest.mark.pw

KEYS = ("h2o", "broken")
#: What the Hirshfeld step adds to an entry.
HIRSHFELD_KEYS = {schema.CHARGES, schema.ATOMIC_DIPOLES}
#: What differs between two runs of the same entry: which calculation, how long pw.x took.
RUN_KEYS = {"source_uuid", "pw_wall_time"}


def _run(pw_code, pseudo_family, pp_code=None):
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code,
        {key: orm.StructureData(ase=water()) for key in KEYS},
        pseudo_family.label,
        protocol="fast",
        overrides={**CHEAP, "postprocess": {"hirshfeld": pp_code is not None}},
        structure_settings={"broken": {"parameters": {"SYSTEM": {"nbnd": 2}}}},
        max_concurrent=2,
    )
    if pp_code is not None:
        builder.pp_code = pp_code
    results, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    return results, node


@pytest.fixture(scope="module")
def runs(pw_code, pp_code, pseudo_family):
    """``{"direct": (results, node), "hirshfeld": (results, node)}``."""
    return {"direct": _run(pw_code, pseudo_family), "hirshfeld": _run(pw_code, pseudo_family, pp_code)}


def _entries(results) -> dict:
    return {str(atoms.info["key"]): atoms for atoms in results["dataset"].to_ase()}


def test_label_workchain_only_with_post_processing(runs):
    from aiida_emlip.workflows.dataset import labelled_by, pw_run

    _, direct = runs["direct"]
    _, hirshfeld = runs["hirshfeld"]
    for key in KEYS:
        # without post-processing: the dataset workchain calls the PwBaseWorkChain itself
        run = labelled_by(direct, key)
        assert run.process_label == "PwBaseWorkChain" and pw_run(direct, key).pk == run.pk
        assert run.caller.pk == direct.pk
        # with Hirshfeld: the label workchain between them
        label = labelled_by(hirshfeld, key)
        assert label.process_label == "EmlipLabelWorkChain"
        assert pw_run(hirshfeld, key).caller.pk == label.pk
    assert not [n for n in direct.called_descendants if n.process_label == "EmlipLabelWorkChain"]
    # the very same pw.x inputs either way (the broken one's restart included)
    for key in KEYS:
        hashes = [
            [calc.base.caching.compute_hash() for calc in _pw_calculations(node, key)]
            for node in (direct, hirshfeld)
        ]
        assert hashes[0] == hashes[1] and len(hashes[0]) == (2 if key == "broken" else 1), key


def test_same_entries_but_the_hirshfeld_labels(runs):
    results_direct, direct = runs["direct"]
    results_hirshfeld, hirshfeld = runs["hirshfeld"]
    plain, charged = _entries(results_direct), _entries(results_hirshfeld)
    assert list(plain) == list(charged) == ["h2o"]
    a, b = plain["h2o"], charged["h2o"]
    assert set(b.arrays) - set(a.arrays) == HIRSHFELD_KEYS
    assert set(b.info) == set(a.info)
    for name, value in a.info.items():
        if name in RUN_KEYS:
            continue
        if isinstance(value, str):
            assert value == b.info[name], name
        else:
            assert np.allclose(value, b.info[name], rtol=1e-8, atol=1e-7), name
    for name in a.arrays:
        assert np.allclose(a.arrays[name], b.arrays[name], rtol=1e-8, atol=1e-7), name
    # every entry's source is its own pw.x calculation
    for node, frames in ((direct, plain), (hirshfeld, charged)):
        source = frames["h2o"].info["source_uuid"]
        assert [source] == [calc.uuid for calc in _pw_calculations(node, "h2o")]


def _pw_calculations(node, key) -> list:
    """The pw.x calculations of configuration ``key`` of the dataset workchain ``node``, first first."""
    from aiida_emlip.workflows.dataset import pw_run

    return sorted(pw_run(node, key).called, key=lambda calc: calc.ctime)


def test_failed_configuration_recorded_alike(runs):
    from aiida_emlip.workflows.dataset import pw_run

    reports = {name: results["report"].get_dict() for name, (results, _) in runs.items()}
    for name, (_, node) in runs.items():
        report = reports[name]
        assert report["n_finished"] == 1 and report["n_failed"] == 1 and set(report["failed"]) == {"broken"}
        failure = report["failed"]["broken"]
        # recorded with its PwBaseWorkChain and that one's pw.x run, whichever process called it
        assert failure["workchain_pk"] == pw_run(node, "broken").pk
        assert failure["calcjob_pk"] == _pw_calculations(node, "broken")[-1].pk
        assert failure["exit_status"] != 0 and failure["calcjob_exit_status"] not in (None, 0)
        assert not report["postprocess_failed"]
    outcome = ("exit_status", "exit_message", "calcjob_exit_status", "calcjob_exit_message")
    direct, hirshfeld = reports["direct"]["failed"]["broken"], reports["hirshfeld"]["failed"]["broken"]
    assert {k: direct[k] for k in outcome} == {k: hirshfeld[k] for k in outcome}
