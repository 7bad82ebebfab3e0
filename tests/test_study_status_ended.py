"""``aiida-emlip status`` of a study that was killed or excepted: what it lost and kept, in words.

The process tree is built by hand (no daemon): a study killed in the middle of its DFT, with three
pw.x configurations done (one killed in its post-processing), two killed (the pw.x run of one still
finished) and one never started.
"""

from __future__ import annotations

from aiida import orm
from aiida.common.links import LinkType
from plumpy import ProcessState

from aiida_emlip.cli.study_common import STUDY_ENTRY_POINT
from aiida_emlip.cli.study_status import PW_PROCESS, render, status_lines

SPEC = {"name": "tiny", "designs": {"sr": {}, "charges": {}}, "validations": {"response": {}}}


def _process(state: ProcessState, parent=None, label: str | None = None, exit_status: int | None = None):
    node = orm.WorkflowNode()
    node.set_process_state(state)
    if exit_status is not None:
        node.set_exit_status(exit_status)
    if parent is not None:
        node.base.links.add_incoming(parent, LinkType.CALL_WORK, label)
    return node.store()


def _pw_calculation(parent, state: ProcessState, exit_status: int | None = None):
    calc = orm.CalcJobNode()
    calc.set_process_type(PW_PROCESS)
    calc.set_process_state(state)
    if exit_status is not None:
        calc.set_exit_status(exit_status)
    calc.base.links.add_incoming(parent, LinkType.CALL_CALC, "iteration_01")
    return calc.store()


def _study(state: ProcessState):
    study = orm.WorkflowNode()
    study.set_process_type(STUDY_ENTRY_POINT)
    study.base.links.add_incoming(orm.Dict(SPEC).store(), LinkType.INPUT_WORK, "spec")
    study.set_process_state(state)
    study.store()
    study.base.extras.set("emlip_stage", "dft")
    return study


def _killed_in_dft():
    study = _study(ProcessState.KILLED)
    study.set_process_status("Killed through `verdi process kill`")
    dft = _process(ProcessState.KILLED, study, "dft")
    # the extras as the dataset workchain left them at its last step
    dft.base.extras.set("emlip_progress", {"done": 2, "running": 2, "failed": 0, "waiting": 1, "total": 6})
    # one label workchain per configuration, its PwBaseWorkChain called "pw"
    for key in ("a", "b"):  # b finished before the kill reached it
        label = _process(ProcessState.FINISHED, dft, f"label_{key}", exit_status=0)
        _pw_calculation(_process(ProcessState.FINISHED, label, "pw", exit_status=0), ProcessState.FINISHED, 0)
    # killed in its post-processing: the pw.x labels were done
    label = _process(ProcessState.KILLED, dft, "label_e")
    _pw_calculation(_process(ProcessState.FINISHED, label, "pw", exit_status=0), ProcessState.FINISHED, 0)
    # a killed configuration whose pw.x run still finished: the calculation is kept
    label = _process(ProcessState.KILLED, dft, "label_c")
    _pw_calculation(_process(ProcessState.KILLED, label, "pw"), ProcessState.FINISHED, 0)
    label = _process(ProcessState.KILLED, dft, "label_d")
    _pw_calculation(_process(ProcessState.KILLED, label, "pw"), ProcessState.KILLED)
    return study, dft


def test_killed_study_says_what_was_lost(aiida_profile):
    study, dft = _killed_in_dft()
    lines = render(status_lines(study))
    text = "\n".join(lines)
    assert lines[0] == f"Study 'tiny' <{study.pk}>: killed (stage: dft)"
    assert lines[1] == "  Killed through `verdi process kill`"
    assert (
        f"DFT <{dft.pk}> killed: 3 done, 2 killed, 0 failed, 1 never started of 6 pw.x configurations"
        in lines
    )
    assert "  sr           not run" in lines and "  response     not run" in lines
    assert (
        "Lost (killed at stage dft): 3 of 6 pw.x configurations (2 killed, 1 never started); "
        "training of sr, charges; validation response; held-out predictions; the report"
    ) in lines
    assert "Kept: 4 finished pw.x calculations (stored in the profile)" in lines
    assert "None" not in text and "running" not in text and "waiting" not in text


def test_excepted_study_gives_the_error_not_the_traceback(aiida_profile):
    study = _study(ProcessState.EXCEPTED)
    study.set_exception('Traceback (most recent call last):\n  File "x.py", line 1\nValueError: boom\n')
    lines = render(status_lines(study))
    assert lines[:3] == [
        f"Study 'tiny' <{study.pk}>: excepted (stage: dft)",
        "  ValueError: boom",
        "DFT: not run",
    ]
    assert lines[-1] == (
        "Lost (excepted at stage dft): every pw.x configuration (none started); training of sr, charges; "
        "validation response; held-out predictions; the report"
    )
    assert "Traceback" not in "\n".join(lines)


def test_running_study_is_unchanged(aiida_profile):
    study = _study(ProcessState.WAITING)
    assert render(status_lines(study))[1] == "DFT: not started"
    dft = _process(ProcessState.WAITING, study, "dft")
    dft.base.extras.set("emlip_progress", {"done": 1, "running": 2, "failed": 0, "waiting": 1, "total": 4})
    lines = render(status_lines(study))
    assert f"DFT <{dft.pk}> waiting: 1 done, 2 running, 0 failed, 1 waiting of 4 pw.x configurations" in lines
    assert "  sr           waiting" in lines and "  response     waiting" in lines
    assert not any(line.startswith(("Lost", "Kept")) for line in lines)
