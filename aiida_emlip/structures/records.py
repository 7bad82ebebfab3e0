"""Tag sampled configurations with their sampler, seed and electronic state (schema keys)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from ase import Atoms

from aiida_emlip import schema

#: ``atoms.info`` keys the samplers write besides the schema labels.
SAMPLER = "sampler"
SEED = "seed"
SAMPLER_PARAMS = "sampler_params"


def tag(
    atoms: Atoms,
    sampler: str,
    seed: int | None,
    index: int = 0,
    params: dict[str, Any] | None = None,
    total_charge: float = 0.0,
    total_spin: float | None = None,
    external_field: np.ndarray | None = None,
    config_type: str | None = None,
) -> Atoms:
    """Write the sampler name, seed, parameters and electronic state into ``atoms.info``; return ``atoms``."""
    atoms.calc = None
    for key in [k for k in atoms.arrays if k not in ("numbers", "positions")]:
        del atoms.arrays[key]  # e.g. pymatgen's oxi_states, ASE's masses and tags
    atoms.info = {k: v for k, v in atoms.info.items() if isinstance(v, (str, int, float, np.ndarray))}
    atoms.info[SAMPLER] = sampler
    atoms.info[SEED] = -1 if seed is None else int(seed)
    atoms.info[SAMPLER_PARAMS] = json.dumps({"index": index, **(params or {})}, sort_keys=True)
    atoms.info[schema.TOTAL_CHARGE] = float(total_charge)
    if total_spin is not None:
        atoms.info[schema.TOTAL_SPIN] = float(total_spin)
    if external_field is not None:
        atoms.info[schema.EXTERNAL_FIELD] = np.asarray(external_field, dtype=float).reshape(3)
    atoms.info[schema.CONFIG_TYPE] = config_type or sampler
    return atoms
