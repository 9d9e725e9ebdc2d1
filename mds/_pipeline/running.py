"""Serving a pipeline: each request walks the graph, node by node, in process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Self

import anyio

from .. import _loop, _tracing
from .._bridge import Home
from .._deprecation import renamed
from .._errors import MdsError, NotReady
from .._handler import ModelState
from .._servable import Serving
from .._statistics import RequestCounts
from .._status import (
    ModelHealth,
    NodeTrace,
    PipelineHealth,
    PipelineStatistics,
    PipelineTrace,
    Traced,
)
from .._tensors import Signature
from .._versions import ModelVersions
from .graph import Pipeline
from .runners import Runner, compile_nodes

__all__ = ["PipelineRuntime"]


class PipelineRuntime(Serving[Any, Any, PipelineTrace, PipelineHealth]):
    """A pipeline as a runtime serves it: its nodes bound to the runtime's models.

    Made by :meth:`Runtime.add_pipeline`; serve it with :func:`mds.serve`,
    :meth:`Runtime.serve` or :meth:`serve`. Model nodes are the runtime's
    models (``<pipeline>.<node>``, or the model a node names), so they start,
    stop and report with the runtime.

    Added in 0.2.
    """

    #: What the Open Inference Protocol's metadata calls a graph of models.
    platform = "ensemble"
    #: A pipeline gives its whole response at once.
    streams = False
    #: No one queue bounds a pipeline (each model node has its own).
    queue_capacity = None

    def __init__(
        self,
        pipeline: Pipeline,
        models: Mapping[str, ModelVersions],
        *,
        home: Home | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.name = pipeline.name
        self.version = pipeline.version
        self.timeout = pipeline.timeout
        #: The model serving each model node, by node name.
        self.models: dict[str, ModelVersions] = dict(models)
        self._home = home if home is not None else Home(self._not_running)
        runners = compile_nodes(self.name, pipeline.nodes, pipeline.reachable(), self.models)
        self._runners = runners
        self._start = runners[pipeline.start]
        self._counts = RequestCounts()
        self._span = f"mds.pipeline {self.name}"
        self._span_attributes = {
            "mds.pipeline.name": self.name,
            "mds.pipeline.version": self.version,
        }

    def __repr__(self) -> str:
        return f"<PipelineRuntime {self.name!r} nodes={list(self.pipeline.nodes)}>"

    def _not_running(self) -> NotReady:
        return NotReady("not ready: its runtime is not running", pipeline=self.name)

    # -- the servable contract ------------------------------------------------

    @property
    def versions(self) -> tuple[str, ...]:
        """The versions requests may name: the pipeline's one.

        Added in 0.3.
        """
        return (self.version,)

    @property
    def ready(self) -> bool:
        """Whether every model node takes requests now.

        Added in 0.3.
        """
        return all(model.ready for model in self.models.values())

    @property
    def state(self) -> ModelState:
        """``READY`` when every model node is; else the state of the first that is not.

        Added in 0.3.
        """
        for model in self.models.values():
            if not model.ready:
                return model.state
        return ModelState.READY

    @property
    def stateful(self) -> bool:
        """Whether one of its models is stateful: its requests are then steps of sequences.

        Added in 0.5.
        """
        return any(model.stateful for model in self.models.values())

    def choose(self) -> Self:
        """Itself: see :meth:`Servable.choose`.

        Added in 0.4.
        """
        return self

    def add_context(self, error: MdsError) -> MdsError:
        """``error``, with this pipeline in its context.

        Added in 0.3.
        """
        return error.add_context(pipeline=self.name)

    def signature(self) -> Signature | None:
        """``None``: a pipeline does not declare its tensors."""
        return None

    def from_tensors(self, tensors: dict[str, Any]) -> Any:
        """A protocol request's tensors are the pipeline's request as they are."""
        return tensors

    def to_tensors(self, response: Any) -> Any:
        """The response is the output tensors as it is."""
        return response

    # -- requests ---------------------------------------------------------------

    infer = renamed(Serving.serve, old="infer", owner="PipelineRuntime")

    async def _serve(
        self, request: Any, timeout: float | None, priority: int | None, trace: bool, stream: bool
    ) -> Any:
        """One request through the graph, in the runtime's loop (``stream``: as one chunk)."""
        counts = self._counts
        for node, model in self.models.items():
            if not model.ready:
                counts.not_ready += 1
                counts.errors["NotReady"] += 1
                raise NotReady(
                    f"not ready: node {node!r} (model {model.name!r}) is {model.state.value}",
                    pipeline=self.name,
                )
        clock = _loop.clock()
        began = clock()
        if timeout is None:
            timeout = self.timeout
        deadline = None if timeout is None else began + timeout
        traces: list[NodeTrace] | None = [] if trace else None
        runner: Runner | None = self._start
        value = request
        counts.requests += 1
        # Read per request: a provider set since the runtime started is used.
        tracer = _tracing.refresh()
        try:
            with _tracing.spanned(tracer, self._span, self._span_attributes):
                while runner is not None:
                    try:
                        value, following = await runner.call(
                            value, request, deadline, priority, traces
                        )
                    except MdsError as exc:
                        exc.add_context(pipeline=self.name, node=runner.name)
                        raise
                    runner = following
        except anyio.get_cancelled_exc_class():
            counts.cancelled += 1
            raise
        except Exception as exc:
            counts.failure(exc)
            raise
        counts.completed += 1
        ended = clock()
        counts.request.observe(ended - began)
        if stream:
            return _one_chunk(value)
        if traces is None:
            return value
        nodes = tuple(_shifted(t, began) for t in traces)
        return Traced(
            value=value,
            trace=PipelineTrace(
                pipeline=self.name,
                path=tuple(t.node for t in nodes),
                nodes=nodes,
                total_seconds=ended - began,
            ),
        )

    def statistics(self) -> PipelineStatistics:
        """A snapshot of this pipeline's counters and its nodes'.

        Added in 0.5.
        """
        counts = self._counts
        return PipelineStatistics(
            name=self.name,
            version=self.version,
            **counts.outcomes(),
            request=counts.request.snapshot(),
            nodes={name: runner.statistics() for name, runner in self._runners.items()},
        )

    # -- health -----------------------------------------------------------------

    async def _health(self) -> PipelineHealth:
        """Readiness: every model node's, together (see :meth:`health`)."""
        reports = {model.name: await model.health() for model in self.models.values()}
        return self.health_from(reports)

    def health_from(self, reports: Mapping[str, ModelHealth]) -> PipelineHealth:
        """Readiness from the model nodes' health ``reports`` (by model name)."""
        nodes: dict[str, bool] = {}
        reason = None
        for node, model in self.models.items():
            report = reports.get(model.name)
            ready = bool(report is not None and report.ready)
            nodes[node] = ready
            if not ready and reason is None:
                why = report.reason if report is not None else "not reported"
                reason = f"node {node!r} (model {model.name!r}) is not ready: {why}"
        return PipelineHealth(name=self.name, ready=reason is None, reason=reason, nodes=nodes)


async def _one_chunk(value: Any) -> AsyncIterator[Any]:
    yield value


def _shifted(trace: NodeTrace, began: float) -> NodeTrace:
    """The trace with ``started`` measured from the call's start."""
    return NodeTrace(
        node=trace.node,
        kind=trace.kind,
        started=trace.started - began,
        seconds=trace.seconds,
        call=trace.call,
        route=trace.route,
        branches=tuple(_shifted(b, began) for b in trace.branches),
    )
