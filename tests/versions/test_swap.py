"""Versions side by side and warm swaps, through the runtime's public API."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

import mds
import mds.batch
from mds import ModelState

from ..waiting import within


class Tagged(mds.ModelHandler[int, tuple[str, int]]):
    """Answers ``(version, x * 2)``; records its lifecycle in a shared log."""

    def __init__(self, log: list[tuple[str, str]] | None = None, delay: float = 0.0) -> None:
        self.log = log if log is not None else []
        self.delay = delay
        self.version = "?"
        self.torn_down = anyio.Event()

    def init(self, context: mds.ModelContext) -> None:
        self.version = context.version
        self.log.append(("init", self.version))

    def warmup(self) -> list[int]:
        return [1]

    async def infer(self, batch: Sequence[int]) -> list[tuple[str, int]]:
        if self.delay:
            await anyio.sleep(self.delay)
        self.log.append(("infer", self.version))
        return [(self.version, x * 2) for x in batch]

    async def teardown(self) -> None:
        self.log.append(("teardown", self.version))
        self.torn_down.set()


class FailsInit(Tagged):
    def init(self, context: mds.ModelContext) -> None:
        raise RuntimeError("weights missing")


class FailsWarmup(Tagged):
    async def infer(self, batch: Sequence[int]) -> list[tuple[str, int]]:
        raise RuntimeError("bad weights: NaN")


class Unhealthy(Tagged):
    def health(self) -> bool:
        return False


CONFIG = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=8, max_queue_delay=0.001))


async def test_twenty_swaps_under_load_lose_no_request() -> None:
    log: list[tuple[str, str]] = []
    runtime = mds.Runtime()
    runtime.add_model("m", Tagged(log, delay=0.001), CONFIG)
    answers: Counter[str] = Counter()
    failures: list[BaseException] = []
    done = anyio.Event()

    async def caller(seed: int) -> None:
        x = seed
        while not done.is_set():
            try:
                version, doubled = await runtime.serve("m", x)
            except Exception as exc:  # every failure is the test's failure
                failures.append(exc)
                return
            assert doubled == 2 * x
            answers[version] += 1
            x += 1

    async with runtime, anyio.create_task_group() as tasks:
        for seed in range(32):
            tasks.start_soon(caller, seed * 1000)
        for version in range(2, 22):
            await anyio.sleep(0.02)
            model = await runtime.load_model(
                "m", Tagged(log, delay=0.001), CONFIG, version=str(version)
            )
            assert model.state is ModelState.READY
            assert runtime.versions("m").traffic == {str(version): 1.0}
        await anyio.sleep(0.02)
        done.set()
    assert failures == []
    assert sum(answers.values()) > 1000
    assert set(answers) <= {str(v) for v in range(1, 22)}
    # Each version torn down once, after its last batch; the last at the runtime's stop.
    for version in (str(v) for v in range(1, 22)):
        events = [event for event, v in log if v == version]
        assert events.count("teardown") == 1, version
        assert events[-1] == "teardown", version
        assert events[0] == "init", version


async def test_a_version_that_fails_to_load_leaves_the_old_one_serving() -> None:
    runtime = mds.Runtime()
    runtime.add_model("m", Tagged(), CONFIG)
    async with runtime:
        for bad, cause in (
            (FailsInit(), "weights missing"),
            (FailsWarmup(), "NaN"),
            (Unhealthy(), "health"),
        ):
            with pytest.raises(mds.LifecycleError, match="version '2' failed to load") as caught:
                await runtime.load_model("m", bad, CONFIG, version="2")
            assert cause in str(caught.value)
            assert "version 1 goes on serving" in str(caught.value)
            assert await runtime.serve("m", 3) == ("1", 6)
            assert runtime.versions("m").versions == ("1",)
            status = {s.version: s for s in runtime.index()}
            assert status["2"].state is ModelState.FAILED
            assert cause in (status["2"].reason or "")
            assert status["1"].state is ModelState.READY and status["1"].default
        # A good version 2 then loads; the failure is no longer listed.
        await runtime.load_model("m", Tagged(), CONFIG, version="2")
        assert await runtime.serve("m", 3) == ("2", 6)
        assert [(s.version, s.state) for s in runtime.index()] == [
            ("1", ModelState.STOPPED),
            ("2", ModelState.READY),
        ]


async def test_versions_side_by_side_pinned_and_split() -> None:
    runtime = mds.Runtime()
    runtime.add_model("m", Tagged(), CONFIG, policy=mds.VersionPolicy(all=True))
    async with runtime:
        await runtime.load_model("m", Tagged(), CONFIG, version="2", default=False)
        versions = runtime.versions("m")
        assert versions.versions == ("1", "2")
        assert versions.traffic == {"1": 1.0}
        assert await runtime.serve("m", 1) == ("1", 2)
        assert await runtime.servable("m", "2").serve(1) == ("2", 2)
        traced = await runtime.servable("m", "2").serve(1, trace=True)
        assert traced.trace.version == "2"
        await runtime.set_traffic("m", {"1": 3, "2": 1})
        assert versions.traffic == {"1": 0.75, "2": 0.25}
        seen = Counter([(await runtime.serve("m", 1))[0] for _ in range(400)])
        assert 40 < seen["2"] < 160 and seen["1"] + seen["2"] == 400
        # Each request's chosen version answers it, whatever the split.
        for _ in range(20):
            chosen = versions.choose()
            assert (await chosen.serve(1))[0] == chosen.version
        await runtime.rollback("m")
        assert versions.traffic == {"1": 1.0}
        await anyio.to_thread.run_sync(runtime.set_traffic_sync, "m", {"2": 1})
        assert versions.traffic == {"2": 1.0}
        assert await anyio.to_thread.run_sync(runtime.rollback_sync, "m") == {"1": 1.0}
        with pytest.raises(mds.ModelNotFound, match="no version '7'"):
            runtime.servable("m", "7")


async def test_policy_unloads_what_it_does_not_keep_and_rollback_needs_it() -> None:
    log: list[tuple[str, str]] = []
    runtime = mds.Runtime()
    first = Tagged(log)
    runtime.add_model("m", first, CONFIG, policy=mds.VersionPolicy(latest=2))
    async with runtime:
        await runtime.load_model("m", Tagged(log), CONFIG, version="2")
        assert runtime.versions("m").versions == ("1", "2")
        assert await runtime.rollback("m") == {"1": 1.0}
        assert await runtime.serve("m", 5) == ("1", 10)
        await runtime.load_model("m", Tagged(log), CONFIG, version="3")
        # Latest two, plus none with traffic left: version 1 is unloaded.
        async with within(5):
            await first.torn_down.wait()
        assert runtime.versions("m").versions == ("2", "3")
        await runtime.load_model("m", Tagged(log), CONFIG, version="4", policy=mds.VersionPolicy())
        assert runtime.versions("m").versions == ("4",)
        with pytest.raises(mds.LifecycleError, match="nothing to roll back to"):
            await runtime.rollback("m")


async def test_reloading_the_same_version_swaps_it() -> None:
    log: list[tuple[str, str]] = []
    runtime = mds.Runtime()
    handler = Tagged(log)
    first = runtime.add_model("m", handler, CONFIG)
    async with runtime:
        pinned = runtime.servable("m", "1")
        second = await runtime.load_model("m", Tagged(log), CONFIG, version="1")
        assert second is not first and runtime.model("m") is second
        assert await pinned.serve(2) == ("1", 4)  # a pin follows the reload
        async with within(5):
            await handler.torn_down.wait()
    assert [e for e in log if e[0] != "infer"] == [
        ("init", "1"),
        ("init", "1"),
        ("teardown", "1"),
        ("teardown", "1"),
    ]


async def test_unload_and_load_again() -> None:
    runtime = mds.Runtime()
    runtime.add_model("m", Tagged(), CONFIG)
    runtime.add_model("other", Tagged(), CONFIG)
    async with runtime:
        await runtime.unload_model("m")
        with pytest.raises(mds.ModelNotFound, match="no model named 'm'"):
            await runtime.serve("m", 1)
        assert await runtime.serve("other", 1) == ("1", 2)
        assert [(s.name, s.version, s.state) for s in runtime.index()] == [
            ("m", "1", ModelState.STOPPED),
            ("other", "1", ModelState.READY),
        ]
        await runtime.load_model("m", Tagged(), CONFIG, version="5")
        assert await runtime.serve("m", 1) == ("5", 2)
        with pytest.raises(mds.ModelNotFound, match="no version '9'"):
            await runtime.unload_model("m", "9")
        with pytest.raises(mds.LifecycleError, match="version '1' failed to load"):
            await runtime.load_model("broken", FailsInit(), version="1")
        [failed] = [s for s in runtime.index() if s.name == "broken"]
        assert failed.state is ModelState.FAILED and "weights missing" in (failed.reason or "")
        brand_new = await runtime.load_model("fresh", Tagged(), version="1")
        assert brand_new.ready and await runtime.serve("fresh", 2) == ("1", 4)


def test_versions_added_before_start_and_the_policy_check() -> None:
    runtime = mds.Runtime()
    runtime.add_model("m", Tagged(), CONFIG)
    with pytest.raises(mds.ConfigError, match=r"policy \(latest 1\) would not keep version 1"):
        runtime.add_model("m", Tagged(), CONFIG, version="2")
    runtime.add_model("m", Tagged(), CONFIG, version="2", policy=mds.VersionPolicy(latest=2))
    with pytest.raises(mds.ConfigError, match=r"version .2. was already added"):
        runtime.add_model("m", Tagged(), CONFIG, version="2")
    with runtime:
        assert runtime.serve_sync("m", 1) == ("2", 2)
        assert runtime.servable("m", "1").serve_sync(1) == ("1", 2)
        runtime.load_model_sync("m", Tagged(), CONFIG, version="3")
        assert runtime.serve_sync("m", 1) == ("3", 2)
        runtime.unload_model_sync("m", "3")
        assert runtime.serve_sync("m", 1) == ("2", 2)  # the highest left takes the traffic


async def test_a_pipeline_node_follows_its_models_swap() -> None:
    runtime = mds.Runtime()
    runtime.add_model("m", Tagged(), CONFIG)
    runtime.add_pipeline(mds.Pipeline("p", [mds.Node.model("a", model="m")]))
    async with runtime:
        assert await runtime.serve("p", 2) == ("1", 4)
        await runtime.load_model("m", Tagged(), CONFIG, version="2")
        assert await runtime.serve("p", 2) == ("2", 4)


@pytest.mark.parametrize(
    ("policy", "versions", "kept"),
    [
        (mds.VersionPolicy(), ["1", "2", "10"], {"10"}),
        (mds.VersionPolicy(latest=2), ["1", "2", "10", "a"], {"10", "a"}),
        (mds.VersionPolicy(specific=(1, "3")), ["1", "2", "3"], {"1", "3"}),
        (mds.VersionPolicy(all=True), ["1", "x"], {"1", "x"}),
    ],
)
def test_version_policies(policy: mds.VersionPolicy, versions: list[str], kept: set[str]) -> None:
    assert policy.keeps(versions) == kept


def test_a_policy_takes_one_rule() -> None:
    with pytest.raises(mds.ConfigError, match="one of latest, specific and all"):
        mds.VersionPolicy(latest=2, all=True)


async def test_a_batch_job_keeps_one_version_through_a_swap(tmp_path: Path) -> None:
    runtime = mds.Runtime()
    runtime.add_model("m", Tagged(delay=0.002), CONFIG, policy=mds.VersionPolicy(latest=2))
    async with runtime:

        async def swap_midway() -> None:
            await anyio.sleep(0.05)
            await runtime.load_model("m", Tagged(), CONFIG, version="2")

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(swap_midway)
            report = await mds.batch.run(
                runtime.servable("m"), range(2000), tmp_path / "out", part_rows=200
            )
        assert report.rows == 2000 and report.failed == 0
        assert await runtime.serve("m", 1) == ("2", 2)  # the swap happened meanwhile
    lines = []
    parts = await anyio.to_thread.run_sync(lambda: sorted((tmp_path / "out").glob("part-*")))
    for part in parts:
        lines += (await anyio.Path(part).read_text()).splitlines()
    versions = {json.loads(line)["response"][0] for line in lines}
    assert len(lines) == 2000 and versions == {"1"}


async def test_a_batch_job_resumes_across_ways_of_naming_its_model(tmp_path: Path) -> None:
    runtime = mds.Runtime()
    runtime.add_model("m", Tagged(), CONFIG)
    async with runtime:
        first = await mds.batch.run(runtime.model("m"), range(50), tmp_path / "out")
        again = await mds.batch.run(runtime.servable("m"), range(50), tmp_path / "out", resume=True)
        assert first.done == 50 and again.skipped == 50
        await runtime.load_model("m", Tagged(), CONFIG, version="2")
        with pytest.raises(mds.ConfigError, match="version"):
            await mds.batch.run(runtime.servable("m"), range(50), tmp_path / "out", resume=True)


async def test_a_request_made_before_a_swap_and_awaited_after_it_is_served() -> None:
    runtime = mds.Runtime()
    runtime.add_model("m", Tagged(), CONFIG)
    async with runtime:
        early = runtime.serve("m", 4)  # picked now, queued when awaited
        pinned_early = runtime.servable("m", "1").serve(4)
        await runtime.load_model("m", Tagged(), CONFIG, version="2")
        await runtime.load_model("m", Tagged(), CONFIG, version="2")  # and a reload of it
        assert await early == ("2", 8)
        assert await pinned_early == ("2", 8)  # its version is gone: what serves answers


async def test_traffic_must_be_finite_shares() -> None:
    runtime = mds.Runtime()
    runtime.add_model("m", Tagged(), CONFIG, policy=mds.VersionPolicy(all=True))
    runtime.add_model("m", Tagged(), CONFIG, version="2")
    async with runtime:
        for bad in ({"1": float("inf"), "2": 1}, {"1": float("nan")}, {"1": -1}, {"1": 0}):
            with pytest.raises(mds.ConfigError):
                await runtime.set_traffic("m", bad)
        assert runtime.versions("m").traffic == {"2": 1.0}


async def test_a_failed_reload_of_a_loaded_version_is_listed() -> None:
    runtime = mds.Runtime()
    runtime.add_model("m", Tagged(), CONFIG)
    async with runtime:
        with pytest.raises(mds.LifecycleError):
            await runtime.load_model("m", FailsInit(), CONFIG, version="1")
        [status] = runtime.index()
        assert status.state is ModelState.READY
        assert "a reload failed (this copy serves on): init" in (status.reason or "")
        assert await runtime.serve("m", 1) == ("1", 2)
