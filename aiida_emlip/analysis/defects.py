r"""Charged vacancies: energies, finite-size correction, transition levels, formation energies, Δq profiles.

Pure NumPy/ASE (no AiiDA): the defect workchain calls it through calcfunctions, and it can be used on
any DFT or model numbers. Units eV, Å, e. Conventions, the same for DFT and for every model:

* ``E(q)`` is the total energy of the vacancy supercell in charge state q with a uniform neutralising
  background (pw.x ``tot_charge``; the models' k = 0-excluded Ewald convention), ``E_host`` that of
  the pristine supercell at the same geometry; ``ΔE(q) = E(q) − E(0)``.
* Finite-size correction ``E_corr(q)``: Freysoldt's scheme when DFT's planar-averaged potentials are
  given (:mod:`aiida_emlip.analysis.defect_correction`: one lattice term for every method, each
  method's own potential alignment, so a model whose charges misplace the defect's potential shows
  it in its levels). Without them, the first-order point-charge (Makov–Payne / Leslie–Gillan) term
  ``−E_M(q)/ε`` with ``E_M(q)`` the Ewald energy of a point charge q in the supercell with its
  neutralising background (``−q²α_M k_e/2L`` for a cube; exact for point charges with ε = 1), the
  same for DFT and every model.
* Formation energy ``E_f(q, E_F) = E(q) − E_host + μ_X + q (E_VBM + E_F) + E_corr(q)``, E_F measured
  from the VBM (a vacancy removes one atom of chemical potential μ_X). E_VBM comes from DFT and serves
  the models too (a model has no band edges).
* Transition level ``ε(q/q') = [E_f(q', 0) − E_f(q, 0)] / (q − q')`` for adjacent charge states q > q',
  relative to the VBM.
* Charge profile: ``Δq_j = q_j(vacancy, q) − q_j(pristine)`` of every remaining atom against its
  minimum-image distance from the vacant site, summed per shell of equal distance. Sum rule:
  ``Σ_j Δq_j = q + q_X`` with q_X the pristine charge of the removed atom.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ase import Atoms
from ase.geometry import find_mic
from scipy.special import erfc

from aiida_emlip import schema
from aiida_emlip.structures.defects import perpendicular_widths

from . import defect_correction

#: Madelung constant of a point charge in a simple-cubic lattice with a neutralising background.
MADELUNG_SIMPLE_CUBIC = 2.8372974794806
#: Keys of per-atom model or DFT charges, in order of preference.
CHARGE_KEYS = (schema.CHARGES, schema.LOWDIN_CHARGES, "charges")


def charge_label(q: float) -> str:
    """``"0"``, ``"+1"``, ``"-2"``: the key of a charge state in every output dict."""
    value = round(q)
    return "0" if value == 0 else f"{value:+d}"


def level_label(q: float, q_prime: float) -> str:
    """``"+1/0"``: the key of the transition level ε(q/q')."""
    return f"{charge_label(q)}/{charge_label(q_prime)}"


# ------------------------------------------------------------------------------------ electrostatics


def ewald_energy(
    cell: np.ndarray, positions: np.ndarray, charges: Sequence[float], accuracy: float = 1e-12
) -> float:
    """Coulomb energy (eV) of periodic point charges with a neutralising background (tin-foil, k = 0 out).

    ``E = E_real + E_recip + E_self + E_background`` (the background term −πQ²/2Vα² makes a charged
    cell's energy independent of the splitting α). An implementation independent of torch-pme.
    """
    cell = np.asarray(cell, dtype=float)
    positions = np.asarray(positions, dtype=float).reshape(-1, 3)
    q = np.asarray(charges, dtype=float).reshape(-1)
    volume = abs(float(np.linalg.det(cell)))
    alpha = math.sqrt(math.pi) * (max(len(q), 1) / volume**2) ** (1.0 / 6.0)
    p = math.sqrt(-math.log(accuracy))
    r_cut, k_cut = p / alpha, 2.0 * alpha * p
    reps = [math.ceil(r_cut / w) for w in perpendicular_widths(cell)]
    grid = np.array(np.meshgrid(*[np.arange(-n, n + 1) for n in reps], indexing="ij")).reshape(3, -1).T
    shifts = grid @ cell
    diff = positions[:, None, :] - positions[None, :, :]
    qq = q[:, None] * q[None, :]
    e_real = 0.0
    for shift in shifts:
        r = np.linalg.norm(diff + shift, axis=-1)
        mask = (r > 1e-10) & (r < r_cut)
        e_real += 0.5 * float(np.sum(qq[mask] * erfc(alpha * r[mask]) / r[mask]))
    recip = 2.0 * math.pi * np.linalg.inv(cell).T
    mmax = [math.ceil(k_cut * np.linalg.norm(cell[i]) / (2.0 * math.pi)) for i in range(3)]
    mgrid = np.array(np.meshgrid(*[np.arange(-m, m + 1) for m in mmax], indexing="ij")).reshape(3, -1).T
    kvec = mgrid @ recip
    k2 = np.einsum("ij,ij->i", kvec, kvec)
    keep = (k2 > 1e-12) & (k2 <= k_cut**2)
    kvec, k2 = kvec[keep], k2[keep]
    phase = kvec @ positions.T
    structure = np.cos(phase) @ q + 1j * (np.sin(phase) @ q)
    e_recip = (2.0 * math.pi / volume) * float(
        np.sum(np.exp(-k2 / (4 * alpha**2)) / k2 * np.abs(structure) ** 2)
    )
    e_self = -alpha / math.sqrt(math.pi) * float(np.sum(q * q))
    e_background = -math.pi * float(q.sum()) ** 2 / (2.0 * volume * alpha**2)
    return schema.COULOMB_CONSTANT * (e_real + e_recip + e_self + e_background)


def madelung_energy(cell: np.ndarray, charge: float) -> float:
    """Energy (eV) of one point charge in the periodic cell with its neutralising background (< 0)."""
    return ewald_energy(cell, np.zeros((1, 3)), [charge])


def point_charge_correction(cell: np.ndarray, charge: float, dielectric_constant: float = 1.0) -> float:
    """First-order Makov–Payne correction ``−E_M(q)/ε`` (eV), added to E(q) to reach the dilute limit."""
    if dielectric_constant <= 0:
        raise ValueError(f"dielectric constant must be positive, got {dielectric_constant}")
    if charge == 0:
        return 0.0
    return -madelung_energy(cell, charge) / dielectric_constant


def _axes(profiles: Mapping[Any, Sequence[float]]) -> dict[int, Sequence[float]]:
    return {int(axis): values for axis, values in profiles.items()}


def method_corrections(
    reference: Mapping[str, Any],
    models: Mapping[str, Mapping[str, Any]],
    setup: Mapping[str, Any],
    charges: Sequence[float],
) -> tuple[dict[str, dict[float, float]], dict[str, Any], dict[str, dict[str, Any]]]:
    """Finite-size corrections of DFT and every model: (totals by method, scheme info, breakdowns).

    Freysoldt (:mod:`aiida_emlip.analysis.defect_correction`) when ``setup["potentials"]`` holds DFT's
    planar-averaged potentials of the pristine cell (``host``) and of every charged state
    (``defects``: {q: {axis: profile}}); models use their own charges' potential (widths
    ``setup["sigmas"][label]``, Å, point charges when absent), a flat one without charges. Otherwise
    the point-charge (Makov–Payne) term, the same for every method.
    """
    cell = np.asarray(setup["cell"], dtype=float)
    eps = float(setup.get("dielectric_constant", 1.0))
    methods = ["dft", *models]
    potentials = setup.get("potentials") or {}
    host = potentials.get("host")
    defects = {float(q): _axes(v) for q, v in (potentials.get("defects") or {}).items()}
    missing = [charge_label(q) for q in charges if q != 0 and q not in defects]
    if host is None or missing:
        values = {q: point_charge_correction(cell, q, eps) for q in charges}
        reason = "no DFT potentials" if host is None else f"no DFT potential for q = {', '.join(missing)}"
        info = {
            "scheme": "point charge (Makov-Payne first order, Ewald), no potential alignment",
            "reason": reason,
            "values": {charge_label(q): values[q] for q in charges},
        }
        breakdown = {charge_label(q): {"total": values[q]} for q in charges}
        return {m: dict(values) for m in methods}, info, {m: breakdown for m in methods}
    host = _axes(host)
    grid = [len(host[axis]) for axis in range(3)]
    site = np.asarray(setup["pristine_positions"], dtype=float)[int(setup["site"])]
    fractional = np.linalg.solve(cell.T, site) % 1.0
    per_method = {"dft": (host, defects)}
    sigmas = setup.get("sigmas") or {}
    for label, frames in models.items():
        sigma = float(sigmas.get(label, 0.0))
        model_host = defect_correction.model_potentials(frames["host"], sigma, grid)
        if model_host is None:
            flat = defect_correction.flat_potentials(grid)
            per_method[label] = (flat, {q: flat for q in frames["defects"]})
            continue
        model_defects = {}
        for q, atoms in frames["defects"].items():
            own = defect_correction.model_potentials(atoms, sigma, grid)
            model_defects[q] = own if own is not None else defect_correction.flat_potentials(grid)
        per_method[label] = (model_host, model_defects)
    totals, breakdown = {}, {}
    for method, (method_host, method_defects) in per_method.items():
        states = [q for q in charges if q == 0 or q in method_defects]
        result = defect_correction.state_corrections(
            cell, states, eps, fractional, method_host, method_defects
        )
        totals[method] = {q: r["total"] for q, r in result.items()}
        breakdown[method] = {charge_label(q): r for q, r in result.items()}
    info = {
        "scheme": defect_correction.SCHEME,
        "model_charge_beta_bohr": defect_correction.MODEL_CHARGE_BETA,
        "lattice": {
            charge_label(q): breakdown["dft"][charge_label(q)]["lattice"]
            for q in charges
            if charge_label(q) in breakdown["dft"]
        },
        "values": {k: v["total"] for k, v in breakdown["dft"].items()},
        "grid": grid,
    }
    return totals, info, breakdown


# ------------------------------------------------------------------------------------ energetics


def chemical_potential(
    element: str,
    host_symbols: Sequence[str],
    host_energy: float,
    given: Mapping[str, float] | None = None,
    free_atom_energy: float | None = None,
) -> tuple[float, str]:
    """Return (μ of ``element`` in eV/atom, how it was chosen).

    ``given[element]`` if present; else, when every other host element has a given μ, the host's
    equilibrium ``Σ_j N_j μ_j = E_host``; else ``free_atom_energy`` (the isolated pseudo-atom: the
    vacancy's atom goes to vacuum); else the host energy per atom (an equal share, which satisfies the
    host's equilibrium: a reference point, not a growth condition).
    """
    given = dict(given or {})
    symbols = list(host_symbols)
    if element in given:
        return float(given[element]), "given"
    others = sorted(set(symbols) - {element})
    if others and all(el in given for el in others):
        rest = sum(symbols.count(el) * float(given[el]) for el in others)
        how = "host equilibrium with the given μ of " + ", ".join(others)
        return (host_energy - rest) / symbols.count(element), how
    if free_atom_energy is not None:
        return float(free_atom_energy), "free atom (pseudopotential total energy)"
    return host_energy / len(symbols), "host energy per atom"


def transition_levels(formation_at_vbm: Mapping[float, float]) -> dict[str, float]:
    """ε(q/q') (eV above the VBM) of adjacent charge states q > q' from E_f(q, E_F = 0)."""
    charges = sorted(formation_at_vbm, reverse=True)
    return {
        level_label(q1, q2): (formation_at_vbm[q2] - formation_at_vbm[q1]) / (q1 - q2)
        for q1, q2 in itertools.pairwise(charges)
    }


def formation_lines(
    formation_at_vbm: Mapping[float, float], gap: float, n_points: int = 201
) -> dict[str, Any]:
    """E_f(q, E_F) on a grid of E_F over [0, gap] for every q, and the lowest (stable) one."""
    fermi = np.linspace(0.0, max(gap, 1e-6), n_points)
    charges = sorted(formation_at_vbm)
    lines = np.array([formation_at_vbm[q] + q * fermi for q in charges])
    lowest = lines.min(axis=0)
    stable = [charge_label(charges[i]) for i in lines.argmin(axis=0)]
    return {"fermi_level": fermi.tolist(), "lowest": lowest.tolist(), "stable_charge": stable}


def energetics(
    defect_energies: Mapping[float, float],
    host_energy: float,
    corrections: Mapping[float, float],
    mu: float,
    vbm: float,
) -> dict[str, Any]:
    """ΔE(q), corrected ΔE(q), E(q) − E_host, E_f(q, E_F = 0) and transition levels of one method."""
    charges = sorted(defect_energies)
    relative = {q: defect_energies[q] - host_energy for q in charges}
    formation = {q: relative[q] + mu + q * vbm + corrections[q] for q in charges}
    out: dict[str, Any] = {
        "energy": {charge_label(q): defect_energies[q] for q in charges},
        "host_energy": host_energy,
        "relative_energy": {charge_label(q): relative[q] for q in charges},
        "formation_energy_vbm": {charge_label(q): formation[q] for q in charges},
        "transition_levels": transition_levels(formation),
    }
    if 0 in defect_energies:
        e0 = defect_energies[0]
        out["delta_e"] = {charge_label(q): defect_energies[q] - e0 for q in charges}
        out["corrected_delta_e"] = {
            charge_label(q): defect_energies[q] + corrections[q] - e0 for q in charges
        }
    else:
        out["delta_e"] = {}
        out["corrected_delta_e"] = {}
    return out


# ------------------------------------------------------------------------------------ charge profiles


def radial_profile(
    cell: np.ndarray,
    pristine_positions: np.ndarray,
    site: int,
    pristine_charges: Sequence[float],
    defect_charges: Sequence[float],
    shell_tolerance: float = 0.1,
) -> dict[str, Any]:
    """Δq of every atom left in the vacancy cell against its distance from the vacant site, per shell.

    ``defect_charges`` follow the pristine order without ``site``. Shells group distances within
    ``shell_tolerance`` Å of the shell's first (smallest) distance.
    """
    positions = np.asarray(pristine_positions, dtype=float)
    q0 = np.asarray(pristine_charges, dtype=float)
    q1 = np.asarray(defect_charges, dtype=float)
    if len(q0) != len(positions) or len(q1) != len(positions) - 1:
        raise ValueError(
            f"charges do not match the cells: {len(q0)} pristine, {len(q1)} defect, {len(positions)} sites"
        )
    others = np.delete(np.arange(len(positions)), site)
    _, distances = find_mic(positions[others] - positions[site], cell, pbc=True)
    delta = q1 - q0[others]
    order = np.argsort(distances, kind="stable")
    radius, count, total = [], [], []
    for i in order:
        if radius and distances[i] - radius[-1] <= shell_tolerance:
            count[-1] += 1
            total[-1] += float(delta[i])
            continue
        radius.append(float(distances[i]))
        count.append(1)
        total.append(float(delta[i]))
    return {
        "distance": distances[order].tolist(),
        "delta_q": delta[order].tolist(),
        "removed_charge": float(q0[site]),
        "sum_delta_q": float(delta.sum()),
        "shells": {
            "radius": radius,
            "count": count,
            "delta_q_sum": total,
            "cumulative": np.cumsum(total).tolist(),
        },
    }


def frame_charges(atoms: Atoms) -> tuple[np.ndarray, str] | None:
    """(per-atom charges, their key) of a frame: Hirshfeld, else Löwdin, else a model's ``charges``."""
    for key in CHARGE_KEYS:
        if key in atoms.arrays:
            return np.asarray(atoms.arrays[key], dtype=float), key
    return None


# ------------------------------------------------------------------------------------ one method, all methods


def _rmse(values: Sequence[float]) -> float | None:
    return float(np.sqrt(np.mean(np.square(values)))) if len(values) else None


def _mae(values: Sequence[float]) -> float | None:
    return float(np.mean(np.abs(values))) if len(values) else None


def method_results(
    host: Atoms,
    defects: Mapping[float, Atoms],
    setup: Mapping[str, Any],
    corrections: Mapping[float, float],
    mu: float,
) -> dict[str, Any]:
    """Energetics and charge profiles of one method (DFT or one model) from its labelled frames.

    ``host`` is the pristine supercell and ``defects`` maps q to the vacancy supercell, each with
    ``energy`` in ``info`` and optionally per-atom charges; ``setup`` holds ``cell``,
    ``pristine_positions``, ``site``, ``vbm``, ``shell_tolerance``.
    """
    energies = {q: float(a.info[schema.ENERGY]) for q, a in defects.items()}
    out = energetics(energies, float(host.info[schema.ENERGY]), corrections, mu, float(setup["vbm"]))
    host_charges = frame_charges(host)
    profiles: dict[str, Any] = {}
    source = None
    if host_charges is not None:
        source = host_charges[1]
        for q, atoms in defects.items():
            charges = frame_charges(atoms)
            if charges is None:
                continue
            profiles[charge_label(q)] = radial_profile(
                setup["cell"],
                setup["pristine_positions"],
                int(setup["site"]),
                host_charges[0],
                charges[0],
                float(setup.get("shell_tolerance", 0.1)),
            )
    out["charge_source"] = source
    out["profiles"] = profiles
    return out


def compare(reference: Mapping[str, Any], model: Mapping[str, Any]) -> dict[str, Any]:
    """One comparison row: the model's ΔE(q), E(q) − E_host and ε(q/q') and their errors against DFT."""
    row: dict[str, Any] = {"delta_e": dict(model.get("delta_e", {}))}
    for key, name in (
        ("delta_e", "delta_e_error"),
        ("relative_energy", "relative_energy_error"),
        ("transition_levels", "transition_level_error"),
    ):
        ref, mine = reference.get(key, {}), model.get(key, {})
        row[name] = {k: mine[k] - ref[k] for k in ref if k in mine and (key != "delta_e" or k != "0")}
    row["transition_levels"] = dict(model.get("transition_levels", {}))
    row["delta_e_mae"] = _mae(list(row["delta_e_error"].values()))
    row["relative_energy_mae"] = _mae(list(row["relative_energy_error"].values()))
    row["transition_level_mae"] = _mae(list(row["transition_level_error"].values()))
    profile_rmse = {}
    for label, profile in model.get("profiles", {}).items():
        ref_profile = reference.get("profiles", {}).get(label)
        if ref_profile is None:
            continue
        # both lists are sorted by distance from the same site: compare atom by atom
        diff = np.asarray(profile["delta_q"]) - np.asarray(ref_profile["delta_q"])
        profile_rmse[label] = _rmse(diff.tolist())
    row["delta_q_rmse"] = profile_rmse
    # the potential-alignment term q·C of the method's own potential against DFT's (Freysoldt only)
    ref_corr, own_corr = reference.get("correction", {}), model.get("correction", {})
    row["alignment_error"] = {
        k: own_corr[k]["alignment"] - ref_corr[k]["alignment"]
        for k in ref_corr
        if k != "0" and "alignment" in ref_corr[k] and "alignment" in own_corr.get(k, {})
    }
    row["missing_charge_states"] = sorted(
        set(reference.get("relative_energy", {})) - set(model.get("relative_energy", {}))
    )
    return row


def analyse_vacancy(
    reference: Mapping[str, Any],
    models: Mapping[str, Mapping[str, Any]],
    setup: Mapping[str, Any],
) -> dict[str, Any]:
    """The whole analysis: DFT and every model on the same cells, with the same μ, VBM and correction.

    ``reference`` and each model map ``host`` → pristine frame and ``defects`` → {q: frame} (frames with
    ``energy``; a model may miss charge states it cannot represent). ``setup``: ``cell`` (3×3),
    ``pristine_positions``, ``pristine_symbols``, ``site``, ``element``, ``charges``, ``vbm``, ``cbm``,
    ``dielectric_constant``, ``chemical_potentials`` (dict, may be empty), ``free_atom_energy`` (eV or
    None), ``shell_tolerance``, ``fermi_points``. Returns ``{"analysis": ..., "comparison": ...}``
    (JSON-compatible).
    """
    eps = float(setup.get("dielectric_constant", 1.0))
    charges = sorted(float(q) for q in setup["charges"])
    corrections, correction_info, breakdown = method_corrections(reference, models, setup, charges)
    host_energy = float(reference["host"].info[schema.ENERGY])
    mu, mu_source = chemical_potential(
        str(setup["element"]),
        setup["pristine_symbols"],
        host_energy,
        setup.get("chemical_potentials"),
        setup.get("free_atom_energy"),
    )
    vbm, cbm = float(setup["vbm"]), float(setup["cbm"])
    gap = cbm - vbm
    n_points = int(setup.get("fermi_points", 201))
    methods: dict[str, Any] = {}
    dft = method_results(reference["host"], reference["defects"], setup, corrections["dft"], mu)
    dft["correction"] = breakdown["dft"]
    dft["formation_lines"] = formation_lines(_by_charge(dft["formation_energy_vbm"]), gap, n_points)
    methods["dft"] = dft
    comparison: dict[str, Any] = {"dft": _reference_row(dft)}
    for label, frames in models.items():
        result = method_results(frames["host"], frames["defects"], setup, corrections[label], mu)
        result["correction"] = breakdown[label]
        result["formation_lines"] = formation_lines(_by_charge(result["formation_energy_vbm"]), gap, n_points)
        methods[label] = result
        comparison[label] = compare(dft, result)
    analysis = {
        "element": setup["element"],
        "site": int(setup["site"]),
        "vacancy_position": np.asarray(setup["pristine_positions"])[int(setup["site"])].tolist(),
        "charges": [charge_label(q) for q in charges],
        "vbm": vbm,
        "cbm": cbm,
        "gap": gap,
        "chemical_potential": mu,
        "chemical_potential_source": mu_source,
        "dielectric_constant": eps,
        "correction": correction_info,
        "methods": methods,
    }
    return {"analysis": analysis, "comparison": comparison}


def _by_charge(values: Mapping[str, float]) -> dict[float, float]:
    return {float(k): float(v) for k, v in values.items()}


def _reference_row(dft: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "delta_e": dict(dft["delta_e"]),
        "corrected_delta_e": dict(dft["corrected_delta_e"]),
        "relative_energy": dict(dft["relative_energy"]),
        "transition_levels": dict(dft["transition_levels"]),
        "charge_source": dft["charge_source"],
    }


def select_frames(
    frames: Sequence[Atoms],
    keys: Mapping[str, Any],
    fallback_order: Sequence[str] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Pick the host and vacancy frames of one method; return ({"host", "defects"}, skipped notes).

    ``keys`` holds ``host`` (a key) and ``defects`` ({charge label: key}); frames are found by their
    ``key`` in ``info``, else by position in ``fallback_order``. Frames without an energy, or whose
    ``scf_converged`` is False, are skipped (never used as if converged).
    """
    by_key = {str(a.info["key"]): a for a in frames if "key" in a.info}
    if not by_key and fallback_order is not None:
        by_key = dict(zip(fallback_order, frames))
    notes: list[str] = []

    def usable(key: str) -> Atoms | None:
        atoms = by_key.get(key)
        if atoms is None:
            notes.append(f"{key}: missing")
            return None
        if schema.ENERGY not in atoms.info:
            notes.append(f"{key}: no energy")
            return None
        if "scf_converged" in atoms.info and not bool(atoms.info["scf_converged"]):
            notes.append(f"{key}: SCF not converged")
            return None
        return atoms

    host = usable(str(keys["host"]))
    defects = {}
    for label, key in keys["defects"].items():
        atoms = usable(str(key))
        if atoms is not None:
            defects[float(label)] = atoms
    return {"host": host, "defects": defects}, notes
