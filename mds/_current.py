"""The runtime that ``mds.serve`` uses: the most recently started one still running."""

from __future__ import annotations

import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from ._errors import NotReady

if TYPE_CHECKING:
    from ._runtime import Runtime

__all__ = ["current_runtime", "serve", "serve_sync", "started", "stopped"]

_lock = threading.Lock()
_running: list[Runtime] = []  # started runtimes, most recent last


def started(runtime: Runtime) -> None:
    """``runtime`` has started: it is the current one now."""
    with _lock:
        _running.append(runtime)


def stopped(runtime: Runtime) -> None:
    """``runtime`` has stopped: the one started before it (if running) is current again."""
    with _lock:
        if runtime in _running:
            _running.remove(runtime)


def current_runtime() -> Runtime:
    """The runtime :func:`serve` uses: the most recently started one still running.

    Raises:
        NotReady: no runtime is running.
    """
    try:
        return _running[-1]  # no lock: a read of a list item is atomic
    except IndexError:
        pass
    raise NotReady(
        "no mds runtime is running: start one (async with runtime, or "
        "runtime.start_sync()) before calling mds.serve"
    )


def serve(
    model: str,
    request: Any,
    *,
    timeout: float | None = None,
    priority: int | None = None,
    trace: bool = False,
    sequence_id: int | str | None = None,
    sequence_start: bool = False,
    sequence_end: bool = False,
) -> Coroutine[Any, Any, Any]:
    """Serve one request with a model or pipeline of the running runtime; for async routes.

    Uses :func:`current_runtime`. Works in asyncio and trio apps, whichever
    loop or thread the runtime runs in. Await it.

    Args:
        model: the model's (or pipeline's) name.
        request: the request, as the model's ``preprocess`` takes it.
        timeout: deadline in seconds from now; defaults to the model's.
        priority: priority level (0 is the highest); defaults to the model's.
        trace: return a :class:`Traced` with where the call's time went.
        sequence_id: for a stateful model, the sequence this request is a
            step of (see :doc:`/stateful`).
        sequence_start: it is the sequence's first step.
        sequence_end: it is the sequence's last step.

    Returns:
        The model's response (in a :class:`Traced` with ``trace=True``).

    Raises:
        NotReady: no runtime is running, or the model is not ready.
        ModelNotFound: the runtime has no such model.
        MdsError: the errors :meth:`ModelRuntime.serve` raises (``Overloaded``,
            ``InvalidInput``, ``DeadlineExceeded``, ``InferenceError``).

    Example:
        >>> @app.post("/classify")
        ... async def classify(body: Body) -> dict[str, str]:
        ...     return {"label": await mds.serve("classifier", body.pixels)}

    Added in 0.1.
    """
    # A plain def: the caller awaits the model's own request path, with no
    # coroutine of ours in between (benchmarks/batcher.py measures this path).
    try:
        runtime = _running[-1]  # no lock: a read of a list item is atomic
    except IndexError:
        return _not_running()  # raised where the call is awaited, as by an async def
    return runtime.serve(
        model,
        request,
        timeout=timeout,
        priority=priority,
        trace=trace,
        sequence_id=sequence_id,
        sequence_start=sequence_start,
        sequence_end=sequence_end,
    )


async def _not_running() -> Any:
    return current_runtime()  # raises NotReady


def serve_sync(
    model: str,
    request: Any,
    *,
    timeout: float | None = None,
    priority: int | None = None,
    trace: bool = False,
    sequence_id: int | str | None = None,
    sequence_start: bool = False,
    sequence_end: bool = False,
) -> Any:
    """Blocking form of :func:`serve`, for Flask views, WSGI apps and threads.

    Thread-safe. Every call goes to the runtime's one event loop; none starts
    a loop of its own. Works from a thread that already runs a loop (a
    notebook) when the runtime lives elsewhere (started with ``start_sync``).

    Example:
        >>> @app.post("/classify")
        ... def classify():
        ...     return {"label": mds.serve_sync("classifier", request.json["pixels"])}

    Added in 0.1.
    """
    return current_runtime().serve_sync(
        model,
        request,
        timeout=timeout,
        priority=priority,
        trace=trace,
        sequence_id=sequence_id,
        sequence_start=sequence_start,
        sequence_end=sequence_end,
    )
