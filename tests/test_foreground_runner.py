"""The foreground runner: a parent resumes when its child ends, not at the next poll of the database."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiida import orm
from aiida.common.links import LinkType
from aiida.engine import ToContext, WorkChain, calcfunction
from aiida.engine.runners import Runner
from aiida.manage import get_manager

from aiida_emlip.workflows.foreground import ForegroundRunner, foreground_runner, run_get_node

#: A poll interval no test waits for: a parent that polls for its child would take a minute per child.
SLOW_POLL = 60.0


class _Child(WorkChain):
    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input("x", valid_type=orm.Int)
        spec.output("y", valid_type=orm.Int)
        spec.outline(cls.go)

    def go(self):
        if self.inputs.x.value < 0:
            raise ValueError("a negative input")
        self.out("y", self.inputs.x)


class _Parent(WorkChain):
    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input("x", valid_type=orm.Int)
        spec.input("depth", valid_type=orm.Int, default=lambda: orm.Int(3))
        spec.output("y", valid_type=orm.Int)
        spec.outline(cls.launch, cls.collect)
        spec.exit_code(400, "ERROR_CHILD", message="the child did not finish")

    def launch(self):
        depth = self.inputs.depth.value
        return ToContext(**{f"child_{i}": self.submit(_Child, x=self.inputs.x) for i in range(depth)})

    def collect(self):
        children = [self.ctx[f"child_{i}"] for i in range(self.inputs.depth.value)]
        if not all(child.is_finished_ok for child in children):
            return self.exit_codes.ERROR_CHILD
        self.out("y", children[0].outputs.y)


def _runner(poll_interval: float, cls: type[Runner] = ForegroundRunner) -> Runner:
    return cls(poll_interval=poll_interval, broker_submit=False, persister=get_manager().get_persister())


def test_parent_resumes_when_its_children_end(aiida_profile):
    runner = _runner(SLOW_POLL)
    start = time.perf_counter()
    outputs, node = runner.run_get_node(_Parent, x=orm.Int(7))
    elapsed = time.perf_counter() - start
    assert elapsed < SLOW_POLL / 2, f"{elapsed:.1f} s: the parent waited for the poll"
    assert node.is_finished_ok and outputs["y"].value == 7
    called = node.base.links.get_outgoing(link_type=LinkType.CALL_WORK).all()
    assert sorted(link.link_label for link in called) == ["CALL", "CALL", "CALL"]
    assert all(link.node.is_finished_ok and link.node.process_label == "_Child" for link in called)


def test_a_stock_runner_waits_for_the_poll(aiida_profile):
    """The contrast that makes the test above mean something: the same chain, polled every 1.5 s."""
    runner = _runner(1.5, Runner)
    start = time.perf_counter()
    _, node = runner.run_get_node(_Parent, x=orm.Int(7), depth=orm.Int(1))
    assert node.is_finished_ok and time.perf_counter() - start >= 1.5


def test_parent_learns_of_an_excepted_child_at_once(aiida_profile):
    runner = _runner(SLOW_POLL)
    start = time.perf_counter()
    _, node = runner.run_get_node(_Parent, x=orm.Int(-1), depth=orm.Int(1))
    assert time.perf_counter() - start < SLOW_POLL / 2
    assert node.exit_status == 400
    (child,) = node.called
    assert child.is_excepted and "a negative input" in child.exception


@calcfunction
def _double(x: orm.Int) -> orm.Int:
    return orm.Int(2 * x.value)


def test_a_process_it_did_not_start_is_polled(aiida_profile):
    """A process of another runner (here: already ended) is found by polling, and the callback runs once."""
    runner = _runner(0.05)
    _, other = _double.run_get_node(orm.Int(2))
    calls = []
    runner.call_on_process_finish(other.pk, lambda: calls.append(other.pk))
    runner.loop.run_until_complete(asyncio.sleep(0.3))
    assert calls == [other.pk]


def test_the_callback_runs_once_when_future_and_poll_both_see_the_end(aiida_profile):
    runner = _runner(0.01)
    calls = []
    instance = runner.instantiate_process(_Child, x=orm.Int(1))
    runner.call_on_process_finish(instance.node.pk, lambda: calls.append(1))
    runner.loop.run_until_complete(instance.step_until_terminated())
    runner.loop.run_until_complete(asyncio.sleep(0.2))  # many polls later
    assert instance.node.is_finished_ok and calls == [1]


def test_one_runner_per_profile_and_run_get_node(aiida_profile):
    assert foreground_runner() is foreground_runner()
    outputs, node = run_get_node(_Parent, x=orm.Int(5), depth=orm.Int(2))
    assert node.is_finished_ok and outputs["y"].value == 5


class _Job(WorkChain):
    """``levels`` workchains down, one ``core.arithmetic.add`` job (a calculation with the scheduler)."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input("code", valid_type=orm.AbstractCode)
        spec.input("levels", valid_type=orm.Int, default=lambda: orm.Int(0))
        spec.outline(cls.launch, cls.collect)

    def launch(self):
        from aiida.plugins import CalculationFactory

        levels = self.inputs.levels.value
        if levels > 0:
            return ToContext(child=self.submit(_Job, code=self.inputs.code, levels=orm.Int(levels - 1)))
        metadata = {"options": {"resources": {"num_machines": 1}}}
        inputs = {"code": self.inputs.code, "x": orm.Int(1), "y": orm.Int(2), "metadata": metadata}
        return ToContext(child=self.submit(CalculationFactory("core.arithmetic.add"), **inputs))

    def collect(self):
        pass


def _slow_add_code(pw_code, folder) -> orm.InstalledCode:
    """``bash`` behind a 30 s sleep that writes its PID first: a job still running when interrupted."""
    script = folder / "slow_bash"
    script.write_text(f'#!/bin/bash\necho $$ > {folder / "started"}\nsleep 30\nexec /bin/bash "$@"\n')
    script.chmod(0o755)
    return orm.InstalledCode(
        computer=pw_code.computer, filepath_executable=str(script), label=f"slow-add-{folder.name}"
    ).store()


def test_an_interrupt_kills_every_process_of_the_run(aiida_profile, pw_code, tmp_path):
    """Ctrl-C while a job runs two levels down: the job, its workchain and the root all end killed, at once
    (the job would take 30 s), the job's processes end, and the shell's signal handler is restored. The
    same runner then runs the next process normally. (AiiDA's own runner, without a broker, kills the root
    only and leaves the others waiting.)"""
    import os
    import signal
    import threading

    from plumpy.exceptions import KilledError

    code = _slow_add_code(pw_code, tmp_path)
    handler = signal.getsignal(signal.SIGINT)
    started, done = tmp_path / "started", threading.Event()
    sent: list[float] = []

    def interrupt_once_the_job_runs() -> None:
        while not started.exists():
            if done.wait(0.05):
                return  # the run ended without the job: send nothing
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)

    runner = _runner(0.5)
    thread = threading.Thread(target=interrupt_once_the_job_runs, daemon=True)
    thread.start()
    try:
        with pytest.raises(KilledError, match=r"received an interrupt \(SIGINT\)"):
            runner.run_get_node(_Job, code=code, levels=orm.Int(1))
    finally:
        done.set()
        thread.join()
    assert sent, "the job never started"
    elapsed = time.perf_counter() - sent[0]
    assert elapsed < 15, f"{elapsed:.1f} s after the interrupt: the run waited for the job"
    assert signal.getsignal(signal.SIGINT) is handler
    root = orm.QueryBuilder().append(orm.WorkflowNode, filters={"attributes.process_label": "_Job"})
    root = max((n for (n,) in root.all() if n.caller is None), key=lambda n: n.pk)
    child = root.called[0]
    job = child.called[0]
    assert job.process_type == "aiida.calculations:core.arithmetic.add"
    assert [n.is_killed for n in (root, child, job)] == [True, True, True], [
        n.process_state for n in (root, child, job)
    ]
    assert "received an interrupt (SIGINT) (killed with Process" in child.process_status
    assert _ends(int(started.read_text())), "the job itself is still running"
    outputs, node = runner.run_get_node(_Parent, x=orm.Int(5))
    assert node.is_finished_ok and outputs["y"].value == 5


def test_a_second_interrupt_stops_at_once_and_a_late_one_does_nothing(aiida_profile):
    """The first interrupt only schedules the kill; a second raises ``KeyboardInterrupt`` at once. Once
    the run is over, a kill still queued on the loop does nothing (it must not reach the next run)."""
    import signal

    from aiida_emlip.workflows.interrupt import RunInterrupt

    runner = _runner(SLOW_POLL)
    _, node = runner.run_get_node(_Parent, x=orm.Int(1), depth=orm.Int(1))
    interrupt = RunInterrupt(runner, root=None)  # the root is only read by a kill that starts
    interrupt.handler(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        interrupt.handler(signal.SIGINT, None)
    interrupt.finish(stopping=True)
    interrupt.start("an interrupt (SIGINT)")  # what the queued callback would do now
    assert interrupt.task is None
    runner.loop.run_until_complete(asyncio.sleep(0.05))  # run the queued callback too
    assert interrupt.task is None
    assert node.is_finished_ok


def _ends(pid: int, within: float = 5.0) -> bool:
    """Whether process ``pid`` is gone (or a zombie) within ``within`` seconds."""
    import psutil

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False
