"""Per-element reference energies fitted on the training split, and the warning when they cannot be."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from ase import Atoms

from aiida_emlip import schema
from aiida_emlip.training.data import Sample, fit_reference_energies
from aiida_emlip.training.errors import ReferenceEnergyWarning

E0 = {"H": -13.6, "O": -430.0}


def _sample(symbols: str, i: int) -> Sample:
    atoms = Atoms(symbols)
    atoms.positions = np.arange(3 * len(atoms)).reshape(-1, 3) * 1.5
    energy = sum(E0[s] for s in atoms.get_chemical_symbols()) + 0.01 * i
    return Sample(atoms, {schema.ENERGY: np.array(energy)}, "x", 0.0, i)


def test_distinct_compositions_recover_the_energies_without_warning():
    samples = [_sample(s, i) for i, s in enumerate(["H2O", "H2", "O2", "H2O2", "HO"])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e0 = fit_reference_energies(samples, ["H", "O"])
    assert e0 == pytest.approx([E0["H"], E0["O"]], abs=0.05)


def test_one_stoichiometry_warns_and_uses_the_energy_per_atom():
    samples = [_sample("H2O", i) for i in range(4)]
    with pytest.warns(ReferenceEnergyWarning, match="determine only 1 combination"):
        e0 = fit_reference_energies(samples, ["H", "O"])
    per_atom = np.mean([(2 * E0["H"] + E0["O"] + 0.01 * i) / 3 for i in range(4)])
    # the structures' total E0 is fitted; the split between H and O stays at the mean per atom
    assert 2 * e0[0] + e0[1] == pytest.approx(3 * per_atom, abs=1e-9)
    assert e0 == pytest.approx([per_atom, per_atom], abs=1e-9)


def test_an_element_missing_from_training_is_named():
    samples = [_sample(s, i) for i, s in enumerate(["H2", "H", "H3"])]
    with pytest.warns(ReferenceEnergyWarning, match="no training structure contains O"):
        e0 = fit_reference_energies(samples, ["H", "O"])
    assert e0[0] == pytest.approx(E0["H"], abs=0.01)  # H is still fitted
    assert e0[1] == pytest.approx(np.mean([(E0["H"] * n + 0.01 * i) / n for i, n in enumerate([2, 1, 3])]))
