"""Calcfunctions of the interface workchain: the states, the analysis with the models' potential
profiles, the figures (provenance). The physics is pure code in :mod:`aiida_emlip.analysis.interface`
and :mod:`aiida_emlip.analysis.planar_potential`."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from aiida import orm
from aiida.engine import calcfunction

from aiida_emlip import schema
from aiida_emlip.analysis import interface as analysis
from aiida_emlip.analysis.planar_potential import model_profile
from aiida_emlip.data import EmlipDatasetData
from aiida_emlip.structures.geometry import unit_normal, vacuum_center
from aiida_emlip.structures.interface_states import default_interface, interface_states
from aiida_emlip.structures.response import model_cell

from .response_functions import dft_frames, probe_key

#: Grid points of a model profile when there is no DFT profile to share the grid with.
DEFAULT_POINTS = 240


@calcfunction
def interface_structures(settings: orm.Dict, **interface: orm.StructureData) -> dict[str, orm.Data]:
    """The states: ``configurations`` (DFT cells), ``model_configurations`` (open along the normal, as
    the models see them) and ``setup`` (state metadata by key). ``interface`` may hold ``structure``,
    used instead of the protocol's sampler."""
    values = settings.get_dict()
    atoms = (
        interface["structure"].get_ase()
        if "structure" in interface
        else default_interface(values["interface"])
    )
    frames, setup = interface_states(
        atoms, values["fields"], values["charges"], int(values["field_axis"]), values.get("metal_symbols")
    )
    model_frames = []
    for frame in frames:
        copy = model_cell(frame)
        copy.info = dict(frame.info)
        model_frames.append(copy)
    return {
        "configurations": EmlipDatasetData(frames=frames),
        "model_configurations": EmlipDatasetData(frames=model_frames),
        "setup": orm.Dict(setup),
    }


def grid_of(
    dft_profiles: dict[str, dict], reference, axis: int
) -> tuple[int, float, tuple[float, float] | None]:
    """(points, origin, sawtooth window) of the profiles: pw.x's grid when there is one."""
    axis_profile = next(iter(dft_profiles.values()), None)
    if axis_profile is None:
        return DEFAULT_POINTS, vacuum_center(reference, axis), None
    emaxpos, eopreg = float(axis_profile["emaxpos"]), float(axis_profile["eopreg"])
    return len(axis_profile["profile"]), (emaxpos + eopreg / 2.0) % 1.0, (emaxpos, (emaxpos + eopreg) % 1.0)


def method_profiles(
    frames: dict[str, Any], setup: dict[str, dict], configurations: dict[str, Any], sigma: float, grid
) -> dict[str, list[float]]:
    """A model's electron potential energy profiles (eV) by key, from its charges and dipoles."""
    n_points, origin, _ = grid
    profiles = {}
    for key, atoms in frames.items():
        charges = atoms.arrays.get(schema.CHARGES)
        if charges is None or key not in setup:
            continue
        meta = setup[key]
        axis = int(meta["axis"])
        cell_atoms = configurations[key]
        normal = unit_normal(cell_atoms, axis)
        dipoles = atoms.arrays.get(schema.ATOMIC_DIPOLES)
        profiles[key] = model_profile(
            cell_atoms.get_scaled_positions(wrap=True)[:, axis],
            charges,
            float(meta["area"]),
            float(meta["length"]),
            sigma,
            n_points,
            origin,
            dipoles=None if dipoles is None else np.asarray(dipoles, dtype=float) @ normal,
            field=float(meta["value"]) if meta["state"] == "field" else 0.0,
        ).tolist()
    return profiles


@calcfunction
def analyse_interface_states(
    setup: orm.Dict,
    settings: orm.Dict,
    dft: EmlipDatasetData,
    configurations: EmlipDatasetData,
    **nodes: orm.Data,
) -> dict[str, orm.Dict]:
    """Every method's numbers, each model's errors against DFT and the interface verdict table.

    ``nodes``: ``predictions_<label>`` (``emlip.dataset``) per model and ``profile_<key>`` (pp.x
    profiles, keyed as the dataset workchain's configurations). ``settings``: ``sigmas``
    ({label: Å}), ``tolerances``.
    """
    values = settings.get_dict()
    states = setup.get_dict()
    cells = {str(a.info["key"]): a for a in configurations.to_ase()}
    order = list(cells)
    methods = {"dft": dft_frames(dft, configurations)}
    dft_profiles = {}
    for name, node in nodes.items():
        if name.startswith("predictions_"):
            methods[name[len("predictions_") :]] = {
                str(a.info["key"]): a for a in node.to_ase() if "key" in a.info
            }
        elif name.startswith("profile_"):
            dft_profiles[probe_key(name[len("profile_") :], order)] = node.get_dict()
    axis = int(next(iter(states.values()))["axis"])
    grid = grid_of(dft_profiles, next(iter(cells.values())), axis)
    profiles = {"dft": {k: v["profile"] for k, v in dft_profiles.items()}}
    for label, frames in methods.items():
        if label != "dft":
            profiles[label] = method_profiles(frames, states, cells, float(values["sigmas"][label]), grid)
    result = analysis.analyse_interface(states, methods, profiles, values.get("tolerances"), grid[2])
    result["grid"] = {"n_points": grid[0], "origin": grid[1], "sawtooth": grid[2]}
    table = result.pop("verdicts")
    comparison = result.pop("comparison")
    return {"analysis": orm.Dict(result), "verdicts": orm.Dict(table), "comparison": orm.Dict(comparison)}


@calcfunction
def interface_figures(analysis_node: orm.Dict, setup: orm.Dict) -> dict[str, orm.SinglefileData]:
    """Induced potential profiles, drop vs charge, dipole vs field, charge-transfer parity (PNG)."""
    from aiida_emlip.report.figures_interface import write_figures

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_figures(analysis_node.get_dict(), setup.get_dict(), Path(tmp))
        return {name: orm.SinglefileData(file=str(path), filename=path.name) for name, path in paths.items()}
