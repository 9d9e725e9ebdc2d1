"""The device manager: discovery, placement policies, thread budgets, missing devices."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import pytest

import mds

GiB = 1 << 30


class Where(mds.ModelHandler[int, str]):
    """Answers with the device its instance runs on; records its context."""

    contexts: list[mds.ModelContext]

    def init(self, context: mds.ModelContext) -> None:
        self.context = context
        Where.contexts.append(context)

    def infer(self, batch: Sequence[int]) -> list[str]:
        return [self.context.device.name for _ in batch]


@pytest.fixture(autouse=True)
def fresh_contexts() -> None:
    Where.contexts = []


def placed() -> list[str]:
    """The device of each instance started so far, by instance index."""
    by_index = {c.instance: c.device.name for c in Where.contexts}
    return [by_index[i] for i in sorted(by_index)]


async def start(manager: mds.DeviceManager, **config: Any) -> list[str]:
    """Start a ``Where`` model with ``config`` under ``manager``; where its instances went."""
    async with mds.ModelRuntime(Where, mds.ModelConfig(**config), devices=manager):
        pass
    return placed()


def test_the_default_manager_finds_the_cpu_with_memory_and_cores() -> None:
    manager = mds.DeviceManager.default()
    assert manager is mds.DeviceManager.default()
    cpu = manager.info(mds.Device(kind="cpu"))
    assert cpu.healthy and cpu.error is None
    assert cpu.total_memory is not None and cpu.total_memory > 0
    assert cpu.free_memory is not None and 0 < cpu.free_memory <= cpu.total_memory
    assert cpu.cores == len(os.sched_getaffinity(0))
    assert [info.device.name for info in manager.devices("cpu")] == ["cpu"]


def test_cpu_placement_never_imports_torch() -> None:
    code = (
        "import sys, mds\n"
        "async def main():\n"
        "    class H(mds.ModelHandler):\n"
        "        def infer(self, batch): return list(batch)\n"
        "    async with mds.ModelRuntime(H, mds.ModelConfig(instances=2)) as m:\n"
        "        assert await m.serve(1) == 1\n"
        "        assert (await m.health()).devices[0].device.name == 'cpu'\n"
        "import anyio; anyio.run(main)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=45)


def test_the_fake_inventory_lists_every_gpu(devices: mds.DeviceManager) -> None:
    names = [info.device.name for info in devices.devices("cuda")]
    assert names == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    info = devices.info(mds.Device.parse("cuda:2"))
    assert (info.name, info.total_memory, info.utilization) == ("Fake GPU", 16 * GiB, 0.25)


async def test_an_explicit_list_is_used_round_robin(devices: mds.DeviceManager) -> None:
    where = await start(devices, instances=5, devices=("cuda:2", "cpu", "cuda:0"))
    assert where == ["cuda:2", "cpu", "cuda:0", "cuda:2", "cpu"]


async def test_a_kind_alone_means_every_device_of_that_kind(devices: mds.DeviceManager) -> None:
    assert await start(devices, instances=4, devices="cuda") == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
        "cuda:3",
    ]


async def test_auto_takes_every_gpu(devices: mds.DeviceManager) -> None:
    assert await start(devices, instances=6, devices="auto") == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
        "cuda:3",
        "cuda:0",
        "cuda:1",
    ]


async def test_auto_without_gpus_is_the_cpu() -> None:
    manager = mds.DeviceManager(worker_index=0)
    manager.register(_no_gpus())
    assert await start(manager, instances=2, devices="auto") == ["cpu", "cpu"]


def _no_gpus() -> mds.DeviceKind:
    class NoGpus(mds.DeviceKind):
        name = "cuda"
        accelerator = True

        def discover(self) -> list[mds.DeviceInfo]:
            return []

    return NoGpus()


async def test_the_worker_index_spreads_processes_over_the_gpus(gpus: Any) -> None:
    where = []
    for worker in range(4):
        manager = mds.DeviceManager(worker_index=worker)
        manager.register(gpus)
        Where.contexts = []
        where.append(await start(manager, instances=2, devices="auto"))
    assert where == [
        ["cuda:0", "cuda:1"],
        ["cuda:2", "cuda:3"],
        ["cuda:0", "cuda:1"],
        ["cuda:2", "cuda:3"],
    ]


def test_the_worker_index_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MDS_WORKER_INDEX", "3")
    assert mds.DeviceManager().worker_index == 3
    monkeypatch.setenv("MDS_WORKER_INDEX", "three")
    with pytest.raises(mds.ConfigError, match="MDS_WORKER_INDEX='three' is not a worker index"):
        mds.DeviceManager()


async def test_memory_placement_puts_each_instance_where_most_is_free(
    devices: mds.DeviceManager, gpus: Any
) -> None:
    gpus.used = [10 * GiB, 2 * GiB, 6 * GiB, 14 * GiB]  # free: 6, 14, 10, 2
    where = await start(
        devices, instances=4, devices="cuda", placement="memory", instance_memory=5 * GiB
    )
    # 14 -> 9 left; then 10 (cuda:2) -> 5; then 9 (cuda:1) -> 4; then 6 (cuda:0)
    assert where == ["cuda:1", "cuda:2", "cuda:1", "cuda:0"]


async def test_memory_placement_fails_the_start_when_nothing_has_room(
    devices: mds.DeviceManager, gpus: Any
) -> None:
    gpus.used = [12 * GiB] * 4
    model = mds.ModelRuntime(
        Where,
        mds.ModelConfig(devices="cuda", placement="memory", instance_memory=6 * GiB),
        devices=devices,
    )
    with pytest.raises(mds.LifecycleError) as caught:
        async with model:
            pass
    message = str(caught.value)
    assert "instance 0 needs about 6.0 GiB (stated in instance_memory)" in message
    assert "the most free on cuda:0, cuda:1, cuda:2, cuda:3 is 4.0 GiB" in message
    assert isinstance(caught.value.__cause__, mds.DeviceError)
    assert model.state is mds.ModelState.FAILED and "needs about 6.0 GiB" in (model.failure or "")


class Weights(mds.ModelHandler[int, str]):
    """Takes 5 GiB of its fake GPU in init; gives it back in teardown."""

    gpus: Any

    def init(self, context: mds.ModelContext) -> None:
        self.device = context.device
        self.gpus.take(context.device, 5 * GiB)

    def infer(self, batch: Sequence[int]) -> list[str]:
        return [self.device.name for _ in batch]

    def teardown(self) -> None:
        self.gpus.give(self.device, 5 * GiB)


async def test_memory_placement_measures_an_instance_when_no_size_is_stated(
    devices: mds.DeviceManager, gpus: Any
) -> None:
    gpus.used = [4 * GiB, 0, 8 * GiB, 0]
    Weights.gpus = gpus
    config = mds.ModelConfig(instances=3, devices="cuda", placement="memory")
    async with mds.ModelRuntime(Weights, config, devices=devices) as model:
        health = await model.health()
        # free 12, 16, 8, 16: cuda:1 (16 -> 11), cuda:3 (16 -> 11), cuda:0 (12 -> 7)
        assert [info.device.name for info in health.devices] == ["cuda:1", "cuda:3", "cuda:0"]
        assert [info.free_memory for info in health.devices] == [11 * GiB, 11 * GiB, 7 * GiB]
    assert gpus.used == [4 * GiB, 0, 8 * GiB, 0]  # torn down

    gpus.used = [8 * GiB, 16 * GiB, 16 * GiB, 16 * GiB]
    config = mds.ModelConfig(instances=2, devices="cuda:0", placement="memory")
    with pytest.raises(mds.LifecycleError, match=r"instance 1 needs about 5.0 GiB \(measured\)"):
        async with mds.ModelRuntime(Weights, config, devices=devices):
            pass
    assert gpus.used[0] == 8 * GiB  # the first instance was torn down


async def test_a_missing_device_is_a_clear_error(devices: mds.DeviceManager) -> None:
    with pytest.raises(mds.LifecycleError) as caught:
        await start(devices, devices=("cuda:0", "cuda:7"))
    message = str(caught.value)
    assert "device cuda:7 is not there; visible cuda devices: cuda:0, cuda:1, cuda:2, cuda:3" in (
        message
    )
    assert "cpu_fallback" in message


async def test_cpu_fallback_is_opt_in_and_logged(
    devices: mds.DeviceManager, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mds"):
        where = await start(devices, instances=2, devices="cuda:9", cpu_fallback=True)
    assert where == ["cpu", "cpu"]
    assert "device cuda:9 is not there" in caplog.text
    assert "cpu_fallback is on, so it runs on the CPU instead" in caplog.text


async def test_an_unknown_kind_names_the_kinds_there_are(devices: mds.DeviceManager) -> None:
    with pytest.raises(mds.LifecycleError, match="unknown device kind 'npu'; the kinds registered"):
        await start(devices, devices="npu:0")


def test_device_names_are_checked_in_the_config() -> None:
    with pytest.raises(mds.ConfigError, match=r"ModelConfig.devices\[1\]: 'GPU 1' is not a device"):
        mds.ModelConfig(devices=("cpu", "GPU 1"))
    assert mds.ModelConfig(devices="auto").devices == ("auto",)
    with pytest.raises(mds.ConfigError, match="placement"):
        mds.ModelConfig(placement="fastest")  # type: ignore[arg-type]


def test_a_kind_must_be_a_device_kind_with_a_name() -> None:
    manager = mds.DeviceManager()
    with pytest.raises(mds.ConfigError, match="is not a DeviceKind"):
        manager.register(object())  # type: ignore[arg-type]

    class Nameless(mds.DeviceKind):
        def discover(self) -> list[mds.DeviceInfo]:
            return []

    with pytest.raises(mds.ConfigError, match="give the kind a name like 'npu'"):
        manager.register(Nameless())


async def test_cpu_instances_share_the_cores(devices: mds.DeviceManager) -> None:
    cores = len(os.sched_getaffinity(0))
    await start(devices, instances=3, devices=("cpu", "cuda:0", "cpu"))
    threads = {c.instance: c.threads for c in Where.contexts}
    assert threads == {0: max(1, cores // 2), 1: None, 2: max(1, cores // 2)}

    Where.contexts = []
    await start(devices, instances=2, cpu_threads=3)
    assert [c.threads for c in Where.contexts] == [3, 3]
