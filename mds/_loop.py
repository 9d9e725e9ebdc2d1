"""The running event loop's clock and one-shot waiters, fast on asyncio.

anyio's portable primitives cost microseconds each on asyncio
(``anyio.Event()`` about 3 µs to create, ``anyio.current_time()`` about
1 µs); per request that is as much as a whole hand-written batcher spends.
On asyncio these functions return ``time.monotonic`` (asyncio's own clock,
finer than uvloop's) and the loop's futures, which behave the same for our
use; elsewhere (trio) the portable forms.
:func:`asyncio_loop` is the one place that decides.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator
from typing import Any, Protocol

import anyio

__all__ = ["Waiter", "asyncio_loop", "clock", "move_on_at", "waiter_factory"]


def asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop, or ``None`` on another backend (trio)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Waiter(Protocol):
    """A one-shot wake-up: what a caller awaits until its request is settled."""

    def done(self) -> bool: ...

    def set_result(self, result: Any, /) -> None: ...

    def __await__(self) -> Generator[Any, None, Any]: ...


class _EventWaiter:
    """The portable waiter: an anyio event behind the future-like interface."""

    __slots__ = ("_event", "_result")

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._result: Any = None

    def done(self) -> bool:
        return self._event.is_set()

    def set_result(self, result: Any, /) -> None:
        self._result = result
        self._event.set()

    def __await__(self) -> Generator[Any, None, Any]:
        yield from self._event.wait().__await__()
        return self._result


def clock() -> Callable[[], float]:
    """The running loop's clock, to the microsecond: ``time.monotonic`` on asyncio.

    asyncio's own ``loop.time()`` is ``time.monotonic()``; uvloop's counts
    whole milliseconds, read once a loop pass, which made every sub-millisecond
    duration mds reports 0 or 1 ms. Waits until one of its times go through
    :func:`move_on_at`, relative to now, so that they keep to it on any loop.
    """
    return time.monotonic if asyncio_loop() is not None else anyio.current_time


def move_on_at(when: float, now: float) -> anyio.CancelScope:
    """A scope cancelled at ``when`` on :func:`clock`'s time, ``now`` being its time now."""
    return anyio.move_on_after(when - now)


def waiter_factory() -> Callable[[], Waiter]:
    """A function that makes a :class:`Waiter` for the running loop."""
    loop = asyncio_loop()
    return loop.create_future if loop is not None else _EventWaiter
