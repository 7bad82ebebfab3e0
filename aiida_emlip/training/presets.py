"""Named training recipes, one per design: the same backbone and schedule, the head's own needs.

``preset_config(name, labels=..., epochs=...)`` returns an ``emlip-train`` configuration (without
``data.train`` and ``output_dir``, which the caller sets). Every design that carries physical charges
trains on the DFT multipoles whenever the data have them: the charges (``ref_charges``) always, the
atomic dipoles (``ref_dipoles``) for heads that predict them; heads without atomic dipoles (``qeq``,
``scf``, ``functional``) train on charges that carry the atomic dipoles as well
(``data.charges_from_dipoles``). The self-consistent ``scf`` head trains
in two stages as its authors do: ``direct`` (one update at the DFT charges, which needs
``ref_charges``) for a third of the epochs, then ``implicit`` (converged from the local guess, exact
gradients) for the rest; without reference charges it trains ``unrolled`` then ``implicit``. The
``charges``, ``split`` and ``scf`` presets add induced atomic dipoles (:data:`INDUCTION`); every preset
takes them on request, and drops them with ``induction=False``. On data with reference charges
``split``'s base charges are each element's mean DFT charge over the training structures
(``formal_charges: mean``), so that its transfers are small departures from them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from aiida_emlip import schema
from aiida_emlip.training.config import AUTO_MULTIPOLE_WEIGHTS

#: The named designs, in the order the design space lists them.
PRESETS = ("sr", "fixed", "charges", "latent", "split", "qeq", "scf", "functional")

#: Formal oxidation states used by ``fixed`` and as the base charges of ``split`` (element -> e).
FORMAL_CHARGES = {
    "H": 1.0,
    "Li": 1.0,
    "Na": 1.0,
    "K": 1.0,
    "Mg": 2.0,
    "Ca": 2.0,
    "Al": 3.0,
    "Si": 4.0,
    "O": -2.0,
    "F": -1.0,
    "Cl": -1.0,
    "C": 0.0,
    "Cu": 0.0,
}

#: The backbone every preset shares unless told otherwise: a small MACE (l = 1 features for dipoles).
BACKBONE = {
    "num_channels": 16,
    "max_L": 1,
    "max_ell": 2,
    "correlation": 2,
    "num_interactions": 2,
    "r_max": 4.0,
    "mlp_hidden": 16,
}

#: Loss weights on per-atom energies (eV/atom) and forces (eV/Å) shared by every preset.
LOSS = {"energy": 10.0, "forces": 1.0}

#: Supervised heads with charges but no atomic dipoles: they train on charges that carry the reference
#: atomic dipoles too (``data.charges_from_dipoles``), or their charges would hold half a water dipole.
CHARGE_ONLY = ("qeq", "scf", "functional")

#: Presets whose model has induced atomic dipoles (``model.induction``) unless told otherwise: on the
#: long-range benchmark they lowered the far-field energy error and the interaction error of ``split``,
#: ``charges`` and ``scf`` on both splits measured (the latter two since their fragments keep integer
#: charges, so there is no leaked charge for the dipoles to respond to).
INDUCTION = ("charges", "split", "scf")

#: Fraction of the epochs that ``scf`` spends in ``direct`` mode when reference charges exist.
SCF_DIRECT_FRACTION = 1.0 / 3.0


def _copy_charges(formal_charges: dict[str, float] | str | None) -> dict[str, float] | str:
    return formal_charges if isinstance(formal_charges, str) else dict(formal_charges or {})


def _head(name: str, labels: set[str], formal_charges: dict[str, float] | str) -> dict[str, Any]:
    dipoles = schema.ATOMIC_DIPOLES in labels
    heads: dict[str, dict[str, Any]] = {
        "sr": {"name": "sr"},
        "fixed": {"name": "fixed", "formal_charges": formal_charges},
        "charges": {"name": "charges", "correction": "weighted", "dipoles": dipoles},
        "latent": {"name": "latent"},
        "split": {"name": "split", "formal_charges": formal_charges, "dipoles": dipoles},
        "qeq": {"name": "qeq"},
        "scf": {"name": "scf", "on_failure": "flag"},
        # softness that can vanish: insulating where the data are, metallic where they are not
        "functional": {"name": "functional", "parametrization": "softness"},
    }
    return heads[name]


def _stages(name: str, labels: set[str], epochs: int) -> list[dict[str, Any]]:
    if name != "scf":
        return [{"name": "main", "epochs": epochs}]
    first = max(1, round(epochs * SCF_DIRECT_FRACTION)) if epochs > 1 else 0
    warmup = "direct" if schema.CHARGES in labels else "unrolled"
    stages = [{"name": warmup, "epochs": first, "scf_mode": warmup}] if first else []
    return [*stages, {"name": "implicit", "epochs": epochs - first, "scf_mode": "implicit"}]


def preset_config(
    name: str,
    *,
    labels: Iterable[str] = (),
    epochs: int = 100,
    elements: list[str] | None = None,
    backbone: dict[str, Any] | None = None,
    formal_charges: dict[str, float] | None = None,
    seed: int = 0,
    dtype: str = "float64",
    lr: float = 0.01,
    batch_size: int = 4,
    induction: bool | None = None,
) -> dict[str, Any]:
    """The ``emlip-train`` configuration of design ``name`` for data carrying ``labels`` (schema keys).

    ``induction`` adds induced atomic dipoles in the field of the head's density
    (:mod:`~aiida_emlip.models.induction`); None takes the preset's default (:data:`INDUCTION`).
    ``formal_charges`` default to :data:`FORMAL_CHARGES` for the elements present (``fixed``, and
    ``split`` on data without reference charges); ``split`` on data with reference charges takes each
    element's mean DFT charge over the training structures (``"mean"``, measured by the trainer).
    Raises ``ValueError`` for an unknown name or an element without a formal charge where one is needed.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    labels = set(labels)
    if formal_charges is None and name == "split" and schema.CHARGES in labels:
        formal_charges = schema.MEAN_CHARGES  # measured on the training split by the trainer
    elif formal_charges is None and name in ("fixed", "split"):
        missing = sorted(set(elements or []) - set(FORMAL_CHARGES))
        if missing:
            raise ValueError(f"preset {name!r}: no formal charge known for {missing}; give formal_charges")
        formal_charges = {e: FORMAL_CHARGES[e] for e in (elements or FORMAL_CHARGES)}
    model: dict[str, Any] = {
        "dtype": dtype,
        "backbone": copy.deepcopy(backbone if backbone is not None else BACKBONE),
        "head": _head(name, labels, _copy_charges(formal_charges)),
    }
    if elements:
        model["elements"] = list(elements)
    if induction is None:
        induction = name in INDUCTION
    if induction:
        model["induction"] = {"enabled": True}
    loss = dict(LOSS)
    if name not in ("sr", "fixed", "latent"):
        for quantity, weight in AUTO_MULTIPOLE_WEIGHTS.items():
            has = schema.CHARGES if quantity == "charges" else schema.ATOMIC_DIPOLES
            if has in labels and (quantity == "charges" or model["head"].get("dipoles")):
                loss[quantity] = weight
    data: dict[str, Any] = {"valid_fraction": 0.1, "test_fraction": 0.1, "batch_size": batch_size}
    if name in CHARGE_ONLY and schema.CHARGES in labels and schema.ATOMIC_DIPOLES in labels:
        data["charges_from_dipoles"] = True
    return {
        "seed": seed,
        "device": "auto",
        "data": data,
        "model": model,
        "optimizer": {"name": "adamw", "lr": lr},
        "scheduler": {"name": "cosine", "min_lr": lr / 100},
        "loss": loss,
        "multipoles": "off",
        "stages": _stages(name, labels, epochs),
        "checkpoint": {"every": 0},
    }
