"""What callers can read about a model or a runtime: health and statistics."""

# No `from __future__ import annotations`: msgspec reads these annotations at
# run time, and mds/__init__.py gives the classes the public module "mds".

import enum
from typing import Generic

import msgspec
from typing_extensions import TypeVar

from ._devices.device import DeviceInfo
from ._handler import ModelState

__all__ = [
    "CallTrace",
    "Histogram",
    "ModelHealth",
    "ModelHistograms",
    "ModelStatistics",
    "NodeStatistics",
    "NodeTrace",
    "PipelineHealth",
    "PipelineStatistics",
    "PipelineTrace",
    "RuntimeHealth",
    "Traced",
    "VersionStatus",
    "WorkerHealth",
    "WorkerState",
    "WorkerStatistics",
]

T = TypeVar("T")


class ModelHealth(msgspec.Struct, frozen=True, kw_only=True):
    """One model's readiness.

    Attributes:
        name: the model's name.
        version: the model's version.
        state: its lifecycle state.
        ready: whether it takes requests now: ``READY`` and every instance's
            ``health`` check passed.
        reason: why it is not ready (the state, a failure's cause, a failed
            check, a failed device); ``None`` when ready.
        devices: the devices its instances run on, with their memory and
            health now (while it runs).

    Added in 0.1; ``devices`` in 0.2.
    """

    name: str
    version: str
    state: ModelState
    ready: bool
    reason: str | None = None
    devices: tuple[DeviceInfo, ...] = ()


class VersionStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One model version as the repository index lists it.

    Attributes:
        name: the model's name.
        version: the version.
        state: its lifecycle state: ``READY`` while it serves, ``LOADING``
            or ``WARMING`` while a load builds it, ``DRAINING`` while it
            finishes its last requests, ``STOPPED`` once unloaded,
            ``FAILED`` when its load failed.
        reason: why it failed, or a note on its state; ``None`` if none.
        default: whether it answers requests that name no version (it takes
            some of the traffic).
        on_demand: whether it loads on its first request (and may be
            unloaded when idle); ``CREATED`` or ``STOPPED`` then means not
            loaded now, ready to load.

    Added in 0.4.
    """

    name: str
    version: str
    state: ModelState
    reason: str | None = None
    default: bool = False
    on_demand: bool = False


class PipelineHealth(msgspec.Struct, frozen=True, kw_only=True):
    """One pipeline's readiness: every model node's, together.

    Attributes:
        name: the pipeline's name.
        ready: whether every model node is ready.
        reason: which node is not ready and why; ``None`` when ready.
        nodes: each model node's readiness, by node name.

    Added in 0.2.
    """

    name: str
    ready: bool
    reason: str | None = None
    nodes: dict[str, bool] = {}


class WorkerState(enum.Enum):
    """What a queue worker is doing.

    Added in 0.5.
    """

    CREATED = "created"
    WAITING = "waiting"  # for its model or pipeline to be ready (loading): not receiving
    RECEIVING = "receiving"
    FULL = "full"  # holding max_in_flight messages: not receiving until one ends
    BACKING_OFF = "backing_off"  # the source failed: waiting before receiving again
    DRAINING = "draining"
    STOPPED = "stopped"


class WorkerHealth(msgspec.Struct, frozen=True, kw_only=True):
    """A queue worker's readiness.

    Attributes:
        name: the worker's name.
        queue: the name of the queue it receives from.
        target: the model or pipeline it serves.
        state: what it is doing now.
        ready: whether it takes messages: ``receiving`` or ``full``.
        reason: why not, when it is not ready (the broker's last error
            while it backs off).

    Added in 0.5.
    """

    name: str
    queue: str
    target: str
    state: WorkerState
    ready: bool
    reason: str | None = None


class RuntimeHealth(msgspec.Struct, frozen=True, kw_only=True):
    """A runtime's liveness and readiness, overall, per model and per pipeline.

    Attributes:
        live: the runtime is running (its event loop answers).
        ready: live, and every model is ready.
        models: each model's health, by name (a pipeline's model nodes are
            models named ``pipeline.node``).
        pipelines: each pipeline's health, by name.
        workers: each queue worker running on the runtime, by its name
            (:class:`mds.workers.QueueWorker`). Reported beside the models,
            not part of ``ready``: a broker that fails for a while must not
            take the HTTP routes out of service. ``mds worker``'s probes
            count it.

    Added in 0.1; ``pipelines`` in 0.2; ``workers`` in 0.5.
    """

    live: bool
    ready: bool
    models: dict[str, ModelHealth]
    pipelines: dict[str, PipelineHealth] = {}
    workers: dict[str, WorkerHealth] = {}


class WorkerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A queue worker's counters since it was made.

    Attributes:
        queue: the source's name.
        target: the model or pipeline it serves.
        state: what it is doing now.
        received: messages received (redeliveries included).
        completed: messages served, written and acknowledged.
        released: messages released for another delivery (a transient
            failure, or the worker stopping).
        dead_lettered: messages moved to the dead letters.
        in_flight: messages held now (queued or computing).
        source_errors: receives, acknowledgements and extensions that failed.
        lag: messages waiting in the queue, when last asked (``None``: unknown).
        seconds: how long it has been running (this run).
        throughput: messages completed per second over the last minute (since
            it started, if that is sooner).
        name: the worker's name (its queue's, unless it was given one).

    Added in 0.5.
    """

    queue: str
    target: str
    state: WorkerState
    received: int = 0
    completed: int = 0
    released: int = 0
    dead_lettered: int = 0
    in_flight: int = 0
    source_errors: int = 0
    lag: int | None = None
    seconds: float = 0.0
    throughput: float = 0.0
    name: str = ""


class Histogram(msgspec.Struct, frozen=True, kw_only=True):
    """How many observations fell in each bucket, counted since the model was created.

    Cumulative, like a Prometheus histogram: snapshots taken in several
    processes, or at several times, add and subtract bucket by bucket.

    Attributes:
        bounds: each bucket's upper bound, ascending; a last bucket with no
            bound (``+Inf``) follows them.
        counts: how many observations fell in each bucket (not cumulative):
            ``len(bounds) + 1`` numbers, the last for values above every bound.
        sum: the sum of every observation.

    Added in 0.5.
    """

    bounds: tuple[float, ...] = ()
    counts: tuple[int, ...] = (0,)
    sum: float = 0.0

    @property
    def count(self) -> int:
        """How many observations there were."""
        return sum(self.counts)

    @property
    def mean(self) -> float:
        """The mean observation; 0 before the first."""
        count = self.count
        return self.sum / count if count else 0.0

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations at or below it)``, ending with ``(inf, count)``."""
        total, found = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            found.append((bound, total))
        return found

    def quantile(self, q: float) -> float:
        """An estimate of the ``q`` quantile (``0 <= q <= 1``); 0 before the first observation.

        Interpolated linearly inside the bucket it falls in, as Prometheus'
        ``histogram_quantile`` does; a quantile in the last bucket is its
        lower bound (the largest bound).
        """
        count = self.count
        if not count:
            return 0.0
        rank, below, lower = q * count, 0, 0.0
        for bound, seen in zip(self.bounds, self.counts, strict=False):
            if seen and below + seen >= rank:
                return lower + (bound - lower) * (rank - below) / seen
            below += seen
            lower = bound
        return lower

    def __sub__(self, other: "Histogram") -> "Histogram":
        """The observations made since ``other``, an earlier snapshot of the same histogram."""
        if other.bounds != self.bounds:
            raise ValueError("the histograms have different buckets")
        return Histogram(
            bounds=self.bounds,
            counts=tuple(a - b for a, b in zip(self.counts, other.counts, strict=True)),
            sum=self.sum - other.sum,
        )

    def __add__(self, other: "Histogram") -> "Histogram":
        """Both histograms' observations (say, of two worker processes)."""
        if other.bounds != self.bounds:
            raise ValueError("the histograms have different buckets")
        return Histogram(
            bounds=self.bounds,
            counts=tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)),
            sum=self.sum + other.sum,
        )


class ModelHistograms(msgspec.Struct, frozen=True, kw_only=True):
    """One model's distributions. Durations are seconds.

    Attributes:
        request: a completed request's whole call, from admission to its
            response (to a stream's end).
        first_chunk: a stream's time from admission to its first chunk
            (time to first token, for a model that streams text).
        queue_wait: a request's time queued before its batch started.
        preprocess: a request's ``preprocess`` that returned (for handlers that have one).
        infer: a batch's computation (collate, infer, split), per batch.
        postprocess: a request's ``postprocess`` (only for handlers that
            have one; a stream's whole length).
        batch_size: requests per batch.
        batch_cost: cost per batch (see :meth:`ModelHandler.cost`).

    Added in 0.5.
    """

    request: Histogram = Histogram()
    first_chunk: Histogram = Histogram()
    queue_wait: Histogram = Histogram()
    preprocess: Histogram = Histogram()
    infer: Histogram = Histogram()
    postprocess: Histogram = Histogram()
    batch_size: Histogram = Histogram()
    batch_cost: Histogram = Histogram()


class ModelStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Counters for one model since it was created. Durations are seconds.

    Attributes:
        name: the model's name.
        version: the model's version.
        state: its lifecycle state now.
        in_flight: requests admitted and not yet answered.
        queued: requests waiting in the queue for a batch.
        queued_by_priority: of those, how many at each priority level.
        requests: requests admitted (the model was ready).
        completed: requests answered with a result.
        failed: admitted requests answered with an error.
        rejected: requests refused at once: not ready, or the queue was full.
        cancelled: requests whose caller went away before the answer.
        deadline_misses: requests whose deadline passed before they were
            answered (also counted in ``failed``).
        invalid: requests the client got wrong: bad input, a request that
            does not decode (``RequestError``; also counted in ``failed``).
        errors: failed and rejected requests, by error class name.
        batches: ``infer`` calls for requests (warm-up not included).
        batched_items: requests in those calls.
        batched_cost: their cost (see :meth:`ModelHandler.cost`).
        batch_sizes: how many batches had each number of requests.
        infer_seconds: time spent computing batches (collate, infer, split).
        queue_wait_seconds: time requests spent queued, in total.
        queue_wait_p50: median queue wait of the last 1024 batched requests.
        queue_wait_p99: 99th percentile of the same.
        padding_ratio: the mean share of padding in padded batches.
        isolation_splits: batches split in two to find the items at fault.
        max_batch_size: the batch limit in force: ``batching.max_batch_size``,
            or lower after the device ran out of memory.
        out_of_memory: batches that ran out of device memory (and were split).
        init_seconds: time the last start spent in ``init``.
        warmup_seconds: time the last start spent in warm-up.
        instances: the instances running now (0 while it is stopped).
        devices: the device each running instance is on, in instance order
            (``"cpu"``, ``"cuda:0"``, ...).
        batches_in_flight: batches being computed now (at most one per
            instance, or two while the next is handed over early).
        histograms: cumulative distributions of request, queue, step and
            batch times and batch sizes, to aggregate across processes
            (what :class:`mds.prometheus.Collector` exports).
        sequences: a stateful model's live sequences now.
        sequences_started: the sequences it has started.
        sequence_ends: the sequences that ended, by reason (``"ended"``,
            ``"idle"``, ... as :class:`mds.SequenceEnd` names them).

    Added in 0.1; ``invalid``, ``instances``, ``devices``, ``batches_in_flight``,
        ``histograms`` and the sequence counts in 0.5.
    """

    name: str
    version: str
    state: ModelState
    in_flight: int
    queued: int
    queued_by_priority: tuple[int, ...]
    requests: int
    completed: int
    failed: int
    rejected: int
    cancelled: int
    deadline_misses: int
    errors: dict[str, int]
    batches: int
    batched_items: int
    batched_cost: int
    batch_sizes: dict[int, int]
    infer_seconds: float
    queue_wait_seconds: float
    queue_wait_p50: float
    queue_wait_p99: float
    padding_ratio: float
    isolation_splits: int
    max_batch_size: int
    out_of_memory: int
    init_seconds: float
    warmup_seconds: float
    invalid: int = 0
    instances: int = 0
    devices: tuple[str, ...] = ()
    batches_in_flight: int = 0
    histograms: ModelHistograms = ModelHistograms()
    sequences: int = 0
    sequences_started: int = 0
    sequence_ends: dict[str, int] = msgspec.field(default_factory=dict)

    @property
    def mean_batch_size(self) -> float:
        """Average requests per ``infer`` call; 0 before the first."""
        return self.batched_items / self.batches if self.batches else 0.0

    @property
    def mean_queue_wait(self) -> float:
        """Average seconds a request waited for its batch; 0 before the first."""
        return self.queue_wait_seconds / self.batched_items if self.batched_items else 0.0


class NodeStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Counters for one node of a pipeline. Durations are seconds.

    A model node's model has its own :class:`ModelStatistics` too (named
    ``pipeline.node``, or the model the node names).

    Attributes:
        node: the node's name.
        kind: ``"model"``, ``"function"``, ``"router"`` or ``"fan_out"``.
        calls: times a request reached it.
        failed: of those, the calls that raised (cancelled ones not counted).
        seconds: how long its calls took, failed ones included (a fan-out's
            includes its branches).

    Added in 0.5.
    """

    node: str
    kind: str
    calls: int = 0
    failed: int = 0
    seconds: Histogram = Histogram()


class PipelineStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Counters for one pipeline since its runtime was made. Durations are seconds.

    Attributes:
        name: the pipeline's name.
        version: the pipeline's version.
        requests: requests that started through the graph.
        completed: requests answered with a result.
        failed: requests answered with an error raised in a node.
        rejected: requests refused: a model node was not ready (at once), or
            a model node's queue was full.
        cancelled: requests whose caller went away before the answer.
        deadline_misses: of ``failed``, requests whose deadline passed.
        invalid: of ``failed``, requests the client got wrong (``RequestError``).
        in_flight: requests started and not yet answered.
        errors: failed and rejected requests, by error class name.
        request: a completed request's whole call.
        nodes: each node's counters, by node name (nodes no request can
            reach are not listed).

    Added in 0.5.
    """

    name: str
    version: str
    requests: int = 0
    completed: int = 0
    failed: int = 0
    rejected: int = 0
    cancelled: int = 0
    deadline_misses: int = 0
    invalid: int = 0
    in_flight: int = 0
    errors: dict[str, int] = {}
    request: Histogram = Histogram()
    nodes: dict[str, NodeStatistics] = {}


class CallTrace(msgspec.Struct, frozen=True, kw_only=True):
    """Where one request's time went. Durations are seconds.

    Attributes:
        model: the model's name.
        version: the model's version that computed it.
        instance: the instance that computed it.
        queue_wait: from being queued to its batch starting.
        batch_size: requests in its batch.
        batch_cost: their total cost.
        padding_ratio: the share of padding in its batch (0 if not padded).
        infer_seconds: how long its batch took to compute (collate, infer, split).
        preprocess_seconds: its ``preprocess``.
        postprocess_seconds: its ``postprocess``.
        total_seconds: the whole call.

    Added in 0.1; ``version`` in 0.4.
    """

    model: str
    version: str = ""
    instance: int
    queue_wait: float
    batch_size: int
    batch_cost: int
    padding_ratio: float
    infer_seconds: float
    preprocess_seconds: float
    postprocess_seconds: float
    total_seconds: float


class NodeTrace(msgspec.Struct, frozen=True, kw_only=True):
    """One node's part in a pipeline call. Durations are seconds.

    Attributes:
        node: the node's name.
        kind: ``"model"``, ``"function"``, ``"router"`` or ``"fan_out"``.
        started: when the node started, from the start of the call.
        seconds: how long the node took.
        call: for a model node, its model call's trace (queue wait, batch
            size and the rest).
        route: for a router, the value it routed on.
        branches: for a fan-out, each branch's trace.

    Added in 0.2.
    """

    node: str
    kind: str
    started: float
    seconds: float
    call: CallTrace | None = None
    route: str | None = None
    branches: tuple["NodeTrace", ...] = ()


class PipelineTrace(msgspec.Struct, frozen=True, kw_only=True):
    """Where one pipeline call went and where its time went.

    Attributes:
        pipeline: the pipeline's name.
        path: the nodes taken, in order (a fan-out's branches are in its
            :class:`NodeTrace`).
        nodes: each node's trace, in the same order.
        total_seconds: the whole call.

    Added in 0.2.
    """

    pipeline: str
    path: tuple[str, ...]
    nodes: tuple[NodeTrace, ...]
    total_seconds: float


TraceT = TypeVar("TraceT", default=CallTrace)


class Traced(msgspec.Struct, Generic[T, TraceT], frozen=True, kw_only=True):
    """A response with the trace of how it was computed (``trace=True``).

    Attributes:
        value: the response.
        trace: where the call's time went: a :class:`CallTrace` for a
            model, a :class:`PipelineTrace` for a pipeline.

    Example:
        >>> result = await model.serve(x, trace=True)
        >>> result.value, result.trace.queue_wait, result.trace.batch_size

    Added in 0.1; pipelines' traces in 0.2.
    """

    value: T
    trace: TraceT


# Public in mds.workers, which reports them; RuntimeHealth holds them without it.
for _worker_class in (WorkerHealth, WorkerState, WorkerStatistics):
    _worker_class.__module__ = "mds.workers"
del _worker_class
