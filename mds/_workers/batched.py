"""Calls made one at a time, sent to a broker in batches (SQS takes ten per request).

Each caller awaits its own item's outcome; the first caller of a batch waits
``delay`` for others to join (or until ``size`` have), then sends them all.
Fewer requests to the broker: a tenth as many deletions and result writes
on SQS, which charges and limits per request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import anyio

__all__ = ["Batched"]

T = TypeVar("T")


class Batched(Generic[T]):
    """Gathers items into batches for ``send``, which returns a failure (or ``None``) per item.

    Args:
        send: sends a batch; returns one exception or ``None`` per item.
        size: the most items in one batch.
        delay: seconds the first item of a batch waits for others.
    """

    def __init__(
        self,
        send: Callable[[Sequence[T]], Awaitable[Sequence[BaseException | None]]],
        size: int = 10,
        delay: float = 0.005,
    ) -> None:
        self.send = send
        self.size = size
        self.delay = delay
        self._pending: list[tuple[T, anyio.Event, list[BaseException | None]]] = []

    async def __call__(self, item: T) -> None:
        """Send ``item`` with others; raises the failure the broker reported for it."""
        done = anyio.Event()
        outcome: list[BaseException | None] = []
        self._pending.append((item, done, outcome))
        if len(self._pending) >= self.size:
            await self._flush()
        elif len(self._pending) == 1:  # the first: wait for company, then send
            try:
                await anyio.sleep(self.delay)
            finally:  # cancelled or not: those who joined are sent
                if not done.is_set():
                    await self._flush()
        await done.wait()
        if outcome and outcome[0] is not None:
            raise outcome[0]

    async def _flush(self) -> None:
        batch, self._pending = self._pending[: self.size], self._pending[self.size :]
        if not batch:
            return
        failures: list[BaseException | None] = []
        try:
            with anyio.CancelScope(shield=True):  # the items' callers all wait on it
                failures = list(await self.send([item for item, _, _ in batch]))
        except Exception as exc:
            failures = [exc] * len(batch)
        finally:
            if len(failures) != len(batch):  # a send that answered for too few or too many
                failures = [RuntimeError("the batch's outcome was lost")] * len(batch)
            for (_, done, outcome), failure in zip(batch, failures, strict=True):
                outcome.append(failure)
                done.set()
