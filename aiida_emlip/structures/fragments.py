"""Two fragments (ions or molecules) at a range of separations: the long-range test of a design."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ase import Atoms
from ase.build import molecule

from .interfaces import _random_rotation
from .records import tag


def fragment(name: str | Atoms) -> Atoms:
    """An isolated fragment: an ``Atoms``, an ASE g2 molecule name (``H2O``) or an element (``Li``)."""
    if isinstance(name, Atoms):
        return name.copy()
    try:
        return molecule(name)
    except KeyError:
        try:
            return Atoms(name, positions=[[0.0, 0.0, 0.0]])
        except (KeyError, ValueError):
            raise ValueError(
                f"unknown fragment {name!r}: use an element symbol or an ASE g2 molecule"
            ) from None


def closest_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest distance between any atom of ``a`` and any atom of ``b`` (positions, no periodicity)."""
    return float(np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1).min())


def _place_at_separation(
    fixed: np.ndarray, moving: np.ndarray, axis: np.ndarray, separation: float
) -> np.ndarray:
    """Shift ``moving`` along ``axis`` (away from ``fixed``) until the closest distance is ``separation``."""
    lo, hi = 0.0, separation + float(np.ptp(fixed, axis=0).max() + np.ptp(moving, axis=0).max()) + 1.0
    start = moving - moving.mean(axis=0) + fixed.mean(axis=0)
    for _ in range(60):  # the closest distance grows monotonically once the fragments are apart
        mid = 0.5 * (lo + hi)
        if closest_distance(fixed, start + mid * axis) < separation:
            lo = mid
        else:
            hi = mid
    return start + hi * axis


def fragment_pair_scan(
    first: str | Atoms,
    second: str | Atoms,
    separations: Sequence[float],
    total_charge: float = 0.0,
    cell: Sequence[float] = (8.0, 8.0, 18.0),
    orientations: int = 1,
    rattle: float = 0.0,
    seed: int = 0,
    config_type: str | None = None,
) -> list[Atoms]:
    """Return ``first`` and ``second`` at each closest-atom separation (Å) along z in an orthorhombic cell.

    For each separation, ``orientations`` copies with both fragments randomly rotated (and rattled by
    ``rattle`` Å) from ``seed``. The first fragment's atoms come first; ``sampler_params`` records the
    separation, the orientation index and the fragment sizes (``fragments``), so that per-fragment
    charges can be summed later. The cell is periodic; ``total_charge`` is carried for the DFT step
    (a charged cell with the usual compensating background).
    """
    rng = np.random.default_rng(seed)
    a0, b0 = fragment(first), fragment(second)
    box = np.diag(np.asarray(cell, dtype=float))
    axis = np.array([0.0, 0.0, 1.0])
    label = config_type or f"{a0.get_chemical_formula()}+{b0.get_chemical_formula()}"
    frames = []
    for separation in separations:
        for k in range(orientations):
            a = a0.positions @ _random_rotation(rng).T if len(a0) > 1 else a0.positions.copy()
            b = b0.positions @ _random_rotation(rng).T if len(b0) > 1 else b0.positions.copy()
            if rattle > 0:
                a = a + rng.normal(0.0, rattle, size=a.shape)
                b = b + rng.normal(0.0, rattle, size=b.shape)
            a = a - a.mean(axis=0)
            b = _place_at_separation(a, b, axis, float(separation))
            positions = np.concatenate([a, b])
            positions += box.sum(axis=0) / 2 - 0.5 * (positions.max(axis=0) + positions.min(axis=0))
            frame = Atoms(
                a0.get_chemical_symbols() + b0.get_chemical_symbols(), positions=positions, cell=box, pbc=True
            )
            extent = float(np.ptp(positions[:, 2]))
            if extent + 4.0 > cell[2]:
                raise ValueError(
                    f"separation {separation} Å leaves {cell[2] - extent:.1f} Å to the periodic image "
                    "along z; use a longer cell"
                )
            params = {
                "first": a0.get_chemical_formula(),
                "second": b0.get_chemical_formula(),
                "separation": float(separation),
                "orientation": k,
                "fragments": [len(a0), len(b0)],
                "rattle": rattle,
            }
            frames.append(
                tag(
                    frame,
                    "fragment_pair_scan",
                    seed,
                    index=len(frames),
                    params=params,
                    total_charge=total_charge,
                    config_type=label,
                )
            )
    return frames


#: The long-range benchmark systems: (first, second, total charge, smallest separation in Å).
LONG_RANGE_SYSTEMS = (
    ("Li", "H2O", 1.0, 1.8),
    ("F", "H2O", -1.0, 1.5),
    ("H2O", "H2O", 0.0, 1.8),
)


def long_range_set(
    n_separations: int = 12,
    orientations: int = 3,
    max_separation: float = 9.0,
    cell: Sequence[float] = (8.0, 8.0, 18.0),
    rattle: float = 0.02,
    seed: int = 0,
    systems: Sequence[str] | None = None,
) -> list[Atoms]:
    """Li⁺ and F⁻ approaching a water molecule in charged cells, and a neutral water pair.

    Each system spans closest-atom separations from its bonding distance to ``max_separation`` Å, far
    beyond a 4–5 Å cutoff: the data on which a local model must fail and an electrostatic one need not.
    ``systems`` picks some of them by their first fragment (``"Li"``, ``"F"``, ``"H2O"``; default all).
    """
    known = [system[0] for system in LONG_RANGE_SYSTEMS]
    unknown = sorted(set(systems or ()) - set(known))
    if unknown:
        raise ValueError(f"unknown long-range systems {unknown}; known: {', '.join(known)}")
    frames: list[Atoms] = []
    for i, (first, second, charge, closest) in enumerate(LONG_RANGE_SYSTEMS):
        if systems is not None and first not in systems:
            continue
        separations = np.linspace(closest, max_separation, n_separations)
        frames += fragment_pair_scan(
            first,
            second,
            separations,
            total_charge=charge,
            cell=cell,
            orientations=orientations,
            rattle=rattle,
            seed=seed + i,
        )
    return frames
