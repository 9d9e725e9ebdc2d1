"""One served model: its instances, its batcher, its lifecycle and its numbers."""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import threading
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator, Sequence
from types import TracebackType
from typing import Any, Generic, Literal, Self, cast, overload

import anyio
import anyio.abc
import msgspec

from ._batching import fast
from ._batching.batcher import Batcher, BatchStats
from ._config import BatchingConfig, ModelConfig
from ._devices.device import Device, DeviceInfo
from ._devices.manager import DeviceManager, Placer
from ._errors import ConfigError, DeviceError, LifecycleError, MdsError, NotReady, Overloaded
from ._handler import ModelContext, ModelHandler, ModelState, RequestT, ResponseT
from ._instance import Instance
from ._status import CallTrace, ModelHealth, ModelStatistics, Traced
from ._steps import Steps
from ._sync import LoopBound

__all__ = ["ModelRuntime", "check_name"]

logger = logging.getLogger(__name__)

_get_ident = threading.get_ident

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RUNNING = (ModelState.LOADING, ModelState.WARMING, ModelState.READY, ModelState.DRAINING)


def check_name(name: str, what: str = "model") -> str:
    if not _NAME.match(name):
        raise ConfigError(
            f"{what} name {name!r} is not allowed: use letters, digits, '_', '.' "
            "and '-', starting with a letter or digit"
        )
    return name


class _Counts:
    """Mutable per-request counters behind :class:`ModelStatistics`."""

    def __init__(self) -> None:
        self.requests = self.completed = self.failed = self.cancelled = 0
        self.not_ready = self.overloaded = 0
        self.init_seconds = self.warmup_seconds = 0.0
        self.errors: Counter[str] = Counter()


class ModelRuntime(LoopBound, Generic[RequestT, ResponseT]):
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
        ...     assert await model.infer(2.0) == 4.0

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
        if isinstance(handler, ModelHandler):
            if self.config.instances > 1:
                raise ConfigError(
                    f"{self.config.instances} instances need one handler each: pass "
                    f"the handler class (or a factory) instead of a "
                    f"{type(handler).__name__} object"
                )
            default_name = type(handler).__name__
        elif callable(handler):
            default_name = getattr(handler, "__name__", type(handler).__name__)
            if not _NAME.match(default_name):  # a lambda, say
                default_name = "model"
        else:
            raise ConfigError(
                f"handler must be a ModelHandler or a factory that makes one, "
                f"not {type(handler).__name__}"
            )
        self._source = handler
        self.name: str = check_name(name if name is not None else default_name)
        self.version: str = version
        self._where = f"model {self.name!r}"
        self._state = ModelState.CREATED
        self._ready = False
        self._default_timeout = self.config.timeout
        self._failure: str | None = None
        self._instances: list[Instance] = []
        self._batcher: Batcher[Instance] | None = None
        self._steps: Steps | None = None
        self._tasks: anyio.abc.TaskGroup | None = None
        self._idle: anyio.Event | None = None
        self._counts = _Counts()
        self._batch_stats = BatchStats()
        self._clock = anyio.current_time
        self._watchers: list[Callable[[ModelState, str | None], None]] = []

    def __repr__(self) -> str:
        return f"<ModelRuntime {self.name!r} v{self.version} {self._state.value}>"

    @property
    def state(self) -> ModelState:
        """The model's lifecycle state."""
        return self._state

    @property
    def failure(self) -> str | None:
        """Why the model is ``FAILED``; ``None`` in any other state."""
        return self._failure

    # -- lifecycle ----------------------------------------------------------

    def _set_state(self, state: ModelState, reason: str | None = None) -> None:
        previous, self._state = self._state, state
        self._ready = state is ModelState.READY
        self._failure = reason if state is ModelState.FAILED else None
        if state is ModelState.FAILED:
            logger.error("%s: %s -> failed: %s", self._where, previous.value, reason)
        else:
            logger.info("%s: %s -> %s", self._where, previous.value, state.value)
        for watch in self._watchers:
            watch(state, reason)

    async def __aenter__(self) -> Self:
        if self._state in _RUNNING:
            raise LifecycleError(f"{self._where} is already {self._state.value}")
        self._set_state(ModelState.LOADING)
        await self._open_bridge()
        try:
            await self._load()
            tasks = anyio.create_task_group()
            await tasks.__aenter__()
        except BaseException:
            await self._close_bridge()
            raise
        self._tasks = tasks
        self._clock = fast.clock()
        batcher: Batcher[Instance] = Batcher(
            self.config.batching, where=self._where, stats=self._batch_stats
        )
        self._batcher = batcher
        for instance in self._instances:
            tasks.start_soon(batcher.serve, instance)
        tasks.start_soon(batcher.watch_deadlines)
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
            if exc_type is None and self._in_flight:
                self._idle = anyio.Event()
                with anyio.move_on_after(self.config.drain_timeout):
                    await self._idle.wait()
        finally:
            await self._shut_down(tasks)

    async def _shut_down(self, tasks: anyio.abc.TaskGroup) -> None:
        """Answer whatever is left, stop the workers, tear the instances down."""
        assert self._batcher is not None
        self._batcher.close()
        if self._in_flight:
            logger.warning(
                "%s: stopping with %d requests unanswered; they get an error",
                self._where,
                self._in_flight,
            )
        self._batcher.fail_queued("the model stopped before this request was computed")
        tasks.cancel_scope.cancel()
        try:
            await tasks.__aexit__(None, None, None)
        finally:
            try:
                with anyio.CancelScope(shield=True):
                    await self._teardown(self._instances)
                self._release(self._instances)
                self._instances = []
                self._set_state(ModelState.STOPPED)
            finally:
                await self._close_bridge()

    async def _load(self) -> None:
        """Place, create, init and warm up every instance; FAILED with the cause if not."""
        started: list[Instance] = []
        instances: list[Instance] = []
        step = "placing instances"
        self._shared_threads = fast.threads(self.config.worker_threads, f"mds-{self.name}")
        try:
            # Device discovery may import torch or talk to a driver: off the loop.
            placer = await anyio.to_thread.run_sync(
                functools.partial(self._devices.placer, self.config, where=self._where)
            )
            began = anyio.current_time()
            if placer.sequential:
                # Memory placement by measurement: each instance is placed
                # after the previous one has loaded, against fresh free memory.
                step = "init"
                for index in range(self.config.instances):
                    device = await anyio.to_thread.run_sync(placer.next)
                    instances.append(self._make_instance(index, device, placer))
                    await self._on_each(instances[-1:], self._init_one, started)
                    await anyio.to_thread.run_sync(placer.initialised, device)
                self._steps = Steps(instances[0].handler, self._where, self._shared_threads)
            else:
                devices = await anyio.to_thread.run_sync(placer.place_all)
                for index, device in enumerate(devices):
                    instances.append(self._make_instance(index, device, placer))
                self._steps = Steps(instances[0].handler, self._where, self._shared_threads)
                step = "init"
                await self._on_each(instances, self._init_one, started)
            self._counts.init_seconds = anyio.current_time() - began
            self._set_state(ModelState.WARMING)
            step = "warm-up"
            began = anyio.current_time()
            await self._on_each(instances, self._warm_one)
            self._counts.warmup_seconds = anyio.current_time() - began
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._teardown(started)
            self._release(instances)
            cause = _root_cause(exc)
            if isinstance(cause, anyio.get_cancelled_exc_class()):
                self._set_state(ModelState.FAILED, f"start cancelled during {step}")
                raise
            reason = f"{step} raised {type(cause).__name__}: {cause}"
            if isinstance(cause, _StepError):
                reason = str(cause)
                cause = cause.__cause__ or cause
            elif isinstance(cause, DeviceError):
                reason = str(cause).removeprefix(f"{self._where}: ")
            self._set_state(ModelState.FAILED, reason)
            raise LifecycleError(f"{self._where} failed to start: {reason}") from cause
        self._instances = instances

    def _make_instance(self, index: int, device: Device, placer: Placer) -> Instance:
        source = self._source
        handler = source if isinstance(source, ModelHandler) else source()
        if not isinstance(handler, ModelHandler):
            raise ConfigError(
                f"the handler factory returned {type(handler).__name__}, not a ModelHandler"
            )
        context = ModelContext(
            name=self.name,
            version=self.version,
            device=device,
            instance=index,
            config=self.config,
            threads=placer.cpu_threads() if device.kind == "cpu" else None,
        )
        return Instance(handler, context, self._shared_threads, self._devices)

    def _release(self, instances: Sequence[Instance]) -> None:
        """Let the threads of ``instances`` and of the model go."""
        for instance in instances:
            instance.threads.close()
        self._shared_threads.close()

    async def _on_each(
        self,
        instances: Sequence[Instance],
        step: Callable[[Instance], Any],
        done: list[Instance] | None = None,
    ) -> None:
        """Run ``step`` on every instance at once; raise the first failure."""
        failures: list[BaseException] = []

        async def one(instance: Instance) -> None:
            try:
                await step(instance)
            except Exception as exc:
                failures.append(exc)
            else:
                if done is not None:
                    done.append(instance)

        async with anyio.create_task_group() as tasks:
            for instance in instances:
                tasks.start_soon(one, instance)
        if failures:
            raise failures[0]

    async def _init_one(self, instance: Instance) -> None:
        try:
            await instance.init()
        except Exception as exc:
            raise _StepError(
                f"init of instance {instance.context.instance} on "
                f"{instance.context.device} raised {type(exc).__name__}: {exc}"
            ) from exc

    async def _warm_one(self, instance: Instance) -> None:
        """Run the handler's examples through the real path at each warm-up size."""
        examples = await instance.warmup_examples()
        if not examples:
            return
        for size in self.config._warmup_sizes():
            requests = [examples[i % len(examples)] for i in range(size)]
            outcomes = await self._compute(instance, requests)
            for index, outcome in enumerate(outcomes):
                if isinstance(outcome, BaseException):
                    raise _StepError(
                        f"warm-up of instance {instance.context.instance} at batch "
                        f"size {size} failed on example {index % len(examples)}: "
                        f"{type(outcome).__name__}: {outcome}"
                    ) from outcome

    async def _teardown(self, instances: Sequence[Instance]) -> None:
        async def one(instance: Instance) -> None:
            try:
                await instance.teardown()
            except Exception:
                logger.exception("%s: teardown failed", instance.where)

        async with anyio.create_task_group() as tasks:
            for instance in instances:
                tasks.start_soon(one, instance)

    def _not_running(self) -> MdsError:
        return self._refuse()

    @property
    def _in_flight(self) -> int:
        """Requests admitted and not yet answered."""
        c = self._counts
        return c.requests - c.completed - c.failed - c.cancelled - c.overloaded

    def _refuse(self) -> NotReady:
        self._counts.not_ready += 1
        self._counts.errors["NotReady"] += 1
        return self._not_ready()

    def _not_ready(self) -> NotReady:
        return NotReady(f"{self._where} is not ready: {self._not_ready_reason()}")

    def _not_ready_reason(self) -> str:
        state = self._state
        if state is ModelState.FAILED:
            return f"it is failed: {self._failure}"
        if state in (ModelState.CREATED, ModelState.STOPPED):
            return f"it is {state.value}; start it before sending requests"
        return f"it is {state.value}"

    def _not_ready_report(self) -> ModelHealth:
        return self._health_report(False, self._not_ready_reason())

    # -- requests -----------------------------------------------------------

    @overload
    def infer(
        self,
        request: RequestT,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: Literal[False] = False,
    ) -> Coroutine[Any, Any, ResponseT]: ...

    @overload
    def infer(
        self,
        request: RequestT,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: Literal[True],
    ) -> Coroutine[Any, Any, Traced[ResponseT]]: ...

    @overload
    def infer(
        self,
        request: RequestT,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: bool,
    ) -> Coroutine[Any, Any, ResponseT | Traced[ResponseT]]: ...

    def infer(
        self,
        request: RequestT,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: bool = False,
    ) -> Coroutine[Any, Any, Any]:
        """Serve one request: preprocess, batched infer, postprocess. Await it.

        Callable from any thread or event loop; from another loop the call is
        forwarded to the model's own loop.

        Args:
            request: the request, as the handler's ``preprocess`` takes it.
            timeout: this request's deadline in seconds from now; defaults to
                ``config.timeout``. When it passes the caller gets
                :class:`DeadlineExceeded` at once; a queued request whose
                deadline passed is never computed.
            priority: its priority level (0 is the highest); defaults to
                ``batching.default_priority``.
            trace: return a :class:`Traced` with the response and where the
                call's time went.

        Returns:
            The response from the handler's ``postprocess`` (in a
            :class:`Traced` with ``trace=True``).

        Raises:
            NotReady: the model is not ``READY``; the message names its state.
            Overloaded: the request's priority level is full.
            InvalidInput: ``preprocess`` rejected the request (or its cost or
                priority cannot be batched).
            DeadlineExceeded: the deadline passed first.
            InferenceError: ``infer`` or ``postprocess`` failed for it.
        """
        # A plain def handing back _serve's coroutine, so that a request
        # makes one coroutine fewer: about 5% of the batcher's cost per
        # request (benchmarks/batcher.py). Awaiting it is all callers see.
        if self._home != _get_ident() and self._portal is not None:
            call = functools.partial(self._serve, request, timeout, priority, trace, False)
            return self._call_from_elsewhere(call)
        return self._serve(request, timeout, priority, trace, False)

    async def _serve(
        self,
        request: Any,
        timeout: float | None,
        priority: int | None,
        trace: bool,
        stream: bool,
    ) -> Any:
        """The per-request path, in the model's loop; ``stream`` gives the chunks.

        Kept flat, since each call and await costs about as much here as the
        queue itself (benchmarks/batcher.py).
        """
        batcher, steps, counts = self._batcher, self._steps, self._counts
        if not self._ready or batcher is None or steps is None:
            raise self._refuse()
        if timeout is None:
            timeout = self._default_timeout
        counts.requests += 1
        try:
            if timeout is None:
                deadline = None
                began = self._clock() if trace else 0.0
            else:
                began = self._clock()
                deadline = began + timeout
            if steps.pre is None:
                value = request
                now = began if deadline is not None else None  # still "now"
            else:
                value = await steps.preprocess(request, deadline)
                now = None
            preprocessed = self._clock() if trace else 0.0
            if steps.describes:
                cost, key, length = steps.describe(value)
                item = batcher.enqueue(value, deadline, priority, cost, key, length, now)
            else:
                item = batcher.enqueue(value, deadline, priority, 1, None, None, now)
            try:
                outcome = await item.waiter
            except BaseException:
                batcher.abandon(item)
                raise
            if isinstance(outcome, BaseException):
                raise outcome
            computed = self._clock() if trace else 0.0
            if stream:
                # Still in flight (so a drain waits for it) until the stream ends.
                return self._counted(steps.chunks(outcome, deadline))
            if steps.post is None:
                response = outcome
            else:
                response = await steps.postprocess(outcome, deadline)
            counts.completed += 1
        except anyio.get_cancelled_exc_class():
            counts.cancelled += 1
            raise
        except Exception as exc:
            if isinstance(exc, Overloaded):
                counts.overloaded += 1
            else:
                counts.failed += 1
            counts.errors[type(exc).__name__] += 1
            raise
        finally:
            if self._idle is not None and not self._in_flight:
                self._idle.set()
        if not trace:
            return response
        info = item.batch
        assert info is not None
        return Traced(
            value=response,
            trace=CallTrace(
                model=self.name,
                instance=info.instance,
                queue_wait=info.started - item.enqueued,
                batch_size=info.size,
                batch_cost=info.cost,
                padding_ratio=info.padding,
                infer_seconds=info.infer_seconds,
                preprocess_seconds=preprocessed - began,
                postprocess_seconds=self._clock() - computed,
                total_seconds=self._clock() - began,
            ),
        )

    @overload
    def infer_sync(
        self,
        request: RequestT,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: Literal[False] = False,
    ) -> ResponseT: ...

    @overload
    def infer_sync(
        self,
        request: RequestT,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: Literal[True],
    ) -> Traced[ResponseT]: ...

    @overload
    def infer_sync(
        self,
        request: RequestT,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: bool,
    ) -> ResponseT | Traced[ResponseT]: ...

    def infer_sync(
        self,
        request: RequestT,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: bool = False,
    ) -> ResponseT | Traced[ResponseT]:
        """Blocking form of :meth:`infer`, for threads without an event loop.

        Thread-safe. Works from a thread that runs its own loop (a notebook)
        as long as the model lives in another one (started with
        :meth:`start_sync`).
        """
        call = functools.partial(
            self.infer, request, timeout=timeout, priority=priority, trace=trace
        )
        return cast("ResponseT | Traced[ResponseT]", self._call_sync(call))

    async def _counted(self, chunks: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
        """``chunks``, counted as completed, failed or cancelled when the stream ends."""
        counts = self._counts
        try:
            async for chunk in chunks:
                yield chunk
        except (anyio.get_cancelled_exc_class(), GeneratorExit):
            counts.cancelled += 1
            raise
        except Exception as exc:
            counts.failed += 1
            counts.errors[type(exc).__name__] += 1
            raise
        else:
            counts.completed += 1
        finally:
            with anyio.CancelScope(shield=True):
                await chunks.aclose()
            if self._idle is not None and not self._in_flight:
                self._idle.set()

    @property
    def streams(self) -> bool:
        """Whether the handler's ``postprocess`` yields: see :meth:`stream`.

        Known once the model has started; ``False`` before.
        """
        steps = self._steps
        return steps is not None and steps.streams

    async def stream(
        self,
        request: RequestT,
        *,
        timeout: float | None = None,
        priority: int | None = None,
    ) -> AsyncIterator[Any]:
        """Serve one request and yield its response in chunks, as they are made.

        For a handler whose ``postprocess`` is a generator (``def`` or
        ``async def`` with ``yield``): the request is batched and computed
        like any other, then each value ``postprocess`` yields for it comes
        out here at once. (:meth:`infer` on such a model returns the list of
        all chunks.) A model whose ``postprocess`` does not yield gives its
        whole response as one chunk. The deadline covers the whole stream;
        leaving the loop early closes ``postprocess``'s generator.

        Callable from any event loop; from another loop each chunk is
        fetched from the model's own.

        Raises:
            MdsError: what :meth:`infer` raises, before the first chunk or,
                for ``postprocess``'s errors, between chunks.

        Added in 0.2.
        """
        if self._at_home() or self._portal is None:
            chunks = await self._serve(request, timeout, priority, False, True)
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                with anyio.CancelScope(shield=True):
                    await chunks.aclose()
            return
        call = functools.partial(self._serve, request, timeout, priority, False, True)
        chunks = await self._call_from_elsewhere(call)
        try:
            while (chunk := await self._call_from_elsewhere(_next_chunk, chunks)) is not _END:
                yield chunk
        finally:
            with anyio.CancelScope(shield=True):
                await self._call_from_elsewhere(chunks.aclose)

    def stream_sync(
        self,
        request: RequestT,
        *,
        timeout: float | None = None,
        priority: int | None = None,
    ) -> Iterator[Any]:
        """Blocking form of :meth:`stream`, for threads without an event loop (Flask).

        The request is sent when iteration begins; closing the iterator early
        stops the stream.
        """
        call = functools.partial(self._serve, request, timeout, priority, False, True)
        chunks = self._call_sync(call)
        try:
            while (chunk := self._call_sync(_next_chunk, chunks)) is not _END:
                yield chunk
        finally:
            if self._portal is not None:
                self._call_sync(chunks.aclose)

    async def _compute(
        self,
        instance: Instance,
        requests: Sequence[Any],
        timings: dict[str, float] | None = None,
        sizes: list[int] | None = None,
    ) -> list[Any]:
        """The real path for a batch made by hand: per request, response or error.

        Used by warm-up and by :mod:`mds.testing`: no queue, the same steps,
        collation and output checks. Requests that fail ``preprocess`` are
        left out of the batch. ``timings`` collects the seconds per step and
        ``sizes`` the size of the batch ``infer`` was given.
        """
        steps = self._steps
        assert steps is not None
        clock = _StepClock(timings)
        outcomes: list[Any] = [None] * len(requests)
        batch: list[Any] = []
        positions: list[int] = []
        with clock("preprocess"):
            for index, request in enumerate(requests):
                try:
                    value = await steps.preprocess(request, None)
                    steps.describe(value)
                except Exception as exc:
                    outcomes[index] = exc
                else:
                    batch.append(value)
                    positions.append(index)
        if sizes is not None:
            sizes.append(len(batch))
        with clock("infer"):
            try:
                results = await instance.compute(batch) if batch else []
            except Exception as exc:
                results = instance.failure(exc, len(batch))
        with clock("postprocess"):
            for index, result in zip(positions, results, strict=True):
                if isinstance(result, BaseException):
                    outcomes[index] = result
                    continue
                try:
                    outcomes[index] = await steps.postprocess(result, None)
                except Exception as exc:
                    outcomes[index] = exc
        return outcomes

    def set_batching(self, batching: BatchingConfig) -> None:
        """Change how requests are batched, from the next batch on.

        Everything may change except ``priority_levels`` while the model
        runs. ``config`` is updated to match.

        Raises:
            ConfigError: the new settings conflict with the model's config
                (such as its warm-up sizes), or change the priority levels of
                a running model.
        """
        config = msgspec.structs.replace(self.config, batching=batching)
        if self._batcher is not None:
            try:
                self._batcher.configure(batching)
            except ValueError as exc:
                raise ConfigError(f"{self._where}: {exc}") from None
        self.config = config
        logger.info("%s: batching is now %s", self._where, batching)

    # -- what callers can read ----------------------------------------------

    async def health(self) -> ModelHealth:
        """Readiness: ``READY`` and every instance's ``health`` check passes.

        Checks run at once, each bounded by ``config.health_timeout``.
        """
        if not self._at_home() and self._portal is not None:
            return await self._call_from_elsewhere(self._health)
        return await self._health()

    async def _health(self) -> ModelHealth:
        if self._state is not ModelState.READY:
            return self._not_ready_report()
        problems: list[str] = []

        async def check(instance: Instance) -> None:
            try:
                with anyio.fail_after(self.config.health_timeout):
                    healthy = await instance.health()
            except TimeoutError:
                problems.append(
                    f"instance {instance.context.instance}: health check took longer "
                    f"than {self.config.health_timeout:g} s"
                )
            except Exception as exc:
                problems.append(
                    f"instance {instance.context.instance}: health check raised "
                    f"{type(exc).__name__}: {exc}"
                )
            else:
                if not healthy:
                    problems.append(
                        f"instance {instance.context.instance}: health check returned False"
                    )

        async with anyio.create_task_group() as tasks:
            for instance in self._instances:
                tasks.start_soon(check, instance)
        devices = await self._device_infos()
        for instance in self._instances:
            info = devices.get(instance.device)
            if info is not None and not info.healthy:
                problems.append(
                    f"instance {instance.context.instance}: device {info.device} "
                    f"failed: {info.error}"
                )
        infos = tuple(devices.values())
        if problems:
            return self._health_report(False, "; ".join(sorted(problems)), infos)
        return self._health_report(True, None, infos)

    async def _device_infos(self) -> dict[Device, DeviceInfo]:
        """Each device the instances use, as the device manager sees it now."""
        manager = self._devices

        def look() -> dict[Device, DeviceInfo]:
            found: dict[Device, DeviceInfo] = {}
            for instance in self._instances:
                device = instance.device
                if device in found:
                    continue
                try:
                    found[device] = manager.info(device)
                except DeviceError as exc:
                    found[device] = DeviceInfo(
                        device=device, name="unknown", healthy=False, error=str(exc)
                    )
            return found

        return await anyio.to_thread.run_sync(look)

    def _health_report(
        self, ready: bool, reason: str | None, devices: tuple[DeviceInfo, ...] = ()
    ) -> ModelHealth:
        return ModelHealth(
            name=self.name,
            version=self.version,
            state=self._state,
            ready=ready,
            reason=reason,
            devices=devices,
        )

    def statistics(self) -> ModelStatistics:
        """A snapshot of this model's counters."""
        counts, batches = self._counts, self._batch_stats
        batcher = self._batcher
        queue = batcher.queue if batcher is not None else None
        waits = sorted(batches.recent_waits)
        return ModelStatistics(
            name=self.name,
            version=self.version,
            state=self._state,
            in_flight=self._in_flight,
            queued=queue.count if queue is not None else 0,
            queued_by_priority=tuple(queue.counts) if queue is not None else (),
            requests=counts.requests,
            completed=counts.completed,
            failed=counts.failed,
            rejected=counts.not_ready + counts.overloaded,
            cancelled=counts.cancelled,
            deadline_misses=batches.deadline_misses,
            errors=dict(counts.errors),
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
            max_batch_size=(
                batcher.batch_limit if batcher is not None else self.config.batching.max_batch_size
            ),
            out_of_memory=batches.out_of_memory,
            init_seconds=counts.init_seconds,
            warmup_seconds=counts.warmup_seconds,
        )


_END = object()


async def _next_chunk(chunks: AsyncIterator[Any]) -> Any:
    """The next chunk, or ``_END`` (a portal call cannot raise ``StopAsyncIteration``)."""
    return await anext(chunks, _END)


def _percentile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted values (nearest rank); 0 if there are none."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _StepClock:
    """Adds the seconds spent in each ``with clock(step):`` to ``timings``."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        if self.timings is None:
            yield
            return
        began = anyio.current_time()
        try:
            yield
        finally:
            self.timings[step] = self.timings.get(step, 0.0) + anyio.current_time() - began


class _StepError(Exception):
    """A lifecycle step's failure, with the message that says which step."""


def _root_cause(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
