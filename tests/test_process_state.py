"""How a child process ended, as the study and the validation workchains report it."""

from __future__ import annotations

import pytest
from aiida import orm
from aiida.engine import ExitCode, calcfunction
from plumpy import ProcessState

from aiida_emlip.workflows.process_state import how_it_ended


@calcfunction
def _fails_with(value: orm.Int):
    if value.value < 0:
        raise ValueError("negative")
    return ExitCode(value.value, "labels missing") if value.value else orm.Int(1)


def test_finished_failed_and_excepted_processes(aiida_profile):
    _, ok = _fails_with.run_get_node(orm.Int(0))
    assert how_it_ended(ok) == "exit status 0"
    _, failed = _fails_with.run_get_node(orm.Int(310))
    assert how_it_ended(failed) == "exit status 310 (labels missing)"
    with pytest.raises(ValueError):
        _fails_with(orm.Int(-1))
    excepted = orm.QueryBuilder().append(orm.CalcFunctionNode, tag="c").order_by({"c": {"ctime": "desc"}})
    node = excepted.first()[0]
    assert node.is_excepted and how_it_ended(node) == "excepted"


def test_killed_and_running_processes(aiida_profile):
    """``verdi process kill`` leaves a node in the killed state without an exit status."""
    killed = orm.WorkflowNode()
    killed.set_process_state(ProcessState.KILLED)
    assert killed.exit_status is None and how_it_ended(killed) == "killed"
    waiting = orm.WorkflowNode()
    waiting.set_process_state(ProcessState.WAITING)
    assert how_it_ended(waiting) == "not finished (waiting)"
    assert how_it_ended(orm.WorkflowNode()) == "not finished (created)"
