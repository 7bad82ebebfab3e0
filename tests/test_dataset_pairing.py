"""The dataset workchain pairs each configuration with its own structure and settings, whatever its key.

Keys of a dataset input are ``c0000``, ``c0001``, ...: past ``c9999`` they no longer sort as strings in
the order of the configurations (``c10000`` < ``c9999``). Twelve configurations keyed ``c0`` ... ``c11``
(``c10`` and ``c11`` sort before ``c2``) stand in for that without 10,001 structures; no pw.x runs.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from ase import Atoms

from aiida_emlip import schema

N = 12


def _bond(index: int) -> float:
    """The H–H distance (Å) of configuration ``index``: it tells a structure's configuration apart."""
    return 0.70 + 0.01 * index


def _frames() -> list[Atoms]:
    frames = []
    for index in range(N):
        atoms = Atoms("H2", positions=[[3.0, 3.0, 3.0], [3.0, 3.0, 3.0 + _bond(index)]], cell=[6, 6, 6])
        atoms.pbc = True
        atoms.info[schema.TOTAL_CHARGE] = float(index - 5)  # a different charge for each configuration
        atoms.info[schema.TOTAL_SPIN] = float(index % 2)
        atoms.info[schema.EXTERNAL_FIELD] = np.array([0.0, 0.0, 0.01 * index])
        atoms.info[schema.CONFIG_TYPE] = f"type{index}"
        frames.append(atoms)
    return frames


def _index_of(structure) -> int:
    """The configuration a ``StructureData`` was made from, read from its bond length."""
    positions = structure.get_ase().positions
    bond = float(np.linalg.norm(positions[1] - positions[0]))
    return round((bond - 0.70) / 0.01)


def _workchain(**inputs) -> SimpleNamespace:
    """What ``EmlipDatasetWorkChain._collect`` reads of the workchain: its context and inputs."""
    from aiida.common import AttributeDict

    return SimpleNamespace(ctx=AttributeDict(), inputs=AttributeDict(inputs))


def test_natural_order_and_keys():
    from aiida_emlip.workflows.functions import configuration_key, natural_order

    keys = [configuration_key(i) for i in (0, 9999, 10000, 10001)]
    assert keys == ["c0000", "c9999", "c10000", "c10001"]
    assert sorted(keys) != keys  # what pairing by sorted keys got wrong
    assert natural_order(reversed(keys)) == keys
    assert natural_order(["s10", "s2", "s1", "s01", "t", "s"]) == ["s", "s01", "s1", "s2", "s10", "t"]
    assert natural_order(["nacl_000_q0", "nacl_1000_q0", "nacl_999_qm1"]) == [
        "nacl_000_q0",
        "nacl_999_qm1",
        "nacl_1000_q0",
    ]


def test_dataset_input_pairs_by_index_not_sorted_keys(aiida_profile, monkeypatch):
    from aiida_emlip.data import EmlipDatasetData
    from aiida_emlip.workflows import dataset as module
    from aiida_emlip.workflows import functions

    def short_key(index: int) -> str:
        return f"c{index}"

    monkeypatch.setattr(functions, "configuration_key", short_key)  # used by split_configurations
    monkeypatch.setattr(module, "configuration_key", short_key, raising=False)  # used by the pairing
    dataset = EmlipDatasetData.from_ase(_frames()).store()
    collected = module.EmlipDatasetWorkChain._collect(_workchain(configurations=dataset))

    keys = [key for key, _, _ in collected]
    assert keys == [f"c{i}" for i in range(N)]
    assert sorted(keys) != keys  # the keys do not sort in the order of the configurations
    for index, (key, structure, settings) in enumerate(collected):
        assert _index_of(structure) == index, key
        assert settings[schema.TOTAL_CHARGE] == float(index - 5), key
        assert settings[schema.TOTAL_SPIN] == float(index % 2)
        assert settings[schema.EXTERNAL_FIELD] == pytest.approx([0.0, 0.0, 0.01 * index])
        assert settings["_extra"] == {schema.CONFIG_TYPE: f"type{index}"}
    charges = {_index_of(s): settings[schema.TOTAL_CHARGE] for _, s, settings in collected}
    assert charges == {i: float(i - 5) for i in range(N)}


def test_structures_input_pairs_settings_by_name_in_natural_order(aiida_profile):
    from aiida import orm

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    frames = _frames()
    structures = {f"s{i}": orm.StructureData(ase=frames[i]) for i in reversed(range(N))}
    settings = {f"s{i}": {schema.TOTAL_CHARGE: float(i - 5)} for i in range(N)}
    workchain = _workchain(structures=structures, structure_settings=orm.Dict(settings))
    collected = EmlipDatasetWorkChain._collect(workchain)
    assert [key for key, _, _ in collected] == [f"s{i}" for i in range(N)]
    for index, (_, structure, values) in enumerate(collected):
        assert _index_of(structure) == index
        assert values == {schema.TOTAL_CHARGE: float(index - 5)}
