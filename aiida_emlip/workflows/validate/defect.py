"""``emlip.validate.defect``: a vacancy in several charge states, DFT against every model on the same cells.

DFT runs through :class:`~aiida_emlip.workflows.dataset.EmlipDatasetWorkChain` (one dataset: the
pristine supercell, the vacancy supercell in every charge state at the pristine geometry, and the
band-edge run of the host with empty bands), so caching, failure reports and Hirshfeld/Löwdin charges
come from it. Every model evaluates the same cells through ``emlip.evaluate``. The physics is in
:mod:`aiida_emlip.analysis.defects` (pure), called through calcfunctions.
"""

from __future__ import annotations

import math
from typing import Any

from aiida import orm
from aiida.common import exceptions
from aiida.engine import ExitCode, ToContext, if_

from aiida_emlip.data import EmlipDatasetData
from aiida_emlip.data.model import EmlipModelData
from aiida_emlip.pseudos.upf_header import free_atom_energy
from aiida_emlip.structures.defects import VacancyCells, vacancy_cells
from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

from . import evaluate as model_side
from .base import EmlipValidationWorkChain
from .defect_functions import (
    BAND_EDGES,
    POTENTIAL_PREFIX,
    PRISTINE,
    analyse_charged_vacancy,
    analyse_relaxed_vacancy,
    cell_settings,
    defect_figures,
    relaxed_structures,
    vacancy_key,
    vacancy_structures,
    vacancy_subset,
)


class EmlipChargedDefectWorkChain(EmlipValidationWorkChain):
    """Charged vacancy: ΔE(q), transition levels, formation energies and Δq profiles, DFT vs models."""

    protocol_file = "defect.yaml"

    @classmethod
    def define(cls, spec) -> None:
        """Inputs, outline, outputs and exit codes."""
        super().define(spec)
        spec.input("structure", valid_type=orm.StructureData, help="The host bulk (a periodic cell).")
        spec.input("element", valid_type=orm.Str, help="Element of the removed atom.")
        spec.input(
            "site",
            valid_type=orm.Int,
            required=False,
            help="Index in `structure` of the removed atom (default: the first atom of `element`).",
        )
        spec.input("charge_states", valid_type=orm.List, help="Integer charge states q; 0 is always added.")
        spec.input(
            "supercell",
            valid_type=orm.List,
            required=False,
            help="Diagonal repeat [n1, n2, n3] (default: the protocol's supercell_min_length).",
        )
        spec.input(
            "chemical_potentials",
            valid_type=orm.Dict,
            required=False,
            help="μ (eV/atom) per element; default: host equilibrium / host energy per atom.",
        )
        spec.input(
            "dielectric_constant",
            valid_type=orm.Float,
            required=False,
            help="ε of the finite-size correction (default 1: unscreened); the same for DFT and models.",
        )
        spec.outline(
            cls.setup,
            cls.validate_inputs,
            cls.build_structures,
            cls.run_calculations,
            cls.inspect_dft,
            if_(cls.has_models)(cls.inspect_models),
            if_(cls.should_relax)(cls.run_relaxations, cls.run_relaxed_dft, cls.analyse_relaxed),
            cls.analyse,
            cls.results,
        )
        spec.output("pristine_structure", valid_type=orm.StructureData, help="The pristine supercell.")
        spec.output("vacancy_structure", valid_type=orm.StructureData, help="The vacancy supercell.")
        spec.output("cells", valid_type=orm.Dict, help="Vacancy site, position and supercell repeat.")
        spec.output("dft_dataset", valid_type=EmlipDatasetData, help="Every DFT label of this workchain.")
        spec.output("band_edges", valid_type=orm.Dict, help="VBM, CBM and gap of the host (eV).")
        spec.output("analysis", valid_type=orm.Dict, help="Energetics and profiles of DFT and every model.")
        spec.output("comparison", valid_type=orm.Dict, help="One row per model (errors) and the DFT row.")
        spec.output_namespace(
            "relaxed", valid_type=EmlipDatasetData, dynamic=True, help="Model-relaxed cells."
        )
        spec.output(
            "relaxed_dft_dataset",
            valid_type=EmlipDatasetData,
            required=False,
            help="DFT single points at every model's relaxed vacancy cells (relax_models).",
        )
        spec.output(
            "relaxed_comparison",
            valid_type=orm.Dict,
            required=False,
            help="Per model: relaxation energy against DFT's along the same displacement, ΔE(q) there.",
        )
        spec.output_namespace("figures", valid_type=orm.SinglefileData, dynamic=True)
        spec.exit_code(203, "ERROR_INVALID_SUPERCELL", message="Invalid supercell: {message}")
        spec.exit_code(204, "ERROR_INVALID_CHARGE_STATES", message="Invalid charge states: {message}")
        spec.exit_code(206, "ERROR_INVALID_REFERENCE", message="Invalid μ or ε: {message}")
        spec.exit_code(207, "ERROR_INVALID_RELAX_MODELS", message="Invalid relax_models: {message}")
        spec.exit_code(
            210, "ERROR_ELEMENT_NOT_IN_HOST", message="The vacancy element is not in the host: {message}"
        )
        spec.exit_code(211, "ERROR_INVALID_SITE", message="Invalid vacancy site: {message}")
        spec.exit_code(212, "ERROR_NO_ELECTRONS", message="A charge state leaves no electrons: {message}")
        spec.exit_code(
            213, "ERROR_MODEL_ELEMENTS", message="A model does not cover the host's elements: {message}"
        )
        spec.exit_code(302, "ERROR_NO_BAND_EDGES", message="No band edges: {message}")

    # ------------------------------------------------------------------ builder
    @classmethod
    def get_builder_from_protocol(
        cls,
        code: orm.AbstractCode,
        structure: orm.StructureData,
        element: str,
        charge_states: list[int],
        pseudo_family: str,
        protocol: str | None = None,
        overrides: dict[str, Any] | None = None,
        dft_overrides: dict[str, Any] | None = None,
        models: dict[str, EmlipModelData] | None = None,
        eval_code: orm.AbstractCode | None = None,
        supercell: list[int] | None = None,
        site: int | None = None,
        pp_code: orm.AbstractCode | None = None,
        projwfc_code: orm.AbstractCode | None = None,
        chemical_potentials: dict[str, float] | None = None,
        dielectric_constant: float | None = None,
        max_concurrent: int = 4,
    ):
        """Return a builder; ``ProtocolError``/``OverrideError`` at once for bad names or keys.

        The defect protocol's ``dft_protocol`` becomes ``dft.protocol``; ``dft_overrides`` are the
        dataset protocol's overrides (pw.x settings).
        """
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
        builder.structure = structure
        builder.element = orm.Str(element)
        builder.charge_states = orm.List(list(charge_states))
        if supercell is not None:
            builder.supercell = orm.List(list(supercell))
        if site is not None:
            builder.site = orm.Int(site)
        if chemical_potentials:
            builder.chemical_potentials = orm.Dict(chemical_potentials)
        if dielectric_constant is not None:
            builder.dielectric_constant = orm.Float(dielectric_constant)
        if projwfc_code is not None:
            builder.dft.projwfc_code = projwfc_code
        return builder

    # ------------------------------------------------------------------ checks
    def _charges(self) -> list[int] | str:
        raw = self.inputs.charge_states.get_list()
        if not raw:
            return "give at least one charge state"
        charges = []
        for value in raw:
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not float(value).is_integer()
            ):
                return f"{value!r} is not an integer"
            charges.append(int(value))
        if len(set(charges)) != len(charges):
            return f"duplicates in {raw}"
        if 0 not in charges:
            self.report("charge state 0 added: ΔE(q) = E(q) − E(0) needs it")
            charges.append(0)
        return sorted(charges)

    def validate_inputs(self):
        """Every bad input gets its exit code here, before any structure is built or pw.x runs."""
        charges = self._charges()
        if isinstance(charges, str):
            return self.exit_codes.ERROR_INVALID_CHARGE_STATES.format(message=charges)
        self.ctx.charges = charges
        relax = self.ctx.inputs["relax_models"]
        if isinstance(relax, (list, tuple)):
            unknown = sorted(set(map(str, relax)) - set(self.inputs.get("models", {})))
            if unknown:
                return self.exit_codes.ERROR_INVALID_RELAX_MODELS.format(
                    message=f"{unknown} are not among the models {sorted(self.inputs.get('models', {}))}"
                )
        elif not isinstance(relax, bool):
            return self.exit_codes.ERROR_INVALID_RELAX_MODELS.format(
                message=f"give true, false or a list of model labels, got {relax!r}"
            )
        host = self.inputs.structure.get_ase()
        element = self.inputs.element.value
        symbols = host.get_chemical_symbols()
        if element not in symbols:
            return self.exit_codes.ERROR_ELEMENT_NOT_IN_HOST.format(
                message=f"{element} not in {', '.join(sorted(set(symbols)))}"
            )
        if not all(host.pbc):
            return self.exit_codes.ERROR_INVALID_SUPERCELL.format(message="the host must be periodic in 3D")
        supercell = self.inputs.supercell.get_list() if "supercell" in self.inputs else None
        if supercell is not None and (
            len(supercell) != 3
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in supercell)
        ):
            return self.exit_codes.ERROR_INVALID_SUPERCELL.format(
                message=f"supercell must be three positive integers, got {supercell}"
            )
        site = self.inputs.site.value if "site" in self.inputs else None
        self.ctx.cell_settings = {
            "element": element,
            "site": site,
            "supercell": supercell,
            "min_length": float(self.ctx.inputs["supercell_min_length"]),
            "charges": charges,
        }
        try:
            cells = vacancy_cells(host, **cell_settings(self.ctx.cell_settings))
        except ValueError as error:
            return self.exit_codes.ERROR_INVALID_SITE.format(message=str(error))
        error = self._check_family(cells)
        if error is not None:
            return error
        error = self.check_model_elements([cells.pristine])
        if error is not None:
            return error
        return self._check_references(set(symbols))

    def _check_family(self, cells: VacancyCells) -> ExitCode | None:
        label = self.inputs.dft.pseudo_family.value
        try:
            family = orm.load_group(label)
        except (exceptions.NotExistent, exceptions.MultipleObjectsError) as error:
            return self.exit_codes.ERROR_UNKNOWN_FAMILY.format(message=str(error))
        if not hasattr(family, "get_pseudo"):
            return self.exit_codes.ERROR_UNKNOWN_FAMILY.format(
                message=f"{label} is not a pseudopotential family"
            )
        elements = sorted(set(cells.pristine.get_chemical_symbols()))
        missing = sorted(set(elements) - set(family.elements))
        if missing:
            return self.exit_codes.ERROR_ELEMENT_NOT_IN_FAMILY.format(message=f"{missing} not in {label}")
        z_valence = {el: float(family.get_pseudo(element=el).z_valence) for el in elements}
        n_defect = sum(z_valence[s] for s in cells.defect.get_chemical_symbols())
        for q in self.ctx.charges:
            if n_defect - q <= 0:
                return self.exit_codes.ERROR_NO_ELECTRONS.format(
                    message=f"q = {q:+d} leaves {n_defect - q:g} valence electrons in the vacancy supercell "
                    f"({n_defect:g} at q = 0)"
                )
        upf = family.get_pseudo(element=self.inputs.element.value).get_content()
        self.ctx.free_atom_energy = free_atom_energy(upf)
        self.ctx.host_electrons = sum(
            z_valence[s] for s in self.inputs.structure.get_ase().get_chemical_symbols()
        )
        self.ctx.repeat = cells.repeat
        return None

    def _check_references(self, host_elements: set[str]) -> ExitCode | None:
        if "dielectric_constant" in self.inputs and not self.inputs.dielectric_constant.value > 0:
            return self.exit_codes.ERROR_INVALID_REFERENCE.format(
                message=f"dielectric constant {self.inputs.dielectric_constant.value} must be positive"
            )
        mu = self.inputs.chemical_potentials.get_dict() if "chemical_potentials" in self.inputs else {}
        bad = {k: v for k, v in mu.items() if k not in host_elements or not isinstance(v, (int, float))}
        if bad:
            return self.exit_codes.ERROR_INVALID_REFERENCE.format(
                message=f"chemical potentials {bad}: give eV/atom for host elements only"
            )
        return None

    # ------------------------------------------------------------------ work
    def build_structures(self):
        """The pristine and vacancy supercells (a calcfunction, so the cells are in the provenance)."""
        outputs = vacancy_structures(
            host=self.inputs.structure,
            settings=orm.Dict(self.ctx.cell_settings),
            metadata={"call_link_label": "vacancy_structures"},
        )
        self.ctx.structures = outputs
        self.out("pristine_structure", outputs["pristine"])
        self.out("vacancy_structure", outputs["vacancy"])
        self.out("cells", outputs["cells"])
        cells = outputs["cells"].get_dict()
        self.report(
            f"V_{self.inputs.element.value} at supercell site {cells['site']}, repeat {cells['repeat']} "
            f"({cells['n_atoms']} atoms), charge states {self.ctx.charges}"
        )

    def _dataset_inputs(self, potentials: bool = True) -> dict[str, Any]:
        """The dataset workchain's inputs: the cells, per-structure charges and the band-edge run.

        With ``pp_code`` (and ``potentials``) the planar-averaged potentials of every cell are asked
        for, unless the overrides say otherwise: Freysoldt's alignment needs them.
        """
        inputs = dict(self.exposed_inputs(EmlipDatasetWorkChain, namespace="dft"))
        electronic_type = self.ctx.inputs["electronic_type"]
        structures = {PRISTINE: self.ctx.structures["pristine"]}
        settings: dict[str, dict[str, Any]] = {
            PRISTINE: {"config_type": "host", "electronic_type": electronic_type}
        }
        for q in self.ctx.charges:
            key = vacancy_key(q)
            structures[key] = self.ctx.structures["vacancy"]
            settings[key] = {
                "total_charge": float(q),
                "config_type": f"V_{self.inputs.element.value}",
                "electronic_type": electronic_type,
            }
        # empty bands, fixed occupations: pw.x prints the highest occupied and lowest unoccupied levels
        # (the pristine run itself when the supercell is the host cell, else the host cell: same
        # crystal, same cell-average potential reference, denser effective k-sampling)
        nbnd = math.ceil(self.ctx.host_electrons / 2) + int(self.ctx.inputs["empty_bands"])
        band_edges = {"electronic_type": "insulator", "parameters": {"SYSTEM": {"nbnd": nbnd}}}
        if tuple(self.ctx.repeat) == (1, 1, 1):
            self.ctx.band_edges_key = PRISTINE
            settings[PRISTINE].update(band_edges)
        else:
            self.ctx.band_edges_key = BAND_EDGES
            structures[BAND_EDGES] = self.inputs.structure
            settings[BAND_EDGES] = {**band_edges, "config_type": "band_edges"}
        overrides = self.inputs.dft.overrides.get_dict() if "overrides" in self.inputs.dft else {}
        if "projwfc_code" in self.inputs.dft and "lowdin" not in overrides.get("postprocess", {}):
            overrides.setdefault("postprocess", {})["lowdin"] = True
        postprocess = overrides.get("postprocess", {})
        if potentials and "pp_code" in self.inputs.dft and "planar_potentials" not in postprocess:
            overrides.setdefault("postprocess", {})["planar_potentials"] = True
        if overrides:
            inputs["overrides"] = orm.Dict(overrides)
        inputs["structures"] = structures
        inputs["structure_settings"] = orm.Dict(settings)
        return inputs

    def run_calculations(self):
        """Submit the DFT dataset workchain and one emlip.evaluate per model, all at once."""
        inputs = self._dataset_inputs()
        inputs["metadata"] = {"call_link_label": "dft"}
        futures = {"dft": self.submit(EmlipDatasetWorkChain, **inputs)}
        futures.update(self.submit_models(self.ctx.structures["configurations"], "cells"))
        return ToContext(**futures)

    def inspect_dft(self):
        """The DFT dataset must hold the pristine cell, a vacancy state and the band-edge levels."""
        dataset = self.dft_dataset()
        if not isinstance(dataset, EmlipDatasetData):
            return dataset
        node = self.ctx.dft
        frames = {a.info.get("key"): a for a in dataset.to_ase()}
        missing = [k for k in (PRISTINE,) if k not in frames]
        states = [q for q in self.ctx.charges if vacancy_key(q) in frames]
        if missing or not states:
            return self.exit_codes.ERROR_DFT_FAILED.format(
                message=f"pristine: {'missing' if missing else 'ok'}; vacancy states finished: {states}"
            )
        failed = sorted(set(self.ctx.charges) - set(states))
        if failed:
            self.report(
                f"DFT of charge states {failed} failed (see {node.process_label}<{node.pk}>); kept out"
            )
        edge = frames.get(self.ctx.band_edges_key)
        if edge is None or "lowest_unoccupied_level" not in edge.info:
            return self.exit_codes.ERROR_NO_BAND_EDGES.format(
                message=f"{self.ctx.band_edges_key}: no highest occupied / lowest unoccupied level"
            )
        self.out("dft_dataset", dataset)
        self.ctx.dft_dataset = dataset
        return None

    # ------------------------------------------------------------------ model-relaxed geometries
    def _relaxed_models(self) -> list[str]:
        """Labels of the evaluated models that relax the cells (``relax_models``: true, or a list)."""
        wanted = self.ctx.inputs["relax_models"]
        evaluated = sorted(self.ctx.get("predictions", {}))
        if isinstance(wanted, (list, tuple)):
            return [label for label in evaluated if label in wanted]
        return evaluated if wanted else []

    def should_relax(self) -> bool:
        """Whether the vacancy cells are relaxed by some evaluated model (protocol ``relax_models``)."""
        return bool(self._relaxed_models())

    def run_relaxations(self):
        """One ``emlip.evaluate`` in relax mode per model on the vacancy cells of every charge state."""
        cells = vacancy_subset(
            self.ctx.structures["configurations"], metadata={"call_link_label": "vacancy_cells"}
        )
        futures = {}
        models = self.inputs.models
        for label in self._relaxed_models():
            structures = model_side.model_inputs(cells, models[label])
            if structures is None:
                continue
            builder = model_side.evaluation_builder(
                self.inputs.eval_code,
                models[label],
                structures,
                self.ctx.inputs["relax_parameters"],
                self.ctx.inputs["options"],
                label=f"relax_{label}",
            )
            futures[f"relax_{label}"] = self.submit(builder)
        self.ctx.relax_labels = sorted(k[len("relax_") :] for k in futures)
        self.report(f"relaxing the vacancy cells with {self.ctx.relax_labels}")
        return ToContext(**futures)

    def run_relaxed_dft(self):
        """DFT single points at every model's relaxed cells (the same settings as the unrelaxed cells)."""
        relaxed = {}
        for label in self.ctx.relax_labels:
            calc = self.ctx[f"relax_{label}"]
            node = model_side.predictions(calc)
            if node is None:
                self.report(f"model {label}: relaxation {calc.process_label}<{calc.pk}> failed; left out")
                continue
            if not calc.is_finished_ok:
                self.report(
                    f"model {label}: relaxation exit status {calc.exit_status}; unconverged cells flagged"
                )
            relaxed[label] = node
            self.out(f"relaxed.{label}", node)
        self.ctx.relaxed = relaxed
        if not relaxed:
            return None
        structures = relaxed_structures(**relaxed, metadata={"call_link_label": "relaxed_structures"})
        inputs = self._dataset_inputs(potentials=False)
        settings = inputs["structure_settings"].get_dict()
        new_settings = {}
        for key in structures:
            state = "vacancy_" + key.rsplit("vacancy_", 1)[1]
            new_settings[key] = {
                **settings[state],
                "config_type": "relaxed_" + settings[state]["config_type"],
            }
            new_settings[key].pop("parameters", None)
        inputs["structures"] = dict(structures)
        inputs["structure_settings"] = orm.Dict(new_settings)
        inputs["metadata"] = {"call_link_label": "relaxed_dft"}
        return ToContext(relaxed_dft=self.submit(EmlipDatasetWorkChain, **inputs))

    def analyse_relaxed(self):
        """Relaxation energies and ΔE(q) of every model at its own geometries, with DFT there."""
        node = self.ctx.get("relaxed_dft")
        if node is None or "dataset" not in node.outputs:
            if node is not None:
                self.report(
                    f"DFT at the relaxed cells failed: {node.process_label}<{node.pk}> {node.exit_status}"
                )
            return
        self.out("relaxed_dft_dataset", node.outputs.dataset)
        nodes = {f"relaxed_{k}": v for k, v in self.ctx.relaxed.items()}
        nodes.update({f"predictions_{k}": self.ctx.predictions[k] for k in self.ctx.relaxed})
        result = analyse_relaxed_vacancy(
            settings=orm.Dict({"charges": self.ctx.charges}),
            dft=self.ctx.dft_dataset,
            relaxed_dft=node.outputs.dataset,
            **nodes,
            metadata={"call_link_label": "analyse_relaxed"},
        )
        self.out("relaxed_comparison", result)
        for label, row in result.get_dict().items():
            self.report(
                f"model {label} relaxed: relaxation-energy MAE vs DFT {row.get('relaxation_energy_mae')} eV, "
                f"ΔE(q) MAE {row.get('delta_e_mae')} eV; DFT energy lowered: {row.get('dft_lowered')}"
            )

    def analyse(self):
        """The analysis (calcfunction) and the figures (calcfunction)."""
        settings = {
            "element": self.inputs.element.value,
            "site": self.ctx.structures["cells"]["site"],
            "charges": self.ctx.charges,
            "band_edges_key": self.ctx.band_edges_key,
            "dielectric_constant": (
                self.inputs.dielectric_constant.value if "dielectric_constant" in self.inputs else 1.0
            ),
            "chemical_potentials": (
                self.inputs.chemical_potentials.get_dict() if "chemical_potentials" in self.inputs else {}
            ),
            "free_atom_energy": self.ctx.free_atom_energy,
            "shell_tolerance": float(self.ctx.inputs["shell_tolerance"]),
            "fermi_points": int(self.ctx.inputs["fermi_points"]),
            "sigmas": {
                label: model_side.model_sigma(self.inputs.models[label])
                for label in self.ctx.get("predictions", {})
            },
        }
        potentials = {}
        if "planar_potentials" in self.ctx.dft.outputs:
            wanted = [PRISTINE, *(vacancy_key(q) for q in self.ctx.charges)]
            found = self.ctx.dft.outputs.planar_potentials
            potentials = {f"{POTENTIAL_PREFIX}{k}": found[k] for k in wanted if k in found}
        outputs = analyse_charged_vacancy(
            settings=orm.Dict(settings),
            dft=self.ctx.dft_dataset,
            **potentials,
            **self.ctx.get("predictions", {}),
            metadata={"call_link_label": "analyse"},
        )
        self.out("analysis", outputs["analysis"])
        self.out("comparison", outputs["comparison"])
        self.out("band_edges", outputs["band_edges"])
        figures = defect_figures(analysis_node=outputs["analysis"], metadata={"call_link_label": "figures"})
        for name, node in figures.items():
            self.out(f"figures.{name}", node)
        levels = outputs["analysis"]["methods"]["dft"]["transition_levels"]
        edges = outputs["band_edges"].get_dict()
        self.report(
            f"VBM {edges['vbm']:.3f} eV, gap {edges['gap']:.3f} eV; DFT transition levels "
            + (", ".join(f"ε({k}) = {v:.3f} eV" for k, v in levels.items()) or "none")
        )
