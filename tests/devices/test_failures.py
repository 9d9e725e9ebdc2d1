"""Device failures and out-of-memory: only the affected requests fail."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import anyio
import pytest

import mds

GiB = 1 << 30


class Hungry(mds.ModelHandler[int, int]):
    """Each item takes 1 GiB of its fake GPU while its batch runs.

    The first batch is held until ``gate`` opens, so that the requests sent
    meanwhile queue up and form one big batch. Item ``-1`` breaks the device.
    """

    gpus: Any
    gate: anyio.Event
    started: anyio.Event
    sizes: list[int]

    def init(self, context: mds.ModelContext) -> None:
        self.device = context.device

    async def infer(self, batch: Sequence[int]) -> list[int]:
        Hungry.sizes.append(len(batch))
        if -1 in batch:
            raise self.gpus.failure("CUDA error: an illegal memory access was encountered")
        if not Hungry.started.is_set():
            Hungry.started.set()
            await Hungry.gate.wait()
        self.gpus.take(self.device, len(batch) * GiB)
        self.gpus.give(self.device, len(batch) * GiB)
        return [2 * x for x in batch]


@pytest.fixture
def hungry(gpus: Any) -> type[Hungry]:
    Hungry.gpus = gpus
    Hungry.gate = anyio.Event()
    Hungry.started = anyio.Event()
    Hungry.sizes = []
    return Hungry


async def serve_while_held(model: mds.ModelRuntime[Any, Any], requests: list[int]) -> list[Any]:
    """Serve ``requests`` at once while a first request holds the model."""
    results: list[Any] = [None] * len(requests)

    async def call(index: int) -> None:
        try:
            results[index] = await model.serve(requests[index])
        except mds.MdsError as exc:
            results[index] = exc

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(model.serve, 100)
        await Hungry.started.wait()
        for index in range(len(requests)):
            tasks.start_soon(call, index)
        await anyio.wait_all_tasks_blocked()
        Hungry.gate.set()
    return results


@pytest.mark.parametrize("isolate_failures", [True, False])
async def test_out_of_memory_splits_the_batch_and_lowers_the_limit(
    devices: mds.DeviceManager,
    gpus: Any,
    hungry: type[Hungry],
    caplog: pytest.LogCaptureFixture,
    isolate_failures: bool,
) -> None:
    gpus.total[0] = 5 * GiB  # room for a batch of 5
    config = mds.ModelConfig(
        devices="cuda:0",
        batching=mds.BatchingConfig(max_batch_size=16, isolate_failures=isolate_failures),
    )
    with caplog.at_level(logging.WARNING, logger="mds"):
        async with mds.ModelRuntime(hungry, config, devices=devices) as model:
            results = await serve_while_held(model, list(range(16)))
            stats = model.statistics()
            after = await serve_while_held(model, list(range(12)))
            later = model.statistics()
    assert results == [2 * x for x in range(16)]  # every request answered, none failed
    # 16 -> 8 (OOM) -> 4 + 4 -> twice more; the limit follows: 16 -> 8 -> 4
    assert Hungry.sizes[:7] == [1, 16, 8, 4, 4, 4, 4]
    assert stats.max_batch_size == 4 and stats.out_of_memory == 2 and stats.failed == 0
    assert gpus.released == 2
    assert "out of device memory with a batch of 16 (cost 16); the batch limit is now 8" in (
        caplog.text
    )
    # later batches respect the lowered limit and no longer run out of memory
    assert after == [2 * x for x in range(12)]
    assert max(Hungry.sizes[7:]) <= 4 and later.out_of_memory == 2


async def test_an_item_too_big_alone_fails_alone(
    devices: mds.DeviceManager, gpus: Any, hungry: type[Hungry]
) -> None:
    gpus.total[0] = 0  # nothing fits, not even one item
    Hungry.started.set()  # nothing held
    config = mds.ModelConfig(devices="cuda:0", batching=mds.BatchingConfig(max_batch_size=4))
    async with mds.ModelRuntime(hungry, config, devices=devices) as model:
        with pytest.raises(mds.InferenceError, match="FakeOutOfMemory"):
            await model.serve(3)
        assert (await model.health()).ready  # out of memory is not a device failure


async def test_set_batching_resets_a_lowered_limit(
    devices: mds.DeviceManager, gpus: Any, hungry: type[Hungry]
) -> None:
    gpus.total[0] = 2 * GiB
    config = mds.ModelConfig(devices="cuda:0", batching=mds.BatchingConfig(max_batch_size=8))
    async with mds.ModelRuntime(hungry, config, devices=devices) as model:
        await serve_while_held(model, list(range(8)))
        assert model.statistics().max_batch_size == 2
        model.set_batching(mds.BatchingConfig(max_batch_size=6))
        assert model.statistics().max_batch_size == 6


async def test_a_device_failure_makes_its_instances_unready(
    devices: mds.DeviceManager, gpus: Any, hungry: type[Hungry]
) -> None:
    Hungry.started.set()  # nothing held
    config = mds.ModelConfig(instances=2, devices=("cuda:0", "cuda:1"))
    async with mds.ModelRuntime(hungry, config, devices=devices) as model:
        assert (await model.health()).ready
        outcomes = [await _outcome(model, x) for x in (-1, -1, 1, 2)]
        assert isinstance(outcomes[0], mds.InferenceError)
        assert "illegal memory access" in str(outcomes[0])
        assert outcomes[2:] == [2, 4]
        health = await model.health()
        assert not health.ready
        assert health.reason is not None
        assert "device cuda:" in health.reason and "failed: FakeDeviceFailure: CUDA error" in (
            health.reason
        )
        broken = [info for info in health.devices if not info.healthy]
        assert broken and broken[0].error is not None
    info = devices.info(broken[0].device)
    assert not info.healthy and "illegal memory access" in (info.error or "")
    # a failed device takes no new instances
    config = mds.ModelConfig(devices=str(info.device))
    with pytest.raises(mds.LifecycleError, match="failed earlier"):
        async with mds.ModelRuntime(hungry, config, devices=devices):
            pass


async def _outcome(model: mds.ModelRuntime[Any, Any], request: int) -> Any:
    try:
        return await model.serve(request)
    except mds.MdsError as exc:
        return exc


async def test_a_device_that_reports_itself_unhealthy_makes_the_model_unready(
    devices: mds.DeviceManager, gpus: Any, hungry: type[Hungry]
) -> None:
    Hungry.started.set()  # nothing held
    config = mds.ModelConfig(devices="cuda:2")
    async with mds.ModelRuntime(hungry, config, devices=devices) as model:
        gpus.broken[2] = "Xid 79: fell off the bus"
        health = await model.health()
    assert not health.ready
    assert health.reason == "instance 0: device cuda:2 failed: Xid 79: fell off the bus"
