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

#: Maps whose keys are free (pw.x namelists, CalcJob options); every other key must exist in the defaults.
FREE_MAPS = frozenset({"parameters", "options"})
#: pw.x namelists an override may touch.
NAMELISTS = frozenset({"CONTROL", "SYSTEM", "ELECTRONS"})


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
