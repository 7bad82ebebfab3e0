"""Ctrl-C (or SIGTERM) during a foreground run: every process of the run killed, in an order that holds.

AiiDA's runner kills the process it runs from inside the signal handler, which can land in the middle of
a database transaction, and without a broker it cannot reach the children, which stay ``Waiting`` in
the profile with their jobs running. Its kill of a calculation also cancels the job through the
scheduler and retries a failed cancel with a growing back-off (20 s, then 40 s, ...); cancelling a job
that has just ended fails (the direct scheduler cannot find its process), so a killed run seemed to hang
for minutes.

Here (:class:`RunInterrupt`, installed by :class:`~aiida_emlip.workflows.foreground.ForegroundRunner`)
the first interrupt only schedules the kill on the event loop, between two steps. :func:`kill_started`
then kills every workchain the runner started, all at once, so that none launches another calculation
when a child it waits for ends; cancels each job that may still run through its scheduler, once and
without retries; and kills the calculations. A second interrupt stops the shell at once
(``KeyboardInterrupt``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import plumpy
from aiida.common.datastructures import CalcJobState
from aiida.orm import CalcJobNode
from plumpy import run_with_portal, sync_await

LOGGER = logging.getLogger(__name__)

#: Attempts to kill a process whose current step is just ending (a kill then meets a finished task), and
#: the seconds to wait for a process that was taking a step to confirm its kill (or for a transport).
KILL_ATTEMPTS = 40
KILL_WAIT_S = 30.0
#: In the message of every kill made here, and so in the tracebacks of the tasks such a kill interrupts.
KILL_MARKER = "because the runner received an interrupt"


class RunInterrupt:
    """The interrupts of one foreground run of ``root`` in ``runner``: :meth:`handler` is the signal
    handler while it runs; :meth:`finish` ends the kill (if any) once ``root`` has ended."""

    def __init__(self, runner: Any, root: Any) -> None:
        self.runner = runner
        self.root = root
        self.count = 0
        self.active = True
        self.task: asyncio.Task | None = None

    def handler(self, signum: int, _frame: Any) -> None:
        """The first interrupt schedules the kill on the loop; a second one stops at once."""
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt
        reason = f"an interrupt ({signal.Signals(signum).name})"
        self.runner.loop.call_soon_threadsafe(self.start, reason)

    def start(self, reason: str) -> None:
        """Start :func:`kill_started` as a task (one with a portal: cancelling a job awaits the scheduler
        from synchronous code). Nothing once this run is over: a late call must not touch the next."""
        if not self.active or self.task is not None:
            return
        silence_interrupted_tasks(self.runner.loop)
        kill = run_with_portal(kill_started, self.runner, self.root, reason)
        self.task = self.runner.loop.create_task(kill)

    def finish(self, stopping: bool = False) -> None:
        """After ``root`` has ended: wait for the kill to be over (cancel it when ``stopping`` at once).

        Errors of the kill are logged, never raised: the shell reports the root's end."""
        self.active = False
        task, self.task = self.task, None
        if task is None:
            return
        if stopping:
            task.cancel()
            return
        try:
            if not task.done():
                plumpy.run_until_complete(self.runner.loop, task)
            task.result()  # raises what the kill raised (CancelledError if it was cancelled)
        except KeyboardInterrupt:
            task.cancel()
            raise
        except (Exception, asyncio.CancelledError) as error:
            LOGGER.warning("the kill of Process<%s> did not finish: %r", self.root.node.pk, error)


def kill_started(runner: Any, root: Any, reason: str = "an interrupt") -> None:
    """Kill ``root`` and every live process ``runner`` started: the workchains at once, then the jobs
    cancelled through their scheduler (once each), then the calculations. Every failure is logged and the
    others are killed all the same."""
    message = f"Process was killed because the runner received {reason}"
    live = [root, *(p for p in runner.started_processes() if p is not root)]
    live = [p for p in live if not p.has_terminated()]
    jobs = [p for p in live if isinstance(p.node, CalcJobNode)]
    workflows = [p for p in live if p not in jobs]
    pending = [_kill(p, message, root) for p in workflows]
    before = {p.node.pk: p.node.get_job_id() for p in jobs}
    sync_await(asyncio.gather(*(_cancel_job(runner, p.node) for p in jobs)))
    pending += [_kill(p, message, root) for p in jobs]
    for future in pending:
        if not isinstance(future, asyncio.Future):
            continue
        try:  # it was taking a step: killed once the step stops
            sync_await(asyncio.wait_for(asyncio.shield(future), KILL_WAIT_S))
        except (Exception, asyncio.CancelledError) as error:
            LOGGER.warning("a process did not confirm its kill in %.0f s: %r", KILL_WAIT_S, error)
    # a job submitted while the others were being killed (no job id at first): cancel it too
    late = [p.node for p in jobs if before[p.node.pk] is None and p.node.get_job_id() is not None]
    sync_await(asyncio.gather(*(_cancel_job(runner, node, submitted=True) for node in late)))


async def _cancel_job(runner: Any, node: CalcJobNode, submitted: bool = False) -> None:
    """Cancel the scheduler job of ``node`` if it may still run (with the scheduler, or ``submitted``
    during the kill); once, never retried: a job that ended meanwhile is over."""
    job_id = node.get_job_id()
    if job_id is None or not (submitted or node.get_state() == CalcJobState.WITHSCHEDULER):
        return
    try:
        async with runner.transport.request_transport(node.get_authinfo()) as request:
            transport = await asyncio.wait_for(asyncio.shield(request), KILL_WAIT_S)
            scheduler = node.computer.get_scheduler()
            scheduler.set_transport(transport)
            if scheduler.kill_job(job_id) is not True:
                LOGGER.info("job %s of Process<%s>: the scheduler refused the cancel", job_id, node.pk)
    except Exception as error:  # it ended meanwhile, or its machine cannot be reached now
        LOGGER.info("job %s of Process<%s> not cancelled: %r", job_id, node.pk, error)


def _kill(process: Any, message: str, root: Any) -> Any:
    """Kill ``process`` (the state change only: its job, if any, is cancelled apart) once the loop lets it.

    A process whose waiting task ended a moment ago refuses the kill (``InvalidStateError``) until the
    loop has moved it on, which takes a few iterations. Any other failure is logged: the kill goes on
    with the other processes."""
    text = message if process is root else f"{message} (killed with Process<{root.node.pk}>)"
    for _ in range(KILL_ATTEMPTS):
        if process.has_terminated():
            return True
        try:
            return plumpy.Process.kill(process, msg_text=text)
        except asyncio.InvalidStateError:
            sync_await(asyncio.sleep(0.05))
        except Exception as error:
            LOGGER.warning("Process<%s> could not be killed: %r", process.node.pk, error)
            return False
    LOGGER.warning("Process<%s> could not be killed: its step did not end", process.node.pk)
    return False


def _not_interrupted(record: logging.LogRecord) -> bool:
    return KILL_MARKER not in record.getMessage()


def silence_interrupted_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Drop the tracebacks of the transport tasks that a kill made here interrupts (their messages hold
    :data:`KILL_MARKER`): AiiDA logs each one, and asyncio again when the task is collected, dozens of
    lines for a kill that went as asked. Installed once per loop; anything else still reaches the log
    and the loop's previous handler."""
    logging.getLogger("aiida.engine.transports").addFilter(_not_interrupted)  # once: a filter is a set
    previous = loop.get_exception_handler()
    if getattr(previous, "drops_interrupted_tasks", False):
        return

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if KILL_MARKER in str(context.get("exception", "")):
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler.drops_interrupted_tasks = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)
