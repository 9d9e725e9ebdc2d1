"""Serving a pipeline: each request walks the graph, node by node, in process."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, Literal, overload

import anyio

from .. import _loop
from .._bridge import Home
from .._errors import DeadlineExceeded, InferenceError, InvalidInput, MdsError, NotReady, describe
from .._handler import ModelState
from .._model import ModelRuntime
from .._servable import Signature
from .._status import ModelHealth, NodeTrace, PipelineHealth, PipelineTrace, Traced
from .._threads import is_async
from .graph import FanOutNode, FunctionNode, ModelNode, Node, Pipeline, RouterNode

__all__ = ["PipelineRuntime"]

logger = logging.getLogger(__name__)


class _Runner:
    """A node, compiled. ``run`` returns the value and the runner that follows."""

    next: _Runner | None = None

    def __init__(self, pipeline: str, node: Node) -> None:
        self.name = node.name
        self.kind = node.kind
        self.pipeline = pipeline
        self.where = f"pipeline {pipeline!r}, node {node.name!r}"  # for logs

    async def run(
        self,
        value: Any,
        request: Any,
        deadline: float | None,
        priority: int | None,
        traces: list[NodeTrace] | None,
    ) -> tuple[Any, _Runner | None]:
        raise NotImplementedError

    def _late(self) -> DeadlineExceeded:
        return DeadlineExceeded("the pipeline's deadline passed before this node")


class _ModelRunner(_Runner):
    def __init__(self, pipeline: str, node: Node, model: ModelRuntime[Any, Any]) -> None:
        super().__init__(pipeline, node)
        self.model = model

    async def run(
        self,
        value: Any,
        request: Any,
        deadline: float | None,
        priority: int | None,
        traces: list[NodeTrace] | None,
    ) -> tuple[Any, _Runner | None]:
        model = self.model
        clock = _loop.clock()
        began = clock()
        timeout = None
        if deadline is not None:
            timeout = deadline - began
            if timeout <= 0:
                raise self._late()
            own = model.config.timeout
            if own is not None and own < timeout:
                timeout = own
        if traces is None:
            return await model.serve(value, timeout=timeout, priority=priority), self.next
        traced = await model.serve(value, timeout=timeout, priority=priority, trace=True)
        traces.append(
            NodeTrace(
                node=self.name,
                kind="model",
                started=began,
                seconds=clock() - began,
                call=traced.trace,
            )
        )
        return traced.value, self.next


class _FunctionRunner(_Runner):
    def __init__(self, pipeline: str, node: FunctionNode) -> None:
        super().__init__(pipeline, node)
        fn = node.fn
        assert fn is not None  # reachable nodes are loaded
        try:
            # Beyond the first: a first parameter named "request" is the value.
            wants_request = "request" in list(inspect.signature(fn).parameters)[1:]
        except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
            wants_request = False
        self._async = is_async(fn)
        self._fn = fn
        self._wants_request = wants_request

    async def run(
        self,
        value: Any,
        request: Any,
        deadline: float | None,
        priority: int | None,
        traces: list[NodeTrace] | None,
    ) -> tuple[Any, _Runner | None]:
        clock = _loop.clock()
        began = clock()
        fn = self._fn
        call = functools.partial(fn, value, request=request) if self._wants_request else None
        try:
            with anyio.move_on_at(deadline if deadline is not None else float("inf")):
                if self._async:
                    result = await (call() if call is not None else fn(value))
                else:
                    result = await anyio.to_thread.run_sync(
                        call if call is not None else functools.partial(fn, value),
                        abandon_on_cancel=True,
                    )
                if traces is not None:
                    traces.append(
                        NodeTrace(
                            node=self.name, kind="function", started=began, seconds=clock() - began
                        )
                    )
                return result, self.next
        except MdsError:
            raise
        except Exception as exc:
            logger.exception("%s failed", self.where)
            raise InferenceError(describe(exc)) from exc
        raise DeadlineExceeded("the pipeline's deadline passed in this function")


class _Missing:
    pass


_MISSING = _Missing()


def _read(obj: Any, path: Sequence[str]) -> Any:
    """Follow keys, indices or attributes; ``_MISSING`` if one is not there."""
    for part in path:
        if isinstance(obj, Mapping):
            obj = obj.get(part, _MISSING)
        elif isinstance(obj, Sequence) and not isinstance(obj, str) and part.lstrip("-").isdigit():
            try:
                obj = obj[int(part)]
            except IndexError:
                return _MISSING
        else:
            obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            return obj
    return obj


class _RouterRunner(_Runner):
    def __init__(self, pipeline: str, node: RouterNode) -> None:
        super().__init__(pipeline, node)
        on = node.on
        self._fn: Callable[[Any, Any], Any] | None = None
        if isinstance(on, str):
            source, _, rest = on.partition(".")
            self._from_request = source == "request"
            self._path = rest.split(".") if rest else []
        else:
            self._fn = on
        self.on = on if isinstance(on, str) else getattr(on, "__qualname__", repr(on))
        self.routes: dict[str, _Runner] = {}
        self.default: _Runner | None = None

    async def run(
        self,
        value: Any,
        request: Any,
        deadline: float | None,
        priority: int | None,
        traces: list[NodeTrace] | None,
    ) -> tuple[Any, _Runner | None]:
        began = _loop.clock()() if traces is not None else 0.0
        if self._fn is not None:
            try:
                key = self._fn(value, request)
            except MdsError:
                raise
            except Exception as exc:
                raise InvalidInput(f"the router's function failed: {describe(exc)}") from exc
        else:
            key = _read(request if self._from_request else value, self._path)
        target = self.routes.get(str(key)) if key is not _MISSING else None
        if target is None:
            target = self.default
            if target is None:
                got = f"no value at {self.on}" if key is _MISSING else f"{self.on} is {key!r}"
                raise InvalidInput(
                    f"no route for this request ({got}); routes: "
                    + ", ".join(repr(k) for k in self.routes)
                )
        if traces is not None:
            traces.append(
                NodeTrace(
                    node=self.name,
                    kind="router",
                    started=began,
                    seconds=_loop.clock()() - began,
                    route=None if key is _MISSING else str(key),
                )
            )
        return value, target


class _FanOutRunner(_Runner):
    def __init__(self, pipeline: str, node: FanOutNode) -> None:
        super().__init__(pipeline, node)
        self.branches: list[_Runner] = []
        self._join = node.join

    async def run(
        self,
        value: Any,
        request: Any,
        deadline: float | None,
        priority: int | None,
        traces: list[NodeTrace] | None,
    ) -> tuple[Any, _Runner | None]:
        clock = _loop.clock()
        began = clock()
        outputs: dict[str, Any] = {}
        nested: dict[str, list[NodeTrace]] = {}
        failure: list[BaseException] = []

        async def branch(runner: _Runner, scope: anyio.CancelScope) -> None:
            mine: list[NodeTrace] | None = [] if traces is not None else None
            try:
                outputs[runner.name], _ = await runner.run(value, request, deadline, priority, mine)
            except Exception as exc:
                if isinstance(exc, MdsError):
                    exc.add_context(pipeline=runner.pipeline, node=runner.name)
                if not failure:
                    failure.append(exc)
                scope.cancel()  # the other branches are no use now
            if mine is not None:
                nested[runner.name] = mine

        async with anyio.create_task_group() as tasks:
            for runner in self.branches:
                tasks.start_soon(branch, runner, tasks.cancel_scope)
        if failure:
            raise failure[0]
        if len(outputs) != len(self.branches):  # pragma: no cover - cancelled from outside
            raise anyio.get_cancelled_exc_class()()
        ordered = {runner.name: outputs[runner.name] for runner in self.branches}
        if self._join is None:
            result: Any = ordered
        else:
            try:
                result = self._join(ordered)
            except MdsError:
                raise
            except Exception as exc:
                logger.exception("%s: join failed", self.where)
                raise InferenceError(f"the join failed: {describe(exc)}") from exc
        if traces is not None:
            branch_traces = tuple(t for r in self.branches for t in nested.get(r.name, []))
            traces.append(
                NodeTrace(
                    node=self.name,
                    kind="fan_out",
                    started=began,
                    seconds=clock() - began,
                    branches=branch_traces,
                )
            )
        return result, self.next


class PipelineRuntime:
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

    def __init__(
        self,
        pipeline: Pipeline,
        models: Mapping[str, ModelRuntime[Any, Any]],
        *,
        home: Home | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.name = pipeline.name
        self.version = pipeline.version
        self.timeout = pipeline.timeout
        #: The model serving each model node, by node name.
        self.models: dict[str, ModelRuntime[Any, Any]] = dict(models)
        self._home = home if home is not None else Home(self._not_running)
        runners: dict[str, _Runner] = {}
        reachable = pipeline.reachable()
        for name, node in pipeline.nodes.items():
            if name not in reachable:
                continue  # never runs: not compiled (nor loaded)
            if isinstance(node, ModelNode):
                runners[name] = _ModelRunner(self.name, node, self.models[name])
            elif isinstance(node, FunctionNode):
                runners[name] = _FunctionRunner(self.name, node)
            elif isinstance(node, RouterNode):
                runners[name] = _RouterRunner(self.name, node)
            elif isinstance(node, FanOutNode):
                runners[name] = _FanOutRunner(self.name, node)
        for name, runner in runners.items():
            node = pipeline.nodes[name]
            runner.next = runners[node.next] if node.next is not None else None
            if isinstance(runner, _RouterRunner) and isinstance(node, RouterNode):
                runner.routes = {key: runners[target] for key, target in node.routes.items()}
                runner.default = runners[node.default] if node.default is not None else None
            elif isinstance(runner, _FanOutRunner):
                runner.branches = [runners[branch] for branch in node.children()]
        self._start = runners[pipeline.start]

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

    @overload
    def serve(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: Literal[False] = False,
    ) -> Coroutine[Any, Any, Any]: ...

    @overload
    def serve(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: Literal[True],
    ) -> Coroutine[Any, Any, Traced[Any, PipelineTrace]]: ...

    @overload
    def serve(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: bool = False,
    ) -> Coroutine[Any, Any, Any]: ...

    def serve(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: bool = False,
    ) -> Coroutine[Any, Any, Any]:
        """Serve one request through the pipeline. Await it.

        Callable from any thread or event loop (forwarded to the runtime's
        loop when needed).

        Args:
            request: the first node's input.
            timeout: a deadline in seconds from now for the whole call;
                defaults to the pipeline's ``timeout``. Each model node's
                own ``timeout`` still bounds that node.
            priority: the priority level at every model node.
            trace: return a :class:`Traced` with a :class:`PipelineTrace`.

        Raises:
            NotReady: a model node is not ready; the message names it.
            MdsError: a node's error, of the same class, with the pipeline
                and the node in its context (and so in its message).

        Added in 0.3 (the name; ``infer`` before).
        """
        return self._home.call(self._serve, request, timeout, priority, trace)

    def infer(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: bool = False,
    ) -> Coroutine[Any, Any, Any]:
        """Deprecated since 0.3: use :meth:`serve`."""
        import warnings

        warnings.warn(
            "PipelineRuntime.infer is deprecated since mds 0.3 and goes in 0.4; use "
            "PipelineRuntime.serve",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.serve(request, timeout=timeout, priority=priority, trace=trace)

    async def _serve(
        self, request: Any, timeout: float | None, priority: int | None, trace: bool
    ) -> Any:
        for node, model in self.models.items():
            if not model.ready:
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
        runner: _Runner | None = self._start
        value = request
        while runner is not None:
            try:
                value, following = await runner.run(value, request, deadline, priority, traces)
            except MdsError as exc:
                exc.add_context(pipeline=self.name, node=runner.name)
                raise
            runner = following
        if traces is None:
            return value
        nodes = tuple(_shifted(t, began) for t in traces)
        return Traced(
            value=value,
            trace=PipelineTrace(
                pipeline=self.name,
                path=tuple(t.node for t in nodes),
                nodes=nodes,
                total_seconds=clock() - began,
            ),
        )

    def serve_sync(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: bool = False,
    ) -> Any:
        """Blocking form of :meth:`serve`, for threads with no event loop.

        Added in 0.3.
        """
        return self._home.call_sync(self._serve, request, timeout, priority, trace)

    async def stream(
        self, request: Any, *, timeout: float | None = None, priority: int | None = None
    ) -> AsyncIterator[Any]:
        """The whole response as one chunk (a pipeline does not stream).

        Added in 0.3.
        """
        yield await self.serve(request, timeout=timeout, priority=priority)

    def stream_sync(
        self, request: Any, *, timeout: float | None = None, priority: int | None = None
    ) -> Iterator[Any]:
        """Blocking form of :meth:`stream`.

        Added in 0.3.
        """
        yield self.serve_sync(request, timeout=timeout, priority=priority)

    # -- health -----------------------------------------------------------------

    async def health(self) -> PipelineHealth:
        """Readiness: every model node's, together.

        Added in 0.3 (before, the runtime's health only).
        """
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
