"""What a pipeline adds over calling its models one after another, side by side.

    python benchmarks/pipeline.py           (about 30 s; --quick for a smoke run)

Three trivial model nodes (``infer`` returns its batch), served as a
pipeline, against the same three models called one after another by hand
(``await a.serve(x)``, then b, then c) in the same runtime. Two loads: one
caller (latency: the median per request), and 64 concurrent callers
(throughput: wall time per request). Rounds are interleaved; each round's
difference compares two runs a moment apart, and the median is quoted.
Target: the pipeline adds at most 50 microseconds per request.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import mds


class Trivial(mds.ModelHandler[int, int]):
    def infer(self, batch: Sequence[int]) -> Sequence[int]:
        return batch


def runtime() -> mds.Runtime:
    config = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=64))
    served = mds.Runtime()
    for name in "abc":
        served.add_model(name, Trivial, config)
    served.add_pipeline(mds.Pipeline("p", [mds.Node.model(name, model=name) for name in "abc"]))
    return served


async def latency(call: Callable[[int], Awaitable[Any]], requests: int) -> float:
    """Median seconds per request, one caller."""
    times = []
    for i in range(requests):
        began = time.perf_counter()
        await call(i)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


async def throughput(call: Callable[[int], Awaitable[Any]], requests: int, callers: int) -> float:
    """Wall seconds per request with ``callers`` at once."""

    async def caller(offset: int) -> None:
        for i in range(offset, requests, callers):
            await call(i)

    began = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(callers)))
    return (time.perf_counter() - began) / requests


async def measure(rounds: int, requests: int) -> dict[str, list[float]]:
    served = runtime()
    results: dict[str, list[float]] = {}
    async with served:
        a, b, c = (served.models[name] for name in "abc")
        pipeline = served.pipelines["p"]

        async def by_hand(x: int) -> Any:
            return await c.serve(await b.serve(await a.serve(x)))

        async def as_pipeline(x: int) -> Any:
            return await pipeline.serve(x)

        await latency(by_hand, 200)  # warm up
        await latency(as_pipeline, 200)
        for _ in range(rounds):
            hand = await latency(by_hand, requests)
            pipe = await latency(as_pipeline, requests)
            results.setdefault("1 caller, by hand", []).append(hand)
            results.setdefault("1 caller, pipeline", []).append(pipe)
            results.setdefault("1 caller, added", []).append(pipe - hand)
            hand = await throughput(by_hand, requests * 4, 64)
            pipe = await throughput(as_pipeline, requests * 4, 64)
            results.setdefault("64 callers, by hand", []).append(hand)
            results.setdefault("64 callers, pipeline", []).append(pipe)
            results.setdefault("64 callers, added", []).append(pipe - hand)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    args = parser.parse_args()
    rounds, requests = (2, 300) if args.quick else (7, 1500)
    results = asyncio.run(measure(rounds, requests))
    med = {name: statistics.median(values) * 1e6 for name, values in results.items()}
    print(f"3 trivial model nodes, {rounds} rounds (medians, microseconds per request)")
    for load in ("1 caller", "64 callers"):
        added = med[f"{load}, added"]
        verdict = "met" if added <= 50 else "NOT met"
        print(
            f"  {load:10}  by hand {med[f'{load}, by hand']:8.1f}   pipeline "
            f"{med[f'{load}, pipeline']:8.1f}   added {added:6.1f} (target <= 50: {verdict})"
        )


if __name__ == "__main__":
    main()
