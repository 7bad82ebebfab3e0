"""States of a metal–water interface (pure ASE): neutral, in a homogeneous field, with a charged electrode.

One interface geometry, many electronic states: the configurations differ only in ``info``
(``total_charge``, ``external_field``), so that every difference between them is the response of the
electrons (DFT) or of the model's charges. The metal is the element of the lowest atom along the
normal (the samplers put the slab at the bottom), or the symbols given explicitly; every other atom
(water, ions) belongs to the electrolyte side.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ase import Atoms

from .geometry import unit_normal
from .interfaces import metal_water_interface
from .response import plane_area

#: Configuration keys of the three kinds of state.
STATES = ("neutral", "field", "charge")


def metal_symbols(atoms: Atoms, axis: int = 2, symbols: Sequence[str] | None = None) -> list[str]:
    """The metal's elements: ``symbols`` when given, else the element of the lowest atom along the normal."""
    if symbols:
        return sorted(set(symbols))
    heights = atoms.positions @ unit_normal(atoms, axis)
    return [atoms.get_chemical_symbols()[int(np.argmin(heights))]]


def metal_mask(atoms: Atoms, metals: Sequence[str]) -> np.ndarray:
    """Boolean mask of the metal atoms."""
    return np.isin(np.asarray(atoms.get_chemical_symbols()), list(metals))


def default_interface(settings: dict) -> Atoms:
    """The protocol's interface: :func:`metal_water_interface` with the ``interface`` keywords."""
    keywords = dict(settings)
    keywords["size"] = tuple(keywords.get("size", (1, 2, 2)))
    return metal_water_interface(**keywords)


def _sign(value: float) -> str:
    return "p" if value > 0 else "m"


def interface_states(
    interface: Atoms,
    fields: Sequence[float],
    charges: Sequence[float],
    axis: int = 2,
    metals: Sequence[str] | None = None,
) -> tuple[list[Atoms], dict[str, dict]]:
    """The neutral state, each field magnitude with both signs, each non-zero electrode charge.

    Returns the frames (``info``: ``key``, ``config_type``, ``total_charge``, ``external_field``) and
    each key's metadata: ``state`` (neutral, field, charge), ``value`` (signed field along the normal in
    V/Å, or the total charge in e; 0 for neutral), ``axis``, ``area`` (Å²), ``length`` (Å, the cell's
    extent along the normal), ``metal`` (indices of the metal atoms), ``metal_symbols``, ``n_atoms``.
    """
    metals = metal_symbols(interface, axis, metals)
    mask = metal_mask(interface, metals)
    if mask.all() or not mask.any():
        raise ValueError(f"the interface needs metal ({metals}) and non-metal atoms")
    normal = unit_normal(interface, axis)
    cell = np.asarray(interface.cell[:], dtype=float)
    common = {
        "axis": int(axis),
        "area": plane_area(interface, axis),
        "length": float(abs(cell[axis] @ normal)),
        "metal": [int(i) for i in np.flatnonzero(mask)],
        "metal_symbols": list(metals),
        "n_atoms": len(interface),
    }
    frames: list[Atoms] = []
    setup: dict[str, dict] = {}

    def add(key: str, state: str, value: float, charge: float = 0.0, field: float | None = None) -> None:
        atoms = interface.copy()
        atoms.info = {"key": key, "config_type": f"interface_{state}", "total_charge": float(charge)}
        if field is not None:
            atoms.info["external_field"] = [float(x) for x in field * normal]
        frames.append(atoms)
        setup[key] = {"state": state, "value": float(value), **common}

    add("neutral", "neutral", 0.0)
    for i, magnitude in enumerate(fields):
        for sign in (1.0, -1.0):
            value = sign * float(magnitude)
            add(f"field_{i}{_sign(value)}", "field", value, field=value)
    for i, charge in enumerate(charges):
        if float(charge) != 0.0:
            add(f"charge_{i}{_sign(float(charge))}", "charge", float(charge), charge=float(charge))
    return frames, setup
