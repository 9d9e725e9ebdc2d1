"""The counters a batcher keeps; the model reads them into its statistics."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter, deque

from .._status import Histogram

__all__ = ["SECONDS", "SIZES", "BatchStats", "Buckets"]

#: Bucket bounds for durations: 0.1 ms to five minutes (a long stream), as
#: latency SLOs are set.
SECONDS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
#: Bucket bounds for batch sizes and costs: powers of two.
SIZES = tuple(float(2**power) for power in range(13))


class Buckets:
    """A histogram being counted: observations per bucket and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = SECONDS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound falls in that bound's bucket (le).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> Histogram:
        return Histogram(bounds=self.bounds, counts=tuple(self.counts), sum=self.sum)


class BatchStats:
    """Counters the batcher keeps (kept by the model across restarts)."""

    def __init__(self) -> None:
        self.batches = 0
        self.batched_items = 0
        self.batched_cost = 0
        self.sizes: Counter[int] = Counter()
        self.infer_seconds = 0.0
        self.queue_wait_seconds = 0.0
        self.recent_waits: deque[float] = deque(maxlen=1024)
        self.isolation_splits = 0
        self.out_of_memory = 0
        self.padding_sum = 0.0
        self.waits = Buckets()
        self.infers = Buckets()
        self.costs = Buckets(SIZES)

    def record(
        self, size: int, cost: int, padding: float, seconds: float, waits: list[float]
    ) -> None:
        """One computed batch: its size, cost, padding ratio, compute time and items' waits."""
        self.batches += 1
        self.batched_items += size
        self.batched_cost += cost
        self.sizes[size] += 1
        self.infer_seconds += seconds
        self.padding_sum += padding
        self.queue_wait_seconds += sum(waits)
        self.recent_waits.extend(waits)
        self.infers.observe(seconds)
        self.costs.observe(cost)
        observe = self.waits.observe
        for wait in waits:
            observe(wait)

    def batch_sizes(self) -> Histogram:
        """The batch sizes counted so far, as a histogram (from the exact counts)."""
        sizes = Buckets(SIZES)
        # Copied in one C call: read from a scrape's thread while batches are counted.
        for size, count in list(self.sizes.items()):
            sizes.counts[bisect_left(SIZES, size)] += count
            sizes.sum += size * count
        return sizes.snapshot()
