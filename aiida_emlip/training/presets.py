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
(``formal_charges: mean``), so that its transfers are small departures from them; ``split`` also
weights its multipoles less and widens its Gaussian charges (:data:`MULTIPOLE_WEIGHTS`). ``functional``
moves charge only along the graph's bonds from base charges measured the same way, on narrower
Gaussians (:data:`FRAGMENT_DEFAULTS`), and weights its charges 100 (:data:`MULTIPOLE_WEIGHTS`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
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

#: Presets whose multipole loss weights differ from :data:`AUTO_MULTIPOLE_WEIGHTS` (see
#: :func:`preset_config`'s ``multipole_weights``); every other preset keeps those (not measured).
#: ``split`` trains on its charges and atomic dipoles with weight 1 and puts them on Gaussians of
#: σ = 2 Å (:data:`CHARGE_WIDTHS`): on the long-range benchmark (seed 1, five initialisations) the two
#: together brought its mean neutral energy error from 1.16 to 1.06 × ``sr``'s, with far-field ratios
#: of 0.21–0.26 (0.18–0.21 before) and fragment charges within 0.034 e. Neither alone did: weight 1
#: halved the far ratio but raised the neutral error (1.24 × ``sr``), σ = 2 Å lowered the neutral
#: error but lost the far field (0.34), and weight 30 gave 1.13. ``functional`` trains on its charges
#: with weight 100 (see :data:`FRAGMENT_DEFAULTS`; weight 300 and 30 with bonds: neutral errors 1.22 and
#: 1.29 × ``sr``'s on the contact-dense data, where 100 gave 1.05).
MULTIPOLE_WEIGHTS: dict[str, tuple[float, ...]] = {"split": (1.0,), "functional": (100.0,)}

#: Presets whose Gaussian charges and dipoles have another width σ (Å) than the model's default (see
#: :func:`preset_config`'s ``charge_width``; ``split``: see :data:`MULTIPOLE_WEIGHTS`; ``functional``:
#: see :data:`FRAGMENT_DEFAULTS`).
CHARGE_WIDTHS: dict[str, float] = {"split": 2.0, "functional": 1.0}
#: Presets whose head has the ``fragments`` option (:func:`preset_config`'s ``fragments``; written out so that
#: this module imports no torch, and checked against the heads by the tests).
FRAGMENT_HEADS = ("charges", "split", "qeq", "scf", "functional")
#: Presets that set ``fragments`` themselves (the others take their head's default: ``integer`` for
#: ``charges``, ``split`` and ``scf``, ``shared`` for ``qeq``, the classic equilibration whose leak across
#: vacuum the study contrasts with the insulating designs). ``functional`` moves charge along the graph's
#: bonds (``bonds``: split-charge equilibration, base charges measured on the data as for ``split``), with
#: Gaussians of σ = 1 Å (:data:`CHARGE_WIDTHS`): on the long-range benchmark (seed 0 split, four
#: initialisations each) its largest fragment-charge error fell from 0.147 to 0.097 e on the default files
#: and from 0.087 to 0.062 e with dense Li⁺ contact cells (every initialisation within 0.1 e there),
#: against integer fragments with weight 300; far-field ratios 0.25–0.26, neutral errors 0.91 and 1.05 ×
#: ``sr``'s; and its charges no longer jump as fragments meet.
FRAGMENT_DEFAULTS: dict[str, str] = {"functional": "bonds"}


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


def _shares(epochs: int, parts: int) -> list[int]:
    """``epochs`` cut into ``parts`` consecutive shares as equal as they can be (the last ones longer)."""
    return [(epochs * (k + 1)) // parts - (epochs * k) // parts for k in range(parts)]


def _multipole_stages(epochs: int, weights: tuple[float, ...], quantities: list[str]) -> list[dict[str, Any]]:
    """One stage per multipole weight, each over an equal share of the epochs, weighting ``quantities``."""
    return [
        {"name": "main" if k == 0 else f"multipoles{k}", "epochs": n, "weights": dict.fromkeys(quantities, w)}
        for k, (n, w) in enumerate(zip(_shares(epochs, len(weights)), weights, strict=True))
        if n > 0
    ]


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
    multipole_weights: Sequence[float] | None = None,
    charge_width: float | None = None,
    fragments: str | None = None,
) -> dict[str, Any]:
    """The ``emlip-train`` configuration of design ``name`` for data carrying ``labels`` (schema keys).

    ``induction`` adds induced atomic dipoles in the field of the head's density
    (:mod:`~aiida_emlip.models.induction`); None takes the preset's default (:data:`INDUCTION`).
    ``formal_charges`` default to :data:`FORMAL_CHARGES` for the elements present (``fixed``, and
    ``split`` on data without reference charges; ``qeq`` and ``functional`` with ``bonds`` likewise, an
    element without a formal charge at 0); on data with reference charges ``split`` and the ``bonds``
    heads take each element's mean DFT charge over the training structures (``"mean"``, measured by the
    trainer).
    ``multipole_weights`` weight the reference charges and atomic dipoles alike, one weight over each
    equal share of the epochs (``(10, 1)``: 10 for the first half, 1 for the second; one stage each);
    None takes the preset's (:data:`MULTIPOLE_WEIGHTS`, else :data:`AUTO_MULTIPOLE_WEIGHTS`). ``scf``,
    which has stages of its own, takes one weight only. ``charge_width`` is the width σ (Å) of the
    head's Gaussian charges and dipoles (``model.electrostatics.sigma``); None takes the preset's
    (:data:`CHARGE_WIDTHS`, else the model's default). ``fragments`` (``integer`` or ``shared``; ``bonds``
    for ``qeq`` and ``functional``, whose base charges are then those of ``split``) sets how
    the head meets the total charge across fragments that no edge joins
    (:mod:`~aiida_emlip.models.fragments`), for the heads that have the option (:data:`FRAGMENT_HEADS`);
    None takes the preset's (:data:`FRAGMENT_DEFAULTS`, else the head's default).
    Raises ``ValueError`` for an unknown name, an element without a formal charge where one is needed,
    or multipole weights that are empty, negative or several for ``scf``, and ``fragments`` for a head
    without the option.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    if fragments is not None and name not in FRAGMENT_HEADS:
        raise ValueError(
            f"preset {name!r} has no fragments option; the heads with one: {', '.join(FRAGMENT_HEADS)}"
        )
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    labels = set(labels)
    fragments = fragments if fragments is not None else FRAGMENT_DEFAULTS.get(name)
    # base charges: split's, and the equilibrating heads' with charge moving along bonds
    based = name == "split" or (name in ("qeq", "functional") and fragments == "bonds")
    if formal_charges is None and based and schema.CHARGES in labels:
        formal_charges = schema.MEAN_CHARGES  # measured on the training split by the trainer
    elif formal_charges is None and name in ("qeq", "functional") and based:
        # bonds equilibrate within each fragment: an element without a known formal charge starts neutral
        formal_charges = {e: FORMAL_CHARGES.get(e, 0.0) for e in (elements or FORMAL_CHARGES)}
    elif formal_charges is None and (based or name == "fixed"):
        missing = sorted(set(elements or []) - set(FORMAL_CHARGES))
        if missing:
            raise ValueError(f"preset {name!r}: no formal charge known for {missing}; give formal_charges")
        formal_charges = {e: FORMAL_CHARGES[e] for e in (elements or FORMAL_CHARGES)}
    model: dict[str, Any] = {
        "dtype": dtype,
        "backbone": copy.deepcopy(backbone if backbone is not None else BACKBONE),
        "head": _head(name, labels, _copy_charges(formal_charges)),
    }
    if fragments is not None:
        model["head"]["fragments"] = fragments
    if based and name != "split":
        model["head"]["formal_charges"] = _copy_charges(formal_charges)
    if elements:
        model["elements"] = list(elements)
    width = charge_width if charge_width is not None else CHARGE_WIDTHS.get(name)
    if width is not None:
        model["electrostatics"] = {"sigma": float(width)}
    if induction is None:
        induction = name in INDUCTION
    if induction:
        model["induction"] = {"enabled": True}
    weights = _check_multipole_weights(name, multipole_weights)
    loss = dict(LOSS)
    supervised = _supervised(name, labels, model["head"])
    for quantity in supervised:
        loss[quantity] = weights[0] if weights else AUTO_MULTIPOLE_WEIGHTS[quantity]
    stages = _stages(name, labels, epochs)
    if weights and len(weights) > 1 and supervised:
        stages = _multipole_stages(epochs, weights, supervised)
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
        "stages": stages,
        "checkpoint": {"every": 0},
    }


def _supervised(name: str, labels: set[str], head: dict[str, Any]) -> list[str]:
    """The multipole loss quantities that preset ``name`` trains on, given the data's ``labels``."""
    if name in ("sr", "fixed", "latent"):
        return []
    out = ["charges"] if schema.CHARGES in labels else []
    if schema.ATOMIC_DIPOLES in labels and head.get("dipoles"):
        out.append("atomic_dipoles")
    return out


def _check_multipole_weights(name: str, weights: Sequence[float] | None) -> tuple[float, ...]:
    """The multipole weights of preset ``name``: the given ones, else the preset's (empty: the defaults)."""
    out = tuple(float(w) for w in weights) if weights is not None else MULTIPOLE_WEIGHTS.get(name, ())
    if weights is not None and not out:
        raise ValueError("multipole_weights: give at least one weight")
    if any(w < 0 for w in out):
        raise ValueError(f"multipole_weights must be >= 0, got {list(out)}")
    if name == "scf" and len(out) > 1:
        raise ValueError("preset 'scf' has stages of its own: give it one multipole weight")
    return out
