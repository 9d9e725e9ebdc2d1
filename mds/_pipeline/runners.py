"""A pipeline's nodes compiled for serving: each runs its part of a request."""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio

from .. import _logs, _loop, _tracing
from .._batching.stats import Buckets
from .._errors import DeadlineExceeded, InferenceError, InvalidInput, MdsError, describe
from .._status import NodeStatistics, NodeTrace
from .._threads import is_async
from .._versions import ModelVersions
from .nodes import FanOutNode, FunctionNode, ModelNode, Node, RouterNode

__all__ = ["compile_nodes"]

logger = logging.getLogger("mds.pipeline")


class Runner:
    """A node, compiled. ``run`` returns the value and the runner that follows.

    Callers go through :meth:`call`, which counts (and, while tracing, makes
    the node's span). ``failures`` logs the failures of user code (the
    pipeline's, shared by its nodes).
    """

    next: Runner | None = None
    failures: _logs.Failures  # set by compile_nodes

    def __init__(self, pipeline: str, node: Node) -> None:
        self.name = node.name
        self.kind = node.kind
        self.pipeline = pipeline
        self.calls = self.failed = 0
        self.seconds = Buckets()
        self._span = f"mds.node {node.name}"
        self._span_attributes = {
            "mds.pipeline.name": pipeline,
            "mds.node.name": node.name,
            "mds.node.kind": node.kind,
        }

    async def call(
        self,
        value: Any,
        request: Any,
        deadline: float | None,
        priority: int | None,
        traces: list[NodeTrace] | None,
    ) -> tuple[Any, Runner | None]:
        """:meth:`run`, counted and timed."""
        clock = _loop.clock()
        began = clock()
        self.calls += 1
        try:
            with _tracing.spanned(_tracing.active, self._span, self._span_attributes):
                return await self.run(value, request, deadline, priority, traces)
        except Exception:
            self.failed += 1
            raise
        finally:
            self.seconds.observe(clock() - began)

    def statistics(self) -> NodeStatistics:
        return NodeStatistics(
            node=self.name,
            kind=self.kind,
            calls=self.calls,
            failed=self.failed,
            seconds=self.seconds.snapshot(),
        )

    async def run(
        self,
        value: Any,
        request: Any,
        deadline: float | None,
        priority: int | None,
        traces: list[NodeTrace] | None,
    ) -> tuple[Any, Runner | None]:
        raise NotImplementedError

    def _late(self) -> DeadlineExceeded:
        return DeadlineExceeded("the pipeline's deadline passed before this node")


class _ModelRunner(Runner):
    def __init__(self, pipeline: str, node: Node, model: ModelVersions) -> None:
        super().__init__(pipeline, node)
        self.model = model

    async def run(
        self,
        value: Any,
        request: Any,
        deadline: float | None,
        priority: int | None,
        traces: list[NodeTrace] | None,
    ) -> tuple[Any, Runner | None]:
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


class _FunctionRunner(Runner):
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
    ) -> tuple[Any, Runner | None]:
        clock = _loop.clock()
        began = clock()
        fn = self._fn
        call = functools.partial(fn, value, request=request) if self._wants_request else None
        try:
            with _loop.move_on_at(deadline if deadline is not None else math.inf, clock()):
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
            error = InferenceError(describe(exc), pipeline=self.pipeline, node=self.name)
            error.__cause__ = exc
            self.failures.report(error)
            raise error from exc
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


class _RouterRunner(Runner):
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
        self.routes: dict[str, Runner] = {}
        self.default: Runner | None = None

    async def run(
        self,
        value: Any,
        request: Any,
        deadline: float | None,
        priority: int | None,
        traces: list[NodeTrace] | None,
    ) -> tuple[Any, Runner | None]:
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


class _FanOutRunner(Runner):
    def __init__(self, pipeline: str, node: FanOutNode) -> None:
        super().__init__(pipeline, node)
        self.branches: list[Runner] = []
        self._join = node.join

    async def run(
        self,
        value: Any,
        request: Any,
        deadline: float | None,
        priority: int | None,
        traces: list[NodeTrace] | None,
    ) -> tuple[Any, Runner | None]:
        clock = _loop.clock()
        began = clock()
        outputs: dict[str, Any] = {}
        nested: dict[str, list[NodeTrace]] = {}
        failure: list[BaseException] = []

        async def branch(runner: Runner, scope: anyio.CancelScope) -> None:
            mine: list[NodeTrace] | None = [] if traces is not None else None
            try:
                outputs[runner.name], _ = await runner.call(
                    value, request, deadline, priority, mine
                )
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
                error = InferenceError(
                    f"the join failed: {describe(exc)}", pipeline=self.pipeline, node=self.name
                )
                error.__cause__ = exc
                self.failures.report(error)
                raise error from exc
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


def compile_nodes(
    pipeline: str,
    nodes: Mapping[str, Node],
    reachable: set[str],
    models: Mapping[str, ModelVersions],
) -> dict[str, Runner]:
    """A runner for each node a call can reach, linked to those that follow it."""
    runners: dict[str, Runner] = {}
    failures = _logs.Failures(logger, pipeline=pipeline)  # one rate limit per pipeline
    for name, node in nodes.items():
        if name not in reachable:
            continue  # never runs: not compiled (nor loaded)
        if isinstance(node, ModelNode):
            runners[name] = _ModelRunner(pipeline, node, models[name])
        elif isinstance(node, FunctionNode):
            runners[name] = _FunctionRunner(pipeline, node)
        elif isinstance(node, RouterNode):
            runners[name] = _RouterRunner(pipeline, node)
        elif isinstance(node, FanOutNode):
            runners[name] = _FanOutRunner(pipeline, node)
    for name, runner in runners.items():
        runner.failures = failures
        node = nodes[name]
        runner.next = runners[node.next] if node.next is not None else None
        if isinstance(runner, _RouterRunner) and isinstance(node, RouterNode):
            runner.routes = {key: runners[target] for key, target in node.routes.items()}
            runner.default = runners[node.default] if node.default is not None else None
        elif isinstance(runner, _FanOutRunner):
            runner.branches = [runners[branch] for branch in node.children()]
    return runners
