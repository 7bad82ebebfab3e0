"""Charges that carry a partition's atomic dipoles (for heads without atomic dipoles)."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule

from aiida_emlip.training.dipole_charges import dipole_preserving_charges


def _dipole(atoms: Atoms, charges: np.ndarray, dipoles: np.ndarray | None = None) -> np.ndarray:
    centre = atoms.positions.mean(axis=0)
    total = (charges[:, None] * (atoms.positions - centre)).sum(axis=0)
    return total if dipoles is None else total + dipoles.sum(axis=0)


def test_water_dipole_moves_onto_charges():
    """A water molecule with Hirshfeld-like charges and in-plane atomic dipoles: the projected charges
    alone carry the molecule's whole dipole; the molecule stays neutral; a distant Li⁺ keeps +1."""
    water = molecule("H2O")
    water.center(vacuum=5.0)
    rng = np.random.default_rng(0)
    charges = np.array([-0.30, 0.15, 0.15])
    # in-plane atomic dipoles (the molecule lies in the yz plane of ase's H2O)
    dipoles = np.zeros((3, 3))
    dipoles[:, 1:] = rng.normal(0.0, 0.08, size=(3, 2))
    ion = Atoms("Li", positions=[water.positions[0] + [0.0, 0.0, 6.0]])
    system = water + ion
    system.cell, system.pbc = [12.0, 12.0, 20.0], True
    q = np.concatenate([charges, [1.0]])
    p = np.vstack([dipoles, [[0.02, -0.01, 0.03]]])  # the ion's own dipole has nowhere to go
    result = dipole_preserving_charges(system, q, p)
    new = result.charges
    assert new.sum() == pytest.approx(q.sum(), abs=1e-12)
    assert new[:3].sum() == pytest.approx(0.0, abs=1e-12) and new[3] == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(_dipole(water, new[:3]), _dipole(water, charges, dipoles), atol=1e-10)
    np.testing.assert_allclose(result.lost_dipole[:3], 0.0, atol=1e-10)
    np.testing.assert_allclose(result.lost_dipole[3], p[3], atol=1e-12)


def test_bonds_across_the_cell_boundary_and_lost_out_of_line_part():
    """A molecule split by the periodic boundary projects like an intact one (minimum image); a
    diatomic cannot carry a dipole perpendicular to its bond, which is reported as lost."""
    pair = Atoms("HF", positions=[[0.0, 0.0, 0.0], [0.0, 0.0, 0.92]], cell=[8.0, 8.0, 8.0], pbc=True)
    wrapped = pair.copy()
    wrapped.positions -= [0.0, 0.0, 0.5]
    wrapped.wrap()
    charges = np.array([0.4, -0.4])
    dipoles = np.array([[0.0, 0.0, 0.05], [0.03, 0.0, -0.02]])
    a = dipole_preserving_charges(pair, charges, dipoles)
    b = dipole_preserving_charges(wrapped, charges, dipoles)
    np.testing.assert_allclose(a.charges, b.charges, atol=1e-12)
    # along the bond: δ·0.92 Å carries 0.05 − 0.02 = 0.03 e·Å; across it nothing can
    assert a.charges[1] - charges[1] == pytest.approx(0.03 / 0.92, rel=1e-10)
    np.testing.assert_allclose(a.lost_dipole.sum(axis=0), [0.03, 0.0, 0.0], atol=1e-12)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="need 2 charges"):
        dipole_preserving_charges(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]]), [0.0], np.zeros((2, 3)))


def test_training_data_option_and_preset():
    """``data.charges_from_dipoles`` replaces the reference charges on reading; the presets switch it on
    for heads without atomic dipoles when the data carry both labels; without dipoles it is refused."""
    from aiida_emlip import schema
    from aiida_emlip.training.config import DataConfig
    from aiida_emlip.training.data import to_sample
    from aiida_emlip.training.errors import DataError
    from aiida_emlip.training.presets import preset_config

    water = molecule("H2O")
    water.center(vacuum=5.0)
    water.arrays[schema.CHARGES] = np.array([-0.30, 0.15, 0.15])
    water.arrays[schema.ATOMIC_DIPOLES] = np.array(
        [[0.0, 0.0, 0.07], [0.0, 0.05, -0.06], [0.0, -0.05, -0.06]]
    )
    water.info[schema.ENERGY] = -1.0
    plain = to_sample(water, 0, DataConfig(train="x"), "w").labels[schema.CHARGES]
    labels = to_sample(water, 0, DataConfig(train="x", charges_from_dipoles=True), "w").labels
    moved, left = labels[schema.CHARGES], labels[schema.ATOMIC_DIPOLES]
    np.testing.assert_allclose(plain, [-0.30, 0.15, 0.15])
    target = _dipole(water, plain, water.arrays[schema.ATOMIC_DIPOLES])
    np.testing.assert_allclose(_dipole(water, moved), target, atol=1e-10)
    # the moved dipoles leave the dipole labels (in-plane water: nothing is left), so charges plus
    # atomic dipoles still give the molecule's dipole once, also for a head that predicts both
    np.testing.assert_allclose(left, 0.0, atol=1e-10)
    np.testing.assert_allclose(_dipole(water, moved, left), target, atol=1e-10)
    assert abs(moved[0]) > abs(plain[0]) + 0.05  # the oxygen takes the dipole's charge
    del water.arrays[schema.ATOMIC_DIPOLES]
    with pytest.raises(DataError, match="charges_from_dipoles needs"):
        to_sample(water, 0, DataConfig(train="x", charges_from_dipoles=True), "w")
    both = {schema.CHARGES, schema.ATOMIC_DIPOLES}
    assert preset_config("scf", labels=both)["data"]["charges_from_dipoles"] is True
    assert "charges_from_dipoles" not in preset_config("charges", labels=both)["data"]
    assert "charges_from_dipoles" not in preset_config("qeq", labels={schema.CHARGES})["data"]
