"""Devices: what the manager finds, where instances go, and a device kind of your own.

The kind added here splits this machine's CPU cores into groups, one device
per group ("cores:0", "cores:1", ...). Each instance pins its thread to its
group's cores, so instances never compete for a core.

    pip install "torch==2.13.0" ".[torch]"
    python examples/devices.py
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import anyio
import numpy as np
import torch

import mds


class CoreGroups(mds.DeviceKind):
    """Groups of ``size`` CPU cores, each one device of kind ``"cores"``."""

    name = "cores"

    def __init__(self, size: int) -> None:
        cores = sorted(os.sched_getaffinity(0))
        self.groups = [cores[i : i + size] for i in range(0, len(cores), size)]

    def discover(self) -> Sequence[mds.DeviceInfo]:
        return [
            mds.DeviceInfo(
                device=mds.Device(kind="cores", index=index),
                name=f"CPU cores {group}",
                cores=len(group),
            )
            for index, group in enumerate(self.groups)
        ]


class PinnedMLP(mds.TorchHandler):
    """A torch model whose instance runs on one group of cores."""

    groups: list[list[int]]

    def torch_device(self, device: mds.Device) -> torch.device:
        return torch.device("cpu")  # the tensors live in host memory

    def init(self, context: mds.ModelContext) -> None:
        group = self.groups[context.device.index or 0]
        os.sched_setaffinity(0, group)  # this instance's thread (and the threads it starts)
        torch.set_num_threads(len(group))
        super().init(context)
        self.cores = group


def make_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))


async def main() -> None:
    manager = mds.DeviceManager.default()
    for info in manager.devices():
        memory = f"{info.total_memory / 2**30:.1f} GiB" if info.total_memory else "?"
        print(f"found {info.device}: {info.name}, {memory}, cores {info.cores}")

    # Your own kind: register it, then name its devices in ModelConfig.devices.
    groups = CoreGroups(size=1)
    manager.register(groups)
    PinnedMLP.groups = groups.groups
    handler = functools.partial(PinnedMLP, make_mlp, examples=[np.zeros(16, np.float32)])
    config = mds.ModelConfig(
        instances=len(groups.groups),
        devices="cores",  # a kind alone: every device of that kind
        batching=mds.BatchingConfig(max_batch_size=16, max_queue_delay=0.002),
    )
    async with mds.ModelRuntime(handler, config, name="pinned") as model:
        health = await model.health()
        print(f"ready: {health.ready}, on {[str(info.device) for info in health.devices]}")
        rng = np.random.default_rng(0)
        async with anyio.create_task_group() as tasks:
            for _ in range(200):
                tasks.start_soon(model.serve, rng.standard_normal(16).astype(np.float32))
        stats = model.statistics()
        print(f"served {stats.completed} requests in {stats.batches} batches")

    # A device that is not there fails the start with a clear error ...
    try:
        async with mds.ModelRuntime(mds.TorchHandler(make_mlp), mds.ModelConfig(devices="cuda:3")):
            pass
    except mds.LifecycleError as exc:
        print(f"cuda:3: {exc}")
    # ... unless falling back to the CPU is asked for (and logged).
    config = mds.ModelConfig(devices="cuda:3", cpu_fallback=True)
    async with mds.ModelRuntime(mds.TorchHandler(make_mlp), config) as model:
        print(f"with cpu_fallback: on {(await model.health()).devices[0].device}")


if __name__ == "__main__":
    anyio.run(main)
