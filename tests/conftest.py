"""Shared fixtures: event-loop backends, the blocking-call guard, test handlers."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import anyio
import pytest
import trio
from blockbuster import BlockBuster
from trio.testing import MockClock

import mds


def stepping_clock() -> MockClock:
    """trio's auto-jumping mock clock, jumping 0.1 s at most at a time.

    It jumps once the loop has been idle for 2 ms of real time, not at once:
    with a threshold of 0 the loop busy-polls and starves worker threads of
    the GIL. A loop waiting on a thread (a plain handler's infer) is idle
    too, and a full jump would then leap to whatever deadline is next: a
    drain timeout, a sequence's idle timeout, a test's own bound. In steps,
    a thread would have to run for 20 ms of real time per virtual second.
    """
    clock = MockClock(autojump_threshold=0.002)

    def step() -> None:  # replaces trio's hook (MockClock cannot be subclassed)
        jump = trio.lowlevel.current_statistics().seconds_to_next_deadline
        if 0 < jump < math.inf:
            clock.jump(min(jump, 0.1))

    clock._autojump = step  # type: ignore[method-assign]
    return clock


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """Every async test runs on asyncio and on trio with an auto-jumping clock.

    On trio, time is virtual: a test that waits for a delay or a deadline
    finishes at once and always the same way. See ``stepping_clock`` for how
    it jumps, and bound waits on threads with ``tests/waiting.py``, which
    counts real seconds, not with ``anyio.fail_after``.
    """
    if request.param == "trio":
        return ("trio", {"clock": stepping_clock()})
    if request.node.get_closest_marker("virtual_time"):
        pytest.skip("asserts on durations: runs on trio's virtual clock only")
    return "asyncio"


@pytest.fixture(autouse=True)
def no_blocking_on_the_loop(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail any async test whose code blocks the (asyncio) event loop."""
    if "anyio_backend" not in request.fixturenames:
        yield
        return
    guard = BlockBuster()
    # Allowed, with the reason:
    # - pytest's assertion rewriting writes .pyc files when a module is imported.
    guard.functions["os.stat"].can_block_in("_pytest/assertion/rewrite.py", {"_rewrite_test"})
    # - importing a module for the first time reads its source.
    for name in ("io.BufferedReader.read", "os.stat", "os.listdir"):
        guard.functions[name].can_block_in("<frozen importlib._bootstrap_external>", {"get_data"})
    guard.activate()
    try:
        yield
    finally:
        guard.deactivate()


class Doubler(mds.ModelHandler[float, float]):
    """A plain handler: doubles each number; records the batches it saw."""

    def __init__(self) -> None:
        self.batches: list[list[float]] = []

    def warmup(self) -> list[float]:
        return [1.0]

    def infer(self, batch: Sequence[float]) -> list[float]:
        self.batches.append(list(batch))
        return [2 * x for x in batch]


@pytest.fixture
def doubler() -> type[Doubler]:
    """The ``Doubler`` handler class."""
    return Doubler


class Recorder(mds.ModelHandler[Any, Any]):
    """Echoes its items; records each batch; holds batches while ``gate`` is shut.

    ``fail`` makes ``infer`` raise for any batch holding one of those values.
    """

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.gate: anyio.Event | None = None
        self.started = anyio.Event()
        self.fail: set[Any] = set()

    def hold(self) -> None:
        self.gate = anyio.Event()

    def release(self) -> None:
        if self.gate is not None:
            self.gate.set()

    async def busy(self, tasks: Any, model: Any, first: Any = 0) -> None:
        """Make ``model`` busy: ``first`` is being computed, held until ``release``."""
        self.hold()
        tasks.start_soon(model.serve, first)
        await self.started.wait()

    async def infer(self, batch: Sequence[Any]) -> list[Any]:
        self.batches.append(list(batch))
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail & set(batch):
            raise RuntimeError(f"cannot compute {sorted(self.fail & set(batch))}")
        return list(batch)

    @property
    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]


@pytest.fixture
def recorder() -> Recorder:
    """A ``Recorder`` handler object."""
    return Recorder()


async def answers_to(
    call: Callable[[], Awaitable[Any]], *, give_up: float | None = None
) -> list[Any]:
    """Every answer one caller got: its result, its mds error, or "gave up".

    ``give_up``: seconds after which the caller itself stops waiting (0 gives
    up at the first chance).
    """
    answers: list[Any] = []
    with anyio.CancelScope() as scope:
        if give_up is not None:
            scope.deadline = anyio.current_time() + give_up
        try:
            answers.append(await call())
        except mds.MdsError as exc:
            answers.append(exc)
    if scope.cancelled_caught:
        answers.append("gave up")
    return answers


@pytest.fixture(scope="session")
def answers() -> Callable[..., Awaitable[list[Any]]]:
    """``await answers(lambda: model.serve(x), give_up=0.1)``: see ``answers_to``."""
    return answers_to


class FakeOutOfMemory(RuntimeError):
    """What a fake GPU raises when a batch does not fit."""


class FakeDeviceFailure(RuntimeError):
    """What a fake GPU raises when it breaks."""


GiB = 1 << 30


class FakeGpus(mds.DeviceKind):
    """An inventory of pretend CUDA GPUs with memory that handlers can take."""

    name = "cuda"
    accelerator = True
    failure = FakeDeviceFailure

    def __init__(self, memory: Sequence[int]) -> None:
        self.total = list(memory)
        self.used = [0] * len(memory)
        self.broken: dict[int, str] = {}
        self.released = 0

    def discover(self) -> list[mds.DeviceInfo]:
        return [
            mds.DeviceInfo(
                device=mds.Device(kind="cuda", index=i),
                name="Fake GPU",
                total_memory=total,
                free_memory=total - self.used[i],
                utilization=0.25,
                healthy=i not in self.broken,
                error=self.broken.get(i),
            )
            for i, total in enumerate(self.total)
        ]

    def take(self, device: mds.Device, size: int) -> None:
        """Allocate ``size`` bytes on ``device``, or raise out of memory."""
        assert device.kind == "cuda" and device.index is not None
        if self.used[device.index] + size > self.total[device.index]:
            raise FakeOutOfMemory(f"{device}: cannot allocate {size} bytes")
        self.used[device.index] += size

    def give(self, device: mds.Device, size: int) -> None:
        assert device.index is not None
        self.used[device.index] -= size

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return isinstance(exc, FakeOutOfMemory)

    def is_device_failure(self, exc: BaseException) -> bool:
        return isinstance(exc, FakeDeviceFailure)

    def release_memory(self, device: mds.Device) -> None:
        self.released += 1


@pytest.fixture
def gpus() -> FakeGpus:
    """Four fake 16 GiB GPUs."""
    return FakeGpus([16 * GiB] * 4)


@pytest.fixture
def devices(gpus: FakeGpus) -> mds.DeviceManager:
    """A device manager with the CPU and the four fake GPUs, worker 0."""
    manager = mds.DeviceManager(worker_index=0)
    manager.register(gpus)
    return manager


async def serve_together(model: mds.ModelRuntime[Any, Any], requests: Sequence[Any]) -> list[Any]:
    """Send every request at once; each one's result or mds error, in order."""
    results: list[Any] = [None] * len(requests)

    async def call(index: int) -> None:
        try:
            results[index] = await model.serve(requests[index])
        except mds.MdsError as exc:
            results[index] = exc

    async with anyio.create_task_group() as tasks:
        for index in range(len(requests)):
            tasks.start_soon(call, index)
    return results


@pytest.fixture(scope="session")
def serve_all() -> Callable[..., Awaitable[list[Any]]]:
    """``await serve_all(model, requests)``: see ``serve_together``."""
    return serve_together
