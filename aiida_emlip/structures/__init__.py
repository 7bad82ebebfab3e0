"""Configuration samplers: plain functions on ASE ``Atoms`` (no AiiDA import), each recording its seed.

Every sampler returns a list of ``Atoms`` whose ``info`` holds ``sampler``, ``seed``,
``sampler_params`` (JSON) and the schema keys ``total_charge`` / ``config_type`` (and
``total_spin`` / ``external_field`` where set). :mod:`aiida_emlip.workflows.functions` wraps them as
calcfunctions for provenance.
"""

from importlib import import_module
from typing import Any

#: Public name -> submodule. Loaded on first use, so that importing one light submodule (e.g.
#: ``geometry`` in the trainer) does not pay for pymatgen, which only the defect samplers need.
_EXPORTS = {
    "rattle": "bulk",
    "strain": "bulk",
    "alpha_quartz": "defects",
    "quartz_oxygen_vacancy": "defects",
    "vacancy_cells": "defects",
    "vacancy_supercells": "defects",
    "fragment_pair_scan": "fragments",
    "cell_volume": "geometry",
    "min_interatomic_distance": "geometry",
    "slab_axis": "geometry",
    "vacuum_axes": "geometry",
    "vacuum_gaps": "geometry",
    "fcc_slab": "interfaces",
    "ion_slab_scan": "interfaces",
    "metal_water_interface": "interfaces",
    "md_snapshots": "md",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = tuple(sorted(_EXPORTS))
