"""Bounded waits in async tests, measured by the wall clock.

On trio the tests run on an auto-jumping virtual clock (see
``stepping_clock`` in ``conftest.py``): once the loop has sat idle for 2 ms
of real time, the clock jumps 0.1 s ahead. A loop waiting on a thread (a
handler's init or infer, a file read, boto3) is idle, so
``anyio.fail_after(10)`` around such a wait expires after 0.2 s of real
waiting. These waits count real seconds on either backend.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], what: str, seconds: float = 10.0
) -> None:
    """Poll ``check`` until it holds; fail, naming ``what``, after ``seconds`` of real time."""
    deadline = time.monotonic() + seconds
    while True:
        held = check()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"never {what} (waited {seconds} s)")
        await anyio.sleep(0.01)


@asynccontextmanager
async def within(seconds: float) -> AsyncIterator[None]:
    """As ``anyio.fail_after(seconds)``, by the wall clock: raises TimeoutError."""
    expired = False

    async def watch(scope: anyio.CancelScope) -> None:
        nonlocal expired
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:  # noqa: ASYNC110 - the wall clock, not the loop's
            await anyio.sleep(0.01)
        expired = True
        scope.cancel()

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(watch, tasks.cancel_scope)
            yield
            tasks.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # the body's own error, unwrapped
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    if expired:
        raise TimeoutError(f"not done within {seconds} s of real time")
