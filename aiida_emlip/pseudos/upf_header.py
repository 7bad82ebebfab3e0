"""Numbers from the ``PP_HEADER`` of a UPF v2 file (no AiiDA import)."""

from __future__ import annotations

import re

from aiida_emlip.schema import RYDBERG_IN_EV

_PSENERGY_RE = re.compile(r'total_psenergy\s*=\s*"\s*([-+.\dEe]+)\s*"')


def free_atom_energy(upf_text: str) -> float | None:
    """Total energy (eV) of the free pseudo-atom that ld1.x stored as ``total_psenergy`` (Ry), or None.

    It is the energy pw.x gives the same spherical, spin-unpolarised atom in a large box at converged
    cutoff (checked for the project's Cl and O: within 0.01 eV), so it serves as an isolated-atom
    reference on the scale of pw.x total energies.
    """
    match = _PSENERGY_RE.search(upf_text)
    if match is None:
        return None
    value = float(match.group(1))
    return value * RYDBERG_IN_EV if value != 0.0 else None
