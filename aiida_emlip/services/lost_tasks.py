"""Active processes whose task is no longer in RabbitMQ's queue: no daemon worker will ever continue them.

A daemon worker that is stopped while it runs processes can lose their tasks (aiida-core deletes a task
that a still-running worker receives again as a duplicate); the processes then stay ``waiting`` for
good. ``verdi process repair`` sends their tasks again. The queue can only be read while no daemon runs:
a running worker holds the tasks of its processes, unacknowledged, out of the queue's view.
"""

from __future__ import annotations

from dataclasses import dataclass


def repair_fix(profile_name: str) -> str:
    """The commands that send the lost tasks again (the daemon is stopped when they are found)."""
    return f"verdi -p {profile_name} process repair   (then: verdi -p {profile_name} daemon start)"


@dataclass(frozen=True)
class TaskCheck:
    """The outcome: ``daemon_running`` (then nothing was read), the active processes and those lost."""

    daemon_running: bool
    active: tuple[int, ...] = ()
    lost: tuple[int, ...] = ()


def check_process_tasks(profile_name: str, daemon_running: bool | None = None) -> TaskCheck:
    """Compare the loaded profile's active processes with the process tasks in its broker's queue.

    ``daemon_running``: whether a daemon runs, as the caller found out (``None``: aiida-core's answer,
    the presence of the daemon's PID file, which a crash leaves behind)."""
    from aiida.engine.daemon.client import get_daemon_client
    from aiida.engine.processes.control import get_active_processes, get_process_tasks
    from aiida.manage import get_manager

    if daemon_running is None:
        daemon_running = get_daemon_client(profile_name).is_daemon_running
    if daemon_running:
        return TaskCheck(daemon_running=True)
    active = sorted(get_active_processes(project="id"))
    tasks = set(get_process_tasks(get_manager().get_broker()))
    return TaskCheck(False, tuple(active), tuple(pk for pk in active if pk not in tasks))
