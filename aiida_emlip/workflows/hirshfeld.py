"""Hirshfeld atomic charges and dipoles (l ≤ 1) from pp.x's valence density and free-atom densities.

The free-atom (pseudo-)valence densities are the ``PP_RHOATOM`` tables that ld1.x writes into every
UPF file of the family (the densities pw.x superposes for its starting guess). With
ρ_i^0(r) = PP_RHOATOM(r) / (4π r²) summed over periodic images, the weight of atom i is
w_i(r) = ρ_i^0(r) / Σ_j ρ_j^0(r) and, with ρ the valence electron density (electrons / volume),

    q_i = Z_i − ∫ w_i ρ d³r,      p_i = −∫ w_i ρ (r − R_i) d³r    (e, e·Å; R_i the nearest image).

The free-atom densities are taken as zero beyond :data:`CUTOFF` (and a promolecular density below
:data:`FLOOR` carries no weight); density there — the diffuse tail of an anion or an electron spread
over a charged cell's vacuum — belongs wholly to the nearest atom (minimum image), the limit of the
Hirshfeld weights far from every atom. Every grid point is thus assigned, and Σ q_i equals the total
charge Q because ρ integrates to the valence electron count.
"""

from __future__ import annotations

import re

import numpy as np
from aiida import orm
from aiida.engine import calcfunction

from aiida_emlip import schema

#: pp.x input for the valence electron density as a 3D cube file.
PP_DENSITY_PARAMETERS = {"INPUTPP": {"plot_num": 0}, "PLOT": {"iflag": 3}}
#: Radius (Å) beyond which free-atom densities are taken as zero.
CUTOFF = 6.0
#: Floor of the promolecular density (electrons/bohr³) below which grid points carry no weight.
FLOOR = 1e-12

_FLOAT_BLOCK = r"<{tag}[^>]*>(.*?)</{tag}>"


def radial_density(upf_text: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (r in bohr, ρ(r) in electrons/bohr³) of the free atom from a UPF v2 file."""
    values = {}
    for tag in ("PP_R", "PP_RHOATOM"):
        match = re.search(_FLOAT_BLOCK.format(tag=tag), upf_text, re.DOTALL)
        if match is None:
            raise ValueError(f"UPF file has no <{tag}> block")
        values[tag] = np.array(match.group(1).split(), dtype=float)
    r, rho_r2 = values["PP_R"], values["PP_RHOATOM"]
    n = min(len(r), len(rho_r2))
    r, rho_r2 = r[:n], rho_r2[:n]
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(r > 1e-8, rho_r2 / (4 * np.pi * r**2), 0.0)
    if r[0] <= 1e-8 and n > 1:
        rho[0] = rho[1]
    return r, rho


def hirshfeld(
    density: np.ndarray,
    cell: np.ndarray,
    positions: np.ndarray,
    symbols: list[str],
    free_atoms: dict[str, tuple[np.ndarray, np.ndarray]],
    z_valence: dict[str, float],
    n_electrons: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Return Hirshfeld charges (e) and atomic dipoles (e·Å) on the periodic grid ``density``.

    ``density`` (electrons/bohr³, shape nx×ny×nz over the cell), ``cell`` and ``positions`` in Å;
    ``free_atoms`` maps a symbol to (r in bohr, ρ in electrons/bohr³). The density is rescaled to
    integrate to ``n_electrons``.
    """
    bohr = schema.BOHR_IN_A
    volume = abs(np.linalg.det(cell))
    rho = density.reshape(-1).astype(float)
    dv = volume / rho.size / bohr**3  # bohr³ per point
    rho = rho * (n_electrons / (rho.sum() * dv))
    heights = volume / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    shape = np.array(density.shape)
    n_atoms = len(symbols)
    weights = np.zeros((n_atoms, rho.size))
    moments = np.zeros((n_atoms, rho.size, 3))
    fractional = np.linalg.solve(cell.T, np.asarray(positions, dtype=float).T).T
    for i, symbol in enumerate(symbols):
        r_grid, rho_free = free_atoms[symbol]
        # every grid point of every periodic image within CUTOFF: the unwrapped grid indices of the box
        # around the atom (each index is one grid point in one image), wrapped for the accumulation
        low = np.floor((fractional[i] - CUTOFF / heights) * shape).astype(int)
        high = np.ceil((fractional[i] + CUTOFF / heights) * shape).astype(int)
        index = np.stack(
            np.meshgrid(*[np.arange(lo, hi + 1) for lo, hi in zip(low, high)], indexing="ij"), axis=-1
        ).reshape(-1, 3)
        delta = (index / shape) @ cell - positions[i]  # Å
        dist = np.linalg.norm(delta, axis=1)
        near = dist < CUTOFF
        wrapped = np.ravel_multi_index(tuple((index[near] % shape).T), tuple(shape))
        value = np.interp(dist[near] / bohr, r_grid, rho_free, right=0.0)
        weights[i] = np.bincount(wrapped, value, minlength=rho.size)
        for axis in range(3):
            moments[i, :, axis] = np.bincount(wrapped, value * delta[near, axis], minlength=rho.size)
    total = weights.sum(axis=0)
    valid = total > FLOOR
    share = np.zeros_like(weights)
    share[:, valid] = weights[:, valid] / total[valid]
    electrons = share @ rho * dv
    charges = np.array([z_valence[s] for s in symbols]) - electrons
    dipoles = np.zeros((n_atoms, 3))
    for i in range(n_atoms):
        # −∫ w_i ρ (r − R_i^image): each image's displacement weighted by its share of ρ_i^0
        with np.errstate(divide="ignore", invalid="ignore"):
            mean_delta = np.where(weights[i][:, None] > 0, moments[i] / weights[i][:, None], 0.0)
        dipoles[i] = -(share[i] * rho)[None, :] @ mean_delta * dv
    orphans = np.nonzero(~valid)[0]
    if orphans.size:
        electrons_far, dipoles_far = _nearest_atom(orphans, rho[orphans] * dv, shape, cell, fractional)
        charges -= electrons_far
        dipoles += dipoles_far
    return charges, dipoles


def _nearest_atom(
    points: np.ndarray, electrons: np.ndarray, shape: np.ndarray, cell: np.ndarray, fractional: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Electrons and dipoles (−Σ n (r − R_i)) of the grid ``points`` (flat indices, ``electrons`` on
    each) given to the nearest atom, minimum image by wrapping fractional offsets; in chunks."""
    n_atoms = len(fractional)
    count, moment = np.zeros(n_atoms), np.zeros((n_atoms, 3))
    for start in range(0, points.size, 20000):
        chunk = slice(start, start + 20000)
        grid = np.stack(np.unravel_index(points[chunk], tuple(shape)), axis=1) / shape
        offset = grid[:, None, :] - fractional[None, :, :]
        offset -= np.round(offset)
        delta = offset @ cell  # Å, [points, atoms, 3]
        nearest = np.linalg.norm(delta, axis=2).argmin(axis=1)
        mine = delta[np.arange(nearest.size), nearest]
        count += np.bincount(nearest, electrons[chunk], minlength=n_atoms)
        for axis in range(3):
            moment[:, axis] += np.bincount(nearest, electrons[chunk] * mine[:, axis], minlength=n_atoms)
    return count, -moment


@calcfunction
def hirshfeld_multipoles(
    density: orm.ArrayData, structure: orm.StructureData, settings: orm.Dict, **pseudos: orm.Data
) -> orm.ArrayData:
    """Hirshfeld charges and atomic dipoles from pp.x's density cube and the family's UPF files.

    ``settings`` holds ``n_electrons``; ``pseudos`` maps element symbols to ``UpfData``.
    """
    atoms = structure.get_ase()
    symbols = atoms.get_chemical_symbols()
    free = {el: radial_density(node.get_content()) for el, node in pseudos.items()}
    z_valence = {el: float(node.z_valence) for el, node in pseudos.items()}
    charges, dipoles = hirshfeld(
        density.get_array("data"),
        np.asarray(atoms.cell[:], dtype=float),
        atoms.positions,
        symbols,
        free,
        z_valence,
        float(settings["n_electrons"]),
    )
    out = orm.ArrayData()
    out.set_array("charges", charges)
    out.set_array("dipoles", dipoles)
    return out
