"""Metal–water interfaces and ion–slab distance scans."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ase import Atoms
from ase.build import fcc100, fcc111, molecule

from .records import tag

#: Number density of liquid water at 300 K, molecules per Å^3 (0.997 g/cm^3).
WATER_DENSITY = 0.0334
#: Closest allowed distances (Å) between different molecules / ions when packing: heavy atoms, any atoms.
MIN_HEAVY_DISTANCE = 2.5
MIN_PACKING_DISTANCE = 1.5


def fcc_slab(
    symbol: str, facet: str = "111", size: Sequence[int] = (2, 2, 3), a: float | None = None
) -> Atoms:
    """Return an orthogonal fcc(111) or fcc(100) slab of ``size = (nx, ny, layers)``, without vacuum."""
    builders = {"111": fcc111, "100": fcc100}
    if facet not in builders:
        raise ValueError(f"facet must be one of {sorted(builders)}, got {facet!r}")
    slab = builders[facet](symbol, size=tuple(size), a=a, orthogonal=True, vacuum=0.0)
    slab.pbc = True
    return slab


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _fits(
    candidate: np.ndarray,
    heavy: np.ndarray,
    placed: list[np.ndarray],
    placed_heavy: list[np.ndarray],
    cell: np.ndarray,
) -> bool:
    """Whether ``candidate`` keeps the packing distances to ``placed`` (minimum image in x and y)."""
    if not placed:
        return True

    def closest(a: np.ndarray, b: np.ndarray) -> float:
        diff = a[:, None, :] - b[None, :, :]
        frac = diff @ np.linalg.inv(cell)
        frac[..., :2] -= np.round(frac[..., :2])
        return float(np.linalg.norm(frac @ cell, axis=-1).min())

    if closest(candidate, np.concatenate(placed)) < MIN_PACKING_DISTANCE:
        return False
    return closest(candidate[heavy], np.concatenate(placed_heavy)) >= MIN_HEAVY_DISTANCE


def metal_water_interface(
    symbol: str = "Al",
    facet: str = "111",
    size: Sequence[int] = (2, 2, 3),
    water_thickness: float = 6.0,
    n_water: int | None = None,
    ions: Sequence[str] = (),
    vacuum: float = 10.0,
    gap: float = 2.5,
    a: float | None = None,
    total_charge: float = 0.0,
    seed: int = 0,
    max_tries: int = 5000,
) -> Atoms:
    """Return an fcc(111)/(100) slab with a water film at liquid density on top, then ``vacuum`` Å.

    The film is ``water_thickness`` Å thick, starting ``gap`` Å above the top layer; ``n_water``
    overrides the count from :data:`WATER_DENSITY`. ``ions`` (symbols, e.g. ``["Na", "Cl"]``) are
    placed in the film as single atoms; ``total_charge`` is recorded for the DFT step. Molecules get
    random orientations and positions from ``seed``; the cell is orthogonal with z normal to the slab.
    """
    rng = np.random.default_rng(seed)
    slab = fcc_slab(symbol, facet, size, a)
    cell = np.array(slab.cell[:])
    top = slab.positions[:, 2].max()
    area = float(np.linalg.norm(np.cross(cell[0], cell[1])))
    count = n_water if n_water is not None else round(WATER_DENSITY * area * water_thickness)
    z_lo, z_hi = top + gap, top + gap + water_thickness
    water = molecule("H2O")
    water.positions -= water.get_center_of_mass()
    placed: list[np.ndarray] = []
    placed_heavy: list[np.ndarray] = []
    symbols: list[str] = []
    species = [("H2O", water)] * count + [(ion, Atoms(ion)) for ion in ions]
    for name, template in species:
        heavy = np.array([sym != "H" for sym in template.get_chemical_symbols()])
        for _ in range(max_tries):
            frac = rng.uniform(0.0, 1.0, size=2)
            centre = frac[0] * cell[0] + frac[1] * cell[1]
            centre[2] = rng.uniform(z_lo + 0.5, max(z_lo + 0.5, z_hi - 0.5))
            candidate = template.positions @ _random_rotation(rng).T + centre
            if _fits(candidate, heavy, placed, placed_heavy, cell):
                placed.append(candidate)
                placed_heavy.append(candidate[heavy])
                symbols.extend(template.get_chemical_symbols())
                break
        else:
            raise RuntimeError(
                f"could not place {name} after {max_tries} tries; lower the density or thickness"
            )
    film = Atoms(symbols, positions=np.concatenate(placed)) if placed else Atoms()
    interface = slab + film
    top_all = interface.positions[:, 2].max()
    cell[2] = [0.0, 0.0, top_all + vacuum]
    interface.set_cell(cell)
    interface.pbc = True
    interface.wrap()
    params = {
        "symbol": symbol,
        "facet": facet,
        "size": list(size),
        "n_water": count,
        "ions": list(ions),
        "vacuum": vacuum,
        "water_thickness": water_thickness,
    }
    return tag(
        interface,
        "metal_water_interface",
        seed,
        params=params,
        total_charge=total_charge,
        config_type=f"{symbol}({facet})/water",
    )


def ion_slab_scan(
    slab: Atoms,
    ion: str,
    distances: Sequence[float],
    site: Sequence[float] = (0.0, 0.0),
    total_charge: float = 0.0,
    vacuum: float = 10.0,
) -> list[Atoms]:
    """Return ``slab`` with one ``ion`` at each height in ``distances`` (Å) above its top atom at ``site``.

    ``site`` is the in-plane position in fractional coordinates of the surface cell; the cell is
    extended so that ``vacuum`` Å remain above the ion. Deterministic (seed recorded as -1).
    """
    frames = []
    cell = np.array(slab.cell[:])
    top = slab.positions[:, 2].max()
    xy = site[0] * cell[0, :2] + site[1] * cell[1, :2]
    for i, distance in enumerate(distances):
        frame = slab.copy()
        frame.append(ion)
        frame.positions[-1] = [xy[0], xy[1], top + float(distance)]
        new_cell = cell.copy()
        new_cell[2] = [0.0, 0.0, max(cell[2, 2], top + float(distance) + vacuum)]
        frame.set_cell(new_cell)
        frame.pbc = True
        frames.append(
            tag(
                frame,
                "ion_slab_scan",
                None,
                index=i,
                params={"ion": ion, "distance": float(distance), "site": list(site)},
                total_charge=total_charge,
                config_type=f"{ion}-slab",
            )
        )
    return frames
