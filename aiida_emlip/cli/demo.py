"""``aiida-emlip demo``: the project's main job, run end to end through AiiDA (no broker needed).

The main job is the demo study (``aiida_emlip/studies/demo.yaml``, :mod:`aiida_emlip.workflows.study`):
real pw.x labels of a charged Cl vacancy in NaCl and of small molecules in several total charges, a
held-out split, the designs ``sr``, ``charges``, ``qeq`` and ``scf`` trained at once, their held-out
errors, the charged-defect validation and the HTML report.
``--pw-only`` runs just one :class:`~aiida_quantumespresso.workflows.pw.base.PwBaseWorkChain` on a
molecule (:func:`run_demo`), a quick check of the DFT set-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from aiida_emlip.cli.options import CODE_LABEL, COMPUTER_LABEL, PROFILE_OPTION, target_or_exit
from aiida_emlip.profile import ProfileNotFoundError, load_or_create_profile

if TYPE_CHECKING:
    from aiida.orm import AbstractCode, StructureData

DEFAULT_MOLECULE = "H2O"
DEFAULT_BOX = 8.0
"""Edge of the cubic box in Å: enough vacuum for H₂O at Γ, and a ~2 s pw.x run."""


@dataclass
class DemoResult:
    """What the demo reports: workchain PK and exit status, energy (eV), forces (eV/Å) and symbols."""

    pk: int
    exit_status: int | None
    energy: float
    forces: np.ndarray
    symbols: list[str]

    @property
    def ok(self) -> bool:
        """Whether the workchain finished with exit status 0."""
        return self.exit_status == 0


def molecule_structure(name: str = DEFAULT_MOLECULE, box: float = DEFAULT_BOX) -> StructureData:
    """Return ASE's g2 molecule ``name`` centred in a cubic periodic box of edge ``box`` Å.

    :raises ValueError: unknown molecule name, or a box that leaves under 4 Å between images.
    """
    from aiida.orm import StructureData
    from ase.build import molecule

    try:
        atoms = molecule(name)
    except KeyError as exc:
        raise ValueError(f"unknown molecule '{name}' (use a name from ase.collections.g2)") from exc
    extent = float(np.ptp(atoms.positions, axis=0).max()) if len(atoms) > 1 else 0.0
    if box - extent < 4.0:
        raise ValueError(
            f"box {box} Å too small for {name} (extent {extent:.2f} Å): use at least {extent + 4:.1f}"
        )
    atoms.set_cell([box, box, box])
    atoms.set_pbc(True)
    atoms.center()
    return StructureData(ase=atoms)


def demo_builder(
    code: AbstractCode,
    structure: StructureData,
    family_label: str,
    ecutwfc: float | None = None,
) -> Any:
    """Return a ``PwBaseWorkChain`` builder from the ``fast`` protocol for a molecule in a box at Γ.

    :param ecutwfc: wavefunction cutoff in Ry (``ecutrho`` = 8× for the ultrasoft potentials);
        default: the family's recommendation.
    :raises UnknownElementError: the structure holds an element the family does not have.
    """
    from aiida.orm import Dict, KpointsData
    from aiida_quantumespresso.common.types import ElectronicType
    from aiida_quantumespresso.workflows.pw.base import PwBaseWorkChain

    from aiida_emlip.pseudos.family import check_elements

    check_elements(family_label, sorted(structure.get_symbols_set()))
    system: dict[str, Any] = {}
    if ecutwfc is not None:
        system.update(ecutwfc=float(ecutwfc), ecutrho=8.0 * float(ecutwfc))
    overrides = {
        "pseudo_family": family_label,
        "clean_workdir": True,
        "pw": {"parameters": {"CONTROL": {"tstress": False}, "SYSTEM": system}},
    }
    options = {"withmpi": bool(code.with_mpi), "max_wallclock_seconds": 1800}
    builder = PwBaseWorkChain.get_builder_from_protocol(
        code,
        structure,
        protocol="fast",
        overrides=overrides,
        electronic_type=ElectronicType.INSULATOR,
        options=options,
    )
    kpoints = KpointsData()
    kpoints.set_kpoints_mesh([1, 1, 1])
    builder.kpoints = kpoints
    builder.pop("kpoints_distance", None)
    builder.pw.settings = Dict({"gamma_only": True})
    return builder


def run_demo(
    code: AbstractCode,
    family_label: str,
    molecule: str = DEFAULT_MOLECULE,
    box: float = DEFAULT_BOX,
    ecutwfc: float | None = None,
) -> DemoResult:
    """Run the demo job in the loaded profile and return its result (no broker needed)."""
    from aiida_emlip.workflows.foreground import run_get_node

    structure = molecule_structure(molecule, box)
    builder = demo_builder(code, structure, family_label, ecutwfc=ecutwfc)
    _, node = run_get_node(builder)
    energy, forces = math.nan, np.full((len(structure.sites), 3), np.nan)
    if node.is_finished_ok:
        energy = float(node.outputs.output_parameters["energy"])
        forces = np.asarray(node.outputs.output_trajectory.get_array("forces")[-1], dtype=float)
    return DemoResult(
        pk=node.pk,
        exit_status=node.exit_status,
        energy=energy,
        forces=forces,
        symbols=[site.kind_name for site in structure.sites],
    )


DEMO_STUDY = "demo"
DEFAULT_REPORT_DIR = "demo-report"


def demo_spec(epochs: int | None = None) -> tuple[dict[str, Any], str]:
    """The bundled demo study checked against the loaded profile (its text; ``epochs`` overrides)."""
    from aiida_emlip.cli.study_common import ProfileResources
    from aiida_emlip.spec import SpecError, bundled_spec_text, parse_spec

    text = bundled_spec_text(DEMO_STUDY)
    if epochs is not None:
        text += f"# aiida-emlip demo --epochs {epochs}\n"
    try:
        spec = parse_spec(text, "demo.yaml", resources=ProfileResources())
    except SpecError as exc:
        raise click.ClickException(exc.format()) from None
    if epochs is not None:
        spec["training"]["epochs"] = int(epochs)
    return spec, text


def run_study_demo(epochs: int | None, output: Path, cache: bool, target: Any) -> None:
    """Run the demo study in this shell, print its verdict and write its report to ``output``."""
    from aiida_emlip.cli.study_common import print_outcome, run_in_shell, study_builder, write_report

    spec, text = demo_spec(epochs)
    click.echo(f"Demo study {spec['name']!r}: {spec['description']}")
    node = run_in_shell(study_builder(spec, text), cache)
    print_outcome(node, target)
    if "report" in node.outputs:
        write_report(node, output)
    if not node.is_finished_ok:
        raise click.ClickException(f"study <{node.pk}> did not finish OK: see `aiida-emlip status {node.pk}`")


@click.command("demo")
@PROFILE_OPTION
@click.option("--pw-only", is_flag=True, help="Run only one PwBaseWorkChain on a molecule (quick DFT check).")
@click.option(
    "--epochs",
    default=None,
    type=click.IntRange(min=1),
    help="Training epochs per design [default: the study's].",
)
@click.option(
    "--output",
    "-o",
    default=DEFAULT_REPORT_DIR,
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of the HTML report.",
)
@click.option("--cache/--no-cache", default=True, show_default=True, help="Reuse finished runs.")
@click.option("--molecule", default=DEFAULT_MOLECULE, show_default=True, help="ASE g2 molecule (--pw-only).")
@click.option(
    "--box",
    default=DEFAULT_BOX,
    show_default=True,
    type=click.FloatRange(min=4.0),
    help="Box edge in Å (--pw-only).",
)
@click.option(
    "--ecutwfc",
    default=None,
    type=click.FloatRange(min=10.0),
    help="Cutoff in Ry (--pw-only) [default: family's].",
)
def demo(
    profile_name: str | None,
    pw_only: bool,
    epochs: int | None,
    output: Path,
    cache: bool,
    molecule: str,
    box: float,
    ecutwfc: float | None,
) -> None:
    """Run the demo study: pw.x labels → held-out split → four designs → defect validation → report."""
    context = click.get_current_context()
    given = [
        f"--{name}"
        for name in ("molecule", "box", "ecutwfc")
        if context.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
    ]
    if given and not pw_only:
        raise click.UsageError(f"{', '.join(given)} only apply to --pw-only")
    if not pw_only:  # before the profile and the study: a refusal after hours of DFT would be late
        from aiida_emlip.cli.study_common import check_report_dir

        output = check_report_dir(output)
    target = target_or_exit(profile_name)
    try:
        load_or_create_profile(target, create=False)
    except ProfileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc

    from aiida.common.exceptions import NotExistent
    from aiida.orm import load_code

    from aiida_emlip.pseudos.family import FAMILY_LABEL
    from aiida_emlip.pseudos.generate import UnknownElementError

    try:
        code = load_code(f"{CODE_LABEL}@{COMPUTER_LABEL}")
    except NotExistent as exc:
        missing = f"code {CODE_LABEL}@{COMPUTER_LABEL} missing: run `aiida-emlip setup`"
        raise click.ClickException(missing) from exc
    if not pw_only:
        run_study_demo(epochs, output, cache, target)
        return
    from aiida_emlip.cli.study_common import interrupt_exits

    try:
        with interrupt_exits("`verdi process list -a` shows the run."):
            result = run_demo(code, FAMILY_LABEL, molecule=molecule, box=box, ecutwfc=ecutwfc)
    except (UnknownElementError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc

    name = f"PwBaseWorkChain<{result.pk}>"
    click.echo(f"{name} {molecule} in a {box:g} Å box: exit status {result.exit_status}")
    if not result.ok:
        raise click.ClickException(f"{name} failed: see `verdi process report {result.pk}`")
    click.echo(f"Total energy: {result.energy:.6f} eV")
    click.echo("Forces (eV/Å):")
    for symbol, force in zip(result.symbols, result.forces):
        click.echo(f"  {symbol:<3} {force[0]:12.6f} {force[1]:12.6f} {force[2]:12.6f}")
    click.echo(f"Workchain PK: {result.pk}")
    click.echo(f"Inspect: AIIDA_PATH={target.config_dir} verdi -p {target.name} process show {result.pk}")
