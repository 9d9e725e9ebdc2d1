"""Calling user code that may be plain or async, without blocking the loop."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from ._batching.fast import Threads

__all__ = ["is_async", "off_loop"]


def is_async(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` returns an awaitable (an ``async def``)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - a callable object's own method
    return call is not None and inspect.iscoroutinefunction(call)


def off_loop(fn: Callable[..., Any], threads: Threads) -> Callable[..., Awaitable[Any]]:
    """An async callable that runs ``fn``: awaited if async, else in ``threads``.

    The check happens once, here, not on every call.
    """
    if is_async(fn):
        return fn
    return functools.partial(threads.run, fn)
