"""Errors beyond the cutoff and charges per fragment: what an electrostatic design must get right.

Frames come from :func:`aiida_emlip.structures.fragments.fragment_pair_scan` (their ``sampler_params``
record the closest-atom separation and the fragment sizes). References carry DFT labels (``energy``,
``ref_charges`` from Hirshfeld), predictions the model's values under the same schema keys.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
from ase import Atoms

from aiida_emlip import schema


def _params(atoms: Atoms) -> dict:
    raw = atoms.info.get("sampler_params")
    if raw is None:
        raise ValueError("frame without sampler_params: not made by fragment_pair_scan")
    return json.loads(raw) if isinstance(raw, str) else dict(raw)


def separation(atoms: Atoms) -> float:
    """Closest-atom distance between the two fragments (Å)."""
    return float(_params(atoms)["separation"])


def fragment_charges(atoms: Atoms, charges: np.ndarray) -> np.ndarray:
    """Total charge of each fragment (e), fragments in the order the sampler placed them."""
    sizes = _params(atoms)["fragments"]
    bounds = np.cumsum([0, *sizes])
    return np.array([float(np.sum(charges[a:b])) for a, b in itertools.pairwise(bounds)])


def _rmse(values: Sequence[float]) -> float | None:
    return float(math.sqrt(np.mean(np.square(values)))) if len(values) else None


def long_range_table(
    reference: Sequence[Atoms],
    predictions: Mapping[str, Sequence[Atoms]],
    cutoff: float,
    baseline: str = "sr",
) -> dict[str, dict[str, float | None]]:
    """Per design: energy RMSE (meV/atom) beyond and within ``cutoff``, on neutral frames, ratios to
    ``baseline``, and the mean and largest error of each fragment's charge (e) against the reference,
    over every frame and over the far frames alone (at contact the split of the charge between two
    fragments depends on the partition; beyond the cutoff it does not).

    ``far`` frames have their fragments farther apart than the cutoff: no edge joins them, so a local
    model sees two isolated fragments whatever the distance.
    """
    far = np.array([separation(a) > cutoff for a in reference])
    neutral = np.array([abs(float(a.info.get(schema.TOTAL_CHARGE, 0.0))) < 1e-9 for a in reference])
    table: dict[str, dict[str, float | None]] = {}
    for label, frames in predictions.items():
        if len(frames) != len(reference):
            raise ValueError(f"{label}: {len(frames)} predictions for {len(reference)} reference frames")
        de = np.array(
            [
                (float(p.info[schema.ENERGY]) - float(r.info[schema.ENERGY])) / len(r) * 1000.0
                for p, r in zip(frames, reference)
            ]
        )
        row: dict[str, float | None] = {
            "far_energy_rmse": _rmse(de[far]),
            "near_energy_rmse": _rmse(de[~far]),
            "neutral_energy_rmse": _rmse(de[neutral]),
            "charged_far_energy_rmse": _rmse(de[far & ~neutral]),
            "n_far": int(far.sum()),
        }
        errors, far_errors = [], []
        for p, r, is_far in zip(frames, reference, far):
            if schema.CHARGES in p.arrays and schema.CHARGES in r.arrays:
                predicted = fragment_charges(p, p.arrays[schema.CHARGES])
                error = np.abs(predicted - fragment_charges(r, r.arrays[schema.CHARGES]))
                errors.append(error)
                if is_far:
                    far_errors.append(error)
        row["fragment_charge_mae"] = float(np.mean(errors)) if errors else None
        row["fragment_charge_max_error"] = float(np.max(errors)) if errors else None
        row["far_fragment_charge_max_error"] = float(np.max(far_errors)) if far_errors else None
        table[label] = row
    base = table.get(baseline)
    for row in table.values():
        for key in ("far_energy_rmse", "neutral_energy_rmse", "charged_far_energy_rmse"):
            ratio = None
            if base is not None and base[key] and row[key] is not None:
                ratio = row[key] / base[key]
            row[key.replace("_rmse", "_ratio")] = ratio
    return table


#: Figures of :func:`long_range_table` averaged over initialisations by :func:`over_initialisations`.
AVERAGED = (
    "far_energy_rmse",
    "neutral_energy_rmse",
    "near_energy_rmse",
    "far_energy_ratio",
    "neutral_energy_ratio",
    "fragment_charge_max_error",
    "far_fragment_charge_max_error",
)


def over_initialisations(
    tables: Sequence[Mapping[str, Mapping[str, float | None]]],
) -> dict[str, dict[str, float | None]]:
    """Each design's figures over several :func:`long_range_table` s of the same held-out cells, one per
    model initialisation (each with its own ``sr`` baseline): the mean, the smallest and the largest of
    every figure of :data:`AVERAGED` (``<figure>``, ``<figure>_min``, ``<figure>_max``), and
    ``mean_neutral_ratio``, the ratio of the mean neutral errors (design over ``sr``), which one lucky or
    unlucky baseline cannot decide. A design missing from a table, or a figure that is None there, is
    left out of that figure's statistics."""
    designs = list(dict.fromkeys(name for table in tables for name in table))
    out: dict[str, dict[str, float | None]] = {}
    for name in designs:
        row: dict[str, float | None] = {"n_initialisations": sum(name in t for t in tables)}
        for key in AVERAGED:
            values = [t[name][key] for t in tables if name in t and t[name].get(key) is not None]
            row[key] = float(np.mean(values)) if values else None
            row[f"{key}_min"] = float(np.min(values)) if values else None
            row[f"{key}_max"] = float(np.max(values)) if values else None
        out[name] = row
    base = out.get("sr")
    for row in out.values():
        ok = base is not None and base["neutral_energy_rmse"] and row["neutral_energy_rmse"] is not None
        row["mean_neutral_ratio"] = row["neutral_energy_rmse"] / base["neutral_energy_rmse"] if ok else None
    return out


def format_long_range_table(table: Mapping[str, Mapping[str, float | None]]) -> str:
    """A plain-text table of :func:`long_range_table`."""
    columns = [
        ("far_energy_rmse", "far E meV/at"),
        ("far_energy_ratio", "far/sr"),
        ("charged_far_energy_ratio", "charged far/sr"),
        ("neutral_energy_rmse", "neutral E"),
        ("neutral_energy_ratio", "neutral/sr"),
        ("near_energy_rmse", "near E"),
        ("fragment_charge_mae", "frag q MAE e"),
        ("fragment_charge_max_error", "frag q max e"),
        ("far_fragment_charge_max_error", "far frag q max"),
    ]
    lines = [f"{'design':<12}" + "".join(f"{title:>16}" for _, title in columns)]
    for label, row in table.items():
        cells = ["-" if row.get(key) is None else f"{row[key]:.4g}" for key, _ in columns]
        lines.append(f"{label:<12}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def predict_frames(model, frames: Sequence[Atoms]) -> list[Atoms]:
    """The model's energy and charges on ``frames`` under the schema keys (converged, evaluation mode)."""
    from aiida_emlip.models.graph import build_graph

    model.eval()
    out = []
    for atoms in frames:
        pred = model(build_graph([atoms], model.cutoff, model.dtype, model.device), compute_stress=False)
        frame = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        frame.info = {k: atoms.info[k] for k in ("sampler_params", schema.TOTAL_CHARGE) if k in atoms.info}
        frame.info[schema.ENERGY] = float(pred["energy"][0].detach())
        if pred["charges"] is not None:
            frame.arrays[schema.CHARGES] = pred["charges"].detach().cpu().double().numpy()
        out.append(frame)
    return out


#: Gaussian width (Å) of the reference multipoles in :func:`multipole_interaction`: narrow enough that
#: fragments beyond a 4 Å cutoff interact as point multipoles (to 10⁻⁶ at 4 Å).
MULTIPOLE_WIDTH = 0.5


def _fragments(atoms: Atoms, charges: np.ndarray) -> list[tuple[slice, float]]:
    """Each fragment's atoms and its integer charge (the reference fragment charge, rounded)."""
    sizes = _params(atoms)["fragments"]
    bounds = np.cumsum([0, *sizes])
    totals = fragment_charges(atoms, charges)
    return [(slice(int(a), int(b)), float(round(t))) for (a, b), t in zip(itertools.pairwise(bounds), totals)]


def multipole_interaction(atoms: Atoms, width: float = MULTIPOLE_WIDTH) -> float:
    """Electrostatic interaction energy (eV) between the fragments of a reference frame from its DFT
    charges and atomic dipoles (``ref_charges``, ``ref_dipoles``): the periodic energy of the whole
    cell minus that of each fragment alone in the same cell.

    Beyond the cutoff this is what a model's long-range term must supply; it includes what the other
    fragment induces in each one's multipoles (polarisation), which a model whose multipoles are local
    functions of the environment cannot see.
    """
    import torch

    from aiida_emlip.models.electrostatics import Electrostatics, ElectrostaticsConfig

    coulomb = Electrostatics(ElectrostaticsConfig(sigma=width))
    charges = np.asarray(atoms.arrays[schema.CHARGES], dtype=float)
    dipoles = np.asarray(atoms.arrays.get(schema.ATOMIC_DIPOLES, np.zeros((len(atoms), 3))), dtype=float)

    def energy(part: slice) -> float:
        def tensor(x: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.asarray(x), dtype=torch.float64)

        pbc = torch.as_tensor(np.asarray(atoms.pbc, dtype=bool))
        value = coulomb.energy(
            tensor(charges[part]),
            tensor(atoms.positions[part]),
            tensor(atoms.cell.array),
            pbc,
            tensor(dipoles[part]),
        )
        return float(value)

    return energy(slice(None)) - sum(energy(part) for part, _ in _fragments(atoms, charges))


def model_interaction(model, atoms: Atoms) -> float:
    """A model's interaction energy (eV) between the fragments of ``atoms``: its energy of the frame minus
    its energies of each fragment alone in the same cell (fragment charges from the reference)."""
    whole = predict_frames(model, [atoms])[0]
    total = float(whole.info[schema.ENERGY])
    for part, charge in _fragments(atoms, np.asarray(atoms.arrays[schema.CHARGES], dtype=float)):
        alone = Atoms(atoms.numbers[part], atoms.positions[part], cell=atoms.cell, pbc=atoms.pbc)
        n = len(alone)
        alone.info = {
            "sampler_params": json.dumps({"separation": 0.0, "fragments": [n]}),
            schema.TOTAL_CHARGE: charge,
        }
        total -= float(predict_frames(model, [alone])[0].info[schema.ENERGY])
    return total


def interaction_errors(models: Mapping[str, object], reference: Sequence[Atoms], cutoff: float) -> dict:
    """Per design: RMS (meV/atom) over the frames beyond ``cutoff`` of its interaction energy between the
    fragments minus the reference multipoles' (:func:`multipole_interaction`), the mean of that error,
    and the same RMS for the reference multipoles' interaction itself (what a local model leaves out).

    Unlike the energy error this does not depend on each fragment's own energy (the far-limit offset):
    it measures the long-range term alone.
    """
    far = [a for a in reference if separation(a) > cutoff and schema.CHARGES in a.arrays]
    if not far:
        return {}
    target = np.array([multipole_interaction(a) for a in far])
    atoms = np.array([len(a) for a in far])
    out: dict = {"reference": {"rms": _rmse(1000.0 * target / atoms)}}
    for name, model in models.items():
        error = 1000.0 * (np.array([model_interaction(model, a) for a in far]) - target) / atoms
        out[name] = {"rms": _rmse(error), "mean": float(np.mean(error))}
    return out
