"""``emlip.model``: a trained model file (safetensors weights + JSON config) as an AiiDA node."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from aiida.orm import SinglefileData

from aiida_emlip.models.file_format import file_sha256, read_metadata  # no torch: a light import

FILENAME = "model.safetensors"


class EmlipModelData(SinglefileData):
    """A trained aiida-emlip model. The file is verified before storing: safetensors, our format, and
    the checksum of its weights; a corrupted, truncated or foreign file is refused with a
    :class:`~aiida_emlip.models.file_format.ModelFileError` (a ``ValueError``).

    Attributes summarise it without opening the file: ``sha256``, ``elements``, ``head`` (name and
    options), ``config`` (the full JSON model config), ``versions`` and ``extra`` (e.g. metrics).
    """

    def __init__(self, file: str | Path, **kwargs: Any) -> None:
        path = Path(file)
        meta = read_metadata(path)
        super().__init__(file=str(path), filename=FILENAME, **kwargs)
        self.base.attributes.set("sha256", file_sha256(path))
        self.base.attributes.set("elements", meta["config"]["elements"])
        self.base.attributes.set("head", meta["config"]["head"])
        self.base.attributes.set("config", meta["config"])
        self.base.attributes.set("versions", meta["versions"])
        self.base.attributes.set("extra", meta["extra"])

    @property
    def head_name(self) -> str:
        return self.base.attributes.get("head")["name"]

    @property
    def sha256(self) -> str:
        return self.base.attributes.get("sha256")

    def export(self, path: str | Path) -> Path:
        """Write the model file to ``path`` and check its checksum."""
        path = Path(path)
        with self.open(mode="rb") as source:
            path.write_bytes(source.read())
        if file_sha256(path) != self.sha256:
            raise OSError(f"checksum mismatch after exporting model {self.pk} to {path}")
        return path

    def load(self, device: str = "cpu"):
        """The :class:`~aiida_emlip.models.model.EmlipModel` held by this node."""
        from aiida_emlip.models.io import load_model

        with tempfile.TemporaryDirectory() as tmp:
            return load_model(self.export(Path(tmp) / FILENAME), device=device)
