"""Cache versions: a new release never reuses older trainings or predictions; pw.x results survive."""

from __future__ import annotations

from aiida_emlip import __version__
from aiida_emlip.cache_version import NUMERICS, PROJWFC_PARSER_REVISION, PW_PARSER_REVISION, cache_version


def test_cache_version_is_stable_and_tracks_release_and_numerics():
    value = cache_version("train")
    assert value == cache_version("train", __version__, NUMERICS) and 0 < value < 2**31
    assert cache_version("train", "0.1.0", 1) == cache_version("train", "0.1.0", 1)
    others = {
        cache_version("evaluate", "0.1.0", 1),
        cache_version("train", "0.2.0", 1),
        cache_version("train", "0.1.0", 2),
    }
    assert cache_version("train", "0.1.0", 1) not in others and len(others) == 3


def test_plugins_carry_their_cache_versions_into_the_hash():
    from aiida import orm

    from aiida_emlip.calculations.evaluate import EmlipEvaluateCalculation
    from aiida_emlip.calculations.train import EmlipTrainCalculation
    from aiida_emlip.parsers.projwfc import EmlipProjwfcParser
    from aiida_emlip.parsers.pw import EmlipPwParser

    assert EmlipTrainCalculation.CACHE_VERSION == cache_version("train")
    assert EmlipEvaluateCalculation.CACHE_VERSION == cache_version("evaluate")
    assert EmlipPwParser.CACHE_VERSION == PW_PARSER_REVISION
    assert EmlipProjwfcParser.CACHE_VERSION == PROJWFC_PARSER_REVISION
    hashes = []
    for version in (cache_version("train", "0.1.0"), cache_version("train", "0.2.0")):
        node = orm.CalcJobNode(process_type="aiida.calculations:emlip.train")
        node.base.attributes.set("cache_version", {"calc_job": version})
        assert node.base.caching.get_objects_to_hash()["attributes"]["cache_version"] == {"calc_job": version}
        hashes.append(node.base.caching._compute_hash())
    assert hashes[0] != hashes[1]  # what AiiDA looks up: another release finds no match
