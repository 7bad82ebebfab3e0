"""``emlip.train.base``: run ``emlip.train`` until it succeeds, restarting it after known failures.

A :class:`~aiida.engine.BaseRestartWorkChain` around :class:`EmlipTrainCalculation`. Before anything is
submitted the configuration and data are checked exactly as ``emlip-train --check`` does. After a
failed calculation, the process handlers below (highest priority first) decide how to restart:

- out of memory (exit code 360, or the scheduler's 110): halve ``data.batch_size`` (down to 1) and
  start again;
- NaN/inf while training (320): resume from the last checkpoint (or start again without one) at half
  the learning rate (``lr_scale``), at most twice;
- SCF failure (340): once, switch the head option ``on_failure`` from ``raise`` to ``flag`` (or, if it
  flags already, halve the head's ``mixing``) and start again;
- interrupted by a signal (330) or out of walltime (the scheduler's 120): resume from the checkpoint
  the calculation retrieved.

A checkpoint records the configuration it was written for, so a handler that changes the
configuration (batch size, head options) starts again from scratch; the learning-rate factor is not
part of it, so the NaN handler resumes. The validation and test structures (inputs
``train.valid_set`` and ``train.test_set``) go unchanged to every calculation. A warm start (input
``train.initial_model``) keeps its initial model through every restart: "from scratch" then means
from that model again.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import BaseRestartWorkChain, ProcessHandlerReport, process_handler, while_

from aiida_emlip.calculations.train import EmlipTrainCalculation, check_job

CALC = EmlipTrainCalculation
#: emlip-train's message when the loss, a gradient or the validation loss of training is not finite
#: (its messages for NaN/inf in the data, at load time, are different: a smaller step cannot help).
DIVERGED = re.compile(r"non-finite (loss|gradient|validation loss) at epoch")
DATA_NOT_FINITE = re.compile(r"contains NaN or inf|non-finite atomic positions|is not finite")


def _option_default(options: type, name: str) -> Any:
    for item in dataclasses.fields(options):
        if item.name == name:
            return item.default
    raise KeyError(name)


class EmlipTrainBaseWorkChain(BaseRestartWorkChain):
    """Run ``emlip.train`` (inputs under ``train``) and restart it after known, recoverable failures."""

    _process_class = EmlipTrainCalculation
    #: Restarts at half the learning rate after NaN/inf before giving up.
    max_non_finite_restarts = 2
    #: Factor applied to ``lr_scale`` at each of those restarts.
    lr_factor = 0.5

    @classmethod
    def define(cls, spec) -> None:
        super().define(spec)
        spec.expose_inputs(EmlipTrainCalculation, namespace="train")
        spec.expose_outputs(EmlipTrainCalculation)
        spec.outline(
            cls.setup,
            cls.validate_inputs,
            while_(cls.should_run_process)(
                cls.run_process,
                cls.inspect_process,
            ),
            cls.results,
        )
        spec.exit_code(
            201,
            "ERROR_INVALID_INPUTS",
            message="emlip-train --check refused the config or the dataset, nothing was submitted: {message}",
        )
        spec.exit_code(
            320,
            "ERROR_NON_FINITE",
            message="training stopped on NaN/inf; restarts at lower learning rates did not help, or the data "
            "hold NaN/inf.",
        )
        spec.exit_code(
            330,
            "ERROR_OUT_OF_WALLTIME_NO_CHECKPOINT",
            message="the job ran out of walltime before it wrote a checkpoint: raise "
            "max_wallclock_seconds or write checkpoints more often (checkpoint.every).",
        )
        spec.exit_code(
            340,
            "ERROR_SCF_FAILED",
            message="a self-consistent head did not converge, also after the head options were relaxed.",
        )
        spec.exit_code(
            360,
            "ERROR_OUT_OF_MEMORY",
            message="emlip-train ran out of memory with data.batch_size 1.",
        )

    def setup(self) -> None:
        """The calculation's inputs in ``ctx.inputs`` (the config as a plain mapping) and the counters."""
        super().setup()
        self.ctx.inputs = AttributeDict(self.exposed_inputs(EmlipTrainCalculation, "train"))
        self.ctx.inputs.config = self.ctx.inputs.config.get_dict()
        lr_scale = self.ctx.inputs.get("lr_scale")
        self.ctx.lr_scale = float(lr_scale.value) if lr_scale is not None else 1.0
        self.ctx.non_finite_restarts = 0
        self.ctx.scf_restarted = False

    def validate_inputs(self):
        """Check the config and the dataset as ``emlip-train --check`` does, before any submission."""
        from aiida_emlip.training.errors import TrainingError

        try:
            summary = check_job(
                self.ctx.inputs.config,
                self.ctx.inputs.dataset,
                self.ctx.inputs.get("initial_model"),
                self.ctx.inputs.get("valid_set"),
                self.ctx.inputs.get("test_set"),
            )
        except TrainingError as exc:
            self.report(f"emlip-train --check: {exc}")
            return self.exit_codes.ERROR_INVALID_INPUTS.format(message=str(exc))
        self.report(f"emlip-train --check: {summary}")
        return None

    # ------------------------------------------------------------------------------------ helpers
    def _restart_from_scratch(self) -> None:
        """The next calculation starts a new run (its config differs from the checkpoint's)."""
        self.ctx.inputs.pop("checkpoint", None)

    def _resume_from(self, node: orm.CalcJobNode) -> str:
        """The next calculation continues from ``node``'s checkpoint, or starts anew without one."""
        if "checkpoint" in node.outputs:
            self.ctx.inputs.checkpoint = node.outputs.checkpoint
            return f"resuming from its checkpoint<{node.outputs.checkpoint.pk}>"
        self._restart_from_scratch()
        return "it left no checkpoint: starting again from scratch"

    def _handled(self, node: orm.CalcJobNode, action: str) -> None:
        self.report(f"{node.process_label}<{node.pk}> failed with exit status {node.exit_status}: {action}")

    def _give_up(self, node: orm.CalcJobNode, why: str, exit_code) -> ProcessHandlerReport:
        self.report(f"{node.process_label}<{node.pk}> failed with exit status {node.exit_status}: {why}")
        return ProcessHandlerReport(True, exit_code)

    @staticmethod
    def _stderr(node: orm.CalcJobNode) -> str:
        try:
            return node.outputs.retrieved.get_object_content("stderr")
        except Exception:  # nothing retrieved, or no stderr
            return ""

    # ----------------------------------------------------------------------------------- handlers
    @process_handler(
        priority=600,
        exit_codes=[CALC.exit_codes.ERROR_OUT_OF_MEMORY, CALC.exit_codes.ERROR_SCHEDULER_OUT_OF_MEMORY],
    )
    def handle_out_of_memory(self, node: orm.CalcJobNode) -> ProcessHandlerReport:
        """Out of memory: halve ``data.batch_size`` (down to 1) and start again from scratch."""
        from aiida_emlip.training.config import DataConfig

        data = dict(self.ctx.inputs.config.get("data", {}))
        batch = int(data.get("batch_size", _option_default(DataConfig, "batch_size")))
        if batch <= 1:
            return self._give_up(
                node, "out of memory with data.batch_size 1", self.exit_codes.ERROR_OUT_OF_MEMORY
            )
        data["batch_size"] = max(1, batch // 2)
        self.ctx.inputs.config = {**self.ctx.inputs.config, "data": data}
        self._restart_from_scratch()
        self._handled(
            node,
            f"out of memory: data.batch_size {batch} -> {data['batch_size']}, starting again from scratch "
            "(a checkpoint is tied to its batch size)",
        )
        return ProcessHandlerReport(True)

    @process_handler(priority=500, exit_codes=CALC.exit_codes.ERROR_NON_FINITE)
    def handle_non_finite(self, node: orm.CalcJobNode) -> ProcessHandlerReport:
        """NaN/inf in training: resume from the last checkpoint at half the learning rate, at most twice."""
        stderr = self._stderr(node)
        if DATA_NOT_FINITE.search(stderr) and not DIVERGED.search(stderr):
            return self._give_up(
                node,
                "the training data hold NaN/inf; a lower learning rate cannot help",
                self.exit_codes.ERROR_NON_FINITE,
            )
        if self.ctx.non_finite_restarts >= self.max_non_finite_restarts:
            return self._give_up(
                node,
                f"NaN/inf again after {self.ctx.non_finite_restarts} restart(s) at lower learning rates "
                f"(lr_scale {self.ctx.lr_scale:g}); giving up",
                self.exit_codes.ERROR_NON_FINITE,
            )
        self.ctx.non_finite_restarts += 1
        self.ctx.lr_scale *= self.lr_factor
        self.ctx.inputs.lr_scale = orm.Float(self.ctx.lr_scale)
        where = self._resume_from(node)
        self._handled(
            node,
            f"NaN/inf in training (restart {self.ctx.non_finite_restarts} of "
            f"{self.max_non_finite_restarts}): "
            f"lr_scale {self.ctx.lr_scale:g} (learning rates at {self.ctx.lr_scale:g} times the configured "
            f"ones), {where}",
        )
        return ProcessHandlerReport(True)

    @process_handler(priority=400, exit_codes=CALC.exit_codes.ERROR_SCF_FAILED)
    def handle_scf_failure(self, node: orm.CalcJobNode) -> ProcessHandlerReport:
        """SCF not converged: once, head ``on_failure: flag`` (or half the ``mixing``), from scratch."""
        from aiida_emlip.models.heads import HEADS

        if self.ctx.scf_restarted:
            return self._give_up(
                node,
                "the SCF failed again after the head options were relaxed",
                self.exit_codes.ERROR_SCF_FAILED,
            )
        model = dict(self.ctx.inputs.config.get("model", {}))
        head = dict(model.get("head", {}))
        options = HEADS[head.get("name")].Options if head.get("name") in HEADS else None
        names = {f.name for f in dataclasses.fields(options)} if options else set()
        if (
            "on_failure" in names
            and head.get("on_failure", _option_default(options, "on_failure")) == "raise"
        ):
            head["on_failure"] = "flag"
            action = "head option on_failure raise -> flag (structures that do not converge are flagged)"
        elif "mixing" in names:
            mixing = float(head.get("mixing", _option_default(options, "mixing")))
            head["mixing"] = mixing / 2
            action = f"head option mixing {mixing:g} -> {head['mixing']:g}"
        else:
            return self._give_up(
                node, f"head {head.get('name')!r} has no option to relax", self.exit_codes.ERROR_SCF_FAILED
            )
        self.ctx.scf_restarted = True
        model["head"] = head
        self.ctx.inputs.config = {**self.ctx.inputs.config, "model": model}
        self._restart_from_scratch()
        self._handled(
            node, f"SCF failure: {action}; starting again from scratch (a checkpoint is tied to its model)"
        )
        return ProcessHandlerReport(True)

    @process_handler(
        priority=300,
        exit_codes=[CALC.exit_codes.ERROR_INTERRUPTED, CALC.exit_codes.ERROR_SCHEDULER_OUT_OF_WALLTIME],
    )
    def handle_interrupted(self, node: orm.CalcJobNode) -> ProcessHandlerReport:
        """Interrupted by a signal or out of walltime: resume from the checkpoint it retrieved."""
        walltime = node.exit_status == CALC.exit_codes.ERROR_SCHEDULER_OUT_OF_WALLTIME.status
        if walltime and "checkpoint" not in node.outputs:
            return self._give_up(
                node,
                "out of walltime before the first checkpoint; the same job would end the same way",
                self.exit_codes.ERROR_OUT_OF_WALLTIME_NO_CHECKPOINT,
            )
        why = "out of walltime" if walltime else "interrupted by a signal"
        self._handled(node, f"{why}: {self._resume_from(node)}")
        return ProcessHandlerReport(True)
