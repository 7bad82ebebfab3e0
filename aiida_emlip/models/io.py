"""Model files: weights in safetensors with the JSON config in its header; never unpickled."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from aiida_emlip import __version__
from aiida_emlip.models.file_format import (
    CHECKSUM_KEY,
    FORMAT,
    ModelFileError,
    ModelFileWarning,
    checksum,
    parse_header,
    read_metadata,
)
from aiida_emlip.models.file_layout import model_for_weights, state_shapes
from aiida_emlip.models.model import EmlipModel

__all__ = (
    "FORMAT",
    "ModelFileError",
    "ModelFileWarning",
    "load_model",
    "read_metadata",
    "resolve_device",
    "save_model",
    "versions",
)


def versions() -> dict[str, str]:
    """Versions of the libraries that define the model's numerics."""
    import torchpme

    from aiida_emlip.models.mace_import import mace

    return {
        "aiida-emlip": __version__,
        "torch": torch.__version__,
        "mace-torch": getattr(mace, "__version__", "unknown"),
        "torch-pme": torchpme.__version__,
    }


def _serialise(tensors: dict[str, torch.Tensor], metadata: dict[str, str], name: str) -> bytes:
    """The file's bytes with the checksum of the tensors and the metadata in its header."""
    draft = safetensors.torch.save(tensors, metadata=metadata)
    header = parse_header(draft, len(draft), name)
    metadata = {**metadata, CHECKSUM_KEY: checksum(header.tensors, metadata, [draft[header.data_start :]])}
    blob = safetensors.torch.save(tensors, metadata=metadata)
    header = parse_header(blob, len(blob), name)
    if checksum(header.tensors, header.metadata, [blob[header.data_start :]]) != metadata[CHECKSUM_KEY]:
        raise RuntimeError(f"safetensors wrote {name} differently twice; cannot checksum it")
    return blob


def serialize_model(model: EmlipModel, extra: dict[str, Any] | None = None, name: str = "model") -> bytes:
    """The bytes of a model file: weights plus config, versions and ``extra`` as JSON, with the checksum
    of the weights and these entries in the header (checked by every load)."""
    if getattr(model.backbone, "kernels", "e3nn") != "e3nn":
        raise ValueError(
            f"this model runs {model.backbone.kernels} kernels, an inference-only layout: save it before "
            "switching kernels (the file keeps e3nn's layout, which loads everywhere)"
        )
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "config": json.dumps(model.config.to_dict()),
        "versions": json.dumps(versions()),
        "extra": json.dumps(extra or {}),
    }
    return _serialise(tensors, metadata, name)


def save_model(model: EmlipModel, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``path`` (``.safetensors``): weights plus config, versions and ``extra`` as JSON.

    The header also holds the sha256 of the weights and these entries, checked by every load. The
    file is written under a temporary name and renamed: an interrupted save leaves no partial file.
    """
    path = Path(path)
    blob = serialize_model(model, extra, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> EmlipModel:
    """Rebuild the model from its JSON config and load its weights (strict), once the file is verified.

    A config without ``backbone.last_layer_vectors`` (a file written before the key existed) gets the
    backbone layout its weights were written for (:mod:`~aiida_emlip.models.file_layout`).

    Every problem with the file (missing, pickled, truncated, corrupted, another format, weights that
    do not fit the config) is a :class:`ModelFileError` with a one-line message.
    """
    meta = read_metadata(path)
    try:
        state = safetensors.torch.load_file(str(path), device="cpu")
    except (safetensors.SafetensorError, RuntimeError, ValueError) as exc:
        raise ModelFileError(f"{path}: its weights cannot be loaded: {_first_line(exc)}") from None
    try:
        if not isinstance(meta["config"], dict):
            raise ValueError("not a mapping")
        model = model_for_weights(meta["config"], state_shapes(state))
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelFileError(f"{path}: its model config is not valid: {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise ModelFileError(f"{path}: its weights cannot be loaded: {_first_line(exc)}") from None
    return model.to(resolve_device(device))


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else as given (checked)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelFileError(
            "device 'cuda' requested but torch sees no CUDA device; use --device auto or cpu"
        )
    return device
