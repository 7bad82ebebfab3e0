r"""The response probes' numbers (pure NumPy, no AiiDA): field response, charging, dissociation, α vs size.

Units: e, Å, V, eV; polarisabilities α = ∂d/∂E in e·Å²/V (the schema's unit), also as a volume
α·k_e in Å³ (k_e = e²/4πε₀ = 14.3996 V·Å/e), the familiar "polarisability volume" (water ≈ 1.45 Å³).

* **Field response** of a slab or film in a field E along its normal: α = slope of the dipole
  component d_n(E) (linear least squares over every field value, both signs). An ideal conductor of
  atomic thickness t and face area A gives α = ε₀At (surface charges ±ε₀EA a distance t apart), so
  the *screened fraction* s = α/(ε₀At) = 4πk_eα/(At) is 1 for an ideal conductor with its charge on
  the outer atoms, 1 − 1/ε for a dielectric film filling the thickness t, 0 without response. From
  atomic charges, the field left at a plane z_m inside the slab is exact for sheets of charge:
  E_in/E = 1 + (4πk_e/(AE)) Σ_{z_i<z_m} Δq_i with Δq_i = q_i(E) − q_i(0) (or the antisymmetric part
  [q_i(E) − q_i(−E)]/2) — 0 for perfect screening, 1 for none (:func:`interior_field_fraction`).
* **Charging curve**: μ(Q) of a metal slab; the slope dμ/dQ (V/e) is minus the inverse capacitance of the
  electrode, C = −1/(dμ/dQ) (e/V; per area in μF/cm²; μ is the electron energy, so dμ/dQ < 0).
* **Dissociation**: the charge on the first fragment (Σ of its atoms' charges) against the
  separation; ``far_charge`` is its value at the largest distance, ``fractional`` its distance to the
  nearest integer (a separated pair should carry integer charges).
* **Polarisability vs size**: α(N) of chains of N molecules; ``exponent`` b of the fit α ∝ N^b on
  log–log axes (b = 1: additive, as DFT; b > 1: superlinear growth, the charge-equilibration
  pathology of a conductor-like model; a 1D conductor tends to b ≈ 3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from aiida_emlip import schema
from aiida_emlip.structures.geometry import unit_normal

#: ε₀ in e/(V·Å): 1/(4π k_e).
EPSILON_0 = 1.0 / (4.0 * math.pi * schema.COULOMB_CONSTANT)
#: 1 e/(V·Å²) in μF/cm²: 1.602176634e-19 C / (1 V · 1e-16 cm²) = 1602.18 μF/cm².
E_PER_V_A2_IN_UF_PER_CM2 = 1.602176634e-19 / 1e-16 * 1e6
#: Probe names.
PROBES = ("field", "charging", "dissociation", "polarizability")
#: Targets of the field probe.
FIELD_TARGETS = ("metal", "water")


def linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Slope and intercept of the least-squares line through (x, y); needs two distinct x."""
    x_arr, y_arr = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x_arr) < 2 or np.ptp(x_arr) == 0:
        raise ValueError(f"a slope needs at least two distinct x values, got {x_arr.tolist()}")
    slope, intercept = np.polyfit(x_arr, y_arr, 1)
    return float(slope), float(intercept)


def polarizability_volume(alpha: float) -> float:
    """α (e·Å²/V) as a polarisability volume α k_e (Å³)."""
    return float(alpha) * schema.COULOMB_CONSTANT


def screened_fraction(alpha: float, area: float, thickness: float) -> float:
    """s = α / (ε₀ A t): 1 for an ideal conductor of thickness t (charges on its outer atoms), 0 for none."""
    if area <= 0 or thickness <= 0:
        raise ValueError(f"area and thickness must be positive, got {area}, {thickness}")
    return float(alpha) / (EPSILON_0 * area * thickness)


def interior_field_fraction(
    heights: Sequence[float], delta_q: Sequence[float], area: float, field: float, plane: float | None = None
) -> float:
    """E_in/E at the plane ``plane`` (default: midway between the lowest and highest atom) of a slab.

    ``heights`` are the atoms' coordinates along the field direction, ``delta_q`` their induced charges
    for the applied field ``field`` (V/Å, along +normal), ``area`` the slab's face area (Å²). The
    induced charges are sheets: the field they make at ``plane`` is (1/ε₀A) Σ_{below} Δq (their sum
    vanishes), so the total field there is E + that; exact for charges without atomic dipoles.
    """
    z = np.asarray(heights, dtype=float)
    dq = np.asarray(delta_q, dtype=float)
    if field == 0:
        raise ValueError("the field must not be zero")
    if plane is None:
        plane = 0.5 * (z.min() + z.max())
    below = float(dq[z < plane].sum())
    return 1.0 + below / (EPSILON_0 * area * field)


def field_response(points: Sequence[tuple[float, float]], area: float, thickness: float) -> dict[str, float]:
    """α, its volume, the zero-field dipole and the screened fraction from (field, dipole) pairs."""
    fields, dipoles = zip(*points)
    alpha, d0 = linear_fit(fields, dipoles)
    return {
        "alpha": alpha,
        "alpha_volume": polarizability_volume(alpha),
        "dipole_zero_field": d0,
        "screened_fraction": screened_fraction(alpha, area, max(thickness, 1e-6)),
        "n_points": len(points),
    }


def charging_curve(points: Sequence[tuple[float, float]], area: float) -> dict[str, float]:
    """dμ/dQ (V/e) and the capacitance C = −1/(dμ/dQ) (e/V, μF/cm² of one face area) from (Q, μ) pairs.

    μ is the electron's energy and Q the charge in e: adding electrons (dQ < 0) raises μ, so a
    physical electrode has dμ/dQ < 0 and C > 0.
    """
    charges, mu = zip(*points)
    slope, mu0 = linear_fit(charges, mu)
    capacitance = -1.0 / slope if slope != 0 else math.inf
    return {
        "dmu_dq": slope,
        "mu_neutral": mu0,
        "capacitance": capacitance,
        "capacitance_uf_cm2": capacitance / area * E_PER_V_A2_IN_UF_PER_CM2 if area > 0 else math.nan,
        "n_points": len(points),
    }


def fragment_charge(charges: Sequence[float], n_first: int) -> float:
    """Σ of the charges of the first ``n_first`` atoms (the first fragment)."""
    return float(np.sum(np.asarray(charges, dtype=float)[:n_first]))


def dissociation(points: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """The first fragment's charge against distance: the curve, its far value and fractional part."""
    ordered = sorted(points)
    distances = [float(d) for d, _ in ordered]
    charges = [float(q) for _, q in ordered]
    far = charges[-1]
    return {
        "distances": distances,
        "fragment_charge": charges,
        "far_charge": far,
        "fractional": float(abs(far - round(far))),
        "near_charge": charges[0],
    }


def curve_rmse(
    reference: Mapping[float, float] | Sequence[tuple[float, float]],
    other: Mapping[float, float] | Sequence[tuple[float, float]],
) -> float | None:
    """RMSE of ``other`` against ``reference`` on their common abscissae (None when there is none)."""
    ref, oth = dict(reference), dict(other)
    common = sorted(set(round(float(k), 6) for k in ref) & set(round(float(k), 6) for k in oth))
    if not common:
        return None
    r = {round(float(k), 6): v for k, v in ref.items()}
    o = {round(float(k), 6): v for k, v in oth.items()}
    return float(np.sqrt(np.mean([(o[k] - r[k]) ** 2 for k in common])))


def growth_exponent(sizes: Sequence[float], alphas: Sequence[float]) -> dict[str, float | None]:
    """Exponent b of α ∝ N^b (log–log least squares) and α per molecule of the largest N.

    Non-positive α (no response) gives ``exponent`` None. With a single size, None too.
    """
    n = np.asarray(sizes, dtype=float)
    a = np.asarray(alphas, dtype=float)
    order = np.argsort(n)
    n, a = n[order], a[order]
    per_molecule = float(a[-1] / n[-1]) if len(n) else math.nan
    result: dict[str, float | None] = {
        "alpha_per_molecule": per_molecule,
        "alpha_volume_per_molecule": polarizability_volume(per_molecule),
        "exponent": None,
    }
    if len(n) >= 2 and np.ptp(n) > 0 and np.all(a > 0):
        result["exponent"] = linear_fit(np.log(n), np.log(a))[0]
    return result


# ----------------------------------------------------------------------------- the whole analysis


def usable(atoms) -> bool:
    return not ("scf_converged" in atoms.info and not bool(atoms.info["scf_converged"]))


def dipole_along(atoms, normal: np.ndarray) -> float | None:
    dipole = atoms.info.get(schema.DIPOLE)
    if dipole is None:
        charges = atoms.arrays.get(schema.CHARGES)
        if charges is None:
            return None
        dipole = np.asarray(charges, dtype=float) @ atoms.positions
        if schema.ATOMIC_DIPOLES in atoms.arrays:
            dipole = dipole + np.asarray(atoms.arrays[schema.ATOMIC_DIPOLES], dtype=float).sum(axis=0)
    return float(np.asarray(dipole, dtype=float).reshape(3) @ normal)


def frame_charges(atoms) -> np.ndarray | None:
    charges = atoms.arrays.get(schema.CHARGES)
    return None if charges is None else np.asarray(charges, dtype=float)


def analyse_method(
    setup: Mapping[str, Mapping[str, Any]],
    frames: Mapping[str, Any],
    autograd_alpha: Mapping[str, float] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Every probe's summary for one method (DFT or a model); returns (summaries, notes).

    ``setup`` maps each configuration key to ``probe`` (``field_metal``, ``field_water``,
    ``charging``, ``dissociation``, ``polarizability``), ``value`` (the signed field along the normal
    in V/Å, the total charge, the distance or the number of molecules), ``axis`` (field axis),
    ``field`` (V/Å, for the polarisability probe), ``n_first`` (atoms of the first fragment),
    ``area`` and ``thickness`` (Å², Å of slabs). ``frames`` maps keys to this method's results.
    """
    notes: list[str] = []
    groups: dict[str, list[tuple[str, Any]]] = {}
    for key, meta in setup.items():
        atoms = frames.get(key)
        if atoms is None:
            notes.append(f"{key}: missing")
            continue
        if not usable(atoms):
            notes.append(f"{key}: SCF not converged")
            continue
        groups.setdefault(meta["probe"], []).append((key, atoms))
    out: dict[str, Any] = {}
    for target in FIELD_TARGETS:
        probe = f"field_{target}"
        members = groups.get(probe, [])
        points, charge_rows = [], []
        for key, atoms in members:
            meta = setup[key]
            d = dipole_along(atoms, unit_normal(atoms, meta["axis"]))
            if d is None:
                notes.append(f"{key}: no dipole")
                continue
            points.append((float(meta["value"]), d))
            q = frame_charges(atoms)
            if q is not None:
                charge_rows.append(
                    (float(meta["value"]), atoms.positions @ unit_normal(atoms, meta["axis"]), q)
                )
        if len({p[0] for p in points}) < 2:
            continue
        meta = setup[members[0][0]]
        summary = field_response(points, float(meta["area"]), float(meta["thickness"]))
        summary["fields"] = [p[0] for p in sorted(points)]
        summary["dipoles"] = [p[1] for p in sorted(points)]
        by_field = {round(e, 9): (z, q) for e, z, q in charge_rows}
        fractions = []
        for e in sorted(by_field):
            if e > 0 and round(-e, 9) in by_field:
                z, q_plus = by_field[e]
                q_minus = by_field[round(-e, 9)][1]
                fractions.append(interior_field_fraction(z, 0.5 * (q_plus - q_minus), float(meta["area"]), e))
        if fractions:
            summary["interior_field_fraction"] = float(np.mean(fractions))
        out[probe] = summary
    members = groups.get("charging", [])
    points = [
        (float(setup[key]["value"]), float(atoms.info[schema.FERMI_LEVEL]))
        for key, atoms in members
        if atoms.info.get(schema.FERMI_LEVEL) is not None
    ]
    if len({p[0] for p in points}) >= 2:
        meta = setup[members[0][0]]
        summary = charging_curve(points, float(meta["area"]))
        summary["charges"] = [p[0] for p in sorted(points)]
        summary["fermi_levels"] = [p[1] for p in sorted(points)]
        summary["fermi_reference"] = str(members[0][1].info.get(schema.FERMI_REFERENCE, ""))
        out["charging"] = summary
    members = groups.get("dissociation", [])
    points = []
    for key, atoms in members:
        q = frame_charges(atoms)
        if q is not None:
            points.append((float(setup[key]["value"]), fragment_charge(q, int(setup[key]["n_first"]))))
    if points:
        out["dissociation"] = dissociation(points)
    members = groups.get("polarizability", [])
    by_size: dict[int, list[tuple[float, float]]] = {}
    for key, atoms in members:
        meta = setup[key]
        d = dipole_along(atoms, unit_normal(atoms, meta["axis"]))
        if d is None:
            notes.append(f"{key}: no dipole")
            continue
        by_size.setdefault(int(meta["value"]), []).append((float(meta["field"]), d))
    alphas = {
        n: linear_fit(*zip(*pts))[0] for n, pts in sorted(by_size.items()) if len({p[0] for p in pts}) >= 2
    }
    if alphas:
        summary = growth_exponent(list(alphas), list(alphas.values()))
        summary["sizes"] = list(alphas)
        summary["alpha"] = list(alphas.values())
        summary["alpha_volume"] = [polarizability_volume(a) for a in alphas.values()]
        if autograd_alpha:
            summary["alpha_autograd"] = [autograd_alpha.get(str(n)) for n in alphas]
        out["polarizability"] = summary
    return out, notes


def analyse_response(
    setup: Mapping[str, Mapping[str, Any]],
    methods: Mapping[str, Mapping[str, Any]],
    autograd: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """Summaries of every method (``dft`` and each model) per probe, with model-vs-DFT dissociation RMSE.

    Returns ``{"probes": {probe: {method: summary}}, "notes": {method: [...]}}``.
    """
    probes: dict[str, dict[str, Any]] = {}
    notes: dict[str, list[str]] = {}
    for label, frames in methods.items():
        summaries, method_notes = analyse_method(setup, frames, (autograd or {}).get(label))
        notes[label] = method_notes
        for probe, summary in summaries.items():
            probes.setdefault(probe, {})[label] = summary
    dft = probes.get("dissociation", {}).get("dft")
    if dft is not None:
        reference = dict(zip(dft["distances"], dft["fragment_charge"]))
        for label, summary in probes["dissociation"].items():
            if label != "dft":
                summary["rmse_vs_dft"] = curve_rmse(
                    reference, dict(zip(summary["distances"], summary["fragment_charge"]))
                )
    return {"probes": probes, "notes": notes}
