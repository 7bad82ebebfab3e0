"""How a child process ended, in the words a workchain's report and failure list use."""

from __future__ import annotations

from aiida import orm


def how_it_ended(node: orm.ProcessNode) -> str:
    """``killed`` (e.g. by ``verdi process kill``), ``excepted``, ``exit status N (message)`` or its state.

    A killed or excepted process has no exit status (``None``): naming the state says what happened
    where ``exit status None`` would not.
    """
    if node.is_killed:
        return "killed"
    if node.is_excepted:
        return "excepted"
    if node.is_finished:
        message = f" ({node.exit_message})" if node.exit_message else ""
        return f"exit status {node.exit_status}{message}"
    state = node.process_state
    return f"not finished ({state.value if state is not None else 'created'})"
