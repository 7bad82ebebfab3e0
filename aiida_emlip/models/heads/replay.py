"""Solver iterations replayed as CUDA graphs (no AiiDA).

On a GPU, a self-consistent head's small models are bound by kernel launches, not arithmetic: one
iteration of ``qeq``'s conjugate gradients (projected for inference, lock-step for training) is about
250 tensor operations (the Coulomb operator, the mesh preconditioner's inner steps, the CG updates),
each launched from Python, and costs about the same time from 1k to 17k atoms. An iteration has fixed
shapes within one solve, so it can be recorded once as a CUDA graph and replayed as one launch.

:class:`IterationReplay` runs one iteration ``step(state) → state`` (a tuple of tensors) in place on its
own copies of the state tensors: in ``graph`` mode captured as a CUDA graph and replayed; in ``emulate``
mode (any device, for tests) by calling ``step`` again on the same tensors, the data flow of a replay
without the graph (and, as a capture, once at the start with its results dropped). The first iteration
of a solve runs eagerly: it runs every operator of the step once (lazy initialisations such as cuFFT
plans are then done before a capture) and moves the solve on; the operators' set-up and the solve's
start are not replayed either. The solvers ask :func:`replay_mode` which to use; the default is
``eager`` (no replay), and :func:`replayed_iterations` switches it for a block of code (the calculator's
``cuda_graphs`` option). Should a capture fail (an operation that synchronises with the host, a library
that does not support capture), the solve goes on eagerly and no capture is tried again in the process.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator

import torch

State = tuple[torch.Tensor, ...]
Step = Callable[[State], State]

#: ``eager``: every iteration launched from Python; ``graph``: on a CUDA device, iterations replayed
#: as a CUDA graph (eager elsewhere); ``emulate``: the replay's data flow on any device, without a graph.
REPLAY_MODES = ("eager", "graph", "emulate")

_setting = threading.local()
_capture_failed = False


def replay_mode(device: torch.device) -> str:
    """How the solvers run their iterations on ``device`` in the current context."""
    mode = getattr(_setting, "mode", "eager")
    if mode == "graph" and (device.type != "cuda" or _capture_failed):
        return "eager"
    return mode


@contextlib.contextmanager
def replayed_iterations(mode: str = "graph") -> Iterator[None]:
    """Run the solvers' iterations in ``mode`` (:data:`REPLAY_MODES`) within the block (this thread)."""
    if mode not in REPLAY_MODES:
        raise ValueError(f"replay mode must be one of {REPLAY_MODES}, got {mode!r}")
    previous = getattr(_setting, "mode", "eager")
    _setting.mode = mode
    try:
        yield
    finally:
        _setting.mode = previous


class IterationReplay:
    """One iteration ``step`` of a solver, run in place on fixed state tensors.

    ``state``: the solver's state after an eager iteration (so that the lazy initialisations of the
    operators ``step`` applies, cuFFT plans for instance, are done before a capture); it is copied, and
    every call advances the copies by one iteration and returns them (the same tensor objects each time:
    read them before the next call). ``step`` must be a function of its argument and of tensors that
    stay alive and unchanged for the whole solve (the geometry's operators), and its outputs must have
    the shapes and dtypes of its inputs.
    """

    def __init__(self, step: Step, state: State, mode: str) -> None:
        self._step = step
        self.state = tuple(t.detach().clone() for t in state)
        self._graph = None
        if mode == "graph":
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph):
                self._write(step(self.state))
            self._graph = graph
        else:  # a capture's work: the step formed once, its results not kept (a capture runs nothing)
            with torch.no_grad():
                step(self.state)

    def _write(self, new: State) -> None:
        """Copy an iteration's results into the state tensors; a result that is itself another state
        tensor is copied out first (it would be overwritten before it is read)."""
        others = [[s for k, s in enumerate(self.state) if k != i] for i in range(len(self.state))]
        values = [v.clone() if any(v is s for s in others[i]) else v for i, v in enumerate(new)]
        for old, value in zip(self.state, values, strict=True):
            if value is not old:
                old.copy_(value)

    def __call__(self) -> State:
        if self._graph is not None:
            self._graph.replay()
        else:
            with torch.no_grad():
                self._write(self._step(self.state))
        return self.state


def start_replay(step: Step, state: State, mode: str) -> IterationReplay | None:
    """An :class:`IterationReplay` of ``step`` from ``state`` in ``mode``, or ``None`` to go on eagerly
    (``eager`` mode, or a capture that failed: then a warning, and no capture again in this process)."""
    global _capture_failed
    if mode == "eager":
        return None
    try:
        return IterationReplay(step, state, mode)
    except Exception as exc:  # a capture can fail inside any library: the solve goes on eagerly
        if mode != "graph":
            raise
        _capture_failed = True
        warnings.warn(
            f"solver iterations could not be captured as a CUDA graph ({type(exc).__name__}: {exc}); "
            "they run eagerly from now on",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def advance(
    step: Step, state: State, replay: IterationReplay | None, first: bool, mode: str
) -> tuple[State, IterationReplay | None]:
    """One iteration of a solver loop: by ``replay`` where one runs, else eagerly by ``step``; after the
    ``first`` iteration of a solve (eager: it runs every operator of the step once, so that lazy
    initialisations such as cuFFT plans are done before a capture) the replay of the others starts in
    ``mode``. Returns the new state and the replay to use next."""
    if replay is not None:
        return replay(), replay
    state = step(state)
    if first:
        replay = start_replay(step, state, mode)
    return (state if replay is None else replay.state), replay
