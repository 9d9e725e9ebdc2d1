"""More models than fit: loaded on first request, least recently used unloaded."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import anyio
import pytest

import mds
from mds import ModelState
from tests.conftest import FakeGpus, GiB


class Counted(mds.ModelHandler[int, tuple[str, int]]):
    """Counts its inits and teardowns by model name; slow to load, so loads overlap."""

    def __init__(self, name: str, events: Counter[str], delay: float = 0.0) -> None:
        self.name = name
        self.events = events
        self.delay = delay
        self.in_flight = 0

    async def init(self, context: mds.ModelContext) -> None:
        await anyio.sleep(0.05)
        self.events[f"init {self.name}"] += 1

    async def infer(self, batch: Sequence[int]) -> list[tuple[str, int]]:
        self.in_flight += 1
        try:
            if self.delay:
                await anyio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        return [(self.name, x + 1) for x in batch]

    async def teardown(self) -> None:
        assert self.in_flight == 0, "torn down with a batch in flight"
        self.events[f"teardown {self.name}"] += 1


def runtime_with(count: int, limit: int, events: Counter[str], delay: float = 0.0) -> mds.Runtime:
    runtime = mds.Runtime(max_resident_models=limit)
    for index in range(count):
        name = f"m{index}"
        runtime.add_model(name, Counted(name, events, delay), on_demand=True)
    return runtime


async def test_concurrent_first_requests_load_a_model_once() -> None:
    events: Counter[str] = Counter()
    runtime = runtime_with(2, 2, events)
    async with runtime:
        assert runtime.model("m0").state is ModelState.CREATED
        assert (await runtime.health()).ready  # loads on demand: ready meanwhile
        answers = await runtime.serve_many("m0", list(range(50)))
        assert answers == [("m0", x + 1) for x in range(50)]
        async with anyio.create_task_group() as tasks:
            for x in range(50):
                tasks.start_soon(runtime.serve, "m1", x)
        assert events["init m0"] == 1 and events["init m1"] == 1
        stats = runtime.residency()
        assert stats.loads == 2 and stats.evictions == 0
        assert stats.resident == ("m0:1", "m1:1")


async def test_more_models_than_the_limit_evict_the_least_recently_used() -> None:
    events: Counter[str] = Counter()
    runtime = runtime_with(4, 2, events)
    async with runtime:
        assert await runtime.serve("m0", 1) == ("m0", 2)
        assert await runtime.serve("m1", 1) == ("m1", 2)
        assert await runtime.serve("m0", 1) == ("m0", 2)  # m0 is now the most recent
        assert await runtime.serve("m2", 1) == ("m2", 2)  # evicts m1
        assert runtime.residency().resident == ("m0:1", "m2:1")
        assert runtime.model("m1").state is ModelState.STOPPED
        assert events["teardown m1"] == 1 and events["teardown m0"] == 0
        assert await runtime.serve("m1", 5) == ("m1", 6)  # loaded again, m0 out
        stats = runtime.residency()
        assert stats.resident == ("m2:1", "m1:1")
        assert (stats.loads, stats.evictions) == (4, 2)
        assert stats.misses == 4 and stats.hits >= 1


async def test_a_busy_model_is_evicted_only_after_its_requests_finish() -> None:
    events: Counter[str] = Counter()
    runtime = runtime_with(3, 1, events, delay=0.2)
    async with runtime:
        results: list[tuple[str, int]] = []

        async def call(name: str, x: int) -> None:
            results.append(await runtime.serve(name, x))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(call, "m0", 1)
            await anyio.sleep(0.1)  # m0 loaded, its batch in flight
            tasks.start_soon(call, "m1", 1)
        assert sorted(results) == [("m0", 2), ("m1", 2)]
        assert events["teardown m0"] == 1


async def test_hammering_many_models_through_a_small_limit_loses_nothing() -> None:
    events: Counter[str] = Counter()
    runtime = runtime_with(6, 2, events)
    failures: list[BaseException] = []
    answers = 0

    async def caller(seed: int) -> None:
        nonlocal answers
        for step in range(15):
            name = f"m{(seed + step) % 6}"
            try:
                assert await runtime.serve(name, step) == (name, step + 1)
                answers += 1
            except Exception as exc:
                failures.append(exc)

    async with runtime, anyio.create_task_group() as tasks:
        for seed in range(12):
            tasks.start_soon(caller, seed)
    assert failures == [] and answers == 12 * 15
    for index in range(6):
        assert events[f"init m{index}"] == events[f"teardown m{index}"]  # each load torn down


async def test_a_model_that_fails_to_load_on_demand_says_why() -> None:
    class Broken(Counted):
        async def init(self, context: mds.ModelContext) -> None:
            raise OSError("weights not found")

    runtime = mds.Runtime(max_resident_models=1)
    runtime.add_model("broken", Broken("broken", Counter()), on_demand=True)
    runtime.add_model("fine", Counted("fine", Counter()))
    async with runtime:
        with pytest.raises(mds.NotReady, match=r"loading it on demand failed: .*weights not found"):
            await runtime.serve("broken", 1)
        assert not (await runtime.health()).ready
        assert await runtime.serve("fine", 1) == ("fine", 2)  # not on demand: always there
        assert runtime.residency().failed_loads == 1


def test_bad_limits_are_refused() -> None:
    with pytest.raises(mds.ConfigError, match="max_resident_models"):
        mds.Runtime(max_resident_models=0)
    with pytest.raises(mds.ConfigError, match="max_resident_memory"):
        mds.Runtime(max_resident_memory={"cuda:x": 10})


class Big(mds.ModelHandler[int, int]):
    """Takes ``size`` bytes on its (pretend) GPU while loaded."""

    def __init__(self, gpus: FakeGpus, size: int) -> None:
        self.gpus = gpus
        self.size = size

    def init(self, context: mds.ModelContext) -> None:
        self.device = context.device
        self.gpus.take(self.device, self.size)

    def infer(self, batch: Sequence[int]) -> list[int]:
        return list(batch)

    def teardown(self) -> None:
        self.gpus.give(self.device, self.size)


async def test_a_memory_limit_per_device_evicts_by_what_loads_measured(gpus: FakeGpus) -> None:
    devices = mds.DeviceManager(worker_index=0)
    devices.register(gpus)
    runtime = mds.Runtime(devices=devices, max_resident_memory={"cuda:0": 10 * GiB})
    config = mds.ModelConfig(devices="cuda:0")
    for name in ("a", "b", "c"):
        runtime.add_model(name, Big(gpus, 4 * GiB), config, on_demand=True)
    async with runtime:
        assert await runtime.serve("a", 1) == 1
        assert await runtime.serve("b", 1) == 1
        assert runtime.residency().memory == {
            "a:1": {"cuda:0": 4 * GiB},
            "b:1": {"cuda:0": 4 * GiB},
        }
        assert await runtime.serve("c", 1) == 1  # 12 GiB measured: the oldest goes
        stats = runtime.residency()
        assert stats.resident == ("b:1", "c:1") and stats.evictions == 1
        assert gpus.used[0] == 8 * GiB
        # Measured once, a model makes room before it loads again: never above the limit.
        assert await runtime.serve("a", 1) == 1
        assert gpus.used[0] == 8 * GiB and runtime.residency().resident == ("c:1", "a:1")


class SlowLoad(Counted):
    async def init(self, context: mds.ModelContext) -> None:
        await anyio.sleep(0.5)
        self.events[f"init {self.name}"] += 1


async def test_a_deadline_covers_the_load_and_the_load_goes_on() -> None:
    events: Counter[str] = Counter()
    runtime = mds.Runtime()
    runtime.add_model("slow", SlowLoad("slow", events), on_demand=True)
    async with runtime:
        with pytest.raises(mds.DeadlineExceeded, match="while the model loaded on demand"):
            await runtime.serve("slow", 1, timeout=0.1)
        assert await runtime.serve("slow", 1, timeout=5) == ("slow", 2)  # the same load
        assert events["init slow"] == 1


async def test_a_failed_load_is_not_retried_at_once() -> None:
    tries: Counter[str] = Counter()

    class Broken(Counted):
        async def init(self, context: mds.ModelContext) -> None:
            tries["init"] += 1
            raise OSError("weights not found")

    runtime = mds.Runtime()
    runtime.add_model("broken", Broken("broken", Counter()), on_demand=True)
    async with runtime:
        for _ in range(3):
            with pytest.raises(mds.NotReady, match="weights not found"):
                await runtime.serve("broken", 1)
        assert tries["init"] == 1


async def test_an_on_demand_version_is_checked_before_it_swaps_in() -> None:
    class Broken(Counted):
        async def init(self, context: mds.ModelContext) -> None:
            raise OSError("corrupt")

    runtime = mds.Runtime(max_resident_models=2)
    runtime.add_model("m", Counted("good", Counter()), on_demand=True)
    async with runtime:
        with pytest.raises(mds.LifecycleError, match=r"version '2' failed to load: .*corrupt"):
            await runtime.load_model("m", Broken("bad", Counter()), version="2", on_demand=True)
        assert await runtime.serve("m", 1) == ("good", 2)
        model = await runtime.load_model(
            "m", Counted("new", Counter()), version="3", on_demand=True
        )
        assert model.state is ModelState.READY  # loaded by the load, resident now
        assert runtime.residency().resident[-1] == "m:3"
        assert await runtime.serve("m", 1) == ("new", 2)
        [status] = [s for s in runtime.index() if s.version == "3"]
        assert status.on_demand and status.default


async def test_unloading_a_model_while_it_loads_on_demand_leaves_no_ghost() -> None:
    events: Counter[str] = Counter()
    runtime = mds.Runtime(max_resident_models=1)
    runtime.add_model("slow", SlowLoad("slow", events), on_demand=True)
    async with runtime:
        async with anyio.create_task_group() as tasks:

            async def waiting() -> None:
                with pytest.raises(mds.MdsError):
                    await runtime.serve("slow", 1)

            tasks.start_soon(waiting)
            await anyio.sleep(0.1)  # loading
            await runtime.unload_model("slow")
        assert runtime.residency().resident == ()
        assert events["init slow"] == events["teardown slow"]
