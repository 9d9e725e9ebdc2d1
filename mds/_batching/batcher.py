"""The dynamic batcher: between ``preprocess`` and ``infer``.

Callers submit one item each and wait for their own answer. One worker per
model instance forms batches from the shared queue:

- an idle worker takes what is queued at once, so a lone request never waits
  (unless ``wait_when_idle``);
- while the model is busy, a batch may wait up to ``max_queue_delay`` (from
  its oldest request's arrival, or from when it was started: ``delay_from``)
  to grow to a preferred size or the maximum, never past the tightest
  deadline in it;
- sizes count cost, higher priority levels go first, and items batch only with
  items of the same bucket;
- a batch whose computation raises is split in halves and retried, so only
  the items at fault get the error;
- a batch that runs out of device memory is split the same way, and the
  batch limit is lowered to what fits.

Every item is settled exactly once: with its output, its error, a deadline
error (by the deadline watcher, wherever the item is), or by its caller
leaving. Nothing here raises for a user-code fault; the workers go on.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Hashable
from typing import Any, Generic, Protocol, TypeVar

import anyio

from .. import _logs, _loop, _tracing
from .._config import BatchingConfig, queue_limits
from .._errors import (
    ConfigError,
    DeadlineExceeded,
    InferenceError,
    InvalidInput,
    Overloaded,
    Unavailable,
    describe,
)
from .deadlines import DeadlineWatch
from .queue import DONE, QUEUED, RUNNING, BatchInfo, Item, RequestQueue
from .stats import BatchStats

__all__ = ["Batcher", "Worker"]

logger = logging.getLogger("mds.batching")

#: Seconds a growing batch leaves itself before its tightest deadline, beyond
#: the time a batch typically takes.
_MARGIN = 0.001
_INF = math.inf


class Worker(Protocol):
    """What computes batches: a model instance."""

    index: int
    #: Where it computes (for spans).
    device: object
    #: Whether the worker runs its batches one at a time in order of
    #: arrival (on its own thread), so the next batch can be handed over
    #: while one computes.
    queues_batches: bool

    async def compute_items(self, items: list[Item]) -> list[Any]:
        """Per item, its output or an exception instance; raise if the batch failed.

        Items answered before the batch starts (``DONE``) are not computed.
        """
        ...

    def failure(self, exc: Exception, size: int) -> list[Any]:
        """The per-item errors for a batch of ``size`` that raised ``exc``."""
        ...

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the batch did not fit in the device's memory."""
        ...

    def release_memory(self) -> None:
        """Let the device's caches go before a smaller batch is tried."""
        ...


W = TypeVar("W", bound=Worker)


class _Slot:
    """One worker's batches in flight, as its feeders see them."""

    __slots__ = ("computing", "finished")

    def __init__(self) -> None:
        self.computing = 0
        self.finished = -math.inf  # when its last batch came back


class Batcher(Generic[W]):
    """A bounded, prioritised queue and the loop that turns it into batches.

    Args:
        config: batching policy; replace it at run time with :meth:`configure`.
        stats: where to count (kept by the model across restarts).
        model: the model's name, for logs and spans (errors get their context
            from the model).
        version: the model's version, for logs and spans.
    """

    def __init__(
        self, config: BatchingConfig, *, stats: BatchStats, model: str, version: str = ""
    ) -> None:
        self._name = f"model {model!r}"  # for logs
        self._model = model
        self._version = version
        self._batch_id = 0
        self.stats = stats
        self._clock = _loop.clock()
        self._new_waiter = _loop.waiter_factory()
        self._seq = 0
        self._closed = False
        self._busy = 0  # workers computing a batch
        self._running = 0  # items in the batches being computed
        self._idle: list[_loop.Waiter] = []  # workers waiting for any item
        self._delaying: list[_loop.Waiter] = []  # workers waiting for a batch to grow
        self._want_full: list[_loop.Waiter] = []  # busy workers waiting for a full batch
        self._running_batches: dict[int, list[Item]] = {}
        self.queue = RequestQueue(config.priority_levels)
        self._watch = DeadlineWatch(self.queue, self._running_batches, self._clock)
        self.configure(config)

    @property
    def version(self) -> str:
        """The version of the model whose requests this batcher batches."""
        return self._version

    def check(self, config: BatchingConfig) -> None:
        """Refuse a ``config`` this batcher cannot take: the number of priority levels is fixed.

        Raises:
            ConfigError: ``config`` changes the number of priority levels.
        """
        if config.priority_levels != len(self.queue.counts):
            raise ConfigError(
                f"priority_levels cannot change while the model runs "
                f"({len(self.queue.counts)} -> {config.priority_levels})"
            )

    def configure(self, config: BatchingConfig) -> None:
        """Use ``config`` from the batch being formed on; in the batcher's loop.

        A feeder waiting out the old ``max_queue_delay``, or for a full batch
        of the old size, decides again under the new settings.

        Raises:
            ConfigError: see :meth:`check`.
        """
        self.check(config)
        self.config = config
        limits = queue_limits(config)
        self._limits = (0,) * len(limits) if self._closed else limits
        self._default_priority = config.default_priority
        self._max_cost = config.max_batch_size
        self._preferred = sorted(config.preferred_batch_sizes)
        self._wake_delaying()
        self._wake_all(self._want_full)

    # -- callers ------------------------------------------------------------

    def enqueue(
        self,
        value: Any,
        deadline: float | None = None,
        priority: int | None = None,
        cost: int = 1,
        key: Hashable = None,
        length: int | None = None,
        now: float | None = None,
    ) -> Item:
        """Queue ``value``; the caller then awaits ``item.waiter`` (see :meth:`abandon`).

        ``now`` saves a clock read when the caller just made one.

        Raises:
            Unavailable: the batcher is closed.
            Overloaded: the item's priority level is full.
            InvalidInput: a priority that is not a level, or a cost larger
                than ``max_batch_size``.
            DeadlineExceeded: ``deadline`` has already passed.
        """
        queue = self.queue
        limits = self._limits  # all zero once closed
        if priority is None:
            level = self._default_priority
        elif 0 <= priority < len(limits):
            level = priority
        else:
            raise InvalidInput(
                f"priority {priority} is not a level of this model "
                f"(0, the highest, to {len(limits) - 1})"
            )
        if queue.counts[level] >= limits[level]:
            if self._closed:
                raise Unavailable("the model stopped before this request was queued")
            raise Overloaded(
                f"the queue is full ({limits[level]} requests waiting"
                + (f" at priority {level}" if len(limits) > 1 else "")
                + "); try again later"
            )
        if cost != 1 and not (type(cost) is int and 1 <= cost <= self._max_cost):
            raise InvalidInput(
                f"the request's cost is {cost!r}; it must be a whole number "
                f"from 1 to the batch limit ({self._max_cost})"
            )
        if now is None:
            now = self._clock()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded("the request's deadline passed before it was queued")
        seq = self._seq = self._seq + 1
        item = Item(value, self._new_waiter(), now, seq, deadline, level, cost, key, length)
        if key is None and level == 0:  # the common lane (RequestQueue.put, inline)
            lane = queue.first
            lane_tail = lane[-1] if lane else None
            lane.append(item)
            queue.counts[0] += 1
            queue.count += 1
        else:
            lane_tail = queue.put(item)
        if deadline is not None:
            watch = self._watch
            if deadline < watch.until:
                watch.wake()
            if lane_tail is not None and (lane_tail.deadline or _INF) > deadline:
                # Earlier than an item ahead of it in its lane: the watcher,
                # which looks at lane fronts only, must track it apart.
                watch.track(item, queue.count + self._running)
        if self._idle:
            self._idle.pop().set_result(None)
        if self._delaying:
            self._wake_delaying()
        if self._want_full and queue.count >= self._max_cost:
            self._wake_all(self._want_full)
        return item

    def abandon(self, item: Item) -> None:
        """The caller went away (cancelled): a queued item is never computed."""
        if item.state == QUEUED:
            self.queue.forget(item)
        item.state = DONE

    async def watch_deadlines(self) -> None:
        """Answer each item whose deadline passes, wherever it is; runs until cancelled."""
        await self._watch.run()

    @property
    def closed(self) -> bool:
        """Whether it takes no more work (:meth:`close`)."""
        return self._closed

    def close(self) -> None:
        """Take no more work: workers return once the queue is empty."""
        self._closed = True
        self._limits = (0,) * len(self._limits)
        for waiters in (self._idle, self._delaying, self._want_full):
            self._wake_all(waiters)

    def fail_queued(self, message: str) -> None:
        """Answer every queued item with :class:`Unavailable`."""
        finished = self.queue.finished
        for item in self.queue.drain():
            item.settle(Unavailable(message))
            if finished is not None:
                finished(item)

    # -- workers --------------------------------------------------------------

    async def serve(self, worker: W) -> None:
        """Feed batches to ``worker`` until closed and empty.

        A worker that queues batches gets two feeders. While one batch
        computes, the other may hand over the next one, if it is full, so
        the worker's thread goes straight on to it instead of idling while
        the loop answers the last batch's callers and forms the next. A
        batch that is not full waits for the worker to be free, as it may
        still grow.
        """
        slot = _Slot()
        if not worker.queues_batches:
            await self._feed(worker, slot, alone=True)
            return
        async with anyio.create_task_group() as feeders:
            feeders.start_soon(self._feed, worker, slot, False)
            await self._feed(worker, slot, alone=False)

    async def _feed(self, worker: W, slot: _Slot, alone: bool) -> None:
        backlog = False
        while True:
            batch = await self._next_batch(backlog, None if alone else slot)
            if batch is None:
                return
            handed = self._clock()
            slot.computing += 1
            self._busy += 1
            self._running += len(batch)
            self._running_batches[id(batch)] = batch
            try:
                await self._run(worker, batch, handed, slot)
            finally:
                slot.computing -= 1
                self._busy -= 1
                self._running -= len(batch)
                del self._running_batches[id(batch)]
                if self.queue.finished is not None:
                    for item in batch:
                        self.queue.finished(item)
            backlog = self.queue.count > 0

    async def _next_batch(self, backlog: bool, slot: _Slot | None) -> list[Item] | None:
        """Wait for work and form the next batch; ``None`` when closed and empty.

        With ``slot`` (the worker's, when it has two feeders): while the
        worker computes, only a full batch is taken.
        """
        queue = self.queue
        # The batch's first request and when it was taken (delay_from="start"):
        # a new first request (the old one left, or another lane's) starts anew.
        first: Item | None = None
        started = 0.0
        while True:
            busy = slot is not None and slot.computing > 0 and not self._closed
            if not queue.count or (busy and queue.count < self._max_cost):
                if self._closed and not queue.count:
                    return None
                backlog = backlog and busy
                waiter = self._new_waiter()
                waiters = self._want_full if busy else self._idle
                waiters.append(waiter)
                try:
                    await waiter
                finally:
                    if waiter in waiters:
                        waiters.remove(waiter)
                continue
            lane = queue.next_lane()
            if lane is None:  # pragma: no cover - a miscount; never loop on it
                logger.error(
                    "%s: queue counts disagreed with its lanes; recounted",
                    self._name,
                    extra=_logs.fields(self._model, self._version),
                )
                queue.recount()
                continue
            now = self._clock()
            dropped: list[Item] = []
            limit = self._max_cost
            batch, cost = queue.take(lane, limit, now, dropped)
            for item in dropped:
                self._drop(item, now, limit)
            if not batch:
                continue
            if cost < limit and not self._closed:
                if busy:
                    # Not full (other keys or costs fill the queue): wait for
                    # the worker, or for more requests.
                    queue.put_back(lane, batch)
                    waiter = self._new_waiter()
                    self._want_full.append(waiter)
                    try:
                        await waiter
                    finally:
                        if waiter in self._want_full:
                            self._want_full.remove(waiter)
                    continue
                if batch[0] is not first:
                    first, started = batch[0], now
                until = self._grow_until(batch, cost, backlog, now, started)
                if until is not None:
                    queue.put_back(lane, batch)
                    await self._wait_to_grow(until)
                    backlog = True
                    continue
                batch = self._preferred_part(lane, batch, cost)
            return batch

    def _drop(self, item: Item, now: float, max_cost: int) -> None:
        """Answer an item that can never run: expired, or too costly for the limit."""
        if item.deadline is not None and item.deadline <= now:
            item.settle(
                DeadlineExceeded(
                    "the request's deadline passed while it waited in the queue; "
                    "it was not computed"
                )
            )
        else:
            item.settle(
                InvalidInput(
                    f"the request's cost {item.cost} is more than the batch limit "
                    f"({max_cost}), lowered after it was queued"
                )
            )
        if self.queue.finished is not None:
            self.queue.finished(item)

    def _grow_until(
        self, batch: list[Item], cost: int, backlog: bool, now: float, started: float
    ) -> float | None:
        """When to stop waiting for this batch to grow; ``None`` to go now.

        Like Triton's: a batch that can make a preferred size goes at once;
        otherwise it may wait up to ``max_queue_delay`` from its oldest item
        (or, with ``delay_from="start"``, from ``started``, when its first
        request was taken).
        Unlike Triton's, only while the model is busy (another instance is
        computing, or requests queued up while this one was): a lone request
        at an idle model never waits, unless ``wait_when_idle``.
        """
        config = self.config
        if not config.max_queue_delay or not (self._busy or backlog or config.wait_when_idle):
            return None
        if self._preferred and cost >= self._preferred[0]:
            return None
        since = batch[0].enqueued if config.delay_from == "oldest" else started
        until = since + config.max_queue_delay
        deadlines = [item.deadline for item in batch if item.deadline is not None]
        if deadlines:
            typical = self._typical_infer_seconds()
            if not typical and not (self._busy or backlog):
                return None  # idle, and no batch timed yet: no telling what a wait would cost
            # Leave the batch time to run before its tightest deadline.
            until = min(until, min(deadlines) - typical - _MARGIN)
        return until if until > now else None

    def _typical_infer_seconds(self) -> float:
        stats = self.stats
        return stats.infer_seconds / stats.batches if stats.batches else 0.0

    def _preferred_part(self, lane: deque[Item], batch: list[Item], cost: int) -> list[Item]:
        """The longest front of ``batch`` that makes a preferred size, if one fits."""
        fitting = [size for size in self._preferred if size <= cost]
        if not fitting:
            return batch
        target, total = fitting[-1], 0
        for index, item in enumerate(batch):
            total += item.cost
            if total > target:
                self.queue.put_back(lane, batch[index:])
                return batch[:index]
        return batch

    async def _wait_to_grow(self, until: float) -> None:
        waiter = self._new_waiter()
        self._delaying.append(waiter)
        try:
            with _loop.move_on_at(until, self._clock()):
                await waiter
        finally:
            if waiter in self._delaying:
                self._delaying.remove(waiter)

    def _wake_delaying(self) -> None:
        self._wake_all(self._delaying)

    @staticmethod
    def _wake_all(waiters: list[_loop.Waiter]) -> None:
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        waiters.clear()

    async def _run(self, worker: W, batch: list[Item], handed: float, slot: _Slot) -> None:
        """Compute ``batch`` on ``worker`` and settle every item in it."""
        if batch[0].length is None:
            padding = 0.0
        else:
            lengths = [item.length or 0 for item in batch]
            padding = 1.0 - sum(lengths) / (len(lengths) * max(lengths))
        self._batch_id += 1
        info = BatchInfo(
            len(batch), sum(item.cost for item in batch), padding, handed, self._batch_id
        )
        info.instance = worker.index
        info.device = worker.device
        try:
            outcomes = await self._isolate(worker, batch, info)
        except anyio.get_cancelled_exc_class():
            # A stop that could not wait: nobody is left waiting.
            for item in batch:
                item.settle(Unavailable("the model stopped while computing this request"))
            raise
        except Exception as exc:
            # A fault of mds's own (user code's are answered per item): this
            # batch fails, the worker goes on.
            logger.exception(
                "%s: computing batch %d failed",
                self._name,
                info.id,
                extra=_logs.fields(self._model, self._version, info.id),
            )
            error = InferenceError(f"computing the batch failed: {describe(exc)}")
            outcomes = [error] * len(batch)
        finally:
            # A batch handed over early started when the one before it ended.
            finished = self._clock()
            started = info.started = max(handed, slot.finished)
            slot.finished = finished
            info.infer_seconds = finished - started
            waits = [started - item.enqueued for item in batch]
            self.stats.record(info.size, info.cost, padding, info.infer_seconds, waits)
        for item, outcome in zip(batch, outcomes, strict=True):
            item.batch = info
            if item.state == RUNNING:  # not already answered (deadline, caller gone)
                item.state = DONE
                try:
                    item.waiter.set_result(outcome)
                except Exception:
                    pass
        # Read per batch, not per request: a provider set since is used from now on.
        tracer = _tracing.refresh()
        if tracer is not None:
            try:
                _tracing.record_batch(
                    tracer, self._model, self._version, info, batch, outcomes, self._clock()
                )
            except Exception:  # the host's SDK failed: the batch is answered all the same
                logger.debug("%s: recording the batch's span failed", self._name, exc_info=True)

    @property
    def batch_limit(self) -> int:
        """The most cost a batch may have now: ``max_batch_size``, or lower after OOM."""
        return self._max_cost

    async def _isolate(self, worker: W, items: list[Item], info: BatchInfo) -> list[Any]:
        """Compute ``items``; if the batch raises, find the items at fault by halves.

        Out of memory is not the items' fault: the batch is split whatever
        ``isolate_failures`` says, and the limit drops to what may fit.
        """
        if (
            self._max_cost < self.config.max_batch_size  # lowered after running out of memory
            and len(items) > 1
            and sum(item.cost for item in items) > self._max_cost
        ):
            return await self._halves(worker, items, info)
        try:
            return await worker.compute_items(items)
        except Exception as exc:
            out_of_memory = worker.is_out_of_memory(exc)
            if out_of_memory:
                self._ran_out_of_memory(worker, exc, items, info)
            if len(items) == 1 or not (out_of_memory or self.config.isolate_failures):
                return worker.failure(exc, len(items))
            self.stats.isolation_splits += 1
            if not out_of_memory:
                # The requests at fault are logged as they fail (mds.model).
                logger.debug(
                    "%s: %d items of batch %d failed together (%s: %s); retrying their "
                    "halves to find the items at fault",
                    self._name,
                    len(items),
                    info.id,
                    type(exc).__name__,
                    exc,
                    extra=_logs.fields(self._model, self._version, info.id),
                )
            return await self._halves(worker, items, info)

    async def _halves(self, worker: W, items: list[Item], info: BatchInfo) -> list[Any]:
        middle = len(items) // 2
        return await self._isolate(worker, items[:middle], info) + await self._isolate(
            worker, items[middle:], info
        )

    def _ran_out_of_memory(
        self, worker: W, exc: Exception, items: list[Item], info: BatchInfo
    ) -> None:
        self.stats.out_of_memory += 1
        cost = sum(item.cost for item in items)
        limit = max(1, cost // 2)
        if len(items) > 1 and limit < self._max_cost:
            self._max_cost = limit
            logger.warning(
                "%s: out of device memory with a batch of %d (cost %d); the batch limit "
                "is now %d (was max_batch_size %d) until set_batching resets it: %s",
                self._name,
                len(items),
                cost,
                limit,
                self.config.max_batch_size,
                exc,
                extra=_logs.fields(self._model, self._version, info.id),
            )
        worker.release_memory()
