"""Calls into an object's event loop from other threads and loops; the sync facade.

Objects with an ``async with`` lifetime (models, runtimes) live in one event
loop, their :class:`Home`. A call from elsewhere (another loop, a thread
with no loop) goes through :meth:`Home.call` and friends, the one routing
mechanism: on the home loop's thread the call runs as it is; from
elsewhere it is forwarded through a :class:`~anyio.from_thread.BlockingPortal`
that the object opens for its lifetime. Sync code that has no loop at all
starts such objects in mds's own background loop (:func:`process_portal`).

A forwarded call runs in a copy of the caller's context (its contextvars:
anyio's portal hands the call over with ``call_soon_threadsafe`` or trio's
token, which copy it), so the caller's OpenTelemetry span and request id
go with it; tests/test_tracing.py holds it to that.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
from anyio.from_thread import BlockingPortal

from . import _exit
from ._errors import LifecycleError, MdsError

__all__ = ["Home", "LoopBound", "forward", "process_portal"]

logger = logging.getLogger("mds.runtime")

T = TypeVar("T")

_get_ident = threading.get_ident
_lock = threading.Lock()
_portal: BlockingPortal | None = None
# Objects started with start_sync and not yet stopped; stopped at exit.
_started: dict[int, LoopBound] = {}


class Home:
    """The loop an object lives in while it runs, and the way in from elsewhere.

    Args:
        not_running: the error for a blocking call that arrives while the
            object is not running (an async call goes through as it is, and
            the object answers it itself).
    """

    __slots__ = ("_not_running", "portal", "thread")

    def __init__(self, not_running: Callable[[], MdsError]) -> None:
        self._not_running = not_running
        self.portal: BlockingPortal | None = None
        self.thread: int | None = None  # ident of the thread whose loop it is

    async def open(self) -> None:
        """Let other threads call in; in the object's loop. Pair with :meth:`close`."""
        portal = BlockingPortal()
        await portal.__aenter__()
        self.portal = portal
        self.thread = _get_ident()

    async def close(self) -> None:
        portal, self.portal, self.thread = self.portal, None, None
        if portal is not None:
            # Calls still running from other threads are cancelled.
            await portal.stop(cancel_remaining=True)
            await portal.__aexit__(None, None, None)

    def call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> Coroutine[Any, Any, T]:
        """``fn(*args)``, awaited in the home loop; forwarded there from another loop.

        A plain function handing back the awaitable, so that a call at home
        costs no coroutine of its own. Cancelling a forwarded call cancels it
        at home.
        """
        if self.thread == _get_ident() or self.portal is None:
            return fn(*args)
        return forward(self.portal, fn, *args)

    async def iterate(
        self, fn: Callable[..., Coroutine[Any, Any, AsyncIterator[T]]], *args: Any
    ) -> AsyncIterator[T]:
        """The items of the async iterator ``await fn(*args)`` makes at home.

        From another loop, each item is fetched from the home loop. Leaving
        early closes the iterator at home.
        """
        items = await self.call(fn, *args)
        try:
            while (item := await self.call(_next_item, items)) is not _END:
                yield item
        finally:
            close = getattr(items, "aclose", None)
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await self.call(close)

    def soon(self, fn: Callable[..., object], *args: Any) -> None:
        """Run the plain function ``fn(*args)`` at home: at once on its thread, else soon.

        From another thread it is handed over and not waited for; one that
        arrives as the object stops is dropped (there is nothing left to do).
        """
        portal = self.portal
        if self.thread == _get_ident() or portal is None:
            fn(*args)
            return
        try:
            future = portal.start_task_soon(_run_plain, fn, *args)
        except RuntimeError:  # the portal stopped meanwhile
            return
        future.add_done_callback(lambda done: _log_failure(fn, done))

    def call_sync(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(*args)`` in the home loop and block this thread for the result.

        Raises:
            LifecycleError: called from the home loop's own thread, which
                must answer it (it would deadlock).
        """
        return self._blocking().call(fn, *args)

    def submit(self, fn: Callable[..., Awaitable[T]], *args: Any) -> Future[T]:
        """Start ``fn(*args)`` in the home loop; its future, for a thread to wait on.

        For a blocking call that must act on ``KeyboardInterrupt`` (stop the
        work gracefully) rather than leave it running. Raises as :meth:`call_sync`.
        """
        return self._blocking().start_task_soon(fn, *args)

    def _blocking(self) -> BlockingPortal:
        """The portal for a blocking call from this thread; refuses one that would deadlock."""
        portal = self.portal
        if portal is None:
            raise self._not_running()
        if self.thread == _get_ident():
            raise LifecycleError(
                "a blocking call was made from the event-loop thread that must answer "
                "it, which would deadlock; await the async form instead"
            )
        return portal

    def iterate_sync(
        self, fn: Callable[..., Awaitable[AsyncIterator[T]]], *args: Any
    ) -> Iterator[T]:
        """Blocking form of :meth:`iterate`; starts when iteration begins."""
        items = self.call_sync(fn, *args)
        try:
            while (item := self.call_sync(_next_item, items)) is not _END:
                yield item
        finally:
            close = getattr(items, "aclose", None)
            if close is not None and self.portal is not None:
                self.call_sync(close)


async def forward(portal: BlockingPortal, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``await fn(*args)`` in the portal's loop, from another loop; cancelled there if cancelled."""
    future = portal.start_task_soon(fn, *args)
    try:
        return await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        future.cancel()
        raise


_END: Any = object()


async def _run_plain(fn: Callable[..., object], *args: Any) -> None:
    fn(*args)


def _log_failure(fn: Callable[..., object], done: Future[None]) -> None:
    """Log what a call handed over by :meth:`Home.soon` raised: no caller waits for it."""
    if not done.cancelled() and (exc := done.exception()) is not None:
        name = getattr(fn, "__qualname__", repr(fn))
        logger.error("%s, called from another thread, failed: %s", name, exc, exc_info=exc)


async def _next_item(items: AsyncIterator[Any]) -> Any:
    """The next item, or ``_END`` (a portal call cannot raise ``StopAsyncIteration``)."""
    return await anext(items, _END)


def process_portal() -> BlockingPortal:
    """The portal of mds's background event loop, started on first use.

    The loop runs in a daemon thread, so it never keeps the interpreter
    alive; at exit, whatever was started through it is stopped (drained).
    """
    global _portal
    with _lock:
        if _portal is None:
            _portal = _start_loop_thread()
            _exit.on_exit(_stop_all, stage=_exit.STOP)
        return _portal


def _start_loop_thread() -> BlockingPortal:
    ready = threading.Event()
    box: list[BlockingPortal | BaseException] = []

    async def host() -> None:
        async with BlockingPortal() as portal:
            box.append(portal)
            ready.set()
            await portal.sleep_until_stopped()

    def run() -> None:
        try:
            anyio.run(host)
        except BaseException as exc:  # pragma: no cover - the loop failed to start
            box.append(exc)
        finally:
            ready.set()

    threading.Thread(target=run, name="mds-event-loop", daemon=True).start()
    ready.wait()
    if not isinstance(box[0], BlockingPortal):  # pragma: no cover
        raise LifecycleError("mds could not start its background event loop") from box[0]
    return box[0]


def _stop_all() -> None:
    for obj in list(_started.values()):
        try:
            obj.stop_sync()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            logger.exception("stopping %r at exit failed", obj)


class LoopBound:
    """Mixin: an ``async with`` object that sync code can start, stop and call.

    Subclasses make ``self._home`` and implement ``__aenter__``/``__aexit__``,
    opening the home first and closing it last. They get ``start_sync`` /
    ``stop_sync`` and ``with`` for sync code.

    (Not through an ``AsyncExitStack``: with a task group in the same stack,
    a cancelled exit makes it chain a ``CancelledError`` to itself, and
    anyio's task group then loops forever.)
    """

    _home: Home
    _sync_cm: AbstractContextManager[Any] | None = None

    async def __aenter__(self) -> Self:
        raise NotImplementedError

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        raise NotImplementedError

    def start_sync(self) -> None:
        """Start in mds's background event loop, for code with no loop of its own.

        Blocks until started (for a model: loaded and warmed up). Pair with
        :meth:`stop_sync`, or use ``with``. Whatever is still running at
        interpreter exit is stopped then.

        Raises:
            LifecycleError: already started, or a model failed to start.
        """
        self._start_sync(self)

    def _start_sync(self, context: Any) -> None:
        """Enter ``context`` (this object's lifetime) in the background loop."""
        portal = process_portal()
        with _lock:
            if self._sync_cm is not None:
                raise LifecycleError(f"{self!r} was already started with start_sync()")
            self._sync_cm = portal.wrap_async_context_manager(context)
        try:
            self._sync_cm.__enter__()
        except BaseException:
            self._sync_cm = None
            raise
        _started[id(self)] = self

    def stop_sync(self) -> None:
        """Stop what :meth:`start_sync` started: drain in-flight work, then tear down."""
        with _lock:
            cm, self._sync_cm = self._sync_cm, None
            _started.pop(id(self), None)
        if cm is None:
            raise LifecycleError(f"{self!r} was not started with start_sync()")
        cm.__exit__(None, None, None)

    def __enter__(self) -> Self:
        self.start_sync()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_sync()
