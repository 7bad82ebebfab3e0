"""``emlip.dataset``: label configurations with pw.x and collect them in one dataset node.

One ``PwBaseWorkChain`` per configuration, submitted in batches of ``max_concurrent``, and so are the
post-processing calculations (pp.x, projwfc.x) on their folders. Every
configuration is checked before the first pw.x run (elements, electrons, distances, volume, field),
failures of single configurations end up in the ``report`` output and never drop finished labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from aiida import orm
from aiida.common import exceptions
from aiida.engine import ToContext, WorkChain, if_, while_
from aiida.manage.caching import get_use_cache
from aiida.plugins import CalculationFactory, WorkflowFactory
from ase import Atoms

from aiida_emlip import schema
from aiida_emlip.calculations.projwfc import EmlipProjwfcCalculation
from aiida_emlip.data import EmlipDatasetData
from aiida_emlip.data.dataset import dft_settings_digest

from . import protocol as protocols
from .functions import (
    assemble_dataset,
    configuration_key,
    natural_order,
    sample_configurations,
    split_configurations,
)
from .hirshfeld import PP_DENSITY_PARAMETERS, hirshfeld_multipoles
from .pw_inputs import ConfigurationError, build_pw_setup
from .samplers import SAMPLERS
from .vacuum_level import PP_PARAMETERS, planar_potentials, vacuum_level

PwBaseWorkChain = WorkflowFactory("quantumespresso.pw.base")
PpCalculation = CalculationFactory("quantumespresso.pp")

#: Identifier for AiiDA caching of the DFT steps.
PW_CACHE_IDENTIFIER = "aiida.calculations:quantumespresso.pw"
#: Post-processing on the pw.x folders, by context prefix: (code input, calculation, parameters, options).
POSTPROCESS = {
    "pp": ("pp_code", PpCalculation, PP_PARAMETERS, {}),
    "density": ("pp_code", PpCalculation, PP_DENSITY_PARAMETERS, {}),
    "projwfc": (
        "projwfc_code",
        EmlipProjwfcCalculation,
        None,
        {"resources": {"num_machines": 1, "num_mpiprocs_per_machine": 1}},
    ),
}
#: The pw.x parser: aiida-quantumespresso's, plus the dipole and band edges of the stdout.
PW_PARSER = "emlip.pw"

#: ``atoms.info`` keys carried from the input configurations into the per-configuration metadata.
CARRIED_INFO = ("sampler", "seed", "sampler_params", schema.CONFIG_TYPE)


#: pw.x ``assume_isolated`` schemes that give the energy of the molecule in open space: the dataset
#: stores such configurations as non-periodic (``pbc = False``), as the models must then treat them.
OPEN_BOUNDARY_SCHEMES = ("mt", "m-t", "martyna-tuckerman")


def configuration_settings(atoms: Atoms) -> dict[str, Any]:
    """The pw.x settings a configuration carries in ``atoms.info`` (total charge and spin, applied field),
    with the carried metadata (:data:`CARRIED_INFO`) under ``_extra``."""
    settings = {k: atoms.info[k] for k in (schema.TOTAL_CHARGE, schema.TOTAL_SPIN) if k in atoms.info}
    if schema.EXTERNAL_FIELD in atoms.info:
        settings[schema.EXTERNAL_FIELD] = np.asarray(atoms.info[schema.EXTERNAL_FIELD]).tolist()
    extra = {k: atoms.info[k] for k in CARRIED_INFO if k in atoms.info}
    return {**settings, "_extra": extra}


def pair_configurations(
    frames: list[Atoms], structures: Mapping[str, orm.StructureData]
) -> list[tuple[str, orm.StructureData, dict[str, Any]]]:
    """(key, structure, settings) of each configuration in ``frames``, in their order.

    Configuration ``i`` is paired with ``structures[configuration_key(i)]``: by its index, never by
    sorting the keys (``c10000`` sorts before ``c9999``).
    """
    if len(structures) != len(frames):
        raise ConfigurationError(
            "ERROR_INVALID_CONFIGURATIONS",
            f"{len(frames)} configurations but {len(structures)} structures split from them",
        )
    out = []
    for index, atoms in enumerate(frames):
        key = configuration_key(index)
        out.append((key, structures[key], configuration_settings(atoms)))
    return out


class EmlipDatasetWorkChain(protocols.EmlipProtocolMixin, WorkChain):
    """Run pw.x on a list of configurations (or a sampler recipe) and return an ``emlip.dataset``."""

    @classmethod
    def define(cls, spec) -> None:
        """Inputs, outline, outputs and exit codes."""
        super().define(spec)
        spec.input("code", valid_type=orm.AbstractCode, help="The pw.x code.")
        spec.input("pseudo_family", valid_type=orm.Str, help="Label of an aiida-pseudo family.")
        spec.input("protocol", valid_type=orm.Str, default=lambda: orm.Str(protocols.default_protocol()))
        spec.input("overrides", valid_type=orm.Dict, required=False, help="Overrides of the protocol inputs.")
        spec.input(
            "configurations",
            valid_type=EmlipDatasetData,
            required=False,
            help="Configurations; total_charge / total_spin / external_field read from atoms.info.",
        )
        spec.input_namespace(
            "structures",
            valid_type=orm.StructureData,
            dynamic=True,
            required=False,
            help="Configurations as StructureData, keyed by name.",
        )
        spec.input(
            "structure_settings",
            valid_type=orm.Dict,
            required=False,
            help="Per-structure settings {name: {total_charge, total_spin, external_field, "
            "config_type, electronic_type, parameters}}.",
        )
        spec.input("sampler", valid_type=orm.Dict, required=False, help='Sampler recipe {"name", "kwargs"}.')
        spec.input(
            "sampler_structure",
            valid_type=orm.StructureData,
            required=False,
            help="Base structure of the sampler recipe.",
        )
        spec.input(
            "max_concurrent",
            valid_type=orm.Int,
            default=lambda: orm.Int(4),
            help="Most PwBaseWorkChains (and then post-processing calculations) running at once: they are "
            "submitted in batches of this size.",
        )
        spec.input(
            "pp_code",
            valid_type=orm.AbstractCode,
            required=False,
            help="pp.x: needed for postprocess.vacuum_level, planar_potentials and hirshfeld.",
        )
        spec.input(
            "projwfc_code",
            valid_type=orm.AbstractCode,
            required=False,
            help="projwfc.x: needed for postprocess.lowdin.",
        )
        spec.outline(
            cls.setup,
            if_(cls.has_sampler)(cls.run_sampler),
            cls.prepare,
            while_(cls.has_pending)(cls.submit_batch, cls.inspect_batch),
            if_(cls.should_run_potential)(
                cls.run_potential, while_(cls.has_queued)(cls.submit_queued), cls.inspect_potential
            ),
            if_(cls.should_run_hirshfeld)(
                cls.run_hirshfeld, while_(cls.has_queued)(cls.submit_queued), cls.inspect_hirshfeld
            ),
            if_(cls.should_run_lowdin)(
                cls.run_lowdin, while_(cls.has_queued)(cls.submit_queued), cls.inspect_lowdin
            ),
            cls.results,
        )
        spec.output(
            "dataset", valid_type=EmlipDatasetData, required=False, help="The labelled configurations."
        )
        spec.output(
            "report", valid_type=orm.Dict, help="Counts and every failed configuration with exit code."
        )
        spec.output(
            "configurations",
            valid_type=EmlipDatasetData,
            required=False,
            help="The sampled configurations (sampler recipe input only).",
        )
        spec.output_namespace(
            "potential_profiles",
            valid_type=orm.Dict,
            dynamic=True,
            required=False,
            help="Per slab configuration key: vacuum levels and the planar-averaged potential (pp.x).",
        )
        spec.output_namespace(
            "planar_potentials",
            valid_type=orm.Dict,
            dynamic=True,
            required=False,
            help="Per configuration key: pp.x's V_bare + V_H averaged over the planes of each cell vector.",
        )
        spec.exit_code(201, "ERROR_UNKNOWN_PROTOCOL", message="Unknown protocol: {message}")
        spec.exit_code(202, "ERROR_INVALID_OVERRIDES", message="Invalid overrides: {message}")
        spec.exit_code(203, "ERROR_INVALID_CONFIGURATIONS", message="Invalid configurations: {message}")
        spec.exit_code(204, "ERROR_INVALID_SAMPLER", message="Invalid sampler recipe: {message}")
        spec.exit_code(205, "ERROR_UNKNOWN_FAMILY", message="Pseudopotential family problem: {message}")
        spec.exit_code(
            206, "ERROR_MISSING_POSTPROCESS_CODE", message="Post-processing code missing: {message}"
        )
        spec.exit_code(
            210, "ERROR_ELEMENT_NOT_IN_FAMILY", message="Element missing from the family: {message}"
        )
        spec.exit_code(211, "ERROR_NO_ELECTRONS", message="No electrons left: {message}")
        spec.exit_code(212, "ERROR_ATOMS_TOO_CLOSE", message="Atoms too close: {message}")
        spec.exit_code(213, "ERROR_ZERO_VOLUME", message="Zero cell volume: {message}")
        spec.exit_code(214, "ERROR_INVALID_FIELD", message="External field not applicable: {message}")
        spec.exit_code(
            401, "ERROR_ALL_CONFIGURATIONS_FAILED", message="Every configuration failed; see report."
        )

    # ------------------------------------------------------------------ builder
    @classmethod
    def get_builder_from_protocol(
        cls,
        code: orm.AbstractCode,
        configurations: EmlipDatasetData | dict[str, orm.StructureData],
        pseudo_family: str,
        protocol: str | None = None,
        overrides: dict[str, Any] | None = None,
        structure_settings: dict[str, dict[str, Any]] | None = None,
        max_concurrent: int = 4,
    ):
        """Return a builder; raises ``ProtocolError``/``OverrideError`` at once for bad names or keys.

        ``configurations`` is a dataset node or a mapping name -> ``StructureData`` (then
        ``structure_settings`` may give per-structure total_charge, total_spin, external_field, ...).
        """
        cls.get_protocol_inputs(protocol, overrides)  # fail early
        builder = cls.get_builder()
        builder.code = code
        builder.pseudo_family = orm.Str(pseudo_family)
        builder.protocol = orm.Str(protocols.resolve_name(protocol))
        if overrides:
            builder.overrides = orm.Dict(overrides)
        if isinstance(configurations, EmlipDatasetData):
            builder.configurations = configurations
        else:
            builder.structures = dict(configurations)
            if structure_settings:
                builder.structure_settings = orm.Dict(structure_settings)
        builder.max_concurrent = orm.Int(max_concurrent)
        return builder

    # ------------------------------------------------------------------ steps
    def setup(self):
        """Merge the protocol and overrides; check the configuration sources and the family."""
        overrides = self.inputs.overrides.get_dict() if "overrides" in self.inputs else {}
        try:
            self.ctx.inputs = self.get_protocol_inputs(self.inputs.protocol.value, overrides)
        except protocols.ProtocolError as error:
            return self.exit_codes.ERROR_UNKNOWN_PROTOCOL.format(message=str(error))
        except protocols.OverrideError as error:
            return self.exit_codes.ERROR_INVALID_OVERRIDES.format(message=str(error))
        sources = [name for name in ("configurations", "structures", "sampler") if self.inputs.get(name)]
        if len(sources) != 1:
            return self.exit_codes.ERROR_INVALID_CONFIGURATIONS.format(
                message=f"give exactly one of configurations, structures, sampler (got {sources or 'none'})"
            )
        try:
            self.ctx.family = orm.load_group(self.inputs.pseudo_family.value)
        except (exceptions.NotExistent, exceptions.MultipleObjectsError) as error:
            return self.exit_codes.ERROR_UNKNOWN_FAMILY.format(message=str(error))
        if not hasattr(self.ctx.family, "get_pseudo"):
            return self.exit_codes.ERROR_UNKNOWN_FAMILY.format(
                message="group is not a pseudopotential family"
            )
        postprocess = self.ctx.inputs["postprocess"]
        self.ctx.postprocess_skipped = {}
        if postprocess["hirshfeld"] and "pp_code" not in self.inputs:
            if "hirshfeld" not in overrides.get("postprocess", {}):
                # on by default (the reference multipoles that training supervises): skipped, with a word
                postprocess["hirshfeld"] = False
                self.ctx.postprocess_skipped = {"hirshfeld": "on by default; no pp_code given"}
                self.report("Hirshfeld charges (on by default) skipped: no pp_code given")
        wanted = [k for k in ("vacuum_level", "planar_potentials", "hirshfeld") if postprocess.get(k)]
        if wanted and "pp_code" not in self.inputs:
            return self.exit_codes.ERROR_MISSING_POSTPROCESS_CODE.format(
                message=f"postprocess {wanted} needs pp_code"
            )
        if self.ctx.inputs["postprocess"].get("lowdin") and "projwfc_code" not in self.inputs:
            return self.exit_codes.ERROR_MISSING_POSTPROCESS_CODE.format(
                message="postprocess ['lowdin'] needs projwfc_code"
            )
        self.ctx.finished = {}
        self.ctx.failures = {}
        self.ctx.postprocess_failures = {}
        self.ctx.batch = []
        self.report(
            f"protocol {self.ctx.inputs['protocol']}; caching of pw.x "
            f"{'enabled' if get_use_cache(identifier=PW_CACHE_IDENTIFIER) else 'disabled'}"
        )

    def has_sampler(self) -> bool:
        """Whether the configurations come from a sampler recipe."""
        return "sampler" in self.inputs

    def run_sampler(self):
        """Run the sampler recipe as a calcfunction (the seed is in the recipe and in each configuration)."""
        recipe = self.inputs.sampler.get_dict()
        name = recipe.get("name")
        if name not in SAMPLERS or set(recipe) - {"name", "kwargs"}:
            return self.exit_codes.ERROR_INVALID_SAMPLER.format(
                message=f"recipe {recipe}; samplers: {', '.join(sorted(SAMPLERS))}"
            )
        if SAMPLERS[name][1] and "sampler_structure" not in self.inputs:
            return self.exit_codes.ERROR_INVALID_SAMPLER.format(
                message=f"sampler {name!r} needs sampler_structure"
            )
        kwargs = {"recipe": self.inputs.sampler}
        if "sampler_structure" in self.inputs:
            kwargs["structure"] = self.inputs.sampler_structure
        try:
            self.ctx.configurations = sample_configurations(**kwargs)
        except Exception as error:  # the sampler's own argument errors
            return self.exit_codes.ERROR_INVALID_SAMPLER.format(message=f"{type(error).__name__}: {error}")
        self.out("configurations", self.ctx.configurations)

    def _collect(self) -> list[tuple[str, orm.StructureData, dict[str, Any]]]:
        """Return (key, structure, per-configuration settings) for every configuration, in order.

        A dataset input is split into structures keyed :func:`~.functions.configuration_key` of their
        index, and each configuration is paired with the structure of its own key; ``structures`` are
        paired with ``structure_settings`` by name and taken in :func:`~.functions.natural_order`.
        """
        dataset = self.ctx.get("configurations") or self.inputs.get("configurations")
        if dataset is not None:
            return pair_configurations(dataset.to_ase(), split_configurations(dataset))
        settings = self.inputs.structure_settings.get_dict() if "structure_settings" in self.inputs else {}
        unknown = sorted(set(settings) - set(self.inputs.structures))
        if unknown:
            raise ConfigurationError(
                "ERROR_INVALID_CONFIGURATIONS", f"settings for unknown structures {unknown}"
            )
        return [
            (key, self.inputs.structures[key], dict(settings.get(key, {})))
            for key in natural_order(self.inputs.structures)
        ]

    def _cutoffs(self, elements: list[str]) -> tuple[float, float]:
        inputs = self.ctx.inputs
        family = self.ctx.family
        dual = 4.0
        recommended = None
        if hasattr(family, "get_recommended_cutoffs"):
            recommended = family.get_recommended_cutoffs(elements=tuple(elements), unit="Ry")
            dual = recommended[1] / recommended[0]
        if inputs["ecutwfc"] is not None:
            wfc = float(inputs["ecutwfc"])
        elif recommended is not None:
            wfc = recommended[0] * float(inputs["cutoff_scale"])
        else:
            raise ConfigurationError("ERROR_UNKNOWN_FAMILY", "family has no recommended cutoffs: set ecutwfc")
        rho = float(inputs["ecutrho"]) if inputs["ecutrho"] is not None else wfc * dual
        return wfc, rho

    def prepare(self):
        """Check every configuration and build its pw.x inputs before any pw.x run."""
        try:
            configs = self._collect()
            elements = sorted({kind.symbol for _, s, _ in configs for kind in s.kinds})
            available = set(self.ctx.family.elements)
            missing = sorted(set(elements) - available)
            if missing:
                raise ConfigurationError(
                    "ERROR_ELEMENT_NOT_IN_FAMILY",
                    f"{missing} not in family {self.ctx.family.label} (has {', '.join(sorted(available))})",
                )
            cutoffs = self._cutoffs(elements)
            z_valence = {el: float(self.ctx.family.get_pseudo(element=el).z_valence) for el in elements}
            self.ctx.configs = {}
            # the order of the dataset, kept as a list: a checkpoint may store the dict in another order
            self.ctx.order = [key for key, _, _ in configs]
            for key, structure, settings in configs:
                extra = settings.pop("_extra", {})
                try:
                    setup = build_pw_setup(structure.get_ase(), settings, self.ctx.inputs, z_valence, cutoffs)
                except ConfigurationError as error:
                    raise ConfigurationError(error.code, f"configuration {key}: {error}") from error
                for note in setup.notes:
                    self.report(f"{key}: {note}")
                self.ctx.configs[key] = {
                    "structure": structure.uuid,
                    "parameters": setup.parameters,
                    "mesh": setup.kpoints_mesh,
                    "meta": {
                        **extra,
                        **{k: v for k, v in settings.items() if k != "parameters"},
                        "periodic_bulk": setup.periodic_bulk,
                        "edir": setup.edir,
                        "dipfield": bool(setup.parameters["CONTROL"].get("dipfield", False)),
                        "slab": setup.slab,
                        "is_metal": setup.is_metal,
                        "nspin": setup.nspin,
                        "n_electrons": setup.n_electrons,
                        "isolated": str(setup.parameters["SYSTEM"].get("assume_isolated", "")).lower()
                        in OPEN_BOUNDARY_SCHEMES,
                    },
                }
        except ConfigurationError as error:
            return getattr(self.exit_codes, error.code).format(message=str(error))
        self.ctx.cutoffs = cutoffs
        self.ctx.pending = list(self.ctx.order)
        self.report(
            f"{len(self.ctx.pending)} configurations checked; "
            f"ecutwfc {cutoffs[0]:g} Ry, ecutrho {cutoffs[1]:g} Ry"
        )

    def has_pending(self) -> bool:
        """Whether configurations wait to be submitted."""
        return bool(self.ctx.pending)

    def _pseudos(self, structure: orm.StructureData) -> dict[str, orm.Data]:
        return self.ctx.family.get_pseudos(structure=structure)

    def submit_batch(self):
        """Submit up to ``max_concurrent`` PwBaseWorkChains."""
        limit = max(1, self.inputs.max_concurrent.value)
        batch, self.ctx.pending = self.ctx.pending[:limit], self.ctx.pending[limit:]
        inputs = self.ctx.inputs
        futures = {}
        for key in batch:
            config = self.ctx.configs[key]
            structure = orm.load_node(config["structure"])
            kpoints = orm.KpointsData()
            kpoints.set_kpoints_mesh(config["mesh"])
            builder = PwBaseWorkChain.get_builder()
            builder.pw.code = self.inputs.code
            builder.pw.structure = structure
            builder.pw.parameters = orm.Dict(config["parameters"])
            builder.pw.pseudos = self._pseudos(structure)
            builder.pw.metadata.options = {**inputs["options"], "parser_name": PW_PARSER}
            builder.kpoints = kpoints
            builder.max_iterations = orm.Int(int(inputs["max_iterations"]))
            # post-processing reads the pw.x folders: then they are cleaned in on_terminated instead
            builder.clean_workdir = orm.Bool(bool(inputs["clean_workdir"]) and not self._reads_pw_folders())
            builder.metadata.call_link_label = f"pw_{key}"
            futures[f"pw_{key}"] = self.submit(builder)
        self.ctx.batch = batch
        self._progress(running=len(batch))
        return ToContext(**futures)

    def _progress(self, running: int) -> None:
        """Report the counts and keep them in the node's extras (``emlip_progress``) for monitoring."""
        counts = {
            "done": len(self.ctx.finished),
            "running": running,
            "failed": len(self.ctx.failures),
            "waiting": len(self.ctx.pending),
            "total": len(self.ctx.configs),
        }
        self.node.base.extras.set("emlip_progress", counts)
        self.report(
            f"progress: {counts['done']} done, {running} running, {counts['failed']} failed, "
            f"{counts['waiting']} waiting of {counts['total']}"
        )

    def inspect_batch(self):
        """Record finished labels and failures of the last batch."""
        for key in self.ctx.batch:
            node = self.ctx[f"pw_{key}"]
            if node.is_finished_ok:
                self.ctx.finished[key] = {
                    "parameters": node.outputs.output_parameters.uuid,
                    "trajectory": node.outputs.output_trajectory.uuid,
                    "remote_folder": node.outputs.remote_folder.uuid,
                }
                continue
            calcs = [c for c in node.called if isinstance(c, orm.CalcJobNode)]
            last = max(calcs, key=lambda c: c.ctime) if calcs else None
            self.ctx.failures[key] = {
                "workchain_pk": node.pk,
                "exit_status": node.exit_status,
                "exit_message": node.exit_message,
                "calcjob_pk": last.pk if last else None,
                "calcjob_exit_status": last.exit_status if last else None,
                "calcjob_exit_message": last.exit_message if last else None,
            }
            self.report(f"configuration {key} failed: exit status {node.exit_status} ({node.exit_message})")
        self.ctx.batch = []
        self._progress(running=0)

    def _reads_pw_folders(self) -> bool:
        """Whether a post-processing step needs the pw.x remote folders."""
        steps = ("vacuum_level", "planar_potentials", "hirshfeld", "lowdin")
        return any(self.ctx.inputs["postprocess"].get(k) for k in steps)

    def on_terminated(self) -> None:
        """Clean the remote folders of all calculations if clean_workdir was deferred for post-processing."""
        super().on_terminated()
        inputs = self.ctx.get("inputs")
        if not inputs or not inputs["clean_workdir"] or not self._reads_pw_folders():
            return
        cleaned = []
        for node in self.node.called_descendants:
            if isinstance(node, orm.CalcJobNode) and "remote_folder" in node.outputs:
                try:
                    node.outputs.remote_folder._clean()
                    cleaned.append(str(node.pk))
                except (OSError, ValueError):
                    pass
        if cleaned:
            self.report(f"cleaned remote folders of calculations {', '.join(cleaned)}")

    def _queue(self, prefix: str, keys) -> None:
        """Queue post-processing step ``prefix`` (:data:`POSTPROCESS`) on the pw.x folders of ``keys``."""
        self.ctx.queue = {"prefix": prefix, "keys": list(keys)}

    def has_queued(self) -> bool:
        """Whether post-processing calculations wait to be submitted."""
        return bool(self.ctx.queue["keys"])

    def submit_queued(self):
        """Submit the next ``max_concurrent`` queued post-processing calculations."""
        limit = max(1, self.inputs.max_concurrent.value)
        prefix, keys = self.ctx.queue["prefix"], self.ctx.queue["keys"]
        self.ctx.queue = {"prefix": prefix, "keys": keys[limit:]}
        code_port, process, parameters, options = POSTPROCESS[prefix]
        futures = self._run_on_pw_folders(
            process, self.inputs[code_port], prefix, keys[:limit], parameters, **options
        )
        return ToContext(**futures)

    def _run_on_pw_folders(self, process, code, prefix: str, keys, parameters=None, **options):
        """Submit ``process`` with ``code`` on the pw.x remote folder of each of ``keys``, all at once."""
        futures = {}
        options = {**self.ctx.inputs["options"], "withmpi": False, **options}
        for key in keys:
            builder = process.get_builder()
            builder.code = code
            builder.parent_folder = orm.load_node(self.ctx.finished[key]["remote_folder"])
            if parameters is not None:
                builder.parameters = orm.Dict(parameters)
            builder.metadata.options = options
            builder.metadata.call_link_label = f"{prefix}_{key}"
            futures[f"{prefix}_{key}"] = self.submit(builder)
        return futures

    def _postprocess_failed(self, key: str, step: str, calc, message: str) -> None:
        """Record a failed post-processing step in the report; the configuration's labels stay."""
        self.ctx.postprocess_failures[f"{key}:{step}"] = {
            "step": step,
            "pk": calc.pk,
            "exit_status": calc.exit_status,
            "exit_message": calc.exit_message or message,
        }
        self.report(f"configuration {key}: {message}")

    def _potential_keys(self) -> list[str]:
        """Finished configurations whose electrostatic potential is wanted (slabs, or every one)."""
        postprocess = self.ctx.inputs["postprocess"]
        if postprocess.get("planar_potentials"):
            return list(self.ctx.finished)
        if postprocess.get("vacuum_level"):
            return [key for key in self.ctx.finished if self.ctx.configs[key]["meta"].get("slab")]
        return []

    def should_run_potential(self) -> bool:
        """Whether slab vacuum levels or planar-averaged potentials are wanted and something finished."""
        return bool(self._potential_keys())

    def run_potential(self):
        """Queue pp.x: the electrostatic potential (V_bare + V_H, plot_num 11) of finished configurations."""
        keys = self._potential_keys()
        self._queue("pp", keys)
        self.report(f"pp.x electrostatic potential for {len(keys)} configuration(s)")

    def inspect_potential(self):
        """Planar-average the potentials (calcfunctions): slab vacuum levels, per-axis planar averages."""
        postprocess = self.ctx.inputs["postprocess"]
        for key in self.ctx.finished:
            if f"pp_{key}" not in self.ctx:
                continue
            calc = self.ctx[f"pp_{key}"]
            slab = bool(self.ctx.configs[key]["meta"].get("slab"))
            if not calc.is_finished_ok or "output_data" not in calc.outputs:
                step = "vacuum_level" if slab and postprocess.get("vacuum_level") else "planar_potentials"
                message = f"pp.x potential failed ({calc.exit_status})"
                if step == "vacuum_level":
                    message += "; Fermi level stays cell_average"
                self._postprocess_failed(key, step, calc, message)
                continue
            if postprocess.get("planar_potentials"):
                self.out(f"planar_potentials.{key}", planar_potentials(potential=calc.outputs.output_data))
            if not (slab and postprocess.get("vacuum_level")):
                continue
            system = self.ctx.configs[key]["parameters"]["SYSTEM"]
            settings = {
                "edir": int(system["edir"]) - 1,
                "emaxpos": system["emaxpos"],
                "eopreg": system["eopreg"],
            }
            levels = vacuum_level(potential=calc.outputs.output_data, settings=orm.Dict(settings))
            self.ctx.finished[key]["vacuum"] = levels.uuid
            self.out(f"potential_profiles.{key}", levels)

    def should_run_hirshfeld(self) -> bool:
        """Whether Hirshfeld multipoles are wanted (and something finished)."""
        return bool(self.ctx.inputs["postprocess"].get("hirshfeld")) and bool(self.ctx.finished)

    def run_hirshfeld(self):
        """Queue pp.x: the valence electron density (plot_num 0) of every finished configuration."""
        self._queue("density", self.ctx.finished)
        self.report(f"pp.x densities for {len(self.ctx.finished)} configuration(s)")

    def inspect_hirshfeld(self):
        """Partition each density (calcfunction) into Hirshfeld charges and atomic dipoles."""
        for key in self.ctx.finished:
            calc = self.ctx[f"density_{key}"]
            if not calc.is_finished_ok or "output_data" not in calc.outputs:
                message = f"pp.x density failed ({calc.exit_status}); no ref_charges"
                self._postprocess_failed(key, "hirshfeld", calc, message)
                continue
            config = self.ctx.configs[key]
            structure = orm.load_node(config["structure"])
            pseudos = {
                el: self.ctx.family.get_pseudo(element=el) for el in sorted(structure.get_symbols_set())
            }
            multipoles = hirshfeld_multipoles(
                density=calc.outputs.output_data,
                structure=structure,
                settings=orm.Dict({"n_electrons": config["meta"]["n_electrons"]}),
                **pseudos,
            )
            self.ctx.finished[key]["hirshfeld"] = multipoles.uuid

    def should_run_lowdin(self) -> bool:
        """Whether Löwdin charges are wanted (and something finished)."""
        return bool(self.ctx.inputs["postprocess"].get("lowdin")) and bool(self.ctx.finished)

    def run_lowdin(self):
        """Queue projwfc.x on the pw.x output folder of every finished configuration."""
        self._queue("projwfc", self.ctx.finished)
        self.report(f"projwfc.x Löwdin populations for {len(self.ctx.finished)} configuration(s)")

    def inspect_lowdin(self):
        """Take the Löwdin charges of each projwfc.x run from its ``lowdin`` output (``emlip.projwfc``).

        The parser attaches ``lowdin`` whenever the stdout's block is complete, also when
        aiida-quantumespresso's part of the parsing fails on a run it cannot read (its exit status is
        then reported and the charges are kept).
        """
        for key in self.ctx.finished:
            calc = self.ctx[f"projwfc_{key}"]
            lowdin = calc.outputs.lowdin if "lowdin" in calc.outputs else None
            if lowdin is None or "charges" not in lowdin.get_arraynames():
                message = f"projwfc.x failed ({calc.exit_status}, {calc.exit_message}); no lowdin"
                self._postprocess_failed(key, "lowdin", calc, message)
                continue
            if not calc.is_finished_ok:
                self.report(
                    f"configuration {key}: projwfc.x exit status {calc.exit_status} "
                    f"({calc.exit_message}); its Löwdin charges are complete and kept"
                )
            self.ctx.finished[key]["lowdin"] = lowdin.uuid

    def _dft_settings(self) -> dict[str, Any]:
        inputs = {k: v for k, v in self.ctx.inputs.items() if k not in ("options",)}
        family = self.ctx.family
        elements = sorted(
            {el for c in self.ctx.configs.values() for el in orm.load_node(c["structure"]).get_symbols_set()}
        )
        return {
            "code": self.inputs.code.full_label,
            "pseudo_family": family.label,
            "pseudos_md5": {el: family.get_pseudo(element=el).md5 for el in elements},
            "ecutwfc": self.ctx.cutoffs[0],
            "ecutrho": self.ctx.cutoffs[1],
            "protocol_inputs": inputs,
            "fermi_reference": "cell_average",
        }

    def results(self):
        """Assemble the dataset and the failure report (a calcfunction, so both are in the provenance)."""
        nodes: dict[str, orm.Data] = {}
        for key, uuids in self.ctx.finished.items():
            nodes[f"structure_{key}"] = orm.load_node(self.ctx.configs[key]["structure"])
            nodes[f"parameters_{key}"] = orm.load_node(uuids["parameters"])
            nodes[f"trajectory_{key}"] = orm.load_node(uuids["trajectory"])
            if "vacuum" in uuids:
                nodes[f"vacuum_{key}"] = orm.load_node(uuids["vacuum"])
            if "hirshfeld" in uuids:
                nodes[f"hirshfeld_{key}"] = orm.load_node(uuids["hirshfeld"])
            if "lowdin" in uuids:
                nodes[f"lowdin_{key}"] = orm.load_node(uuids["lowdin"])
        dft = self._dft_settings()
        dft["digest"] = dft_settings_digest(dft)
        order = self.ctx.get("order") or list(self.ctx.configs)  # a run checkpointed before ``order``
        settings = {
            "dft_settings": dft,
            "configurations": {key: self.ctx.configs[key]["meta"] for key in order},
            "order": list(order),
            "failures": self.ctx.failures,
            "postprocess_failures": self.ctx.postprocess_failures,
            "postprocess_skipped": self.ctx.postprocess_skipped,
        }
        outputs = assemble_dataset(settings=orm.Dict(settings), **nodes)
        self.out("report", outputs["report"])
        if "dataset" in outputs:
            self.out("dataset", outputs["dataset"])
        self.report(
            f"finished: {len(self.ctx.finished)} labelled, {len(self.ctx.failures)} failed "
            f"({', '.join(sorted(self.ctx.failures)) or 'none'})"
        )
        if not self.ctx.finished:
            return self.exit_codes.ERROR_ALL_CONFIGURATIONS_FAILED
