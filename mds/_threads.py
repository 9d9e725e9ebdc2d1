"""Worker threads for plain (blocking) handler methods, and calling user code.

On asyncio these are threads of mds's own, fed from one queue, each outcome
handed back with ``call_soon_threadsafe``: ``run_in_executor`` costs about
100 µs a call here (its semaphores and locks are Python, and it chains two
futures), this about 25 µs; and ``anyio.to_thread.run_sync`` yields to the
loop before it hands the call over, so the next batch would wait behind
every caller the last batch woke up. Elsewhere (trio) they are anyio's.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import queue
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar, cast

import anyio

from . import _exit, _loop

__all__ = ["Threads", "is_async", "off_loop", "plain_as", "plain_form", "threads"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Threads(Protocol):
    """Worker threads for blocking calls, at most ``count`` at a time."""

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a thread.

        A caller cancelled before its call started takes it back at once.
        One cancelled while its call runs waits for it to end (it cannot be
        stopped), unless the threads were made with ``abandon=True``.
        """
        ...

    def close(self) -> None:
        """Let the threads go once their calls are done."""
        ...


def threads(count: int, name: str, *, abandon: bool = False) -> Threads:
    """Threads for blocking calls in the running loop, ``count`` at most at once.

    ``abandon``: a cancelled caller does not wait for its running call (whose
    outcome is dropped). Right for per-request work, whose caller must get
    its deadline error at once; wrong for an instance's own calls, which
    must never overlap.
    """
    loop = _loop.asyncio_loop()
    if loop is None:
        return _AnyioThreads(count, abandon)
    return _LoopThreads(loop, count, name, abandon)


def is_async(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` returns an awaitable (an ``async def``)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - a callable object's own method
    return call is not None and inspect.iscoroutinefunction(call)


#: The async steps whose whole body is ``return self.<method>(request)``, and
#: that method's name. Keyed by the function itself, so that a wrapper of
#: one (``functools.wraps`` copies attributes) is not taken for it.
_plain: dict[Callable[..., Any], str] = {}


def plain_as(method: str) -> Callable[[F], F]:
    """Mark an ``async def`` step whose whole body is ``return self.<method>(request)``.

    mds then calls that plain method on the loop itself (see
    :func:`plain_form`), sparing a request the step's two coroutines; awaiting
    the step works as before. For mds's own handlers' checks, which run per
    request.
    """

    def mark(fn: F) -> F:
        _plain[fn] = method
        return fn

    return mark


def plain_form(step: Callable[[Any], Any]) -> Callable[[Any], Any] | None:
    """The plain method behind a bound step marked with :func:`plain_as`, bound; else ``None``."""
    method = _plain.get(getattr(step, "__func__", None))  # type: ignore[arg-type]
    if method is None:
        return None
    return cast(Callable[[Any], Any], getattr(step.__self__, method))  # type: ignore[attr-defined]


def off_loop(fn: Callable[..., Any], threads: Threads) -> Callable[..., Awaitable[Any]]:
    """An async callable that runs ``fn``: awaited if async, else in ``threads``.

    The check happens once, here, not on every call.
    """
    if is_async(fn):
        return fn
    return functools.partial(threads.run, fn)


class _AnyioThreads:
    """The portable form: anyio's thread pool, behind a limiter."""

    def __init__(self, count: int, abandon: bool) -> None:
        self._limiter = anyio.CapacityLimiter(count)
        self._abandon = abandon

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(
            fn, *args, limiter=self._limiter, abandon_on_cancel=self._abandon
        )

    def close(self) -> None:
        pass


class _Call:
    """One call handed to a thread, and how its outcome gets back to the loop."""

    __slots__ = ("args", "claim", "context", "fn", "future", "settled", "then")

    def __init__(self, future: asyncio.Future[Any], fn: Callable[..., Any], args: Any) -> None:
        self.future = future
        self.context = contextvars.copy_context()
        self.fn = fn
        self.args = args
        #: Emptied by whoever takes the call first: the thread that runs it,
        #: or a cancelled caller withdrawing it (``list.pop`` is atomic).
        self.claim = [True]
        self.settled = False
        #: Set by a caller that was cancelled and now waits for the thread.
        self.then: asyncio.Future[None] | None = None


def _take(call: _Call) -> bool:
    """Claim ``call``; ``False`` if the other side had it first."""
    try:
        call.claim.pop()
    except IndexError:
        return False
    return True


class _LoopThreads:
    """Threads of our own fed from one queue; each outcome returns by ``call_soon_threadsafe``.

    A call is handed over before ``run`` first yields, and calls start in
    the order they were made.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, count: int, name: str, abandon: bool
    ) -> None:
        self._loop = loop
        self._count = count
        self._name = name
        self._abandon = abandon
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        # Calls handed over and not yet done, counted on the loop: a call whose
        # caller left counts until its thread is done with it.
        self._pending = 0
        self._closed = False
        _every.add(self)
        _close_all_at_exit()

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
            if _take(call):  # withdrawn before it started: it never will
                self._pending -= 1
                raise
            if self._abandon or call.settled:
                raise  # not waited for
            # Like anyio, wait for the thread (it cannot be stopped), so that
            # nothing else runs on this instance meanwhile.
            call.then = then = self._loop.create_future()
            with anyio.CancelScope(shield=True):
                while not then.done():
                    try:
                        await asyncio.wait([then])
                    except asyncio.CancelledError:
                        pass  # cancelled again: still waiting; raised below
            raise

    def _settle(self, call: _Call, result: Any, error: BaseException | None) -> None:
        """On the loop: hand the thread's outcome to the caller, if it still waits."""
        self._pending -= 1
        call.settled = True
        if call.then is not None:
            call.then.set_result(None)
        future = call.future
        if future.cancelled():
            return
        if error is None:
            future.set_result(result)
        elif isinstance(error, StopIteration):  # a future refuses it: the caller would hang
            future.set_exception(RuntimeError(f"the call raised StopIteration: {error!r}"))
        else:
            future.set_exception(error)

    def _start_thread(self) -> None:
        thread = threading.Thread(
            target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True
        )
        # Listed before it starts: once its first call runs, exit may already
        # be closing (from another thread) and must find it to wait for it.
        self._threads.append(thread)
        thread.start()
        if self._closed:  # closed meanwhile: this one got no sentinel
            self._calls.put(None)

    def _work(self) -> None:
        calls, loop, settle = self._calls, self._loop, self._settle
        while (call := calls.get()) is not None:
            if not _take(call):
                continue  # its caller withdrew it
            result: Any = None
            error: BaseException | None = None
            try:
                result = call.context.run(call.fn, *call.args)
            except BaseException as exc:
                error = exc
            try:
                loop.call_soon_threadsafe(settle, call, result, error)
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
_every: weakref.WeakSet[_LoopThreads] = weakref.WeakSet()
_exiting = False
_hooked = False


def _close_all_at_exit() -> None:
    global _hooked
    if not _hooked:
        _hooked = True
        _exit.on_exit(_close_all, stage=_exit.THREADS)


def _close_all() -> None:
    global _exiting
    _exiting = True
    for threads in list(_every):
        threads.close()
    for threads in list(_every):
        threads.join()
