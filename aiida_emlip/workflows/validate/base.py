"""The base of the validation workchains: one set of inputs, the per-model evaluations, the exit codes.

Every validation takes a protocol with overrides, the inputs of the DFT dataset workchain (namespace
``dft``), any number of models (namespace ``models``) and an ``emlip-eval`` code; it submits the DFT
and one ``emlip.evaluate`` per model together, keeps each model's predictions, and exits 303 when a
model could not be evaluated (the other models' results are output). Subclasses add their own inputs,
outline, outputs and exit codes.
"""

from __future__ import annotations

from typing import Any

from aiida import orm
from aiida.engine import ExitCode, WorkChain

from aiida_emlip.data import EmlipDatasetData
from aiida_emlip.data.model import EmlipModelData
from aiida_emlip.workflows import protocol as protocols
from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain
from aiida_emlip.workflows.process_state import how_it_ended

from . import evaluate as model_side
from .steps import ValidationSteps, merge_protocols

#: Inputs of the dataset workchain that a validation sets itself.
DATASET_SOURCES = ("configurations", "structures", "structure_settings", "sampler", "sampler_structure")
#: The dataset inputs not exposed under ``dft``: the sources, and ``protocol_inputs`` (the DFT settings
#: are ``dft.protocol`` and ``dft.overrides``, which the workchain reads and extends itself).
DFT_EXCLUDED = (*DATASET_SOURCES, "protocol_inputs")


class EmlipValidationWorkChain(ValidationSteps, protocols.EmlipProtocolMixin, WorkChain):
    """Inputs, model evaluations and exit codes shared by the validation workchains."""

    @classmethod
    def define(cls, spec) -> None:
        """The shared inputs (protocol, overrides, dft, models, eval_code), outputs and exit codes."""
        super().define(spec)
        spec.input("protocol", valid_type=orm.Str, default=lambda: orm.Str(cls.get_default_protocol()))
        spec.input("overrides", valid_type=orm.Dict, required=False, help="Overrides of the protocol.")
        spec.expose_inputs(
            EmlipDatasetWorkChain,
            namespace="dft",
            exclude=DFT_EXCLUDED,
            namespace_options={"help": "Inputs of the dataset workchain that runs every pw.x calculation."},
        )
        spec.input_namespace(
            "models", valid_type=EmlipModelData, dynamic=True, required=False, help="Models to validate."
        )
        spec.input(
            "eval_code",
            valid_type=orm.AbstractCode,
            required=False,
            help="emlip-eval; without it only DFT runs.",
        )
        spec.output_namespace("predictions", valid_type=EmlipDatasetData, dynamic=True)
        spec.exit_code(201, "ERROR_UNKNOWN_PROTOCOL", message="Unknown protocol: {message}")
        spec.exit_code(202, "ERROR_INVALID_OVERRIDES", message="Invalid overrides: {message}")
        spec.exit_code(205, "ERROR_UNKNOWN_FAMILY", message="Pseudopotential family problem: {message}")
        spec.exit_code(
            213, "ERROR_MODEL_ELEMENTS", message="A model does not cover the structures: {message}"
        )
        spec.exit_code(
            215, "ERROR_ELEMENT_NOT_IN_FAMILY", message="Element missing from the family: {message}"
        )
        spec.exit_code(301, "ERROR_DFT_FAILED", message="DFT failed: {message}")
        spec.exit_code(303, "ERROR_MODEL_EVALUATION_FAILED", message="Model evaluation failed for: {message}")

    @classmethod
    def shared_builder(
        cls,
        code: orm.AbstractCode,
        pseudo_family: str,
        protocol: str | None = None,
        overrides: dict[str, Any] | None = None,
        dft_overrides: dict[str, Any] | None = None,
        models: dict[str, EmlipModelData] | None = None,
        eval_code: orm.AbstractCode | None = None,
        pp_code: orm.AbstractCode | None = None,
        max_concurrent: int = 4,
    ):
        """A builder with the shared inputs set; ``ProtocolError``/``OverrideError`` at once.

        The protocol's ``dft_protocol`` becomes ``dft.protocol``; ``dft_overrides`` are the dataset
        protocol's overrides (pw.x settings). Subclasses' ``get_builder_from_protocol`` add their own.
        """
        inputs = cls.get_protocol_inputs(protocol, overrides)
        EmlipDatasetWorkChain.get_protocol_inputs(inputs["dft_protocol"], dft_overrides)
        builder = cls.get_builder()
        builder.protocol = orm.Str(inputs["protocol"])
        if overrides:
            builder.overrides = orm.Dict(overrides)
        builder.dft.code = code
        builder.dft.pseudo_family = orm.Str(pseudo_family)
        builder.dft.protocol = orm.Str(inputs["dft_protocol"])
        builder.dft.max_concurrent = orm.Int(max_concurrent)
        if dft_overrides:
            builder.dft.overrides = orm.Dict(dft_overrides)
        if pp_code is not None:
            builder.dft.pp_code = pp_code
        if models:
            builder.models = dict(models)
        if eval_code is not None:
            builder.eval_code = eval_code
        return builder

    def setup(self):
        """Merge this workchain's and the DFT protocols with their overrides."""
        return merge_protocols(self)

    def submit_models(self, configurations: EmlipDatasetData, what: str = "structures") -> dict[str, Any]:
        """Submit one ``emlip.evaluate`` per model on ``configurations``; returns the futures by label.

        Sets ``ctx.model_labels``. A formal-charge model sees only the structures its charges can
        represent; one that fits none, or models without ``eval_code``, are reported and skipped.
        """
        models = dict(self.inputs.get("models", {}))
        self.ctx.model_labels = []
        futures: dict[str, Any] = {}
        if models and "eval_code" not in self.inputs:
            self.report(f"models {sorted(models)} given without eval_code: only DFT runs")
            return futures
        for label, model in sorted(models.items()):
            structures = model_side.model_inputs(configurations, model)
            if structures is None:
                self.report(f"model {label}: its formal charges fit none of the {what}; not evaluated")
                continue
            builder = model_side.evaluation_builder(
                self.inputs.eval_code,
                model,
                structures,
                self.ctx.inputs["eval_parameters"],
                self.ctx.inputs["options"],
                label=f"evaluate_{label}",
            )
            futures[f"evaluate_{label}"] = self.submit(builder)
            self.ctx.model_labels.append(label)
        return futures

    def dft_dataset(self) -> EmlipDatasetData | ExitCode:
        """The ``dataset`` output of the DFT workchain in ``ctx.dft``, or ``ERROR_DFT_FAILED``."""
        node = self.ctx.dft
        if "dataset" not in node.outputs:
            return self.exit_codes.ERROR_DFT_FAILED.format(
                message=f"{node.process_label}<{node.pk}> {how_it_ended(node)}, no dataset"
            )
        return node.outputs.dataset

    def inspect_models(self):
        """Keep each model's predictions; a failed evaluation is reported and left out of the analysis."""
        self.ctx.predictions = {}
        self.ctx.failed_models = []
        for label in self.ctx.model_labels:
            calc = self.ctx[f"evaluate_{label}"]
            predictions = model_side.predictions(calc)
            if predictions is None:
                self.ctx.failed_models.append(label)
                self.report(f"model {label}: {calc.process_label}<{calc.pk}> {how_it_ended(calc)}")
                continue
            if not calc.is_finished_ok:
                self.report(f"model {label}: exit status {calc.exit_status}; unconverged structures left out")
            self.ctx.predictions[label] = predictions
            self.out(f"predictions.{label}", predictions)

    def results(self):
        """Exit 303 when some model could not be evaluated (the outputs of the others are there)."""
        failed = self.ctx.get("failed_models") or []
        if failed:
            return self.exit_codes.ERROR_MODEL_EVALUATION_FAILED.format(message=", ".join(failed))
        return None
