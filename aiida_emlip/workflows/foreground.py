"""Running processes in this shell, with each child's end noticed as it happens.

A workchain run in the foreground (``aiida.engine.run``) learns that a child it waits for has ended from
a broker broadcast where one arrives (measured here: none woke a parent run in the shell) and otherwise
by polling the database every ``runner.poll.interval`` seconds (the default SQLite profile has no
broker): each level of nesting then waits up to that interval after its child ended, at every step.
Children of a foreground run live in the same event loop as their parent, so :class:`ForegroundRunner`
attaches the wait to the child's own completion future instead and polls only as a fall-back. The
processes, their inputs, outputs and provenance are the same as with ``aiida.engine.run``.

An interrupt (Ctrl-C, SIGTERM) differs too. AiiDA's runner kills the process from inside the signal
handler, which can land in the middle of a database transaction, and without a broker it cannot reach the
children, which stay ``Waiting`` in the profile with their jobs running. Here the first interrupt only
schedules the kill on the event loop, between two steps: every process this runner started is killed,
the workchains first (so that none launches another calculation), then the calculations through their
scheduler (so that their jobs end). A second interrupt stops the shell at once (``KeyboardInterrupt``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import weakref
from collections.abc import Callable
from typing import Any

import plumpy
from aiida.common.datastructures import CalcJobState
from aiida.common.exceptions import ConfigurationError
from aiida.engine import utils
from aiida.engine.runners import Runner
from aiida.manage import get_manager
from aiida.orm import CalcJobNode, ProcessNode
from plumpy import run_with_portal, sync_await

LOGGER = logging.getLogger(__name__)


class ForegroundRunner(Runner):
    """A runner whose parents resume the moment a child started in this runner ends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._killing: asyncio.Task | None = None
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

    def _run(
        self, process: Any, inputs: dict[str, Any] | None = None, **kwargs: Any
    ) -> tuple[Any, ProcessNode]:
        inputs = utils.prepare_inputs(inputs, **kwargs)
        if utils.is_process_function(process):
            return process.run_get_node(**inputs)
        with utils.loop_scope(self.loop):
            root = self.instantiate_process(process, **inputs)
            interrupts = 0

            def interrupted(signum: int, _frame: Any) -> None:
                nonlocal interrupts
                interrupts += 1
                if interrupts > 1:
                    raise KeyboardInterrupt
                # a signal handler may run inside any statement, a database transaction included: the
                # kill itself waits for the loop
                reason = f"an interrupt ({signal.Signals(signum).name})"
                self.loop.call_soon_threadsafe(self._schedule_kill, root, reason)

            previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                for sig in previous:
                    signal.signal(sig, interrupted)
                root.execute()
            finally:
                if self._killing is not None:  # the root ended killed: its calculations are still going
                    self.loop.run_until_complete(self._killing)
                    self._killing = None
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            return root.outputs, root.node

    def _schedule_kill(self, root: Any, reason: str) -> None:
        self._silence_interrupted_tasks(f"the runner received {reason}")
        # a task with a portal: killing a calculation awaits its scheduler from synchronous code
        self._killing = self.loop.create_task(run_with_portal(self.kill_started, root, reason))

    def _silence_interrupted_tasks(self, text: str) -> None:
        """Drop the tracebacks of the transport tasks that this kill interrupts (messages holding ``text``).

        AiiDA logs each one, and asyncio again when the task is collected: dozens of lines for a kill that
        went as asked. Anything else still reaches the log and the loop's handler.
        """
        previous = self.loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            if text in str(context.get("exception", "")):
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        self.loop.set_exception_handler(handler)
        logging.getLogger("aiida.engine.transports").addFilter(lambda record: text not in record.getMessage())

    def kill_started(self, root: Any, reason: str = "an interrupt") -> None:
        """Kill ``root`` and every live process this runner started.

        The workchains go first, all at once, so that none takes another step (such as launching the next
        calculation) when a child it waits for ends. The calculations' jobs are then cancelled through
        their scheduler, once each, and the calculations killed.
        """
        message = f"Process was killed because the runner received {reason}"
        others = [self._started.get(pk) for pk in sorted(self._started.keys(), reverse=True)]
        live = [root, *(p for p in others if p is not None and p is not root)]
        live = [p for p in live if not p.has_terminated()]
        jobs = [p for p in live if isinstance(p.node, CalcJobNode)]
        workflows = [p for p in live if p not in jobs]
        pending = [_kill(p, message, root) for p in workflows]
        sync_await(asyncio.gather(*(self._cancel_job(p.node) for p in jobs)))
        pending += [_kill(p, message, root) for p in jobs]
        for future in pending:
            if not isinstance(future, asyncio.Future):
                continue
            try:  # it was taking a step: killed once the step stops
                sync_await(asyncio.wait_for(asyncio.shield(future), KILL_WAIT_S))
            except Exception as error:  # the others are killed all the same
                LOGGER.warning("a process did not confirm its kill in %.0f s: %s", KILL_WAIT_S, error)

    async def _cancel_job(self, node: CalcJobNode) -> None:
        """Cancel the scheduler job of ``node`` if it has one that may still run; once, never retried.

        AiiDA's own kill retries a failed cancel with a growing back-off (20 s, then 40 s, ...), and
        cancelling a job that has just ended fails (the direct scheduler cannot find its process): a
        killed run then seemed to hang for minutes.
        """
        job_id = node.get_job_id()
        if job_id is None or node.get_state() != CalcJobState.WITHSCHEDULER:
            return
        try:
            async with self.transport.request_transport(node.get_authinfo()) as request:
                transport = await asyncio.wait_for(request, KILL_WAIT_S)
                scheduler = node.computer.get_scheduler()
                scheduler.set_transport(transport)
                scheduler.kill_job(job_id)
        except Exception as error:  # it ended meanwhile, or its machine cannot be reached now
            LOGGER.info("job %s of Process<%s> not cancelled: %s", job_id, node.pk, error)


#: Attempts to kill a process whose current step is just ending (a kill then meets a finished task), and
#: the seconds to wait for a process that was taking a step to confirm its kill (or for a transport).
KILL_ATTEMPTS = 40
KILL_WAIT_S = 30.0


def _kill(process: Any, message: str, root: Any) -> Any:
    """Kill ``process`` (the state change only: its job, if any, is cancelled apart) once the loop lets it.

    A process whose waiting task ended a moment ago refuses the kill (``InvalidStateError``) until the
    loop has moved it on, which takes a few iterations."""
    text = message if process is root else f"{message} (killed with Process<{root.node.pk}>)"
    for _ in range(KILL_ATTEMPTS):
        if process.has_terminated():
            return True
        try:
            return plumpy.Process.kill(process, msg_text=text)
        except asyncio.InvalidStateError:
            sync_await(asyncio.sleep(0.05))
    LOGGER.warning("Process<%s> could not be killed: %s", process.node.pk, text)
    return False


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
