"""``emlip.projwfc``: aiida-quantumespresso's projwfc.x parser, plus the Löwdin charges of the stdout.

projwfc.x projects the Kohn-Sham states on the Löwdin-orthogonalised atomic wavefunctions of the UPF
files and prints, per atom, the ``total charge`` (the Löwdin population, electrons) in its
``Lowdin Charges:`` block; aiida-quantumespresso's ``ProjwfcParser`` does not read it. This parser, the
default of :class:`~aiida_emlip.calculations.projwfc.EmlipProjwfcCalculation`, runs ``ProjwfcParser``
and then reads the block into the output ``lowdin`` (``ArrayData``): arrays ``populations`` and
``charges`` q_i = Z_val,i − population_i, attribute ``spilling``.

The valence charges Z_val come from the provenance, not from an input: the calculation's
``parent_folder`` was made by a pw.x calculation, whose ``structure`` and ``pseudos`` are the atoms and
pseudopotentials projwfc.x read; each site's Z_val is its kind's pseudopotential ``z_valence``. Without
such a parent (a folder made otherwise), ``lowdin`` has the populations only. The atomic basis is
incomplete: Σ q_i exceeds the total charge by about the ``Spilling Parameter`` × the number of valence
electrons.

``lowdin`` is attached whenever the block is complete, whatever ``ProjwfcParser`` decided; the exit code
is ``ProjwfcParser``'s when it fails, else ``ERROR_LOWDIN_CHARGES_MISSING`` (360) or
``ERROR_LOWDIN_CHARGES_INCOMPLETE`` (361) when the block is missing or incomplete.
"""

from __future__ import annotations

import re

import numpy as np
from aiida import orm
from aiida.common import exceptions
from aiida_quantumespresso.parsers.projwfc import ProjwfcParser

from aiida_emlip.cache_version import PROJWFC_PARSER_REVISION

_BLOCK = "Lowdin Charges:"
_ATOM_RE = re.compile(r"^\s*Atom #\s*(\d+):\s*total charge =\s*([-+.\dEe]+)")
_SPILLING_RE = re.compile(r"Spilling Parameter:\s*([-+.\dEe]+)")


class LowdinBlockError(ValueError):
    """The ``Lowdin Charges:`` block is missing (``missing``) or incomplete."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


def parse_lowdin(stdout: str) -> tuple[np.ndarray, float | None]:
    """Return (Löwdin population per atom in electrons, spilling parameter or None) of the last block.

    Spin-polarised runs print ``spin up`` / ``spin down`` / ``polarization`` lines under each atom;
    only the ``Atom #`` lines (total over spins) are read.

    :raises LowdinBlockError: no ``Lowdin Charges:`` block (``missing``), or atoms missing from it.
    """
    start = stdout.rfind(_BLOCK)
    if start < 0:
        raise LowdinBlockError(f"projwfc.x output has no {_BLOCK!r} block", missing=True)
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
        raise LowdinBlockError(f"incomplete {_BLOCK!r} block (atoms {sorted(populations)})")
    return np.array([populations[i] for i in sorted(populations)]), spilling


def parent_valence_charges(node: orm.CalcJobNode) -> np.ndarray | None:
    """Z_val of each site of the pw.x calculation that made ``node``'s ``parent_folder`` (None if unknown).

    The sites are in the order of that calculation's ``structure`` (projwfc.x's atom order); each site's
    Z_val is the ``z_valence`` of the pseudopotential input ``pseudos.<kind name>``.
    """
    parent = node.base.links.get_incoming(link_label_filter="parent_folder").first()
    creator = parent.node.creator if parent is not None else None
    if creator is None:
        return None
    incoming = creator.base.links.get_incoming()
    try:
        structure = incoming.get_node_by_label("structure")
    except (exceptions.NotExistent, exceptions.MultipleObjectsError):
        return None
    pseudos = {
        link.link_label.removeprefix("pseudos__"): link.node
        for link in incoming.all()
        if link.link_label.startswith("pseudos__")
    }
    if not isinstance(structure, orm.StructureData):
        return None
    charges = [getattr(pseudos.get(site.kind_name), "z_valence", None) for site in structure.sites]
    if any(z is None for z in charges):
        return None
    return np.array(charges, dtype=float)


class EmlipProjwfcParser(ProjwfcParser):
    """``ProjwfcParser`` with the Löwdin populations and charges in the output ``lowdin``."""

    #: Part of the hash of every projwfc.x run parsed by this parser (see cache_version).
    CACHE_VERSION = PROJWFC_PARSER_REVISION

    def parse(self, **kwargs):
        """``ProjwfcParser.parse``, then the Löwdin block (attached whatever ProjwfcParser decided)."""
        exit_code = super().parse(**kwargs)
        lowdin_exit_code = self.parse_lowdin_output()
        if exit_code is not None and exit_code.status:
            return exit_code  # ProjwfcParser's failure first: it says why the run is unusable
        return lowdin_exit_code or exit_code

    def parse_lowdin_output(self):
        """Attach ``lowdin`` from the retrieved stdout; return an exit code if the block is not complete."""
        try:
            filename = self.node.get_option("output_filename")
            stdout = self.retrieved.base.repository.get_object_content(filename)
        except (OSError, exceptions.NotExistent):  # no stdout retrieved: ProjwfcParser has reported it
            return self.exit_codes.ERROR_OUTPUT_STDOUT_MISSING
        try:
            populations, spilling = parse_lowdin(stdout)
        except LowdinBlockError as error:
            if error.missing:
                return self.exit_codes.ERROR_LOWDIN_CHARGES_MISSING
            return self.exit_codes.ERROR_LOWDIN_CHARGES_INCOMPLETE.format(message=str(error))
        z_valence = parent_valence_charges(self.node)
        if z_valence is not None and len(z_valence) != len(populations):
            message = f"{len(populations)} atoms printed, the parent structure has {len(z_valence)}"
            return self.exit_codes.ERROR_LOWDIN_CHARGES_INCOMPLETE.format(message=message)
        lowdin = orm.ArrayData()
        lowdin.set_array("populations", populations)
        if z_valence is not None:
            lowdin.set_array("charges", z_valence - populations)
        if spilling is not None:
            lowdin.base.attributes.set("spilling", spilling)
        self.out("lowdin", lowdin)
        return None
