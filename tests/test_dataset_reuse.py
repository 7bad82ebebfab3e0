"""A dataset workchain with the inputs of a finished one returns that one's outputs (caching enabled for
``aiida.workflows:emlip.dataset``); real pw.x for the first run."""

from __future__ import annotations

import pytest
from dataset_systems import CHEAP, hydroxide, water

pytestmark = pytest.mark.pw

DATASET = "aiida.workflows:emlip.dataset"


def _builder(pw_code, pseudo_family, max_concurrent=2, overrides=CHEAP, h2o=water):
    from aiida import orm

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    return EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code,
        {"h2o": orm.StructureData(ase=h2o()), "oh": orm.StructureData(ase=hydroxide())},
        pseudo_family.label,
        protocol="fast",
        overrides=overrides,
        structure_settings={"oh": {"total_charge": -1}},
        max_concurrent=max_concurrent,
    )


@pytest.fixture(scope="module")
def first(pw_code, pseudo_family):
    """The finished dataset workchain that the others may reuse (caching off: pw.x runs)."""
    from aiida.engine import run_get_node

    _, node = run_get_node(_builder(pw_code, pseudo_family))
    assert node.is_finished_ok, node.exit_message
    return node


def _calcs(node):
    from aiida import orm

    return [n for n in node.called_descendants if isinstance(n, orm.CalcJobNode)]


def test_same_inputs_return_the_finished_outputs(first, pw_code, pseudo_family):
    from aiida.engine import run_get_node
    from aiida.manage.caching import enable_caching

    from aiida_emlip.cli.study_status import dft_counts
    from aiida_emlip.workflows.dataset import labelled_by, pw_run
    from aiida_emlip.workflows.reuse import DIGEST_EXTRA, REUSED_FROM_EXTRA, reused_counts

    # max_concurrent does not change the result: a different value still matches
    with enable_caching(identifier=DATASET):
        results, node = run_get_node(_builder(pw_code, pseudo_family, max_concurrent=1))
    assert node.is_finished_ok, node.exit_message
    assert node.called == []  # no label workchain, no pw.x
    assert results["dataset"].uuid == first.outputs.dataset.uuid
    assert results["report"].uuid == first.outputs.report.uuid
    assert node.base.extras.get(DIGEST_EXTRA) == first.base.extras.get(DIGEST_EXTRA)
    assert node.base.extras.get(REUSED_FROM_EXTRA) == first.uuid
    # the configurations' runs are found through the reusing node
    assert labelled_by(node, "h2o").pk == labelled_by(first, "h2o").pk
    assert pw_run(node, "oh").inputs.pw.structure.get_formula() == "HO"
    assert dft_counts(node)["done"] == 2
    log = " ".join(entry.message for entry in _logs(node))
    assert f"<{first.pk}>" in log and "no pw.x run" in log
    # counted as reused: one dataset, both of its calculations
    assert len(_calcs(first)) == 2 and reused_counts(node) == (1, 2)
    assert reused_counts(first) == (0, 0)


def _logs(node):
    from aiida import orm

    return orm.Log.collection.get_logs_for(node)


def test_other_inputs_or_caching_off_run_pw(first, pw_code, pseudo_family):
    """A changed structure is a different digest; with caching of pw.x alone no dataset is reused."""
    from aiida.engine import run_get_node
    from aiida.manage.caching import enable_caching

    from aiida_emlip.workflows.dataset import PW_CACHE_IDENTIFIER
    from aiida_emlip.workflows.reuse import DIGEST_EXTRA, REUSED_FROM_EXTRA

    def moved():
        atoms = water()
        atoms.positions[0, 0] += 0.05
        return atoms

    with enable_caching(identifier=DATASET), enable_caching(identifier=PW_CACHE_IDENTIFIER):
        results, node = run_get_node(_builder(pw_code, pseudo_family, h2o=moved))
    assert node.is_finished_ok, node.exit_message
    assert node.base.extras.get(DIGEST_EXTRA) != first.base.extras.get(DIGEST_EXTRA)
    assert REUSED_FROM_EXTRA not in node.base.extras.all
    assert [c.base.caching.is_created_from_cache for c in _calcs(node)].count(True) == 1  # OH⁻ only
    assert results["dataset"].uuid != first.outputs.dataset.uuid
    with enable_caching(identifier=PW_CACHE_IDENTIFIER):
        _, node = run_get_node(_builder(pw_code, pseudo_family))
    assert node.base.extras.get(DIGEST_EXTRA) == first.base.extras.get(DIGEST_EXTRA)
    assert REUSED_FROM_EXTRA not in node.base.extras.all
    assert [c.base.caching.is_created_from_cache for c in _calcs(node)] == [True, True]


def test_invalidated_source_is_not_reused(first):
    """A workchain, or one of its calculations, marked invalid for caching is no source any more."""
    from aiida_emlip.workflows.reuse import DIGEST_EXTRA, finished_twin, usable

    digest = first.base.extras.get(DIGEST_EXTRA)
    assert usable(first)
    calc = _calcs(first)[0]
    calc.base.caching.is_valid_cache = False
    try:
        assert not usable(first)
        twin = finished_twin(first.process_type, digest, exclude=-1)
        assert twin is None or twin.pk != first.pk
    finally:
        calc.base.caching.is_valid_cache = True
    assert usable(first)


def test_recorded_dft_settings_name_the_code_by_label_and_uuid(first, pw_code):
    """The dataset records the pw.x code's label and UUID; the digest of the settings, and the settings
    that the study's split sets carry (training inputs, compared across profiles), leave the UUID and
    the pw.x parallelisation out: the same settings with a code set up again elsewhere (another UUID,
    another computer name, k-point pools there) give the same digest and the same split sets."""
    import uuid

    from aiida import orm

    from aiida_emlip.data.dataset import EmlipDatasetData, dft_settings_digest
    from aiida_emlip.workflows.study_functions import split_study

    dataset = first.outputs.dataset
    settings = dataset.dft_settings
    assert settings["code"] == pw_code.full_label and settings["code_uuid"] == pw_code.uuid
    recorded = {key: value for key, value in settings.items() if key != "digest"}
    assert "parallelization" not in settings  # none asked for: none recorded
    elsewhere = {**recorded, "code_uuid": str(uuid.uuid4()), "parallelization": {"npool": 4}}
    assert settings["digest"] == dft_settings_digest(recorded) == dft_settings_digest(elsewhere)
    assert dft_settings_digest({**recorded, "ecutwfc": 99.0}) != settings["digest"]
    # another profile: the same labels from a code with another UUID on a computer of another name
    other = EmlipDatasetData.from_ase(
        dataset.to_ase(),
        dft_settings={**elsewhere, "code": "pw@cluster", "digest": dft_settings_digest(elsewhere)},
    )
    keys = [str(a.info["key"]) for a in dataset.to_ase()]
    split = orm.Dict({"held_out_geometries": ["g1"], "geometry_of": {keys[0]: "g0", keys[1]: "g1"}})
    here, there = split_study(dataset, split), split_study(other, split)
    for name in ("training_set", "held_out_set"):
        kept = here[name].dft_settings
        assert "code_uuid" not in kept and "parallelization" not in kept and kept["code"] == "pw", kept
        assert kept == there[name].dft_settings
        assert here[name].base.attributes.get("dft_settings_digest") == dft_settings_digest(kept)
    assert (
        here["training_set"].base.caching.compute_hash() == there["training_set"].base.caching.compute_hash()
    )
