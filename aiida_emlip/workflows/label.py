"""``emlip.label``: the DFT labels of one configuration, pw.x and its post-processing.

One ``PwBaseWorkChain`` (inputs exposed under ``pw``), then, on its remote folder and one after the
other, the post-processing steps asked for in ``postprocess``:

* ``vacuum_level`` / ``planar_potentials``: pp.x's electrostatic potential (``plot_num = 11``), then the
  calcfunctions ``vacuum_level`` (slabs) and ``planar_potentials``;
* ``hirshfeld``: pp.x's valence density (``plot_num = 0``), then the calcfunction
  ``hirshfeld_multipoles`` with the UPF files of the pw.x run;
* ``lowdin``: projwfc.x (``emlip.projwfc``), whose ``lowdin`` output is taken as it is.

The pw.x outputs are attached as soon as pw.x finished (``pw.*``), so a post-processing step that fails
never loses them: the work chain then ends with ``ERROR_POSTPROCESS_FAILED`` and the labels it has.
:class:`~aiida_emlip.workflows.dataset.EmlipDatasetWorkChain` runs one of these per configuration with
post-processing (a configuration without runs its ``PwBaseWorkChain`` alone: :mod:`~.label_runs`).
"""

from __future__ import annotations

from typing import Any

from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import ToContext, WorkChain, if_
from aiida.plugins import CalculationFactory, WorkflowFactory

from aiida_emlip.calculations.projwfc import EmlipProjwfcCalculation

from .hirshfeld import PP_DENSITY_PARAMETERS, hirshfeld_multipoles
from .process_state import how_it_ended
from .pw_inputs import mpi_option
from .vacuum_level import PP_PARAMETERS, planar_potentials, vacuum_level

PwBaseWorkChain = WorkflowFactory("quantumespresso.pw.base")
PpCalculation = CalculationFactory("quantumespresso.pp")

#: Post-processing steps that ``postprocess`` may switch on.
STEPS = ("vacuum_level", "planar_potentials", "hirshfeld", "lowdin")
#: Steps that run pp.x (``pp_code``); ``lowdin`` runs projwfc.x (``projwfc_code``).
PP_STEPS = ("vacuum_level", "planar_potentials", "hirshfeld")
#: Post-processing calculations on the pw.x folder, by call link label:
#: (code input, calculation, parameters, options added to ``postprocess_options``).
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
#: The work chain's outputs that each post-processing calculation gives, by call link label.
STEP_OUTPUTS = {
    "pp": ("vacuum_level", "planar_potentials"),
    "density": ("hirshfeld",),
    "projwfc": ("lowdin",),
}


def step_name(prefix: str, steps: dict[str, Any]) -> str:
    """The ``postprocess`` step that the calculation ``prefix`` (:data:`POSTPROCESS`) serves.

    The potential serves the slab's vacuum level when that is asked for, else the planar potentials.
    """
    if prefix == "pp":
        return "vacuum_level" if steps.get("vacuum_level") else "planar_potentials"
    return {"density": "hirshfeld", "projwfc": "lowdin"}[prefix]


def step_failure(prefix: str, calc: orm.CalcJobNode, steps: dict[str, Any]) -> str | None:
    """Why the post-processing calculation ``calc`` (call link label ``prefix``) gave no label; ``None``
    when it gave one.

    pp.x counts when it finished OK with its ``output_data``; projwfc.x when its ``lowdin`` output holds
    the ``charges`` (also after an exit status of aiida-quantumespresso's part of the parsing).
    """
    if prefix == "projwfc":
        lowdin = calc.outputs.lowdin if "lowdin" in calc.outputs else None
        if lowdin is None or "charges" not in lowdin.get_arraynames():
            return f"projwfc.x failed ({calc.exit_status}, {calc.exit_message}); no lowdin"
        return None
    if calc.is_finished_ok and "output_data" in calc.outputs:
        return None
    if prefix == "density":
        return f"pp.x density failed ({calc.exit_status}); no ref_charges"
    message = f"pp.x potential failed ({calc.exit_status})"
    if step_name(prefix, steps) == "vacuum_level":
        message += "; Fermi level stays cell_average"
    return message


def validate_inputs(inputs: dict[str, Any], _: Any) -> str | None:
    """Every step asked for has its code (and Hirshfeld its electron count); known step names only."""
    steps = inputs["postprocess"].get_dict() if "postprocess" in inputs else {}
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        return f"unknown postprocess step(s) {unknown}; known: {list(STEPS)}"
    wanted = [step for step in PP_STEPS if steps.get(step)]
    if wanted and "pp_code" not in inputs:
        return f"postprocess {wanted} needs pp_code"
    if steps.get("lowdin") and "projwfc_code" not in inputs:
        return "postprocess ['lowdin'] needs projwfc_code"
    if steps.get("hirshfeld") and "n_electrons" not in inputs:
        return "postprocess ['hirshfeld'] needs n_electrons"
    if steps.get("vacuum_level"):
        system = inputs["pw"]["pw"]["parameters"].get_dict().get("SYSTEM", {})
        missing = [key for key in ("edir", "emaxpos", "eopreg") if key not in system]
        if missing:
            return f"postprocess ['vacuum_level'] needs the sawtooth of a slab: SYSTEM lacks {missing}"
    return None


class EmlipLabelWorkChain(WorkChain):
    """pw.x (``PwBaseWorkChain``) on one configuration, then the post-processing asked for."""

    @classmethod
    def define(cls, spec) -> None:
        """Inputs, outline, outputs and exit codes."""
        super().define(spec)
        spec.expose_inputs(PwBaseWorkChain, namespace="pw", exclude=("clean_workdir",))
        spec.input(
            "clean_workdir",
            valid_type=orm.Bool,
            default=lambda: orm.Bool(False),
            help="Clean the remote folders: pw.x's at once without post-processing, else every "
            "calculation's when this work chain terminates (post-processing reads the pw.x folder).",
        )
        spec.input(
            "postprocess",
            valid_type=orm.Dict,
            default=lambda: orm.Dict({}),
            help=f"Steps to run on the pw.x folder, each true or false: {', '.join(STEPS)}.",
        )
        spec.input(
            "n_electrons",
            valid_type=orm.Float,
            required=False,
            help="Valence electrons of the configuration: Hirshfeld rescales the density to them.",
        )
        spec.input("pp_code", valid_type=orm.AbstractCode, required=False, help="pp.x.")
        spec.input("projwfc_code", valid_type=orm.AbstractCode, required=False, help="projwfc.x.")
        spec.input(
            "postprocess_options",
            valid_type=dict,
            non_db=True,
            required=False,
            help="CalcJob options of the pp.x and projwfc.x calculations (without MPI, unless their code "
            "is an MPI code).",
        )
        spec.inputs.validator = validate_inputs
        # Without post-processing, inspect_pw is the last step and runs in the same step as the test
        # that chose it: every step is a state change (a checkpoint and several database writes), and a
        # step that only finds a condition false costs as much as one that does something.
        spec.outline(
            cls.run_pw,
            if_(cls.should_postprocess)(
                cls.inspect_pw,
                if_(cls.should_run_potential)(cls.run_potential, cls.inspect_potential),
                if_(cls.should_run_hirshfeld)(cls.run_density, cls.inspect_density),
                if_(cls.should_run_lowdin)(cls.run_projwfc, cls.inspect_projwfc),
                cls.results,
            ).else_(cls.inspect_pw),
        )
        spec.expose_outputs(PwBaseWorkChain, namespace="pw", namespace_options={"required": False})
        spec.output(
            "vacuum_level",
            valid_type=orm.Dict,
            required=False,
            help="Slab vacuum levels and the planar-averaged potential along the slab normal (eV).",
        )
        spec.output(
            "planar_potentials",
            valid_type=orm.Dict,
            required=False,
            help="pp.x's V_bare + V_H averaged over the planes of each cell vector (eV).",
        )
        spec.output(
            "hirshfeld", valid_type=orm.ArrayData, required=False, help="Hirshfeld charges and dipoles."
        )
        spec.output(
            "lowdin", valid_type=orm.ArrayData, required=False, help="projwfc.x's Löwdin populations."
        )
        spec.exit_code(401, "ERROR_PW_FAILED", message="pw.x gave no labels: {message}")
        spec.exit_code(
            402,
            "ERROR_POSTPROCESS_FAILED",
            message="post-processing failed, the pw.x labels are output: {message}",
        )

    # ------------------------------------------------------------------ helpers
    def _steps(self) -> dict[str, Any]:
        return self.inputs.postprocess.get_dict()

    def _reads_pw_folder(self) -> bool:
        """Whether a post-processing step reads the pw.x remote folder."""
        return any(self._steps().get(step) for step in STEPS)

    def _failed(self, prefix: str, message: str) -> None:
        self.ctx.failed.append(f"{step_name(prefix, self._steps())}: {message}")
        self.report(message)

    def _submit_on_pw_folder(self, prefix: str):
        """Submit the post-processing calculation ``prefix`` (:data:`POSTPROCESS`) on the pw.x folder."""
        code_port, process, parameters, options = POSTPROCESS[prefix]
        builder = process.get_builder()
        code = self.inputs[code_port]
        builder.code = code
        builder.parent_folder = self.ctx.pw.outputs.remote_folder
        if parameters is not None:
            builder.parameters = orm.Dict(parameters)
        withmpi = mpi_option(code.with_mpi, False)  # serial unless the code is an MPI code
        builder.metadata.options = {
            **self.inputs.get("postprocess_options", {}),
            "withmpi": withmpi,
            **options,
        }
        builder.metadata.call_link_label = prefix
        return ToContext(**{prefix: self.submit(builder)})

    # ------------------------------------------------------------------ steps
    def run_pw(self):
        """Submit the ``PwBaseWorkChain``; it cleans its folder itself unless post-processing reads it."""
        self.ctx.failed = []
        inputs = AttributeDict(self.exposed_inputs(PwBaseWorkChain, namespace="pw"))
        clean = self.inputs.clean_workdir
        # the same node when its value holds for pw.x's folder too (no post-processing reads it)
        inputs.clean_workdir = orm.Bool(False) if clean.value and self._reads_pw_folder() else clean
        inputs.metadata.call_link_label = "pw"
        return ToContext(pw=self.submit(PwBaseWorkChain, **inputs))

    def inspect_pw(self):
        """Output the pw.x results at once (they are the labels), or end when pw.x gave none."""
        node = self.ctx.pw
        if not node.is_finished_ok:
            return self.exit_codes.ERROR_PW_FAILED.format(message=how_it_ended(node))
        self.out_many(self.exposed_outputs(node, PwBaseWorkChain, namespace="pw"))
        return None

    def should_postprocess(self) -> bool:
        """Whether any post-processing step is asked for."""
        return self._reads_pw_folder()

    def should_run_potential(self) -> bool:
        """Whether the electrostatic potential is wanted (slab vacuum level, planar potentials)."""
        steps = self._steps()
        return bool(steps.get("vacuum_level") or steps.get("planar_potentials"))

    def run_potential(self):
        """pp.x: the electrostatic potential V_bare + V_H (plot_num 11)."""
        return self._submit_on_pw_folder("pp")

    def inspect_potential(self):
        """Planar-average the potential (calcfunctions): per-axis profiles, the slab's vacuum levels."""
        calc, steps = self.ctx.pp, self._steps()
        message = step_failure("pp", calc, steps)
        if message is not None:
            self._failed("pp", message)
            return
        if steps.get("planar_potentials"):
            self.out("planar_potentials", planar_potentials(potential=calc.outputs.output_data))
        if steps.get("vacuum_level"):
            system = self.inputs.pw.pw.parameters.get_dict()["SYSTEM"]
            settings = {
                "edir": int(system["edir"]) - 1,
                "emaxpos": system["emaxpos"],
                "eopreg": system["eopreg"],
            }
            self.out(
                "vacuum_level", vacuum_level(potential=calc.outputs.output_data, settings=orm.Dict(settings))
            )

    def should_run_hirshfeld(self) -> bool:
        """Whether Hirshfeld multipoles are wanted."""
        return bool(self._steps().get("hirshfeld"))

    def run_density(self):
        """pp.x: the valence electron density (plot_num 0)."""
        return self._submit_on_pw_folder("density")

    def inspect_density(self):
        """Partition the density (calcfunction) into Hirshfeld charges and atomic dipoles."""
        calc = self.ctx.density
        message = step_failure("density", calc, self._steps())
        if message is not None:
            self._failed("density", message)
            return
        structure = self.inputs.pw.pw.structure
        pseudos = self.inputs.pw.pw.pseudos
        by_element = {kind.symbol: pseudos[kind.name] for kind in structure.kinds}
        multipoles = hirshfeld_multipoles(
            density=calc.outputs.output_data,
            structure=structure,
            settings=orm.Dict({"n_electrons": self.inputs.n_electrons.value}),
            **{element: by_element[element] for element in sorted(by_element)},
        )
        self.out("hirshfeld", multipoles)

    def should_run_lowdin(self) -> bool:
        """Whether Löwdin charges are wanted."""
        return bool(self._steps().get("lowdin"))

    def run_projwfc(self):
        """projwfc.x (``emlip.projwfc``) on the pw.x folder."""
        return self._submit_on_pw_folder("projwfc")

    def inspect_projwfc(self):
        """Take the ``lowdin`` output of projwfc.x when its charges are complete, whatever its exit status."""
        calc = self.ctx.projwfc
        message = step_failure("projwfc", calc, self._steps())
        if message is not None:
            self._failed("projwfc", message)
            return
        if not calc.is_finished_ok:
            self.report(
                f"projwfc.x exit status {calc.exit_status} ({calc.exit_message}); "
                "its Löwdin charges are complete and kept"
            )
        self.out("lowdin", calc.outputs.lowdin)

    def results(self):
        """End with ``ERROR_POSTPROCESS_FAILED`` when a step gave no label (the others are output)."""
        if self.ctx.failed:
            return self.exit_codes.ERROR_POSTPROCESS_FAILED.format(message="; ".join(self.ctx.failed))
        return None

    def on_terminated(self) -> None:
        """Clean every calculation's remote folder if ``clean_workdir`` waited for the post-processing."""
        super().on_terminated()
        if not self.inputs.clean_workdir.value or not self._reads_pw_folder():
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
