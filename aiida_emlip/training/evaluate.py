"""Evaluate a saved model on an extxyz file: predictions as extxyz and an error table."""

from __future__ import annotations

import json
from pathlib import Path

import ase.io
import numpy as np

from aiida_emlip.models.io import ModelFileError, load_model
from aiida_emlip.training.config import LOSS_QUANTITIES, DataConfig
from aiida_emlip.training.data import attach_graphs, batches, load_samples, read_structures
from aiida_emlip.training.errors import ConfigError, DataError
from aiida_emlip.training.losses import ErrorTable, format_table, predict

PER_STRUCTURE = ("energy", "stress", "dipole", "fermi_level")
PER_ATOM = ("forces", "charges", "dipoles")


def evaluate_file(
    model_path: str | Path,
    data_path: str | Path,
    output: str | Path,
    device: str = "auto",
    batch_size: int = 16,
    prefix: str = "emlip",
    keys: dict[str, str] | None = None,
    errors_json: str | Path | None = None,
) -> str:
    """Predict every structure of ``data_path`` (``converge`` mode) and return the error table text."""
    try:
        model = load_model(model_path, device=device)
    except ModelFileError as exc:
        raise ConfigError(str(exc)) from None
    try:
        data_config = DataConfig(train=str(data_path), keys=dict(keys or {}))
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    frames = read_structures(data_path)
    samples = load_samples(data_path, data_config)
    unknown = sorted({s for f in frames for s in f.get_chemical_symbols()} - set(model.config.elements))
    if unknown:
        raise DataError(f"{data_path} contains elements {unknown} the model does not know")
    attach_graphs(samples, model.cutoff)
    model.eval()
    table = ErrorTable()
    need = {"forces", "stress"}
    results: list[dict[str, np.ndarray]] = []
    for batch in batches(samples, batch_size, model.dtype):
        batch = batch.to(model.device)
        out = predict(model, batch, need, "converge", training=False)
        table.add(out, batch, list(LOSS_QUANTITIES))
        ptr = batch.graph.ptr.tolist()
        for b in range(batch.graph.num_graphs):
            row: dict[str, np.ndarray] = {}
            for key in PER_STRUCTURE:
                value = out.get(key)
                if value is not None:
                    row[key] = value[b].detach().cpu().double().numpy()
            for key in PER_ATOM:
                value = out.get(key)
                if value is not None:
                    row[key] = value[ptr[b] : ptr[b + 1]].detach().cpu().double().numpy()
            results.append(row)
    written = []
    for atoms, row in zip(frames, results):
        atoms = atoms.copy()
        for key, value in row.items():
            if key in PER_ATOM:
                atoms.arrays[f"{prefix}_{key}"] = value
            elif key == "stress" and not np.isfinite(value).all():
                continue
            else:
                atoms.info[f"{prefix}_{key}"] = value.tolist() if value.ndim else float(value)
        written.append(atoms)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(output, written, format="extxyz")
    summary = table.summary()
    if errors_json is not None:
        Path(errors_json).write_text(json.dumps(summary, indent=2))
    return (
        format_table(summary, f"errors of {Path(model_path).name} on {Path(data_path).name}")
        if summary
        else ("no labels to compare with")
    )
