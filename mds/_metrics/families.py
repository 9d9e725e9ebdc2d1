"""mds's numbers as metric families: names, help, labels and samples, no client library.

Families are plain data so that several processes' samples can be written to
files, read back and added up (see :mod:`mds._metrics.shared`) before they
are handed to ``prometheus_client``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, Protocol

import msgspec

from .._config import version_key
from .._devices.device import Device
from .._devices.manager import DeviceManager
from .._errors import MdsError
from .._handler import ModelState
from .._runtime import Runtime
from .._statistics import retired_statistics, summed
from .._status import Histogram, ModelStatistics, PipelineStatistics, WorkerState

__all__ = ["Family", "Sample", "families"]

Kind = Literal["counter", "gauge", "histogram"]


class Sample(msgspec.Struct, array_like=True):
    """One series: its label values and its value (a histogram's buckets for a histogram)."""

    labels: tuple[str, ...]
    value: float | Histogram


class Family(msgspec.Struct):
    """One metric family: ``name`` without the namespace and without ``_total``."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...]
    samples: list[Sample] = msgspec.field(default_factory=list)
    #: How processes' samples of a gauge add up: "sum" (queue depth) or
    #: "max" (a limit every process has).
    combine: Literal["sum", "max"] = "sum"

    def add(self, labels: tuple[str, ...], value: float | Histogram) -> None:
        self.samples.append(Sample(labels, value))


_MODEL = ("model", "version")
_PIPELINE = ("pipeline", "version")

#: (name, help) of each model histogram, by ModelHistograms field.
_MODEL_HISTOGRAMS = {
    "request": (
        "request_duration_seconds",
        "Time from admission to response of completed requests.",
    ),
    "first_chunk": (
        "first_chunk_duration_seconds",
        "Time from admission to the first chunk of streams (time to first token).",
    ),
    "queue_wait": ("queue_duration_seconds", "Time requests waited in the queue for a batch."),
    "preprocess": ("preprocess_duration_seconds", "Time requests spent in preprocess."),
    "infer": (
        "infer_duration_seconds",
        "Time each batch took to compute (collate, infer, split), per batch.",
    ),
    "postprocess": ("postprocess_duration_seconds", "Time requests spent in postprocess."),
    "batch_size": ("batch_size", "Requests per batch."),
    "batch_cost": ("batch_cost", "Cost per batch (the handler's cost of its requests)."),
}


def families(runtime: Runtime, devices: DeviceManager | None = None) -> list[Family]:
    """Every family for ``runtime`` now: its models (each loaded version), pipelines, devices.

    Reads counters only (no I/O but the devices' memory), from any thread. A
    version's counters include those of its runtimes that were reloaded or
    unloaded, so that they never go down while the model is served.
    """
    found: dict[str, Family] = {}

    def family(
        name: str, kind: Kind, help: str, labels: tuple[str, ...], combine: str = "sum"
    ) -> Family:
        if name not in found:
            found[name] = Family(name, kind, help, labels, combine=combine)  # type: ignore[arg-type]
        return found[name]

    used: set[str] = set()
    failures = family(
        "model_load_failures",
        "counter",
        "Loads of a version that failed (Runtime.load_model, a watched repository); the "
        "version serving before goes on serving.",
        _MODEL,
    )
    for name in list(runtime.models):  # copied: a load may add a name meanwhile
        try:
            versions = runtime.versions(name)
            loaded = sorted(versions.runtimes.items())
        except MdsError:  # unloaded meanwhile
            continue
        for version, count in sorted(versions._load_failures.items()):
            failures.add((name, version), count)
        current = dict(loaded)
        retired = dict(versions._retired)
        for version in sorted(set(current) | set(retired), key=version_key):
            model = current.get(version)
            stats = model.statistics() if model is not None else None
            frozen, live = retired.get(version, (None, ()))
            older = [retired_statistics(name, version, *pair) for pair in live]
            if frozen is not None:
                older.append(frozen)
            _model(family, (name, version), stats, older)
            if stats is not None:
                used.update(stats.devices)
    for pipeline in runtime.pipelines.values():
        _pipeline(family, pipeline.statistics())
    _residency(family, runtime)
    _workers(family, runtime)
    if used:
        _devices(family, used, devices if devices is not None else DeviceManager.default())
    return list(found.values())


def _model(
    family: _Make,
    labels: tuple[str, str],
    current: ModelStatistics | None,
    older: list[ModelStatistics],
) -> None:
    stats = summed(current, older)
    _outcomes(family, "", _MODEL, labels, stats)
    for field, (name, help) in _MODEL_HISTOGRAMS.items():
        family(name, "histogram", help, _MODEL).add(labels, getattr(stats.histograms, field))
    family(
        "isolation_splits", "counter", "Failed batches split in two to find the items at fault.",
        _MODEL,
    ).add(labels, stats.isolation_splits)  # fmt: skip
    family(
        "out_of_memory", "counter", "Batches that ran out of device memory (and were split).",
        _MODEL,
    ).add(labels, stats.out_of_memory)  # fmt: skip
    if stats.sequences_started or stats.sequence_ends or (current and current.sequences):
        family("sequences_started", "counter", "Sequences a stateful model started.", _MODEL).add(
            labels, stats.sequences_started
        )
        ends = family(
            "sequence_ends", "counter",
            "Sequences that ended, by reason: ended (by the client), idle, cancelled, expired, "
            "failed (its first step), stopped, swapped.",
            (*_MODEL, "reason"),
        )  # fmt: skip
        for reason, count in sorted(stats.sequence_ends.items()):
            ends.add((*labels, reason), count)
    if current is None:
        return  # unloaded: its counts, no gauges
    stats = current
    family("queue_depth", "gauge", "Requests waiting in the queue now.", _MODEL).add(
        labels, stats.queued
    )
    family("requests_in_flight", "gauge", "Requests admitted and not yet answered.", _MODEL).add(
        labels, stats.in_flight
    )
    family(
        "batches_in_flight",
        "gauge",
        "Batches being computed now (instances busy).",
        _MODEL,
    ).add(labels, stats.batches_in_flight)
    if current.sequences or current.sequences_started:
        family("sequences", "gauge", "A stateful model's live sequences now.", _MODEL).add(
            labels, current.sequences
        )
    instances = family(
        "instances", "gauge", "Instances running now, by device.", (*_MODEL, "device")
    )
    for device in sorted(set(stats.devices)):
        instances.add((*labels, device), stats.devices.count(device))
    state = family(
        "model_state",
        "gauge",
        "1 for the model's lifecycle state now, 0 for the others (summed over processes: how "
        "many are in each state).",
        (*_MODEL, "state"),
    )
    for each in ModelState:
        state.add((*labels, each.value), 1.0 if each is stats.state else 0.0)
    family(
        "max_batch_size",
        "gauge",
        "The batch limit in force (lower than configured after running out of memory).",
        _MODEL,
        combine="max",
    ).add(labels, stats.max_batch_size)


_OUTCOMES = (
    "Requests by outcome: success; error (failed in the model or a node); deadline (its "
    "deadline passed); invalid (the client's mistake: bad input); rejected (not ready, or a "
    "queue full); cancelled (the caller left)."
)


def _outcomes(
    family: _Make,
    prefix: str,
    names: tuple[str, ...],
    labels: tuple[str, ...],
    stats: ModelStatistics | PipelineStatistics,
) -> None:
    """Requests by outcome, and failures by error class."""
    errors = family(
        f"{prefix}request_errors",
        "counter",
        "Failed and rejected requests by error class (InvalidInput, Overloaded, NotReady, ...).",
        (*names, "error"),
    )
    for error, count in sorted(stats.errors.items()):
        errors.add((*labels, error), count)
    requests = family(f"{prefix}requests", "counter", _OUTCOMES, (*names, "outcome"))
    # failed holds deadline and invalid, read in the same snapshot: never negative.
    requests.add((*labels, "success"), stats.completed)
    requests.add((*labels, "error"), stats.failed - stats.deadline_misses - stats.invalid)
    requests.add((*labels, "deadline"), stats.deadline_misses)
    requests.add((*labels, "invalid"), stats.invalid)
    requests.add((*labels, "rejected"), stats.rejected)
    requests.add((*labels, "cancelled"), stats.cancelled)


def _pipeline(family: _Make, stats: PipelineStatistics) -> None:
    labels = (stats.name, stats.version)
    _outcomes(family, "pipeline_", _PIPELINE, labels, stats)
    family(
        "pipeline_request_duration_seconds",
        "histogram",
        "Time completed pipeline requests took, end to end.",
        _PIPELINE,
    ).add(labels, stats.request)
    node_labels = (*_PIPELINE, "node", "kind")
    calls = family("pipeline_node_calls", "counter", "Calls of each pipeline node.", node_labels)
    failures = family(
        "pipeline_node_failures", "counter", "Calls of each pipeline node that raised.",
        node_labels,
    )  # fmt: skip
    seconds = family(
        "pipeline_node_duration_seconds",
        "histogram",
        "Time each pipeline node took per call (a fan-out's includes its branches).",
        node_labels,
    )
    for name, node in sorted(stats.nodes.items()):
        node_labels_now = (*labels, name, node.kind)
        calls.add(node_labels_now, node.calls)
        failures.add(node_labels_now, node.failed)
        seconds.add(node_labels_now, node.seconds)


def _residency(family: _Make, runtime: Runtime) -> None:
    residency = runtime.residency()
    for name, help, value in (
        ("on_demand_loads", "On-demand models loaded.", residency.loads),
        ("on_demand_failed_loads", "On-demand loads that failed.", residency.failed_loads),
        ("on_demand_evictions", "On-demand models unloaded to make room.", residency.evictions),
    ):
        family(name, "counter", help, ()).add((), value)
    family("resident_models", "gauge", "On-demand models loaded now.", ()).add(
        (), len(residency.resident)
    )


_WORKER = ("worker", "queue", "target")


def _workers(family: _Make, runtime: Runtime) -> None:
    """The queue workers running on the runtime."""
    received = family(
        "worker_received_messages", "counter",
        "Messages a queue worker received (redeliveries included).", _WORKER,
    )  # fmt: skip
    ended = family(
        "worker_messages", "counter",
        "Messages by how the worker ended their delivery: completed (served, written, "
        "acknowledged), released (for another delivery), dead_lettered.",
        (*_WORKER, "outcome"),
    )  # fmt: skip
    errors = family(
        "worker_source_errors", "counter",
        "Calls to the broker that failed (receive, acknowledge, extend, release).", _WORKER,
    )  # fmt: skip
    held = family(
        "worker_messages_in_flight", "gauge", "Messages a worker holds now (queued or computing).",
        _WORKER,
    )  # fmt: skip
    lag = family(
        "worker_queue_lag_messages", "gauge",
        "Messages waiting in the queue, as the broker last said (every worker on a queue "
        "sees the same: the most of them, not their sum).", _WORKER, combine="max",
    )  # fmt: skip
    state = family(
        "worker_state", "gauge",
        "1 for the worker's state now, 0 for the others (summed over processes: how many are "
        "in each state).", (*_WORKER, "state"),
    )  # fmt: skip
    for name, stats in runtime.worker_statistics().items():
        labels = (name, stats.queue, stats.target)
        received.add(labels, stats.received)
        ended.add((*labels, "completed"), stats.completed)
        ended.add((*labels, "released"), stats.released)
        ended.add((*labels, "dead_lettered"), stats.dead_lettered)
        errors.add(labels, stats.source_errors)
        held.add(labels, stats.in_flight)
        if stats.lag is not None:
            lag.add(labels, stats.lag)
        for each in WorkerState:
            state.add((*labels, each.value), 1.0 if each is stats.state else 0.0)


def _devices(family: _Make, names: Iterable[str], manager: DeviceManager) -> None:
    total = family(
        "device_memory_total_bytes", "gauge", "Memory each device has, where known.", ("device",),
        combine="max",
    )  # fmt: skip
    free = family(
        "device_memory_free_bytes", "gauge", "Memory free on each device now, where known.",
        ("device",), combine="max",
    )  # fmt: skip
    healthy = family(
        "device_healthy", "gauge", "1 while the device works, 0 after a device error.",
        ("device",), combine="max",
    )  # fmt: skip
    busy = family(
        "device_utilization_ratio", "gauge", "The share of time each device was busy (0 to 1).",
        ("device",), combine="max",
    )  # fmt: skip
    for name in sorted(names):
        try:
            info = manager.info(Device.parse(name))
        except MdsError:
            continue  # gone, or a kind this manager does not know: nothing to say
        healthy.add((name,), 1.0 if info.healthy else 0.0)
        if info.total_memory is not None:
            total.add((name,), info.total_memory)
        if info.free_memory is not None:
            free.add((name,), info.free_memory)
        if info.utilization is not None:
            busy.add((name,), info.utilization)


class _Make(Protocol):  # the type of ``family`` above, for the helpers' annotations
    def __call__(
        self, name: str, kind: Kind, help: str, labels: tuple[str, ...], combine: str = "sum"
    ) -> Family: ...
