"""Loss terms and error metrics (RMSE/MAE per quantity, per config type and per total-charge state)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch

from aiida_emlip import schema
from aiida_emlip.models.fragments import fragment_structures
from aiida_emlip.models.graph import Graph
from aiida_emlip.models.heads.base import ChargeConstraintError
from aiida_emlip.models.heads.solvers import SCFConvergenceError
from aiida_emlip.models.model import EmlipModel
from aiida_emlip.training.config import LABEL_OF
from aiida_emlip.training.data import Batch
from aiida_emlip.training.errors import ConfigError, DataError, ScfFailedError

#: Model output key of each loss quantity.
OUTPUT_OF = {
    "energy": "energy",
    "forces": "forces",
    "stress": "stress",
    "charges": "charges",
    "atomic_dipoles": "dipoles",
    "dipole": "dipole",
    "fermi_level": "fermi_level",
    "polarizability": "polarizability",
}
PER_ATOM = {"forces", "charges", "atomic_dipoles"}
#: Quantities reported per atom of the structure (value / N).
NORMALISED = {"energy", "dipole", "polarizability"}
UNITS = {
    "energy": "eV/atom",
    "forces": "eV/Å",
    "stress": "eV/Å^3",
    "charges": "e",
    "atomic_dipoles": "e·Å",
    "dipole": "e·Å/atom",
    "fermi_level": "eV",
    "polarizability": "e·Å^2/V/atom",
}


def predict(
    model: EmlipModel,
    batch: Batch,
    need: set[str],
    scf_mode: str = "converge",
    training: bool = True,
) -> dict[str, Any]:
    """Run ``model`` on ``batch`` in ``scf_mode``; compute forces/stress/polarisability only when needed."""
    graph: Graph = batch.graph
    want_pol = "polarizability" in need
    if want_pol:
        graph.external_field = graph.external_field.detach().clone().requires_grad_(True)
    ref_q = batch.labels.get(schema.CHARGES) if scf_mode == "direct" else None
    ref_p = batch.labels.get(schema.ATOMIC_DIPOLES) if scf_mode == "direct" else None
    try:
        out = model(
            graph,
            compute_forces="forces" in need,
            compute_stress="stress" in need,
            create_graph=training or want_pol,
            scf_mode=scf_mode,
            reference_charges=ref_q,
            reference_dipoles=ref_p,
        )
    except ChargeConstraintError as exc:
        raise DataError(f"structures {batch.indices}: {exc}") from None
    except SCFConvergenceError as exc:
        raise ScfFailedError(
            f"structures {batch.indices} (scf_mode {scf_mode}): {exc}. With the head option "
            f"on_failure: flag training continues and metrics.json reports the converged fraction"
        ) from None
    if want_pol:
        dipole = out["dipole"]
        rows = [
            torch.autograd.grad(
                dipole[:, i].sum(),
                graph.external_field,
                create_graph=training,
                retain_graph=True,
                allow_unused=True,
            )[0]
            for i in range(3)
        ]
        rows = [torch.zeros_like(graph.external_field) if r is None else r for r in rows]
        out["polarizability"] = torch.stack(rows, dim=1)  # [B, i, j] = ∂d_i/∂E_j
    return out


def _per_structure_mask(batch: Batch, key: str) -> torch.Tensor:
    return batch.masks[key]


def _atom_mask(batch: Batch, mask: torch.Tensor) -> torch.Tensor:
    return mask[batch.graph.batch]


def residuals(out: dict[str, Any], batch: Batch, quantity: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Prediction minus label for the rows that have both, and the owning structure of each row."""
    label_key = LABEL_OF[quantity]
    pred = out.get(OUTPUT_OF[quantity])
    if label_key not in batch.labels or pred is None:
        return None
    mask = _per_structure_mask(batch, label_key)
    ref = batch.labels[label_key]
    if quantity in PER_ATOM:
        rows = _atom_mask(batch, mask)
        owner = batch.graph.batch
    else:
        rows = mask
        owner = torch.arange(batch.graph.num_graphs, device=mask.device)
        if quantity == "stress":
            rows = rows & torch.isfinite(pred).flatten(1).all(1)
    diff = (pred - ref)[rows]
    if quantity in NORMALISED:
        n = batch.num_atoms[rows]
        diff = diff / n.reshape(-1, *([1] * (diff.dim() - 1)))
    return diff, owner[rows]


def loss_terms(out: dict[str, Any], batch: Batch, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """Mean squared error of each weighted quantity (unweighted; multiply by the weights to sum)."""
    terms = {}
    for quantity, weight in weights.items():
        if weight <= 0:
            continue
        if out.get(OUTPUT_OF[quantity]) is None and LABEL_OF[quantity] in batch.labels:
            raise ConfigError(
                f"loss weight for {quantity!r} is {weight} but this head predicts no {quantity}; "
                f"set its weight to 0"
            )
        res = residuals(out, batch, quantity)
        if res is None or res[0].numel() == 0:
            continue
        terms[quantity] = (res[0] ** 2).mean()
        if quantity == "charges":
            fragments = fragment_residuals(out, batch)
            if fragments is not None and fragments.numel():
                terms[quantity] = terms[quantity] + (fragments**2).mean()
    return terms


def fragment_residuals(out: dict[str, Any], batch: Batch) -> torch.Tensor | None:
    """Structure-wide charge of each fragment minus its reference charge, for the structures that
    fall apart into several fragments and carry reference charges.

    Heads that give separated fragments integer charges decide each integer by the fragment's
    charge under one structure-wide correction (``fragment_charges``); supervising that charge teaches
    the decision, which is not differentiable itself (an ion alone in its fragment carries exactly its
    integer, whatever its readout).
    """
    index, shared = out.get("fragment_index"), out.get("fragment_charges")
    if index is None or shared is None or schema.CHARGES not in batch.labels:
        return None
    graph = batch.graph
    count = shared.numel()
    fragment_batch = fragment_structures(index, count, graph)
    per_structure = torch.bincount(fragment_batch, minlength=graph.num_graphs)
    keep = _per_structure_mask(batch, schema.CHARGES)[fragment_batch] & (per_structure[fragment_batch] > 1)
    reference = torch.nan_to_num(batch.labels[schema.CHARGES].to(shared.dtype))
    reference = shared.new_zeros(count).index_add(0, index, reference)
    return (shared - reference)[keep]


def total_loss(terms: dict[str, torch.Tensor], weights: dict[str, float], like: torch.Tensor) -> torch.Tensor:
    loss = like.new_zeros(())
    for quantity, value in terms.items():
        loss = loss + weights[quantity] * value
    return loss


class ErrorTable:
    """Accumulates squared and absolute errors by quantity and group (all, config type, charge)."""

    def __init__(self) -> None:
        self.sq: dict[tuple[str, str], float] = defaultdict(float)
        self.ab: dict[tuple[str, str], float] = defaultdict(float)
        self.n: dict[tuple[str, str], int] = defaultdict(int)

    def add(self, out: dict[str, Any], batch: Batch, quantities: list[str]) -> None:
        for quantity in quantities:
            res = residuals(out, batch, quantity)
            if res is None:
                continue
            diff, owner = res
            diff = diff.detach().reshape(diff.shape[0], -1).double().cpu().numpy()
            # the rows' sums at once, added row by row in order: the same sums as one row at a time
            sq, ab = (diff**2).sum(axis=1).tolist(), np.abs(diff).sum(axis=1).tolist()
            size = diff.shape[1]
            keys: dict[int, list[tuple[str, str]]] = {}
            for i, b in enumerate(owner.cpu().tolist()):
                if b not in keys:
                    keys[b] = [(quantity, group) for group in self.groups(batch, b)]
                for key in keys[b]:
                    self.sq[key] += sq[i]
                    self.ab[key] += ab[i]
                    self.n[key] += size

    @staticmethod
    def groups(batch: Batch, b: int) -> tuple[str, ...]:
        return ("all", f"config_type={batch.config_types[b]}", f"total_charge={batch.total_charges[b]:+g}")

    def merge_from(self, arrays: dict[tuple[str, str], tuple[float, float, int]]) -> None:
        for key, (sq, ab, n) in arrays.items():
            self.sq[key] += sq
            self.ab[key] += ab
            self.n[key] += n

    def raw(self) -> dict[tuple[str, str], tuple[float, float, int]]:
        return {k: (self.sq[k], self.ab[k], self.n[k]) for k in self.n}

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{quantity: {group: {rmse, mae, count, unit}}}``."""
        table: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
        for (quantity, group), n in sorted(self.n.items()):
            if n == 0:
                continue
            table[quantity][group] = {
                "rmse": float(np.sqrt(self.sq[(quantity, group)] / n)),
                "mae": self.ab[(quantity, group)] / n,
                "count": n,
                "unit": UNITS[quantity],
            }
        return dict(table)


def format_table(summary: dict[str, dict[str, dict[str, float]]], title: str = "errors") -> str:
    """A plain-text error table."""
    lines = [f"{title}:", f"{'quantity':<16}{'group':<28}{'RMSE':>12}{'MAE':>12}{'n':>8}  unit"]
    for quantity, groups in summary.items():
        for group, row in groups.items():
            lines.append(
                f"{quantity:<16}{group:<28}{row['rmse']:>12.5g}{row['mae']:>12.5g}"
                f"{row['count']:>8d}  {row['unit']}"
            )
    return "\n".join(lines)
