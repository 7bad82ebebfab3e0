"""``emlip.validate.interface``: a metal–water interface, neutral, in fields and with a charged electrode.

One interface geometry (the protocol's ``metal_water_interface`` sample, or the ``interface`` input)
in three kinds of state: neutral; a homogeneous field along the normal (each magnitude with both
signs, pw.x's sawtooth with the dipole correction); the electrode charged (total charge Q with
pw.x's uniform background, which the models' charged-slab electrostatics share). DFT runs through
:class:`~aiida_emlip.workflows.dataset.EmlipDatasetWorkChain` with Hirshfeld charges and the pp.x
potential profile (``dft.pp_code``); every model through ``emlip.evaluate`` on the same states, open
along the normal. The numbers (charge transfer, induced dipole per field, induced potential profiles,
potential drop and interfacial capacitance, μ against Q, energy and force errors) and the verdicts
are pure code (:mod:`aiida_emlip.analysis.interface`) called through calcfunctions.
"""

from __future__ import annotations

from typing import Any

from aiida import orm
from aiida.engine import ToContext, if_

from aiida_emlip.data import EmlipDatasetData
from aiida_emlip.data.model import EmlipModelData
from aiida_emlip.structures.geometry import vacuum_axes
from aiida_emlip.structures.interface_states import default_interface, interface_states
from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

from .base import EmlipValidationWorkChain
from .evaluate import model_sigma
from .interface_functions import (
    analyse_interface_states,
    interface_figures,
    interface_structures,
)
from .response_functions import dft_frames


class EmlipInterfaceWorkChain(EmlipValidationWorkChain):
    """Metal–water interface in fields and at electrode charges: DFT against every model, with verdicts."""

    protocol_file = "interface.yaml"

    @classmethod
    def define(cls, spec) -> None:
        """Inputs, outline, outputs and exit codes."""
        super().define(spec)
        spec.input(
            "interface",
            valid_type=orm.StructureData,
            required=False,
            help="Metal slab with water (and ions), vacuum along the field axis (default: protocol sample).",
        )
        spec.input(
            "metal_symbols",
            valid_type=orm.List,
            required=False,
            help="Elements of the electrode (default: the element of the lowest atom along the normal).",
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
        spec.output("configurations", valid_type=EmlipDatasetData, help="Every state (DFT cells).")
        spec.output("setup", valid_type=orm.Dict, help="State metadata of every configuration key.")
        spec.output("dft_dataset", valid_type=EmlipDatasetData, help="Every DFT label of this workchain.")
        spec.output("analysis", valid_type=orm.Dict, help="Every state's numbers for DFT and every model.")
        spec.output("verdicts", valid_type=orm.Dict, help="The interface verdict table (rows: models).")
        spec.output(
            "comparison", valid_type=orm.Dict, help="One row per model: errors against DFT, verdicts."
        )
        spec.output_namespace("figures", valid_type=orm.SinglefileData, dynamic=True)
        spec.exit_code(203, "ERROR_INVALID_STATES", message="Invalid interface or states: {message}")
        spec.exit_code(
            210, "ERROR_NO_VACUUM", message="The interface has no vacuum along the field axis: {message}"
        )
        spec.exit_code(
            211, "ERROR_FIELD_ALONG_PERIODIC", message="The field runs along a periodic direction: {message}"
        )
        spec.exit_code(
            212, "ERROR_NO_ELECTRONS", message="An electrode charge leaves no electrons: {message}"
        )

    # ------------------------------------------------------------------ builder
    @classmethod
    def get_builder_from_protocol(
        cls,
        code: orm.AbstractCode,
        pseudo_family: str,
        protocol: str | None = None,
        overrides: dict[str, Any] | None = None,
        dft_overrides: dict[str, Any] | None = None,
        models: dict[str, EmlipModelData] | None = None,
        eval_code: orm.AbstractCode | None = None,
        interface: orm.StructureData | None = None,
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
        if interface is not None:
            builder.interface = interface
        return builder

    # ------------------------------------------------------------------ checks
    def _settings(self) -> dict[str, Any] | str:
        values = self.ctx.inputs
        settings = {k: values[k] for k in ("field_axis", "interface", "fields", "charges")}
        if "metal_symbols" in self.inputs:
            settings["metal_symbols"] = list(self.inputs.metal_symbols.get_list())
        if settings["field_axis"] not in (0, 1, 2):
            return f"field_axis must be 0, 1 or 2, got {settings['field_axis']}"
        fields = [float(e) for e in settings["fields"]]
        if any(e <= 0 for e in fields):
            return f"fields must be positive magnitudes (both signs are applied), got {fields}"
        if not fields and not any(float(q) != 0 for q in settings["charges"]):
            return "give at least one field or one non-zero electrode charge"
        return settings

    def validate_inputs(self):
        """Every bad input gets its exit code here, before any structure is stored or pw.x runs."""
        settings = self._settings()
        if isinstance(settings, str):
            return self.exit_codes.ERROR_INVALID_STATES.format(message=settings)
        self.ctx.settings = settings
        axis = settings["field_axis"]
        try:
            atoms = (
                self.inputs.interface.get_ase()
                if "interface" in self.inputs
                else default_interface(settings["interface"])
            )
            frames, _ = interface_states(
                atoms, settings["fields"], settings["charges"], axis, settings.get("metal_symbols")
            )
        except (ValueError, KeyError, TypeError, RuntimeError) as error:
            return self.exit_codes.ERROR_INVALID_STATES.format(message=f"{type(error).__name__}: {error}")
        axes = vacuum_axes(atoms)
        if not axes:
            return self.exit_codes.ERROR_NO_VACUUM.format(
                message=f"no vacuum gap ≥ 4 Å along any axis (field axis {axis})"
            )
        if axis not in axes:
            return self.exit_codes.ERROR_FIELD_ALONG_PERIODIC.format(
                message=f"field axis {axis} is periodic; the vacuum is along {axes}"
            )
        return self.check_family(frames) or self.check_model_elements(frames)

    # ------------------------------------------------------------------ work
    def build_structures(self):
        """Every state (a calcfunction, so that the structures are in the provenance)."""
        extra = {"structure": self.inputs.interface} if "interface" in self.inputs else {}
        outputs = interface_structures(
            settings=orm.Dict(self.ctx.settings), **extra, metadata={"call_link_label": "structures"}
        )
        self.ctx.structures = outputs
        self.out("configurations", outputs["configurations"])
        self.out("setup", outputs["setup"])
        self.report(f"{len(outputs['setup'].get_dict())} interface states")

    def _dft_inputs(self) -> dict[str, Any]:
        inputs = dict(self.exposed_inputs(EmlipDatasetWorkChain, namespace="dft"))
        inputs["configurations"] = self.ctx.structures["configurations"]
        inputs["metadata"] = {"call_link_label": "dft"}
        if "pp_code" in inputs:
            # the potential profiles and the charges are what this workchain compares
            overrides = inputs["overrides"].get_dict() if "overrides" in inputs else {}
            postprocess = {"vacuum_level": True, "hirshfeld": True, **overrides.get("postprocess", {})}
            inputs["overrides"] = orm.Dict({**overrides, "postprocess": postprocess})
        else:
            self.report("no dft.pp_code: no DFT charges or potential profiles (charge transfer, capacitance)")
        return inputs

    def run_calculations(self):
        """Submit the DFT dataset workchain and one emlip.evaluate per model."""
        futures = {"dft": self.submit(EmlipDatasetWorkChain, **self._dft_inputs())}
        futures.update(self.submit_models(self.ctx.structures["model_configurations"], "states"))
        return ToContext(**futures)

    def inspect_dft(self):
        """The DFT dataset must exist; states that failed are reported and left out."""
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
        profiles = getattr(node.outputs, "potential_profiles", None)
        self.ctx.dft_profiles = dict(profiles) if profiles is not None else {}
        return None

    def analyse(self):
        """The numbers and the verdict table (calcfunction), then the figures (calcfunction)."""
        predictions = self.ctx.get("predictions", {})
        models = self.inputs.get("models", {})
        settings = {
            "sigmas": {label: model_sigma(models[label]) for label in predictions},
            "tolerances": dict(self.ctx.inputs["tolerances"]),
        }
        nodes = {f"predictions_{k}": v for k, v in predictions.items()}
        nodes.update({f"profile_{k}": v for k, v in self.ctx.get("dft_profiles", {}).items()})
        outputs = analyse_interface_states(
            setup=self.ctx.structures["setup"],
            settings=orm.Dict(settings),
            dft=self.ctx.dft_dataset,
            configurations=self.ctx.structures["configurations"],
            **nodes,
            metadata={"call_link_label": "analyse"},
        )
        self.out("analysis", outputs["analysis"])
        self.out("verdicts", outputs["verdicts"])
        self.out("comparison", outputs["comparison"])
        figures = interface_figures(
            analysis_node=outputs["analysis"],
            setup=self.ctx.structures["setup"],
            metadata={"call_link_label": "figures"},
        )
        for name, node in figures.items():
            self.out(f"figures.{name}", node)
        self.report("interface verdicts:\n" + outputs["verdicts"]["text"])
