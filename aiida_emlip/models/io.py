"""Model files: weights in safetensors with the JSON config in its header; never unpickled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from aiida_emlip import __version__
from aiida_emlip.models.model import EmlipModel, ModelConfig

FORMAT = "aiida-emlip-model/1"


class ModelFileError(ValueError):
    """A model file is missing, unsafe or not an aiida-emlip model."""


def versions() -> dict[str, str]:
    """Versions of the libraries that define the model's numerics."""
    import mace
    import torchpme

    return {
        "aiida-emlip": __version__,
        "torch": torch.__version__,
        "mace-torch": getattr(mace, "__version__", "unknown"),
        "torch-pme": torchpme.__version__,
    }


def serialize_model(model: EmlipModel, extra: dict[str, Any] | None = None) -> bytes:
    """The bytes of a model file: weights plus config, versions and ``extra`` as JSON."""
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "config": json.dumps(model.config.to_dict()),
        "versions": json.dumps(versions()),
        "extra": json.dumps(extra or {}),
    }
    return safetensors.torch.save(tensors, metadata=metadata)


def save_model(model: EmlipModel, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``path`` (``.safetensors``): weights plus config, versions and ``extra`` as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serialize_model(model, extra))
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Config, versions and extra information of a model file, without building the model."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    with path.open("rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        raise ModelFileError(
            f"{path} is not a safetensors model file (pickled checkpoints are refused: they can run code)"
        )
    with safetensors.safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{path} is a safetensors file but not an {FORMAT} model")
    return {key: json.loads(meta[key]) for key in ("config", "versions", "extra")}


def load_model(path: str | Path, device: str | torch.device = "cpu") -> EmlipModel:
    """Rebuild the model from its JSON config and load its weights (strict)."""
    meta = read_metadata(path)
    model = EmlipModel(ModelConfig.from_dict(meta["config"]))
    state = safetensors.torch.load_file(str(path), device="cpu")
    model.load_state_dict(state, strict=True)
    return model.to(resolve_device(device))


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
