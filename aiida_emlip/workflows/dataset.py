"""``emlip.dataset``: label configurations with pw.x and collect them in one dataset node.

One ``PwBaseWorkChain`` per configuration, inside an ``EmlipLabelWorkChain`` (``emlip.label``) where the
configuration has post-processing steps and alone where it has none (:mod:`~.label_runs`), at most
``max_concurrent`` at once in a rolling window: when one ends, the next starts. Every configuration is
checked before the first pw.x run (elements, electrons, distances, volume, field), failures of single
configurations end up in the ``report`` output and never drop finished labels.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
from aiida import orm
from aiida.common import exceptions
from aiida.engine import ToContext, if_, while_
from aiida.manage.caching import get_use_cache
from ase import Atoms

from aiida_emlip import schema
from aiida_emlip.data import EmlipDatasetData
from aiida_emlip.data.dataset import dft_settings_digest

from . import protocol as protocols
from .assembly import assemble
from .functions import (
    configuration_key,
    expected_fermi_reference,
    expected_labels,
    natural_order,
    sample_configurations,
    split_configurations,
)
from .label import PP_STEPS, STEP_OUTPUTS, EmlipLabelWorkChain, PwBaseWorkChain, step_failure, step_name
from .label_plan import LabelPlan
from .label_runs import LABEL_PREFIX, called, label_outputs, pw_of
from .process_state import how_it_ended
from .pw_inputs import (
    ConfigurationError,
    PwSetup,
    build_pw_setup,
    check_parallelization,
    mpi_option,
    pw_cmdline,
)
from .reuse import DIGEST_EXTRA, REUSED_FROM_EXTRA, finished_twin, inputs_digest, origin, returned
from .samplers import SAMPLERS
from .window import WakeOnFirstChild

#: Identifier for AiiDA caching of the DFT steps.
PW_CACHE_IDENTIFIER = "aiida.calculations:quantumespresso.pw"
#: The pw.x parser: aiida-quantumespresso's, plus the dipole and band edges of the stdout.
PW_PARSER = "emlip.pw"
#: What a configuration's ``PwBaseWorkChain`` does after a pw.x failure no handler claims (a killed
#: pw.x, a lost node): aiida-core's ``BaseRestartWorkChain.on_unhandled_failure`` values.
UNHANDLED_FAILURE_ACTIONS = ("abort", "pause", "restart_once", "restart_and_pause")


def _kpoints_mesh(mesh: list[int]) -> orm.KpointsData:
    kpoints = orm.KpointsData()
    kpoints.set_kpoints_mesh(mesh)
    return kpoints


#: Inputs of the configurations' ``PwBaseWorkChain`` and label workchains that configurations with the same
#: value share (one node per value and run): port -> the node of a value.
SHARED_INPUTS = {
    "parameters": orm.Dict,
    "kpoints": _kpoints_mesh,
    "max_iterations": orm.Int,
    "on_unhandled_failure": orm.Str,
    "clean_workdir": orm.Bool,
    "postprocess": orm.Dict,
}

#: Entries of a configuration's context record kept once per distinct value in the run
#: (``record_values``), the record holding their places (``refs``): every checkpoint of the workchain
#: serialises the context, and a copy per configuration would make each checkpoint grow with the dataset
#: and the run's checkpointing with its square.
SHARED_RECORD = ("parameters", "mesh", "meta")

#: ``atoms.info`` keys carried from the input configurations into the per-configuration metadata.
CARRIED_INFO = ("sampler", "seed", "sampler_params", schema.CONFIG_TYPE)


def value_key(value: Any) -> str:
    """A JSON text equal for equal values (keys sorted): what tells the distinct values of a run apart
    (the context's shared record values, the stored input nodes shared between configurations)."""
    return json.dumps(value, sort_keys=True, default=str)


def labelled_by(dataset: orm.ProcessNode, key: str) -> orm.ProcessNode | None:
    """The process that labelled configuration ``key`` of the dataset workchain ``dataset`` (or, when it
    reused a finished twin's outputs, of that twin): its ``EmlipLabelWorkChain`` where the configuration
    had post-processing, else its ``PwBaseWorkChain``."""
    return called(origin(dataset), f"{LABEL_PREFIX}{key}")


def pw_run(dataset: orm.ProcessNode, key: str) -> orm.ProcessNode | None:
    """The ``PwBaseWorkChain`` of configuration ``key`` of the dataset workchain ``dataset``."""
    label = labelled_by(dataset, key)
    return pw_of(label) if label is not None else None


#: pw.x ``assume_isolated`` schemes that give the energy of the molecule in open space: the dataset
#: stores such configurations as non-periodic (``pbc = False``), as the models must then treat them.
OPEN_BOUNDARY_SCHEMES = ("mt", "m-t", "martyna-tuckerman")


def load_nodes(uuids: list[str]) -> dict[str, orm.Node]:
    """``{uuid: node}`` of the nodes ``uuids``, loaded with one query (``orm.load_node`` is one each).

    :raises NotExistent: a UUID of no node.
    """
    wanted = set(uuids)
    query = orm.QueryBuilder().append(orm.Node, filters={"uuid": {"in": sorted(wanted)}}, project="*")
    nodes = {node.uuid: node for (node,) in query.iterall()} if wanted else {}
    missing = wanted - set(nodes)
    if missing:
        raise exceptions.NotExistent(f"no node with UUID {', '.join(sorted(missing))}")
    return nodes


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


def collect_configurations(
    dataset: EmlipDatasetData | None,
    structures: Mapping[str, orm.StructureData] | None = None,
    settings: Mapping[str, dict[str, Any]] | None = None,
) -> list[tuple[str, orm.StructureData, dict[str, Any]]]:
    """(key, structure, per-configuration settings) of every configuration, in the order they run.

    A ``dataset`` is split into structures keyed :func:`~.functions.configuration_key` of their index,
    and each configuration is paired with the structure of its own key; otherwise ``structures`` are
    paired with ``settings`` by name and taken in :func:`~.functions.natural_order`.
    """
    if dataset is not None:
        return pair_configurations(dataset.to_ase(), split_configurations(dataset))
    structures = dict(structures or {})
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(structures))
    if unknown:
        raise ConfigurationError("ERROR_INVALID_CONFIGURATIONS", f"settings for unknown structures {unknown}")
    return [(key, structures[key], dict(settings.get(key, {}))) for key in natural_order(structures)]


def mpi_processes(code: orm.AbstractCode, resources: Any) -> int | None:
    """The MPI processes of a calculation on ``code`` with ``resources`` as AiiDA counts them for the job
    (the computer's scheduler, its default processes per machine); ``None`` where that is not known (a
    code without a computer, resources the scheduler refuses: the calculation itself reports those)."""
    try:
        computer = code.computer
        scheduler = computer.get_scheduler()
        given = dict(resources)
        scheduler.preprocess_resources(given, computer.get_default_mpiprocs_per_machine())
        return int(scheduler.create_job_resource(**given).get_tot_num_mpiprocs())
    except Exception:  # any failure means: not known here
        return None


def check_pw_parallelization(code: orm.AbstractCode, inputs: dict[str, Any]) -> None:
    """Raise :class:`~.pw_inputs.ConfigurationError` (``ERROR_INVALID_PARALLELIZATION``) when pw.x on
    ``code`` cannot run with the ``parallelization`` of the merged protocol ``inputs``: flags above 1
    on a calculation without MPI, or pools and band groups that do not divide the MPI processes of
    ``options.resources`` (:func:`~.pw_inputs.check_parallelization`)."""
    parallelization = inputs.get("parallelization") or {}
    if not parallelization:
        return
    options = inputs.get("options") or {}
    withmpi = mpi_option(code.with_mpi, bool(options.get("withmpi", False)))
    check_parallelization(
        parallelization, withmpi, mpi_processes(code, options.get("resources") or {}), code.full_label
    )


def dataset_cutoffs(family: orm.Group, elements: list[str], inputs: dict[str, Any]) -> tuple[float, float]:
    """``(ecutwfc, ecutrho)`` in Ry of the whole dataset: the family's recommended cutoffs of
    ``elements`` (the largest) times ``cutoff_scale``, unless ``ecutwfc``/``ecutrho`` are set."""
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


def plan_configurations(
    configs: list[tuple[str, orm.StructureData, dict[str, Any]]], family: orm.Group, inputs: dict[str, Any]
) -> tuple[tuple[float, float], list[tuple[str, orm.StructureData, dict[str, Any], dict[str, Any], PwSetup]]]:
    """Check every configuration and build its pw.x setup; nothing runs.

    Returns the dataset's ``(ecutwfc, ecutrho)`` and, per configuration in order, ``(key, structure,
    settings, carried metadata, setup)``. Raises :class:`~.pw_inputs.ConfigurationError` (the exit code
    of the dataset workchain and the configuration's key in its message) for the first bad one.
    """
    elements = sorted({kind.symbol for _, s, _ in configs for kind in s.kinds})
    available = set(family.elements)
    missing = sorted(set(elements) - available)
    if missing:
        raise ConfigurationError(
            "ERROR_ELEMENT_NOT_IN_FAMILY",
            f"{missing} not in family {family.label} (has {', '.join(sorted(available))})",
        )
    cutoffs = dataset_cutoffs(family, elements, inputs)
    z_valence = {el: float(family.get_pseudo(element=el).z_valence) for el in elements}
    planned = []
    for key, structure, given in configs:
        settings = dict(given)
        extra = settings.pop("_extra", {})
        try:
            setup = build_pw_setup(structure.get_ase(), settings, inputs, z_valence, cutoffs)
        except ConfigurationError as error:
            raise ConfigurationError(error.code, f"configuration {key}: {error}") from error
        planned.append((key, structure, settings, extra, setup))
    return cutoffs, planned


def configuration_meta(settings: dict[str, Any], extra: dict[str, Any], setup: PwSetup) -> dict[str, Any]:
    """The metadata of a configuration that its labels are assembled with (``assemble_dataset``)."""
    return {
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
    }


def effective_postprocess(
    inputs: dict[str, Any], overrides: dict[str, Any], pp_code: bool
) -> tuple[dict[str, bool], dict[str, str]]:
    """The post-processing a run does, and the steps it skips with the reason: ``inputs['postprocess']``,
    except the Hirshfeld step, on by default, which is skipped without a ``pp_code`` unless the
    overrides ask for it (the run then stops with exit 206, before any pw.x)."""
    postprocess = dict(inputs["postprocess"])
    asked = overrides.get("postprocess") or {}
    if postprocess.get("hirshfeld") and not pp_code and "hirshfeld" not in asked:
        postprocess["hirshfeld"] = False
        return postprocess, {"hirshfeld": "on by default; no pp_code given"}
    return postprocess, {}


def configuration_steps(postprocess: dict[str, bool], slab: bool) -> dict[str, bool]:
    """The post-processing steps of a configuration (the vacuum level only for slabs: ``slab`` is
    :attr:`PwSetup.slab`, whether the configuration is one)."""
    return {
        "vacuum_level": bool(postprocess.get("vacuum_level")) and bool(slab),
        "planar_potentials": bool(postprocess.get("planar_potentials")),
        "hirshfeld": bool(postprocess.get("hirshfeld")),
        "lowdin": bool(postprocess.get("lowdin")),
    }


class EmlipDatasetWorkChain(protocols.EmlipProtocolMixin, WakeOnFirstChild):
    """Run pw.x on a list of configurations (or a sampler recipe) and return an ``emlip.dataset``."""

    @classmethod
    def define(cls, spec) -> None:
        """Inputs, outline, outputs and exit codes."""
        super().define(spec)
        spec.input("code", valid_type=orm.AbstractCode, help="The pw.x code.")
        spec.input("pseudo_family", valid_type=orm.Str, help="Label of an aiida-pseudo family.")
        spec.input(
            "protocol",
            valid_type=orm.Str,
            default=lambda: orm.Str(protocols.default_protocol()),
            help="Protocol name (protocols/dataset.yaml); with protocol_inputs, the protocol they come from.",
        )
        spec.input(
            "overrides",
            valid_type=orm.Dict,
            required=False,
            help="Overrides of the protocol inputs; with protocol_inputs, each must already hold there.",
        )
        spec.input(
            "protocol_inputs",
            valid_type=orm.Dict,
            required=False,
            help="The complete merged inputs (defaults <- protocol <- overrides) that the run uses as they "
            "are: get_builder_from_protocol sets them, so the builder shows every setting before "
            "submission. Without it the workchain merges protocol and overrides itself.",
        )
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
            help="Most configurations labelled at once (one PwBaseWorkChain each, inside an "
            "EmlipLabelWorkChain with post-processing, running one calculation at a time): when one ends, "
            "the next starts.",
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
            if_(cls.has_twin)(cls.reuse_twin).else_(
                if_(cls.has_sampler)(cls.run_sampler),
                cls.prepare,
                while_(cls.has_unfinished)(cls.run_window),
                cls.results,
            ),
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
            207,
            "ERROR_INVALID_PARALLELIZATION",
            message="pw.x cannot run with this parallelization: {message}",
        )
        spec.exit_code(
            210, "ERROR_ELEMENT_NOT_IN_FAMILY", message="Element missing from the family: {message}"
        )
        spec.exit_code(211, "ERROR_NO_ELECTRONS", message="No electrons left: {message}")
        spec.exit_code(212, "ERROR_ATOMS_TOO_CLOSE", message="Atoms too close: {message}")
        spec.exit_code(213, "ERROR_ZERO_VOLUME", message="Zero cell volume: {message}")
        spec.exit_code(214, "ERROR_INVALID_FIELD", message="External field not applicable: {message}")
        spec.exit_code(
            215, "ERROR_IMPOSSIBLE_CHARGE_OR_SPIN", message="Charge or spin not possible: {message}"
        )
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
        """Return a builder that holds the concrete settings of the run.

        ``protocol_inputs`` is the merged ``default_inputs`` <- ``protocol`` <- ``overrides`` (cutoffs
        or cutoff scale, k-point distance, smearing, SCF threshold per atom, mixing, restarts,
        post-processing, CalcJob options, ...), which the run uses exactly; ``protocol`` and
        ``overrides`` are kept beside them as their origin. What depends on each structure (k-point
        mesh, ``nbnd``, charge, spin, dipole correction) is computed when the workchain runs:
        :meth:`preview_pw_inputs` shows it for a builder without running anything.

        ``configurations`` is a dataset node or a mapping name -> ``StructureData`` (then
        ``structure_settings`` may give per-structure total_charge, total_spin, external_field, ...).

        :raises ProtocolError: unknown protocol name.
        :raises OverrideError: unknown or malformed override keys.
        """
        inputs = cls.get_protocol_inputs(protocol, overrides)  # fails early on bad names and keys
        builder = cls.get_builder()
        builder.code = code
        builder.pseudo_family = orm.Str(pseudo_family)
        builder.protocol = orm.Str(inputs["protocol"])
        if overrides:
            builder.overrides = orm.Dict(overrides)
        builder.protocol_inputs = orm.Dict(inputs)
        if isinstance(configurations, EmlipDatasetData):
            builder.configurations = configurations
        else:
            builder.structures = dict(configurations)
            if structure_settings:
                builder.structure_settings = orm.Dict(structure_settings)
        builder.max_concurrent = orm.Int(max_concurrent)
        return builder

    @classmethod
    def resolve_protocol_inputs(
        cls, protocol: str | None, overrides: dict[str, Any] | None, protocol_inputs: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The merged inputs a run uses: ``protocol_inputs`` as they are when given (checked: complete,
        no unknown key, the same protocol, every override held), else ``protocol`` <- ``overrides``.

        :raises ProtocolError: unknown protocol name.
        :raises OverrideError: bad keys, or protocol_inputs that disagree with protocol or overrides.
        """
        if protocol_inputs is None:
            return cls.get_protocol_inputs(protocol, overrides)
        return cls.check_protocol_inputs(protocol_inputs, protocol, overrides)

    @classmethod
    def preview_pw_inputs(cls, builder) -> dict[str, dict[str, Any]]:
        """The pw.x inputs that each configuration of ``builder`` would run with; nothing is run.

        Computed as the workchain computes them (the family's cutoffs, :func:`~.pw_inputs.build_pw_setup`),
        so bad configurations raise :class:`~.pw_inputs.ConfigurationError` (``code`` names the exit code)
        and bad protocol inputs ``ProtocolError``/``OverrideError``. Per configuration key:
        ``parameters`` (the CONTROL/SYSTEM/ELECTRONS namelists), ``kpoints_mesh``, ``n_electrons``,
        ``nspin``, ``is_metal``, ``slab``, ``notes``, ``parallelization`` (the ``PwCalculation`` input,
        ``{}`` for none) and ``cmdline`` (the flags it puts on pw.x's command line, ``["-npool", "2"]``).
        A parallelization the code cannot run raises ``ConfigurationError``
        (``ERROR_INVALID_PARALLELIZATION``). A ``sampler`` builder has no configurations before it runs
        (``ValueError``). The family must exist in the loaded profile.
        """

        def value(port: str) -> dict[str, Any] | None:
            node = builder.get(port)
            return node.get_dict() if node is not None else None

        if builder.get("sampler") is not None:
            raise ValueError("a sampler recipe has no configurations before the workchain runs")
        protocol = builder.get("protocol")
        inputs = cls.resolve_protocol_inputs(
            protocol.value if protocol is not None else None, value("overrides"), value("protocol_inputs")
        )
        if builder.get("code") is not None:
            check_pw_parallelization(builder.code, inputs)
        parallelization = dict(inputs.get("parallelization") or {})
        cmdline = pw_cmdline(parallelization, protocols.parallelization_flags())
        family = orm.load_group(builder.pseudo_family.value)
        configs = collect_configurations(
            builder.get("configurations"), builder.get("structures"), value("structure_settings")
        )
        _, planned = plan_configurations(configs, family, inputs)
        return {
            key: {
                "parameters": setup.parameters,
                "kpoints_mesh": setup.kpoints_mesh,
                "n_electrons": setup.n_electrons,
                "nspin": setup.nspin,
                "is_metal": setup.is_metal,
                "slab": setup.slab,
                "notes": list(setup.notes),
                "parallelization": dict(parallelization),
                "cmdline": list(cmdline),
            }
            for key, _, _, _, setup in planned
        }

    @classmethod
    def plan_labels(cls, inputs: Mapping[str, Any]) -> LabelPlan | None:
        """What a run with ``inputs`` (this workchain's inputs, e.g. a builder) will store, worked out as
        the run will (merged protocol inputs, post-processing, every configuration's pw.x setup) before
        anything runs; ``None`` when the protocol inputs are bad (the run stops with 201/202).

        What depends on the configurations (:attr:`LabelPlan.counts`, :attr:`LabelPlan.fermi_references`)
        is ``None`` when they are not known before the run (a sampler recipe) or cannot be planned (a
        family or configuration the run refuses with its own exit code, before any pw.x).
        """

        def value(port: str) -> dict[str, Any] | None:
            node = inputs.get(port)
            return node.get_dict() if node is not None else None

        overrides = value("overrides") or {}
        protocol = inputs.get("protocol")
        try:
            merged = cls.resolve_protocol_inputs(
                protocol.value if protocol is not None else None, overrides, value("protocol_inputs")
            )
        except (protocols.ProtocolError, protocols.OverrideError):
            return None
        postprocess, skipped = effective_postprocess(merged, overrides, inputs.get("pp_code") is not None)
        plan = {"inputs": merged, "postprocess": postprocess, "skipped": skipped}
        unknown = LabelPlan(**plan, counts=None, fermi_references=None)
        sources = [name for name in ("configurations", "structures", "sampler") if inputs.get(name)]
        if len(sources) != 1 or sources == ["sampler"]:
            return unknown
        try:
            family = orm.load_group(inputs["pseudo_family"].value)
            if not hasattr(family, "get_pseudo"):
                return unknown
            dataset = inputs.get("configurations")
            if dataset is not None:  # as the run splits it, without storing anything
                frames = dataset.to_ase()
                structures = {
                    configuration_key(i): orm.StructureData(ase=atoms) for i, atoms in enumerate(frames)
                }
                configs = pair_configurations(frames, structures)
            else:
                configs = collect_configurations(None, inputs.get("structures"), value("structure_settings"))
            _, planned = plan_configurations(configs, family, merged)
        except (exceptions.NotExistent, exceptions.MultipleObjectsError, ConfigurationError):
            return unknown
        counts: Counter[str] = Counter()
        references: Counter[str] = Counter()
        for _, _, settings, extra, setup in planned:
            steps = configuration_steps(postprocess, setup.slab)
            counts.update(expected_labels(configuration_meta(settings, extra, setup), steps))
            references[expected_fermi_reference(steps)] += 1
        return LabelPlan(**plan, counts=dict(counts), fermi_references=dict(references))

    # ------------------------------------------------------------------ steps
    def setup(self):
        """The protocol inputs (given, or protocol and overrides merged); the configuration sources and the
        family checked."""
        overrides = self.inputs.overrides.get_dict() if "overrides" in self.inputs else {}
        given = self.inputs.protocol_inputs.get_dict() if "protocol_inputs" in self.inputs else None
        try:
            self.ctx.inputs = self.resolve_protocol_inputs(self.inputs.protocol.value, overrides, given)
        except protocols.ProtocolError as error:
            return self.exit_codes.ERROR_UNKNOWN_PROTOCOL.format(message=str(error))
        except protocols.OverrideError as error:
            return self.exit_codes.ERROR_INVALID_OVERRIDES.format(message=str(error))
        action = self.ctx.inputs.get("on_unhandled_failure")
        if action not in UNHANDLED_FAILURE_ACTIONS:
            return self.exit_codes.ERROR_INVALID_OVERRIDES.format(
                message=f"on_unhandled_failure {action!r}: choose from {', '.join(UNHANDLED_FAILURE_ACTIONS)}"
            )
        try:
            check_pw_parallelization(self.inputs.code, self.ctx.inputs)
        except ConfigurationError as error:
            return self.exit_codes.ERROR_INVALID_PARALLELIZATION.format(message=str(error))
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
        # Hirshfeld is on by default (the reference multipoles that training supervises): without a
        # pp_code it is skipped, with a word
        postprocess, skipped = effective_postprocess(self.ctx.inputs, overrides, "pp_code" in self.inputs)
        self.ctx.inputs["postprocess"] = postprocess
        self.ctx.postprocess_skipped = skipped
        if skipped:
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
        self.ctx.running = {}
        self.report(
            f"protocol {self.ctx.inputs['protocol']}; caching of pw.x "
            f"{'enabled' if get_use_cache(identifier=PW_CACHE_IDENTIFIER) else 'disabled'}"
        )
        self.ctx.twin = self._finished_twin()

    def _finished_twin(self) -> str | None:
        """Record the digest of the inputs; the UUID of a finished twin to reuse when caching is enabled
        for this workchain (:mod:`~.reuse`)."""
        md5 = {pseudo.element: pseudo.md5 for pseudo in self.ctx.family.nodes if hasattr(pseudo, "md5")}
        try:
            digest = inputs_digest(self.inputs, md5)
        except ValueError as error:
            self.report(f"no reuse of a finished twin: {error}")
            return None
        self.node.base.extras.set(DIGEST_EXTRA, digest)
        if not get_use_cache(identifier=self.node.process_type):
            return None
        twin = finished_twin(self.node.process_type, digest, exclude=self.node.pk)
        return twin.uuid if twin is not None else None

    def has_twin(self) -> bool:
        """Whether a finished workchain with the same inputs is reused (caching enabled for it)."""
        return self.ctx.twin is not None

    def reuse_twin(self):
        """Return the twin's outputs (the same nodes: the graph shows where they came from); no pw.x."""
        twin = orm.load_node(self.ctx.twin)
        source = origin(twin)
        progress = source.base.extras.get("emlip_progress", {})
        self.node.base.extras.set_many({REUSED_FROM_EXTRA: source.uuid, "emlip_progress": progress})
        for port, node in returned(twin).items():
            self.out(port, node)
        self.report(
            f"the same inputs as {source.process_label}<{source.pk}>, finished: its dataset and report "
            f"reused ({progress.get('done', '?')} configurations labelled there), no pw.x run"
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
        """(key, structure, per-configuration settings) of every configuration, in order
        (:func:`collect_configurations` of the sampled or given dataset, or of ``structures``)."""
        dataset = self.ctx.get("configurations") or self.inputs.get("configurations")
        settings = self.inputs.structure_settings.get_dict() if "structure_settings" in self.inputs else {}
        return collect_configurations(dataset, self.inputs.get("structures"), settings)

    def prepare(self):
        """Check every configuration and build its pw.x inputs before any pw.x run."""
        try:
            configs = self._collect()
            cutoffs, planned = plan_configurations(configs, self.ctx.family, self.ctx.inputs)
        except ConfigurationError as error:
            return getattr(self.exit_codes, error.code).format(message=str(error))
        self.ctx.configs = {}
        # the order of the dataset, kept as a list: a checkpoint may store the dict in another order
        self.ctx.order = [key for key, *_ in planned]
        values: list[Any] = []
        places: dict[str, int] = {}

        def place(value: Any) -> int:
            digest = value_key(value)
            if digest not in places:
                places[digest] = len(values)
                values.append(value)
            return places[digest]

        for key, structure, settings, extra, setup in planned:
            for note in setup.notes:
                self.report(f"{key}: {note}")
            record = {
                "parameters": setup.parameters,
                "mesh": setup.kpoints_mesh,
                "meta": configuration_meta(settings, extra, setup),
            }
            refs = {name: place(record[name]) for name in SHARED_RECORD}
            self.ctx.configs[key] = {"structure": structure.uuid, "refs": refs}
        self.ctx.record_values = values
        self.ctx.cutoffs = cutoffs
        self.ctx.pending = list(self.ctx.order)
        self.report(
            f"{len(self.ctx.pending)} configurations checked; "
            f"ecutwfc {cutoffs[0]:g} Ry, ecutrho {cutoffs[1]:g} Ry"
        )

    def has_unfinished(self) -> bool:
        """Whether configurations wait to be labelled or are being labelled."""
        return bool(self.ctx.pending or self.ctx.running)

    def _pseudos(self, structure: orm.StructureData) -> dict[str, orm.Data]:
        return self.ctx.family.get_pseudos(structure=structure)

    def _record(self, key: str, name: str) -> Any:
        """Entry ``name`` (:data:`SHARED_RECORD`) of configuration ``key``'s record."""
        record = self.ctx.configs[key]
        if "refs" not in record:  # checkpointed before the values were shared: the record holds them
            return record[name]
        return self.ctx.record_values[record["refs"][name]]

    def _steps(self, key: str) -> dict[str, bool]:
        """The post-processing steps of configuration ``key`` (the vacuum level only for slabs)."""
        return configuration_steps(self.ctx.inputs["postprocess"], self._record(key, "meta").get("slab"))

    def _shared_input(self, port: str, value: Any) -> orm.Data:
        """The stored input node of the configurations' ``port`` (:data:`SHARED_INPUTS`) holding ``value``:
        one node per distinct value in the whole run, given to every configuration that runs with it.

        A configuration would otherwise store a node of its own for each of these inputs (parameters,
        k-point mesh, restart settings, post-processing steps): nodes the configurations mostly have in
        common, whose storing and hashing are much of the cost of a configuration when pw.x is quick. The
        UUIDs are kept in the context (``shared_inputs``), so a run resumed from a checkpoint goes on with
        the same nodes.
        """
        digest = f"{port}:{value_key(value)}"
        if not hasattr(self, "_shared_nodes"):  # not checkpointed: the nodes of this worker
            self._shared_nodes: dict[str, orm.Data] = {}
        cached = self._shared_nodes
        node = cached.get(digest)
        if node is None:
            shared = self.ctx.setdefault("shared_inputs", {})
            if digest in shared:
                node = orm.load_node(shared[digest])
            else:
                node = SHARED_INPUTS[port](value).store()
                shared[digest] = node.uuid
            cached[digest] = node
        return node

    def _set_pw_inputs(self, target: Any, key: str) -> None:
        """Set the ``PwBaseWorkChain`` inputs of configuration ``key`` on ``target``: a ``PwBaseWorkChain``
        builder, or the ``pw`` namespace of an ``EmlipLabelWorkChain`` builder (the same ports)."""
        inputs = self.ctx.inputs
        structure = orm.load_node(self.ctx.configs[key]["structure"])
        target.pw.code = self.inputs.code
        target.pw.structure = structure
        target.pw.parameters = self._shared_input("parameters", self._record(key, "parameters"))
        target.pw.pseudos = self._pseudos(structure)
        options = {**inputs["options"], "parser_name": PW_PARSER}
        # an MPI code runs under mpirun (and a serial one without) whatever the protocol's withmpi says
        options["withmpi"] = mpi_option(self.inputs.code.with_mpi, bool(options.get("withmpi", False)))
        target.pw.metadata.options = options
        if inputs.get("parallelization"):  # -npool N ... on pw.x's command line (aiida-quantumespresso)
            target.pw.parallelization = orm.Dict(dict(inputs["parallelization"]))
        target.kpoints = self._shared_input("kpoints", list(self._record(key, "mesh")))
        target.max_iterations = self._shared_input("max_iterations", int(inputs["max_iterations"]))
        target.on_unhandled_failure = self._shared_input(
            "on_unhandled_failure", str(inputs["on_unhandled_failure"])
        )

    def _set_postprocess_inputs(self, builder: Any, key: str, steps: dict[str, bool]) -> None:
        """Set the post-processing inputs of configuration ``key`` on its ``EmlipLabelWorkChain`` builder."""
        builder.postprocess = self._shared_input("postprocess", steps)
        if any(steps[step] for step in PP_STEPS):
            builder.pp_code = self.inputs.pp_code
        if steps["lowdin"]:
            builder.projwfc_code = self.inputs.projwfc_code
        if steps["hirshfeld"]:
            builder.n_electrons = orm.Float(self._record(key, "meta")["n_electrons"])
        builder.postprocess_options = dict(self.ctx.inputs["options"])

    def _label_builder(self, key: str):
        """The process that labels configuration ``key``, called ``label_<key>``: its ``PwBaseWorkChain``
        alone when it has no post-processing step, else an ``EmlipLabelWorkChain`` around it."""
        steps = self._steps(key)
        if any(steps.values()):
            builder = EmlipLabelWorkChain.get_builder()
            self._set_pw_inputs(builder.pw, key)
            self._set_postprocess_inputs(builder, key, steps)
        else:
            builder = PwBaseWorkChain.get_builder()
            self._set_pw_inputs(builder, key)
        builder.clean_workdir = self._shared_input("clean_workdir", bool(self.ctx.inputs["clean_workdir"]))
        builder.metadata.call_link_label = f"{LABEL_PREFIX}{key}"
        return builder

    def run_window(self):
        """Record the configurations whose labelling ended, then start more until ``max_concurrent`` run.

        The workchain wakes as soon as one of the running labelling processes terminates
        (:class:`~.window.WakeOnFirstChild`): a rolling window, not batches.
        """
        for key, pk in list(self.ctx.running.items()):
            node = orm.load_node(pk)
            if node.is_terminated:
                del self.ctx.running[key]
                self.ctx.pop(f"{LABEL_PREFIX}{key}", None)
                self._inspect_label(key, node)
        limit = max(1, self.inputs.max_concurrent.value)
        while self.ctx.pending and len(self.ctx.running) < limit:
            key = self.ctx.pending.pop(0)
            self.ctx.running[key] = self.submit(self._label_builder(key)).pk
        self._progress(running=len(self.ctx.running))
        if not self.ctx.running:
            return None
        return ToContext(
            **{f"{LABEL_PREFIX}{key}": orm.load_node(pk) for key, pk in self.ctx.running.items()}
        )

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

    def _inspect_label(self, key: str, node: orm.ProcessNode) -> None:
        """Record the labels of configuration ``key``, or why it has none, from its labelling process."""
        outputs = label_outputs(node)  # one query for all of them ({"pw.output_parameters": node, ...})
        if "pw.output_parameters" not in outputs:
            self._record_failure(key, node)
            return
        self.ctx.finished[key] = {
            "parameters": outputs["pw.output_parameters"].uuid,
            "trajectory": outputs["pw.output_trajectory"].uuid,
        }
        names = {"vacuum_level": "vacuum", "hirshfeld": "hirshfeld", "lowdin": "lowdin"}
        for output, name in names.items():
            if output in outputs:
                self.ctx.finished[key][name] = outputs[output].uuid
        if "vacuum_level" in outputs:
            self.out(f"potential_profiles.{key}", outputs["vacuum_level"])
        if "planar_potentials" in outputs:
            self.out(f"planar_potentials.{key}", outputs["planar_potentials"])
        self._record_postprocess(key, node, set(outputs))

    def _record_failure(self, key: str, node: orm.ProcessNode) -> None:
        """Record a configuration without labels: its ``PwBaseWorkChain`` and that one's last pw.x run (the
        label workchain ``node`` itself where no ``PwBaseWorkChain`` of it failed)."""
        pw = pw_of(node)
        target = pw if pw is not None and not pw.is_finished_ok else node
        calcs = [c for c in target.called if isinstance(c, orm.CalcJobNode)]
        last = max(calcs, key=lambda c: c.ctime) if calcs else None
        self.ctx.failures[key] = {
            "workchain_pk": target.pk,
            "exit_status": target.exit_status,
            "exit_message": target.exit_message,
            "calcjob_pk": last.pk if last else None,
            "calcjob_exit_status": last.exit_status if last else None,
            "calcjob_exit_message": last.exit_message if last else None,
        }
        self.report(f"configuration {key} failed: exit status {target.exit_status} ({target.exit_message})")

    def _record_postprocess(self, key: str, node: orm.ProcessNode, returned_ports: set[str]) -> None:
        """Record the post-processing steps of ``key`` that gave no label; the pw.x labels stay.

        ``returned_ports``: the outputs of the label workchain ``node`` (dotted port names).

        A step whose calculation failed is recorded with that calculation; a wanted output missing for
        another reason (the label workchain excepted or was killed) with the label workchain. (A
        projwfc.x run with a non-zero exit status but complete Löwdin charges is reported by the label
        workchain, whose report is part of the dataset's.)
        """
        steps = self._steps(key)
        for prefix, outputs in STEP_OUTPUTS.items():
            wanted = [output for output in outputs if steps.get(output)]
            if not wanted:
                continue
            step = step_name(prefix, steps)
            calc = called(node, prefix)
            message = step_failure(prefix, calc, steps) if calc is not None else None
            if message is not None:
                self._postprocess_failed(key, step, calc, message)
            elif not all(output in returned_ports for output in wanted):
                self._postprocess_failed(key, step, node, f"{step} not labelled: {how_it_ended(node)}")

    def _postprocess_failed(self, key: str, step: str, process: orm.ProcessNode, message: str) -> None:
        """Record a failed post-processing step in the report; the configuration's labels stay."""
        self.ctx.postprocess_failures[f"{key}:{step}"] = {
            "step": step,
            "pk": process.pk,
            "exit_status": process.exit_status,
            "exit_message": process.exit_message or message,
        }
        self.report(f"configuration {key}: {message}")

    def _dft_settings(self, structures: Mapping[str, orm.StructureData]) -> dict[str, Any]:
        """The DFT settings of the dataset; ``structures``: the structure of every configuration, by key."""
        # how the calculations ran (CalcJob options, pw.x parallelisation) is not a DFT setting
        inputs = {k: v for k, v in self.ctx.inputs.items() if k not in ("options", "parallelization")}
        family = self.ctx.family
        elements = sorted({el for structure in structures.values() for el in structure.get_symbols_set()})
        settings = {
            "code": self.inputs.code.full_label,
            "code_uuid": self.inputs.code.uuid,  # which code of the profile (not in the digest)
            "pseudo_family": family.label,
            "pseudos_md5": {el: family.get_pseudo(element=el).md5 for el in elements},
            "ecutwfc": self.ctx.cutoffs[0],
            "ecutrho": self.ctx.cutoffs[1],
            "protocol_inputs": inputs,
            "fermi_reference": "cell_average",
        }
        if self.ctx.inputs.get("parallelization"):  # recorded, but not in the digest (EXECUTION_KEYS)
            settings["parallelization"] = dict(self.ctx.inputs["parallelization"])
        return settings

    def results(self):
        """Assemble the dataset and the failure report (a calcfunction, so both are in the provenance)."""
        # every node the assembly reads, and every structure (for the elements), in one query
        wanted = [config["structure"] for config in self.ctx.configs.values()]
        wanted += [uuid for uuids in self.ctx.finished.values() for uuid in uuids.values()]
        loaded = load_nodes(wanted)
        structures = {key: loaded[config["structure"]] for key, config in self.ctx.configs.items()}
        labels: dict[str, dict[str, orm.Data]] = {}
        for key, uuids in self.ctx.finished.items():
            labels[key] = {"structure": structures[key]}
            for name in ("parameters", "trajectory", "vacuum", "hirshfeld", "lowdin"):
                if name in uuids:
                    labels[key][name] = loaded[uuids[name]]
        dft = self._dft_settings(structures)
        dft["digest"] = dft_settings_digest(dft)
        order = self.ctx.get("order") or list(self.ctx.configs)  # a run checkpointed before ``order``
        settings = {
            "dft_settings": dft,
            "configurations": {key: self._record(key, "meta") for key in order},
            "order": list(order),
            "failures": self.ctx.failures,
            "postprocess_failures": self.ctx.postprocess_failures,
            "postprocess_skipped": self.ctx.postprocess_skipped,
        }
        outputs = assemble(settings, labels)
        self.out("report", outputs["report"])
        if "dataset" in outputs:
            self.out("dataset", outputs["dataset"])
        self.report(
            f"finished: {len(self.ctx.finished)} labelled, {len(self.ctx.failures)} failed "
            f"({', '.join(sorted(self.ctx.failures)) or 'none'})"
        )
        if not self.ctx.finished:
            return self.exit_codes.ERROR_ALL_CONFIGURATIONS_FAILED
