"""``emlip.study``: one spec → DFT labels → held-out split → every design trained → validations → report.

The spec is the normalised dict of :func:`aiida_emlip.spec.parse_spec`. Steps:

1. the systems are sampled (calcfunction) and labelled by :class:`EmlipDatasetWorkChain`;
2. whole geometries are held out (calcfunction, recorded with the structures' UUIDs): no design ever
   trains or validates on them;
3. every design trains at once through :class:`EmlipTrainingWorkChain` on the same training set, with
   the same backbone, epochs and seed;
   optionally, active-learning rounds (:mod:`~aiida_emlip.workflows.study_active`): MD with the model,
   the most uncertain frames labelled by pw.x, every design retrained on the union;
4. every model predicts the held-out set (``emlip.evaluate``) while the validations of the spec run
   (registry :mod:`~aiida_emlip.workflows.study_registry`), side by side: they share ``dft.max_concurrent``,
   so that the study never runs more pw.x at once than the spec says;
5. one comparison ``Dict`` (a row per design) and the HTML report (``FolderData``).

A design, evaluation or validation that fails is reported and left out; the study still compares the
rest and ends with an exit code that names what failed.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from aiida import orm
from aiida.engine import ToContext, WorkChain, if_, while_
from aiida.plugins import CalculationFactory

from aiida_emlip.data import EmlipDatasetData
from aiida_emlip.data.model import EmlipModelData
from aiida_emlip.spec import design_config, dft_configuration_count, evaluation_options, held_out_geometries
from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain
from aiida_emlip.workflows.process_state import how_it_ended
from aiida_emlip.workflows.study_active import HELD_OUT_PARAMETERS, ActiveLearningSteps
from aiida_emlip.workflows.study_functions import compare_study, sample_study, split_study, study_report
from aiida_emlip.workflows.study_registry import VALIDATIONS, Context
from aiida_emlip.workflows.training import EmlipTrainingWorkChain

EmlipEvaluateCalculation = CalculationFactory("emlip.evaluate")

#: Packages whose versions the report's provenance section lists.
VERSIONED = ("aiida-emlip", "aiida-core", "aiida-quantumespresso", "aiida-pseudo", "torch", "mace-torch")
VERSIONED += ("torch-pme", "ase")
STAGE = "emlip_stage"


def shared_concurrency(max_concurrent: int, side_by_side: int) -> int:
    """Each one's ``max_concurrent`` when ``side_by_side`` workchains share a budget of ``max_concurrent``."""
    return max(1, max_concurrent // max(1, side_by_side))


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a study depends on."""
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


class EmlipStudyWorkChain(ActiveLearningSteps, WorkChain):
    """A whole study from one spec: DFT, held-out split, training of every design, validations, report."""

    @classmethod
    def define(cls, spec) -> None:
        super().define(spec)
        spec.input("spec", valid_type=orm.Dict, help="The normalised study spec (aiida_emlip.spec).")
        spec.input("spec_text", valid_type=orm.Str, required=False, help="The spec file as written.")
        spec.input("pw_code", valid_type=orm.AbstractCode, help="pw.x")
        spec.input("train_code", valid_type=orm.AbstractCode, help="emlip-train")
        spec.input("eval_code", valid_type=orm.AbstractCode, help="emlip-eval")
        spec.input("pp_code", valid_type=orm.AbstractCode, required=False, help="pp.x (Hirshfeld charges)")
        spec.input("projwfc_code", valid_type=orm.AbstractCode, required=False, help="projwfc.x")
        spec.outline(
            cls.setup,
            cls.sample,
            cls.run_dft,
            cls.inspect_dft,
            cls.split,
            cls.run_training,
            cls.inspect_training,
            if_(cls.al_enabled)(
                cls.al_setup,
                if_(cls.al_going)(cls.al_run_held_out, cls.al_inspect_held_out),
                while_(cls.al_going)(
                    cls.al_run_committee,
                    cls.al_inspect_committee,
                    if_(cls.al_going)(cls.al_run_md, cls.al_inspect_md),
                    if_(cls.al_going)(cls.al_run_scoring, cls.al_select),
                    if_(cls.al_going)(cls.al_run_labels, cls.al_inspect_labels),
                    if_(cls.al_going)(cls.al_run_training, cls.al_inspect_training),
                    if_(cls.al_going)(cls.al_run_held_out, cls.al_inspect_held_out),
                ),
                cls.al_results,
            ),
            cls.run_models,
            cls.inspect_models,
            cls.compare,
            if_(cls.has_comparison)(cls.write_report),
            cls.results,
        )
        spec.output("dataset", valid_type=EmlipDatasetData, help="Every DFT label of the study's systems.")
        spec.output("training_set", valid_type=EmlipDatasetData, help="What the designs train on.")
        spec.output(
            "held_out_set", valid_type=EmlipDatasetData, help="Never trained on: the error table's data."
        )
        spec.output("split", valid_type=orm.Dict, help="Held-out and training keys with structure UUIDs.")
        spec.output_namespace("models", valid_type=EmlipModelData, dynamic=True)
        spec.output_namespace("metrics", valid_type=orm.Dict, dynamic=True)
        spec.output_namespace("predictions", valid_type=EmlipDatasetData, dynamic=True)
        spec.output_namespace("validations", valid_type=orm.Dict, dynamic=True)
        spec.output(
            "active_learning",
            valid_type=orm.Dict,
            required=False,
            help="Per active-learning round: the chosen frames' uncertainty, held-out errors, pw.x runs.",
        )
        spec.output("comparison", valid_type=orm.Dict, required=False, help="One row per design.")
        spec.output("report", valid_type=orm.FolderData, required=False, help="index.html and its figures.")
        spec.exit_code(201, "ERROR_INVALID_SPEC", message="Invalid spec: {message}")
        spec.exit_code(210, "ERROR_OVER_BUDGET", message="DFT budget exceeded: {message}")
        spec.exit_code(301, "ERROR_DFT_FAILED", message="The dataset workchain failed: {message}")
        spec.exit_code(302, "ERROR_NOTHING_HELD_OUT", message="No held-out structure has labels: {message}")
        spec.exit_code(303, "ERROR_ALL_TRAININGS_FAILED", message="Every design failed to train.")
        spec.exit_code(350, "ERROR_PARTIAL", message="The study finished without: {message}")

    # ------------------------------------------------------------------ steps
    def _stage(self, stage: str, message: str) -> None:
        self.node.base.extras.set(STAGE, stage)
        self.report(message)

    def setup(self):
        """Check the DFT budget before anything runs."""
        spec = self.inputs.spec.get_dict()
        missing = sorted({"name", "systems", "designs", "dft", "training", "split"} - set(spec))
        if missing:
            return self.exit_codes.ERROR_INVALID_SPEC.format(message=f"missing blocks {missing}")
        counts = dft_configuration_count(spec)
        budget = spec.get("budget", {}).get("max_dft_configurations")
        if budget is not None and sum(counts.values()) > budget:
            return self.exit_codes.ERROR_OVER_BUDGET.format(
                message=f"{sum(counts.values())} pw.x configurations ({counts}) > {budget}"
            )
        self.ctx.spec = spec
        self.ctx.failed = []
        self._stage("setup", f"study {spec['name']!r}: {sum(counts.values())} pw.x configurations planned")
        return None

    def sample(self):
        """The configurations of every system (calcfunction)."""
        outputs = sample_study(
            systems=orm.Dict(self.ctx.spec["systems"]), metadata={"call_link_label": "sample"}
        )
        self.ctx.settings = outputs["settings"].get_dict()
        self.ctx.structures = {k[2:]: v for k, v in outputs.items() if k.startswith("c_")}

    def _out_training_set(self) -> None:
        """The ``training_set`` output, once: at the split, or after active learning (the final set)."""
        if not self.ctx.get("training_set_out"):
            self.out("training_set", self.ctx.training_set)
            self.ctx.training_set_out = True

    def _dataset_builder(self, structures: dict[str, orm.StructureData], settings: dict[str, Any]):
        """The dataset workchain on ``structures`` with the study's DFT settings."""
        spec = self.ctx.spec
        builder = EmlipDatasetWorkChain.get_builder_from_protocol(
            self.inputs.pw_code,
            structures,
            spec["pseudo_family"],
            protocol=spec["dft"]["protocol"],
            overrides=spec["dft"].get("overrides") or None,
            structure_settings=settings,
            max_concurrent=int(spec["dft"]["max_concurrent"]),
        )
        for port in ("pp_code", "projwfc_code"):
            if port in self.inputs:
                builder[port] = self.inputs[port]
        return builder

    def run_dft(self):
        """pw.x labels of every configuration (one dataset workchain)."""
        settings = {
            key: {k: v for k, v in entry.items() if k != "geometry"}
            for key, entry in self.ctx.settings.items()
        }
        builder = self._dataset_builder(self.ctx.structures, settings)
        builder.metadata.call_link_label = "dft"
        self._stage("dft", f"DFT: pw.x on {len(self.ctx.structures)} configurations")
        return ToContext(dft=self.submit(builder))

    def inspect_dft(self):
        node = self.ctx.dft
        if "dataset" not in node.outputs:
            return self.exit_codes.ERROR_DFT_FAILED.format(
                message=f"{node.process_label}<{node.pk}> {how_it_ended(node)}"
            )
        self.out("dataset", node.outputs.dataset)
        self.report(f"DFT: {len(node.outputs.dataset)} configurations labelled")
        return None

    def split(self):
        """Hold out whole geometries (calcfunction); the split is an output."""
        held = [g for geometries in held_out_geometries(self.ctx.spec).values() for g in geometries]
        settings = {
            "held_out_geometries": held,
            "geometry_of": {key: entry["geometry"] for key, entry in self.ctx.settings.items()},
            "structure_uuids": {key: node.uuid for key, node in self.ctx.structures.items()},
        }
        outputs = split_study(
            dataset=self.ctx.dft.outputs.dataset,
            settings=orm.Dict(settings),
            metadata={"call_link_label": "split"},
        )
        for name in ("held_out_set", "split"):  # the training set: once active learning is done
            self.out(name, outputs[name])
        self.ctx.training_set = outputs["training_set"]
        self.ctx.held_out = outputs["held_out_set"]
        self.ctx.split = outputs["split"]
        if not self.al_enabled():
            self._out_training_set()
        if len(self.ctx.held_out) == 0:
            self._out_training_set()
            return self.exit_codes.ERROR_NOTHING_HELD_OUT.format(message=f"geometries {held}")
        self.report(
            f"split: {len(self.ctx.training_set)} configurations to train on, "
            f"{len(self.ctx.held_out)} held out ({len(held)} geometries)"
        )
        return None

    def _training_builder(
        self,
        training_set: EmlipDatasetData,
        designs: dict[str, dict[str, Any]],
        initial_models: dict[str, EmlipModelData] | None = None,
    ):
        """The training workchain of ``designs`` (label → design of the spec, or an emlip-train config
        under ``config``) on ``training_set``, with the study's training settings; a design named in
        ``initial_models`` starts from that model (warm start)."""
        spec = self.ctx.spec
        labels = training_set.label_keys
        elements = sorted(set(training_set.elements) | set(self.ctx.held_out.elements))
        configs = {
            label: design_config(design, spec["training"], labels=labels, elements=elements)
            for label, design in designs.items()
        }
        builder = EmlipTrainingWorkChain.get_builder()
        builder.training_set = training_set
        builder.train_code = self.inputs.train_code
        builder.designs = orm.Dict(configs)
        if initial_models:
            builder.initial_models = dict(initial_models)
        options = dict(spec["training"].get("options") or {})
        if options:
            builder.train_options = orm.Dict(options)
        return builder

    def _evaluate_builder(self, model: EmlipModelData, dataset: EmlipDatasetData, parameters: dict[str, Any]):
        """``emlip.evaluate`` of ``model`` on ``dataset``."""
        builder = EmlipEvaluateCalculation.get_builder()
        builder.code = self.inputs.eval_code
        builder.model = model
        builder.dataset = dataset
        builder.parameters = orm.Dict(parameters)
        builder.metadata.options = evaluation_options(self.ctx.spec)
        return builder

    def run_training(self):
        """Every design on the same training set, at once (one training workchain)."""
        designs = self.ctx.spec["designs"]
        builder = self._training_builder(self.ctx.training_set, designs)
        builder.metadata.call_link_label = "training"
        self._stage("training", f"training: {', '.join(designs)} at once")
        return ToContext(training=self.submit(builder))

    def inspect_training(self):
        node = self.ctx.training
        self.ctx.models = dict(node.outputs.models) if "models" in node.outputs else {}
        self.ctx.metrics = dict(node.outputs.metrics) if "metrics" in node.outputs else {}
        failed = sorted(set(self.ctx.spec["designs"]) - set(self.ctx.models))
        if failed:
            self.ctx.failed.append(f"training of {', '.join(failed)}")
        if not self.ctx.models:
            self._out_training_set()
            return self.exit_codes.ERROR_ALL_TRAININGS_FAILED
        self.report(f"training: {len(self.ctx.models)} models ({', '.join(self.ctx.models)})")
        return None

    def run_models(self):
        """Held-out predictions of every model and every validation of the spec, all at once.

        The models are final here (after active learning, if any): they, their metrics and the set they
        trained on become outputs. A model whose held-out predictions active learning made already is
        not evaluated again.
        """
        self._out_training_set()
        for label, model in self.ctx.models.items():
            self.out(f"models.{label}", model)
            self.out(f"metrics.{label}", self.ctx.metrics[label])
        futures = {}
        evaluated = self.ctx.get("al_evaluated") or {}
        for label, model in self.ctx.models.items():
            calc = evaluated.get(label)
            if calc is not None and calc.inputs.model.uuid == model.uuid:
                self.ctx[f"evaluate_{label}"] = calc
                continue
            builder = self._evaluate_builder(model, self.ctx.held_out, HELD_OUT_PARAMETERS)
            builder.metadata.call_link_label = f"evaluate_{label}"
            futures[f"evaluate_{label}"] = self.submit(builder)
        codes = {"pw": self.inputs.pw_code, "eval": self.inputs.eval_code}
        for port, role in (("pp_code", "pp"), ("projwfc_code", "projwfc")):
            if port in self.inputs:
                codes[role] = self.inputs[port]
        validations = self.ctx.spec.get("validations", {})
        dft = self.ctx.spec["dft"]
        share = shared_concurrency(int(dft["max_concurrent"]), len(validations))
        spec = {**self.ctx.spec, "dft": {**dft, "max_concurrent": share}}
        context = Context(spec=spec, models=self.ctx.models, codes=codes)
        for name, options in validations.items():
            entry = VALIDATIONS[name]
            builder = entry.build(options, context)
            builder.metadata.call_link_label = f"validate_{name}"
            futures[f"validate_{name}"] = self.submit(builder)
        names = ", ".join(validations) + f" (at most {share} pw.x each)" if validations else "none"
        self._stage(
            "validation",
            f"models: held-out predictions of {len(self.ctx.models)} models; validations: {names}",
        )
        return ToContext(**futures)

    def inspect_models(self):
        self.ctx.predictions, self.ctx.summaries, self.ctx.validations, self.ctx.figures = {}, {}, {}, {}
        for label in self.ctx.models:
            calc = self.ctx[f"evaluate_{label}"]
            if "predictions" in calc.outputs:
                self.ctx.predictions[label] = calc.outputs.predictions
                self.ctx.summaries[label] = calc.outputs.summary
                self.out(f"predictions.{label}", calc.outputs.predictions)
            if not calc.is_finished_ok:
                self.ctx.failed.append(f"held-out predictions of {label} ({how_it_ended(calc)})")
        for name in self.ctx.spec.get("validations", {}):
            node = self.ctx[f"validate_{name}"]
            entry = VALIDATIONS[name]
            if not node.is_finished_ok:
                self.ctx.failed.append(f"validation {name} ({how_it_ended(node)})")
            if entry.output in node.outputs:
                self.ctx.validations[name] = node.outputs[entry.output]
                self.out(f"validations.{name}", node.outputs[entry.output])
            for figure, file in (entry.figures(node) if entry.figures else {}).items():
                self.ctx.figures[f"{name}_{figure}"] = file
        self.report(
            f"models: {len(self.ctx.predictions)} held-out predictions, "
            f"{len(self.ctx.validations)} validation comparisons"
        )

    def compare(self):
        """The comparison (calcfunction): one row per design."""
        spec = self.ctx.spec
        designs = {}
        for label, design in spec["designs"].items():
            config = design_config(design, spec["training"])
            designs[label] = {"head": config["model"]["head"]["name"], "preset": design.get("preset")}
        nodes: dict[str, orm.Data] = {}
        for label, node in self.ctx.predictions.items():
            nodes[f"predictions_{label}"] = node
            nodes[f"evaluation_{label}"] = self.ctx.summaries[label]
        for label, node in self.ctx.metrics.items():
            nodes[f"metrics_{label}"] = node
        for name, node in self.ctx.validations.items():
            nodes[f"validation_{name}"] = node
        if "active_learning" in self.ctx:
            nodes["active_learning"] = self.ctx.active_learning
        settings = {"designs": designs, "split": self.ctx.split.get_dict()}
        self._stage("report", "comparison and report")
        if not self.ctx.predictions:
            self.ctx.failed.append("every held-out prediction")
            return
        self.ctx.comparison = compare_study(
            held_out=self.ctx.held_out,
            settings=orm.Dict(settings),
            **nodes,
            metadata={"call_link_label": "compare"},
        )
        self.out("comparison", self.ctx.comparison)
        for line in self.ctx.comparison.get_dict()["verdict"]:
            self.report(f"verdict: {line}")

    def has_comparison(self) -> bool:
        return "comparison" in self.ctx

    def _provenance(self) -> dict[str, Any]:
        spec = self.ctx.spec
        qe_version = None
        for node in self.ctx.dft.called_descendants:
            if isinstance(node, orm.CalcJobNode) and "output_parameters" in node.outputs:
                qe_version = node.outputs.output_parameters.get("creator_version")
                break
        codes = {
            port: {"label": self.inputs[port].full_label, "uuid": self.inputs[port].uuid}
            for port in ("pw_code", "train_code", "eval_code", "pp_code", "projwfc_code")
            if port in self.inputs
        }
        nodes = {
            "study": self.node.uuid,
            "dataset": self.ctx.dft.outputs.dataset.uuid,
            "training_set": self.ctx.training_set.uuid,
            "held_out_set": self.ctx.held_out.uuid,
            "split": self.ctx.split.uuid,
            "comparison": self.ctx.comparison.uuid,
            **{f"model {label}": node.uuid for label, node in self.ctx.models.items()},
        }
        if "active_learning" in self.ctx:
            nodes["active_learning"] = self.ctx.active_learning.uuid
        return {
            "study": {"name": spec["name"], "title": spec.get("report", {}).get("title") or spec["name"]},
            "description": spec.get("description", ""),
            "pk": self.node.pk,
            "versions": {**package_versions(), "Quantum ESPRESSO (pw.x)": qe_version or "unknown"},
            "codes": codes,
            "nodes": nodes,
            "pseudo_family": spec["pseudo_family"],
            "dft": spec["dft"],
            "training": spec["training"],
            "spec_text": self.inputs.spec_text.value if "spec_text" in self.inputs else None,
            "reproduce": [
                f"aiida-emlip export {self.node.pk} study.aiida",
                "aiida-emlip reproduce study.aiida",
            ],
        }

    def write_report(self):
        """The HTML report (calcfunction): figures from the held-out predictions and the learning curves."""
        nodes: dict[str, orm.Data] = {}
        for label, node in self.ctx.predictions.items():
            nodes[f"predictions_{label}"] = node
        for label, node in self.ctx.metrics.items():
            nodes[f"metrics_{label}"] = node
        for name, node in self.ctx.figures.items():
            nodes[f"figure_{name}"] = node
        report = study_report(
            comparison=self.ctx.comparison,
            provenance=orm.Dict(self._provenance()),
            held_out=self.ctx.held_out,
            **nodes,
            metadata={"call_link_label": "report"},
        )
        self.out("report", report)
        self.report(
            f"report: FolderData<{report.pk}> ({len(report.base.repository.list_object_names())} files)"
        )

    def results(self):
        self._stage("finished", "finished")
        if self.ctx.failed:
            return self.exit_codes.ERROR_PARTIAL.format(message="; ".join(self.ctx.failed))
        return None
