"""Serving a pipeline: each request walks the graph, node by node, in process."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, overload

import anyio

from .._batching import fast
from .._calls import is_async
from .._errors import DeadlineExceeded, InferenceError, InvalidInput, MdsError, NotReady
from .._model import ModelRuntime
from .._status import NodeTrace, PipelineHealth, PipelineTrace, Traced
from .graph import Node, Pipeline

__all__ = ["PipelineRuntime"]

logger = logging.getLogger(__name__)


def _renamed(exc: MdsError, where: str) -> MdsError:
    """The same kind of error, its message led by the pipeline and node."""
    try:
        error = type(exc)(f"{where}: {exc}")
    except Exception:  # pragma: no cover - an error class with its own signature
        return exc
    error.__cause__ = exc
    return error


class _Step:
    """A compiled node. ``run`` returns the value and the step that follows."""

    next: _Step | None = None

    def __init__(self, pipeline: str, node: Node) -> None:
        self.name = node.name
        self.kind = node.kind
        self.where = f"pipeline {pipeline!r}, node {node.name!r}"

    async def run(
        self,
        value: Any,
        request: Any,
        deadline: float | None,
        priority: int | None,
        traces: list[NodeTrace] | None,
    ) -> tuple[Any, _Step | None]:
        raise NotImplementedError

    def _late(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"{self.where}: the pipeline's deadline passed before this node")


class _ModelStep(_Step):
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
    ) -> tuple[Any, _Step | None]:
        model = self.model
        clock = fast.clock()
        began = clock()
        timeout = None
        if deadline is not None:
            timeout = deadline - began
            if timeout <= 0:
                raise self._late()
            own = model._default_timeout
            if own is not None and own < timeout:
                timeout = own
        try:
            if traces is None:
                return await model.infer(value, timeout=timeout, priority=priority), self.next
            traced = await model.infer(value, timeout=timeout, priority=priority, trace=True)
        except MdsError as exc:
            raise _renamed(exc, self.where) from exc
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


class _FunctionStep(_Step):
    def __init__(self, pipeline: str, node: Node) -> None:
        super().__init__(pipeline, node)
        fn = node.fn
        assert fn is not None
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
    ) -> tuple[Any, _Step | None]:
        clock = fast.clock()
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
        except MdsError as exc:
            raise _renamed(exc, self.where) from exc
        except Exception as exc:
            logger.exception("%s failed", self.where)
            raise InferenceError(f"{self.where}: {type(exc).__name__}: {exc}") from exc
        raise DeadlineExceeded(f"{self.where}: the pipeline's deadline passed in this function")


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


class _RouterStep(_Step):
    def __init__(self, pipeline: str, node: Node) -> None:
        super().__init__(pipeline, node)
        on = node.on
        self._fn: Callable[[Any, Any], Any] | None = None
        if isinstance(on, str):
            source, _, rest = on.partition(".")
            self._from_request = source == "request"
            self._path = rest.split(".") if rest else []
        else:
            assert on is not None
            self._fn = on
        self.on = on if isinstance(on, str) else getattr(on, "__qualname__", repr(on))
        self.routes: dict[str, _Step] = {}
        self.default: _Step | None = None

    async def run(
        self,
        value: Any,
        request: Any,
        deadline: float | None,
        priority: int | None,
        traces: list[NodeTrace] | None,
    ) -> tuple[Any, _Step | None]:
        began = fast.clock()() if traces is not None else 0.0
        if self._fn is not None:
            try:
                key = self._fn(value, request)
            except MdsError as exc:
                raise _renamed(exc, self.where) from exc
            except Exception as exc:
                raise InvalidInput(
                    f"{self.where}: the router's function failed: {type(exc).__name__}: {exc}"
                ) from exc
        else:
            key = _read(request if self._from_request else value, self._path)
        target = self.routes.get(str(key)) if key is not _MISSING else None
        if target is None:
            target = self.default
            if target is None:
                got = f"no value at {self.on}" if key is _MISSING else f"{self.on} is {key!r}"
                raise InvalidInput(
                    f"{self.where}: no route for this request ({got}); routes: "
                    + ", ".join(repr(k) for k in self.routes)
                )
        if traces is not None:
            traces.append(
                NodeTrace(
                    node=self.name,
                    kind="router",
                    started=began,
                    seconds=fast.clock()() - began,
                    route=None if key is _MISSING else str(key),
                )
            )
        return value, target


class _FanOutStep(_Step):
    def __init__(self, pipeline: str, node: Node) -> None:
        super().__init__(pipeline, node)
        self.branches: list[_Step] = []
        self._join = node.join

    async def run(
        self,
        value: Any,
        request: Any,
        deadline: float | None,
        priority: int | None,
        traces: list[NodeTrace] | None,
    ) -> tuple[Any, _Step | None]:
        clock = fast.clock()
        began = clock()
        outputs: dict[str, Any] = {}
        nested: dict[str, list[NodeTrace]] = {}
        failure: list[BaseException] = []

        async def branch(step: _Step, scope: anyio.CancelScope) -> None:
            mine: list[NodeTrace] | None = [] if traces is not None else None
            try:
                outputs[step.name], _ = await step.run(value, request, deadline, priority, mine)
            except Exception as exc:
                if not failure:
                    failure.append(exc)
                scope.cancel()  # the other branches are no use now
            if mine is not None:
                nested[step.name] = mine

        async with anyio.create_task_group() as tasks:
            for step in self.branches:
                tasks.start_soon(branch, step, tasks.cancel_scope)
        if failure:
            raise failure[0]
        if len(outputs) != len(self.branches):  # pragma: no cover - cancelled from outside
            raise anyio.get_cancelled_exc_class()()
        ordered = {step.name: outputs[step.name] for step in self.branches}
        if self._join is None:
            result: Any = ordered
        else:
            try:
                result = self._join(ordered)
            except MdsError as exc:
                raise _renamed(exc, self.where) from exc
            except Exception as exc:
                logger.exception("%s: join failed", self.where)
                raise InferenceError(
                    f"{self.where}: the join failed: {type(exc).__name__}: {exc}"
                ) from exc
        if traces is not None:
            branch_traces = tuple(t for step in self.branches for t in nested.get(step.name, []))
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
    :meth:`Runtime.serve` or :meth:`infer`. Model nodes are the runtime's
    models (``<pipeline>.<node>``, or the model a node names), so they start,
    stop and report with the runtime.

    Added in 0.2.
    """

    def __init__(self, pipeline: Pipeline, models: Mapping[str, ModelRuntime[Any, Any]]) -> None:
        self.pipeline = pipeline
        self.name = pipeline.name
        self.timeout = pipeline.timeout
        #: The model serving each model node, by node name.
        self.models: dict[str, ModelRuntime[Any, Any]] = dict(models)
        steps: dict[str, _Step] = {}
        reachable = pipeline.reachable()
        for name, node in pipeline.nodes.items():
            if name not in reachable:
                continue  # never runs: not compiled (nor loaded)
            if node.kind == "model":
                steps[name] = _ModelStep(self.name, node, self.models[name])
            elif node.kind == "function":
                steps[name] = _FunctionStep(self.name, node)
            elif node.kind == "router":
                steps[name] = _RouterStep(self.name, node)
            else:
                steps[name] = _FanOutStep(self.name, node)
        for name, step in steps.items():
            node = pipeline.nodes[name]
            step.next = steps[node.next] if node.next is not None else None
            if isinstance(step, _RouterStep):
                step.routes = {key: steps[target] for key, target in node.routes.items()}
                step.default = steps[node.default] if node.default is not None else None
            elif isinstance(step, _FanOutStep):
                step.branches = [steps[branch] for branch in node.branches]
        self._start = steps[pipeline.start]
        self._ready_models = list(self.models.items())

    def __repr__(self) -> str:
        return f"<PipelineRuntime {self.name!r} nodes={list(self.pipeline.nodes)}>"

    @overload
    async def infer(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: Literal[False] = False,
    ) -> Any: ...

    @overload
    async def infer(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: Literal[True],
    ) -> Traced[Any, PipelineTrace]: ...

    @overload
    async def infer(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: bool,
    ) -> Any: ...

    async def infer(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: bool = False,
    ) -> Any:
        """Serve one request through the pipeline; call it on the runtime's loop.

        Args:
            request: the first node's input.
            timeout: a deadline in seconds from now for the whole call;
                defaults to the pipeline's ``timeout``. Each model node's
                own ``timeout`` still bounds that node.
            priority: the priority level at every model node.
            trace: return a :class:`Traced` with a :class:`PipelineTrace`.

        Raises:
            NotReady: a model node is not ready; the message names it.
            MdsError: a node's error, of the same class, its message led by
                ``pipeline '<name>', node '<node>'``.
        """
        for name, model in self._ready_models:
            if not model._ready:
                raise NotReady(
                    f"pipeline {self.name!r} is not ready: node {name!r} "
                    f"(model {model.name!r}) is {model.state.value}"
                )
        clock = fast.clock()
        began = clock()
        if timeout is None:
            timeout = self.timeout
        deadline = None if timeout is None else began + timeout
        traces: list[NodeTrace] | None = [] if trace else None
        step: _Step | None = self._start
        value = request
        while step is not None:
            value, step = await step.run(value, request, deadline, priority, traces)
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

    def health(self, reports: Mapping[str, Any]) -> PipelineHealth:
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
