"""Validations a study can run on its trained models: a small registry, one entry per workchain.

An entry says which options its block in the study spec takes, what a design must provide for the
validation to mean something, how many pw.x runs it costs, how to build the workchain's inputs from the
spec and the trained models, and how to read its comparison rows and figures back. The spec side
(:func:`check_options`, ``dft_configurations``, ``elements``) needs no AiiDA; ``build``, ``rows`` and
``figures`` import it lazily.

To add a validation: write the workchain (inputs ``models`` namespace of ``emlip.model`` and an
``emlip-eval`` code; outputs a ``comparison`` ``Dict`` with one row per model), then register a
:class:`Validation` here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiida_emlip.spec_systems import STRUCTURE_KINDS, build_structure, check_structure


@dataclass(frozen=True)
class Option:
    """One option of a validation block: Python type(s), default (``required`` when none)."""

    types: tuple[type, ...]
    default: Any = None
    required: bool = False
    help: str = ""


@dataclass(frozen=True)
class Context:
    """What ``build`` gets besides the options: the study spec, models, codes and DFT settings."""

    spec: dict[str, Any]
    models: dict[str, Any]
    codes: dict[str, Any]


@dataclass(frozen=True)
class Validation:
    """A validation workchain as the study sees it."""

    name: str
    entry_point: str
    description: str
    options: dict[str, Option]
    requires: frozenset[str] = field(default_factory=frozenset)
    check: Callable[[dict[str, Any]], list[tuple[tuple[Any, ...], str]]] = lambda options: []
    dft_configurations: Callable[[dict[str, Any]], int] = lambda options: 0
    elements: Callable[[dict[str, Any]], set[str]] = lambda options: set()
    build: Callable[[dict[str, Any], Context], Any] | None = None
    #: The workchain's output the study takes as the validation's table (``validations.<name>``), and
    #: how that output's dict becomes rows (design label → {metric: value}; ``dft``: DFT's values).
    output: str = "comparison"
    table: Callable[[dict[str, Any]], dict[str, Any]] = lambda values: values
    figures: Callable[[Any], dict[str, Any]] | None = None
    summary: Callable[[dict[str, Any]], dict[str, float | None]] = lambda row: {}
    #: DFT's value of each summary metric, from the validation's ``comparison`` (1 for a ratio to DFT,
    #: 0 for an error against it): what "closest to DFT" measures from and the report's DFT row
    reference: Callable[[dict[str, Any]], dict[str, float | None]] = lambda table: {}


def _defect_check(options: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    problems = check_structure(options.get("host"), ("host",))
    if problems:
        return problems
    atoms = build_structure(options["host"])
    element = options.get("element")
    if element not in set(atoms.get_chemical_symbols()):
        problems.append((("element",), f"{element!r} is not in the host ({atoms.get_chemical_formula()})"))
    if not all(atoms.pbc):
        problems.append((("host",), "the host must be a periodic bulk cell"))
    charges = options.get("charge_states") or []
    if not all(isinstance(q, int) and not isinstance(q, bool) for q in charges):
        problems.append((("charge_states",), "charge states must be integers"))
    supercell = options.get("supercell")
    if supercell is not None and (
        len(supercell) != 3 or not all(isinstance(n, int) and n > 0 for n in supercell)
    ):
        problems.append((("supercell",), "a diagonal repeat [n1, n2, n3] of positive integers"))
    return problems


def _defect_cost(options: dict[str, Any]) -> int:
    charges = {int(q) for q in options.get("charge_states") or [] if isinstance(q, int)} | {0}
    return len(charges) + 2  # pristine, one vacancy cell per charge state, the band-edge run


def _evaluation_overrides(context: Context) -> dict[str, Any]:
    """The spec's ``evaluation.options`` as protocol overrides of a validation's ``emlip.evaluate`` jobs."""
    from aiida_emlip.spec import evaluation_options

    return {"options": evaluation_options(context.spec)} if "evaluation" in context.spec else {}


def _defect_build(options: dict[str, Any], context: Context) -> Any:
    from aiida import orm

    from aiida_emlip.workflows.validate.defect import EmlipChargedDefectWorkChain

    dft = context.spec["dft"]
    overrides = options.get("dft_overrides")
    builder = EmlipChargedDefectWorkChain.get_builder_from_protocol(
        context.codes["pw"],
        orm.StructureData(ase=build_structure(options["host"])),
        options["element"],
        [int(q) for q in options["charge_states"]],
        context.spec["pseudo_family"],
        protocol=options["protocol"],
        overrides=_evaluation_overrides(context) or None,
        dft_overrides=dft.get("overrides") if overrides is None else overrides,
        models=dict(context.models),
        eval_code=context.codes["eval"],
        supercell=options.get("supercell"),
        pp_code=context.codes.get("pp"),
        dielectric_constant=options.get("dielectric_constant"),
        max_concurrent=int(dft["max_concurrent"]),
    )
    return builder


def _figures(node: Any) -> dict[str, Any]:
    return dict(node.outputs.figures) if "figures" in node.outputs else {}


def _defect_summary(row: dict[str, Any]) -> dict[str, float | None]:
    return {
        "defect ΔE(q) MAE (eV)": row.get("delta_e_mae"),
        "defect transition-level MAE (eV)": row.get("transition_level_mae"),
    }


DEFECT = Validation(
    name="defect",
    entry_point="emlip.validate.defect",
    description="a vacancy in several charge states: ΔE(q), transition levels, Δq profiles, DFT vs models",
    options={
        "host": Option((dict,), required=True, help="the host bulk (a structure block)"),
        "element": Option((str,), required=True, help="element of the removed atom"),
        "charge_states": Option((list,), required=True, help="integer charge states (0 is always added)"),
        "supercell": Option((list,), help="diagonal repeat [n1, n2, n3] of the host cell"),
        "protocol": Option((str,), default="fast", help="protocol of the defect workchain"),
        "dft_overrides": Option((dict,), help="dataset protocol overrides (default: the study's dft)"),
        "dielectric_constant": Option((int, float), help="ε of the finite-size correction"),
    },
    requires=frozenset({"charges"}),
    check=_defect_check,
    dft_configurations=_defect_cost,
    elements=lambda options: set(build_structure(options["host"]).get_chemical_symbols()),
    build=_defect_build,
    figures=_figures,
    summary=_defect_summary,
)


#: Options of the interface block that are ``metal_water_interface`` keywords.
INTERFACE_KEYWORDS = ("symbol", "facet", "size", "n_water", "water_thickness")


def _interface_check(options: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    problems: list[tuple[tuple[Any, ...], str]] = []
    fields = options.get("fields") or []
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool) and e > 0 for e in fields):
        problems.append(
            (("fields",), "field magnitudes must be positive numbers (V/Å; both signs are applied)")
        )
    charges = options.get("charges") or []
    if not all(isinstance(q, (int, float)) and not isinstance(q, bool) for q in charges):
        problems.append((("charges",), "electrode charges must be numbers (e)"))
    if not fields and not any(q for q in charges if isinstance(q, (int, float))):
        problems.append(((), "give at least one field or one non-zero electrode charge"))
    if options.get("facet") not in ("111", "100"):
        problems.append((("facet",), "facet must be '111' or '100'"))
    protocols = _protocol_file("interface.yaml")
    if options.get("protocol") not in {*protocols["protocols"], *protocols.get("aliases", {})}:
        choices = ", ".join(sorted(protocols["protocols"]))
        problems.append(
            (("protocol",), f"unknown protocol {options.get('protocol')!r}; choose from {choices}")
        )
    size = options.get("size")
    if size is not None and (
        len(size) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size)
    ):
        problems.append((("size",), "(nx, ny, layers): three positive integers"))
    if options.get("n_water") is not None and options["n_water"] < 1:
        problems.append((("n_water",), "at least one water molecule (the electrolyte)"))
    if options.get("water_thickness") is not None and options["water_thickness"] <= 0:
        problems.append((("water_thickness",), "a positive thickness (Å)"))
    if problems:
        return problems
    from aiida_emlip.structures.interface_states import default_interface

    try:  # the interface the workchain will build (pure ASE): refused here, not after the training
        default_interface(_interface_settings(options))
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        problems.append(((), f"the interface cannot be built: {error}"))
    return problems


def _protocol_file(name: str) -> dict[str, Any]:
    """A workchain's protocol file, read directly (no AiiDA import)."""
    from pathlib import Path

    import yaml

    return yaml.safe_load((Path(__file__).parent / "protocols" / name).read_text())


def _interface_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The ``interface`` keywords of the protocol with the block's on top."""
    data = _protocol_file("interface.yaml")
    name = data.get("aliases", {}).get(options["protocol"], options["protocol"])
    settings = dict(data["default_inputs"]["interface"])
    settings.update(data["protocols"].get(name, {}).get("interface", {}))
    settings.update({k: options[k] for k in INTERFACE_KEYWORDS if k in options})
    return settings


def _interface_cost(options: dict[str, Any]) -> int:
    return 1 + 2 * len(options.get("fields") or []) + sum(1 for q in options.get("charges") or [] if q)


def _interface_build(options: dict[str, Any], context: Context) -> Any:
    from aiida_emlip.workflows.validate.interface import EmlipInterfaceWorkChain

    dft = context.spec["dft"]
    overrides = {"fields": list(options["fields"]), "charges": list(options["charges"])}
    overrides["interface"] = {k: options[k] for k in INTERFACE_KEYWORDS if k in options}
    overrides.update(_evaluation_overrides(context))
    dft_overrides = options.get("dft_overrides")
    return EmlipInterfaceWorkChain.get_builder_from_protocol(
        context.codes["pw"],
        context.spec["pseudo_family"],
        protocol=options["protocol"],
        overrides=overrides,
        dft_overrides=dft.get("overrides") if dft_overrides is None else dft_overrides,
        models=dict(context.models),
        eval_code=context.codes["eval"],
        pp_code=context.codes.get("pp"),
        max_concurrent=int(dft["max_concurrent"]),
    )


def _ratio(row: dict[str, Any], column: str) -> float | None:
    """A verdict column's ratio to DFT; none where the cell was skipped (no DFT, or no charges)."""
    return None if row.get(f"{column}_verdict") in (None, "skipped") else row.get(column)


def _interface_summary(row: dict[str, Any]) -> dict[str, float | None]:
    return {
        "interface α (e·Å²/V)": row.get("alpha"),
        "interface α ÷ DFT": _ratio(row, "interface_field"),
        "interface dΔφ/dQ (V/e)": row.get("ddrop_dq"),
        "interface dΔφ/dQ ÷ DFT": _ratio(row, "interface_capacitance"),
        "interface q_el, neutral (e)": row.get("charge_transfer_neutral"),
        "interface charge-transfer MAE (e)": row.get("charge_transfer_mae"),
    }


def _interface_reference(table: dict[str, Any]) -> dict[str, float | None]:
    dft = table.get("dft") or {}
    alpha, drop, transfer = dft.get("alpha"), dft.get("ddrop_dq"), dft.get("charge_transfer_neutral")
    return {
        "interface α (e·Å²/V)": alpha,
        "interface α ÷ DFT": 1.0 if alpha else None,
        "interface dΔφ/dQ (V/e)": drop,
        "interface dΔφ/dQ ÷ DFT": 1.0 if drop else None,
        "interface q_el, neutral (e)": transfer,
        "interface charge-transfer MAE (e)": 0.0 if transfer is not None else None,
    }


INTERFACE = Validation(
    name="interface",
    entry_point="emlip.validate.interface",
    description="a metal–water interface neutral, in fields and charged: charge transfer, potential drop, α",
    options={
        "symbol": Option((str,), default="Al", help="the fcc metal of the electrode"),
        "facet": Option((str,), default="111", help="111 or 100"),
        "size": Option((list,), help="(nx, ny, layers) of the slab (default: the protocol's)"),
        "n_water": Option((int,), help="water molecules in the film (default: liquid density)"),
        "water_thickness": Option((int, float), help="Å of water film (default: the protocol's)"),
        "fields": Option((list,), default=[0.1], help="field magnitudes (V/Å), each with both signs"),
        "charges": Option((list,), default=[-0.2], help="electrode charges (e)"),
        "protocol": Option((str,), default="fast", help="protocol of the interface workchain"),
        "dft_overrides": Option((dict,), help="dataset protocol overrides (default: the study's dft)"),
    },
    requires=frozenset({"charges"}),
    check=_interface_check,
    dft_configurations=_interface_cost,
    elements=lambda options: {options["symbol"], "H", "O"},
    build=_interface_build,
    figures=_figures,
    summary=_interface_summary,
    reference=_interface_reference,
)

RESPONSE_PROBES = ("field", "charging", "dissociation", "polarizability")


def _response_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The response protocol's settings (the YAML file read directly: no AiiDA import)."""
    from pathlib import Path

    import yaml

    path = Path(__file__).parent / "protocols" / "response.yaml"
    data = yaml.safe_load(path.read_text())
    settings = dict(data["default_inputs"])
    name = data.get("aliases", {}).get(options["protocol"], options["protocol"])
    settings.update({k: v for k, v in data["protocols"].get(name, {}).items() if k != "description"})
    return settings


def _response_check(options: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    probes = options.get("probes") or []
    unknown = [p for p in probes if p not in RESPONSE_PROBES]
    if unknown or not probes:
        return [(("probes",), f"probes must be some of {', '.join(RESPONSE_PROBES)}")]
    if options["protocol"] not in ("fast", "balanced", "stringent", "moderate", "precise"):
        return [(("protocol",), "protocol must be fast, balanced or stringent")]
    return []


def _response_cost(options: dict[str, Any]) -> int:
    settings = _response_settings(options)
    probes = options.get("probes") or []
    count = 0
    if "field" in probes:
        count += 2 * 2 * len(settings["fields"])  # metal and water, both signs
    if "charging" in probes:
        count += len(settings["charges"])
    if "dissociation" in probes:
        count += len(settings["distances"])
    if "polarizability" in probes:
        count += 2 * len(settings["water_sizes"])
    return count


def _response_elements(options: dict[str, Any]) -> set[str]:
    settings = _response_settings(options)
    probes = options.get("probes") or []
    elements: set[str] = set()
    if {"field", "charging"} & set(probes):
        elements.add(settings["metal"]["symbol"])
    if {"field", "polarizability"} & set(probes):
        elements |= {"H", "O"}
    if "dissociation" in probes:
        elements |= set(settings["ion_pair"])
    return elements


def _response_build(options: dict[str, Any], context: Context) -> Any:
    from aiida_emlip.workflows.validate.response import EmlipResponseWorkChain

    dft = context.spec["dft"]
    dft_overrides = options.get("dft_overrides")
    return EmlipResponseWorkChain.get_builder_from_protocol(
        context.codes["pw"],
        context.spec["pseudo_family"],
        protocol=options["protocol"],
        # probes from the protocol: μ-less heads are skipped
        overrides={"probes": list(options["probes"]), **_evaluation_overrides(context)},
        dft_overrides=dft.get("overrides") if dft_overrides is None else dft_overrides,
        models=dict(context.models),
        eval_code=context.codes["eval"],
        pp_code=context.codes.get("pp"),
        max_concurrent=int(dft["max_concurrent"]),
    )


#: Response columns whose model value is a ratio to DFT (DFT's own value is then 1).
RATIO_COLUMNS = ("field_metal", "field_water", "charging")


def _response_table(verdicts: dict[str, Any]) -> dict[str, Any]:
    """The response workchain's verdict table as rows: each model's cell values and verdicts, and DFT's."""
    from aiida_emlip.analysis.interface import comparison_row

    rows: dict[str, Any] = {label: comparison_row({}, row) for label, row in verdicts.get("rows", {}).items()}
    rows["dft"] = {column: cell.get("value") for column, cell in (verdicts.get("dft") or {}).items()}
    return rows


def _response_summary(row: dict[str, Any]) -> dict[str, float | None]:
    return {f"response {k}": _ratio(row, k) for k in row if not k.endswith("_verdict")}


def _response_reference(table: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for column, value in (table.get("dft") or {}).items():
        if value is None:
            out[f"response {column}"] = None
        else:
            out[f"response {column}"] = 1.0 if column in RATIO_COLUMNS else value
    return out


RESPONSE = Validation(
    name="response",
    entry_point="emlip.validate.response",
    description="field response, charging, dissociation and α vs size: the design verdict table",
    options={
        "probes": Option((list,), default=["dissociation", "polarizability"], help="probes to run"),
        "protocol": Option((str,), default="fast", help="protocol of the response workchain"),
        "dft_overrides": Option((dict,), help="dataset protocol overrides (default: the study's dft)"),
    },
    check=_response_check,
    dft_configurations=_response_cost,
    elements=_response_elements,
    build=_response_build,
    figures=_figures,
    summary=_response_summary,
    output="verdicts",
    table=_response_table,
    reference=_response_reference,
)

#: name → validation; the keys are what the ``validations`` block of a study spec accepts.
VALIDATIONS: dict[str, Validation] = {DEFECT.name: DEFECT, INTERFACE.name: INTERFACE, RESPONSE.name: RESPONSE}


def check_options(name: str, options: Any) -> list[tuple[tuple[Any, ...], str]]:
    """Problems of a validation block (paths relative to the block); defaults filled into ``options``."""
    entry = VALIDATIONS[name]
    if options is None:
        options = {}
    if not isinstance(options, dict):
        return [((), "must be a mapping of options")]
    problems: list[tuple[tuple[Any, ...], str]] = []
    for key in sorted(set(options) - set(entry.options), key=str):
        problems.append(((key,), f"unknown option; {name} takes: {', '.join(entry.options)}"))
    for key, option in entry.options.items():
        if key not in options:
            if option.required:
                problems.append(((), f"missing option {key!r} ({option.help})"))
            continue
        value = options[key]
        if not isinstance(value, option.types) or (isinstance(value, bool) and bool not in option.types):
            kinds = " or ".join(t.__name__ for t in option.types)
            problems.append(((key,), f"must be {kinds}, got {type(value).__name__}"))
    if problems:
        return problems
    for key, option in entry.options.items():
        if key not in options and option.default is not None:
            options[key] = option.default
    return entry.check(options)


__all__ = ("STRUCTURE_KINDS", "VALIDATIONS", "Context", "Option", "Validation", "check_options")
