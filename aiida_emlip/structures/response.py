"""Structures of the response probes (pure ASE): slabs and films in a field, ion pairs, water chains.

Every builder returns a fully periodic cell with vacuum where the probe needs it (the DFT cell);
:func:`model_cell` turns a copy into what a model should see (open along every vacuum axis, so that
the model's electrostatics uses its slab or open-boundary form, as pw.x's dipole correction does).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ase import Atoms
from ase.build import molecule

from .geometry import unit_normal, vacuum_axes
from .interfaces import fcc_slab

#: O–O distance (Å) of the water chains (a hydrogen-bonded chain is about 2.8–2.9 Å).
WATER_SPACING = 2.9


def metal_slab(
    symbol: str = "Al",
    facet: str = "111",
    size: Sequence[int] = (1, 2, 2),
    vacuum: float = 8.0,
    a: float | None = None,
) -> Atoms:
    """An fcc(111)/(100) slab of ``size = (nx, ny, layers)`` with ``vacuum`` Å along z (axis 2), centred."""
    slab = fcc_slab(symbol, facet, size, a=a)
    slab.center(vacuum=vacuum / 2.0, axis=2)
    slab.pbc = True
    return slab


def water_film(n_water: int = 1, area: Sequence[float] = (3.6, 3.6), vacuum: float = 8.0) -> Atoms:
    """``n_water`` molecules in one layer (molecular planes vertical, dipoles alternating) in an a × b cell.

    The molecules sit on a square grid in the plane; vacuum ``vacuum`` Å along z. A single molecule
    per cell is the thinnest water film.
    """
    if n_water < 1:
        raise ValueError(f"n_water must be at least 1, got {n_water}")
    side = int(np.ceil(np.sqrt(n_water)))
    a, b = float(area[0]), float(area[1])
    atoms = Atoms(cell=[a, b, 1.0], pbc=True)
    for k in range(n_water):
        i, j = divmod(k, side)
        water = molecule("H2O")  # C2v axis along z, H towards +z
        if k % 2:
            water.rotate(180, "x")
        water.translate([(i + 0.5) * a / side, (j + 0.5) * b / side, 0.0])
        atoms += water
    atoms.center(vacuum=vacuum / 2.0, axis=2)
    return atoms


def ion_pair(
    first: str = "Li", second: str = "F", distance: float = 1.6, box: Sequence[float] = (7.0, 7.0)
) -> Atoms:
    """Two atoms at ``distance`` Å along z in a box of ``box`` (x, y) and z = distance + x-width.

    The box is long enough along z that the gap between images is at least the lateral width.
    """
    width = float(min(box))
    length = float(distance) + width
    atoms = Atoms(
        [first, second],
        positions=[[box[0] / 2, box[1] / 2, width / 2], [box[0] / 2, box[1] / 2, width / 2 + distance]],
        cell=[box[0], box[1], length],
        pbc=True,
    )
    return atoms


def ion_pair_scan(
    first: str, second: str, distances: Sequence[float], box: Sequence[float] = (7.0, 7.0)
) -> list[Atoms]:
    """:func:`ion_pair` at each distance, all in one box whose length is at least twice the largest distance.

    The same box for every distance (energies comparable), and no atom closer to an image of the other
    than the two are to each other.
    """
    longest = max(float(d) for d in distances)
    frames = []
    for distance in distances:
        atoms = ion_pair(first, second, float(distance), box)
        atoms.set_cell([box[0], box[1], max(2.0 * longest, longest + float(min(box)))], scale_atoms=False)
        frames.append(atoms)
    return frames


def water_chain(n_water: int, spacing: float = WATER_SPACING, vacuum: float = 7.0) -> Atoms:
    """A linear chain of ``n_water`` molecules along x (O–O ``spacing`` Å), ``vacuum`` Å of box around it.

    Each molecule donates one hydrogen bond to the next (an O–H along +x); the chain is a finite
    molecule in a box (vacuum along every axis), the field of the polarisability probe runs along x.
    """
    if n_water < 1:
        raise ValueError(f"n_water must be at least 1, got {n_water}")
    bond, angle = 0.9572, np.radians(104.52)
    symbols, positions = [], []
    for k in range(n_water):
        side = 1.0 if k % 2 == 0 else -1.0
        o = np.array([k * spacing, 0.0, 0.0])
        symbols += ["O", "H", "H"]
        positions += [
            o,
            o + np.array([bond, 0.0, 0.0]),
            o + np.array([bond * np.cos(angle), side * bond * np.sin(angle), 0.0]),
        ]
    atoms = Atoms(symbols, positions=positions, cell=[1.0, 1.0, 1.0], pbc=True)
    atoms.center(vacuum=vacuum / 2.0)
    return atoms


def model_cell(atoms: Atoms, gap: float = 4.0) -> Atoms:
    """A copy as a model sees it: a slab (vacuum along one axis) open along that axis, anything with
    vacuum along two or three axes open along all three (a molecule), bulk unchanged.

    The model then uses its slab (Yeh–Berkowitz) or open-boundary electrostatics, the counterpart of
    pw.x's dipole correction along the field.
    """
    copy = atoms.copy()
    axes = vacuum_axes(atoms, gap)
    if len(axes) == 1:
        pbc = [True, True, True]
        pbc[axes[0]] = False
        copy.pbc = pbc
    elif axes:
        copy.pbc = False
    return copy


def slab_thickness(atoms: Atoms, axis: int = 2) -> float:
    """Extent (Å) of the atoms along the plane normal of cell ``axis``."""
    heights = atoms.positions @ unit_normal(atoms, axis)
    return float(heights.max() - heights.min())


def plane_area(atoms: Atoms, axis: int = 2) -> float:
    """Area (Å²) of the cell face spanned by the two axes other than ``axis``."""
    cell = np.asarray(atoms.cell[:], dtype=float)
    others = [cell[j] for j in range(3) if j != axis]
    return float(np.linalg.norm(np.cross(*others)))


def _key_sign(value: float) -> str:
    return "p" if value > 0 else "m"


def probe_configurations(
    settings: dict,
    metal: Atoms | None = None,
    water: Atoms | None = None,
) -> tuple[list[Atoms], dict[str, dict]]:
    """Every configuration of the requested probes (DFT cells) and each one's probe metadata by key.

    ``settings``: ``probes`` (subset of field, charging, dissociation, polarizability), ``field_axis``,
    ``metal`` / ``water`` (builder keywords, used when ``metal`` / ``water`` are None), ``fields``,
    ``charges``, ``ion_pair``, ``distances``, ``pair_box``, ``water_sizes``, ``chain_field``,
    ``chain_vacuum``. Each frame's ``info`` holds ``key``, ``config_type`` (the probe),
    ``total_charge`` and, in a field, ``external_field`` (V/Å vector along the plane normal of the
    field axis).
    """
    probes = list(settings["probes"])
    axis = int(settings.get("field_axis", 2))
    frames: list[Atoms] = []
    setup: dict[str, dict] = {}

    def add(atoms: Atoms, key: str, probe: str, meta: dict, charge: float = 0.0, field=None) -> None:
        atoms = atoms.copy()
        atoms.info = {"key": key, "config_type": probe, "total_charge": float(charge)}
        if field is not None:
            atoms.info["external_field"] = [float(x) for x in field]
        frames.append(atoms)
        setup[key] = {"probe": probe, **meta}

    slabs = {}
    if "field" in probes or "charging" in probes:
        slabs["metal"] = metal if metal is not None else metal_slab(**settings["metal"])
    if "field" in probes:
        slabs["water"] = water if water is not None else water_film(**settings["water"])
    geometry = {
        name: {"area": plane_area(s, axis), "thickness": slab_thickness(s, axis), "axis": axis}
        for name, s in slabs.items()
    }
    if "field" in probes:
        for name in ("metal", "water"):
            slab = slabs[name]
            for i, magnitude in enumerate(settings["fields"]):
                for sign in (1.0, -1.0):
                    value = sign * float(magnitude)
                    add(
                        slab,
                        f"field_{name}_{i}{_key_sign(value)}",
                        f"field_{name}",
                        {"value": value, **geometry[name]},
                        field=value * unit_normal(slab, axis),
                    )
    if "charging" in probes:
        for i, charge in enumerate(settings["charges"]):
            add(
                slabs["metal"],
                f"charge_{i}",
                "charging",
                {"value": float(charge), **geometry["metal"]},
                charge=float(charge),
            )
    if "dissociation" in probes:
        first, second = settings["ion_pair"]
        pairs = ion_pair_scan(first, second, settings["distances"], settings["pair_box"])
        for i, (distance, atoms) in enumerate(zip(settings["distances"], pairs)):
            add(atoms, f"pair_{i}", "dissociation", {"value": float(distance), "n_first": 1})
    if "polarizability" in probes:
        field = float(settings["chain_field"])
        for n in settings["water_sizes"]:
            chain = water_chain(int(n), vacuum=float(settings["chain_vacuum"]))
            for sign in (1.0, -1.0):
                add(
                    chain,
                    f"chain{int(n)}_{_key_sign(sign)}",
                    "polarizability",
                    {"value": int(n), "axis": 0, "field": sign * field},
                    field=[sign * field, 0.0, 0.0],
                )
    return frames, setup
