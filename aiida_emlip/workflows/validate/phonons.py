"""``emlip.validate.phonons``: phonons of a crystal from DFT and from every model on the same supercells.

phonopy displaces the atoms of a supercell of the host; DFT forces come from
:class:`~aiida_emlip.workflows.dataset.EmlipDatasetWorkChain` (caching and failure reports for free),
model forces from one ``emlip.evaluate`` calculation per model over all displaced supercells. For
polar crystals the non-analytical correction (LO–TO splitting) uses Born effective charges and ε∞:
from ph.x (``epsil = .true.`` at Γ, on the host cell) on the DFT side when ``ph_code`` is given, and
from each model's own response to an applied field (:mod:`aiida_emlip.models.response`) for models
with charges. The physics is in :mod:`aiida_emlip.analysis.phonons` (pure), called through
calcfunctions.
"""

from __future__ import annotations

from typing import Any

from aiida import orm
from aiida.common import exceptions
from aiida.engine import ToContext, WorkChain, if_
from aiida.plugins import CalculationFactory

from aiida_emlip.analysis import phonons as analysis
from aiida_emlip.data import EmlipDatasetData
from aiida_emlip.data.model import EmlipModelData
from aiida_emlip.models.backbone import BackboneConfig
from aiida_emlip.workflows import protocol as protocols
from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain, pw_run
from aiida_emlip.workflows.process_state import how_it_ended
from aiida_emlip.workflows.pw_inputs import mpi_option

from . import evaluate as model_side
from .phonon_functions import (
    HOST,
    PH_STDOUT,
    analyse_phonons,
    model_dielectric,
    ph_dielectric,
    phonon_displacements,
    phonon_figures,
)
from .steps import ValidationSteps, merge_protocols

#: Inputs of the dataset workchain that this workchain sets itself.
DATASET_SOURCES = ("configurations", "structures", "structure_settings", "sampler", "sampler_structure")
#: The dataset inputs not exposed under ``dft``: the sources, and ``protocol_inputs`` (the DFT settings
#: are ``dft.protocol`` and ``dft.overrides``, which the workchain reads and extends itself).
DFT_EXCLUDED = (*DATASET_SOURCES, "protocol_inputs")
#: Settings of the analysis taken from the protocol.
ANALYSIS_KEYS = ("band_points", "dos_mesh", "nac_direction", "symmetrize_force_constants")


def model_cutoff(model: EmlipModelData) -> float:
    """The backbone cutoff r_max (Å) of a model node."""
    config = model.base.attributes.get("config", {}) or {}
    backbone = dict(config.get("backbone") or {})
    return float(BackboneConfig(elements=list(config.get("elements", [])), **backbone).r_max)


class EmlipPhononWorkChain(ValidationSteps, protocols.EmlipProtocolMixin, WorkChain):
    """Phonon bands, DOS and Γ frequencies (with LO–TO where Born charges exist), DFT against every model."""

    protocol_file = "phonons.yaml"

    @classmethod
    def define(cls, spec) -> None:
        """Inputs, outline, outputs and exit codes."""
        super().define(spec)
        spec.input("structure", valid_type=orm.StructureData, help="The host crystal (a primitive cell).")
        spec.input(
            "supercell",
            valid_type=orm.List,
            required=False,
            help="Repeat [n1, n2, n3] or a 3×3 integer matrix (default: the protocol's supercell_min_length "
            "and twice the largest model cutoff).",
        )
        spec.input("protocol", valid_type=orm.Str, default=lambda: orm.Str(cls.get_default_protocol()))
        spec.input("overrides", valid_type=orm.Dict, required=False, help="Overrides of the phonon protocol.")
        spec.input(
            "nac",
            valid_type=orm.Bool,
            required=False,
            help="True: every model must give Born charges (LO–TO); False: no non-analytical correction "
            "anywhere; absent: models with charges get it, the others not.",
        )
        spec.expose_inputs(
            EmlipDatasetWorkChain,
            namespace="dft",
            exclude=DFT_EXCLUDED,
            namespace_options={"help": "Inputs of the dataset workchain that runs every pw.x calculation."},
        )
        spec.input(
            "ph_code",
            valid_type=orm.AbstractCode,
            required=False,
            help="ph.x: DFT Born charges and ε∞ at Γ for the non-analytical correction of the DFT bands.",
        )
        spec.input_namespace(
            "models", valid_type=EmlipModelData, dynamic=True, required=False, help="Models to validate."
        )
        spec.input(
            "eval_code",
            valid_type=orm.AbstractCode,
            required=False,
            help="emlip-eval code; without it only DFT runs.",
        )
        spec.outline(
            cls.setup,
            cls.validate_inputs,
            cls.build_supercells,
            cls.run_calculations,
            cls.inspect_dft,
            if_(cls.should_run_ph)(cls.run_ph, cls.inspect_ph),
            if_(cls.has_models)(cls.inspect_models),
            cls.analyse,
            cls.results,
        )
        spec.output("setup", valid_type=orm.Dict, help="phonopy's cells and displacements.")
        spec.output(
            "supercells", valid_type=EmlipDatasetData, help="The supercells whose forces are computed."
        )
        spec.output("dft_dataset", valid_type=EmlipDatasetData, help="Every DFT label of this workchain.")
        spec.output(
            "dft_dielectric", valid_type=orm.Dict, required=False, help="ε∞ and Born charges from ph.x."
        )
        spec.output_namespace("predictions", valid_type=EmlipDatasetData, dynamic=True)
        spec.output_namespace(
            "dielectric",
            valid_type=orm.Dict,
            dynamic=True,
            help="Born charges, polarisability, ε∞ per model.",
        )
        spec.output(
            "phonons", valid_type=orm.Dict, help="Bands, DOS and Γ frequencies of DFT and every model."
        )
        spec.output("comparison", valid_type=orm.Dict, help="One row per model and the DFT row.")
        spec.output_namespace("figures", valid_type=orm.SinglefileData, dynamic=True)
        spec.exit_code(201, "ERROR_UNKNOWN_PROTOCOL", message="Unknown protocol: {message}")
        spec.exit_code(202, "ERROR_INVALID_OVERRIDES", message="Invalid overrides: {message}")
        spec.exit_code(203, "ERROR_INVALID_SUPERCELL", message="Invalid supercell or host: {message}")
        spec.exit_code(
            204, "ERROR_SUPERCELL_TOO_SMALL", message="Supercell smaller than twice a model cutoff: {message}"
        )
        spec.exit_code(205, "ERROR_UNKNOWN_FAMILY", message="Pseudopotential family problem: {message}")
        spec.exit_code(
            213, "ERROR_MODEL_ELEMENTS", message="A model does not cover the host's elements: {message}"
        )
        spec.exit_code(
            214, "ERROR_ELEMENT_NOT_IN_FAMILY", message="Element missing from the family: {message}"
        )
        spec.exit_code(
            215,
            "ERROR_MODEL_WITHOUT_CHARGES",
            message="Born charges asked of a model without charges: {message}",
        )
        spec.exit_code(301, "ERROR_DFT_FAILED", message="DFT failed: {message}")
        spec.exit_code(
            302, "ERROR_PH_FAILED", message="ph.x failed, DFT bands without NAC (outputs attached): {message}"
        )
        spec.exit_code(303, "ERROR_MODEL_EVALUATION_FAILED", message="Model evaluation failed for: {message}")

    # ------------------------------------------------------------------ builder
    @classmethod
    def get_builder_from_protocol(
        cls,
        code: orm.AbstractCode,
        structure: orm.StructureData,
        pseudo_family: str,
        protocol: str | None = None,
        overrides: dict[str, Any] | None = None,
        dft_overrides: dict[str, Any] | None = None,
        models: dict[str, EmlipModelData] | None = None,
        eval_code: orm.AbstractCode | None = None,
        ph_code: orm.AbstractCode | None = None,
        supercell: list | None = None,
        nac: bool | None = None,
        max_concurrent: int = 4,
    ):
        """Return a builder; ``ProtocolError``/``OverrideError`` at once for bad names or keys.

        The phonon protocol's ``dft_protocol`` becomes ``dft.protocol``; ``dft_overrides`` are the
        dataset protocol's overrides (pw.x settings).
        """
        inputs = cls.get_protocol_inputs(protocol, overrides)
        EmlipDatasetWorkChain.get_protocol_inputs(inputs["dft_protocol"], dft_overrides)
        builder = cls.get_builder()
        builder.structure = structure
        builder.protocol = orm.Str(inputs["protocol"])
        if overrides:
            builder.overrides = orm.Dict(overrides)
        if supercell is not None:
            builder.supercell = orm.List(list(supercell))
        if nac is not None:
            builder.nac = orm.Bool(nac)
        builder.dft.code = code
        builder.dft.pseudo_family = orm.Str(pseudo_family)
        builder.dft.protocol = orm.Str(inputs["dft_protocol"])
        builder.dft.max_concurrent = orm.Int(max_concurrent)
        if dft_overrides:
            builder.dft.overrides = orm.Dict(dft_overrides)
        if models:
            builder.models = dict(models)
        if eval_code is not None:
            builder.eval_code = eval_code
        if ph_code is not None:
            builder.ph_code = ph_code
        return builder

    # ------------------------------------------------------------------ checks
    def setup(self):
        """Merge the phonon and the DFT protocols with their overrides."""
        failed = merge_protocols(self)
        if failed is not None:
            return failed
        plusminus = self.ctx.inputs["plusminus"]
        if plusminus not in ("auto", True, False):
            return self.exit_codes.ERROR_INVALID_OVERRIDES.format(
                message=f"plusminus must be auto, true or false, got {plusminus!r}"
            )
        if not float(self.ctx.inputs["displacement"]) > 0:
            return self.exit_codes.ERROR_INVALID_OVERRIDES.format(message="displacement must be positive")
        return None

    def validate_inputs(self):
        """Every bad input gets its exit code here, before any structure is built or pw.x runs."""
        host = self.inputs.structure.get_ase()
        if not all(host.pbc) or abs(host.get_volume()) < 1e-6:
            return self.exit_codes.ERROR_INVALID_SUPERCELL.format(message="the host must be periodic in 3D")
        models = dict(self.inputs.get("models", {}))
        elements = set(host.get_chemical_symbols())
        for label, model in sorted(models.items()):
            missing = sorted(elements - set(model.base.attributes.get("elements", [])))
            if missing:
                return self.exit_codes.ERROR_MODEL_ELEMENTS.format(message=f"model {label} lacks {missing}")
        cutoffs = {label: model_cutoff(model) for label, model in models.items()}
        needed = 2.0 * max(cutoffs.values(), default=0.0)
        if "supercell" in self.inputs:
            supercell = self.inputs.supercell.get_list()
            try:
                widths = analysis.supercell_widths(host.cell.array, supercell)
            except (ValueError, TypeError) as error:
                return self.exit_codes.ERROR_INVALID_SUPERCELL.format(message=str(error))
            short = {label: 2 * r for label, r in sorted(cutoffs.items()) if widths.min() < 2 * r - 1e-6}
            if short:
                return self.exit_codes.ERROR_SUPERCELL_TOO_SMALL.format(
                    message=f"smallest width {widths.min():.3f} Å; twice the cutoff of "
                    + ", ".join(f"{k}: {v:g} Å" for k, v in short.items())
                )
        else:
            length = max(float(self.ctx.inputs["supercell_min_length"]), needed)
            supercell = analysis.choose_supercell(host.cell.array, length)
        self.ctx.supercell = supercell
        nac = self.inputs.nac.value if "nac" in self.inputs else None
        self.ctx.born_models = []
        for label, model in sorted(models.items()):
            charged = "charges" in model_side.model_capabilities(model)
            if nac is True and not charged:
                return self.exit_codes.ERROR_MODEL_WITHOUT_CHARGES.format(
                    message=f"model {label} ({model.base.attributes.get('head', {}).get('name')} head)"
                )
            if charged and nac is not False:
                self.ctx.born_models.append(label)
        self.ctx.run_ph = "ph_code" in self.inputs and nac is not False
        return self._check_family(elements)

    def _check_family(self, elements: set[str]):
        label = self.inputs.dft.pseudo_family.value
        try:
            family = orm.load_group(label)
        except (exceptions.NotExistent, exceptions.MultipleObjectsError) as error:
            return self.exit_codes.ERROR_UNKNOWN_FAMILY.format(message=str(error))
        if not hasattr(family, "get_pseudo"):
            return self.exit_codes.ERROR_UNKNOWN_FAMILY.format(
                message=f"{label} is not a pseudopotential family"
            )
        missing = sorted(elements - set(family.elements))
        if missing:
            return self.exit_codes.ERROR_ELEMENT_NOT_IN_FAMILY.format(message=f"{missing} not in {label}")
        return None

    # ------------------------------------------------------------------ work
    def build_supercells(self):
        """phonopy's displaced supercells (a calcfunction, so the cells are in the provenance)."""
        settings = {
            "supercell": self.ctx.supercell,
            "distance": float(self.ctx.inputs["displacement"]),
            "plusminus": self.ctx.inputs["plusminus"],
            "reference": bool(self.ctx.inputs["reference_supercell"]),
        }
        outputs = phonon_displacements(
            structure=self.inputs.structure,
            settings=orm.Dict(settings),
            metadata={"call_link_label": "displacements"},
        )
        self.ctx.displacements = outputs
        self.out("setup", outputs["setup"])
        self.out("supercells", outputs["supercells"])
        setup = outputs["setup"].get_dict()
        widths = ", ".join(f"{w:.2f}" for w in setup["supercell_widths"])
        self.report(
            f"supercell {setup['supercell_matrix']} ({setup['n_supercell_atoms']} atoms, widths {widths} Å), "
            f"{len(setup['keys'])} supercells to compute"
        )

    def _dataset_inputs(self) -> dict[str, Any]:
        """The dataset workchain's inputs: the supercells (and the host cell for ph.x)."""
        inputs = dict(self.exposed_inputs(EmlipDatasetWorkChain, namespace="dft"))
        electronic_type = self.ctx.inputs["electronic_type"]
        setup = self.ctx.displacements["setup"].get_dict()
        structures = {key: self.ctx.displacements[key] for key in setup["keys"]}
        settings = {
            key: {"config_type": "phonon_supercell", "electronic_type": electronic_type} for key in structures
        }
        if self.ctx.run_ph:
            structures[HOST] = self.inputs.structure
            settings[HOST] = {"config_type": "host", "electronic_type": electronic_type}
            if self.ctx.dft_inputs["clean_workdir"]:
                overrides = self.inputs.dft.overrides.get_dict() if "overrides" in self.inputs.dft else {}
                inputs["overrides"] = orm.Dict({**overrides, "clean_workdir": False})
                self.report("clean_workdir off: ph.x continues from the host's pw.x folder")
        inputs["structures"] = structures
        inputs["structure_settings"] = orm.Dict(settings)
        return inputs

    def run_calculations(self):
        """Submit the DFT dataset workchain and one emlip.evaluate per model; the model responses."""
        inputs = self._dataset_inputs()
        inputs["metadata"] = {"call_link_label": "dft"}
        futures = {"dft": self.submit(EmlipDatasetWorkChain, **inputs)}
        models = dict(self.inputs.get("models", {}))
        self.ctx.model_labels = []
        self.ctx.dielectric = {}
        self.ctx.failed_responses = []
        if models and "eval_code" not in self.inputs:
            self.report(f"models {sorted(models)} given without eval_code: only DFT runs")
            return ToContext(**futures)
        for label, model in sorted(models.items()):
            builder = model_side.evaluation_builder(
                self.inputs.eval_code,
                model,
                self.ctx.displacements["supercells"],
                self.ctx.inputs["eval_parameters"],
                self.ctx.inputs["options"],
                label=f"evaluate_{label}",
            )
            futures[f"evaluate_{label}"] = self.submit(builder)
            self.ctx.model_labels.append(label)
            born = label in self.ctx.born_models
            try:
                dielectric = model_dielectric(
                    model=model,
                    structure=self.inputs.structure,
                    settings=orm.Dict({"born": born}),
                    metadata={"call_link_label": f"dielectric_{label}"},
                )
            except Exception as error:  # the model's own failure (e.g. an SCF that does not converge)
                self.ctx.failed_responses.append(label)
                self.report(f"model {label}: no dielectric response ({type(error).__name__}: {error})")
                continue
            self.ctx.dielectric[label] = dielectric
            self.out(f"dielectric.{label}", dielectric)
            if born:
                self.report(
                    f"model {label}: Born charges (ASR residual {dielectric['asr_residual']:.2e} e), "
                    f"ε∞ = {[round(dielectric['epsilon'][i][i], 3) for i in range(3)]}"
                )
        return ToContext(**futures)

    def inspect_dft(self):
        """The DFT dataset must hold the forces of every supercell (and the host run for ph.x)."""
        node = self.ctx.dft
        if "dataset" not in node.outputs:
            return self.exit_codes.ERROR_DFT_FAILED.format(
                message=f"{node.process_label}<{node.pk}> {how_it_ended(node)}, no dataset"
            )
        dataset = node.outputs.dataset
        keys = {a.info.get("key") for a in dataset.to_ase()}
        missing = sorted(set(self.ctx.displacements["setup"]["keys"]) - keys)
        if missing:
            return self.exit_codes.ERROR_DFT_FAILED.format(
                message=f"supercells {missing} failed (see {node.process_label}<{node.pk}>)"
            )
        self.out("dft_dataset", dataset)
        self.ctx.dft_dataset = dataset
        return None

    def should_run_ph(self) -> bool:
        """Whether ph.x runs (ph_code given, NAC not switched off)."""
        return bool(self.ctx.run_ph)

    def run_ph(self):
        """ph.x at Γ with ``epsil = .true., trans = .false.`` from the host's pw.x folder."""
        self.ctx.ph_error = None
        pw = pw_run(self.ctx.dft, HOST)
        if pw is None or not pw.is_finished_ok or "remote_folder" not in pw.outputs:
            self.ctx.ph_error = "the host's pw.x run did not finish"
            self.report(f"ph.x skipped: {self.ctx.ph_error}")
            return None
        calculation = CalculationFactory("quantumespresso.ph")
        qpoints = orm.KpointsData()
        qpoints.set_cell_from_structure(self.inputs.structure)
        qpoints.set_kpoints([[0.0, 0.0, 0.0]])
        builder = calculation.get_builder()
        builder.code = self.inputs.ph_code
        builder.parent_folder = pw.outputs.remote_folder
        builder.qpoints = qpoints
        builder.parameters = orm.Dict(
            {"INPUTPH": {"epsil": True, "trans": False, "tr2_ph": float(self.ctx.inputs["ph_tr2"])}}
        )
        builder.metadata.options = {
            **self.ctx.dft_inputs["options"],
            "withmpi": mpi_option(builder.code.with_mpi, False),
        }
        builder.metadata.call_link_label = "ph"
        return ToContext(ph=self.submit(builder))

    def inspect_ph(self):
        """Read ε∞ and the Born charges from the ph.x stdout (whatever the parser's verdict)."""
        calc = self.ctx.get("ph")
        if calc is None:
            return None
        retrieved = calc.outputs.retrieved if "retrieved" in calc.outputs else None
        if retrieved is None or PH_STDOUT not in retrieved.base.repository.list_object_names():
            self.ctx.ph_error = f"{calc.process_label}<{calc.pk}> exit status {calc.exit_status}, no stdout"
        else:
            try:
                tensors = ph_dielectric(retrieved=retrieved, metadata={"call_link_label": "ph_dielectric"})
            except ValueError as error:
                self.ctx.ph_error = f"{calc.process_label}<{calc.pk}>: {error}"
            else:
                self.ctx.dft_dielectric = tensors
                self.out("dft_dielectric", tensors)
                eps = tensors["epsilon"]
                self.report(
                    f"ph.x: ε∞ = {[round(eps[i][i], 3) for i in range(3)]}, Born charges "
                    + ", ".join(f"{z[0][0]:+.3f}" for z in tensors["born_charges"] or [])
                )
        if self.ctx.ph_error:
            self.report(f"ph.x failed: {self.ctx.ph_error}; DFT bands without NAC")
        return None

    def inspect_models(self):
        """Keep each model's predictions; a failed evaluation is reported and left out of the analysis."""
        self.ctx.predictions = {}
        self.ctx.failed_models = []
        for label in self.ctx.model_labels:
            calc = self.ctx[f"evaluate_{label}"]
            if "predictions" not in calc.outputs or not calc.is_finished_ok:
                self.ctx.failed_models.append(label)
                self.report(f"model {label}: {calc.process_label}<{calc.pk}> {how_it_ended(calc)}")
                continue
            self.ctx.predictions[label] = calc.outputs.predictions
            self.out(f"predictions.{label}", calc.outputs.predictions)

    def analyse(self):
        """Phonons of every method and the comparison (calcfunction), then the figures (calcfunction)."""
        inputs: dict[str, orm.Data] = {}
        if self.ctx.get("dft_dielectric") is not None:
            inputs["dft_dielectric"] = self.ctx.dft_dielectric
        for label, predictions in self.ctx.get("predictions", {}).items():
            inputs[f"predictions_{label}"] = predictions
            if label in self.ctx.dielectric:
                inputs[f"dielectric_{label}"] = self.ctx.dielectric[label]
        settings = {key: self.ctx.inputs[key] for key in ANALYSIS_KEYS}
        outputs = analyse_phonons(
            setup=self.ctx.displacements["setup"],
            settings=orm.Dict(settings),
            dft=self.ctx.dft_dataset,
            **inputs,
            metadata={"call_link_label": "analyse"},
        )
        self.out("phonons", outputs["phonons"])
        self.out("comparison", outputs["comparison"])
        figures = phonon_figures(phonons=outputs["phonons"], metadata={"call_link_label": "figures"})
        for name, node in figures.items():
            self.out(f"figures.{name}", node)
        rows = outputs["comparison"].get_dict()
        for label, row in sorted(rows.items()):
            if "gamma_frequencies" not in row:
                continue
            rmse = row.get("frequency_rmse")
            self.report(
                f"{label}: Γ {', '.join(f'{f:.2f}' for f in row['gamma_frequencies'])} THz, "
                f"LO–TO {row['lo_to_splitting']:.2f} THz" + ("" if rmse is None else f", RMSE {rmse:.3f} THz")
            )

    def results(self):
        """Exit 303 when some model could not be evaluated, 302 when ph.x failed (outputs attached)."""
        failed = sorted({*(self.ctx.get("failed_models") or []), *(self.ctx.get("failed_responses") or [])})
        if failed:
            return self.exit_codes.ERROR_MODEL_EVALUATION_FAILED.format(message=", ".join(failed))
        if self.ctx.get("ph_error"):
            return self.exit_codes.ERROR_PH_FAILED.format(message=self.ctx.ph_error)
        return None
