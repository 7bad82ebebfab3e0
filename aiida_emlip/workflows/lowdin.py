"""Löwdin charges from the stdout of projwfc.x (aiida-quantumespresso 5.1's parser does not read them).

projwfc.x projects the Kohn-Sham states on the Löwdin-orthogonalised atomic wavefunctions of the
UPF files and prints, per atom, the ``total charge`` (the Löwdin population, electrons). The charge
of atom i is q_i = Z_val,i − population_i. The atomic basis is incomplete: Σ q_i exceeds the total
charge by about the ``Spilling Parameter`` × the number of valence electrons.
"""

from __future__ import annotations

import re

import numpy as np
from aiida import orm
from aiida.engine import calcfunction

#: Stdout file name of the projwfc.x CalcJob.
STDOUT = "aiida.out"
_ATOM_RE = re.compile(r"^\s*Atom #\s*(\d+):\s*total charge =\s*([-+.\dEe]+)")
_SPILLING_RE = re.compile(r"Spilling Parameter:\s*([-+.\dEe]+)")


def parse_lowdin(stdout: str) -> tuple[np.ndarray, float | None]:
    """Return (Löwdin population per atom in electrons, spilling parameter or None) of the last block.

    Spin-polarised runs print ``spin up`` / ``spin down`` / ``polarization`` lines under each atom;
    only the ``Atom #`` lines (total over spins) are read.

    :raises ValueError: no ``Lowdin Charges:`` block, or atoms missing from it.
    """
    start = stdout.rfind("Lowdin Charges:")
    if start < 0:
        raise ValueError("projwfc.x output has no 'Lowdin Charges:' block")
    populations: dict[int, float] = {}
    spilling = None
    for line in stdout[start:].splitlines()[1:]:
        match = _ATOM_RE.match(line)
        if match:
            populations.setdefault(int(match.group(1)), float(match.group(2)))
            continue
        match = _SPILLING_RE.search(line)
        if match:
            spilling = float(match.group(1))
            break
    if not populations or sorted(populations) != list(range(1, len(populations) + 1)):
        raise ValueError(f"incomplete 'Lowdin Charges:' block (atoms {sorted(populations)})")
    return np.array([populations[i] for i in sorted(populations)]), spilling


@calcfunction
def lowdin_charges(
    retrieved: orm.FolderData, structure: orm.StructureData, settings: orm.Dict
) -> orm.ArrayData:
    """Löwdin charges Z_val − population from projwfc.x's retrieved stdout.

    ``settings`` holds ``z_valence`` (element -> valence charge of the family's pseudopotential). The
    output has the arrays ``charges`` and ``populations`` and the attribute ``spilling``.
    """
    populations, spilling = parse_lowdin(retrieved.base.repository.get_object_content(STDOUT))
    symbols = structure.get_ase().get_chemical_symbols()
    if len(populations) != len(symbols):
        raise ValueError(f"projwfc.x printed {len(populations)} atoms, the structure has {len(symbols)}")
    z_valence = settings["z_valence"]
    out = orm.ArrayData()
    out.set_array("charges", np.array([float(z_valence[s]) for s in symbols]) - populations)
    out.set_array("populations", populations)
    if spilling is not None:
        out.base.attributes.set("spilling", spilling)
    return out
