"""Backend-specific shortcuts for the hot paths, behind three functions.

anyio's portable primitives cost microseconds each on asyncio
(``anyio.Event()`` about 3 µs to create, ``anyio.current_time()`` about
1 µs); per request that is as much as a whole hand-written batcher spends.
And ``anyio.to_thread.run_sync`` yields to the loop before it hands the call
to a thread, so the next batch waits behind every caller the last batch
woke up. On asyncio these functions return the loop's own clock, futures and
threads of mds's own that start the call at once (a quarter of the cost of
``run_in_executor``), which behave the same for our use; elsewhere (trio)
they return the portable forms.
``benchmarks/batcher.py --portable`` measures what the shortcuts are worth.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import queue
import threading
import weakref
from collections.abc import Callable, Generator
from typing import Any, Protocol, TypeVar, cast

import anyio

__all__ = ["Threads", "Waiter", "clock", "threads", "wait_for_threads_at_exit", "waiter_factory"]

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


class _Call:
    """One call handed to a thread, and how its outcome gets back to the loop."""

    __slots__ = ("args", "context", "fn", "future", "settled", "then")

    def __init__(self, future: asyncio.Future[Any], fn: Callable[..., Any], args: Any) -> None:
        self.future = future
        self.context = contextvars.copy_context()
        self.fn = fn
        self.args = args
        self.settled = False
        #: Set by a caller that was cancelled and now waits for the thread.
        self.then: asyncio.Future[None] | None = None


def _settle(call: _Call, result: Any, error: BaseException | None) -> None:
    """On the loop: hand the thread's outcome to the caller."""
    call.settled = True
    if call.then is not None:
        call.then.set_result(None)
    future = call.future
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class _LoopThreads:
    """Threads of our own fed from one queue; each outcome returns by ``call_soon_threadsafe``.

    ``run_in_executor`` on a ``ThreadPoolExecutor`` costs about 100 µs a
    call here (its semaphores and locks are Python, and it chains two
    futures); this costs about 30 µs. A call is handed over before ``run``
    first yields, and calls start in the order they were made.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int, name: str) -> None:
        self._loop = loop
        self._count = count
        self._name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._pending = 0  # calls handed over and not yet settled (counted on the loop)
        self._closed = False
        _all_threads.add(self)
        wait_for_threads_at_exit()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed or _exiting:
            raise RuntimeError(f"{self._name}: cannot run calls after the threads were closed")
        call = _Call(self._loop.create_future(), fn, args)
        self._calls.put(call)
        self._pending += 1
        if self._pending > len(self._threads) < self._count:
            self._start_thread()
        try:
            return cast(T, await call.future)
        except asyncio.CancelledError:
            # Like anyio, wait for the thread (it cannot be stopped), so that
            # nothing else runs on this instance meanwhile.
            if not call.settled:
                call.then = then = self._loop.create_future()
                with anyio.CancelScope(shield=True):
                    while not then.done():
                        try:
                            await asyncio.wait([then])
                        except asyncio.CancelledError:
                            pass  # cancelled again: still waiting; raised below
            raise
        finally:
            self._pending -= 1

    def _start_thread(self) -> None:
        thread = threading.Thread(
            target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True
        )
        thread.start()
        self._threads.append(thread)

    def _work(self) -> None:
        calls, loop = self._calls, self._loop
        while (call := calls.get()) is not None:
            result: Any = None
            error: BaseException | None = None
            try:
                result = call.context.run(call.fn, *call.args)
            except BaseException as exc:
                error = exc
            try:
                loop.call_soon_threadsafe(_settle, call, result, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass
            del call, result, error  # hold nothing while idle

    def close(self) -> None:
        """Let the threads go once the calls already handed over are done."""
        if not self._closed:
            self._closed = True
            for _ in self._threads:
                self._calls.put(None)

    def join(self) -> None:
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()


# Every set of threads, so that interpreter exit can wait for their calls
# to end (as concurrent.futures does for its executors): the threads are
# daemons, so that one that was never closed cannot keep the process alive.
_all_threads: weakref.WeakSet[_LoopThreads] = weakref.WeakSet()
_exiting = False


_hooked = False


def wait_for_threads_at_exit() -> None:
    """Have interpreter exit wait for the threads' calls (once; idempotent).

    Exit hooks run latest first: whoever must still run calls at exit (the
    hook that stops runtimes started with ``start_sync``) calls this before
    registering its own hook.
    """
    global _hooked
    if not _hooked:
        _hooked = True
        getattr(threading, "_register_atexit", atexit.register)(_at_exit)


def _at_exit() -> None:
    global _exiting
    _exiting = True
    for threads in list(_all_threads):
        threads.close()
    for threads in list(_all_threads):
        threads.join()


def threads(count: int, name: str) -> Threads:
    """Threads for blocking calls in the running loop, ``count`` at most at once."""
    loop = _asyncio_loop()
    return _LoopThreads(loop, count, name) if loop is not None else _AnyioThreads(count)
