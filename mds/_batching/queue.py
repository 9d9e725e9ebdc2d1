"""Queued items, grouped by priority level and (optionally) length bucket.

Items leave the queue in three ways: a batch takes them (``RUNNING``), their
caller goes away, or their deadline passes (both ``DONE`` while still in a
deque). Deques are cleaned lazily: a ``DONE`` item is dropped when it
reaches the front.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

from .._loop import Waiter
from .._status import CallTrace

__all__ = ["DONE", "QUEUED", "RUNNING", "BatchInfo", "Item", "RequestQueue", "batch_id"]

QUEUED, RUNNING, DONE = 0, 1, 2


class BatchInfo:
    """What one ``infer`` call was; shared by the items it computed.

    ``id`` numbers a model's batches from 1 (from each start), for logs and spans.
    """

    __slots__ = ("cost", "device", "id", "infer_seconds", "instance", "padding", "size", "started")

    def __init__(
        self, size: int, cost: int, padding: float, started: float, batch_id: int = 0
    ) -> None:
        self.size = size
        self.cost = cost
        self.padding = padding
        self.started = started
        self.id = batch_id
        self.infer_seconds = 0.0
        self.instance = -1
        self.device: object = None


class Item:
    """One request between ``preprocess`` and its output.

    Its answer is its waiter's result: the output, or an exception instance.
    ``span`` is its request's span (an ``mds._tracing.RequestSpan``) while
    tracing, which its batch's span links to.
    """

    __slots__ = (
        "batch",
        "cost",
        "deadline",
        "enqueued",
        "key",
        "length",
        "priority",
        "seq",
        "span",
        "state",
        "value",
        "waiter",
    )

    def __init__(
        self,
        value: Any,
        waiter: Waiter,
        enqueued: float,
        seq: int,
        deadline: float | None = None,
        priority: int = 0,
        cost: int = 1,
        key: Hashable = None,
        length: int | None = None,
    ) -> None:
        self.value = value
        self.waiter = waiter
        self.enqueued = enqueued
        self.seq = seq
        self.deadline = deadline
        self.priority = priority
        self.cost = cost
        self.key = key
        self.length = length
        self.state = QUEUED
        self.batch: BatchInfo | None = None
        self.span: Any = None

    def trace(
        self,
        model: str,
        version: str,
        began: float,
        preprocessed: float,
        computed: float,
        now: float,
    ) -> CallTrace:
        """Where the request's time went, from the times its caller took."""
        info = self.batch
        assert info is not None
        return CallTrace(
            model=model,
            version=version,
            instance=info.instance,
            queue_wait=info.started - self.enqueued,
            batch_size=info.size,
            batch_cost=info.cost,
            padding_ratio=info.padding,
            infer_seconds=info.infer_seconds,
            preprocess_seconds=preprocessed - began,
            postprocess_seconds=now - computed,
            total_seconds=now - began,
        )

    def settle(self, outcome: Any) -> bool:
        """Give the item its answer (the waiter's result); ``False`` if it had one."""
        if self.state == DONE:
            return False
        self.state = DONE
        if not self.waiter.done():
            self.waiter.set_result(outcome)
        return True


def batch_id(item: Item | None) -> int | None:
    """The id of the batch that computed ``item``, if it had one."""
    info = item.batch if item is not None else None
    return info.id if info is not None else None


class RequestQueue:
    """Per priority level, per bucket key: FIFO deques of items."""

    def __init__(self, levels: int) -> None:
        self._levels: list[dict[Hashable, deque[Item]]] = [{} for _ in range(levels)]
        self.first: deque[Item] = deque()
        self._levels[0][None] = self.first
        self.counts = [0] * levels  # waiting (QUEUED) items per level
        self.count = 0
        self.stale = 0  # items still in a lane that left it (cancelled, expired)
        #: Told of each item that leaves the batcher for good, computed or not
        #: (a stateful model's sequences: its next step may go).
        self.finished: Callable[[Item], None] | None = None

    def put(self, item: Item) -> Item | None:
        """Queue ``item``; the item that was last in its lane, if any."""
        level, key = item.priority, item.key
        if key is None and level == 0:
            lane = self.first  # the common lane, without a dict lookup
        else:
            lanes = self._levels[level]
            found = lanes.get(key)
            lane = lanes[key] = deque() if found is None else found
        tail = lane[-1] if lane else None
        lane.append(item)
        self.counts[level] += 1
        self.count += 1
        return tail

    def lanes(self) -> list[deque[Item]]:
        """Every lane, of every level."""
        return [lane for lanes in self._levels for lane in lanes.values()]

    def forget(self, item: Item) -> None:
        """Account for a queued item that left without a batch (still in its deque).

        Such items are dropped when they reach the front of their lane; if
        many pile up behind a stalled model, the lanes are rebuilt without them.
        """
        self.counts[item.priority] -= 1
        self.count -= 1
        self.stale += 1
        if self.stale > self.count + 256:
            for lane in self.lanes():
                live = [entry for entry in lane if entry.state == QUEUED]
                lane.clear()
                lane.extend(live)
            self.stale = 0
        if self.finished is not None:
            self.finished(item)

    def recount(self) -> None:
        """Count the queued items again, from the lanes."""
        self.counts = [
            sum(entry.state == QUEUED for lane in lanes.values() for entry in lane)
            for lanes in self._levels
        ]
        self.count = sum(self.counts)

    def front(self, lane: deque[Item]) -> Item | None:
        """The first item of ``lane`` still queued; those that left before it are dropped."""
        while lane:
            item = lane[0]
            if item.state == QUEUED:
                return item
            lane.popleft()
            self.stale -= 1
        return None

    def next_lane(self) -> deque[Item] | None:
        """The lane a batch comes from: the highest level, then the oldest head."""
        for level, lanes in enumerate(self._levels):
            if not self.counts[level]:
                continue
            best: deque[Item] | None = None
            for lane in lanes.values():
                head = self.front(lane)
                if head is not None and (best is None or head.seq < best[0].seq):
                    best = lane
            if best is not None:
                return best
        return None

    def take(
        self, lane: deque[Item], max_cost: int, now: float, dropped: list[Item]
    ) -> tuple[list[Item], int]:
        """Pop queued items from the front of ``lane`` while their cost fits.

        Items that can never run go to ``dropped`` instead: those whose
        deadline has passed, and one that alone costs more than ``max_cost``
        (lowered since it was queued). Returns the items and their total cost.
        """
        batch: list[Item] = []
        cost = removed = level = 0
        while lane:
            item = lane[0]
            if item.state != QUEUED:
                lane.popleft()
                self.stale -= 1
                continue
            level = item.priority  # the same for the whole lane
            deadline = item.deadline
            if deadline is not None and deadline <= now:
                dropped.append(item)
            elif cost + item.cost > max_cost:
                if batch:
                    break
                dropped.append(item)
            else:
                cost += item.cost
                batch.append(item)
                item.state = RUNNING
            lane.popleft()
            removed += 1
        if removed:
            self.counts[level] -= removed
            self.count -= removed
        return batch, cost

    def put_back(self, lane: deque[Item], items: list[Item]) -> None:
        """Return items taken from the front of ``lane``, in their order."""
        for item in reversed(items):
            item.state = QUEUED
            lane.appendleft(item)
            self.counts[item.priority] += 1
            self.count += 1

    def drain(self) -> list[Item]:
        """Remove and return every queued item."""
        left: list[Item] = []
        for lanes in self._levels:
            for lane in lanes.values():
                left.extend(item for item in lane if item.state == QUEUED)
                lane.clear()  # cleared in place: _first stays the level-0 lane
        self.counts = [0] * len(self._levels)
        self.count = self.stale = 0
        return left
