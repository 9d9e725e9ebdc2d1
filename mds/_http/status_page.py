"""The status page: one self-contained HTML document, and the JSON it polls.

The adapters serve it when asked to (``status_page=True``): ``GET
{prefix}/status`` answers :data:`PAGE` (``text/html; charset=utf-8``) and
``GET {prefix}/status/data`` answers :func:`data` (``application/json``).
The page loads nothing else: its CSS and script are inline, it asks no CDN
and no font server, and it polls ``status/data`` beside its own URL every
two seconds (``?interval=0.5`` polls faster), updating itself in place.
Rates (requests per second, errors per second) and the latency percentiles
of the last interval are computed in the page from the difference between
two polls of cumulative counters, so the server keeps no state for it.

The JSON (durations in seconds; a state is a lifecycle state's value, such
as ``"ready"`` or ``"failed"``)::

    {
      "mds": "0.5.0",                  # mds's version
      "process": "host:1234",          # which process answered: rates are
                                       # computed between polls of one process
      "time": 1767225600.0,            # the server's wall clock (for display)
      "clock": 5123.25,                # a monotonic clock (for rates)
      "running": true,                 # the runtime is running
      "models": [{                     # by name
        "name": "classifier",
        "state": "ready",              # the version that takes most traffic
        "ready": true,
        "reason": null,                # why not ready (a failure's cause)
        "pipelines": ["triage"],       # pipelines with a node it serves
        "versions": [{                 # oldest first, unloaded ones too
          "version": "2",
          "state": "ready",
          "reason": null,
          "loaded": true,
          "traffic": 0.1,              # share of requests that name no version
          "on_demand": false,          # loads on its first request
          "instances": 2,
          "devices": ["cpu", "cpu"],   # one per instance running
          "max_batch_size": 8,         # the batch limit in force
          "queue_capacity": 64,
          "counters": {                # cumulative since the version was
            "requests": 0, "completed": 0, "failed": 0, "rejected": 0,
            "cancelled": 0, "deadline_misses": 0,
            "in_flight": 0, "queued": 0,             # now
            "batches": 0, "batched_items": 0,
            "batch_sizes": {"4": 12},  # batches by number of requests
            "request": {"bounds": [...], "counts": [...], "sum": 0.0}
          }                            # null while not loaded
        }]
      }],
      "pipelines": [{
        "name": "triage", "version": "1", "state": "ready", "ready": true,
        "reason": null,                # which node is not ready, and why
        "nodes": [{                    # the drawing of `mds pipeline show`
          "id": "route",               # a node's name; "(start)", "(end)"
                                       # and "(join)<fan-out>" are drawn too
          "name": "route", "kind": "router",  # or model, function, fan_out,
                                              # start, end, join
          "describe": "router by request.kind",
          "reachable": true,
          "model": null,               # a model node's model, with its
          "state": null,               # state now
          "calls": 0, "failed": 0      # times reached, and failed; null
                                       # for drawn nodes and unreachable ones
        }],
        "edges": [{"source": "route", "target": "classify", "label": "image"}],
        "counters": {                  # cumulative
          "requests": 0, "completed": 0, "failed": 0, "rejected": 0,
          "cancelled": 0, "request": {"bounds": [...], "counts": [...], "sum": 0.0}
        }
      }]
    }

Everything is read without waiting: states, failures, traffic and counters
as the models keep them (no health check runs), so :func:`data` is cheap
and may be called from any thread.
"""

from __future__ import annotations

import os
import pkgutil
import platform
import time
from typing import Any

import msgspec

from .._errors import ModelNotFound
from .._model import ModelRuntime
from .._pipeline.graph import _JOIN
from .._pipeline.nodes import FanOutNode, ModelNode, Node
from .._pipeline.running import PipelineRuntime
from .._runtime import Runtime
from .._status import Histogram, VersionStatus
from .._version import __version__
from .._versions import ModelVersions

__all__ = ["PAGE", "data"]

# Read through the package's loader: a zipped install works too, and so does a
# first import on an event loop (the loader's read is an import's read).
_page = pkgutil.get_data(__name__.rpartition(".")[0], "status_page.html")
if _page is None:  # pragma: no cover - a loader that cannot read package data
    raise ImportError("mds/_http/status_page.html is missing from this installation of mds")
#: The page, as served: HTML with its CSS and script inline.
PAGE: bytes = _page

#: Synthetic nodes in a drawing; a node name cannot hold "(" or ")".
START, END, JOIN = "(start)", "(end)", "(join)"


class Counters(msgspec.Struct, frozen=True, kw_only=True):
    """A model version's counters (cumulative) and its queue now."""

    requests: int
    completed: int
    failed: int
    rejected: int
    cancelled: int
    deadline_misses: int
    in_flight: int
    queued: int
    batches: int
    batched_items: int
    batch_sizes: dict[int, int]
    request: Histogram


class VersionView(msgspec.Struct, frozen=True, kw_only=True):
    """One version of a model, loaded or not."""

    version: str
    state: str
    reason: str | None
    loaded: bool
    traffic: float
    on_demand: bool
    instances: int = 0
    devices: tuple[str, ...] = ()
    max_batch_size: int = 0
    queue_capacity: int = 0
    counters: Counters | None = None


class ModelView(msgspec.Struct, frozen=True, kw_only=True):
    """One model: its state and its versions."""

    name: str
    state: str
    ready: bool
    reason: str | None
    pipelines: tuple[str, ...]
    versions: tuple[VersionView, ...]


class NodeView(msgspec.Struct, frozen=True, kw_only=True):
    """One node of a pipeline's drawing."""

    id: str
    name: str
    kind: str
    describe: str = ""
    reachable: bool = True
    model: str | None = None
    state: str | None = None
    calls: int | None = None
    failed: int | None = None


class EdgeView(msgspec.Struct, frozen=True, kw_only=True):
    """One edge of a pipeline's drawing; ``label`` is a route's value, or empty."""

    source: str
    target: str
    label: str = ""


class PipelineCounters(msgspec.Struct, frozen=True, kw_only=True):
    """A pipeline's counters, cumulative."""

    requests: int
    completed: int
    failed: int
    rejected: int
    cancelled: int
    request: Histogram


class PipelineView(msgspec.Struct, frozen=True, kw_only=True):
    """One pipeline: its state, its graph, its counters."""

    name: str
    version: str
    state: str
    ready: bool
    reason: str | None
    nodes: tuple[NodeView, ...]
    edges: tuple[EdgeView, ...]
    counters: PipelineCounters


class Status(msgspec.Struct, frozen=True, kw_only=True):
    """What :func:`data` encodes: see the module's docstring."""

    mds: str
    process: str
    time: float
    clock: float
    running: bool
    models: tuple[ModelView, ...]
    pipelines: tuple[PipelineView, ...]


_encoder = msgspec.json.Encoder()


def data(runtime: Runtime) -> bytes:
    """The JSON the status page polls: every model and pipeline of ``runtime``, now.

    Sync and cheap: nothing waits and no health check runs, so any thread
    may call it (an adapter's route, a Flask view).
    """
    pipelines = runtime.pipelines
    users: dict[str, list[str]] = {}
    for name, served in pipelines.items():
        for versions in list(served.models.values()):
            users.setdefault(versions.name, []).append(name)
    statuses: dict[str, list[VersionStatus]] = {}
    for status in runtime.index():
        statuses.setdefault(status.name, []).append(status)
    models = tuple(
        _model(runtime, name, found, tuple(dict.fromkeys(users.get(name, ()))))
        for name, found in statuses.items()
    )
    return _encoder.encode(
        Status(
            mds=__version__,
            process=f"{platform.node()}:{os.getpid()}",
            time=time.time(),
            clock=time.monotonic(),
            running=runtime.running,
            models=models,
            pipelines=tuple(_pipeline(served) for _, served in sorted(pipelines.items())),
        )
    )


def _model(
    runtime: Runtime, name: str, statuses: list[VersionStatus], pipelines: tuple[str, ...]
) -> ModelView:
    try:
        versions: ModelVersions | None = runtime.versions(name)
    except ModelNotFound:  # every version unloaded, or its first load failed
        versions = None
    if versions is None:
        last = statuses[-1]
        return ModelView(
            name=name,
            state=last.state.value,
            ready=False,
            reason=last.reason or f"it is {last.state.value}",
            pipelines=pipelines,
            versions=tuple(_version(status, None, 0.0) for status in statuses),
        )
    loaded, traffic = versions.runtimes, versions.traffic
    state = versions.state
    ready = versions.ready
    reason = None
    if not ready:
        reason = versions.failure or f"it is {state.value}"
    return ModelView(
        name=name,
        state=state.value,
        ready=ready,
        reason=reason,
        pipelines=pipelines,
        versions=tuple(
            _version(status, loaded.get(status.version), traffic.get(status.version, 0.0))
            for status in statuses
        ),
    )


def _version(
    status: VersionStatus, model: ModelRuntime[Any, Any] | None, traffic: float
) -> VersionView:
    listed: dict[str, Any] = {
        "version": status.version,
        "state": status.state.value,
        "reason": status.reason,
        "traffic": traffic,
        "on_demand": status.on_demand,
    }
    if model is None:
        return VersionView(**listed, loaded=False)
    stats = model.statistics()
    return VersionView(
        **listed,
        loaded=True,
        instances=stats.instances,
        devices=stats.devices,  # where they were placed (read, not probed)
        max_batch_size=stats.max_batch_size,
        queue_capacity=model.queue_capacity,
        counters=Counters(
            requests=stats.requests,
            completed=stats.completed,
            failed=stats.failed,
            rejected=stats.rejected,
            cancelled=stats.cancelled,
            deadline_misses=stats.deadline_misses,
            in_flight=stats.in_flight,
            queued=stats.queued,
            batches=stats.batches,
            batched_items=stats.batched_items,
            batch_sizes=dict(stats.batch_sizes),
            request=stats.histograms.request,
        ),
    )


def _pipeline(served: PipelineRuntime) -> PipelineView:
    pipeline = served.pipeline
    models = dict(served.models)
    reason = None
    for node_name, versions in models.items():
        if not versions.ready:
            failure = versions.failure
            why = f"failed: {failure}" if failure else versions.state.value
            reason = f"node {node_name!r} (model {versions.name!r}) is {why}"
            break
    stats = served.statistics()
    reachable = pipeline.reachable()
    nodes = [NodeView(id=START, name="start", kind="start")]
    for name, node in pipeline.nodes.items():
        serving = models.get(name)
        counted = stats.nodes.get(name)  # not for a node no request can reach
        nodes.append(
            NodeView(
                id=name,
                name=name,
                kind=node.kind,
                describe=node.describe(),
                reachable=name in reachable,
                model=serving.name if serving is not None else _model_name(served, node),
                state=serving.state.value if serving is not None else None,
                calls=counted.calls if counted is not None else None,
                failed=counted.failed if counted is not None else None,
            )
        )
        if isinstance(node, FanOutNode):
            nodes.append(NodeView(id=JOIN + name, name="join", kind="join"))
    nodes.append(NodeView(id=END, name="end", kind="end"))
    edges = [EdgeView(source=START, target=pipeline.start)]
    for source, target, label in pipeline._edges():
        edges.append(EdgeView(source=_end(source), target=_end(target), label=label))
    return PipelineView(
        name=served.name,
        version=served.version,
        state=served.state.value,
        ready=reason is None,
        reason=reason,
        nodes=tuple(nodes),
        edges=tuple(edges),
        counters=PipelineCounters(
            requests=stats.requests,
            completed=stats.completed,
            failed=stats.failed,
            rejected=stats.rejected,
            cancelled=stats.cancelled,
            request=stats.request,
        ),
    )


def _model_name(served: PipelineRuntime, node: Node) -> str | None:
    """The model an unreachable (so unloaded) model node would serve."""
    if not isinstance(node, ModelNode):
        return None
    return node.model_name or f"{served.name}.{node.name}"


def _end(end: str | None) -> str:
    """A drawing's edge end as a node id: ``None`` is the end, a join its own node."""
    if end is None:
        return END
    if end.startswith(_JOIN):
        return JOIN + end.removeprefix(_JOIN)
    return end
