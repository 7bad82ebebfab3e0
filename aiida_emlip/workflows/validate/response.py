"""``emlip.validate.response``: four probes that place each model on the conductor–insulator picture.

1. *field response* — induced dipole vs field of a thin metal slab (screening) and of a water film
   (dielectric response);
2. *charging curve* — Fermi level μ vs total charge of the metal slab (heads that give μ);
3. *dissociation* — charge of one ion of a pair (LiF by default) from bonding distance to 10 Å;
4. *polarisability vs size* — water chains of 1..N molecules, α from finite fields (DFT and models)
   and by autograd through the field (models), the growth exponent b of α ∝ N^b.

DFT runs through :class:`~aiida_emlip.workflows.dataset.EmlipDatasetWorkChain` (one dataset for all
probes: fields with pw.x's dipole-corrected sawtooth, charges with a uniform background, Hirshfeld
charges with ``dft.pp_code``); every model through ``emlip.evaluate`` on the same configurations,
open along their vacuum axes (slab or open-boundary electrostatics). The numbers and the verdicts are
pure code (:mod:`aiida_emlip.analysis.response`, :mod:`aiida_emlip.analysis.verdicts`), called
through calcfunctions.
"""

from __future__ import annotations

from typing import Any

from aiida import orm
from aiida.engine import ExitCode, ToContext, if_

from aiida_emlip.analysis.response import PROBES
from aiida_emlip.data import EmlipDatasetData
from aiida_emlip.data.model import EmlipModelData
from aiida_emlip.structures.geometry import vacuum_axes
from aiida_emlip.structures.response import probe_configurations
from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

from .base import EmlipValidationWorkChain
from .evaluate import model_capabilities
from .response_functions import (
    analyse_response_probes,
    dft_frames,
    model_polarizabilities,
    response_figures,
    response_structures,
)

#: Table columns of each probe.
PROBE_COLUMNS = {
    "field": ("field_metal", "field_water"),
    "charging": ("charging",),
    "dissociation": ("dissociation",),
    "polarizability": ("polarizability",),
}


class EmlipResponseWorkChain(EmlipValidationWorkChain):
    """Field response, charging curve, dissociation and α vs size: DFT against every model, with verdicts."""

    protocol_file = "response.yaml"

    @classmethod
    def define(cls, spec) -> None:
        """Inputs, outline, outputs and exit codes."""
        super().define(spec)
        spec.input(
            "probes",
            valid_type=orm.List,
            required=False,
            help="Probes to run (field, charging, dissociation, polarizability); default: the protocol's. "
            "Asking explicitly for `charging` requires every model to give μ (exit 214 otherwise).",
        )
        spec.input(
            "metal_slab", valid_type=orm.StructureData, required=False, help="Metal slab (default: protocol)."
        )
        spec.input(
            "water_film", valid_type=orm.StructureData, required=False, help="Water film (default: protocol)."
        )
        spec.outline(
            cls.setup,
            cls.validate_inputs,
            cls.build_structures,
            cls.run_calculations,
            cls.inspect_dft,
            if_(cls.has_models)(cls.inspect_models),
            cls.analyse,
            cls.results,
        )
        spec.output(
            "configurations", valid_type=EmlipDatasetData, help="Every probe configuration (DFT cells)."
        )
        spec.output("setup", valid_type=orm.Dict, help="Probe metadata of every configuration key.")
        spec.output("dft_dataset", valid_type=EmlipDatasetData, help="Every DFT label of this workchain.")
        spec.output_namespace("autograd_polarizability", valid_type=orm.Dict, dynamic=True)
        spec.output("analysis", valid_type=orm.Dict, help="Every probe's numbers for DFT and every model.")
        spec.output("verdicts", valid_type=orm.Dict, help="The design verdict table (rows: models).")
        spec.output_namespace("figures", valid_type=orm.SinglefileData, dynamic=True)
        spec.exit_code(203, "ERROR_INVALID_PROBES", message="Invalid probes or probe settings: {message}")
        spec.exit_code(210, "ERROR_NO_VACUUM", message="A slab has no vacuum along the field axis: {message}")
        spec.exit_code(
            211, "ERROR_FIELD_ALONG_PERIODIC", message="The field runs along a periodic direction: {message}"
        )
        spec.exit_code(212, "ERROR_NO_ELECTRONS", message="A charge leaves no electrons: {message}")
        spec.exit_code(214, "ERROR_NO_FERMI_LEVEL", message="The charging probe needs μ: {message}")

    # ------------------------------------------------------------------ builder
    @classmethod
    def get_builder_from_protocol(
        cls,
        code: orm.AbstractCode,
        pseudo_family: str,
        protocol: str | None = None,
        overrides: dict[str, Any] | None = None,
        dft_overrides: dict[str, Any] | None = None,
        probes: list[str] | None = None,
        models: dict[str, EmlipModelData] | None = None,
        eval_code: orm.AbstractCode | None = None,
        metal_slab: orm.StructureData | None = None,
        water_film: orm.StructureData | None = None,
        pp_code: orm.AbstractCode | None = None,
        max_concurrent: int = 4,
    ):
        """Return a builder; ``ProtocolError``/``OverrideError`` at once for bad names or keys."""
        builder = cls.shared_builder(
            code,
            pseudo_family,
            protocol,
            overrides,
            dft_overrides,
            models,
            eval_code,
            pp_code,
            max_concurrent,
        )
        if probes is not None:
            builder.probes = orm.List(list(probes))
        if metal_slab is not None:
            builder.metal_slab = metal_slab
        if water_film is not None:
            builder.water_film = water_film
        return builder

    # ------------------------------------------------------------------ checks
    def _settings(self) -> dict[str, Any] | str:
        values = self.ctx.inputs
        explicit = "probes" in self.inputs
        probes = list(self.inputs.probes.get_list()) if explicit else list(values["probes"])
        unknown = sorted(set(probes) - set(PROBES))
        if unknown or not probes or len(set(probes)) != len(probes):
            return f"probes {probes}: give distinct names among {list(PROBES)}"
        settings = {
            k: values[k]
            for k in (
                "field_axis",
                "metal",
                "water",
                "fields",
                "charges",
                "ion_pair",
                "distances",
                "pair_box",
                "water_sizes",
                "chain_field",
                "chain_vacuum",
            )
        }
        settings["probes"] = [p for p in PROBES if p in probes]
        if settings["field_axis"] not in (0, 1, 2):
            return f"field_axis must be 0, 1 or 2, got {settings['field_axis']}"
        if "field" in probes and (not settings["fields"] or any(float(e) <= 0 for e in settings["fields"])):
            return f"fields must be positive magnitudes (both signs are applied), got {settings['fields']}"
        if "charging" in probes and len({float(q) for q in settings["charges"]}) < 2:
            return f"the charging curve needs at least two distinct charges, got {settings['charges']}"
        if "dissociation" in probes and (len(settings["distances"]) < 2 or len(settings["ion_pair"]) != 2):
            return "the dissociation probe needs an ion pair [A, B] and at least two distances"
        if "polarizability" in probes and (
            len(set(settings["water_sizes"])) < 2 or min(settings["water_sizes"]) < 1
        ):
            return f"α vs size needs at least two chain sizes ≥ 1, got {settings['water_sizes']}"
        self.ctx.explicit_probes = explicit
        return settings

    def validate_inputs(self):
        """Every bad input gets its exit code here, before any structure is stored or pw.x runs."""
        settings = self._settings()
        if isinstance(settings, str):
            return self.exit_codes.ERROR_INVALID_PROBES.format(message=settings)
        self.ctx.settings = settings
        axis = settings["field_axis"]
        slabs = {}
        if "metal_slab" in self.inputs:
            slabs["metal"] = self.inputs.metal_slab.get_ase()
        if "water_film" in self.inputs:
            slabs["water"] = self.inputs.water_film.get_ase()
        try:
            frames, _ = probe_configurations(settings, slabs.get("metal"), slabs.get("water"))
        except (ValueError, KeyError, TypeError) as error:
            return self.exit_codes.ERROR_INVALID_PROBES.format(message=f"{type(error).__name__}: {error}")
        for atoms in frames:
            probe = atoms.info["config_type"]
            if not probe.startswith("field_"):
                continue
            name = probe.split("_", 1)[1]
            axes = vacuum_axes(atoms)
            if not axes:
                return self.exit_codes.ERROR_NO_VACUUM.format(
                    message=f"the {name} slab has no vacuum gap ≥ 4 Å along any axis (field axis {axis})"
                )
            if axis not in axes:
                return self.exit_codes.ERROR_FIELD_ALONG_PERIODIC.format(
                    message=f"field axis {axis} of the {name} slab is periodic; its vacuum is along {axes}"
                )
        error = self.check_family(frames) or self.check_model_elements(frames)
        if error is not None:
            return error
        return self._check_models()

    def _check_models(self) -> ExitCode | None:
        self.ctx.skipped = {}
        for label, model in self.inputs.get("models", {}).items():
            capabilities = model_capabilities(model)
            head = (model.base.attributes.get("head") or {}).get("name", "?")
            skipped = {}
            if "charging" in self.ctx.settings["probes"] and "fermi_level" not in capabilities:
                if self.ctx.explicit_probes:
                    return self.exit_codes.ERROR_NO_FERMI_LEVEL.format(
                        message=f"model {label}: the {head!r} head gives no Fermi level"
                    )
                skipped["charging"] = f"the {head!r} head gives no Fermi level"
            if "charges" not in capabilities:
                skipped["dissociation"] = f"the {head!r} head has no charges"
            self.ctx.skipped[label] = skipped
        return None

    # ------------------------------------------------------------------ work
    def build_structures(self):
        """Every probe configuration (a calcfunction, so the structures are in the provenance)."""
        slabs = {}
        if "metal_slab" in self.inputs:
            slabs["metal"] = self.inputs.metal_slab
        if "water_film" in self.inputs:
            slabs["water"] = self.inputs.water_film
        outputs = response_structures(
            settings=orm.Dict(self.ctx.settings), **slabs, metadata={"call_link_label": "structures"}
        )
        self.ctx.structures = outputs
        self.out("configurations", outputs["configurations"])
        self.out("setup", outputs["setup"])
        self.report(
            f"probes {self.ctx.settings['probes']}: {len(outputs['setup'].get_dict())} configurations"
        )

    def run_calculations(self):
        """Submit the DFT dataset workchain and one emlip.evaluate per model; autograd α of the models."""
        inputs = dict(self.exposed_inputs(EmlipDatasetWorkChain, namespace="dft"))
        inputs["configurations"] = self.ctx.structures["configurations"]
        inputs["metadata"] = {"call_link_label": "dft"}
        futures = {"dft": self.submit(EmlipDatasetWorkChain, **inputs)}
        configurations = self.ctx.structures["model_configurations"]
        futures.update(self.submit_models(configurations, "configurations"))
        self.ctx.autograd = {}
        if "polarizability" in self.ctx.settings["probes"]:
            models = self.inputs.get("models", {})
            for label in self.ctx.model_labels:
                try:
                    node = model_polarizabilities(
                        models[label], configurations, metadata={"call_link_label": f"autograd_{label}"}
                    )
                except Exception as error:
                    self.report(f"model {label}: no autograd α ({type(error).__name__}: {error})")
                else:
                    self.ctx.autograd[label] = node
                    self.out(f"autograd_polarizability.{label}", node)
        return ToContext(**futures)

    def inspect_dft(self):
        """The DFT dataset must exist; configurations that failed are reported and left out."""
        dataset = self.dft_dataset()
        if not isinstance(dataset, EmlipDatasetData):
            return dataset
        node = self.ctx.dft
        done = set(dft_frames(dataset, self.ctx.structures["configurations"]))
        failed = sorted(set(self.ctx.structures["setup"].get_dict()) - done)
        if failed:
            self.report(f"DFT of {failed} failed (see {node.process_label}<{node.pk}>); left out")
        self.out("dft_dataset", dataset)
        self.ctx.dft_dataset = dataset
        return None

    def analyse(self):
        """The probes' numbers and the verdict table (calcfunction), then the figures (calcfunction)."""
        labels = sorted(self.ctx.get("predictions", {}))
        columns = [c for p in self.ctx.settings["probes"] for c in PROBE_COLUMNS[p]]
        settings = {
            "models": labels,
            "tolerances": dict(self.ctx.inputs["tolerances"]),
            "skipped": {k: v for k, v in self.ctx.get("skipped", {}).items() if k in labels},
            "columns": columns,
        }
        nodes = {f"predictions_{k}": v for k, v in self.ctx.get("predictions", {}).items()}
        nodes.update({f"autograd_{k}": v for k, v in self.ctx.get("autograd", {}).items() if k in labels})
        outputs = analyse_response_probes(
            setup=self.ctx.structures["setup"],
            settings=orm.Dict(settings),
            dft=self.ctx.dft_dataset,
            configurations=self.ctx.structures["configurations"],
            **nodes,
            metadata={"call_link_label": "analyse"},
        )
        self.out("analysis", outputs["analysis"])
        self.out("verdicts", outputs["verdicts"])
        figures = response_figures(analysis_node=outputs["analysis"], metadata={"call_link_label": "figures"})
        for name, node in figures.items():
            self.out(f"figures.{name}", node)
        self.report("design verdicts:\n" + outputs["verdicts"]["text"])
