"""The model side of the validation workchains: one ``emlip.evaluate`` calculation per model.

Every validation workchain builds its model calculations here, so that a change of the calculation's
inputs touches one place.
"""

from __future__ import annotations

from typing import Any

from aiida import orm
from aiida.plugins import CalculationFactory

from aiida_emlip.data import EmlipDatasetData


def evaluation_builder(
    code: orm.AbstractCode,
    model: orm.Data,
    structures: EmlipDatasetData,
    parameters: dict[str, Any],
    options: dict[str, Any],
    label: str,
):
    """Builder of an ``emlip.evaluate`` calculation of ``model`` on ``structures`` (total charge in info)."""
    calculation = CalculationFactory("emlip.evaluate")
    builder = calculation.get_builder()
    builder.code = code
    builder.model = model
    builder.structures = structures
    builder.parameters = orm.Dict(dict(parameters))
    builder.metadata.options = dict(options)
    builder.metadata.call_link_label = label
    return builder


def predictions(calc: orm.CalcJobNode) -> EmlipDatasetData | None:
    """The ``predictions`` output of a finished evaluation (also when some SCF did not converge), or None.

    Unconverged structures carry ``scf_converged = False`` and are left out by the analysis.
    """
    if "predictions" not in calc.outputs:
        return None
    return calc.outputs.predictions
