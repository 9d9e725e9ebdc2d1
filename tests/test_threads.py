"""The threads that run plain handler methods: order, limits, cancellation, exit.

On asyncio these are mds's own threads (``mds._threads``); on trio, anyio's.
Both must behave the same for the callers.
"""

from __future__ import annotations

import asyncio
import contextvars
import subprocess
import sys
import textwrap
import threading
import time

import anyio
import pytest

from mds import _loop, _threads

from .waiting import within

pytestmark = pytest.mark.anyio

who = contextvars.ContextVar("who", default="nobody")


async def wait_for(flag: threading.Event) -> None:
    """Wait for a thread's flag without blocking the loop."""
    assert await anyio.to_thread.run_sync(flag.wait, 10)


async def test_one_thread_runs_calls_one_at_a_time_in_the_order_made(
    anyio_backend_name: str,
) -> None:
    threads = _threads.threads(1, "test-one")
    running = threading.Lock()
    order: list[int] = []

    def call(index: int) -> int:
        if not running.acquire(blocking=False):
            raise AssertionError("two calls ran at once")
        try:
            order.append(index)
            time.sleep(0)
            return index * 2
        finally:
            running.release()

    results: dict[int, int] = {}

    async def caller(index: int) -> None:
        results[index] = await threads.run(call, index)

    try:
        async with anyio.create_task_group() as tasks:
            for index in range(200):
                tasks.start_soon(caller, index)
    finally:
        threads.close()
    # trio starts tasks in an order of its own; on asyncio they start, and
    # so hand their calls over, in the order they were made.
    assert (order if anyio_backend_name == "asyncio" else sorted(order)) == list(range(200))
    assert results == {i: i * 2 for i in range(200)}


async def test_never_more_calls_at_once_than_threads() -> None:
    threads = _threads.threads(3, "test-three")
    lock = threading.Lock()
    now = most = 0
    first_three = threading.Barrier(3, timeout=10)  # the first three meet: they overlap
    met = 0

    def call() -> None:
        nonlocal now, most, met
        with lock:
            now += 1
            most = max(most, now)
            meet, met = met < 3, met + 1
        if meet:
            first_three.wait()
        with lock:
            now -= 1

    try:
        async with anyio.create_task_group() as tasks:
            for _ in range(40):
                tasks.start_soon(threads.run, call)
    finally:
        threads.close()
    assert most == 3


async def test_errors_and_context_variables_reach_across() -> None:
    threads = _threads.threads(2, "test-context")

    def seen() -> str:
        return who.get()

    def fail() -> None:
        raise KeyError("missing")

    try:
        token = who.set("caller")
        try:
            assert await threads.run(seen) == "caller"
        finally:
            who.reset(token)
        with pytest.raises(KeyError, match="missing"):
            await threads.run(fail)
        assert await threads.run(seen) == "nobody"  # the thread kept nothing
    finally:
        threads.close()


async def test_a_cancelled_caller_waits_until_its_call_ends() -> None:
    # The call cannot be stopped: the caller waits for it, so that nothing
    # else starts on an instance whose last call is still running.
    threads = _threads.threads(1, "test-cancel")
    started, release = threading.Event(), threading.Event()
    left: list[str] = []

    def blocking() -> str:
        started.set()
        release.wait(10)
        return "done"

    async def caller(scope: anyio.CancelScope) -> None:
        with scope:
            await threads.run(blocking)
        left.append("left")  # cancelled (asyncio), or given the result (trio: no checkpoint)

    scope = anyio.CancelScope()
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(caller, scope)
            await wait_for(started)
            scope.cancel()
            await anyio.wait_all_tasks_blocked()
            assert left == []  # still waiting for the thread
            release.set()
        assert left == ["left"]
        assert await threads.run(lambda: "next") == "next"
    finally:
        release.set()
        threads.close()


def test_a_task_cancelled_twice_still_waits_for_its_call() -> None:
    async def main() -> None:
        threads = _threads.threads(1, "test-twice")
        started, release = threading.Event(), threading.Event()
        ended: list[float] = []

        def blocking() -> None:
            started.set()
            release.wait(10)
            ended.append(time.monotonic())

        task = asyncio.ensure_future(threads.run(blocking))
        await wait_for(started)
        for _ in range(2):
            task.cancel()
            for _ in range(5):
                await asyncio.sleep(0)
            assert not task.done()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ended  # the task ended after its call did
        threads.close()

    asyncio.run(main())


async def test_after_close_a_call_is_refused_clearly() -> None:
    threads = _threads.threads(1, "test-closed")
    assert await threads.run(lambda: 1) == 1
    threads.close()
    if _loop.asyncio_loop() is not None:
        with pytest.raises(RuntimeError, match="test-closed: cannot run calls after"):
            await threads.run(lambda: 2)


def run_script(source: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)],
        capture_output=True,
        text=True,
        timeout=45,
    )


def test_at_exit_a_call_in_a_thread_ends_before_the_process_does() -> None:
    # A call still running when the interpreter exits is waited for, as
    # concurrent.futures waits for its executors' calls; here its loop runs
    # in a daemon thread that exit would otherwise simply abandon.
    done = run_script(
        """
        import asyncio, threading
        from mds import _threads

        started, printed = threading.Event(), threading.Event()

        def slow():
            started.set()
            printed.wait(30)  # still running when the main thread ends
            print("call ended", flush=True)

        def loop_thread():
            async def main():
                threads = _threads.threads(1, "exiting")
                task = asyncio.ensure_future(threads.run(slow))
                await asyncio.sleep(3600)

            asyncio.run(main())

        threading.Thread(target=loop_thread, daemon=True).start()
        started.wait(30)
        print("main ended", flush=True)
        printed.set()
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["main ended", "call ended"]


async def test_a_call_cancelled_before_it_starts_is_withdrawn_at_once() -> None:
    # One thread, busy: a second call waits in the queue. Its caller, cancelled
    # (a deadline, say), leaves at once, and the call never runs.
    threads = _threads.threads(1, "test-withdraw")
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def blocking() -> None:
        started.set()
        release.wait(10)

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(threads.run, blocking)
            await wait_for(started)
            with anyio.CancelScope() as scope:
                scope.cancel()
                await threads.run(ran.append, "queued")
            assert not release.is_set()  # left while the thread was still busy
            release.set()
        assert await threads.run(lambda: "next") == "next"
        assert ran == []
    finally:
        release.set()
        threads.close()


async def test_per_request_threads_let_a_cancelled_caller_go_while_its_call_runs() -> None:
    threads = _threads.threads(1, "test-abandon", abandon=True)
    started, release = threading.Event(), threading.Event()
    left: list[str] = []

    def blocking() -> str:
        started.set()
        release.wait(10)
        return "late"

    async def caller(scope: anyio.CancelScope) -> None:
        with scope:
            await threads.run(blocking)
        left.append("left")

    scope = anyio.CancelScope()
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(caller, scope)
            await wait_for(started)
            scope.cancel()
            await anyio.wait_all_tasks_blocked()
        assert left == ["left"]  # gone although the call still runs
        assert not release.is_set()
    finally:
        release.set()
        threads.close()


async def test_a_call_its_caller_left_still_holds_its_thread() -> None:
    # The caller let go of a running call: the next call gets another thread
    # rather than waiting behind it.
    threads = _threads.threads(2, "test-held", abandon=True)
    started, release = threading.Event(), threading.Event()

    def blocking() -> None:
        started.set()
        release.wait(10)

    try:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(threads.run, blocking)
                await wait_for(started)
                scope.cancel()
        async with within(10):
            assert await threads.run(lambda: "next") == "next"  # while blocking still runs
        assert not release.is_set()
    finally:
        release.set()
        threads.close()
