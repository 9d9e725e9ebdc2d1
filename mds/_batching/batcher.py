"""The queue between ``preprocess`` and ``infer``, and the workers that drain it.

Callers submit one item each and wait for its own answer; one worker per
model instance takes batches from the shared queue. Every submitted item is
settled exactly once: with its output, its error, or (if its caller went
away first) by being dropped from the queue.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import anyio

from .._config import BatchingConfig
from .._errors import DeadlineExceeded, Overloaded, Unavailable

__all__ = ["Batcher"]

logger = logging.getLogger(__name__)

W = TypeVar("W")  # what a worker is (a model instance)

_QUEUED, _RUNNING, _DONE = 0, 1, 2


class _Item:
    __slots__ = ("deadline", "done", "outcome", "state", "value")

    def __init__(self, value: Any, deadline: float | None) -> None:
        self.value = value
        self.deadline = deadline
        self.done = anyio.Event()
        self.outcome: Any = None
        self.state = _QUEUED

    def settle(self, outcome: Any) -> None:
        if self.state != _DONE:
            self.state = _DONE
            self.outcome = outcome
            self.done.set()


class Batcher(Generic[W]):
    """A bounded queue of items and the loop that turns them into batches.

    Args:
        config: batch size and queue limits.
        run_batch: computes a batch on a worker; returns, per item, its
            output or an exception instance. It must not raise for an item's
            fault.
        where: names the model in messages.
    """

    def __init__(
        self,
        config: BatchingConfig,
        run_batch: Callable[[W, list[Any]], Awaitable[list[Any]]],
        *,
        where: str,
    ) -> None:
        self.config = config
        self._run_batch = run_batch
        self._where = where
        self._queue: deque[_Item] = deque()
        self._queued = 0  # items in _queue still waiting (cancelled ones are not)
        self._closed = False
        self._wakeup = anyio.Event()
        self._idle = 0

    @property
    def queued(self) -> int:
        """How many items wait in the queue."""
        return self._queued

    async def submit(self, value: Any, deadline: float | None = None) -> Any:
        """Queue ``value`` and wait for its output.

        Raises:
            Overloaded: the queue is full.
            Unavailable: the batcher was closed before the item ran.
            DeadlineExceeded: ``deadline`` passed while the item waited.
            Exception: the item's own error from ``run_batch``.
        """
        if self._closed:
            raise Unavailable(f"{self._where}: the model stopped before this request was queued")
        if self._queued >= self.config.max_queue_size:
            raise Overloaded(
                f"{self._where}: the queue is full "
                f"({self.config.max_queue_size} requests waiting); try again later"
            )
        item = _Item(value, deadline)
        self._queue.append(item)
        self._queued += 1
        if self._idle:
            self._wake()
        try:
            await item.done.wait()
        except BaseException:
            if item.state == _QUEUED:
                # The caller went away (cancelled, timed out): never compute it.
                item.state = _DONE
                self._queued -= 1
            raise
        if isinstance(item.outcome, BaseException):
            raise item.outcome
        return item.outcome

    def close(self) -> None:
        """Take no more work: workers return once the queue is empty."""
        self._closed = True
        self._wake()

    def fail_queued(self, message: str) -> None:
        """Answer every queued item with :class:`Unavailable`."""
        while self._queue:
            item = self._queue.popleft()
            if item.state == _QUEUED:
                self._queued -= 1
                item.settle(Unavailable(f"{self._where}: {message}"))

    async def serve(self, worker: W) -> None:
        """Feed batches to ``worker`` until closed and empty."""
        limit = self.config.max_batch_size
        while True:
            batch = await self._take(limit)
            if not batch:
                return
            try:
                outcomes = await self._run_batch(worker, [item.value for item in batch])
                for item, outcome in zip(batch, outcomes, strict=True):
                    item.settle(outcome)
            finally:
                # Reached with items unsettled only on cancellation or a bug
                # in run_batch: still, nobody is left waiting.
                for item in batch:
                    item.settle(Unavailable(f"{self._where}: stopped while computing this request"))

    async def _take(self, limit: int) -> list[_Item]:
        """Wait for work; the next batch, or ``[]`` when closed and empty."""
        while True:
            while not self._queued:
                if self._closed:
                    return []
                self._idle += 1
                try:
                    await self._wakeup.wait()
                finally:
                    self._idle -= 1
            batch = self._pop(limit)
            if batch:
                return batch

    def _pop(self, limit: int) -> list[_Item]:
        now = anyio.current_time()
        batch: list[_Item] = []
        queue = self._queue
        while queue and len(batch) < limit:
            item = queue.popleft()
            if item.state != _QUEUED:
                continue
            self._queued -= 1
            if item.deadline is not None and item.deadline <= now:
                item.settle(
                    DeadlineExceeded(
                        f"{self._where}: the request's deadline passed while it "
                        "waited in the queue; it was not computed"
                    )
                )
                continue
            item.state = _RUNNING
            batch.append(item)
        return batch

    def _wake(self) -> None:
        self._wakeup.set()
        self._wakeup = anyio.Event()
