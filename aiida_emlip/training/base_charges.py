"""Base charges measured on the data: a ``split`` head's ``formal_charges: mean`` (no AiiDA).

Like ``data.reference_energies: fit``, this is resolved once by the trainer from the training
structures, before the model is built: each element's base charge q⁰ becomes the mean of its DFT
charges (``ref_charges``) over the training split, taken over the fragments that stand apart where
there are any (:func:`mean_reference_charges`). The model file holds the numbers, so a trained model
does not depend on the data it came from. A warm start keeps the base charges of its initial model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from aiida_emlip import schema
from aiida_emlip.training.config import mean_charges_wanted, without_measured_charges
from aiida_emlip.training.data import Sample
from aiida_emlip.training.errors import DataError


def mean_reference_charges(
    samples: Sequence[Sample], elements: Sequence[str], cutoff: float
) -> dict[str, float]:
    """Each element's mean reference charge (e) over the training structures that have charges.

    Atoms of fragments that stand apart (structures whose graph at ``cutoff`` has several connected
    components: an ion and a molecule, two molecules) set the mean of their element, each fragment's
    charges first shifted uniformly to the integer nearest their sum (the rule the head applies to a
    fragment alone; a partition such as Hirshfeld leaves 0.01–0.03 e on a Li⁺ a few Å from a water).
    An element that never occurs in such a fragment takes the mean over every atom of its element.
    Every kind of fragment that stands apart in the data then has base charges summing to its integer
    charge (a water 0, a Li⁺ +1): alone it needs no correction of its total charge, so its charges
    change continuously as it joins another across the cutoff, where the transfers go to zero with
    their envelope. Means over every atom of a set with contact structures would not (a Li⁺ 0.96 and
    its water +0.01), and the per-fragment correction would move charge as the last bond crosses the
    cutoff.

    An element of ``elements`` that no structure with reference charges contains is a
    :class:`DataError`: its base charge would be a guess.
    """
    import torch

    from aiida_emlip.models.fragments import correct_fragment_charges, fragment_index
    from aiida_emlip.training.data import attach_graphs

    apart: dict[str, list[float]] = {e: [] for e in elements}
    every: dict[str, list[float]] = {e: [] for e in elements}
    labelled = [s for s in samples if schema.CHARGES in s.labels]
    attach_graphs(labelled, cutoff)
    for sample in labelled:
        charges = np.asarray(sample.labels[schema.CHARGES], dtype=float)
        symbols = sample.atoms.get_chemical_symbols()
        for symbol, charge in zip(symbols, charges):
            every[symbol].append(float(charge))
        with torch.no_grad():
            if fragment_index(sample.graph)[1] < 2:
                continue
            # each fragment at its integer charge, shifted uniformly: the head's own rule
            separated = correct_fragment_charges(torch.as_tensor(charges), sample.graph).numpy()
        for symbol, charge in zip(symbols, separated):
            apart[symbol].append(float(charge))
    missing = [e for e in elements if not every.get(e)]
    if missing:
        raise DataError(
            f"model.head.formal_charges {schema.MEAN_CHARGES!r} takes each element's base charge from "
            f"the mean reference charge ({schema.CHARGES!r}) of the training structures, but no training "
            f"structure with reference charges contains {missing}; give formal_charges as numbers"
        )
    return {e: float(np.mean(apart[e] or every[e])) for e in elements}


def resolve_mean_charges(
    model: dict[str, Any],
    samples: Sequence[Sample],
    elements: Sequence[str],
    init_charges: dict[str, float] | None = None,
) -> dict[str, Any]:
    """``model`` with ``head.formal_charges: mean`` replaced by numbers (unchanged otherwise).

    ``init_charges``: the base charges of a warm start's initial model, kept as they are (the weights
    were trained against them).
    """
    if not mean_charges_wanted(model):
        return model
    if init_charges is not None:
        charges = dict(init_charges)
    else:
        charges = mean_reference_charges(samples, elements, _cutoff(model))
    return {**model, "head": {**model["head"], "formal_charges": charges}}


def _cutoff(model: dict[str, Any]) -> float:
    """The graph's cutoff (the backbone's r_max) of a model section whose base charges are pending."""
    from aiida_emlip.models.backbone import BackboneConfig
    from aiida_emlip.models.model import ModelConfig

    config = ModelConfig.from_dict(without_measured_charges(model))
    return float(BackboneConfig(elements=config.elements, **config.backbone).r_max)
