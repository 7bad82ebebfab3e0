"""``emlip.training``: DFT labels (or a given dataset) → one trained model per design → a comparison."""

from __future__ import annotations

from typing import Any

from aiida import orm
from aiida.engine import ToContext, WorkChain, calcfunction, if_

from aiida_emlip.calculations.train import check_job, config_problem, job_config
from aiida_emlip.data.dataset import EmlipDatasetData
from aiida_emlip.data.model import EmlipModelData
from aiida_emlip.training.launch import check_nproc_per_node
from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain
from aiida_emlip.workflows.label_plan import LabelPlan
from aiida_emlip.workflows.process_state import how_it_ended
from aiida_emlip.workflows.train_base import EmlipTrainBaseWorkChain


def validate_train_options(value: orm.Dict, _) -> str | None:
    """Options of every training calculation: every name one of ``emlip.train``'s options (a misspelt
    one would otherwise stop the first training job, after the DFT), ``nproc_per_node`` checked."""
    from aiida_emlip.spec import option_name_problem

    options = value.get_dict()
    for name in options:
        problem = option_name_problem(name, "emlip.train")
        if problem:
            return f"train_options.{name}: {problem}"
    if "nproc_per_node" in options:
        problem = check_nproc_per_node(options["nproc_per_node"])
        if problem:
            return f"train_options: {problem}"
    return None


def validate_designs(value: orm.Dict, _) -> str | None:
    """Each design is ``{label: emlip-train config}``; labels must be usable as link labels."""
    designs = value.get_dict()
    if not designs:
        return "designs: give at least one {label: config}"
    for label, config in designs.items():
        if not label.isidentifier():
            return f"designs: label {label!r} must be a Python identifier (letters, digits, _)"
        if not isinstance(config, dict) or "model" not in config:
            return f"designs.{label}: an emlip-train config with a 'model' section is required"
        problem = config_problem(config)  # parsed as the training calculation will, before any DFT
        if problem:
            return f"designs.{label}: {problem}"
    return None


def comparison_table(metrics: dict[str, dict[str, Any]], split: str = "test") -> dict[str, Any]:
    """Energy and force errors of each design on ``split``, overall and per total-charge state."""
    table: dict[str, Any] = {}
    for label, values in metrics.items():
        errors = values.get(split, {})
        row = {}
        for quantity in ("energy", "forces"):
            groups = errors.get(quantity, {})
            row[quantity] = {
                group: {"rmse": stats.get("rmse"), "unit": stats.get("unit")}
                for group, stats in groups.items()
                if group == "all" or group.startswith("total_charge=")
            }
        table[label] = row
    return table


def labelling_problems(designs: dict[str, dict[str, Any]], plan: LabelPlan) -> list[str]:
    """What each design needs of the training data that the labelling of ``plan`` will not produce,
    one line per design and label (empty: nothing). The needs are those ``emlip-train --check`` refuses
    data without (:func:`~aiida_emlip.training.config.label_needs`, under the design's ``data.keys``),
    and one Fermi reference for a design that uses the Fermi level."""
    from aiida_emlip.training.config import fermi_level_uses, label_needs, parse_config
    from aiida_emlip.training.errors import ConfigError

    problems = []
    for label, config in designs.items():
        try:
            parsed = parse_config(job_config(config))
        except ConfigError:
            continue  # the designs port reports it
        reasons: dict[str, list[str]] = {}
        for need in label_needs(parsed):
            if plan.produces(need.file_key) is False:
                reasons.setdefault(need.file_key, []).append(need.reason)
        for key, why in reasons.items():
            what = " and ".join(dict.fromkeys(why))
            verb = "needs" if len(set(why)) == 1 else "need"
            problems.append(
                f"design {label}: {what} {verb} the label {key!r}, which the labelling will not produce: "
                f"{plan.source(key)}"
            )
        uses = fermi_level_uses(parsed)
        references = plan.fermi_references or {}
        if uses and len(references) > 1:
            found = ", ".join(f"{ref} ({n} configuration(s))" for ref, n in sorted(references.items()))
            problems.append(
                f"design {label}: {' and '.join(uses)} use(s) the Fermi level, which the labelling will "
                f"measure from different references: {found}; postprocess.vacuum_level measures it from "
                "the vacuum on slabs only: label the slabs and the other configurations apart, or set the "
                "dataset overrides {postprocess: {vacuum_level: false}}"
            )
    return problems


@calcfunction
def compare_designs(**metrics: orm.Dict) -> orm.Dict:
    """Test-split errors of every design side by side (a calcfunction, so it is in the provenance)."""
    return orm.Dict({"test": comparison_table({k: v.get_dict() for k, v in metrics.items()}, "test")})


class EmlipTrainingWorkChain(WorkChain):
    """Label configurations with pw.x (``emlip.dataset``), train each design, compare their errors.

    Give either ``dataset`` (the inputs of :class:`EmlipDatasetWorkChain`) or ``training_set`` (an
    existing ``emlip.dataset``). Every design is one :class:`EmlipTrainBaseWorkChain` (``emlip.train``
    with restarts after interruptions, NaN/inf, SCF failures and running out of memory) on the same
    data (and the same ``valid_set`` / ``test_set`` when given), so the designs differ only in their
    configs. A design named in ``initial_models`` starts from
    that model (a warm start). A failed design is reported; the others are kept.
    """

    @classmethod
    def define(cls, spec) -> None:
        super().define(spec)
        spec.expose_inputs(
            EmlipDatasetWorkChain,
            namespace="dataset",
            namespace_options={"required": False, "populate_defaults": False},
        )
        spec.input("training_set", valid_type=EmlipDatasetData, required=False)
        spec.input(
            "valid_set",
            valid_type=EmlipDatasetData,
            required=False,
            help="structures every design validates on (the training calculation's valid_set); absent: "
            "each config's data.valid_fraction of the training set",
        )
        spec.input(
            "test_set",
            valid_type=EmlipDatasetData,
            required=False,
            help="structures every design is tested on (the training calculation's test_set; the "
            "comparison is then on the same structures for every design); absent: each config's "
            "data.test_fraction of the training set",
        )
        spec.input("train_code", valid_type=orm.AbstractCode, help="the emlip-train code")
        spec.input("designs", valid_type=orm.Dict, validator=validate_designs)
        spec.input_namespace(
            "initial_models",
            valid_type=EmlipModelData,
            dynamic=True,
            required=False,
            help="design label → a model of that design's architecture to start from (warm start: the "
            "training calculation's initial_model); designs without one train from scratch",
        )
        spec.input(
            "train_options",
            valid_type=orm.Dict,
            required=False,
            validator=validate_train_options,
            help="metadata.options of each training calculation (resources, queue, nproc_per_node: "
            "processes under torchrun, ...)",
        )
        spec.input(
            "train_max_iterations",
            valid_type=orm.Int,
            required=False,
            help="max_iterations of each design's EmlipTrainBaseWorkChain (its default: 5 calculations)",
        )
        spec.outline(
            cls.setup,
            if_(cls.needs_labels)(cls.run_dataset, cls.inspect_dataset),
            cls.run_training,
            cls.results,
        )
        spec.output("training_set", valid_type=EmlipDatasetData)
        spec.output_namespace("models", valid_type=EmlipModelData, dynamic=True)
        spec.output_namespace("metrics", valid_type=orm.Dict, dynamic=True)
        spec.output("comparison", valid_type=orm.Dict, required=False)
        spec.exit_code(201, "ERROR_INVALID_INPUTS", message="{message}")
        spec.exit_code(301, "ERROR_DATASET_FAILED", message="the dataset workchain failed: {message}")
        spec.exit_code(302, "ERROR_ALL_TRAININGS_FAILED", message="every design failed to train")
        spec.exit_code(303, "ERROR_SOME_TRAININGS_FAILED", message="designs failed: {labels}")

    def setup(self):
        given = [name for name in ("dataset", "training_set") if self.inputs.get(name)]
        if len(given) != 1:
            return self.exit_codes.ERROR_INVALID_INPUTS.format(
                message=f"give exactly one of dataset (inputs) or training_set, got {given or 'none'}"
            )
        unknown = sorted(set(self.inputs.get("initial_models", {})) - set(self.inputs.designs.get_dict()))
        if unknown:
            return self.exit_codes.ERROR_INVALID_INPUTS.format(
                message=f"initial_models for designs that are not given: {', '.join(unknown)}"
            )
        if "training_set" in self.inputs:
            self.ctx.training_set = self.inputs.training_set
            refused = self._check_designs(self.inputs.training_set)
        else:
            refused = self._check_labels_to_come()
        if refused:
            return self.exit_codes.ERROR_INVALID_INPUTS.format(message=refused)
        return None

    def _check_labels_to_come(self) -> str | None:
        """Every design's labels against what the dataset workchain will produce (its protocol inputs,
        post-processing and configurations), before any pw.x is submitted."""
        plan = EmlipDatasetWorkChain.plan_labels(
            self.exposed_inputs(EmlipDatasetWorkChain, namespace="dataset")
        )
        if plan is None:
            return None  # bad protocol inputs: the dataset workchain stops with 201/202, before any pw.x
        problems = labelling_problems(self.inputs.designs.get_dict(), plan)
        if problems:
            return (
                "design(s) need labels the labelling will not produce, nothing was submitted: "
                + "; ".join(problems)
            )
        return None

    def _check_designs(self, dataset: EmlipDatasetData) -> str | None:
        """Every design checked on ``dataset`` as ``emlip-train --check`` does, before any is submitted."""
        from aiida_emlip.training.errors import TrainingError

        initial = self.inputs.get("initial_models", {})
        refused = []
        for label, config in self.inputs.designs.get_dict().items():
            try:
                check_job(
                    config,
                    dataset,
                    initial.get(label),
                    self.inputs.get("valid_set"),
                    self.inputs.get("test_set"),
                )
            except TrainingError as exc:
                refused.append(f"{label}: {exc}")
        if refused:
            return "emlip-train --check refused design(s), nothing was submitted: " + "; ".join(refused)
        return None

    def needs_labels(self) -> bool:
        return "training_set" not in self.ctx

    def run_dataset(self):
        inputs = self.exposed_inputs(EmlipDatasetWorkChain, namespace="dataset")
        return ToContext(labels=self.submit(EmlipDatasetWorkChain, **inputs))

    def inspect_dataset(self):
        node = self.ctx.labels
        if "dataset" not in node.outputs:
            return self.exit_codes.ERROR_DATASET_FAILED.format(
                message=f"{node.process_label}<{node.pk}> {how_it_ended(node)}"
            )
        self.ctx.training_set = node.outputs.dataset
        self.report(
            f"{len(node.outputs.dataset)} labelled configurations from {node.process_label}<{node.pk}>"
        )
        return None

    def run_training(self):
        options = self.inputs.train_options.get_dict() if "train_options" in self.inputs else {}
        initial = self.inputs.get("initial_models", {})
        for label, config in self.inputs.designs.get_dict().items():
            builder = EmlipTrainBaseWorkChain.get_builder()
            builder.train.code = self.inputs.train_code
            builder.train.dataset = self.ctx.training_set
            builder.train.config = orm.Dict(config)
            if label in initial:
                builder.train.initial_model = initial[label]
            for port in ("valid_set", "test_set"):
                if port in self.inputs:
                    builder.train[port] = self.inputs[port]
            builder.train.metadata.options = {
                "resources": {"num_machines": 1},
                "max_wallclock_seconds": 3600,
                **options,
            }
            if "train_max_iterations" in self.inputs:
                builder.max_iterations = self.inputs.train_max_iterations
            builder.metadata.call_link_label = f"train_{label}"
            self.to_context(**{f"train_{label}": self.submit(builder)})

    def results(self):
        self.out("training_set", self.ctx.training_set)
        metrics, failed = {}, []
        for label in self.inputs.designs.get_dict():
            node = self.ctx[f"train_{label}"]
            if not node.is_finished_ok:
                failed.append(label)
                self.report(f"design {label}: {node.process_label}<{node.pk}> {how_it_ended(node)}")
                continue
            self.out(f"models.{label}", node.outputs.model)
            self.out(f"metrics.{label}", node.outputs.metrics)
            metrics[label] = node.outputs.metrics
        if metrics:
            self.out("comparison", compare_designs(**metrics, metadata={"call_link_label": "compare"}))
        if len(failed) == len(self.inputs.designs.get_dict()):
            return self.exit_codes.ERROR_ALL_TRAININGS_FAILED
        if failed:
            return self.exit_codes.ERROR_SOME_TRAININGS_FAILED.format(labels=", ".join(failed))
        return None
