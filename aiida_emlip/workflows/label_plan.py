"""What an ``emlip.dataset`` run will store, worked out from its inputs before anything runs.

:class:`LabelPlan` is built by :meth:`~aiida_emlip.workflows.dataset.EmlipDatasetWorkChain.plan_labels`;
the training workchain checks every design's needs against it before any pw.x is submitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiida_emlip import schema

from .functions import expected_labels

#: Labels a run stores for every configuration, and those each post-processing step adds.
ALWAYS_LABELS = frozenset(expected_labels({}, {}))
STEP_LABELS = {
    step: frozenset(expected_labels({}, {step: True}) - ALWAYS_LABELS) for step in ("hirshfeld", "lowdin")
}
#: Labels only some configurations get, by their pw.x setup.
SETUP_LABELS = frozenset(expected_labels({"periodic_bulk": True, "dipfield": True}, {}) - ALWAYS_LABELS)
#: Schema keys that are inputs of pw.x or tags (carried from the configurations), not labels.
CARRIED_KEYS = frozenset(
    {
        schema.TOTAL_CHARGE,
        schema.TOTAL_SPIN,
        schema.EXTERNAL_FIELD,
        schema.CONFIG_TYPE,
        schema.FERMI_REFERENCE,
    }
)
#: The input code each post-processing step needs.
STEP_CODES = {"hirshfeld": "pp_code", "lowdin": "projwfc_code"}


@dataclass(frozen=True)
class LabelPlan:
    """What the labelling of an ``emlip.dataset`` run will store when every step succeeds, worked out
    from its inputs before anything runs (:meth:`EmlipDatasetWorkChain.plan_labels`)."""

    #: The merged protocol inputs and the post-processing the run does (and skips, with the reason).
    inputs: dict[str, Any]
    postprocess: dict[str, bool]
    skipped: dict[str, str]
    #: Label -> configurations that will carry it; ``None`` where they are not known before the run
    #: (a sampler recipe).
    counts: dict[str, int] | None
    #: ``fermi_reference`` -> configurations measured from it (``None``: not known before the run).
    fermi_references: dict[str, int] | None

    @property
    def n_configurations(self) -> int | None:
        return None if self.counts is None else self.counts.get(schema.ENERGY, 0)

    def produces(self, key: str) -> bool | None:
        """Whether some configuration will carry the label ``key`` (``None``: not known before the run,
        or not a label the run decides, such as a key of the user's own)."""
        if key in ALWAYS_LABELS:
            return True
        for step, labels in STEP_LABELS.items():
            if key in labels:
                return bool(self.postprocess.get(step))
        if key in SETUP_LABELS:
            return None if self.counts is None else self.counts.get(key, 0) > 0
        if key in schema.LABELS and key not in CARRIED_KEYS:
            return False
        return None

    def source(self, key: str) -> str:
        """The setting that decides whether the run stores ``key``, as it stands."""
        for step, labels in STEP_LABELS.items():
            if key in labels:
                if step in self.skipped:
                    return (
                        f"postprocess.{step} is skipped ({self.skipped[step]}): give the dataset a "
                        f"{STEP_CODES[step]}"
                    )
                state = "on" if self.postprocess.get(step) else "off"
                return (
                    f"postprocess.{step} is {state} (it stores {key!r}: set the dataset overrides "
                    f"{{postprocess: {{{step}: true}}}} and give a {STEP_CODES[step]})"
                )
        n = self.n_configurations
        if key == schema.STRESS:
            return (
                "pw.x computes the stress of periodic bulk configurations only (tstress), those without a "
                f"vacuum gap of vacuum_gap = {self.inputs['vacuum_gap']} Å or more, and none of the {n} "
                "configurations is one"
            )
        if key == schema.DIPOLE:
            return (
                "pw.x reports the dipole of configurations run with its dipole correction only (dipfield: "
                f"slabs with dipole_correction: true, now {self.inputs['dipole_correction']}, and "
                f"configurations in an external_field), and none of the {n} configurations is one"
            )
        return (
            f"emlip.dataset does not compute {key!r}: label the structures otherwise and give them as a "
            "training set"
        )
