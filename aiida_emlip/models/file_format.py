"""The model file's layout, read and checked without torch: safetensors header, format tag, checksum.

A model file is a safetensors file: an 8-byte little-endian header length, a JSON header (tensor
names, dtypes, shapes and byte offsets, and the string entries ``__metadata__``), then the raw
tensor bytes. Our entries: ``format``, ``config``, ``versions``, ``extra`` (JSON) and ``sha256``, the
checksum of the tensors and the other entries (:func:`checksum`), verified whenever a file is read.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "aiida-emlip-model/1"
#: Metadata entry holding the checksum (absent in files saved before checksums existed).
CHECKSUM_KEY = "sha256"
#: The JSON entries of the metadata, returned parsed by :func:`read_metadata`.
JSON_KEYS = ("config", "versions", "extra")
_MAX_HEADER = 100_000_000  # bytes; safetensors' own limit
_BLOCK = 1 << 20


class ModelFileError(ValueError):
    """A model file is missing, unsafe, corrupted or not an aiida-emlip model."""


class ModelFileWarning(UserWarning):
    """A model file loads but cannot be fully verified (saved before checksums existed)."""


@dataclass(frozen=True)
class Header:
    """The parsed header of a safetensors file and where its tensor bytes start and end."""

    tensors: dict[str, Any]  # name → {dtype, shape, data_offsets}
    metadata: dict[str, str]
    data_start: int
    data_end: int


def file_sha256(path: str | Path) -> str:
    """sha256 of a whole file (a model's identity in outputs and in the ``emlip.model`` node)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_header(head: bytes, size: int, name: str) -> Header:
    """The header at the start of a safetensors file of ``size`` bytes (``head``: at least its header)."""
    if len(head) < 9 or head[8:9] != b"{":
        raise ModelFileError(
            f"{name} is not a safetensors model file (pickled checkpoints are refused: they can run code)"
        )
    length = int.from_bytes(head[:8], "little")
    if length > _MAX_HEADER or 8 + length > size:
        raise ModelFileError(f"{name} is truncated or corrupted: its header runs past the end of the file")
    try:
        header = json.loads(bytes(head[8 : 8 + length]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError(f"{name} is corrupted: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{name} is corrupted: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelFileError(f"{name} is corrupted: its metadata are not a mapping of strings")
    ends = []
    for tensor, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ModelFileError(f"{name} is corrupted: tensor {tensor!r} has no valid byte offsets")
        ends.append(offsets[1])
    data_start = 8 + length
    data_end = data_start + max(ends, default=0)
    if data_end > size:
        raise ModelFileError(
            f"{name} is truncated: {data_end - data_start} bytes of weights expected, "
            f"{size - data_start} present"
        )
    return Header(header, metadata, data_start, data_end)


def checksum(tensors: dict[str, Any], metadata: dict[str, str], data: Iterable[bytes]) -> str:
    """sha256 of the tensor table, the metadata (less the checksum itself) and the tensor bytes."""
    entries = {key: value for key, value in metadata.items() if key != CHECKSUM_KEY}
    digest = hashlib.sha256(
        json.dumps({"tensors": tensors, "metadata": entries}, sort_keys=True, separators=(",", ":")).encode()
    )
    digest.update(b"\n")
    for block in data:
        digest.update(block)
    return digest.hexdigest()


def _blocks(handle: Any, start: int, end: int) -> Iterable[bytes]:
    handle.seek(start)
    left = end - start
    while left > 0:
        block = handle.read(min(_BLOCK, left))
        if not block:
            return
        left -= len(block)
        yield block


def verify(path: str | Path) -> dict[str, str]:
    """The metadata of the model file ``path`` once it is shown intact; :class:`ModelFileError` if not.

    A file without checksum (saved by an older aiida-emlip) is accepted with a :class:`ModelFileWarning`.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) == 8 and int.from_bytes(head, "little") <= min(size - 8, _MAX_HEADER):
            head += handle.read(int.from_bytes(head, "little"))
        else:
            head += handle.read(1)
        header = parse_header(head, size, str(path))
        if header.metadata.get("format") != FORMAT:
            raise ModelFileError(f"{path} is a safetensors file but not an {FORMAT} model")
        expected = header.metadata.get(CHECKSUM_KEY)
        if expected is None:
            warnings.warn(
                f"{path} has no checksum (saved by an older aiida-emlip): its integrity cannot be "
                f"verified; save it again to add one",
                ModelFileWarning,
                stacklevel=2,
            )
            return header.metadata
        found = checksum(header.tensors, header.metadata, _blocks(handle, header.data_start, header.data_end))
    if found != expected:
        raise ModelFileError(
            f"{path} is corrupted: the checksum of its weights and header does not match the one "
            f"stored when it was saved"
        )
    return header.metadata


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Config, versions and extra information of a verified model file, without building the model."""
    metadata = verify(path)
    values = {}
    for key in JSON_KEYS:
        try:
            values[key] = json.loads(metadata[key])
        except (KeyError, json.JSONDecodeError):
            raise ModelFileError(f"{path} is corrupted: its {key!r} entry is missing or not JSON") from None
    return values
