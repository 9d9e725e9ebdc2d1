"""Serving chunks of rows through a servable: bounded, in parallel, every row accounted for.

A fixed set of workers take rows a group at a time and await the
servable's ``serve_many`` for each group, so the rows in flight (and so the batcher's queue) stay
bounded whatever the input's size, and rows from several chunks batch
together. Only a few chunks are open at once; the next is read only when
one is done with (committed), which is the backpressure from the writer and
the batcher back to the reader. Rows finish in any order; each lands in its
chunk's slot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio

from .._errors import MdsError, NotReady, Overloaded, Unavailable
from .._handler import ModelState
from .._servable import Servable
from .sources import Chunk, Refused

__all__ = ["Engine", "Work"]

#: How long a row waits, retrying, for a model that is busy or not ready, before the job stops.
PATIENCE = 30.0
_GONE = (ModelState.DRAINING, ModelState.STOPPED, ModelState.FAILED)


class Work:
    """One chunk being served: its rows' outcomes (a response, or an :class:`MdsError`)."""

    __slots__ = ("chunk", "left", "next", "order", "outcomes", "todo")

    def __init__(self, chunk: Chunk, todo: list[int] | None, ordered: bool) -> None:
        self.chunk = chunk
        self.todo = todo if todo is not None else range(chunk.rows)
        self.outcomes: list[Any] = [None] * chunk.rows
        self.order: list[int] | None = None if ordered else []  # completion order
        self.left = len(self.todo)
        self.next = 0  # position in todo of the next row to take

    def rows(self) -> list[int]:
        """The rows served, in output order."""
        if self.order is not None:
            return self.order
        return list(self.todo)


class Engine:
    """Serves chunks through ``target`` with ``workers`` rows in flight.

    Args:
        target: the model or pipeline.
        chunks: the chunks to serve, with the rows to serve of each (all when ``None``).
        finished: called with each chunk once every row of it has an outcome;
            it must call :meth:`release` when the chunk is done with.
        on_row: called with each row's outcome as it comes.
        workers: rows in flight at once.
        open_chunks: chunks being served or awaiting release at once.
        ordered: keep rows in input order (else in completion order).
        timeout, priority: each row's, as for ``serve``.
    """

    def __init__(
        self,
        target: Servable,
        chunks: AsyncIterator[tuple[Chunk, list[int] | None]],
        finished: Callable[[Work], Awaitable[None]],
        on_row: Callable[[Any], None],
        *,
        workers: int,
        open_chunks: int,
        ordered: bool,
        timeout: float | None,
        priority: int | None,
    ) -> None:
        self.target, self.chunks, self.finished, self.on_row = target, chunks, finished, on_row
        self.workers, self.ordered = workers, ordered
        # Each worker serves a group of rows at once (serve_many: one queueing
        # pass, no task per row); four groups fill the rows in flight.
        self.group = max(1, workers // 4)
        self.timeout, self.priority = timeout, priority
        self._slots = anyio.Semaphore(open_chunks)
        self._advancing = anyio.Lock()
        self._current: Work | None = None
        self._stopped = False
        self._exhausted = False
        self._waiting: anyio.CancelScope | None = None
        #: What stopped the run, where something did (the model went away, the input failed).
        self.error: BaseException | None = None

    def stop(self) -> None:
        """Take no more rows; rows in flight finish."""
        self._stopped = True
        if self._waiting is not None:
            self._waiting.cancel()

    def release(self) -> None:
        """A finished chunk is done with (committed): another may open."""
        self._slots.release()

    async def run(self) -> None:
        """Serve every chunk (or until :meth:`stop`); returns when no row is in flight."""
        async with anyio.create_task_group() as tasks:
            for _ in range(-(-self.workers // self.group)):
                tasks.start_soon(self._worker)

    def _take(self) -> tuple[Work, list[int]] | None:
        """The next rows of the open chunk, if it has any left (no await)."""
        work = self._current
        if work is None or self._stopped or work.next >= len(work.todo):
            return None
        position = work.next
        work.next = position + self.group
        return work, list(work.todo[position : work.next])

    async def _refill(self) -> bool:
        """Open the next chunk unless another worker did; ``False`` when there are no more."""
        work = self._current
        async with self._advancing:
            if self._current is work and not self._exhausted and not self._stopped:
                await self._advance()
        return not (self._stopped or (self._exhausted and self._current is None))

    async def _advance(self) -> None:
        while True:
            got = None
            with anyio.CancelScope() as self._waiting:  # stop() wakes it
                await self._slots.acquire()
                got = await anext(self.chunks, None)
            self._waiting = None
            if self._stopped:
                return
            if got is None:
                self._exhausted = True
                self._slots.release()
                self._current = None
                return
            chunk, todo = got
            work = Work(chunk, todo, self.ordered)
            if work.left:
                self._current = work
                return
            await self.finished(work)  # nothing to serve: straight to its end

    async def _worker(self) -> None:
        try:
            await self._work()
        except Exception as exc:
            if self.error is None:
                self.error = exc
            self.stop()

    async def _work(self) -> None:
        target, timeout, priority = self.target, self.timeout, self.priority
        while True:
            taken = self._take()
            if taken is None:
                if not await self._refill():
                    return
                continue
            work, rows = taken
            requests = work.chunk.requests
            served = [row for row in rows if not isinstance(requests[row], Refused)]
            for row in rows:
                if isinstance(requests[row], Refused):
                    await self._record(work, row, requests[row].error)
            if not served:
                continue
            outcomes = await target.serve_many(
                [requests[row] for row in served], timeout=timeout, priority=priority
            )
            for row, outcome in zip(served, outcomes, strict=True):
                if isinstance(outcome, Unavailable):
                    outcome = await self._retry(requests[row], outcome)
                await self._record(work, row, outcome)

    async def _record(self, work: Work, row: int, outcome: Any) -> None:
        work.outcomes[row] = outcome
        if work.order is not None:
            work.order.append(row)
        self.on_row(outcome)
        work.left -= 1
        if not work.left:
            await self.finished(work)

    async def _retry(self, request: Any, error: Unavailable) -> Any:
        """Serve again, backing off, while the model is busy or starting; raise once it is gone."""
        target = self.target
        delay, waited = 0.01, 0.0
        while True:
            if not isinstance(error, Overloaded | NotReady) or waited >= PATIENCE:
                raise error
            if isinstance(error, NotReady) and target.state in _GONE:
                raise error
            await anyio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 1.0)
            try:
                return await target.serve(request, timeout=self.timeout, priority=self.priority)
            except Unavailable as exc:
                error = exc
            except MdsError as exc:
                return exc


def default_workers(target: Servable) -> int:
    """Rows in flight by default: enough to fill every instance's batches twice over."""
    config = getattr(target, "config", None)
    batching = getattr(config, "batching", None)
    size = getattr(batching, "max_batch_size", 32)
    instances = getattr(config, "instances", 1)
    wanted = max(64, 2 * size * instances)
    capacity = target.queue_capacity
    return min(wanted, capacity) if capacity else wanted
