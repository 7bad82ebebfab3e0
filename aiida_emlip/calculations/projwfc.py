"""``emlip.projwfc``: aiida-quantumespresso's projwfc.x calculation, with the Löwdin charges as an output.

A parser can only attach outputs that the calculation declares, and ``ProjwfcCalculation``'s output
namespace is closed: this subclass adds the output ``lowdin`` and the exit codes of a missing or
incomplete ``Lowdin Charges:`` block, and makes ``emlip.projwfc``
(:class:`~aiida_emlip.parsers.projwfc.EmlipProjwfcParser`) its default parser. Inputs, the input file,
the retrieved files and every other output and exit code are ``ProjwfcCalculation``'s.
"""

from __future__ import annotations

from aiida import orm
from aiida_quantumespresso.calculations.projwfc import ProjwfcCalculation


class EmlipProjwfcCalculation(ProjwfcCalculation):
    """``ProjwfcCalculation`` whose parser also returns the Löwdin populations and charges (``lowdin``)."""

    _default_parser = "emlip.projwfc"

    @classmethod
    def define(cls, spec) -> None:
        """ProjwfcCalculation's spec, plus the ``lowdin`` output and its exit codes."""
        super().define(spec)
        spec.output(
            "lowdin",
            valid_type=orm.ArrayData,
            required=False,
            help="Löwdin analysis of projwfc.x, per atom in the structure's order: arrays `populations` "
            "(electrons) and, when the parent pw.x calculation's pseudopotentials give the valence charges, "
            "`charges` (Z_val − population, e); attribute `spilling` (the spilling parameter).",
        )
        spec.exit_code(
            360,
            "ERROR_LOWDIN_CHARGES_MISSING",
            message="The stdout has no `Lowdin Charges:` block.",
        )
        spec.exit_code(
            361,
            "ERROR_LOWDIN_CHARGES_INCOMPLETE",
            message="The `Lowdin Charges:` block is incomplete: {message}",
        )
