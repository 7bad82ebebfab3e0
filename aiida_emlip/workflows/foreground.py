"""Running processes in this shell, with each child's end noticed as it happens.

A workchain run in the foreground (``aiida.engine.run``) learns that a child it waits for has ended from
a broker broadcast where one arrives (measured here: none woke a parent run in the shell) and otherwise
by polling the database every ``runner.poll.interval`` seconds (the default SQLite profile has no
broker): each level of nesting then waits up to that interval after its child ended, at every step.
Children of a foreground run live in the same event loop as their parent, so :class:`ForegroundRunner`
attaches the wait to the child's own completion future instead and polls only as a fall-back. The
processes, their inputs, outputs and provenance are the same as with ``aiida.engine.run``.

An interrupt (Ctrl-C, SIGTERM) kills every process the run started, in an order that holds
(:mod:`aiida_emlip.workflows.interrupt`); a second one stops the shell at once.
"""

from __future__ import annotations

import signal
import weakref
from collections.abc import Callable
from typing import Any

from aiida.common.exceptions import ConfigurationError
from aiida.engine import utils
from aiida.engine.runners import Runner
from aiida.manage import get_manager
from aiida.orm import ProcessNode

from .interrupt import RunInterrupt


class ForegroundRunner(Runner):
    """A runner whose parents resume the moment a child started in this runner ends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._started: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()

    def instantiate_process(self, process: Any, **inputs: Any) -> Any:
        instance = super().instantiate_process(process, **inputs)
        if instance.node.pk is not None:  # stored: a parent may wait for it
            self._started[instance.node.pk] = instance
        return instance

    def call_on_process_finish(self, pk: int, callback: Callable[[], Any]) -> None:
        done = False

        def once() -> None:
            nonlocal done
            if not done:
                done = True
                callback()

        instance = self._started.get(pk)
        if instance is not None:
            node = instance.node

            def ended(_: Any) -> None:
                # Called from the loop once the state change that resolved the future is over; should the
                # node not say so yet, the runner's own polling below still notices the end.
                if node.is_terminated:
                    once()

            instance.future().add_done_callback(ended)
        super().call_on_process_finish(pk, once)

    def started_processes(self) -> list[Any]:
        """The processes this runner started that are still in memory, newest first."""
        found = (self._started.get(pk) for pk in sorted(self._started.keys(), reverse=True))
        return [process for process in found if process is not None]

    def _run(
        self, process: Any, inputs: dict[str, Any] | None = None, **kwargs: Any
    ) -> tuple[Any, ProcessNode]:
        assert not self._closed
        inputs = utils.prepare_inputs(inputs, **kwargs)
        if utils.is_process_function(process):
            return process.run_get_node(**inputs)
        with utils.loop_scope(self.loop):
            root = self.instantiate_process(process, **inputs)
            interrupt = RunInterrupt(self, root)
            previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                for sig in previous:
                    signal.signal(sig, interrupt.handler)
                try:
                    root.execute()
                except KeyboardInterrupt:  # a second interrupt: stop at once
                    interrupt.finish(stopping=True)
                    raise
                finally:
                    interrupt.finish()  # a kill under way: its calculations are still being stopped
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            return root.outputs, root.node


#: One runner per profile, kept like the profile's own runner: it shares the thread's event loop, which
#: closing it would close.
_RUNNERS: dict[str, ForegroundRunner] = {}


def foreground_runner() -> ForegroundRunner:
    """The :class:`ForegroundRunner` of the loaded profile, configured as the profile's own runner is."""
    manager = get_manager()
    profile = manager.get_profile()
    if profile is None:
        raise ConfigurationError("no AiiDA profile is loaded")
    runner = _RUNNERS.get(profile.name)
    if runner is None or runner.is_closed():
        poll = 0.0 if profile.is_test_profile else manager.get_option("runner.poll.interval")
        settings: dict[str, Any] = {
            "broker_submit": False,
            "poll_interval": poll,
            "persister": manager.get_persister(),
        }
        try:
            settings["communicator"] = manager.get_communicator()
        except ConfigurationError:  # a profile without a broker: futures, then polling
            pass
        runner = _RUNNERS[profile.name] = ForegroundRunner(**settings)
    return runner


def run_get_node(process: Any, **inputs: Any) -> tuple[dict[str, Any], ProcessNode]:
    """Run ``process`` (a builder, or a class with ``inputs``) in this shell; its outputs and node."""
    return foreground_runner().run_get_node(process, **inputs)
