"""Steps every validation workchain shares: the protocols merged, and whether models are evaluated."""

from __future__ import annotations

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
