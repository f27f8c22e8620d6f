"""Cheap time budgets for code on every request's path.

``asyncio.timeout()`` arms and disarms an event-loop timer for every block it guards; on the
policy daemon's hot path (a budget per check per request) that costs more than a fast check
itself. :class:`Watchdog` keeps the budgets of one event loop in a heap and arms one loop timer
for the earliest; a block that finishes in time only marks its entry done. The semantics are
``asyncio.timeout()``'s: when the budget runs out the task is cancelled, and the block raises
``TimeoutError`` instead of ``CancelledError``; a cancellation from elsewhere passes through.

Expiry is checked at ``resolution`` granularity (a budget may run up to twice that much longer),
which is fine for budgets of seconds.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
from types import TracebackType
from typing import ClassVar, Self

from mxward.shared.aio import current_task, running_loop

__all__ = ["Watchdog"]


class _Budget:
    __slots__ = ("_cancelling", "_done", "_expired", "_length", "_task", "_watchdog", "_when")

    def __init__(self, watchdog: Watchdog, when: float, length: int) -> None:
        self._watchdog = watchdog
        self._when = when
        self._task: asyncio.Task[object] | None = None
        self._done = False
        self._expired = False
        self._cancelling = 0
        self._length = length  # in resolution steps: budgets of one length share a FIFO queue

    async def __aenter__(self) -> Self:
        return self.enter()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.leave() and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc

    def enter(self) -> Self:
        """Start the budget for the current task (what ``async with`` does, without awaiting)."""
        task = current_task()
        if task is None:
            raise RuntimeError("a time budget needs a running task")
        self._task = task
        self._cancelling = task.cancelling()
        self._watchdog._add(self)  # noqa: SLF001
        return self

    def leave(self) -> bool:
        """End the budget; True if it ran out (a CancelledError from the block is then ours).

        An expired budget always takes its cancellation back (uncancel), whatever the block
        raised; only the CancelledError it caused becomes TimeoutError.
        """
        self._done = True
        task = self._task
        return self._expired and task is not None and task.uncancel() <= self._cancelling

    def _expire(self) -> None:
        if not self._done and self._task is not None:
            self._expired = True
            self._task.cancel()


class Watchdog:
    """Time budgets for the tasks of one event loop, served by one timer.

    Budgets of the same length (to the resolution) end in the order they began, so each length
    has a FIFO queue (adding is an append); the few that do not fit a queue (a budget cut short by a request
    deadline, say) go to a heap. The timer is armed for the earliest end.
    """

    _MAX_QUEUES: ClassVar[int] = 32

    def __init__(self, resolution: float = 0.01) -> None:
        self._resolution = resolution
        self._queues: dict[int, collections.deque[_Budget]] = {}
        self._heap: list[tuple[float, int, _Budget]] = []
        self._counter = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = float("inf")
        self._loop: asyncio.AbstractEventLoop | None = None

    def budget(self, seconds: float) -> _Budget:
        """``async with watchdog.budget(2.0): ...`` - like ``asyncio.timeout(2.0)``."""
        loop = running_loop()
        if loop is not self._loop:  # first use, or a new event loop (tests, one-shot commands)
            self._loop = loop
            self._queues = {}
            self._heap = []
            self._timer = None
            self._timer_when = float("inf")
        # The queue key is the length in resolution steps, not the exact seconds: a check's
        # budget is what is left of it when it starts waiting, a slightly different float on
        # every request, which would use up the queues and send the rest to the heap.
        return _Budget(self, loop.time() + seconds, round(seconds / self._resolution))

    def _add(self, budget: _Budget) -> None:
        when = budget._when  # noqa: SLF001
        queue = self._queues.get(budget._length)  # noqa: SLF001
        if queue is None and len(self._queues) < self._MAX_QUEUES:
            queue = self._queues[budget._length] = collections.deque()  # noqa: SLF001
        # Within the resolution, order does not matter: a budget that ends a little before the
        # one queued ahead of it waits for that one, at most one resolution step.
        if queue is not None and (not queue or queue[-1]._when <= when + self._resolution):  # noqa: SLF001
            queue.append(budget)
        else:
            heapq.heappush(self._heap, (when, next(self._counter), budget))
        if when < self._timer_when:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None
        self._timer_when = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_when = float("inf")
        assert self._loop is not None
        now = self._loop.time()
        earliest = float("inf")
        for queue in self._queues.values():
            while queue and (queue[0]._when <= now or queue[0]._done):  # noqa: SLF001
                queue.popleft()._expire()  # noqa: SLF001
            if queue:
                earliest = min(earliest, queue[0]._when)  # noqa: SLF001
        heap = self._heap
        while heap and (heap[0][0] <= now or heap[0][2]._done):  # noqa: SLF001
            heapq.heappop(heap)[2]._expire()  # noqa: SLF001
        if heap:
            earliest = min(earliest, heap[0][0])
        if earliest < float("inf"):
            self._arm(max(earliest, now + self._resolution))

    @property
    def pending(self) -> int:
        """Budgets not yet cleaned up (finished ones leave lazily)."""
        return len(self._heap) + sum(len(queue) for queue in self._queues.values())
