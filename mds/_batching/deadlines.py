"""The deadline watcher: answers each item whose deadline passes, wherever it is."""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

import anyio

from .. import _loop
from .._errors import DeadlineExceeded
from .queue import DONE, QUEUED, RUNNING, Item, RequestQueue

__all__ = ["DeadlineWatch"]


class DeadlineWatch:
    """Expires queued and computing items at their deadline.

    Nothing per item is kept for this: within a lane, deadlines arrive in
    order (now + the model's timeout), so only lane fronts, the items of
    running batches, and the few out-of-order items on a heap are looked at.

    Args:
        queue: the batcher's queue.
        running: the batches being computed, by id.
        clock: the loop's clock.
    """

    def __init__(
        self,
        queue: RequestQueue,
        running: dict[int, list[Item]],
        clock: Callable[[], float],
    ) -> None:
        self._queue = queue
        self._running = running
        self._clock = clock
        self._heap: list[tuple[float, int, Item]] = []  # out-of-order deadlines
        #: When the watcher wakes next; an earlier deadline must :meth:`wake` it.
        self.until = math.inf
        self._rewatch = anyio.Event()

    def wake(self) -> None:
        """A deadline earlier than :attr:`until` arrived: look again now."""
        self._rewatch.set()

    def track(self, item: Item, live: int) -> None:
        """Watch ``item`` apart: its deadline is earlier than one ahead of it in its lane.

        ``live`` is how many items are queued or computing, to bound the heap.
        """
        assert item.deadline is not None
        heapq.heappush(self._heap, (item.deadline, item.seq, item))
        if len(self._heap) > 2 * live + 512:
            self._heap = [entry for entry in self._heap if entry[2].state != DONE]
            heapq.heapify(self._heap)

    async def run(self) -> None:
        """Expire items as their deadlines pass; runs until cancelled."""
        while True:
            now = self._clock()
            wake = self._expire_queued(now)
            heap = self._heap
            while heap and (heap[0][2].state == DONE or heap[0][0] <= now):
                self._expire(heapq.heappop(heap)[2])
            if heap:
                wake = min(wake, heap[0][0])
            for batch in self._running.values():
                for item in batch:
                    deadline = item.deadline
                    if deadline is None or item.state != RUNNING:
                        continue
                    if deadline <= now:
                        self._expire(item)
                    else:
                        wake = min(wake, deadline)
            self.until = wake
            self._rewatch = anyio.Event()
            with _loop.move_on_at(wake, self._clock()):
                await self._rewatch.wait()

    def _expire_queued(self, now: float) -> float:
        """Expire queued items whose deadline passed; the next deadline of a lane front."""
        wake = math.inf
        queue = self._queue
        for lane in queue.lanes():
            while (item := queue.front(lane)) is not None:
                deadline = item.deadline
                if deadline is None:
                    break
                if deadline > now:
                    wake = min(wake, deadline)
                    break
                self._expire(item)  # now DONE: dropped by the next front()
        return wake

    def _expire(self, item: Item) -> None:
        if item.state == QUEUED:
            self._queue.forget(item)
            message = (
                "the request's deadline passed while it waited in the queue; it was not computed"
            )
        elif item.state == RUNNING:
            message = "the request's deadline passed while its batch was computed"
        else:
            return
        item.settle(DeadlineExceeded(message))
