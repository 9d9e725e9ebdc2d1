"""A model's counters, and the :class:`ModelStatistics` snapshot made from them."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncGenerator, Callable
from functools import reduce
from operator import add
from typing import Any

import anyio
import msgspec

from ._batching.batcher import Batcher
from ._batching.stats import BatchStats, Buckets
from ._config import ModelConfig
from ._errors import DeadlineExceeded, NotReady, Overloaded, RequestError
from ._handler import ModelState
from ._status import ModelHistograms, ModelStatistics

__all__ = ["RequestCounts", "counted", "retired_statistics", "snapshot", "summed"]


class RequestCounts:
    """Per-request counters of one model (kept across restarts)."""

    __slots__ = (
        "cancelled",
        "completed",
        "deadline",
        "errors",
        "failed",
        "first_chunk",
        "init_seconds",
        "invalid",
        "not_ready",
        "overloaded",
        "postprocess",
        "preprocess",
        "request",
        "requests",
        "sequence_ends",
        "sequences_started",
        "warmup_seconds",
    )

    def __init__(self) -> None:
        # Each request ends in exactly one of: completed, failed (in the
        # model), deadline, invalid (the client's mistake), cancelled,
        # overloaded; so every count only grows, and a scrape from another
        # thread reads each outcome without subtracting one from another.
        self.requests = self.completed = self.failed = self.cancelled = 0
        self.deadline = self.invalid = 0
        self.not_ready = self.overloaded = 0
        self.init_seconds = self.warmup_seconds = 0.0
        self.errors: Counter[str] = Counter()
        self.request = Buckets()
        self.first_chunk = Buckets()
        self.preprocess = Buckets()
        self.postprocess = Buckets()
        self.sequences_started = 0  # a stateful model's
        self.sequence_ends: Counter[str] = Counter()  # by reason

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet answered."""
        ended = self.completed + self.failed + self.deadline + self.invalid + self.cancelled
        return self.requests - ended - self.overloaded

    def outcomes(self) -> dict[str, Any]:
        """The fields of ``ModelStatistics`` and ``PipelineStatistics`` these make."""
        return {
            "requests": self.requests,
            "completed": self.completed,
            "failed": self.failed + self.deadline + self.invalid,
            "rejected": self.not_ready + self.overloaded,
            "cancelled": self.cancelled,
            "deadline_misses": self.deadline,
            "invalid": self.invalid,
            "in_flight": max(0, self.in_flight),  # read from another thread: never below 0
            "errors": dict(self.errors),
        }

    def failure(self, exc: BaseException) -> None:
        """An admitted request ended with ``exc``: counted by its kind."""
        if isinstance(exc, Overloaded):
            self.overloaded += 1
        elif isinstance(exc, DeadlineExceeded):
            self.deadline += 1
        elif isinstance(exc, RequestError):
            self.invalid += 1
        else:
            self.failed += 1
        self.errors[type(exc).__name__] += 1

    def refused(self, exc: BaseException) -> None:
        """A request that never got its place (an on-demand model could not load in time)."""
        if isinstance(exc, NotReady):
            self.not_ready += 1
            self.errors[type(exc).__name__] += 1
        else:
            self.requests += 1
            self.failure(exc)


async def counted(
    chunks: AsyncGenerator[Any, None],
    counts: RequestCounts,
    ended: Callable[[BaseException | None], None],
    clock: Callable[[], float],
    began: float,
) -> AsyncGenerator[Any, None]:
    """``chunks``, counted as completed, failed or cancelled when the stream ends.

    ``ended`` is told how it ended (the error, or ``None``) once it is counted;
    a stream that completes is timed from ``began`` (its request's admission)
    by ``clock``, its chunks as its ``postprocess``.
    """
    failure: BaseException | None = None
    streaming = clock()
    first = True
    try:
        async for chunk in chunks:
            if first:  # the time a client waits before the stream starts
                counts.first_chunk.observe(clock() - began)
                first = False
            yield chunk
    except (anyio.get_cancelled_exc_class(), GeneratorExit):
        counts.cancelled += 1
        raise
    except Exception as exc:
        failure = exc
        counts.failure(exc)
        raise
    else:
        counts.completed += 1
        now = clock()
        counts.request.observe(now - began)
        counts.postprocess.observe(now - streaming)
    finally:
        with anyio.CancelScope(shield=True):
            await chunks.aclose()
        ended(failure)


def snapshot(
    *,
    name: str,
    version: str,
    state: ModelState,
    config: ModelConfig,
    counts: RequestCounts,
    batches: BatchStats,
    batchers: tuple[Batcher[Any], ...],
    devices: tuple[str, ...],
    sequences: int = 0,
) -> ModelStatistics:
    """The model's counters now, as a frozen struct (``sequences``: those live)."""
    queues = [batcher.queue for batcher in batchers]
    waits = sorted(batches.recent_waits)
    return ModelStatistics(
        name=name,
        version=version,
        state=state,
        queued=sum(queue.count for queue in queues),
        queued_by_priority=tuple(map(sum, zip(*(queue.counts for queue in queues), strict=True))),
        **counts.outcomes(),
        batches=batches.batches,
        batched_items=batches.batched_items,
        batched_cost=batches.batched_cost,
        batch_sizes=dict(sorted(batches.sizes.items())),
        infer_seconds=batches.infer_seconds,
        queue_wait_seconds=batches.queue_wait_seconds,
        queue_wait_p50=_percentile(waits, 0.5),
        queue_wait_p99=_percentile(waits, 0.99),
        padding_ratio=batches.padding_sum / batches.batches if batches.batches else 0.0,
        isolation_splits=batches.isolation_splits,
        max_batch_size=min(
            (batcher.batch_limit for batcher in batchers), default=config.batching.max_batch_size
        ),
        out_of_memory=batches.out_of_memory,
        init_seconds=counts.init_seconds,
        warmup_seconds=counts.warmup_seconds,
        instances=len(devices),
        devices=devices,
        batches_in_flight=sum(batcher._busy for batcher in batchers),
        sequences=sequences,
        sequences_started=counts.sequences_started,
        sequence_ends=dict(counts.sequence_ends),
        histograms=ModelHistograms(
            request=counts.request.snapshot(),
            first_chunk=counts.first_chunk.snapshot(),
            queue_wait=batches.waits.snapshot(),
            preprocess=counts.preprocess.snapshot(),
            infer=batches.infers.snapshot(),
            postprocess=counts.postprocess.snapshot(),
            batch_size=batches.batch_sizes(),
            batch_cost=batches.costs.snapshot(),
        ),
    )


def retired_statistics(
    name: str, version: str, counts: RequestCounts, batches: BatchStats
) -> ModelStatistics:
    """A retired runtime's counters, as statistics (its gauges mean nothing now)."""
    return snapshot(
        name=name,
        version=version,
        state=ModelState.STOPPED,
        config=_NO_CONFIG,
        counts=counts,
        batches=batches,
        batchers=(),
        devices=(),
    )


_NO_CONFIG = ModelConfig()


def summed(stats: ModelStatistics | None, older: list[ModelStatistics]) -> ModelStatistics:
    """``stats`` with the counters and histograms of ``older`` added (gauges: ``stats``')."""
    if not older:
        assert stats is not None
        return stats
    every = ([stats] if stats is not None else []) + older
    errors: Counter[str] = Counter()
    ends: Counter[str] = Counter()
    for each in every:
        errors.update(each.errors)
        ends.update(each.sequence_ends)
    histograms = {
        field: reduce(add, (getattr(each.histograms, field) for each in every))
        for field in ModelHistograms.__struct_fields__
    }
    base = stats if stats is not None else older[0]
    return msgspec.structs.replace(
        base,
        **{field: sum(getattr(each, field) for each in every) for field in _SUMMED},
        errors=dict(errors),
        sequence_ends=dict(ends),
        histograms=ModelHistograms(**histograms),
    )


#: The counters of ModelStatistics that add up across a version's runtimes.
_SUMMED = (
    "requests", "completed", "failed", "rejected", "cancelled", "deadline_misses", "invalid",
    "batches", "batched_items", "batched_cost", "isolation_splits", "out_of_memory",
    "sequences_started",
)  # fmt: skip


def _percentile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted values (nearest rank); 0 if there are none."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
