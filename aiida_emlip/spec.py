"""The study spec: one YAML file that describes a whole study, checked strictly before anything runs.

:func:`parse_spec` reads the text, checks every block and reports **all** problems at once, each with
its line (:class:`SpecError`); unknown keys, wrong types, unknown designs or presets, a DFT budget that
the systems and validations exceed, a validation that needs something no design provides. With a
:class:`Resources` (the CLI passes one backed by the AiiDA profile) it also checks that the codes exist
and that the pseudopotential family has every element. The result is the normalised spec (defaults
filled in, JSON-compatible) that :class:`~aiida_emlip.workflows.study.EmlipStudyWorkChain` takes.
The full format is in ``docs/study.md``; ``aiida_emlip/studies/demo.yaml`` is a complete example.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from functools import cache
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any, Protocol

from aiida_emlip.spec_systems import check_structure, inline_structure, system_frames
from aiida_emlip.spec_yaml import Lines, Problem, SpecSyntaxError, dotted, load_with_lines
from aiida_emlip.training.launch import check_nproc_per_node
from aiida_emlip.training.presets import PRESETS, preset_config

DEFAULT_FAMILY = "emlip-ld1-pbe-v1"
#: code role → (required, AiiDA calculation plugin the code must run)
CODE_ROLES = {
    "pw": (True, "quantumespresso.pw"),
    "train": (True, "emlip.train"),
    "eval": (True, "emlip.evaluate"),
    "pp": (False, "quantumespresso.pp"),
    "projwfc": (False, "quantumespresso.projwfc"),
}
DEFAULT_CODES = {"pw": "pw@localhost", "train": "emlip-train@localhost", "eval": "emlip-eval@localhost"}
#: block → {key: (types, default)}; ``REQUIRED`` marks keys without a default.
REQUIRED = object()
TOP_KEYS = (
    "name",
    "description",
    "codes",
    "pseudo_family",
    "dft",
    "budget",
    "systems",
    "split",
    "training",
    "designs",
    "validations",
    "evaluation",
    "active_learning",
    "report",
)
SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], Any]]] = {
    "dft": {
        "protocol": ((str,), "fast"),
        "overrides": ((dict,), {}),
        "max_concurrent": ((int,), 4),
    },
    "budget": {"max_dft_configurations": ((int,), None)},
    "split": {"held_out_fraction": ((float, int), 0.25), "seed": ((int,), 0)},
    "training": {
        "epochs": ((int,), 100),
        "seed": ((int,), 0),
        "lr": ((float, int), 0.01),
        "batch_size": ((int,), 4),
        "valid_fraction": ((float, int), 0.1),
        "dtype": ((str,), "float64"),
        "device": ((str,), "auto"),
        "backbone": ((dict,), None),
        "options": ((dict,), {}),
    },
    "evaluation": {"options": ((dict,), {})},
    "report": {"title": ((str,), None)},
}
#: CalcJob options of every ``emlip.evaluate`` of a study (held-out set, validations, active learning);
#: ``evaluation.options`` in the spec are laid over them (a partition, an account, a walltime).
EVALUATION_OPTIONS: dict[str, Any] = {
    "resources": {"num_machines": 1},
    "max_wallclock_seconds": 3600,
    "withmpi": False,
}
SYSTEM_KEYS: dict[str, tuple[tuple[type, ...], Any]] = {
    "structure": ((dict,), None),
    "supercell": ((list,), None),
    "sampler": ((dict,), None),
    "rattle": ((dict,), None),
    "charges": ((list,), None),
    "isolated": ((bool,), False),
    "parameters": ((dict,), None),
    "seed": ((int,), 0),
}
DESIGN_KEYS: dict[str, tuple[tuple[type, ...], Any]] = {
    "preset": ((str,), None),
    "head": ((dict,), None),
    "epochs": ((int,), None),
    "induction": ((bool, dict), None),
    "config": ((dict,), None),
}
DTYPES = ("float32", "float64")
DEVICES = ("auto", "cpu", "cuda")


class SpecError(ValueError):
    """The spec has problems; ``problems`` holds every one (line, dotted path, message)."""

    def __init__(self, problems: list[Problem], source: str = "spec") -> None:
        self.problems = sorted(problems, key=lambda p: (p.line or 0, p.path))
        self.source = source
        super().__init__(self.format())

    def format(self) -> str:
        lines = [p.format(self.source) for p in self.problems]
        head = f"{self.source}: {len(self.problems)} problem{'s' * (len(self.problems) != 1)}"
        return "\n".join([head, *("  " + line for line in lines)])


class Resources(Protocol):
    """What the spec is checked against besides itself: the codes and the pseudopotential family."""

    def code_problem(self, label: str, plugin: str) -> str | None:
        """Why the code ``label`` cannot serve ``plugin`` (``None``: it can)."""

    def family_elements(self, label: str) -> set[str] | None:
        """Elements of the pseudopotential family ``label`` (``None``: no such family)."""


@dataclass
class _Checker:
    lines: Lines
    problems: list[Problem]

    def add(self, path: tuple[Any, ...], message: str) -> None:
        self.problems.append(Problem(self.lines.of(path), dotted(path), message))

    def block(
        self,
        path: tuple[Any, ...],
        value: Any,
        keys: dict[str, tuple[tuple[type, ...], Any]],
    ) -> dict[str, Any]:
        """Check a mapping against ``keys``; return it with defaults filled in (bad entries dropped)."""
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.add(path, f"must be a mapping, got {type(value).__name__}")
            return {k: copy.deepcopy(d) for k, (_, d) in keys.items() if d is not REQUIRED}
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key not in keys:
                self.add((*path, key), f"unknown key; allowed: {', '.join(keys)}")
                continue
            types = keys[key][0]
            if item is None and keys[key][1] is None:
                continue
            if not _is(item, types):
                self.add((*path, key), f"must be {_kinds(types)}, got {_type_name(item)}")
                continue
            out[key] = float(item) if float in types and isinstance(item, int) else item
        for key, (_, default) in keys.items():
            if key in out:
                continue
            if default is REQUIRED:
                self.add(path, f"missing key {key!r}")
            elif default is not None:
                out[key] = copy.deepcopy(default)
        return out


def _is(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def _kinds(types: tuple[type, ...]) -> str:
    names = {"str": "a string", "int": "an integer", "float": "a number", "dict": "a mapping"}
    names.update({"list": "a list", "bool": "true or false"})
    return " or ".join(dict.fromkeys(names[t.__name__] for t in types))


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def parse_spec(
    text: str,
    source: str = "spec",
    base_dir: Path | None = None,
    resources: Resources | None = None,
) -> dict[str, Any]:
    """The normalised spec of ``text``; :class:`SpecError` with every problem (and its line) otherwise."""
    try:
        data, lines = load_with_lines(text)
    except SpecSyntaxError as exc:
        raise SpecError([exc.problem], source) from None
    checker = _Checker(lines, [])
    spec = _check(data, checker, base_dir)
    if not checker.problems and resources is not None:
        _check_resources(spec, checker, resources)
    if checker.problems:
        raise SpecError(checker.problems, source)
    return spec


def load_spec(path: str | Path, resources: Resources | None = None) -> dict[str, Any]:
    """:func:`parse_spec` of a file (``file`` structures resolved relative to it)."""
    path = Path(path)
    return parse_spec(path.read_text(), str(path), path.parent, resources)


def bundled_spec_text(name: str = "demo") -> str:
    """The text of a study shipped with the package (``aiida_emlip/studies/<name>.yaml``)."""
    return (importlib_resources.files("aiida_emlip") / "studies" / f"{name}.yaml").read_text()


# ----------------------------------------------------------------------------------------- blocks
def _check(data: Any, c: _Checker, base_dir: Path | None) -> dict[str, Any]:
    if not isinstance(data, dict):
        c.add((), "a study spec is a mapping (name, systems, designs, ...)")
        return {}
    for key in data:
        if key not in TOP_KEYS:
            c.add((key,), f"unknown key; allowed: {', '.join(TOP_KEYS)}")
    spec: dict[str, Any] = {}
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        c.add(("name",) if "name" in data else (), "the study needs a 'name' (a non-empty string)")
    spec["name"] = name if isinstance(name, str) else ""
    description = data.get("description", "")
    if not isinstance(description, str):
        c.add(("description",), "must be a string")
    spec["description"] = description if isinstance(description, str) else ""
    spec["codes"] = _codes(data.get("codes"), c)
    family = data.get("pseudo_family", DEFAULT_FAMILY)
    if not isinstance(family, str):
        c.add(("pseudo_family",), "must be a string (the label of a pseudopotential family)")
        family = DEFAULT_FAMILY
    spec["pseudo_family"] = family
    for block in ("dft", "budget", "split", "training", "report"):
        spec[block] = c.block((block,), data.get(block), SCHEMA[block])
    _dft(spec["dft"], c)
    _split(spec["split"], c)
    _training(spec["training"], c)
    spec["systems"] = _systems(data.get("systems"), c, base_dir)
    spec["designs"] = _designs(data.get("designs"), spec["training"], c)
    spec["validations"] = _validations(data.get("validations"), spec, c, base_dir)
    if "evaluation" in data:  # absent: no key, so that specs without it stay as they were
        spec["evaluation"] = c.block(("evaluation",), data["evaluation"], SCHEMA["evaluation"])
        _evaluation(spec["evaluation"], c)
    if "active_learning" in data:  # absent: no key, so that specs without it stay as they were
        spec["active_learning"] = _active_learning(data["active_learning"], spec, c)
    if not c.problems:
        _budget_and_split(spec, c)
    return spec


def _codes(value: Any, c: _Checker) -> dict[str, str]:
    codes = dict(DEFAULT_CODES)
    if value is None:
        return codes
    if not isinstance(value, dict):
        c.add(("codes",), "must be a mapping of role → code label (pw, train, eval, pp, projwfc)")
        return codes
    for role, label in value.items():
        if role not in CODE_ROLES:
            c.add(("codes", role), f"unknown code role; allowed: {', '.join(CODE_ROLES)}")
        elif not isinstance(label, str) or not label:
            c.add(("codes", role), "must be a code label such as pw@localhost")
        else:
            codes[role] = label
    return codes


def _dft(dft: dict[str, Any], c: _Checker) -> None:
    from aiida_emlip.workflows import protocol as protocols

    try:
        protocols.get_protocol_inputs(dft.get("protocol"), dft.get("overrides") or {})
    except protocols.ProtocolError as exc:
        c.add(("dft", "protocol"), str(exc))
    except protocols.OverrideError as exc:
        c.add(("dft", "overrides"), str(exc))
    overrides = dft.get("overrides") or {}
    if isinstance(overrides, dict):  # pw.x's calculations (and pp.x's, projwfc.x's with the same options)
        _calcjob_options(overrides.get("options"), ("dft", "overrides", "options"), CODE_ROLES["pw"][1], c)
    if dft.get("max_concurrent", 1) < 1:
        c.add(("dft", "max_concurrent"), "must be at least 1")


def _split(split: dict[str, Any], c: _Checker) -> None:
    fraction = split.get("held_out_fraction", 0.25)
    if not 0.0 < fraction < 1.0:
        c.add(("split", "held_out_fraction"), f"must be between 0 and 1 (exclusive), got {fraction}")


def _training(training: dict[str, Any], c: _Checker) -> None:
    for key in ("epochs", "batch_size"):
        if training.get(key, 1) < 1:
            c.add(("training", key), "must be at least 1")
    if training.get("lr", 1.0) <= 0:
        c.add(("training", "lr"), "must be positive")
    if not 0.0 <= training.get("valid_fraction", 0.1) < 1.0:
        c.add(("training", "valid_fraction"), "must be in [0, 1)")
    if training.get("dtype") not in DTYPES:
        c.add(("training", "dtype"), f"choose from {', '.join(DTYPES)}")
    if training.get("device") not in DEVICES:
        c.add(("training", "device"), f"choose from {', '.join(DEVICES)}")
    options = training.get("options")
    _calcjob_options(options, ("training", "options"), CODE_ROLES["train"][1], c)
    if isinstance(options, dict) and "nproc_per_node" in options:
        problem = check_nproc_per_node(options["nproc_per_node"])
        if problem:
            c.add(("training", "options", "nproc_per_node"), problem)


def _systems(value: Any, c: _Checker, base_dir: Path | None) -> dict[str, Any]:
    if not isinstance(value, dict) or not value:
        c.add(("systems",), "give at least one system: a mapping of name → structure, sampler, charges")
        return {}
    out = {}
    for name, block in value.items():
        path = ("systems", name)
        if not isinstance(name, str) or not name.isidentifier():
            c.add(path, "a system name must be an identifier (letters, digits, _)")
            continue
        before = len(c.problems)
        system = c.block(path, block, SYSTEM_KEYS)
        if "structure" in system:
            problems = check_structure(_resolved(system["structure"], base_dir), (*path, "structure"))
            for sub, message in problems:
                c.add(sub, message)
            if not problems:
                system["structure"] = inline_structure(system["structure"], base_dir)
        _system_details(system, path, c)
        if len(c.problems) == before:
            try:
                frames = system_frames(name, system)
            except Exception as exc:  # a sampler's own argument errors
                c.add(path, f"cannot sample the configurations: {type(exc).__name__}: {exc}")
                continue
            if not frames:
                c.add(path, "the system has no configurations")
        out[name] = system
    return out


def _resolved(block: Any, base_dir: Path | None) -> Any:
    if isinstance(block, dict) and "file" in block and base_dir is not None:
        path = Path(str(block["file"]))
        return {"file": str(path if path.is_absolute() else base_dir / path)}
    return block


def _system_details(system: dict[str, Any], path: tuple[Any, ...], c: _Checker) -> None:
    from aiida_emlip.workflows.samplers import SAMPLERS

    sampler = system.get("sampler")
    if sampler is not None:
        extra = sorted(set(sampler) - {"name", "kwargs"}, key=str)
        for key in extra:
            c.add((*path, "sampler", key), "unknown key; a sampler takes name and kwargs")
        if sampler.get("name") not in SAMPLERS:
            c.add((*path, "sampler", "name"), f"unknown sampler; choose from {', '.join(sorted(SAMPLERS))}")
        elif SAMPLERS[sampler["name"]][1] and "structure" not in system:
            c.add((*path, "sampler"), f"sampler {sampler['name']!r} needs a structure")
        if not isinstance(sampler.get("kwargs", {}), dict):
            c.add((*path, "sampler", "kwargs"), "must be a mapping")
    elif "structure" not in system:
        c.add(path, "give a structure (or a sampler that needs none)")
    rattle = system.get("rattle")
    if rattle is not None:
        for key in sorted(set(rattle) - {"n", "stdev"}, key=str):
            c.add((*path, "rattle", key), "unknown key; rattle takes n and stdev")
        if not isinstance(rattle.get("n", 1), int) or rattle.get("n", 1) < 1:
            c.add((*path, "rattle", "n"), "must be a positive integer")
        if not _is(rattle.get("stdev", 0.05), (float, int)) or rattle.get("stdev", 0.05) < 0:
            c.add((*path, "rattle", "stdev"), "must be a non-negative number (Å)")
    charges = system.get("charges")
    if charges is not None:
        if not charges or not all(_is(q, (int, float)) for q in charges):
            c.add((*path, "charges"), "a non-empty list of total charges (numbers, e)")
        elif len(set(charges)) != len(charges):
            c.add((*path, "charges"), "repeated charge state")
    supercell = system.get("supercell")
    if supercell is not None and (
        len(supercell) != 3 or not all(_is(n, (int,)) and n > 0 for n in supercell)
    ):
        c.add((*path, "supercell"), "a diagonal repeat [n1, n2, n3] of positive integers")
    parameters = system.get("parameters")
    if parameters is not None:
        for namelist in parameters:
            if namelist not in ("CONTROL", "SYSTEM", "ELECTRONS") or not isinstance(
                parameters[namelist], dict
            ):
                c.add((*path, "parameters", namelist), "pw.x namelists CONTROL, SYSTEM, ELECTRONS (mappings)")


#: Scheduler words that are no CalcJob option → the option that says it (a hint only: the names checked
#: are those of the calculation's spec).
SCHEDULER_WORDS = {
    "partition": "queue_name",
    "queue": "queue_name",
    "time": "max_wallclock_seconds",
    "walltime": "max_wallclock_seconds",
    "nodes": "resources",
    "ntasks": "resources",
    "mem": "max_memory_kb",
    "memory": "max_memory_kb",
    "gres": "custom_scheduler_commands",
}


@cache
def calcjob_option_names(plugin: str) -> tuple[str, ...]:
    """The ``metadata.options`` of the calculation plugin ``plugin`` (``emlip.train``, ...), read from
    its spec: AiiDA's CalcJob options and what the plugin adds (``nproc_per_node`` of ``emlip.train``)."""
    from aiida.plugins import CalculationFactory

    return tuple(sorted(CalculationFactory(plugin).spec().inputs["metadata"]["options"]))


def option_name_problem(name: Any, plugin: str) -> str | None:
    """Why ``name`` is no option of the calculation plugin ``plugin`` (the closest option suggested);
    ``None`` when it is one."""
    names = calcjob_option_names(plugin)
    if name in names:
        return None
    word = SCHEDULER_WORDS.get(str(name).lower())
    close = [word] if word in names else difflib.get_close_matches(str(name), names, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"the options: {', '.join(names)}"
    return f"not an option of the {plugin} calculations; {hint}"


def _calcjob_options(options: Any, where: tuple[Any, ...], plugin: str, c: _Checker) -> None:
    """Every name of ``options`` an option of ``plugin``'s calculations; the known ones of the right type."""
    if not isinstance(options, dict):
        return
    for name in options:
        problem = option_name_problem(name, plugin)
        if problem:
            c.add((*where, name), problem)
    resources = options.get("resources")
    if resources is not None and not isinstance(resources, dict):
        c.add((*where, "resources"), "must be a map, e.g. {num_machines: 1, num_mpiprocs_per_machine: 1}")
    wall = options.get("max_wallclock_seconds")
    if wall is not None and (isinstance(wall, bool) or not isinstance(wall, int) or wall < 1):
        c.add((*where, "max_wallclock_seconds"), "must be a whole number of seconds, at least 1")
    if "withmpi" in options and not isinstance(options["withmpi"], bool):
        c.add((*where, "withmpi"), "must be true or false")
    for key in ("queue_name", "account", "qos", "custom_scheduler_commands", "prepend_text"):
        if key in options and not isinstance(options[key], str):
            c.add((*where, key), "must be a string")


def _evaluation(evaluation: dict[str, Any], c: _Checker) -> None:
    _calcjob_options(evaluation.get("options") or {}, ("evaluation", "options"), CODE_ROLES["eval"][1], c)


def evaluation_options(spec: dict[str, Any]) -> dict[str, Any]:
    """CalcJob options of the study's ``emlip.evaluate`` calculations: the defaults and the spec's."""
    return {**EVALUATION_OPTIONS, **(spec.get("evaluation") or {}).get("options", {})}


def _designs(value: Any, training: dict[str, Any], c: _Checker) -> dict[str, Any]:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = {name: {"preset": name} for name in value}
    if not isinstance(value, dict) or not value:
        c.add(
            ("designs",), f"give at least one design: a list of presets ({', '.join(PRESETS)}) or a mapping"
        )
        return {}
    out = {}
    for label, block in value.items():
        path = ("designs", label)
        if not isinstance(label, str) or not label.isidentifier():
            c.add(path, "a design label must be an identifier (letters, digits, _)")
            continue
        if block is None and label in PRESETS:
            block = {"preset": label}
        design = c.block(path, block, DESIGN_KEYS)
        if ("preset" in design) == ("config" in design):
            if not any(p.path.startswith(dotted(path)) for p in c.problems):
                c.add(path, "give either a preset (a named design) or a full emlip-train config")
            continue
        if "preset" in design and design["preset"] not in PRESETS:
            c.add((*path, "preset"), f"unknown preset {design['preset']!r}; choose from {', '.join(PRESETS)}")
            continue
        if "config" in design and ({"head", "epochs", "induction"} & set(design)):
            c.add(path, "head, epochs and induction apply to presets; put them in the config instead")
            continue
        try:
            config = design_config(design, training, labels=(), elements=None)
            _parse_train_config(config)
        except Exception as exc:
            where = (*path, "config") if "config" in design else path
            c.add(where, f"not a valid design: {exc}")
            continue
        out[label] = design
    return out


def _validations(value: Any, spec: dict[str, Any], c: _Checker, base_dir: Path | None) -> dict[str, Any]:
    from aiida_emlip.workflows.study_registry import VALIDATIONS, check_options

    if value is None:
        return {}
    if not isinstance(value, dict):
        c.add(("validations",), f"must be a mapping of validation → options ({', '.join(VALIDATIONS)})")
        return {}
    out = {}
    for name, options in value.items():
        path = ("validations", name)
        if name not in VALIDATIONS:
            c.add(path, f"unknown validation; available: {', '.join(VALIDATIONS)}")
            continue
        options = copy.deepcopy(options) if options is not None else {}
        if isinstance(options, dict) and isinstance(options.get("host"), dict):
            options["host"] = _resolved(options["host"], base_dir)
        problems = check_options(name, options)
        for sub, message in problems:
            c.add((*path, *sub), message)
        if problems:
            continue
        if "host" in options:
            options["host"] = inline_structure(options["host"])  # already resolved against base_dir
        entry = VALIDATIONS[name]
        provided = {label: design_capabilities(d, spec["training"]) for label, d in spec["designs"].items()}
        missing = [
            need for need in sorted(entry.requires) if not any(need in caps for caps in provided.values())
        ]
        if missing and spec["designs"]:
            c.add(
                path,
                f"{name} needs a design that predicts {', '.join(missing)}; none of "
                f"{', '.join(spec['designs'])} does (add e.g. charges or qeq)",
            )
            continue
        out[name] = options
    return out


def _active_learning(value: Any, spec: dict[str, Any], c: _Checker) -> dict[str, Any]:
    from aiida_emlip.spec_active import ACTIVE_KEYS, MD_KEYS, check_active_learning

    path = ("active_learning",)
    block = c.block(path, value, ACTIVE_KEYS)
    block["md"] = c.block((*path, "md"), block.get("md"), MD_KEYS)
    heads = design_heads(spec)
    for sub, message in check_active_learning(block, heads):
        c.add((*path, *sub), message)
    return block


def design_heads(spec: dict[str, Any]) -> dict[str, str]:
    """Design label → the name of its head."""
    return {
        label: design_config(design, spec["training"])["model"]["head"]["name"]
        for label, design in spec["designs"].items()
    }


def _budget_and_split(spec: dict[str, Any], c: _Checker) -> None:
    from aiida_emlip.workflows.study_registry import VALIDATIONS

    counts = {name: len(system_frames(name, system)) for name, system in spec["systems"].items()}
    validation = {name: VALIDATIONS[name].dft_configurations(o) for name, o in spec["validations"].items()}
    total = sum(counts.values()) + sum(validation.values())
    budget = spec["budget"].get("max_dft_configurations")
    if budget is not None and total > budget:
        parts = ", ".join(f"{k} {v}" for k, v in {**counts, **validation}.items())
        c.add(
            ("budget", "max_dft_configurations"),
            f"the study needs {total} pw.x configurations ({parts}) but the budget allows {budget}",
        )
    active = spec.get("active_learning")
    if active and budget is not None and total <= budget and budget - total < active["per_round"]:
        c.add(
            ("active_learning", "per_round"),
            f"the budget ({budget}) leaves {budget - total} pw.x runs after the study's {total}: "
            f"not enough for one round of {active['per_round']}",
        )
    held = held_out_geometries(spec)
    if not any(held.values()):
        c.add(
            ("split",),
            "no structure would be held out: every system has a single geometry (add rattle.n ≥ 2)",
        )


def _check_resources(spec: dict[str, Any], c: _Checker, resources: Resources) -> None:
    for role, label in spec["codes"].items():
        problem = resources.code_problem(label, CODE_ROLES[role][1])
        if problem:
            c.add(("codes", role), problem)
    elements = study_elements(spec)
    available = resources.family_elements(spec["pseudo_family"])
    if available is None:
        c.add(("pseudo_family",), f"no pseudopotential family {spec['pseudo_family']!r} in the profile")
        return
    for name, system in spec["systems"].items():
        present = {s for _, _, atoms in system_frames(name, system) for s in atoms.get_chemical_symbols()}
        missing = sorted(present - available)
        if missing:
            c.add(
                ("systems", name),
                f"no pseudopotential for {', '.join(missing)} in {spec['pseudo_family']} "
                f"(has {', '.join(sorted(available))})",
            )
    from aiida_emlip.workflows.study_registry import VALIDATIONS

    for name, options in spec["validations"].items():
        missing = sorted(VALIDATIONS[name].elements(options) - available)
        if missing:
            c.add(("validations", name), f"no pseudopotential for {', '.join(missing)}")
        uncovered = sorted(VALIDATIONS[name].elements(options) - elements)
        if uncovered:
            c.add(
                ("validations", name),
                f"the models never see {', '.join(uncovered)}: add a system with these elements",
            )


# ----------------------------------------------------------------------------------------- helpers
def study_elements(spec: dict[str, Any]) -> set[str]:
    """Every element of the study's systems (what the models learn)."""
    return {
        symbol
        for name, system in spec["systems"].items()
        for _, _, atoms in system_frames(name, system)
        for symbol in atoms.get_chemical_symbols()
    }


def held_out_geometries(spec: dict[str, Any]) -> dict[str, list[str]]:
    """System → the geometries held out (never trained on): a seeded choice per system.

    ``round(fraction × n)`` geometries of each system with at least two, at least one; every charge
    state of a held-out geometry is held out with it.
    """
    import numpy as np

    fraction = float(spec["split"]["held_out_fraction"])
    rng = np.random.default_rng(int(spec["split"]["seed"]))
    out = {}
    for name, system in spec["systems"].items():
        geometries = sorted({geometry for _, geometry, _ in system_frames(name, system)})
        n = len(geometries)
        k = 0 if n < 2 else min(n - 1, max(1, round(fraction * n)))
        picked = rng.permutation(n)[:k] if k else []
        out[name] = sorted(geometries[i] for i in picked)
    return out


def design_config(
    design: dict[str, Any],
    training: dict[str, Any],
    labels: Any = (),
    elements: list[str] | None = None,
) -> dict[str, Any]:
    """The ``emlip-train`` config of a design for data with ``labels`` (no test split: the study holds
    out its own structures)."""
    if "config" in design:
        config = copy.deepcopy(design["config"])
    else:
        config = preset_config(
            design["preset"],
            labels=labels,
            epochs=int(design.get("epochs") or training["epochs"]),
            elements=elements,
            backbone=training.get("backbone"),
            seed=int(training["seed"]),
            dtype=training["dtype"],
            lr=float(training["lr"]),
            batch_size=int(training["batch_size"]),
        )
        config["model"]["head"].update(copy.deepcopy(design.get("head") or {}))
        induction = design.get("induction")
        if isinstance(induction, bool):
            config["model"]["induction"] = {"enabled": induction}
        elif induction:
            config["model"]["induction"] = copy.deepcopy(induction)
        config["device"] = training["device"]
        config["data"]["valid_fraction"] = float(training["valid_fraction"])
    config.setdefault("data", {})["test_fraction"] = 0.0
    return config


def design_capabilities(design: dict[str, Any], training: dict[str, Any]) -> frozenset[str]:
    """What the design's head predicts besides energies and forces (``charges``, ``fermi_level``, ...)."""
    from aiida_emlip.models.model import model_capabilities

    config = design_config(design, training)
    return model_capabilities(config["model"])


def _parse_train_config(config: dict[str, Any]) -> None:
    from aiida_emlip.calculations.train import split_path_problem
    from aiida_emlip.models.model import model_capabilities
    from aiida_emlip.training.config import parse_config

    problem = split_path_problem(config)  # the study holds out its own structures; no remote paths
    if problem:
        raise ValueError(problem.removeprefix("config: "))
    values = copy.deepcopy(config)
    values.setdefault("data", {})["train"] = "train.xyz"
    values["output_dir"] = "."
    parse_config(values)
    model_capabilities(values["model"])


def dft_configuration_count(spec: dict[str, Any]) -> dict[str, int]:
    """pw.x configurations per system and per validation (the budget counts their sum)."""
    from aiida_emlip.workflows.study_registry import VALIDATIONS

    counts = {f"systems.{n}": len(system_frames(n, s)) for n, s in spec["systems"].items()}
    for name, options in spec["validations"].items():
        counts[f"validations.{name}"] = VALIDATIONS[name].dft_configurations(options)
    return counts
