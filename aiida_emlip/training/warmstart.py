"""Warm start (``init_from``): a new run whose model starts from the weights of an existing model file.

The model file is verified (its checksum) and its architecture compared with the configuration's
``model`` section, resolved with every default: elements, dtype, the head and its options, the backbone,
the electrostatics and the induced-dipole settings must be the same, or
:func:`architecture_differences` names each key that differs. The backbone's layout
(``backbone.last_layer_vectors``) is among them: a file written before that key existed gets the value
its weights were written for, so a model whose last layer keeps l = 1 features that the configuration's
head does not read is refused with a message naming the key to set. The weights and every persistent
buffer (the per-element reference energies included) are taken as they are; the optimiser, the
scheduler and the EMA start fresh. Only what is read here is used: the file is never unpickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from aiida_emlip.models.file_format import CHECKSUM_KEY, ModelFileError, file_sha256, verify
from aiida_emlip.training.errors import ConfigError, DataError

#: The backbone key of the last layer's l = 1 features, explicit in the initial model's config once read
#: (from its weights for a file written before the key existed).
LAYOUT_KEY = "last_layer_vectors"
#: The sections of the model configuration that make its architecture (compared key by key).
ARCHITECTURE = ("elements", "dtype", "head", "backbone", "electrostatics", "induction")


@dataclass(frozen=True)
class InitModel:
    """A verified model file to start from: its model config, its tensors and its checksums."""

    path: Path
    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    #: sha256 of the whole file (the ``sha256`` attribute of an ``emlip.model`` node of it).
    sha256: str
    #: The checksum of the weights and metadata stored in the file's header (``None``: an older file).
    weights_sha256: str | None
    extra: dict[str, Any]

    @property
    def elements(self) -> list[str]:
        return list(self.config["elements"])

    def record(self) -> dict[str, Any]:
        """What the run records of the model it started from (``metrics.json``, the model file)."""
        training = self.extra.get("training") if isinstance(self.extra, dict) else None
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "weights_sha256": self.weights_sha256,
            "epochs": training.get("epochs") if isinstance(training, dict) else None,
        }


def read_init_model(path: str | Path) -> InitModel:
    """The model file ``path`` of ``init_from``, verified; a :class:`ConfigError` (exit 2) otherwise."""
    import safetensors
    import safetensors.torch

    from aiida_emlip.models.file_layout import explicit_layout, state_shapes

    path = Path(path)
    try:
        metadata = verify(path)
        try:
            config = json.loads(metadata["config"])
            extra = json.loads(metadata.get("extra", "{}"))
        except (KeyError, json.JSONDecodeError):
            raise ModelFileError(f"{path} is corrupted: its 'config' entry is missing or not JSON") from None
        if not isinstance(config, dict) or not isinstance(config.get("elements"), list):
            raise ModelFileError(f"{path} is corrupted: its model config has no elements")
        try:
            state = safetensors.torch.load_file(str(path), device="cpu")
        except (safetensors.SafetensorError, OSError, ValueError) as exc:
            raise ModelFileError(f"{path}: its weights cannot be read: {exc}") from None
    except ModelFileError as exc:
        raise ConfigError(f"init_from: {exc}") from None
    return InitModel(
        path=path,
        config=explicit_layout(config, state_shapes(state)),
        state=state,
        sha256=file_sha256(path),
        weights_sha256=metadata.get(CHECKSUM_KEY),
        extra=extra if isinstance(extra, dict) else {},
    )


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples as lists), so that the two sides compare alike."""
    return json.loads(json.dumps(value, default=str))


def resolved_architecture(config: dict[str, Any]) -> dict[str, Any]:
    """Flat ``section.key -> value`` of a model config with every default filled in.

    ``config`` is a model config mapping (``elements``, ``head``, ``backbone``, ``electrostatics``,
    ``dtype``); it must be valid (:class:`~aiida_emlip.models.model.ModelConfig` accepts it).
    """
    from aiida_emlip.models.backbone import BackboneConfig
    from aiida_emlip.models.electrostatics import ElectrostaticsConfig
    from aiida_emlip.models.heads.base import head_class
    from aiida_emlip.models.induction import InductionConfig
    from aiida_emlip.models.model import ModelConfig

    model = ModelConfig.from_dict(config)
    out: dict[str, Any] = {"elements": list(model.elements), "dtype": model.dtype}
    head = dict(model.head)
    _, options = head_class(head)
    out["head.name"] = head.get("name")
    for key, value in asdict(options).items():
        out[f"head.{key}"] = value
    backbone = asdict(BackboneConfig(elements=model.elements, **model.backbone))
    backbone.pop("elements")
    for key, value in backbone.items():
        out[f"backbone.{key}"] = value
    for key, value in asdict(ElectrostaticsConfig(**model.electrostatics)).items():
        out[f"electrostatics.{key}"] = value
    for key, value in asdict(InductionConfig(**model.induction)).items():
        out[f"induction.{key}"] = value
    return _plain(out)


def architecture_differences(init: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """``model.KEY (init model A, config B)`` for each architecture key in which the two differ."""
    old, new = resolved_architecture(init), resolved_architecture(config)
    missing = object()
    out = []
    for key in sorted(set(old) | set(new), key=lambda k: (ARCHITECTURE.index(k.split(".")[0]), k)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            show = ["absent" if v is missing else repr(v) for v in (a, b)]
            out.append(f"model.{key} (init model {show[0]}, config {show[1]})")
    return out


def check_new_elements(init: InitModel, present: list[str]) -> None:
    """A :class:`DataError` when the data hold an element the initial model has no weights for."""
    new = sorted(set(present) - set(init.elements))
    if new:
        raise DataError(
            f"the data contain element(s) {new} that the initial model {init.path} (init_from) lacks "
            f"(its elements: {init.elements}); a warm start cannot add elements: train from scratch "
            f"(without init_from) on the new data"
        )


def check_architecture(init: InitModel, config: dict[str, Any]) -> None:
    """A :class:`ConfigError` naming every architecture key in which ``config`` differs from ``init``."""
    try:
        differ = architecture_differences(init.config, config)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"init_from: {init.path}: its model config is not valid: {exc}") from None
    if differ:
        layout = any(d.startswith(f"model.backbone.{LAYOUT_KEY} ") for d in differ)
        hint = (
            f" (model.backbone.{LAYOUT_KEY}: true keeps the l = 1 features of the last backbone layer "
            f"that the initial model has)"
            if layout and dict(init.config.get("backbone") or {}).get(LAYOUT_KEY)
            else ""
        )
        raise ConfigError(
            f"init_from: the model {init.path} differs from the configuration's model section in "
            f"{len(differ)} key(s): {'; '.join(differ)}. A warm start needs the same elements, dtype, "
            f"head, backbone, electrostatics and induction: make the model section match, or train from "
            f"scratch without init_from{hint}"
        )


def load_init_weights(model: torch.nn.Module, init: InitModel) -> None:
    """Copy the initial model's weights and persistent buffers into ``model`` (strict)."""
    try:
        model.load_state_dict(init.state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"init_from: the weights of {init.path} do not fit the model: {first}") from None
