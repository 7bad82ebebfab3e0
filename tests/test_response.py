"""Born effective charges and ε∞ of the models (pure PyTorch): exact sum rules and finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
from models_helpers import HEAD_CONFIGS, nacl_cell, tiny_model, water_cluster

from aiida_emlip import schema
from aiida_emlip.models.response import (
    ResponseError,
    asr_residual,
    born_charges,
    dielectric_response,
    epsilon_from_polarizability,
    polarizability,
)


def test_fixed_point_charges_have_formal_born_charges():
    """Z* of a formal-charge model is q⁰·1 exactly: the field only enters as −E·Σ q⁰ r."""
    model = tiny_model(HEAD_CONFIGS["fixed"])
    atoms = nacl_cell()
    response = dielectric_response(model, atoms)
    formal = np.array([1.0 if s == "Na" else -1.0 for s in atoms.get_chemical_symbols()])
    expected = formal[:, None, None] * np.eye(3)[None]
    np.testing.assert_allclose(response.born_charges, expected, atol=1e-12)
    assert response.asr_residual == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(response.epsilon, np.eye(3), atol=0)
    assert "no electronic response" in response.notes[0]
    assert response.method == "autograd"
    assert set(response.to_dict()) >= {schema.BORN_CHARGES, schema.POLARIZABILITY, "epsilon", "asr_residual"}


@pytest.mark.parametrize("head", ["fixed", "charges", "qeq"])
def test_acoustic_sum_rule(head):
    """Σ_i Z*_i = Q·1 = 0 in a neutral cell for a constant-Q model, whatever its weights."""
    model = tiny_model(HEAD_CONFIGS[head], seed=3)
    z, method = born_charges(model, nacl_cell(seed=2))
    assert method == "autograd" and z.shape == (8, 3, 3)
    assert asr_residual(z) < 1e-8
    # not a trivial zero: the charges (and for qeq their response) make Z* deviate from 0
    assert np.abs(z).max() > 1e-2


@pytest.mark.parametrize("head", ["charges", "qeq"])
def test_autograd_born_charges_match_finite_differences(head):
    """The mixed second derivative equals (F(+h) − F(−h))/2h of the forces in applied fields."""
    model = tiny_model(HEAD_CONFIGS[head], seed=1)
    atoms = nacl_cell(seed=1)
    z_autograd, _ = born_charges(model, atoms, "autograd")
    z_fd, method = born_charges(model, atoms, "finite_difference", step=1e-3)
    assert method == "finite_difference"
    np.testing.assert_allclose(z_autograd, z_fd, rtol=1e-6, atol=1e-9)
    # Z* differs from the charges themselves: the environment-dependent charges move with the atoms
    charges = np.diag(z_autograd.mean(axis=0))
    assert np.abs(z_autograd - np.diag(charges)[None]).max() > 1e-4


def test_qeq_polarizability_gives_a_dielectric_tensor():
    model = tiny_model(HEAD_CONFIGS["qeq"], seed=2)
    atoms = nacl_cell()
    response = dielectric_response(model, atoms)
    alpha = response.polarizability
    np.testing.assert_allclose(alpha, alpha.T, atol=1e-8)  # QEq is variational: α is symmetric
    assert np.linalg.eigvalsh(0.5 * (alpha + alpha.T)).min() > 0  # and positive: energy lowered by a field
    expected = np.eye(3) + 4 * math.pi * schema.COULOMB_CONSTANT * alpha / atoms.get_volume()
    np.testing.assert_allclose(response.epsilon, expected, rtol=1e-12)
    assert not response.notes


def test_epsilon_units():
    """α = ε0 V (χ = 1) gives ε∞ = 2; ε0 = 1/(4π k_e) e/(V·Å)."""
    volume = 50.0
    alpha = np.eye(3) * volume / (4 * math.pi * schema.COULOMB_CONSTANT)
    np.testing.assert_allclose(epsilon_from_polarizability(alpha, volume), 2 * np.eye(3), rtol=1e-12)


def test_models_without_charges_or_cells_are_refused():
    with pytest.raises(ResponseError, match="no charges"):
        born_charges(tiny_model(HEAD_CONFIGS["sr"]), nacl_cell())
    with pytest.raises(ResponseError, match="periodic"):
        dielectric_response(tiny_model(HEAD_CONFIGS["fixed"]), water_cluster())
    with pytest.raises(ResponseError, match="method"):
        born_charges(tiny_model(HEAD_CONFIGS["fixed"]), nacl_cell(), "magic")
    # no charges, no response: the sr head still has ε∞ = 1 (no Born charges asked)
    model = tiny_model(HEAD_CONFIGS["sr"])
    assert np.abs(polarizability(model, nacl_cell())).max() == 0.0
    assert dielectric_response(model, nacl_cell(), born=False).born_charges is None


def test_training_state_is_restored():
    model = tiny_model(HEAD_CONFIGS["qeq"])
    model.eval()
    born_charges(model, nacl_cell())
    assert not model.training and not model.head.training
    model.train()
    polarizability(model, nacl_cell())
    assert model.training and model.head.training
