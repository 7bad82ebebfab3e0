"""Physical constants agree with ASE to all digits."""

from __future__ import annotations

import ase.units

from aiida_emlip import schema


def test_coulomb_constant_is_ases():
    assert schema.COULOMB_CONSTANT == ase.units.Hartree * ase.units.Bohr
    assert abs(schema.BOHR_IN_A - ase.units.Bohr) < 1e-9
    assert abs(schema.FIELD_AU_IN_V_PER_A - ase.units.Hartree / ase.units.Bohr) / 51.4 < 1e-8
