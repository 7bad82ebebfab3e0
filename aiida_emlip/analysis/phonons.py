"""Phonons with phonopy (pure: phonopy, ASE and NumPy; no AiiDA).

The workchain and the tests use these steps:

1. :func:`choose_supercell` / :func:`build_displacements`: the supercell (diagonal, each perpendicular
   width at least a minimum length, or explicit) and phonopy's symmetry-reduced displacements, as a
   JSON-able *setup* plus the displaced supercells (ASE ``Atoms``);
2. :func:`phonon_from_forces`: force constants from the forces of every displaced supercell (optionally
   minus those of the undisplaced one), with the non-analytical correction (NAC) from Born charges and
   ε∞ (:func:`nac_parameters`);
3. :func:`band_path`, :func:`band_structure`, :func:`total_dos`, :func:`gamma_frequencies`: frequencies
   (THz) along the standard path of the primitive cell (ASE's Setyawan–Curtarolo path, which handles any
   setting of the cell), the density of states on a mesh, and Γ with and without the NAC (LO–TO);
4. :func:`frequency_rmse`, :func:`net_forces`, :func:`acoustic_residual`: the comparison numbers;
5. :func:`parse_ph_dielectric`: ε∞ and Born charges from a ph.x (``epsil = .true.``) output.

Units: Å, eV, eV/Å, atomic mass units; frequencies in THz (phonopy's default for these units);
Born charges in e with ``Z*[i, α, β] = ∂F_iβ/∂E_α`` (the first index is the field, as in phonopy's BORN
file and ph.x's "d Force / dE" blocks).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
from ase import Atoms
from ase.dft.kpoints import parse_path_string
from phonopy import Phonopy
from phonopy.structure.atoms import PhonopyAtoms
from phonopy.structure.symmetry import symmetrize_borns_and_epsilon

#: THz to cm⁻¹.
THZ_TO_CM1 = 33.35641
#: phonopy's NAC unit factor for eV and Å (Hartree × Bohr in eV·Å).
NAC_FACTOR = 14.399652
DEFAULT_SYMPREC = 1e-5


# ----------------------------------------------------------------------------- cells


def perpendicular_widths(cell: np.ndarray) -> np.ndarray:
    """Distances between opposite faces of the cell (Å): ``V / |a_j × a_k|`` for each lattice vector i."""
    cell = np.asarray(cell, dtype=float)
    volume = abs(np.linalg.det(cell))
    return np.array(
        [volume / np.linalg.norm(np.cross(cell[(i + 1) % 3], cell[(i + 2) % 3])) for i in range(3)]
    )


def supercell_widths(cell: np.ndarray, supercell_matrix: Any) -> np.ndarray:
    """Perpendicular widths (Å) of the supercell ``supercell_matrix @ cell``."""
    return perpendicular_widths(_matrix(supercell_matrix) @ np.asarray(cell, dtype=float))


def choose_supercell(cell: np.ndarray, min_length: float) -> list[int]:
    """Smallest diagonal repeat whose perpendicular widths are all at least ``min_length`` Å."""
    widths = perpendicular_widths(cell)
    return [max(1, math.ceil(min_length / w - 1e-9)) for w in widths]


def _matrix(supercell_matrix: Any) -> np.ndarray:
    matrix = np.asarray(supercell_matrix, dtype=int)
    if matrix.shape == (3,):
        matrix = np.diag(matrix)
    if matrix.shape != (3, 3) or round(abs(np.linalg.det(matrix))) < 1:
        raise ValueError(
            "supercell must be three repeats or a 3×3 integer matrix of non-zero determinant, "
            f"got {supercell_matrix}"
        )
    return matrix


def to_phonopy_atoms(atoms: Atoms) -> PhonopyAtoms:
    return PhonopyAtoms(
        symbols=atoms.get_chemical_symbols(),
        cell=np.asarray(atoms.cell.array, dtype=float),
        scaled_positions=atoms.get_scaled_positions(wrap=False),
    )


def to_ase(atoms: PhonopyAtoms) -> Atoms:
    return Atoms(
        symbols=list(atoms.symbols),
        cell=np.asarray(atoms.cell),
        scaled_positions=atoms.scaled_positions,
        pbc=True,
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------- displacements


def build_displacements(
    atoms: Atoms,
    supercell_matrix: Any,
    distance: float = 0.01,
    plusminus: bool | str = "auto",
    reference: bool = False,
    symprec: float = DEFAULT_SYMPREC,
) -> tuple[dict[str, Any], list[Atoms]]:
    """phonopy's displacements of ``atoms`` (the unit cell) in ``supercell_matrix``.

    Returns the JSON-able *setup* (everything :func:`phonopy_from_setup` needs) and the supercells to
    compute, the undisplaced supercell first when ``reference`` (its forces are subtracted: residual
    forces of a geometry that is not exactly at equilibrium, or of an imperfect SCF).
    """
    matrix = _matrix(supercell_matrix)
    phonon = Phonopy(
        to_phonopy_atoms(atoms), supercell_matrix=matrix, primitive_matrix="auto", symprec=symprec
    )
    phonon.generate_displacements(distance=distance, is_plusminus=plusminus)
    supercells = [to_ase(s) for s in phonon.supercells_with_displacements]
    if reference:
        supercells.insert(0, to_ase(phonon.supercell))
    setup = {
        "unitcell": {
            "symbols": atoms.get_chemical_symbols(),
            "cell": np.asarray(atoms.cell.array, dtype=float).tolist(),
            "scaled_positions": atoms.get_scaled_positions(wrap=False).tolist(),
        },
        "supercell_matrix": matrix.tolist(),
        "primitive_matrix": np.asarray(phonon.primitive_matrix, dtype=float).tolist(),
        "symprec": symprec,
        "distance": distance,
        "plusminus": plusminus,
        "reference": bool(reference),
        "dataset": _jsonable(phonon.dataset),
        "n_supercell_atoms": len(phonon.supercell),
        "n_primitive_atoms": len(phonon.primitive),
        "supercell_widths": supercell_widths(atoms.cell.array, matrix).tolist(),
    }
    return setup, supercells


def unitcell_of(setup: dict[str, Any]) -> Atoms:
    """The unit cell of a setup as ASE ``Atoms``."""
    cell = setup["unitcell"]
    return Atoms(cell["symbols"], cell=cell["cell"], scaled_positions=cell["scaled_positions"], pbc=True)


def primitive_of(setup: dict[str, Any]) -> Atoms:
    """phonopy's primitive cell of a setup as ASE ``Atoms``."""
    return to_ase(phonopy_from_setup(setup).primitive)


def phonopy_from_setup(setup: dict[str, Any]) -> Phonopy:
    """A :class:`Phonopy` object with the setup's cells and displacement dataset (no forces yet)."""
    phonon = Phonopy(
        to_phonopy_atoms(unitcell_of(setup)),
        supercell_matrix=np.asarray(setup["supercell_matrix"], dtype=int),
        primitive_matrix=np.asarray(setup["primitive_matrix"], dtype=float),
        symprec=float(setup["symprec"]),
    )
    dataset = dict(setup["dataset"])
    dataset["first_atoms"] = [
        {**entry, "displacement": np.asarray(entry["displacement"], dtype=float)}
        for entry in dataset["first_atoms"]
    ]
    phonon.dataset = dataset
    return phonon


def n_displacements(setup: dict[str, Any]) -> int:
    return len(setup["dataset"]["first_atoms"])


# ----------------------------------------------------------------------------- force constants


def net_forces(forces: list[np.ndarray]) -> float:
    """Largest ``|Σ_i F_i|`` (eV/Å) over the supercells: zero for a translation-invariant force field."""
    return float(max(np.abs(np.asarray(f, dtype=float).sum(axis=0)).max() for f in forces))


def nac_parameters(
    setup: dict[str, Any], born: np.ndarray, epsilon: np.ndarray, symmetrize: bool = True
) -> dict[str, Any]:
    """phonopy's ``nac_params`` for the primitive cell from Born charges of the *unit cell* and ε∞.

    With ``symmetrize`` the tensors are symmetrised by the crystal's point group (and the sum rule of
    the Born charges imposed), as phonopy does with a BORN file.
    """
    phonon = phonopy_from_setup(setup)
    borns, eps = symmetrize_borns_and_epsilon(
        np.asarray(born, dtype=float),
        np.asarray(epsilon, dtype=float),
        phonon.unitcell,
        primitive=phonon.primitive,
        supercell_matrix=phonon.supercell_matrix,
        symprec=float(setup["symprec"]),
        is_symmetry=symmetrize,
    )
    return {"born": np.asarray(borns), "dielectric": np.asarray(eps), "factor": NAC_FACTOR}


def phonon_from_forces(
    setup: dict[str, Any],
    forces: list[np.ndarray],
    nac: dict[str, Any] | None = None,
    symmetrize: bool = True,
) -> Phonopy:
    """Force constants from the forces (eV/Å) of the setup's supercells, in their order.

    With ``setup['reference']`` the first entry is the undisplaced supercell, whose forces are
    subtracted from every other. ``symmetrize`` imposes the translational sum rule and index symmetry
    on the force constants (phonopy's ``symmetrize_force_constants``).
    """
    phonon = phonopy_from_setup(setup)
    arrays = [np.asarray(f, dtype=float) for f in forces]
    expected = n_displacements(setup) + (1 if setup.get("reference") else 0)
    if len(arrays) != expected:
        raise ValueError(f"{len(arrays)} force sets for {expected} supercells")
    if setup.get("reference"):
        residual, arrays = arrays[0], arrays[1:]
        arrays = [f - residual for f in arrays]
    phonon.forces = np.stack(arrays)
    phonon.produce_force_constants()
    if symmetrize:
        phonon.symmetrize_force_constants()
    if nac is not None:
        phonon.nac_params = nac
    return phonon


# ----------------------------------------------------------------------------- band structure, DOS, Γ


def _label(name: str) -> str:
    return "Γ" if name == "G" else name


def band_path(setup: dict[str, Any], npoints: int = 51) -> dict[str, Any]:
    """The standard path of the primitive cell (ASE's ``Cell.bandpath``) as phonopy segments.

    ``npoints`` points on the longest segment, the others in proportion to their length (at least 2).
    Returns ``segments`` (reduced q-points of each straight segment), ``labels`` (start, end),
    ``distances`` (cumulative path length, 1/Å including 2π) and ``breaks`` (segment i ends a connected
    piece of the path).
    """
    primitive = primitive_of(setup)
    path = primitive.cell.bandpath(npoints=0)
    special = path.special_points
    reciprocal = 2 * np.pi * np.linalg.inv(primitive.cell.array).T
    pairs, breaks = [], []
    for piece in parse_path_string(path.path):
        for k in range(len(piece) - 1):
            pairs.append((piece[k], piece[k + 1]))
            breaks.append(k == len(piece) - 2)
    lengths = [
        np.linalg.norm((np.asarray(special[b]) - np.asarray(special[a])) @ reciprocal) for a, b in pairs
    ]
    longest = max(lengths)
    segments, distances, labels = [], [], []
    start = 0.0
    for (a, b), length in zip(pairs, lengths):
        n = max(2, round(npoints * length / longest))
        t = np.linspace(0.0, 1.0, n)
        qa, qb = np.asarray(special[a], dtype=float), np.asarray(special[b], dtype=float)
        segments.append((qa[None, :] + t[:, None] * (qb - qa)[None, :]).tolist())
        distances.append((start + t * length).tolist())
        labels.append([_label(a), _label(b)])
        start += length
    return {
        "segments": segments,
        "labels": labels,
        "distances": distances,
        "breaks": breaks,
        "path": path.path,
    }


def band_structure(phonon: Phonopy, path: dict[str, Any]) -> list[list[list[float]]]:
    """Frequencies (THz) [segment][q][branch] along ``path`` (:func:`band_path`); NAC when set.

    At Γ inside a segment phonopy takes the direction of approach along the path for the NAC.
    """
    phonon.run_band_structure([np.asarray(s) for s in path["segments"]], is_legacy_plot=False)
    return [np.asarray(f).tolist() for f in phonon.get_band_structure_dict()["frequencies"]]


def total_dos(phonon: Phonopy, mesh: Any, sigma: float | None = None) -> dict[str, list[float]]:
    """Total phonon DOS (states/THz per primitive cell) on a Γ-centred ``mesh``; NAC when set."""
    phonon.run_mesh(mesh, is_gamma_center=True)
    phonon.run_total_dos(sigma=sigma)
    dos = phonon.get_total_dos_dict()
    return {
        "frequency_points": np.asarray(dos["frequency_points"]).tolist(),
        "total_dos": np.asarray(dos["total_dos"]).tolist(),
    }


def gamma_frequencies(phonon: Phonopy, direction: Any = (1.0, 0.0, 0.0)) -> dict[str, Any]:
    """Γ frequencies (THz): ``analytic`` (q = 0, no NAC) and, with NAC, ``nac`` for q → 0 along ``direction``.

    ``direction`` is in reduced coordinates of the primitive reciprocal lattice. ``lo_to_splitting``
    is the highest NAC frequency minus the highest analytic one (ω_LO − ω_TO of the top polar mode;
    0 without NAC).
    """
    nac = phonon.nac_params
    phonon.nac_params = None
    phonon.run_qpoints([[0.0, 0.0, 0.0]])
    analytic = np.asarray(phonon.get_qpoints_dict()["frequencies"][0])
    result: dict[str, Any] = {"analytic": analytic.tolist(), "nac": None, "lo_to_splitting": 0.0}
    if nac is not None:
        phonon.nac_params = nac
        phonon.run_qpoints([[0.0, 0.0, 0.0]], nac_q_direction=np.asarray(direction, dtype=float))
        corrected = np.asarray(phonon.get_qpoints_dict()["frequencies"][0])
        result["nac"] = corrected.tolist()
        result["lo_to_splitting"] = float(corrected.max() - analytic.max())
        result["direction"] = list(map(float, direction))
    return result


def acoustic_residual(phonon: Phonopy) -> float:
    """Largest ``|ω|`` (THz) of the three lowest modes at Γ without NAC: zero when the sum rule holds."""
    nac = phonon.nac_params
    phonon.nac_params = None
    phonon.run_qpoints([[0.0, 0.0, 0.0]])
    frequencies = np.asarray(phonon.get_qpoints_dict()["frequencies"][0])
    phonon.nac_params = nac
    return float(np.abs(np.sort(np.abs(frequencies))[:3]).max())


def frequency_rmse(bands: list, reference: list) -> float:
    """RMSE (THz) between two band structures on the same path (sorted branches at every q)."""
    a = np.concatenate([np.asarray(s, dtype=float) for s in bands])
    b = np.concatenate([np.asarray(s, dtype=float) for s in reference])
    if a.shape != b.shape:
        raise ValueError(f"band structures of shapes {a.shape} and {b.shape} cannot be compared")
    return float(np.sqrt(np.mean((a - b) ** 2)))


# ----------------------------------------------------------------------------- comparison

#: Settings of :func:`analyse` and their defaults.
ANALYSIS_DEFAULTS = {
    "band_points": 51,
    "dos_mesh": [16, 16, 16],
    "nac_direction": [1.0, 0.0, 0.0],
    "symmetrize_force_constants": True,
}
REFERENCE = "dft"


def analyse_method(
    setup: dict[str, Any],
    forces: list[np.ndarray],
    path: dict[str, Any],
    settings: dict[str, Any],
    born: Any = None,
    epsilon: Any = None,
) -> dict[str, Any]:
    """Bands (without and with NAC), DOS, Γ frequencies and sum-rule residuals of one force set.

    ``born`` (unit-cell Z*, e) and ``epsilon`` (ε∞) switch the NAC on; without them the method has
    no LO–TO splitting. ``acoustic_residual`` is measured before the force constants are symmetrised.
    """
    settings = {**ANALYSIS_DEFAULTS, **settings}
    phonon = phonon_from_forces(setup, forces, symmetrize=False)
    entry: dict[str, Any] = {
        "max_net_force": net_forces(forces),
        "acoustic_residual": acoustic_residual(phonon),
        "nac": None,
        "bands_nac": None,
    }
    if settings["symmetrize_force_constants"]:
        phonon.symmetrize_force_constants()
    entry["bands"] = band_structure(phonon, path)
    if born is not None:
        eps = np.eye(3) if epsilon is None else np.asarray(epsilon, dtype=float)
        nac = nac_parameters(setup, np.asarray(born, dtype=float), eps)
        phonon.nac_params = nac
        entry["nac"] = {"born": nac["born"].tolist(), "epsilon": nac["dielectric"].tolist()}
        entry["bands_nac"] = band_structure(phonon, path)
    entry["gamma"] = gamma_frequencies(phonon, settings["nac_direction"])
    entry["dos"] = total_dos(phonon, settings["dos_mesh"])
    return entry


def compare(methods: dict[str, dict[str, Any]], reference: str = REFERENCE) -> dict[str, dict[str, Any]]:
    """One row per method against ``reference``: frequency RMSEs (THz), Γ frequencies, LO–TO, residuals.

    ``frequency_rmse`` compares the analytic bands (no NAC on either side: like for like);
    ``frequency_rmse_nac`` compares each method's best bands (with its NAC where it has one) with
    the reference's NAC bands, and is None when the reference has no NAC.
    """
    ref = methods[reference]
    rows = {}
    for name, entry in methods.items():
        row = {
            "gamma_frequencies": entry["gamma"]["analytic"],
            "gamma_frequencies_nac": entry["gamma"]["nac"],
            "lo_to_splitting": entry["gamma"]["lo_to_splitting"],
            "acoustic_residual": entry["acoustic_residual"],
            "max_net_force": entry["max_net_force"],
            "nac": entry["nac"] is not None,
        }
        if name != reference:
            row["frequency_rmse"] = frequency_rmse(entry["bands"], ref["bands"])
            best = entry["bands_nac"] if entry["bands_nac"] is not None else entry["bands"]
            row["frequency_rmse_nac"] = (
                frequency_rmse(best, ref["bands_nac"]) if ref["bands_nac"] is not None else None
            )
        rows[name] = row
    return rows


def analyse(
    setup: dict[str, Any], methods: dict[str, dict[str, Any]], settings: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Everything the workchain reports: path, per-method phonons and the comparison rows.

    ``methods`` maps a name (``dft`` is the reference) to ``{"forces": [...], "born": ..., "epsilon":
    ..., "notes": [...]}`` with the forces in the setup's supercell order.
    """
    settings = {**ANALYSIS_DEFAULTS, **(settings or {})}
    path = band_path(setup, int(settings["band_points"]))
    analysed = {}
    for name, method in methods.items():
        entry = analyse_method(
            setup, method["forces"], path, settings, method.get("born"), method.get("epsilon")
        )
        entry["notes"] = list(method.get("notes", []))
        analysed[name] = entry
    rows = compare(analysed) if REFERENCE in analysed else {}
    for name, row in rows.items():
        row["notes"] = analysed[name]["notes"]
    return {"unit": "THz", "path": path, "methods": analysed, "comparison": rows}


# ----------------------------------------------------------------------------- ph.x


_ROW = re.compile(r"\(\s*([-+\d.Ee]+)\s+([-+\d.Ee]+)\s+([-+\d.Ee]+)\s*\)")


def _rows(lines: list[str], start: int, count: int) -> tuple[list[list[float]], int]:
    rows, i = [], start
    while len(rows) < count and i < len(lines):
        match = _ROW.search(lines[i])
        if match:
            rows.append([float(x) for x in match.groups()])
        i += 1
    if len(rows) < count:
        raise ValueError("truncated tensor block in the ph.x output")
    return rows, i


def impose_charge_neutrality(born: Any) -> np.ndarray:
    """Born charges with the acoustic sum rule Σ_i Z*_i = 0 imposed (the mean subtracted, as ph.x does)."""
    born = np.asarray(born, dtype=float)
    return born - born.mean(axis=0)[None]


def _born_block(lines: list[str], start: int) -> list[list[list[float]]]:
    i, atoms = start, []
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("atom"):
            block, i = _rows(lines, i + 1, 3)
            atoms.append(block)
            continue
        if line:
            break
        i += 1
    return atoms


def parse_ph_dielectric(stdout: str) -> dict[str, Any]:
    """ε∞ and Born charges ``Z*[i, α, β] = ∂F_iβ/∂E_α`` (e) from a ph.x output with ``epsil = .true.``.

    ``born_charges_raw`` is the last "Effective charges (d Force / dE) in cartesian axis" block as
    printed (the rows of each atom are the field directions ``Ex``, ``Ey``, ``Ez``); ``born_charges``
    is the block "with asr applied" when ph.x printed one (newer versions), else the raw one with the
    sum rule imposed (:func:`impose_charge_neutrality`). ``asr_residual`` is max ``|Σ_i Z*_i|`` of the raw
    charges: how far the DFT itself is from the sum rule (cutoff and k-points).

    :raises ValueError: no dielectric tensor in the output.
    """
    lines = stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if "Dielectric constant in cartesian axis" in line]
    if not starts:
        raise ValueError("no dielectric constant in the ph.x output (epsil = .true. on an insulator?)")
    epsilon, _ = _rows(lines, starts[-1] + 1, 3)
    raw, corrected = None, None
    for i, line in enumerate(lines):
        if "Effective charges (d Force / dE) in cartesian axis" not in line:
            continue
        block = _born_block(lines, i + 1)
        if "with asr" in line.lower():
            corrected = block
        else:
            raw = block
    result: dict[str, Any] = {"epsilon": epsilon, "born_charges": None, "born_charges_raw": raw}
    if raw:
        result["asr_residual"] = float(np.abs(np.asarray(raw, dtype=float).sum(axis=0)).max())
    if corrected:
        result["born_charges"] = corrected
    elif raw:
        result["born_charges"] = impose_charge_neutrality(raw).tolist()
    return result
