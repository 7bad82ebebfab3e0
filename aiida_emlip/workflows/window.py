"""A work chain that wakes as soon as the first of the children it waits for terminates.

AiiDA's ``WorkChain`` goes on to its next step once *every* child returned in ``ToContext`` has
terminated. A rolling window of ``max_concurrent`` children needs the opposite: a step as soon as *one*
of them ends, so that the next child starts in its slot. :class:`WakeOnFirstChild` does that on top of
aiida-core's own awaitable handling (aiida-core 2.9, pinned in ``pyproject.toml``):

* when a child it waits for terminates, that child is resolved into the context as usual, the others are
  dropped from the list of awaitables (they keep running) and the work chain resumes;
* the next step returns ``ToContext`` again for the children that still run;
* each child gets one finish callback per worker (:meth:`_action_awaitables` remembers which children it
  already watches), so waking often does not pile up pollers or broadcast subscribers; a callback of a
  child that is not awaited at that moment is ignored (the next step sees the child terminated).

The awaitables are checkpointed as usual (a daemon restart registers the callbacks again).
"""

from __future__ import annotations

import functools

from aiida.engine import WorkChain
from plumpy.process_states import ProcessState


class WakeOnFirstChild(WorkChain):
    """A ``WorkChain`` whose steps resume when the first awaited child terminates, not the last."""

    def _watched(self) -> set[int]:
        """The pks of the children whose finish callback this worker registered (not checkpointed)."""
        if not hasattr(self, "_watched_pks"):
            self._watched_pks: set[int] = set()
        return self._watched_pks

    def _action_awaitables(self) -> None:
        """Register one finish callback per awaited child that has none in this worker yet."""
        watched = self._watched()
        for awaitable in self._awaitables:
            if awaitable.pk in watched:
                continue
            watched.add(awaitable.pk)
            callback = functools.partial(self.call_soon, self._on_child_terminated, awaitable.pk)
            self.runner.call_on_process_finish(awaitable.pk, callback)

    def _on_child_terminated(self, pk: int) -> None:
        """Resolve the child ``pk`` if it is awaited now, drop the other awaitables and resume."""
        self._watched().discard(pk)
        awaitable = next((a for a in self._awaitables if a.pk == pk), None)
        if awaitable is None:  # not awaited right now: the next step finds it terminated
            return
        self._on_awaitable_finished(awaitable)
        if self._awaitables and self.state == ProcessState.WAITING:
            self._awaitables.clear()
            self._update_process_status()
            self.resume()
