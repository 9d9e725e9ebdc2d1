"""The dynamic batcher's cost, measured side by side in one run.

    python benchmarks/batcher.py            (about a minute; --quick for a smoke run)

Three measurements, each repeated in interleaved rounds; medians are quoted
and compared as ratios (the machines are shared and noisy):

1. Overhead per request: a trivial ``infer`` at 1,024 concurrent callers,
   mds (defaults, and with deadlines, priorities, a cost function and the
   deadline watcher all in use; and through ``mds.serve`` on a runtime, the
   path the README recommends) against a minimal hand-written asyncio
   batcher (a queue, futures, one worker task) and the PyPI package
   ``batched``. Target: mds, and mds.serve, at most 1.5x the hand-written
   batcher.
2. Throughput under load, for a model whose batch call costs a fixed time
   plus a time per item, against that model's own batched limit.
   Target: at least 90%.
3. Latency with one caller, against calling the model directly.
   Target: p50 within 10% + 100 microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
import unittest.mock
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import mds
from mds import _loop

MAX_BATCH = 64


# -- 1. overhead -----------------------------------------------------------


class HandWritten:
    """The lower bound: an asyncio.Queue, a future per request, one worker task."""

    def __init__(self, infer: Callable[[list[Any]], Awaitable[list[Any]]]) -> None:
        self.infer = infer
        self.queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]] = asyncio.Queue()

    async def __call__(self, x: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((x, future))
        return await future

    async def worker(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < MAX_BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            outputs = await self.infer([x for x, _ in batch])
            for (_, future), output in zip(batch, outputs, strict=True):
                future.set_result(output)


async def trivial(batch: Sequence[Any]) -> list[Any]:
    return list(batch)


class Trivial(mds.ModelHandler[int, int]):
    async def infer(self, batch: Sequence[int]) -> list[int]:
        return list(batch)


class TrivialWithCost(Trivial):
    def cost(self, item: int) -> int:
        return 1 + item % 2


async def drive(call: Callable[[int], Awaitable[Any]], callers: int, per_caller: int) -> float:
    """Microseconds per request with ``callers`` concurrent callers."""

    async def caller(offset: int) -> None:
        for i in range(per_caller):
            assert await call(offset + i) == offset + i

    began = time.perf_counter()
    await asyncio.gather(*(caller(c * per_caller) for c in range(callers)))
    return (time.perf_counter() - began) / (callers * per_caller) * 1e6


async def overhead_hand_written(callers: int, per_caller: int) -> float:
    batcher = HandWritten(trivial)
    worker = asyncio.create_task(batcher.worker())
    try:
        return await drive(batcher, callers, per_caller)
    finally:
        worker.cancel()


async def overhead_mds(callers: int, per_caller: int, *, features: str = "") -> float:
    """``features``: "" for the defaults, "all" for deadlines, two priority
    levels and a preferred size, "all+cost" for those and a cost function."""
    handler: mds.ModelHandler[int, int] = TrivialWithCost() if "cost" in features else Trivial()
    if features:
        batching = mds.BatchingConfig(
            max_batch_size=MAX_BATCH * 2,
            priority_levels=2,
            max_queue_size=callers * 2,
            preferred_batch_sizes=(MAX_BATCH,),
        )
        config = mds.ModelConfig(batching=batching, timeout=30.0)
    else:
        config = mds.ModelConfig(
            batching=mds.BatchingConfig(max_batch_size=MAX_BATCH, max_queue_size=callers * 2)
        )
    async with mds.ModelRuntime(handler, config) as model:
        return await drive(model.serve, callers, per_caller)


async def overhead_serve(callers: int, per_caller: int) -> float:
    """The path the README recommends: a Runtime, and ``mds.serve`` by name."""
    config = mds.ModelConfig(
        batching=mds.BatchingConfig(max_batch_size=MAX_BATCH, max_queue_size=callers * 2)
    )
    runtime = mds.Runtime()
    runtime.add_model("trivial", Trivial, config)
    async with runtime:
        return await drive(lambda x: mds.serve("trivial", x), callers, per_caller)


async def overhead_batched(callers: int, per_caller: int) -> float:
    import batched

    call = batched.aio.dynamically(batch_size=MAX_BATCH, timeout_ms=0.0)(trivial)
    return await drive(call, callers, per_caller)


# -- 2. and 3. a model with a cost per batch and per item ------------------

FIXED = 0.004  # seconds per infer call
PER_ITEM = 0.0001  # seconds per item


def model_call(batch: Sequence[Any]) -> list[Any]:
    time.sleep(FIXED + PER_ITEM * len(batch))
    return list(batch)


class Costly(mds.ModelHandler[int, int]):
    def infer(self, batch: Sequence[int]) -> list[int]:
        return model_call(batch)


def direct_limit(seconds: float) -> float:
    """The model's own batched limit: full batches back to back, items per second."""
    batch = [1] * MAX_BATCH
    done = 0
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        model_call(batch)
        done += MAX_BATCH
    return done / (time.perf_counter() - began)


async def throughput(callers: int, seconds: float) -> tuple[float, float]:
    """Requests per second under mds with ``callers`` callers, and the mean batch size."""
    config = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=MAX_BATCH))
    async with mds.ModelRuntime(Costly(), config) as model:
        done = 0
        stop = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await model.serve(1)
                done += 1

        began = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        elapsed = time.perf_counter() - began
        return done / elapsed, model.statistics().mean_batch_size


async def single_caller(requests: int) -> tuple[float, float]:
    """p50 latency in seconds: through mds with one caller, and the direct call."""
    direct, served = [], []
    for _ in range(requests):
        began = time.perf_counter()
        await asyncio.to_thread(model_call, [1])
        direct.append(time.perf_counter() - began)
    async with mds.ModelRuntime(Costly()) as model:
        for _ in range(requests):
            began = time.perf_counter()
            await model.serve(1)
            served.append(time.perf_counter() - began)
    return statistics.median(served), statistics.median(direct)


# -- the run -----------------------------------------------------------------


@contextlib.contextmanager
def portable_forms(on: bool) -> Iterator[None]:
    """mds as on trio, but on asyncio: its one switch says "not asyncio"."""
    if not on:
        yield
        return
    with unittest.mock.patch.object(_loop, "asyncio_loop", return_value=None):
        yield


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke run")
    parser.add_argument(
        "--portable", action="store_true", help="also measure mds without its asyncio shortcuts"
    )
    args = parser.parse_args()
    rounds = 3 if args.quick else 11
    callers, per_caller = 1024, (5 if args.quick else 40)

    print(
        f"1. overhead per request, trivial infer, {callers} concurrent callers, "
        f"max batch {MAX_BATCH}, {rounds} rounds (median us/request; median of the rounds' ratios)"
    )
    variants = {
        "hand": ("hand-written asyncio batcher (queue, futures, one worker)", None),
        "mds": ("mds ModelRuntime, defaults", ""),
        "mds all": ("mds with deadlines, 2 priority levels, a preferred size", "all"),
        "mds all+cost": ("  the same, plus a cost function (user code per request)", "all+cost"),
        "serve": ("mds.serve(name, x) on a Runtime (the README's path)", None),
        "batched": ("batched (PyPI) aio.dynamically", None),
    }
    if args.portable:
        variants["portable"] = ("mds defaults without the asyncio shortcuts", "")
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (_, features) in variants.items():
            if name == "hand":
                runs[name].append(asyncio.run(overhead_hand_written(callers, per_caller)))
            elif name == "batched":
                runs[name].append(asyncio.run(overhead_batched(callers, per_caller)))
            elif name == "serve":
                runs[name].append(asyncio.run(overhead_serve(callers, per_caller)))
            else:
                result = overhead_mds(callers, per_caller, features=features or "")
                with portable_forms(name == "portable"):
                    runs[name].append(asyncio.run(result))
    # Each round's ratio to the hand-written batcher measured a moment
    # before it, then the median: steadier than a ratio of medians on a
    # machine whose speed drifts between rounds.
    ratios = {
        name: median([value / hand for value, hand in zip(runs[name], runs["hand"], strict=True)])
        for name in variants
    }
    for name, (label, _) in variants.items():
        print(f"   {label:60s} {median(runs[name]):7.2f} us  {ratios[name]:5.2f}x")
    worst = max(ratios["mds"], ratios["mds all"])
    verdict = "met" if worst <= 1.5 else "NOT met"
    print(f"   target: mds at most 1.50x the hand-written batcher -> {worst:.2f}x ({verdict})")
    served = ratios["serve"]
    verdict = "met" if served <= 1.5 else "NOT met"
    print(
        f"   target: mds.serve at most 1.50x the hand-written batcher -> {served:.2f}x ({verdict})"
    )

    seconds = 1.0 if args.quick else 2.0
    print(
        f"\n2. throughput, model call = {FIXED * 1e3:g} ms + {PER_ITEM * 1e3:g} ms per item, "
        f"max batch {MAX_BATCH}, 256 callers"
    )
    limits, rates, means = [], [], []
    for _ in range(rounds // 2 + 1):
        limits.append(direct_limit(seconds))
        rate, mean = asyncio.run(throughput(256, seconds))
        rates.append(rate)
        means.append(mean)
    limit, rate = median(limits), median(rates)
    verdict = "met" if rate / limit >= 0.9 else "NOT met"
    print(
        f"   model called directly with full batches: {limit:,.0f} items/s "
        f"(on paper {MAX_BATCH / (FIXED + PER_ITEM * MAX_BATCH):,.0f})"
    )
    print(
        f"   mds: {rate:,.0f} requests/s, mean batch {median(means):.1f} -> "
        f"{rate / limit:.1%} of the model's limit (target 90%: {verdict})"
    )

    print("\n3. one caller, p50 latency")
    pairs = [asyncio.run(single_caller(50 if args.quick else 200)) for _ in range(rounds // 2 + 1)]
    served = median([p[0] for p in pairs])
    direct = median([p[1] for p in pairs])
    allowed = direct * 1.1 + 100e-6
    verdict = "met" if served <= allowed else "NOT met"
    print(
        f"   mds {served * 1e3:.3f} ms, direct {direct * 1e3:.3f} ms, allowed "
        f"{allowed * 1e3:.3f} ms ({verdict}; mds adds {(served - direct) * 1e6:.0f} us)"
    )


if __name__ == "__main__":
    main()
