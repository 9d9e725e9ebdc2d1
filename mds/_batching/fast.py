"""Backend-specific shortcuts for the hot paths, behind three functions.

anyio's portable primitives cost microseconds each on asyncio
(``anyio.Event()`` about 3 µs to create, ``anyio.current_time()`` about
1 µs); per request that is as much as a whole hand-written batcher spends.
And ``anyio.to_thread.run_sync`` yields to the loop before it hands the call
to a thread, so the next batch waits behind every caller the last batch
woke up. On asyncio these functions return the loop's own clock, futures and
an executor that starts the call at once, which behave the same for our use;
elsewhere (trio) they return the portable forms.
``benchmarks/batcher.py --portable`` measures what the shortcuts are worth.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import anyio

__all__ = ["Threads", "Waiter", "clock", "threads", "waiter_factory"]

T = TypeVar("T")

#: Turned off by the benchmark to measure the portable path.
ENABLED = True


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


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    if not ENABLED:
        return None
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # not asyncio (trio)
        return None


def clock() -> Callable[[], float]:
    """A function that returns ``anyio.current_time()`` for the running loop."""
    loop = _asyncio_loop()
    return loop.time if loop is not None else anyio.current_time


def waiter_factory() -> Callable[[], Waiter]:
    """A function that makes a :class:`Waiter` for the running loop."""
    loop = _asyncio_loop()
    return loop.create_future if loop is not None else _EventWaiter


class Threads(Protocol):
    """Worker threads for blocking calls, at most ``count`` at a time."""

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a thread; a cancelled caller waits for it to end."""
        ...

    def close(self) -> None:
        """Let the threads go once their calls are done."""
        ...


class _AnyioThreads:
    """The portable form: anyio's thread pool, behind a limiter."""

    def __init__(self, count: int) -> None:
        self._limiter = anyio.CapacityLimiter(count)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def close(self) -> None:
        pass


class _ExecutorThreads:
    """Our own executor: ``run`` hands the call over before it first yields."""

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int, name: str) -> None:
        self._loop = loop
        self._executor = ThreadPoolExecutor(max_workers=count, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        future = self._loop.run_in_executor(self._executor, call)
        try:
            return await asyncio.shield(future)
        except BaseException:
            # Cancelled: like anyio, wait for the thread (it cannot be stopped),
            # so that nothing else runs on this instance meanwhile.
            with anyio.CancelScope(shield=True):
                await asyncio.wait([future])
            raise

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def threads(count: int, name: str) -> Threads:
    """Threads for blocking calls in the running loop, ``count`` at most at once."""
    loop = _asyncio_loop()
    return _ExecutorThreads(loop, count, name) if loop is not None else _AnyioThreads(count)
