"""The sync facade: one background event loop per process, and calls into a loop.

Objects with an ``async with`` lifetime (models, runtimes) live in one event
loop. Code in other threads, with or without a loop of its own, reaches them
through a :class:`~anyio.from_thread.BlockingPortal` that each object opens
for its lifetime. Sync code that has no loop at all starts them in mds's own
background loop, started once per process on first use.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
from anyio.from_thread import BlockingPortal

from ._batching.fast import wait_for_threads_at_exit
from ._errors import LifecycleError, MdsError

__all__ = ["LoopBound", "process_portal"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_lock = threading.Lock()
_portal: BlockingPortal | None = None
# Objects started with start_sync and not yet stopped; stopped at exit.
_started: dict[int, LoopBound] = {}


def process_portal() -> BlockingPortal:
    """The portal of mds's background event loop, started on first use.

    The loop runs in a daemon thread, so it never keeps the interpreter
    alive; at exit, whatever was started through it is stopped (drained).
    """
    global _portal
    with _lock:
        if _portal is None:
            _portal = _start_loop_thread()
            wait_for_threads_at_exit()  # first: exit hooks run latest first
            _at_exit(_stop_all)
        return _portal


def _at_exit(fn: Callable[[], None]) -> None:
    """Call ``fn`` at interpreter exit while thread pools still take work.

    ``atexit`` runs too late: by then ``concurrent.futures`` has shut every
    executor, and a handler's ``teardown`` could not run in a thread. Hooks
    registered here run before that (latest first), as the stdlib's own do.
    """
    register = getattr(threading, "_register_atexit", None)
    if register is None:  # pragma: no cover - not CPython
        atexit.register(fn)
    else:
        register(fn)


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
    """Mixin: an ``async with`` object that other threads and loops can call.

    Subclasses implement ``__aenter__``/``__aexit__``, calling
    :meth:`_open_bridge` first and :meth:`_close_bridge` last. They get
    ``start_sync`` / ``stop_sync`` and ``with`` for sync code, and route
    calls that arrive from a thread other than their loop's.

    (Not through an ``AsyncExitStack``: with a task group in the same stack,
    a cancelled exit makes it chain a ``CancelledError`` to itself, and
    anyio's task group then loops forever.)
    """

    _portal: BlockingPortal | None = None
    _home: int | None = None  # ident of the thread whose loop we live in
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

    def _not_running(self) -> MdsError:
        """The error for a call that arrives while this object is not running."""
        raise NotImplementedError

    async def _open_bridge(self) -> None:
        """Let other threads call in; pair with :meth:`_close_bridge`."""
        portal = BlockingPortal()
        await portal.__aenter__()
        self._portal = portal
        self._home = threading.get_ident()

    async def _close_bridge(self) -> None:
        portal, self._portal, self._home = self._portal, None, None
        if portal is not None:
            # Calls still running from other threads are cancelled.
            await portal.stop(cancel_remaining=True)
            await portal.__aexit__(None, None, None)

    def _at_home(self) -> bool:
        """Whether the caller runs in this object's own event-loop thread."""
        return self._home == threading.get_ident()

    async def _call_from_elsewhere(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Await ``fn(*args)`` in our loop, from a task of another loop.

        Cancelling the caller cancels the call in our loop.
        """
        portal = self._portal
        if portal is None:
            raise self._not_running()
        future = portal.start_task_soon(fn, *args)
        try:
            return await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            future.cancel()
            raise

    def _call_sync(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(*args)`` in our loop and block this thread for the result."""
        portal = self._portal
        if portal is None:
            raise self._not_running()
        if self._at_home():
            raise LifecycleError(
                f"{self!r}: a blocking call was made from the event-loop thread "
                "that must answer it, which would deadlock; await the async form instead"
            )
        return portal.call(fn, *args)

    def start_sync(self) -> None:
        """Start in mds's background event loop, for code with no loop of its own.

        Blocks until started (for a model: loaded and warmed up). Pair with
        :meth:`stop_sync`, or use ``with``. Whatever is still running at
        interpreter exit is stopped then.

        Raises:
            LifecycleError: already started, or a model failed to start.
        """
        portal = process_portal()
        with _lock:
            if self._sync_cm is not None:
                raise LifecycleError(f"{self!r} was already started with start_sync()")
            self._sync_cm = portal.wrap_async_context_manager(self)
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
