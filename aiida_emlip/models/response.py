r"""Dielectric response of a model: Born effective charges and ε∞ (pure PyTorch, no AiiDA).

* **Born effective charges** ``Z*[i, α, β] = ∂F_iβ/∂E_α`` (e), the schema's convention
  (:data:`aiida_emlip.schema.BORN_CHARGES`; the same as phonopy's and ph.x's "d Force / dE"). By
  autograd, as the mixed second derivative ``−∂²E/∂r_iβ ∂E_α`` of the model energy with respect to the
  positions and the applied field ``graph.external_field`` (V/Å), which is exactly ∂F/∂E; or by
  central finite differences of the forces in fields ``±h`` (``method='finite_difference'``), the route
  for the ``scf`` head, whose learned update is not the gradient of its energy, so that the implicit
  derivative of its charges is exact to first order only.
* **Electronic polarisability** ``α[α, β] = ∂d_α/∂E_β`` (e·Å²/V) at clamped ions, by autograd through
  the field, and the high-frequency dielectric tensor

  .. math:: ε_∞ = 1 + \frac{α}{ε_0 V} = 1 + \frac{4π k_e}{V}\,α,

  with ``k_e = e²/(4πε₀) = 14.399645 eV·Å/e²`` (``1/ε₀ = 4π k_e`` in e, V and Å). Heads without the
  ``polarizability`` capability have no electronic response: ε∞ = 1 (noted).

Heads that determine their charges by a constrained minimisation (``qeq``, ``functional``) attach the
implicit derivative of the charges only in training mode; the response is computed with the head in
training mode (nothing else changes with it) and the model restored afterwards.

A periodic cell's total dipole ``Σ q_i r_i`` depends on which image of each atom is used: the
response is evaluated at the positions as given (phonopy's cells keep every atom inside the cell).
For a constant total charge Q the acoustic sum rule ``Σ_i Z*_i = Q·1`` holds whatever the images
(:func:`asr_residual`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ase import Atoms

from aiida_emlip import schema
from aiida_emlip.models.graph import build_graph
from aiida_emlip.models.model import EmlipModel, model_capabilities

METHODS = ("autograd", "finite_difference")
#: Heads whose autograd Born charges are not exact (non-variational update): finite differences.
FINITE_DIFFERENCE_HEADS = ("scf",)


class ResponseError(ValueError):
    """The model cannot give the requested response (no charges, not periodic, bad method)."""


@dataclass
class DielectricResponse:
    """Born charges, polarisability and ε∞ of one structure as a model sees them."""

    born_charges: np.ndarray | None  # [N, 3, 3] e, Z*[i, α, β] = ∂F_iβ/∂E_α
    polarizability: np.ndarray  # [3, 3] e·Å²/V, ∂d_α/∂E_β
    epsilon: np.ndarray  # [3, 3] ε∞
    volume: float  # Å³
    total_charge: float  # e
    method: str  # how the Born charges were obtained
    notes: list[str] = field(default_factory=list)

    @property
    def asr_residual(self) -> float | None:
        """max ``|Σ_i Z*_i − Q·1|`` (e); None without Born charges."""
        if self.born_charges is None:
            return None
        return asr_residual(self.born_charges, self.total_charge)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists (JSON) under the schema's names."""
        return {
            schema.BORN_CHARGES: None if self.born_charges is None else self.born_charges.tolist(),
            schema.POLARIZABILITY: self.polarizability.tolist(),
            "epsilon": self.epsilon.tolist(),
            "volume": self.volume,
            "total_charge": self.total_charge,
            "method": self.method,
            "asr_residual": self.asr_residual,
            "notes": list(self.notes),
        }


def asr_residual(born: np.ndarray, total_charge: float = 0.0) -> float:
    """Largest element of ``Σ_i Z*_i − Q·1`` in absolute value (e): zero for a translation-invariant model."""
    total = np.asarray(born, dtype=float).sum(axis=0)
    return float(np.abs(total - total_charge * np.eye(3)).max())


def epsilon_from_polarizability(polarizability: np.ndarray, volume: float) -> np.ndarray:
    """ε∞ = 1 + 4π k_e α / V for α in e·Å²/V and V in Å³ (k_e in V·Å/e)."""
    alpha = np.asarray(polarizability, dtype=float)
    return np.eye(3) + 4.0 * math.pi * schema.COULOMB_CONSTANT * alpha / float(volume)


def capabilities(model: EmlipModel) -> frozenset[str]:
    """What the model predicts besides energy and forces (``charges``, ``polarizability``, ...)."""
    return model_capabilities(model.config.to_dict())


def require_charges(model: EmlipModel) -> None:
    """Raise :class:`ResponseError` when the model has no charges (no Born charges, no LO–TO splitting)."""
    if "charges" not in capabilities(model):
        raise ResponseError(
            f"the {model.config.head.get('name')!r} head has no charges, so no Born effective charges: "
            "the model cannot give the non-analytical (LO–TO) correction"
        )


@contextmanager
def response_mode(model: EmlipModel) -> Iterator[EmlipModel]:
    """The model in evaluation mode with its head in training mode (implicit charge derivatives)."""
    was_training = model.training
    model.eval()
    model.head.train(True)
    try:
        yield model
    finally:
        model.train(was_training)


def _graph(model: EmlipModel, atoms: Atoms, field_value: np.ndarray | None = None):
    atoms = atoms.copy()
    if field_value is not None:
        atoms.info[schema.EXTERNAL_FIELD] = np.asarray(field_value, dtype=float)
    graph = build_graph([atoms], model.cutoff, model.dtype, model.device)
    graph.external_field = graph.external_field.detach().clone().requires_grad_(True)
    graph.positions = graph.positions.detach().clone().requires_grad_(True)
    return graph


def _field(atoms: Atoms) -> np.ndarray:
    value = atoms.info.get(schema.EXTERNAL_FIELD)
    return np.zeros(3) if value is None else np.asarray(value, dtype=float).reshape(3)


def _born_autograd(model: EmlipModel, atoms: Atoms) -> np.ndarray:
    graph = _graph(model, atoms, _field(atoms))
    with response_mode(model), torch.enable_grad():
        out = model(graph, compute_forces=False, compute_stress=False, create_graph=True)
        (dedfield,) = torch.autograd.grad(out["energy"].sum(), graph.external_field, create_graph=True)
        rows = []
        for alpha in range(3):
            (grad,) = torch.autograd.grad(
                dedfield[0, alpha], graph.positions, retain_graph=alpha < 2, allow_unused=True
            )
            rows.append(torch.zeros_like(graph.positions) if grad is None else -grad)
    # rows[α][i, β] = −∂²E/∂E_α ∂r_iβ = ∂F_iβ/∂E_α
    return torch.stack(rows, dim=1).detach().cpu().numpy()


def model_forces(model: EmlipModel, atoms: Atoms) -> np.ndarray:
    """Forces (eV/Å) of the model in evaluation mode, field and total charge from ``atoms.info``."""
    was_training = model.training
    model.eval()
    try:
        graph = build_graph([atoms], model.cutoff, model.dtype, model.device)
        out = model(graph, compute_forces=True, compute_stress=False)
        return out["forces"].detach().cpu().numpy()
    finally:
        model.train(was_training)


def _born_finite_difference(model: EmlipModel, atoms: Atoms, step: float) -> np.ndarray:
    base = _field(atoms)
    rows = []
    for alpha in range(3):
        forces = []
        for sign in (1.0, -1.0):
            shifted = atoms.copy()
            value = base.copy()
            value[alpha] += sign * step
            shifted.info[schema.EXTERNAL_FIELD] = value
            forces.append(model_forces(model, shifted))
        rows.append((forces[0] - forces[1]) / (2.0 * step))
    return np.stack(rows, axis=1)


def born_charges(
    model: EmlipModel, atoms: Atoms, method: str | None = None, step: float = 1.0e-3
) -> tuple[np.ndarray, str]:
    """Born effective charges ``Z*[i, α, β] = ∂F_iβ/∂E_α`` (e) of ``atoms`` and the method used.

    ``method``: ``autograd`` (mixed second derivative of the energy), ``finite_difference`` (forces
    in fields ``±step`` V/Å along each axis) or None (autograd, finite differences for ``scf``).
    :raises ResponseError: the model has no charges, or an unknown method.
    """
    require_charges(model)
    if method is None:
        method = (
            "finite_difference" if model.config.head.get("name") in FINITE_DIFFERENCE_HEADS else "autograd"
        )
    if method not in METHODS:
        raise ResponseError(f"method must be one of {METHODS}, got {method!r}")
    if method == "autograd":
        return _born_autograd(model, atoms), method
    return _born_finite_difference(model, atoms, step), method


def polarizability(model: EmlipModel, atoms: Atoms) -> np.ndarray:
    """Electronic polarisability ``∂d_α/∂E_β`` (e·Å²/V) at clamped ions; zero for heads without response."""
    if "polarizability" not in capabilities(model):
        return np.zeros((3, 3))
    graph = _graph(model, atoms, _field(atoms))
    with response_mode(model), torch.enable_grad():
        out = model(graph, compute_forces=False, compute_stress=False, create_graph=False)
        dipole = out["dipole"][0]
        rows = []
        for alpha in range(3):
            (grad,) = torch.autograd.grad(
                dipole[alpha], graph.external_field, retain_graph=alpha < 2, allow_unused=True
            )
            rows.append(torch.zeros(3, dtype=model.dtype) if grad is None else grad[0].detach().cpu())
    return torch.stack(rows).numpy()


def dielectric_response(
    model: EmlipModel, atoms: Atoms, born: bool = True, method: str | None = None
) -> DielectricResponse:
    """Born charges (when ``born``), polarisability and ε∞ of a periodic ``atoms`` as ``model`` sees them.

    :raises ResponseError: ``atoms`` not periodic in three directions, or Born charges asked of a model
        without charges.
    """
    if not all(atoms.pbc):
        raise ResponseError("ε∞ and Born charges need a cell periodic in three directions")
    volume = float(abs(atoms.get_volume()))
    notes = []
    z_star, used = (None, "none")
    if born:
        z_star, used = born_charges(model, atoms, method)
    alpha = polarizability(model, atoms)
    if "polarizability" not in capabilities(model):
        notes.append(
            f"the {model.config.head.get('name')!r} head has no electronic response to a field: ε∞ = 1"
        )
    return DielectricResponse(
        born_charges=z_star,
        polarizability=alpha,
        epsilon=epsilon_from_polarizability(alpha, volume),
        volume=volume,
        total_charge=float(atoms.info.get(schema.TOTAL_CHARGE, 0.0) or 0.0),
        method=used,
        notes=notes,
    )
