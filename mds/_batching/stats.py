"""The counters a batcher keeps; the model reads them into its statistics."""

from __future__ import annotations

from collections import Counter, deque

__all__ = ["BatchStats"]


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
        self.deadline_misses = 0
        self.isolation_splits = 0
        self.out_of_memory = 0
        self.padding_sum = 0.0

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
