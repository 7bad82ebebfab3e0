"""Model files whose config predates a key: the backbone layout (``backbone.last_layer_vectors``) and the
``split`` head's transfer cutoff.

Files written before the ``split`` head's transfers had a smooth envelope lack its ``envelope`` key; they
were trained with transfers kept whole up to a cutoff of 5 Å unless the file names another, and are read
so (:func:`explicit_head`): they predict what they did.

Model files record ``backbone.last_layer_vectors``: whether the last MACE layer keeps l = 1 features.
Files written before the key existed lack it, and two generations of them differ. The first kept l = 1
features in the last layer whatever the head; later ones only for heads that read atomic dipoles. A
missing key in a new config resolves to false for every head (:class:`~aiida_emlip.models.model.ModelConfig`),
so a file is read with the layout its weights fit: the l = 1 outputs of the last layer have weights of
their own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from aiida_emlip.models.model import EmlipModel, ModelConfig

KEY = "last_layer_vectors"
#: The ``split`` head's transfer cutoff (Å) and envelope in files written before the envelope existed.
FORMER_SPLIT = {"cutoff": 5.0, "envelope": "step"}


def explicit_head(config: dict[str, Any]) -> dict[str, Any]:
    """A file's model ``config`` with the ``split`` head's transfer envelope explicit: a file without it
    was written with transfers whole up to the cutoff, 5 Å unless it names another; ``config`` unchanged
    otherwise."""
    head = config.get("head")
    if not isinstance(head, dict) or head.get("name") != "split" or "envelope" in head:
        return config
    return {**config, "head": {**FORMER_SPLIT, **head}}


def state_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Name → shape of each tensor of a state dict."""
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def _fits(model: EmlipModel, shapes: Mapping[str, Sequence[int]]) -> bool:
    return state_shapes(model.state_dict()) == {name: tuple(shape) for name, shape in shapes.items()}


def model_for_weights(config: dict[str, Any], shapes: Mapping[str, Sequence[int]]) -> EmlipModel:
    """The model of a file's ``config`` for weights of ``shapes``, with its backbone layout explicit.

    With the key in ``config``: the model it describes. Without: the layout the key resolves to when
    the weights fit it, else the other layout when they fit that one (a file of the first generation),
    else the resolved one (loading the weights then reports the mismatch). The first model is built as
    any model is; a second one leaves torch's random state as it found it.
    """
    config = explicit_head(config)
    model = EmlipModel(ModelConfig.from_dict(config))
    backbone = dict(config.get("backbone") or {})
    if KEY in backbone or _fits(model, shapes):
        return model
    other = {**config, "backbone": {**backbone, KEY: not model.config.backbone[KEY]}}
    with torch.random.fork_rng(devices=[]):
        try:
            candidate = EmlipModel(ModelConfig.from_dict(other))
        except ValueError:  # no other layout is possible for this backbone
            return model
    return candidate if _fits(candidate, shapes) else model


def explicit_layout(config: dict[str, Any], shapes: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """A file's model ``config`` with ``backbone.last_layer_vectors`` as its weights of ``shapes`` have it.

    ``config`` unchanged when it has the key or is not a valid model config (its users report that);
    torch's random state is left as it was.
    """
    config = explicit_head(config)
    if KEY in dict(config.get("backbone") or {}):
        return config
    with torch.random.fork_rng(devices=[]):
        try:
            model = model_for_weights(config, shapes)
        except (TypeError, ValueError, KeyError):
            return config
    return {**config, "backbone": {**dict(config.get("backbone") or {}), KEY: model.config.backbone[KEY]}}
