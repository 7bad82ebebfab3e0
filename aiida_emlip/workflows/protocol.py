"""Protocols of the workchains (YAML in ``protocols/``), merged with overrides strictly.

The functions take the protocol file (default: the dataset workchain's). :class:`EmlipProtocolMixin`
is aiida-quantumespresso's ``ProtocolMixin`` (``get_default_protocol``, ``get_available_protocols``,
``get_protocol_inputs``) over them, with aliases and strict override keys.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from aiida_quantumespresso.workflows.protocols.utils import ProtocolMixin

PROTOCOL_DIR = Path(__file__).resolve().parent / "protocols"
PROTOCOL_FILE = PROTOCOL_DIR / "dataset.yaml"

#: Maps whose keys are free (pw.x namelists, CalcJob options, pw.x parallelisation flags); every other
#: key must exist in the defaults.
FREE_MAPS = frozenset({"parameters", "options", "parallelization"})
#: pw.x namelists an override may touch.
NAMELISTS = frozenset({"CONTROL", "SYSTEM", "ELECTRONS"})


def parallelization_flags() -> tuple[str, ...]:
    """pw.x's command-line parallelisation flags that aiida-quantumespresso's ``PwCalculation`` takes in its
    ``parallelization`` input (``npool``, ``nband``, ``ntg``, ``ndiag``), read from the installed plugin."""
    from aiida_quantumespresso.calculations.pw import PwCalculation

    return tuple(PwCalculation._ENABLED_PARALLELIZATION_FLAGS)


def parallelization_problem(value: Any) -> str | None:
    """Why ``value`` is not a ``parallelization`` map (flag -> positive whole number), ``None`` if it is.

    The flags are aiida-quantumespresso's names (``npool``, not pw.x's alias ``nk``): what its
    ``PwCalculation`` takes and turns into ``-npool N`` on pw.x's command line.
    """
    from aiida_quantumespresso.calculations.pw import PwCalculation

    if not isinstance(value, dict):
        return f"must map pw.x parallelisation flags to numbers, e.g. {{npool: 2}}, got {value!r}"
    flags = parallelization_flags()
    for flag, number in value.items():
        if flag not in flags:
            canonical = [
                name
                for name, aliases in PwCalculation._PARALLELIZATION_FLAG_ALIASES.items()
                if flag in aliases and name in flags
            ]
            hint = f" (pw.x's -{flag} is -{canonical[0]}: write {canonical[0]})" if canonical else ""
            return f"unknown flag {flag!r}{hint}; allowed: {', '.join(flags)}"
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            return f"{flag} must be a positive whole number, got {number!r}"
    return None


class ProtocolError(ValueError):
    """Unknown protocol name."""


class OverrideError(ValueError):
    """Unknown or malformed override keys."""


@cache
def _load(path: Path = PROTOCOL_FILE) -> dict[str, Any]:
    with Path(path).open() as handle:
        return yaml.safe_load(handle)


def protocol_names(path: Path = PROTOCOL_FILE) -> list[str]:
    """Return the protocol names and their aliases."""
    data = _load(path)
    return sorted([*data["protocols"], *data.get("aliases", {})])


def default_protocol(path: Path = PROTOCOL_FILE) -> str:
    """Return the default protocol name."""
    return str(_load(path)["default_protocol"])


def resolve_name(name: str | None, path: Path = PROTOCOL_FILE) -> str:
    """Return the canonical protocol of ``name`` (aliases resolved); :class:`ProtocolError` if unknown."""
    data = _load(path)
    name = name or data["default_protocol"]
    name = data.get("aliases", {}).get(name, name)
    if name not in data["protocols"]:
        raise ProtocolError(f"unknown protocol {name!r}; choose from {', '.join(protocol_names(path))}")
    return name


def _merge(base: dict[str, Any], update: dict[str, Any], path: str, strict: bool) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        where = f"{path}.{key}" if path else key
        if strict and key not in base:
            raise OverrideError(f"unknown override key {where!r}; allowed here: {', '.join(sorted(base))}")
        if key in FREE_MAPS and not path:
            if not isinstance(value, dict):
                raise OverrideError(f"override {where!r} must be a mapping")
            if key == "parameters":
                bad = sorted(set(value) - NAMELISTS)
                if bad:
                    raise OverrideError(
                        f"unknown pw.x namelist(s) {bad} in {where!r}; allowed: {sorted(NAMELISTS)}"
                    )
                merged = copy.deepcopy(out.get(key) or {})
                for namelist, entries in value.items():
                    merged.setdefault(namelist, {}).update(entries)
                out[key] = merged
            elif key == "parallelization":
                problem = parallelization_problem(value)
                if problem:
                    raise OverrideError(f"override {where!r}: {problem}")
                out[key] = {**(out.get(key) or {}), **copy.deepcopy(value)}
            else:
                out[key] = _merge(out.get(key) or {}, value, where, strict=False)
        elif isinstance(base.get(key), dict) and isinstance(value, dict):
            out[key] = _merge(base[key], value, where, strict)
        else:
            out[key] = copy.deepcopy(value)
    return out


def get_protocol_inputs(
    name: str | None = None, overrides: dict[str, Any] | None = None, path: Path = PROTOCOL_FILE
) -> dict[str, Any]:
    """Return ``default_inputs`` ← protocol ``name`` ← ``overrides``; ``protocol`` holds the canonical name.

    :raises ProtocolError: unknown protocol.
    :raises OverrideError: an override key that the defaults do not have (outside the free maps).
    """
    data = _load(path)
    canonical = resolve_name(name, path)
    protocol = {k: v for k, v in data["protocols"][canonical].items() if k != "description"}
    inputs = _merge(data["default_inputs"], protocol, "", strict=True)
    inputs = _merge(inputs, dict(overrides or {}), "", strict=True)
    inputs["protocol"] = canonical
    return inputs


def _missing(defaults: dict[str, Any], given: dict[str, Any], path: str) -> list[str]:
    """Dotted keys of ``defaults`` that ``given`` lacks (the free maps only as a whole)."""
    missing = []
    for key, value in defaults.items():
        where = f"{path}.{key}" if path else key
        if key not in given:
            missing.append(where)
        elif isinstance(value, dict) and not (key in FREE_MAPS and not path) and isinstance(given[key], dict):
            missing += _missing(value, given[key], where)
    return missing


def _differences(inputs: dict[str, Any], overrides: dict[str, Any], path: str) -> list[str]:
    """Dotted keys whose value in ``overrides`` is not the one ``inputs`` holds."""
    out = []
    for key, value in overrides.items():
        where = f"{path}.{key}" if path else key
        have = inputs.get(key) if isinstance(inputs, dict) else None
        if isinstance(value, dict) and isinstance(have, dict):
            out += _differences(have, value, where)
        elif value != have:
            out.append(f"{where} (override {value!r}, protocol_inputs {have!r})")
    return out


#: Keys of the merged inputs that protocol inputs resolved before the key existed may lack, with the value
#: they then mean (no k-point pools or other pw.x parallelisation flags).
OPTIONAL_INPUTS: dict[str, Any] = {"parallelization": {}}


def check_protocol_inputs(
    protocol_inputs: dict[str, Any],
    name: str | None = None,
    overrides: dict[str, Any] | None = None,
    path: Path = PROTOCOL_FILE,
) -> dict[str, Any]:
    """Return complete merged inputs (what :func:`get_protocol_inputs` returns) after checking them.

    ``protocol_inputs`` must hold every key of ``default_inputs`` and no other (the free maps
    ``parameters`` and ``options`` as a whole); its ``protocol`` entry, when present, must be the
    canonical name of protocol ``name``, and every override in ``overrides`` must already hold there.
    The result is ``protocol_inputs`` itself (with ``protocol`` set): nothing is merged into it.

    :raises ProtocolError: unknown protocol ``name``.
    :raises OverrideError: unknown, missing or malformed keys, or protocol or overrides that disagree.
    """
    data = _load(path)
    canonical = resolve_name(name, path)
    body = {k: v for k, v in protocol_inputs.items() if k != "protocol"}
    for key, value in OPTIONAL_INPUTS.items():  # inputs resolved before the key existed
        body.setdefault(key, copy.deepcopy(value))
    _merge(data["default_inputs"], body, "", strict=True)  # unknown keys, malformed free maps
    missing = _missing(data["default_inputs"], body, "")
    if missing:
        raise OverrideError(f"protocol_inputs lack {', '.join(missing)}: give the complete merged inputs")
    recorded = protocol_inputs.get("protocol", canonical)
    if recorded != canonical:
        raise OverrideError(
            f"protocol_inputs were resolved for protocol {recorded!r} but the protocol is {canonical!r}: "
            "build the inputs again (get_builder_from_protocol) or drop protocol_inputs"
        )
    if overrides:
        _merge(data["default_inputs"], dict(overrides), "", strict=True)
        differ = _differences(body, dict(overrides), "")
        if differ:
            raise OverrideError(
                f"overrides that protocol_inputs do not hold: {'; '.join(differ)}; change one to match "
                "the other (protocol_inputs is what runs)"
            )
    inputs = copy.deepcopy(body)
    inputs["protocol"] = canonical
    return inputs


class EmlipProtocolMixin(ProtocolMixin):
    """aiida-quantumespresso's ``ProtocolMixin`` interface over a file in ``protocols/``.

    Subclasses set ``protocol_file`` (a file name in ``protocols/``). Unlike the upstream mixin, aliases
    (``moderate``, ``precise``) resolve and unknown override keys are errors (:class:`OverrideError`).
    """

    protocol_file: str = "dataset.yaml"

    @classmethod
    def get_protocol_filepath(cls) -> Path:
        return PROTOCOL_DIR / cls.protocol_file

    @classmethod
    def get_default_protocol(cls) -> str:
        return default_protocol(cls.get_protocol_filepath())

    @classmethod
    def get_available_protocols(cls) -> dict[str, dict[str, str]]:
        data = _load(cls.get_protocol_filepath())
        return {name: {"description": values["description"]} for name, values in data["protocols"].items()}

    @classmethod
    def get_protocol_inputs(
        cls, protocol: str | None = None, overrides: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return get_protocol_inputs(protocol, overrides, cls.get_protocol_filepath())

    @classmethod
    def check_protocol_inputs(
        cls,
        protocol_inputs: dict[str, Any],
        protocol: str | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """:func:`check_protocol_inputs` over this class's protocol file."""
        return check_protocol_inputs(protocol_inputs, protocol, overrides, cls.get_protocol_filepath())
