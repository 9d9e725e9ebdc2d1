"""How late an expired request is answered, under load, beside the loop's own lag.

    python benchmarks/deadlines.py           (about 30 s; --quick for a smoke run)

Thousands of callers send requests with a 100 ms deadline, each sending its
next as soon as it is answered, to a model that is slower than the load
(a plain ``infer`` of 2 ms + 0.2 ms a row, which raises for any batch holding
a poisoned item, so that failing batches are split to find it). A second
setup adds a plain ``preprocess`` of 2 ms, which queues for the model's
worker threads. For each expired request, the lateness is when its caller
got ``DeadlineExceeded`` minus its deadline; a task that sleeps 1 ms in a
loop measures the event loop's own lag meanwhile. Target: lateness within a
few milliseconds of the loop's lag: p50 at most 5 ms, and the worst at most
10 ms beyond the loop's worst stall (a stall delays every request that
expires during it, so per-request percentiles weigh it more than the lag's
own samples do).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
from collections.abc import Sequence

import mds

TIMEOUT = 0.1


class Poisoned(mds.ModelHandler[int, int]):
    def infer(self, batch: Sequence[int]) -> list[int]:
        time.sleep(0.002 + 0.0002 * len(batch))
        if any(x % 40 == 0 for x in batch):
            raise RuntimeError("poisoned")
        return list(batch)


class Decoding(Poisoned):
    def preprocess(self, request: int) -> int:
        time.sleep(0.002)  # decoding work, in the model's worker threads
        return request


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def run(handler: type[Poisoned], callers: int, seconds: float) -> dict[str, float]:
    config = mds.ModelConfig(
        timeout=TIMEOUT,
        batching=mds.BatchingConfig(max_batch_size=64, max_queue_size=callers * 2),
    )
    late: list[float] = []
    lags: list[float] = []
    answered = 0
    async with mds.ModelRuntime(handler, config) as model:
        stop = time.monotonic() + seconds

        async def monitor() -> None:
            while time.monotonic() < stop:
                began = time.monotonic()
                await asyncio.sleep(0.001)
                lags.append(time.monotonic() - began - 0.001)

        async def caller(first: int) -> None:
            nonlocal answered
            n = first
            while time.monotonic() < stop:
                n += callers
                began = time.monotonic()
                try:
                    await model.serve(n)
                except mds.DeadlineExceeded:
                    late.append(time.monotonic() - (began + TIMEOUT))
                except mds.MdsError:
                    pass
                answered += 1

        await asyncio.gather(monitor(), *(caller(i) for i in range(callers)))
        splits = model.statistics().isolation_splits
    return {
        "answered": answered / seconds,
        "expired": len(late) / seconds,
        "splits": splits,
        "late_p50": quantile(late, 0.5) * 1e3,
        "late_p99": quantile(late, 0.99) * 1e3,
        "late_max": quantile(late, 1.0) * 1e3,
        "lag_p50": quantile(lags, 0.5) * 1e3,
        "lag_p99": quantile(lags, 0.99) * 1e3,
        "lag_max": quantile(lags, 1.0) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round, for a smoke run")
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # failing batches are logged: not what is measured
    rounds, seconds = (1, 2.0) if args.quick else (3, 4.0)
    print(f"{TIMEOUT * 1e3:g} ms deadlines, {rounds} rounds of {seconds:g} s (medians; ms)")
    for label, handler, callers in [
        ("infer only, 2000 callers", Poisoned, 2000),
        ("plain preprocess too, 2000 callers", Decoding, 2000),
    ]:
        runs = [asyncio.run(run(handler, callers, seconds)) for _ in range(rounds)]
        m = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(
            f"  {label}: {m['answered']:,.0f} answers/s, {m['expired']:,.0f} expired/s, "
            f"{m['splits']:,.0f} splits"
        )
        print(
            f"    lateness p50 {m['late_p50']:6.1f}  p99 {m['late_p99']:6.1f}  "
            f"max {m['late_max']:6.1f}"
        )
        print(
            f"    loop lag p50 {m['lag_p50']:6.1f}  p99 {m['lag_p99']:6.1f}  "
            f"max {m['lag_max']:6.1f}"
        )
        # A stall of the loop makes every request that expires in it late by
        # as much, and the lag's samples count it once: compare the worst.
        beyond = m["late_max"] - m["lag_max"]
        verdict = "met" if m["late_p50"] <= 5 and beyond <= 10 else "NOT met"
        print(f"    worst lateness beyond the loop's worst stall: {beyond:+.1f} ms ({verdict})")


if __name__ == "__main__":
    main()
