"""What a checkpoint belongs to: the training data (SHA-256 of the files), the seed and the schedule.

``--resume`` compares the identity stored in a checkpoint with that of the current configuration
field by field; only the epochs of the last stage may differ (that extends or shortens the run).
Settings that do not change what is trained (device, threads, progress, output and checkpoint
locations, validation batch size) are not part of the identity. A warm-started run (``init_from``) is
identified by the sha256 of its initial model file (:data:`INIT_KEY`), not by that file's path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from aiida_emlip.training.config import DataConfig

#: Configuration entries left out of the identity (dotted paths).
NOT_IDENTITY = (
    "output_dir",
    "device",
    "progress",
    "num_threads",
    "checkpoint",
    "data.train",
    "data.valid",
    "data.test",
    "data.valid_batch_size",
    "init_from",
)
#: Identity key of the sha256 of the initial model file of a warm start (absent for a cold start).
INIT_KEY = "init_from.sha256"
#: Identity key of the digest of each data file.
DIGEST_KEY = "data.sha256.{role}"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_digests(data: DataConfig) -> dict[str, str | None]:
    """SHA-256 of the bytes of the train, valid and test files (``None`` where no file is given)."""
    return {
        role: file_sha256(p) if (p := getattr(data, role)) else None for role in ("train", "valid", "test")
    }


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if prefix in NOT_IDENTITY:
        return
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, list) and value and prefix == "stages":
        for i, item in enumerate(value):
            _flatten(item, f"{prefix}[{i}]", out)
    else:
        out[prefix] = value


def run_identity(
    config: dict[str, Any], digests: dict[str, str | None] | None, init_sha256: str | None = None
) -> dict[str, Any]:
    """Flat mapping ``dotted.key -> value`` of everything a run's results depend on (``init_sha256``:
    the sha256 of the model file a warm start begins from)."""
    out: dict[str, Any] = {}
    _flatten(config, "", out)
    for role, digest in (digests or {}).items():
        out[DIGEST_KEY.format(role=role)] = digest
    if init_sha256 is not None:
        out[INIT_KEY] = init_sha256
    return out


def last_stage_epochs_key(config: dict[str, Any]) -> str:
    return f"stages[{len(config['stages']) - 1}].epochs"


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"
    return "absent" if value is _MISSING else repr(value)


_MISSING = object()


def differences(saved: dict[str, Any], current: dict[str, Any], allowed: tuple[str, ...] = ()) -> list[str]:
    """``key (checkpoint A, now B)`` for each identity entry that differs, except the ``allowed`` keys.

    A checkpoint without data digests (an older format) is compared on its configuration only.
    """
    keys = sorted(set(saved) | set(current))
    out = []
    for key in keys:
        if key in allowed:
            continue
        if key.startswith("data.sha256.") and not any(k.startswith("data.sha256.") for k in saved):
            continue
        old, new = saved.get(key, _MISSING), current.get(key, _MISSING)
        if old != new:
            out.append(f"{key} (checkpoint {_show(old)}, now {_show(new)})")
    return out
