"""One served model: its lifecycle states and its request path."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc
import msgspec

from . import _logs, _loop, _tracing
from ._batching.batcher import Batcher
from ._batching.queue import batch_id
from ._batching.stats import BatchStats
from ._bridge import Home, LoopBound
from ._config import BatchingConfig, ModelConfig, check_name, queue_limits
from ._deprecation import renamed
from ._devices.device import DeviceInfo
from ._devices.manager import DeviceManager
from ._errors import ConfigError, InferenceError, LifecycleError, MdsError, NotReady
from ._handler import ModelHandler, ModelState, RequestT, ResponseT
from ._instances import Instances, Source, source_name, start_instances
from ._sequences import Ends, Sequences
from ._servable import Serving
from ._statistics import RequestCounts, counted, snapshot
from ._status import CallTrace, ModelHealth, ModelStatistics, Traced
from ._tensors import Signature

__all__ = ["ModelRuntime"]

logger = logging.getLogger("mds.model")

_RUNNING = (ModelState.LOADING, ModelState.WARMING, ModelState.READY, ModelState.DRAINING)


class ModelRuntime(LoopBound, Serving[RequestT, ResponseT, CallTrace, ModelHealth]):
    """Serves one model: its lifecycle, instances, batcher and statistics.

    Use it with ``async with`` (or ``with`` / :meth:`start_sync` from sync
    code): entering loads every instance (``init``), warms them up and makes
    the model ready; leaving drains in-flight requests and tears down. A
    :class:`Runtime` holds several of these by name.

    Args:
        handler: a handler object, or a zero-argument factory (such as the
            handler class) that makes one per instance. With more than one
            instance, pass a factory.
        config: serving policy; the defaults serve one instance on the CPU
            with no batching beyond what is queued.
        name: the model's name; defaults to the handler's class name.
        version: the model's version, given to the handler in its context.
        devices: the device manager that places the instances; defaults to
            :meth:`DeviceManager.default`.

    Raises:
        ConfigError: a bad name, or several instances with one handler object.

    Example:
        >>> async with mds.ModelRuntime(Doubler()) as model:
        ...     assert await model.serve(2.0) == 4.0

    Added in 0.1.
    """

    def __init__(
        self,
        handler: ModelHandler[RequestT, ResponseT]
        | Callable[[], ModelHandler[RequestT, ResponseT]],
        config: ModelConfig | None = None,
        *,
        name: str | None = None,
        version: str = "1",
        devices: DeviceManager | None = None,
    ) -> None:
        self.config: ModelConfig = config if config is not None else ModelConfig()
        self._devices = devices if devices is not None else DeviceManager.default()
        self._source: Source = handler
        self.name: str = check_name(name if name is not None else source_name(handler, self.config))
        self.version: str = version
        self._where = f"model {self.name!r}"  # for logs
        self._failures = _logs.Failures(logger, model=self.name, version=version)
        self._site = _tracing.site(f"mds.serve {self.name}", self.name, version)
        self._home = Home(self._refuse)
        self._state = ModelState.CREATED
        self._ready = False
        self._default_timeout = self.config.timeout
        self._failure: str | None = None
        self._loaded: Instances | None = None
        self._batcher: Batcher[Any] | None = None
        self._batchers: tuple[Batcher[Any], ...] = ()  # one, or one per instance (pinned)
        self._sequences: Sequences | None = None  # a stateful model's, while it runs
        self._sequence_ends: Ends | None = None  # its versions' (set by the runtime)
        self._tasks: anyio.abc.TaskGroup | None = None
        self._idle: anyio.Event | None = None
        self._counts = RequestCounts()
        self._batch_stats = BatchStats()
        self._clock = anyio.current_time
        self._watchers: list[Callable[[ModelState, str | None], None]] = []
        self._on_demand: Any = None  # the runtime's Residency, for a model loaded on demand
        # Set when a swap retires it: serves a request picked before the swap.
        self._successor: Callable[..., Awaitable[Any]] | None = None

    def __repr__(self) -> str:
        return f"<ModelRuntime {self.name!r} v{self.version} {self._state.value}>"

    @property
    def state(self) -> ModelState:
        """The model's lifecycle state."""
        return self._state

    @property
    def ready(self) -> bool:
        """Whether the model takes requests now: it is ``READY``, or loads on demand.

        Added in 0.3.
        """
        if self._on_demand is not None:
            return self._state is not ModelState.FAILED
        return self._ready

    @property
    def on_demand(self) -> bool:
        """Whether its first request loads it, and it may be unloaded when idle.

        See :meth:`Runtime.add_model`. Added in 0.4.
        """
        return self._on_demand is not None

    @property
    def failure(self) -> str | None:
        """Why the model is ``FAILED``; ``None`` in any other state."""
        return self._failure

    @property
    def versions(self) -> tuple[str, ...]:
        """The versions requests may name: this model's one.

        Added in 0.3.
        """
        return (self.version,)

    @property
    def platform(self) -> str:
        """The handler's ``platform`` (``"python"`` before the model has started).

        Added in 0.3.
        """
        loaded = self._loaded
        return loaded.platform if loaded is not None else "python"

    @property
    def queue_capacity(self) -> int:
        """The most requests that may wait in its queue at once (at any one priority level).

        Added in 0.3.
        """
        return max(queue_limits(self.config.batching))

    @property
    def stateful(self) -> bool:
        """Whether its requests are steps of sequences: ``config.sequences`` is set.

        Added in 0.5.
        """
        return self.config.sequences is not None

    @property
    def streams(self) -> bool:
        """Whether the handler's ``postprocess`` yields: see :meth:`stream`.

        Known once the model has started; ``False`` before.
        """
        loaded = self._loaded
        return loaded is not None and loaded.steps.streams

    def signature(self) -> Signature | None:
        """What the handler's :meth:`~ModelHandler.signature` said when it started.

        Added in 0.3.
        """
        loaded = self._loaded
        return loaded.signature if loaded is not None else None

    def from_tensors(self, tensors: dict[str, Any]) -> Any:
        """The handler's :meth:`~ModelHandler.from_tensors`; the model must be running.

        Added in 0.3.
        """
        loaded = self._loaded
        if loaded is None:
            raise self._refuse()
        return loaded.handler.from_tensors(tensors)

    def to_tensors(self, response: Any) -> Any:
        """The handler's :meth:`~ModelHandler.to_tensors`; the model must be running.

        Added in 0.3.
        """
        loaded = self._loaded
        if loaded is None:
            raise self._refuse()
        return loaded.handler.to_tensors(response)

    def choose(self) -> Self:
        """Itself: see :meth:`Servable.choose`.

        Added in 0.4.
        """
        return self

    def add_context(self, error: MdsError) -> MdsError:
        """``error``, with this model and version in its context.

        Added in 0.3.
        """
        return error.add_context(model=self.name, version=self.version)

    # -- lifecycle ----------------------------------------------------------

    def _set_state(self, state: ModelState, reason: str | None = None) -> None:
        previous, self._state = self._state, state
        self._ready = state is ModelState.READY
        self._failure = reason if state is ModelState.FAILED else None
        extra = _logs.fields(self.name, self.version)
        if state is ModelState.FAILED:
            logger.error("%s: %s -> failed: %s", self._where, previous.value, reason, extra=extra)
        else:
            logger.info("%s: %s -> %s", self._where, previous.value, state.value, extra=extra)
        for watch in self._watchers:
            watch(state, reason)

    async def __aenter__(self) -> Self:
        if self._state in _RUNNING:
            raise LifecycleError(
                f"it is already {self._state.value}", model=self.name, version=self.version
            )
        self._set_state(ModelState.LOADING)
        await self._home.open()
        try:
            loaded = await start_instances(
                name=self.name,
                version=self.version,
                config=self.config,
                source=self._source,
                devices=self._devices,
                report=self._set_state,
            )
            tasks = anyio.create_task_group()
            await tasks.__aenter__()
        except BaseException:
            await self._home.close()
            raise
        self._loaded = loaded
        self._counts.init_seconds = loaded.init_seconds
        self._counts.warmup_seconds = loaded.warmup_seconds
        self._tasks = tasks
        self._clock = _loop.clock()
        _tracing.refresh()
        sequencing = self.config.sequences
        pinned = sequencing is not None and sequencing.pinned
        batching, stats = self.config.batching, self._batch_stats
        batchers: list[Batcher[Any]] = [
            Batcher(batching, stats=stats, model=self.name, version=self.version)
            for _ in (loaded.instances if pinned else (None,))
        ]
        self._batcher, self._batchers = batchers[0], tuple(batchers)
        for index, instance in enumerate(loaded.instances):
            tasks.start_soon(batchers[index if pinned else 0].serve, instance)
        for batcher in batchers:
            tasks.start_soon(batcher.watch_deadlines)
        if sequencing is not None:
            made = (sequencing, batchers, loaded.instances, tasks, self._counts, self._where)
            self._sequences = Sequences(*made, ended=self._sequence_ends)
        self._set_state(ModelState.READY)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tasks, self._tasks = self._tasks, None
        if tasks is None:
            return
        try:
            self._set_state(ModelState.DRAINING)
            until = self._clock() + self.config.drain_timeout  # sequences and requests alike
            if exc_type is None and self._sequences is not None:
                await self._sequences.drain(until)
            if exc_type is None and self._counts.in_flight:
                self._idle = anyio.Event()
                with _loop.move_on_at(until, self._clock()):
                    await self._idle.wait()
        finally:
            await self._shut_down(tasks)

    async def _shut_down(self, tasks: anyio.abc.TaskGroup) -> None:
        """Answer whatever is left, stop the workers, tear the instances down."""
        loaded, sequences = self._loaded, self._sequences
        assert loaded is not None
        batchers = self._batchers
        for batcher in batchers:
            batcher.close()
        self._failures.flush()
        if self._counts.in_flight:
            logger.warning(
                "%s: stopping with %d requests unanswered; they get an error",
                self._where,
                self._counts.in_flight,
                extra=_logs.fields(self.name, self.version),
            )
        for batcher in batchers:
            batcher.fail_queued("the model stopped before this request was computed")
        tasks.cancel_scope.cancel()
        try:
            await tasks.__aexit__(None, None, None)
        finally:
            try:
                if sequences is not None:
                    await sequences.close()
                    self._sequences = None
                await loaded.stop()
                self._loaded = None
                self._set_state(ModelState.STOPPED)
            finally:
                await self._home.close()

    def _refuse(self) -> NotReady:
        """The error for a request the model cannot take now (counted)."""
        self._counts.refused(error := self._not_ready())
        return error

    def _not_ready(self) -> NotReady:
        """That error, not counted: a request waiting on an on-demand load counts its own."""
        return NotReady(
            f"not ready: {self._not_ready_reason()}", model=self.name, version=self.version
        )

    def _not_ready_reason(self) -> str:
        state = self._state
        if state is ModelState.FAILED:
            return f"it is failed: {self._failure}"
        if state in (ModelState.CREATED, ModelState.STOPPED):
            return f"it is {state.value}; start it before sending requests"
        return f"it is {state.value}"

    # -- requests -----------------------------------------------------------

    infer = renamed(Serving.serve, old="infer", owner="ModelRuntime")
    infer_sync = renamed(Serving.serve_sync, old="infer_sync", owner="ModelRuntime")

    async def _serve(
        self,
        request: Any,
        timeout: float | None,
        priority: int | None,
        trace: bool,
        stream: bool,
        span: _tracing.RequestSpan | None = None,
    ) -> Any:
        """The per-request path, in the model's loop; ``stream`` gives the chunks.

        Kept flat, since each call and await costs about as much here as the
        queue itself (benchmarks/batcher.py). While tracing, it runs inside
        :meth:`_spanned`, which gives ``span``.
        """
        tracer = _tracing.active
        if tracer is not None and span is None:
            return await self._spanned(tracer, request, timeout, priority, trace, stream)
        batcher, loaded, counts = self._batcher, self._loaded, self._counts
        if timeout is None:
            timeout = self._default_timeout
        if self._on_demand is not None and self._successor is None:
            try:
                batcher, loaded, timeout = await self._woken(timeout)
            except MdsError as exc:
                successor = self._retired()  # swapped out while it loaded
                if successor is None or not isinstance(exc, NotReady):
                    counts.refused(exc)
                    raise
                return await successor(request, timeout, priority, trace, stream)
        elif not self._ready or batcher is None or loaded is None:
            drains = self._sequences is not None and self._sequences.draining()
            if self._successor is not None and not drains:  # picked before a swap retired it
                return await self._successor(request, timeout, priority, trace, stream)
            if not drains or batcher is None or loaded is None:
                raise self._refuse()
        steps, sequences = loaded.steps, self._sequences
        counts.requests += 1
        item = step = None
        try:
            step = sequences.admit() if sequences is not None else None
            began = self._clock()
            deadline = None if timeout is None else began + timeout
            if steps.pre is None and steps.pre_plain is None:
                value = request
                now: float | None = began  # still "now"
                preprocessed = began
            elif steps.pre is None:  # a check, on the loop: time passed
                value = steps.preprocess_plain(request)
                now = preprocessed = self._clock()
                counts.preprocess.observe(preprocessed - began)
            else:
                value = await steps.preprocess(request, deadline)
                now = preprocessed = self._clock()
                counts.preprocess.observe(preprocessed - began)
            cost, key, length = steps.describe(value) if steps.describes else (1, None, None)
            if step is None or sequences is None:
                item = batcher.enqueue(value, deadline, priority, cost, key, length, now)
            elif step._turn is None:  # its turn already: no wait, no coroutine
                item = sequences.put(step, value, deadline, priority, cost, key, length)
            else:
                item = await sequences.enqueue(step, value, deadline, priority, cost, key, length)
            if span is not None:
                span.item = item
                item.span = span
            try:
                outcome = await item.waiter
            except BaseException:
                (sequences or batcher).abandon(item)
                raise
            if isinstance(outcome, BaseException):
                raise outcome
            computed = self._clock()
            if stream:
                # Still in flight (so a drain waits for it) until the stream ends.
                return counted(
                    steps.chunks(outcome, deadline), counts, self._ended, self._clock, began
                )
            if steps.post is None:
                response = outcome
                ended = computed
            else:
                response = await steps.postprocess(outcome, deadline)
                ended = self._clock()
                counts.postprocess.observe(ended - computed)
            counts.completed += 1
            counts.request.observe(ended - began)
        except anyio.get_cancelled_exc_class() as exc:
            counts.cancelled += 1
            if step is not None:
                step._release(exc)
            raise
        except Exception as exc:
            counts.failure(exc)
            if step is not None:
                step._release(exc)
            if isinstance(exc, MdsError):
                exc.add_context(model=self.name, version=self.version)
                if isinstance(exc, InferenceError):
                    self._failures.report(exc, batch_id(item))
            raise
        finally:
            if self._idle is not None and not counts.in_flight:
                self._idle.set()
        if not trace:
            return response
        return Traced(
            value=response,
            trace=item.trace(self.name, self.version, began, preprocessed, computed, ended),
        )

    def _spanned(self, tracer: Any, *call: Any) -> Awaitable[Any]:
        """:meth:`_serve` in a request span of its own (see ``mds._tracing``)."""
        steps = self._loaded.steps if self._loaded is not None else None
        pre = steps is not None and (steps.pre or steps.pre_plain) is not None
        post = steps is not None and steps.post is not None
        return _tracing.serve_in_span(tracer, self._serve, call, self._site, self._clock, pre, post)

    async def _serve_many(
        self, requests: list[Any], timeout: float | None, priority: int | None
    ) -> list[Any]:
        """Several requests at once: queued together, then awaited in order.

        Where ``preprocess`` is instant (none, or mds's own check) and
        ``postprocess`` runs on the loop, this takes no task and no coroutine
        per request, only its place in the queue (batch jobs serve through
        it). Otherwise each request is served as by :meth:`serve`, concurrently.
        """
        batcher, loaded, counts = self._batcher, self._loaded, self._counts
        if not self._ready and self._successor is not None:
            return await super()._serve_many(requests, timeout, priority)  # each forwarded
        if self._on_demand is not None:
            try:
                batcher, loaded, timeout = await self._woken(
                    self._default_timeout if timeout is None else timeout
                )
            except MdsError as exc:
                for _ in requests:
                    counts.refused(exc)
                return [exc for _ in requests]
        elif not self._ready or batcher is None or loaded is None:
            return [self._refuse() for _ in requests]
        steps = loaded.steps
        if steps.pre is not None or steps.streams or steps.post_in_thread or self._sequences:
            return await super()._serve_many(requests, timeout, priority)
        if timeout is None:
            timeout = self._default_timeout
        outcomes: list[Any] = [None] * len(requests)
        items: list[Any] = [None] * len(requests)
        counts.requests += len(requests)
        clock = self._clock
        began = clock()
        deadline = None if timeout is None else began + timeout
        plain, describes = steps.pre_plain is not None, steps.describes
        for index, request in enumerate(requests):
            try:
                value = steps.preprocess_plain(request) if plain else request
                if describes:
                    cost, key, length = steps.describe(value)
                    items[index] = batcher.enqueue(value, deadline, priority, cost, key, length)
                else:
                    items[index] = batcher.enqueue(value, deadline, priority, 1, None, None, began)
            except MdsError as exc:
                outcomes[index] = self._failed(exc)
        waiting = 0
        try:
            for index, item in enumerate(items):
                waiting = index
                if item is None:
                    continue
                outcome = await item.waiter
                if isinstance(outcome, BaseException):
                    if not isinstance(outcome, MdsError):
                        raise outcome
                    outcomes[index] = self._failed(outcome, item)
                    continue
                if steps.post is not None:
                    computed = clock()
                    try:
                        outcome = await steps.postprocess(outcome, deadline)
                    except MdsError as exc:
                        outcomes[index] = self._failed(exc, item)
                        continue
                    ended = clock()
                    counts.postprocess.observe(ended - computed)
                else:
                    ended = clock()
                counts.completed += 1
                counts.request.observe(ended - began)
                outcomes[index] = outcome
        except BaseException:
            left = [item for item in items[waiting:] if item is not None]
            for item in left:
                batcher.abandon(item)
            counts.cancelled += len(left)
            raise
        finally:
            if self._idle is not None and not counts.in_flight:
                self._idle.set()
        return outcomes

    async def _woken(self, timeout: float | None) -> tuple[Batcher[Any], Instances, float | None]:
        """A model loaded on demand: its batcher and instances (loaded first if need be).

        With what is left of ``timeout``, which covers the load.
        """
        residency = self._on_demand
        if self._ready:
            residency.touch(self)
        else:
            timeout = await residency.wake(self, timeout)
        batcher, loaded = self._batcher, self._loaded
        if not self._ready or batcher is None or loaded is None:
            raise self._not_ready()
        return batcher, loaded, timeout

    def _retired(self) -> Callable[..., Awaitable[Any]] | None:
        """What serves the requests picked before a swap retired this model, if it did."""
        return self._successor

    def _failed(self, exc: MdsError, item: Any = None) -> MdsError:
        """``exc``, counted as a request's failure, with this model in its context."""
        self._counts.failure(exc)
        exc.add_context(model=self.name, version=self.version)
        if isinstance(exc, InferenceError):
            self._failures.report(exc, batch_id(item))
        return exc

    def _ended(self, exc: BaseException | None) -> None:
        """A stream ended (``exc``: how it failed): context for its error; a drain may end."""
        if isinstance(exc, MdsError):
            exc.add_context(model=self.name, version=self.version)
            if isinstance(exc, InferenceError):
                self._failures.report(exc)
        if self._idle is not None and not self._counts.in_flight:
            self._idle.set()

    def set_batching(self, batching: BatchingConfig) -> None:
        """Change how requests are batched, from the batch being formed on.

        All but ``priority_levels`` may change while the model runs, from any
        thread; a batch waiting to grow is formed anew. ``config`` follows.

        Raises:
            ConfigError: the new settings conflict with the model's config
                (such as its warm-up sizes), or change the priority levels of
                a running model.
        """
        config = msgspec.structs.replace(self.config, batching=batching)
        try:
            for batcher in self._batchers:
                batcher.check(batching)
        except ConfigError as exc:
            raise exc.add_context(model=self.name, version=self.version) from None
        self.config = config
        for batcher in self._batchers:  # at home, where the batcher's feeders wait
            self._home.soon(batcher.configure, batching)
        logger.info("%s: batching is now %s", self._where, batching)

    # -- what callers can read ----------------------------------------------

    async def _health(self) -> ModelHealth:
        loaded = self._loaded
        devices: tuple[DeviceInfo, ...] = ()
        if self._on_demand is not None and self._state in (ModelState.CREATED, ModelState.STOPPED):
            reason: str | None = None  # not loaded: its first request loads it
        elif self._state is not ModelState.READY or loaded is None:
            reason = self._not_ready_reason()
        else:
            problems, devices = await loaded.check(self.config.health_timeout, self._devices)
            reason = "; ".join(problems) if problems else None
        return ModelHealth(
            name=self.name,
            version=self.version,
            state=self._state,
            ready=reason is None,
            reason=reason,
            devices=devices,
        )

    def statistics(self) -> ModelStatistics:
        """A snapshot of this model's counters."""
        return snapshot(
            name=self.name,
            version=self.version,
            state=self._state,
            config=self.config,
            counts=self._counts,
            batches=self._batch_stats,
            batchers=self._batchers,
            sequences=self._sequences.live if self._sequences is not None else 0,
            devices=tuple(i.device.name for i in loaded.instances)
            if (loaded := self._loaded) is not None
            else (),
        )
