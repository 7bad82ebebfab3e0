"""The model side of the validation workchains: one ``emlip.evaluate`` calculation per model.

Every validation workchain builds its model calculations here, so that a change of the calculation's
inputs touches one place. A ``fixed`` (formal-charge) model only sees the structures whose formal
charges add up to their total charge (it refuses the others); the selection is a calcfunction.
"""

from __future__ import annotations

from typing import Any

from aiida import orm
from aiida.engine import calcfunction
from aiida.plugins import CalculationFactory

from aiida_emlip import schema
from aiida_emlip.data import EmlipDatasetData

#: Tolerance (e) on Σ formal charges = Q.
FORMAL_TOLERANCE = 1e-6


def formal_charge_heads(model: orm.Data) -> dict[str, float] | None:
    """The formal charges of a ``fixed`` model (element -> e), None for every other head."""
    head = model.base.attributes.get("head", {}) or {}
    if head.get("name") != "fixed":
        return None
    return {str(k): float(v) for k, v in (head.get("formal_charges") or {}).items()}


def model_capabilities(model: orm.Data) -> frozenset[str]:
    """What an ``emlip.model`` predicts besides E, F, σ (``charges``, ``polarizability``, ...)."""
    from aiida_emlip.models.model import model_capabilities as config_capabilities

    return config_capabilities(dict(model.base.attributes.get("config", {}) or {}))


def model_sigma(model: orm.Data) -> float:
    """Width (Å) of an ``emlip.model``'s Gaussian charges, from its config (library default when unset)."""
    config = model.base.attributes.get("config", {}) or {}
    electrostatics = dict(config.get("electrostatics") or {})
    if "sigma" in electrostatics:
        return float(electrostatics["sigma"])
    from aiida_emlip.models.electrostatics import ElectrostaticsConfig

    return float(ElectrostaticsConfig().sigma)


def representable(symbols: list[str], total_charge: float, formal: dict[str, float] | None) -> bool:
    """Whether a model with ``formal`` charges (None: any head without them) can evaluate the structure."""
    if formal is None:
        return True
    return abs(sum(formal.get(s, 0.0) for s in symbols) - total_charge) <= FORMAL_TOLERANCE * max(
        1, len(symbols)
    )


@calcfunction
def select_representable(configurations: EmlipDatasetData, model: orm.Data) -> EmlipDatasetData:
    """The configurations a formal-charge model can evaluate (Σ formal charges = total charge)."""
    formal = formal_charge_heads(model)
    frames = [
        atoms
        for atoms in configurations.to_ase()
        if representable(
            atoms.get_chemical_symbols(), float(atoms.info.get(schema.TOTAL_CHARGE, 0.0)), formal
        )
    ]
    return EmlipDatasetData(frames=frames)


def model_inputs(configurations: EmlipDatasetData, model: orm.Data) -> EmlipDatasetData | None:
    """``configurations`` as ``model`` can take them: all of them, a selected subset, or None (none)."""
    formal = formal_charge_heads(model)
    frames = configurations.to_ase()
    keep = [
        representable(a.get_chemical_symbols(), float(a.info.get(schema.TOTAL_CHARGE, 0.0)), formal)
        for a in frames
    ]
    if all(keep):
        return configurations
    if not any(keep):
        return None
    return select_representable(configurations, model)


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
    builder.dataset = structures
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
