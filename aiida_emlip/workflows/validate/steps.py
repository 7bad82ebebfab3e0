"""Steps every validation workchain shares: the protocols merged, the checks of the pseudopotential family
and of the models against the structures, and whether models are evaluated."""

from __future__ import annotations

from aiida import orm
from aiida.common import exceptions
from aiida.engine import ExitCode, WorkChain

from aiida_emlip.workflows import protocol as protocols
from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain


def merge_protocols(workchain: WorkChain) -> ExitCode | None:
    """Set ``ctx.inputs`` (the validation's protocol) and ``ctx.dft_inputs`` (the dataset's).

    Both with their overrides; an unknown protocol or a bad override returns the workchain's
    ``ERROR_UNKNOWN_PROTOCOL`` or ``ERROR_INVALID_OVERRIDES`` exit code.
    """
    inputs = workchain.inputs
    overrides = inputs.overrides.get_dict() if "overrides" in inputs else {}
    dft_overrides = inputs.dft.overrides.get_dict() if "overrides" in inputs.dft else {}
    try:
        workchain.ctx.inputs = workchain.get_protocol_inputs(inputs.protocol.value, overrides)
        workchain.ctx.dft_inputs = EmlipDatasetWorkChain.get_protocol_inputs(
            inputs.dft.protocol.value, dft_overrides
        )
    except protocols.ProtocolError as error:
        return workchain.exit_codes.ERROR_UNKNOWN_PROTOCOL.format(message=str(error))
    except protocols.OverrideError as error:
        return workchain.exit_codes.ERROR_INVALID_OVERRIDES.format(message=str(error))
    return None


class ValidationSteps:
    """Outline predicates shared by the validation workchains (mixed into each ``WorkChain``)."""

    def has_models(self) -> bool:
        """Whether models are evaluated (models given and an emlip-eval code)."""
        return bool(self.ctx.get("model_labels"))

    def check_family(self, frames) -> ExitCode | None:
        """The family exists, covers every element, and every charge leaves valence electrons.

        Uses the workchain's ``ERROR_UNKNOWN_FAMILY``, ``ERROR_ELEMENT_NOT_IN_FAMILY`` and
        ``ERROR_NO_ELECTRONS`` exit codes; ``frames`` carry ``total_charge`` and ``key`` in ``info``.
        """
        label = self.inputs.dft.pseudo_family.value
        try:
            family = orm.load_group(label)
        except (exceptions.NotExistent, exceptions.MultipleObjectsError) as error:
            return self.exit_codes.ERROR_UNKNOWN_FAMILY.format(message=str(error))
        if not hasattr(family, "get_pseudo"):
            return self.exit_codes.ERROR_UNKNOWN_FAMILY.format(
                message=f"{label} is not a pseudopotential family"
            )
        elements = sorted({s for a in frames for s in a.get_chemical_symbols()})
        missing = sorted(set(elements) - set(family.elements))
        if missing:
            return self.exit_codes.ERROR_ELEMENT_NOT_IN_FAMILY.format(message=f"{missing} not in {label}")
        z_valence = {el: float(family.get_pseudo(element=el).z_valence) for el in elements}
        for atoms in frames:
            charge = float(atoms.info.get("total_charge", 0.0))
            electrons = sum(z_valence[s] for s in atoms.get_chemical_symbols()) - charge
            if electrons <= 0:
                key = atoms.info.get("key", "?")
                message = f"{key}: Q = {charge:+g} leaves {electrons:g} valence electrons"
                return self.exit_codes.ERROR_NO_ELECTRONS.format(message=message)
        return None

    def check_model_elements(self, frames) -> ExitCode | None:
        """Every model covers every element of ``frames`` (``ERROR_MODEL_ELEMENTS`` otherwise)."""
        elements = {s for a in frames for s in a.get_chemical_symbols()}
        for label, model in self.inputs.get("models", {}).items():
            missing = sorted(elements - set(model.base.attributes.get("elements", [])))
            if missing:
                return self.exit_codes.ERROR_MODEL_ELEMENTS.format(message=f"model {label} lacks {missing}")
        return None
