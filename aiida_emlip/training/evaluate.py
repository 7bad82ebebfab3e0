"""Single-point predictions of a saved model on structures, batched, with SCF flags per structure."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aiida_emlip.models.file_format import ModelFileError, file_sha256
from aiida_emlip.models.host_memory import retain_on_cpu
from aiida_emlip.models.io import load_model
from aiida_emlip.models.model import EmlipModel, predicts_dipole
from aiida_emlip.training.config import LOSS_QUANTITIES, DataConfig
from aiida_emlip.training.data import Sample, attach_graphs, batches, load_samples
from aiida_emlip.training.errors import ConfigError, DataError
from aiida_emlip.training.losses import ErrorTable, predict

PER_STRUCTURE = ("energy", "stress", "dipole", "fermi_level")
PER_ATOM = ("forces", "charges", "dipoles")
#: Prediction key → the name messages and the ASE calculator use for it.
QUANTITY_NAMES = {"dipoles": "atomic_dipoles"}

__all__ = (
    "PER_ATOM",
    "PER_STRUCTURE",
    "Prediction",
    "evaluate_file",
    "file_sha256",
    "load_for_inference",
    "predict_samples",
    "read_samples",
)


@dataclass
class Prediction:
    """The model's outputs for one structure (numpy, eV/Å/e) and its SCF flags (None: not iterative)."""

    values: dict[str, np.ndarray] = field(default_factory=dict)
    scf_converged: bool | None = None
    scf_iterations: int | None = None

    @property
    def finite(self) -> bool:
        """Whether every output is finite (stress of a non-periodic structure is absent, not NaN)."""
        return not self.non_finite

    @property
    def non_finite(self) -> list[str]:
        """The outputs holding a NaN or an inf (``atomic_dipoles`` for the key ``dipoles``)."""
        return [
            QUANTITY_NAMES.get(key, key) for key, value in self.values.items() if not np.isfinite(value).all()
        ]


def load_for_inference(model_path: str | Path, device: str = "auto", kernels: str = "e3nn") -> EmlipModel:
    """Load ``model_path`` in eval mode on ``kernels``; self-consistent heads flag failures instead of
    raising. A missing cuEquivariance for ``kernels='cueq'`` is a :class:`ConfigError`.

    A structure whose SCF does not converge is then reported (``scf_converged`` False) next to the
    others' results, never dropped and never presented as converged.
    """
    try:
        model = load_model(model_path, device=device)
    except ModelFileError as exc:
        raise ConfigError(str(exc)) from None
    retain_on_cpu(model.device)  # large cells: no page faults at every evaluation (host_memory)
    try:
        model.backbone.use_kernels(kernels)
    except (ImportError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    options = getattr(model.head, "options", None)
    if options is not None and getattr(options, "on_failure", None) == "raise":
        model.head.options = dataclasses.replace(options, on_failure="flag")
    model.eval()
    return model


def read_samples(data_path: str | Path, model: EmlipModel, keys: dict | None = None) -> list[Sample]:
    """Structures of ``data_path`` with their conditions (total charge, spin, field, μ) and labels."""
    try:
        data_config = DataConfig(train=str(data_path), keys=dict(keys or {}))
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    samples = load_samples(data_path, data_config)
    unknown = sorted(
        {s for x in samples for s in x.atoms.get_chemical_symbols()} - set(model.config.elements)
    )
    if unknown:
        raise DataError(f"{data_path} contains elements {unknown} the model does not know")
    return samples


def predict_samples(
    model: EmlipModel, samples: Sequence[Sample], batch_size: int = 16, table: ErrorTable | None = None
) -> list[Prediction]:
    """Predict every sample (self-consistent heads converge from the local guess); errors into ``table``."""
    attach_graphs(samples, model.cutoff)
    results: list[Prediction] = []
    for batch in batches(samples, batch_size, model.dtype):
        batch = batch.to(model.device)
        out = predict(model, batch, {"forces", "stress"}, "converge", training=False)
        if not predicts_dipole(out):
            out["dipole"] = None  # a zero placeholder, not a prediction: no error row, no output
        if table is not None:
            table.add(out, batch, list(LOSS_QUANTITIES))
        ptr = batch.graph.ptr.tolist()
        periodic = batch.graph.pbc.all(dim=1).tolist()
        converged, iterations = out.get("converged"), out.get("iterations")
        for b in range(batch.graph.num_graphs):
            row = Prediction()
            for key in PER_STRUCTURE:
                value = out.get(key)
                if value is not None and not (key == "stress" and not periodic[b]):
                    row.values[key] = value[b].detach().cpu().double().numpy()
            for key in PER_ATOM:
                value = out.get(key)
                if value is not None:
                    row.values[key] = value[ptr[b] : ptr[b + 1]].detach().cpu().double().numpy()
            if converged is not None:
                row.scf_converged = bool(converged[b])
            if iterations is not None:
                row.scf_iterations = int(iterations[b])
            results.append(row)
    return results


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
    from aiida_emlip.training.eval_params import EvalParameters
    from aiida_emlip.training.eval_run import run_evaluation

    report = run_evaluation(
        model_path,
        data_path,
        output,
        EvalParameters(device=device, batch_size=batch_size),
        prefix=prefix,
        keys=keys,
        errors_json=errors_json,
    )
    report.raise_on_failure()
    return report.table
