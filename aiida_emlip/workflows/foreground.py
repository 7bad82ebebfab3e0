"""Running processes in this shell, with each child's end noticed as it happens.

A workchain run in the foreground (``aiida.engine.run``) learns that a child it waits for has ended from
a broker broadcast where one arrives (measured here: none woke a parent run in the shell) and otherwise
by polling the database every ``runner.poll.interval`` seconds (the default SQLite profile has no
broker): each level of nesting then waits up to that interval after its child ended, at every step.
Children of a foreground run live in the same event loop as their parent, so :class:`ForegroundRunner`
attaches the wait to the child's own completion future instead and polls only as a fall-back. The
processes, their inputs, outputs and provenance are the same as with ``aiida.engine.run``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from aiida.common.exceptions import ConfigurationError
from aiida.engine.runners import Runner
from aiida.manage import get_manager
from aiida.orm import ProcessNode


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
