"""The foreground runner: a parent resumes when its child ends, not at the next poll of the database."""

from __future__ import annotations

import asyncio
import time

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
