"""``emlip.dataset``: configurations and DFT labels as one extxyz file in the node's repository."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from aiida import orm
from ase import Atoms

from aiida_emlip import schema
from aiida_emlip.extxyz import frames_to_text, text_to_frames

__all__ = ("EmlipDatasetData", "dft_settings_digest")

FILENAME = "dataset.extxyz"

#: ``atoms.info`` keys allowed besides the schema labels (sampler provenance and DFT bookkeeping).
METADATA_KEYS = frozenset(
    {
        "sampler",
        "seed",
        "sampler_params",
        "source_uuid",
        "key",
        "pw_wall_time",
        "highest_occupied_level",
        "lowest_unoccupied_level",
        "total_magnetization",
        "fermi_level_cell_average",
        "vacuum_level_top",
        "vacuum_level_bottom",
        "lowdin_spilling",
        # model predictions (emlip-eval / emlip.evaluate)
        "model_sha256",
        "eval_mode",
        "scf_converged",
        "scf_iterations",
        "relax_converged",
        "relax_steps",
        "md_step",
        "time_fs",
        "temperature",
        "structure_index",
        # active learning: the round that added a configuration and where in the MD it came from
        "al_round",
        "al_source",
        "al_md_step",
        "al_score",
    }
)


#: Keys of the DFT settings that name a node of one profile (the UUID of the pw.x code): recorded, but
#: left out of :func:`dft_settings_digest`, so the same settings in another profile (a code set up
#: again, under a new UUID) have the same digest.
PROFILE_KEYS = frozenset({"code_uuid"})
#: Keys of the DFT settings that say how pw.x ran in parallel (k-point pools, ...): recorded, but left
#: out of :func:`dft_settings_digest` (and of a study's training sets), as the labels do not depend on
#: them: the same settings with and without pools have the same digest.
EXECUTION_KEYS = frozenset({"parallelization"})


def dft_settings_digest(settings: Mapping[str, Any] | None) -> str:
    """Return the sha256 of the canonical JSON of ``settings`` ('' for none), :data:`PROFILE_KEYS` and
    :data:`EXECUTION_KEYS` left out."""
    if not settings:
        return ""
    settings = {key: value for key, value in settings.items() if key not in PROFILE_KEYS | EXECUTION_KEYS}
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _check_values(index: int, key: str, value: Any) -> None:
    """A numeric label must be numbers, all finite; forces at most :data:`~aiida_emlip.schema.MAX_FORCE`."""
    if key in (schema.FERMI_REFERENCE, schema.CONFIG_TYPE):
        return
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"configuration {index}: {key} must be numeric, got {value!r}") from None
    if not np.isfinite(array).all():
        raise ValueError(f"configuration {index}: {key} contains NaN or inf")
    if key == schema.FORCES and array.size and np.abs(array).max() > schema.MAX_FORCE:
        raise ValueError(
            f"configuration {index}: |force| up to {np.abs(array).max():.3g} eV/Å exceeds "
            f"{schema.MAX_FORCE:g} eV/Å; wrong units? Forces must be in eV/Å"
        )


def _check_frame(index: int, atoms: Atoms, strict: bool) -> None:
    # a model's predictions (emlip-eval marks them with model_sha256) are kept as they are, a NaN of a
    # failed prediction included (the calculation reports it); labels must be finite and plausible
    labels = "model_sha256" not in atoms.info
    for key, value in atoms.info.items():
        label = schema.LABELS.get(key)
        if label is None:
            if strict and key not in METADATA_KEYS:
                raise ValueError(
                    f"configuration {index}: unknown info key {key!r}; "
                    f"schema labels: {sorted(schema.LABELS)}, "
                    f"metadata: {sorted(METADATA_KEYS)}"
                )
            continue
        if label.scope != "structure":
            raise ValueError(f"configuration {index}: per-atom label {key!r} belongs in atoms.arrays")
        if key == schema.FERMI_REFERENCE:
            if value not in schema.FERMI_REFERENCES:
                raise ValueError(
                    f"configuration {index}: fermi_reference {value!r} not in {schema.FERMI_REFERENCES}"
                )
        elif key != schema.CONFIG_TYPE and np.shape(value) != label.shape:
            raise ValueError(
                f"configuration {index}: {key} has shape {np.shape(value)}, expected {label.shape}"
            )
        if labels:
            _check_values(index, key, value)
    for key, value in atoms.arrays.items():
        if key in ("numbers", "positions"):
            continue
        label = schema.LABELS.get(key)
        if label is None:
            if strict:
                raise ValueError(f"configuration {index}: unknown per-atom key {key!r}")
            continue
        if label.scope != "atom" or np.shape(value) != (len(atoms), *label.shape):
            raise ValueError(
                f"configuration {index}: {key} has shape {np.shape(value)}, expected per-atom {label.shape}"
            )
        if labels:
            _check_values(index, key, value)
    if schema.FERMI_LEVEL in atoms.info and schema.FERMI_REFERENCE not in atoms.info:
        raise ValueError(f"configuration {index}: fermi_level without fermi_reference")


class EmlipDatasetData(orm.Data):
    """A dataset of configurations and labels keyed by :mod:`aiida_emlip.schema`.

    The repository holds ``dataset.extxyz``; the attributes summarise it: ``n_configurations``,
    ``n_atoms``, ``elements``, ``total_charges`` (the distinct charge states), ``label_keys`` (labels
    present in every configuration), ``partial_label_keys`` (present in some), ``units``,
    ``config_types`` (counts), ``fermi_references``, ``dft_settings`` and ``dft_settings_digest``, and
    the file's ``sha256``. ``strict`` rejects info/array keys outside the schema and
    :data:`METADATA_KEYS`. Labels must be numbers, all finite, and forces at most
    :data:`~aiida_emlip.schema.MAX_FORCE` eV/Å (larger ones are taken for wrong units): otherwise a
    ``ValueError``. A model's predictions (frames with ``model_sha256``) are stored as they are.
    """

    def __init__(
        self,
        frames: Iterable[Atoms] | None = None,
        dft_settings: Mapping[str, Any] | None = None,
        strict: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._set_frames(list(frames or []), dft_settings, strict)

    @classmethod
    def from_ase(
        cls, frames: Iterable[Atoms], dft_settings: Mapping[str, Any] | None = None, strict: bool = True
    ) -> EmlipDatasetData:
        """Return an unstored node holding ``frames`` (labels from info/arrays or an attached calculator)."""
        return cls(frames=frames, dft_settings=dft_settings, strict=strict)

    @classmethod
    def from_extxyz(
        cls, path: str | Path, dft_settings: Mapping[str, Any] | None = None, strict: bool = True
    ) -> EmlipDatasetData:
        """Return an unstored node with the configurations of the extxyz file at ``path``."""
        return cls(frames=text_to_frames(Path(path).read_text()), dft_settings=dft_settings, strict=strict)

    def _set_frames(self, frames: list[Atoms], dft_settings: Mapping[str, Any] | None, strict: bool) -> None:
        text = frames_to_text(frames)
        parsed = text_to_frames(text)
        for index, atoms in enumerate(parsed):
            _check_frame(index, atoms, strict)
        self.base.repository.put_object_from_bytes(text.encode(), FILENAME)
        self.base.attributes.set_many(self._summary(parsed, text, dft_settings))

    @staticmethod
    def _summary(frames: list[Atoms], text: str, dft_settings: Mapping[str, Any] | None) -> dict[str, Any]:
        keys_per_frame = [
            {k for k in (*atoms.info, *atoms.arrays) if k in schema.LABELS and k != schema.CONFIG_TYPE}
            for atoms in frames
        ]
        every = set.intersection(*keys_per_frame) if keys_per_frame else set()
        some = set.union(*keys_per_frame) if keys_per_frame else set()
        config_types: dict[str, int] = {}
        for atoms in frames:
            name = str(atoms.info.get(schema.CONFIG_TYPE, "default"))
            config_types[name] = config_types.get(name, 0) + 1
        charges = sorted({float(atoms.info.get(schema.TOTAL_CHARGE, 0.0)) for atoms in frames})
        return {
            "n_configurations": len(frames),
            "n_atoms": int(sum(len(atoms) for atoms in frames)),
            "elements": sorted({s for atoms in frames for s in atoms.get_chemical_symbols()}),
            "total_charges": charges,
            "label_keys": sorted(every),
            "partial_label_keys": sorted(some - every),
            "units": {k: schema.LABELS[k].unit for k in sorted(some)},
            "config_types": config_types,
            "fermi_references": sorted(
                {str(a.info[schema.FERMI_REFERENCE]) for a in frames if schema.FERMI_REFERENCE in a.info}
            ),
            "dft_settings": dict(dft_settings or {}),
            "dft_settings_digest": dft_settings_digest(dft_settings),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "filename": FILENAME,
        }

    @property
    def n_configurations(self) -> int:
        """Number of configurations."""
        return int(self.base.attributes.get("n_configurations"))

    @property
    def elements(self) -> list[str]:
        """Sorted element symbols present."""
        return list(self.base.attributes.get("elements"))

    @property
    def label_keys(self) -> list[str]:
        """Schema labels present in every configuration."""
        return list(self.base.attributes.get("label_keys"))

    @property
    def total_charges(self) -> list[float]:
        """The distinct total-charge states."""
        return list(self.base.attributes.get("total_charges"))

    @property
    def dft_settings(self) -> dict[str, Any]:
        """The DFT settings the labels were computed with (empty for unlabelled configurations)."""
        return dict(self.base.attributes.get("dft_settings", {}))

    def get_text(self) -> str:
        """Return the extxyz text."""
        return self.base.repository.get_object_content(FILENAME, mode="r")

    def to_ase(self) -> list[Atoms]:
        """Return the configurations; labels in ``atoms.info`` / ``atoms.arrays`` under schema keys."""
        return text_to_frames(self.get_text())

    def export(self, path: str | Path) -> Path:
        """Write the extxyz file to ``path`` and return it."""
        path = Path(path)
        path.write_text(self.get_text())
        return path

    def __len__(self) -> int:
        return self.n_configurations
