"""Configuration samplers: plain functions on ASE ``Atoms`` (no AiiDA import), each recording its seed.

Every sampler returns a list of ``Atoms`` whose ``info`` holds ``sampler``, ``seed``,
``sampler_params`` (JSON) and the schema keys ``total_charge`` / ``config_type`` (and
``total_spin`` / ``external_field`` where set). :mod:`aiida_emlip.workflows.functions` wraps them as
calcfunctions for provenance.
"""

from .bulk import rattle, strain
from .defects import alpha_quartz, quartz_oxygen_vacancy, vacancy_cells, vacancy_supercells
from .fragments import fragment_pair_scan
from .geometry import cell_volume, min_interatomic_distance, slab_axis, vacuum_axes, vacuum_gaps
from .interfaces import fcc_slab, ion_slab_scan, metal_water_interface
from .md import md_snapshots

__all__ = (
    "alpha_quartz",
    "cell_volume",
    "fcc_slab",
    "fragment_pair_scan",
    "ion_slab_scan",
    "md_snapshots",
    "metal_water_interface",
    "min_interatomic_distance",
    "quartz_oxygen_vacancy",
    "rattle",
    "slab_axis",
    "strain",
    "vacancy_cells",
    "vacancy_supercells",
    "vacuum_axes",
    "vacuum_gaps",
)
