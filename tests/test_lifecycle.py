"""The handler lifecycle: states, transitions, failures, restarts, context."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import anyio
import pytest

import mds
from mds import ModelState


class Recorder(mds.ModelHandler[int, int]):
    """Records each lifecycle call with the model's state at that moment."""

    model: mds.ModelRuntime[int, int]

    def __init__(self, log: list[tuple[str, ModelState]]) -> None:
        self.log = log

    async def init(self, context: mds.ModelContext) -> None:
        self.log.append(("init", self.model.state))

    async def warmup(self) -> list[int]:
        self.log.append(("warmup", self.model.state))
        return [1]

    async def infer(self, batch: Sequence[int]) -> list[int]:
        self.log.append(("infer", self.model.state))
        return list(batch)

    async def teardown(self) -> None:
        self.log.append(("teardown", self.model.state))


async def test_a_model_goes_through_every_state_in_order() -> None:
    log: list[tuple[str, ModelState]] = []
    handler = Recorder(log)
    model = mds.ModelRuntime(handler, name="recorder")
    handler.model = model
    assert model.state is ModelState.CREATED
    async with model:
        assert model.state is ModelState.READY
        assert await model.serve(5) == 5
    assert model.state is ModelState.STOPPED
    assert log == [
        ("init", ModelState.LOADING),
        ("warmup", ModelState.WARMING),
        ("infer", ModelState.WARMING),  # warm-up runs through the real path
        ("infer", ModelState.READY),
        ("teardown", ModelState.DRAINING),
    ]


class Probing(mds.ModelHandler[int, int]):
    """Sends a request and asks for health from inside init and warm-up."""

    model: mds.ModelRuntime[int, int]

    def __init__(self) -> None:
        self.refusals: list[str] = []
        self.reasons: list[str | None] = []

    async def _probe(self) -> None:
        with pytest.raises(mds.NotReady) as info:
            await self.model.serve(1)
        self.refusals.append(str(info.value))
        self.reasons.append((await self.model.health()).reason)

    async def init(self, context: mds.ModelContext) -> None:
        await self._probe()

    async def warmup(self) -> list[int]:
        await self._probe()
        return [0]

    async def infer(self, batch: Sequence[int]) -> list[int]:
        return [x + 1 for x in batch]


async def test_requests_before_ready_fail_at_once_naming_the_state() -> None:
    handler = Probing()
    model = mds.ModelRuntime(handler, name="probing")
    handler.model = model
    with pytest.raises(mds.NotReady, match=r"model 'probing' .*: not ready: it is created"):
        await model.serve(1)
    async with model:
        assert await model.serve(1) == 2
    with pytest.raises(mds.NotReady, match="it is stopped"):
        await model.serve(1)
    assert handler.refusals == [
        "model 'probing' (version 1): not ready: it is loading",
        "model 'probing' (version 1): not ready: it is warming",
    ]
    assert handler.reasons == ["it is loading", "it is warming"]
    assert model.statistics().errors == {"NotReady": 4}


class Flaky(mds.ModelHandler[int, int]):
    """Fails in the step named by ``fail_in`` until it is cleared."""

    fail_in: str | None = "init"
    tore_down = 0

    def init(self, context: mds.ModelContext) -> None:
        if self.fail_in == "init":
            raise FileNotFoundError("weights.pt")

    def warmup(self) -> list[int]:
        return [1, 2, 3]

    def infer(self, batch: Sequence[int]) -> list[int]:
        if self.fail_in == "warmup" and len(batch) == 4:
            raise MemoryError("batch of 4 does not fit")
        return list(batch)

    def teardown(self) -> None:
        type(self).tore_down += 1


@pytest.mark.parametrize(
    ("step", "reason"),
    [
        ("init", "init of instance 0 on cpu raised FileNotFoundError: weights.pt"),
        (
            "warmup",
            "warm-up of instance 0 at batch size 4 failed on example 0: "
            "InferenceError: infer failed on a batch of 4: MemoryError: batch of 4 does not fit",
        ),
    ],
)
async def test_a_failed_start_reports_its_cause_and_can_start_again(step: str, reason: str) -> None:
    class Handler(Flaky):
        fail_in = step

    config = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=4))
    model = mds.ModelRuntime(Handler, config, name="flaky")
    with pytest.raises(mds.LifecycleError, match=r"model 'flaky' .*: failed to start") as info:
        async with model:
            pytest.fail("a failed model must not start")
    assert model.state is ModelState.FAILED
    assert model.failure == reason
    assert str(info.value) == f"model 'flaky' (version 1): failed to start: {reason}"
    assert (info.value.model, info.value.version) == ("flaky", "1")
    assert info.value.__cause__ is not None
    # An instance whose init succeeded was torn down again.
    assert Handler.tore_down == (1 if step == "warmup" else 0)
    with pytest.raises(mds.NotReady, match=f"it is failed: {reason[:20]}"):
        await model.serve(1)
    health = await model.health()
    assert health.state is ModelState.FAILED and health.reason == f"it is failed: {reason}"

    Handler.fail_in = None
    async with model:
        assert model.failure is None
        assert await model.serve(7) == 7


async def test_a_model_can_be_started_again_after_a_stop(doubler: Any) -> None:
    model = mds.ModelRuntime(doubler, name="again")
    for _ in range(2):
        async with model:
            assert await model.serve(1.5) == 3.0
        assert model.state is ModelState.STOPPED


async def test_starting_a_running_model_is_an_error(doubler: Any) -> None:
    model = mds.ModelRuntime(doubler, name="twice")
    async with model:
        with pytest.raises(mds.LifecycleError, match="already ready"):
            async with model:
                pass


async def test_the_context_names_model_version_device_instance_and_config(
    devices: mds.DeviceManager,
) -> None:
    contexts: list[mds.ModelContext] = []

    class Handler(mds.ModelHandler[int, str]):
        def init(self, context: mds.ModelContext) -> None:
            contexts.append(context)
            self.prefix = context.parameters["prefix"]

        def infer(self, batch: Sequence[int]) -> list[str]:
            return [f"{self.prefix}{x}" for x in batch]

    config = mds.ModelConfig(instances=3, devices=("cpu", "cuda:1"), parameters={"prefix": "n="})
    runtime = mds.Runtime(devices=devices)
    runtime.add_model("ctx", Handler, config, version="7")
    async with runtime:
        assert await runtime.serve("ctx", 4) == "n=4"
    assert sorted(c.instance for c in contexts) == [0, 1, 2]
    by_index = {c.instance: c for c in contexts}
    assert [by_index[i].device.name for i in range(3)] == ["cpu", "cuda:1", "cpu"]
    assert all(c.name == "ctx" and c.version == "7" and c.config is config for c in contexts)


async def test_several_instances_need_a_factory(doubler: Any) -> None:
    with pytest.raises(mds.ConfigError, match="3 instances need one handler each"):
        mds.ModelRuntime(doubler(), mds.ModelConfig(instances=3))
    with pytest.raises(mds.ConfigError, match="must be a ModelHandler"):
        mds.ModelRuntime(42)  # type: ignore[arg-type]


async def test_a_factory_that_returns_no_handler_fails_the_start() -> None:
    model = mds.ModelRuntime(lambda: "nope", name="bad")  # type: ignore[arg-type, return-value]
    with pytest.raises(mds.LifecycleError, match="returned str, not a ModelHandler"):
        async with model:
            pass
    assert model.state is ModelState.FAILED


class Mixed(mds.ModelHandler[float, float]):
    """Records which thread each method ran on; plain or async per subclass."""

    def __init__(self) -> None:
        self.threads: dict[str, int] = {}

    def _seen(self, step: str) -> None:
        self.threads[step] = threading.get_ident()


class PlainMethods(Mixed):
    def init(self, context: mds.ModelContext) -> None:
        self._seen("init")

    def warmup(self) -> list[float]:
        self._seen("warmup")
        return [0.0]

    def health(self) -> bool:
        self._seen("health")
        return True

    def preprocess(self, request: float) -> float:
        self._seen("preprocess")
        return request + 1

    def infer(self, batch: Sequence[float]) -> list[float]:
        self._seen("infer")
        return [x * 10 for x in batch]

    def postprocess(self, output: float) -> float:
        self._seen("postprocess")
        return output - 1

    def teardown(self) -> None:
        self._seen("teardown")


class AsyncMethods(Mixed):
    async def init(self, context: mds.ModelContext) -> None:
        self._seen("init")

    async def warmup(self) -> list[float]:
        self._seen("warmup")
        return [0.0]

    async def health(self) -> bool:
        self._seen("health")
        return True

    async def preprocess(self, request: float) -> float:
        self._seen("preprocess")
        return request + 1

    async def infer(self, batch: Sequence[float]) -> list[float]:
        self._seen("infer")
        return [x * 10 for x in batch]

    async def postprocess(self, output: float) -> float:
        self._seen("postprocess")
        return output - 1

    async def teardown(self) -> None:
        self._seen("teardown")


@pytest.mark.parametrize("handler_class", [PlainMethods, AsyncMethods])
async def test_plain_methods_run_off_the_loop_and_async_ones_on_it(
    handler_class: type[Mixed],
) -> None:
    handler = handler_class()
    async with mds.ModelRuntime(handler) as model:
        assert await model.serve(2.0) == 29.0
        assert (await model.health()).ready
    loop_thread = threading.get_ident()
    steps = {"init", "warmup", "health", "preprocess", "infer", "postprocess", "teardown"}
    assert set(handler.threads) == steps
    on_loop = {step for step, thread in handler.threads.items() if thread == loop_thread}
    assert on_loop == (steps if handler_class is AsyncMethods else set())


async def test_health_reports_a_failing_check_by_instance() -> None:
    class Sick(mds.ModelHandler[int, int]):
        def init(self, context: mds.ModelContext) -> None:
            self.index = context.instance

        async def health(self) -> bool:
            if self.index == 1:
                raise ConnectionError("feature store unreachable")
            return self.index != 2

        def infer(self, batch: Sequence[int]) -> list[int]:
            return list(batch)

    runtime = mds.Runtime()
    runtime.add_model("sick", Sick, mds.ModelConfig(instances=3))
    async with runtime:
        health = await runtime.health()
    assert health.live and not health.ready
    assert health.models["sick"].reason == (
        "instance 1: health check raised ConnectionError: feature store unreachable; "
        "instance 2: health check returned False"
    )


async def test_a_health_check_that_hangs_counts_as_not_ready() -> None:
    class Slow(mds.ModelHandler[int, int]):
        async def health(self) -> bool:
            await anyio.sleep(60)
            return True

        def infer(self, batch: Sequence[int]) -> list[int]:
            return list(batch)

    async with mds.ModelRuntime(Slow(), mds.ModelConfig(health_timeout=0.5)) as model:
        health = await model.health()
    assert not health.ready
    assert health.reason == "instance 0: health check took longer than 0.5 s"


async def test_teardown_errors_are_logged_and_the_model_still_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Leaky(mds.ModelHandler[int, int]):
        def infer(self, batch: Sequence[int]) -> list[int]:
            return list(batch)

        def teardown(self) -> None:
            raise RuntimeError("could not release the GPU")

    model = mds.ModelRuntime(Leaky())
    with caplog.at_level(logging.ERROR, logger="mds"):
        async with model:
            pass
    assert model.state is ModelState.STOPPED
    assert "teardown failed" in caplog.text and "could not release the GPU" in caplog.text


async def test_statistics_count_start_times_and_batches(doubler: Any) -> None:
    config = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=4))
    async with mds.ModelRuntime(doubler, config) as model:
        await model.serve(1.0)
        stats = model.statistics()
    assert stats.state is ModelState.READY
    assert (stats.requests, stats.completed, stats.failed, stats.rejected) == (1, 1, 0, 0)
    # warm-up (batch sizes 1 and 4) is not counted as serving
    assert (stats.batches, stats.batched_items, stats.batch_sizes) == (1, 1, {1: 1})
    assert stats.mean_batch_size == 1.0
    assert stats.init_seconds >= 0 and stats.warmup_seconds >= 0
