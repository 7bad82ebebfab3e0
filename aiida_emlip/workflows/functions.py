"""Calcfunctions of the dataset workchain: samplers, splitting into structures, collecting labels."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import numpy as np
from aiida import orm
from aiida.common.links import LinkType
from aiida.engine import calcfunction
from ase import Atoms

from aiida_emlip import schema
from aiida_emlip.data import EmlipDatasetData
from aiida_emlip.structures.geometry import unit_normal

from .samplers import run_recipe

#: 1 GPa in eV/Å^3.
GPA_IN_EV_PER_A3 = 1.0 / 160.21766208
#: 1 Debye in e·Å.
DEBYE_IN_E_A = 0.20819434
#: Sign between pw.x's printed dipole (dipfield) and the physical dipole (ions − electrons), pinned by tests.
QE_DIPOLE_SIGN = 1.0


@calcfunction
def sample_configurations(recipe: orm.Dict, structure: orm.StructureData | None = None) -> EmlipDatasetData:
    """Run a sampler recipe (``{"name", "kwargs"}``) and return the configurations as a dataset."""
    atoms = structure.get_ase() if structure is not None else None
    frames = run_recipe(recipe.get_dict(), atoms)
    return EmlipDatasetData(frames=frames)


_DIGITS = re.compile(r"(\d+)")


def configuration_key(index: int) -> str:
    """The key of the ``index``-th configuration of a dataset input: ``c0000``, ..., ``c9999``, ``c10000``.

    Past ``c9999`` the keys no longer sort as strings in the order of the configurations: they are paired
    with their configurations by this function, never by sorting.
    """
    return f"c{index:04d}"


def natural_order(keys: Iterable[str]) -> list[str]:
    """``keys`` sorted with runs of digits compared as numbers: ``s2`` before ``s10``, ``c9999`` before
    ``c10000`` (ties, such as ``s01`` and ``s1``, by the plain string)."""

    def key(text: str) -> tuple[tuple[str | int, ...], str]:
        parts = _DIGITS.split(text)
        return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), text

    return sorted(keys, key=key)


@calcfunction
def split_configurations(configurations: EmlipDatasetData) -> dict[str, orm.StructureData]:
    """Return one ``StructureData`` per configuration, keyed :func:`configuration_key` of its index."""
    return {
        configuration_key(i): orm.StructureData(ase=atoms) for i, atoms in enumerate(configurations.to_ase())
    }


def expected_labels(meta: dict[str, Any], steps: dict[str, bool]) -> set[str]:
    """The labels :func:`assemble_dataset` stores for a configuration when its pw.x run and every
    post-processing step succeed, known before anything runs (what :func:`_labels` and the
    post-processing outputs give): ``meta`` is the configuration's metadata in the dataset workchain,
    ``steps`` its post-processing steps. The Fermi level is always there (pw.x's Fermi energy, or its
    highest occupied level with fixed occupations), the stress of periodic bulk only, the dipole with
    ``dipfield`` only."""
    labels = {schema.ENERGY, schema.FORCES, schema.FERMI_LEVEL}
    if meta.get("periodic_bulk"):
        labels.add(schema.STRESS)
    if meta.get("dipfield"):
        labels.add(schema.DIPOLE)
    if steps.get("hirshfeld"):
        labels |= {schema.CHARGES, schema.ATOMIC_DIPOLES}
    if steps.get("lowdin"):
        labels.add(schema.LOWDIN_CHARGES)
    return labels


def expected_fermi_reference(steps: dict[str, bool]) -> str:
    """What a configuration's ``fermi_level`` will be measured from when its steps succeed (see
    :func:`assemble_dataset`): the vacuum where the vacuum level is computed (slabs), else the cell
    average of the electrostatic potential."""
    return "vacuum" if steps.get("vacuum_level") else "cell_average"


def _labels(meta: dict[str, Any], parameters: orm.Dict, trajectory: orm.TrajectoryData, atoms: Atoms) -> None:
    """Write the pw.x labels of one configuration into ``atoms.info`` / ``atoms.arrays`` (schema keys).

    ``parameters`` is the ``output_parameters`` of the ``emlip.pw`` parser (band edges and the dipole
    included).
    """
    params = parameters.get_dict()
    atoms.info[schema.ENERGY] = float(params["energy"])
    atoms.arrays[schema.FORCES] = np.asarray(trajectory.get_array("forces")[-1], dtype=float)
    if meta["periodic_bulk"] and "stress" in trajectory.get_arraynames():
        atoms.info[schema.STRESS] = (
            -np.asarray(trajectory.get_array("stress")[-1], dtype=float) * GPA_IN_EV_PER_A3
        )
    fermi = params.get("fermi_energy", params.get("highest_occupied_level"))
    if fermi is not None:
        atoms.info[schema.FERMI_LEVEL] = float(fermi)
        atoms.info[schema.FERMI_REFERENCE] = "cell_average"
    for level in ("highest_occupied_level", "lowest_unoccupied_level"):
        if params.get(level) is not None:
            atoms.info[level] = float(params[level])
    magnetization = params.get("total_magnetization")
    if magnetization is not None:
        atoms.info["total_magnetization"] = float(magnetization)
    spin = meta.get(schema.TOTAL_SPIN)
    atoms.info[schema.TOTAL_SPIN] = float(spin if spin is not None else (magnetization or 0.0))
    value = params.get("dipole_debye") if meta.get("dipfield") else None
    if value is not None:
        normal = unit_normal(atoms, meta["edir"])
        atoms.info[schema.DIPOLE] = QE_DIPOLE_SIGN * float(value) * DEBYE_IN_E_A * normal
    if "wall_time_seconds" in params:
        atoms.info["pw_wall_time"] = float(params["wall_time_seconds"])


def creator_uuids(nodes: list[orm.Data]) -> dict[int, str]:
    """``{pk: UUID of its creator}`` of the stored data ``nodes`` (one query; ``node.creator`` is one
    each); a node without a creator is left out."""
    if not nodes:
        return {}
    query = orm.QueryBuilder().append(
        orm.Data, filters={"id": {"in": [node.pk for node in nodes]}}, project="id", tag="data"
    )
    created = {"type": LinkType.CREATE.value}
    query.append(orm.CalculationNode, with_outgoing="data", edge_filters=created, project="uuid")
    return dict(query.all())


@calcfunction
def assemble_dataset(settings: orm.Dict, **nodes: orm.Data) -> dict[str, orm.Data]:
    """Collect the labels of the finished configurations into a dataset and write the failure report.

    ``settings`` holds ``dft_settings``, ``configurations`` (key -> per-configuration metadata),
    ``order`` (the keys in the order of the dataset; without it, that of ``configurations``) and
    ``failures`` (key -> exit status/message). ``nodes`` are ``structure_<key>``,
    ``parameters_<key>`` and ``trajectory_<key>`` for every finished key, and
    ``hirshfeld_<key>``, ``lowdin_<key>``, ``vacuum_<key>`` where post-processing succeeded.
    """
    data = settings.get_dict()
    frames = []
    sources = creator_uuids([node for name, node in nodes.items() if name.startswith("parameters_")])
    for key in data.get("order") or list(data["configurations"]):
        meta = data["configurations"][key]
        if f"parameters_{key}" not in nodes:
            continue
        source = nodes[f"structure_{key}"].get_ase()
        atoms = Atoms(source.get_chemical_symbols(), positions=source.positions, cell=source.cell)
        atoms.pbc = False if meta.get("isolated") else source.pbc
        atoms.info[schema.TOTAL_CHARGE] = float(meta.get(schema.TOTAL_CHARGE, 0.0))
        if meta.get(schema.EXTERNAL_FIELD) is not None:
            atoms.info[schema.EXTERNAL_FIELD] = np.asarray(meta[schema.EXTERNAL_FIELD], dtype=float)
        for extra in ("config_type", "sampler", "seed", "sampler_params"):
            if meta.get(extra) is not None:
                atoms.info[extra] = meta[extra]
        atoms.info["key"] = key
        atoms.info["source_uuid"] = sources[nodes[f"parameters_{key}"].pk]
        _labels(meta, nodes[f"parameters_{key}"], nodes[f"trajectory_{key}"], atoms)
        multipoles = nodes.get(f"hirshfeld_{key}")
        if multipoles is not None:
            atoms.arrays[schema.CHARGES] = np.asarray(multipoles.get_array("charges"), dtype=float)
            atoms.arrays[schema.ATOMIC_DIPOLES] = np.asarray(multipoles.get_array("dipoles"), dtype=float)
        lowdin = nodes.get(f"lowdin_{key}")
        if lowdin is not None:
            atoms.arrays[schema.LOWDIN_CHARGES] = np.asarray(lowdin.get_array("charges"), dtype=float)
            if lowdin.base.attributes.get("spilling", None) is not None:
                atoms.info["lowdin_spilling"] = float(lowdin.base.attributes.get("spilling"))
        vacuum = nodes.get(f"vacuum_{key}")
        if vacuum is not None and schema.FERMI_LEVEL in atoms.info:
            raw = atoms.info[schema.FERMI_LEVEL]
            atoms.info["fermi_level_cell_average"] = raw
            atoms.info["vacuum_level_top"] = float(vacuum["vacuum_level_top"])
            atoms.info["vacuum_level_bottom"] = float(vacuum["vacuum_level_bottom"])
            atoms.info[schema.FERMI_LEVEL] = raw - float(vacuum["vacuum_level_top"])
            atoms.info[schema.FERMI_REFERENCE] = "vacuum"
        frames.append(atoms)
    return assembly_outputs(data, frames)


def assembly_outputs(data: dict[str, Any], frames: list[Atoms]) -> dict[str, orm.Data]:
    """The failure report of the settings ``data`` with the labelled ``frames``, and the dataset of the
    frames (none without frames): the outputs of :func:`assemble_dataset` and of the merge of its parts."""
    report = {
        "n_configurations": len(data["configurations"]),
        "n_finished": len(frames),
        "n_failed": len(data["failures"]),
        "failed": data["failures"],
        "postprocess_failed": data.get("postprocess_failures", {}),
        "postprocess_skipped": data.get("postprocess_skipped", {}),
        "fermi_references": sorted({str(f.info.get(schema.FERMI_REFERENCE)) for f in frames}),
    }
    outputs: dict[str, orm.Data] = {"report": orm.Dict(report)}
    if frames:
        outputs["dataset"] = EmlipDatasetData(frames=frames, dft_settings=data["dft_settings"])
    return outputs
