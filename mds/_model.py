"""One served model: its instances, its batcher, its lifecycle and its numbers."""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Generic, Self, cast

import anyio
import anyio.abc

from ._batching.batcher import Batcher
from ._calls import off_loop
from ._config import ModelConfig
from ._errors import (
    ConfigError,
    DeadlineExceeded,
    InferenceError,
    InvalidInput,
    LifecycleError,
    MdsError,
    NotReady,
    Overloaded,
)
from ._handler import ModelContext, ModelHandler, ModelState, RequestT, ResponseT
from ._instance import Instance
from ._status import ModelHealth, ModelStatistics
from ._sync import LoopBound

__all__ = ["ModelRuntime", "check_name"]

logger = logging.getLogger(__name__)

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
    """Mutable counters behind :class:`ModelStatistics`."""

    def __init__(self) -> None:
        self.requests = self.completed = self.failed = self.rejected = 0
        self.cancelled = self.batches = self.batched_items = 0
        self.infer_seconds = self.init_seconds = self.warmup_seconds = 0.0
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
    ) -> None:
        self.config: ModelConfig = config if config is not None else ModelConfig()
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
        self._failure: str | None = None
        self._instances: list[Instance] = []
        self._batcher: Batcher[Instance] | None = None
        self._preprocess_fn: Callable[[Any], Any] | None = None
        self._postprocess_fn: Callable[[Any], Any] | None = None
        self._tasks: anyio.abc.TaskGroup | None = None
        self._in_flight = 0
        self._idle: anyio.Event | None = None
        self._counts = _Counts()
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
        self._batcher = Batcher(self.config.batching, self._run_batch, where=self._where)
        for instance in self._instances:
            tasks.start_soon(self._batcher.serve, instance)
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
                self._instances = []
                self._set_state(ModelState.STOPPED)
            finally:
                await self._close_bridge()

    async def _load(self) -> None:
        """Create, init and warm up every instance; FAILED with the cause if not."""
        started: list[Instance] = []
        step = "making the handler"
        try:
            instances = self._make_instances()
            first = instances[0].handler
            self._preprocess_fn = _override(first, "preprocess", self._shared_limiter)
            self._postprocess_fn = _override(first, "postprocess", self._shared_limiter)
            step = "init"
            began = anyio.current_time()
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
            cause = _root_cause(exc)
            if isinstance(cause, anyio.get_cancelled_exc_class()):
                self._set_state(ModelState.FAILED, f"start cancelled during {step}")
                raise
            reason = f"{step} raised {type(cause).__name__}: {cause}"
            if isinstance(cause, _StepError):
                reason = str(cause)
                cause = cause.__cause__ or cause
            self._set_state(ModelState.FAILED, reason)
            raise LifecycleError(f"{self._where} failed to start: {reason}") from cause
        self._instances = instances

    def _make_instances(self) -> list[Instance]:
        self._shared_limiter = anyio.CapacityLimiter(self.config.worker_threads)
        instances = []
        for index in range(self.config.instances):
            source = self._source
            handler = source if isinstance(source, ModelHandler) else source()
            if not isinstance(handler, ModelHandler):
                raise ConfigError(
                    f"the handler factory returned {type(handler).__name__}, not a ModelHandler"
                )
            context = ModelContext(
                name=self.name,
                version=self.version,
                device=self.config._device_for(index),
                instance=index,
                config=self.config,
            )
            instances.append(Instance(handler, context, self._shared_limiter))
        return instances

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

    def _refuse(self) -> NotReady:
        self._counts.rejected += 1
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

    async def infer(self, request: RequestT, *, timeout: float | None = None) -> ResponseT:
        """Serve one request: preprocess, batched infer, postprocess.

        Callable from any thread or event loop; from another loop the call is
        forwarded to the model's own loop.

        Args:
            request: the request, as the handler's ``preprocess`` takes it.
            timeout: this request's deadline in seconds from now; defaults to
                ``config.timeout``. Queued requests whose deadline passes are
                never computed.

        Returns:
            The response from the handler's ``postprocess``.

        Raises:
            NotReady: the model is not ``READY``; the message names its state.
            Overloaded: the queue is full.
            InvalidInput: ``preprocess`` rejected the request.
            DeadlineExceeded: the deadline passed first.
            InferenceError: ``infer`` or ``postprocess`` failed for it.
        """
        if self._at_home() or self._portal is None:
            return await self._infer(request, timeout)
        return await self._call_from_elsewhere(self._infer, request, timeout)

    def infer_sync(self, request: RequestT, *, timeout: float | None = None) -> ResponseT:
        """Blocking form of :meth:`infer`, for threads without an event loop.

        Thread-safe. Works from a thread that runs its own loop (a notebook)
        as long as the model lives in another one (started with
        :meth:`start_sync`).
        """
        return self._call_sync(self._infer, request, timeout)

    async def _infer(self, request: RequestT, timeout: float | None) -> ResponseT:
        counts = self._counts
        if self._state is not ModelState.READY:
            raise self._refuse()
        if timeout is None:
            timeout = self.config.timeout
        counts.requests += 1
        self._in_flight += 1
        try:
            if timeout is None:
                response = await self._process(request, None)
            else:
                response = await self._process_within(request, timeout)
        except anyio.get_cancelled_exc_class():
            counts.cancelled += 1
            raise
        except Exception as exc:
            if isinstance(exc, Overloaded):
                counts.rejected += 1
            else:
                counts.failed += 1
            counts.errors[type(exc).__name__] += 1
            raise
        finally:
            self._in_flight -= 1
            if not self._in_flight and self._idle is not None:
                self._idle.set()
        counts.completed += 1
        return cast(ResponseT, response)

    async def _process_within(self, request: Any, timeout: float) -> Any:
        deadline = anyio.current_time() + timeout
        with anyio.move_on_at(deadline):
            return await self._process(request, deadline)
        raise DeadlineExceeded(
            f"{self._where}: no answer within the request's timeout of {timeout:g} s"
        )

    async def _process(self, request: Any, deadline: float | None) -> Any:
        item = await self._preprocess(request)
        assert self._batcher is not None
        output = await self._batcher.submit(item, deadline)
        return await self._postprocess(output)

    async def _preprocess(self, request: Any) -> Any:
        if self._preprocess_fn is None:
            return request
        try:
            return await self._preprocess_fn(request)
        except MdsError:
            raise
        except Exception as exc:
            logger.debug("%s: preprocess rejected a request", self._where, exc_info=True)
            raise InvalidInput(
                f"{self._where}: preprocess rejected the request: {type(exc).__name__}: {exc}"
            ) from exc

    async def _postprocess(self, output: Any) -> Any:
        if self._postprocess_fn is None:
            return output
        try:
            return await self._postprocess_fn(output)
        except MdsError:
            raise
        except Exception as exc:
            logger.exception("%s: postprocess failed", self._where)
            raise InferenceError(
                f"{self._where}: postprocess failed: {type(exc).__name__}: {exc}"
            ) from exc

    async def _run_batch(self, instance: Instance, batch: list[Any]) -> list[Any]:
        began = anyio.current_time()
        outcomes = await instance.infer(batch)
        counts = self._counts
        counts.infer_seconds += anyio.current_time() - began
        counts.batches += 1
        counts.batched_items += len(batch)
        return outcomes

    async def _compute(
        self,
        instance: Instance,
        requests: Sequence[Any],
        timings: dict[str, float] | None = None,
    ) -> list[Any]:
        """The real path for a batch made by hand: per request, response or error.

        Used by warm-up and by :mod:`mds.testing`; requests that fail
        ``preprocess`` are left out of the batch. ``timings`` collects the
        seconds spent in each step.
        """
        clock = _StepClock(timings)
        outcomes: list[Any] = [None] * len(requests)
        batch: list[Any] = []
        positions: list[int] = []
        with clock("preprocess"):
            for index, request in enumerate(requests):
                try:
                    batch.append(await self._preprocess(request))
                    positions.append(index)
                except Exception as exc:
                    outcomes[index] = exc
        with clock("infer"):
            results = await self._run_batch(instance, batch) if batch else []
        with clock("postprocess"):
            for index, result in zip(positions, results, strict=True):
                if isinstance(result, BaseException):
                    outcomes[index] = result
                    continue
                try:
                    outcomes[index] = await self._postprocess(result)
                except Exception as exc:
                    outcomes[index] = exc
        return outcomes

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
        if problems:
            return self._health_report(False, "; ".join(sorted(problems)))
        return self._health_report(True, None)

    def _health_report(self, ready: bool, reason: str | None) -> ModelHealth:
        return ModelHealth(
            name=self.name, version=self.version, state=self._state, ready=ready, reason=reason
        )

    def statistics(self) -> ModelStatistics:
        """A snapshot of this model's counters."""
        counts = self._counts
        return ModelStatistics(
            name=self.name,
            version=self.version,
            state=self._state,
            in_flight=self._in_flight,
            queued=self._batcher.queued if self._batcher is not None else 0,
            requests=counts.requests,
            completed=counts.completed,
            failed=counts.failed,
            rejected=counts.rejected,
            cancelled=counts.cancelled,
            errors=dict(counts.errors),
            batches=counts.batches,
            batched_items=counts.batched_items,
            infer_seconds=counts.infer_seconds,
            init_seconds=counts.init_seconds,
            warmup_seconds=counts.warmup_seconds,
        )


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


def _override(
    handler: ModelHandler[Any, Any], method: str, limiter: anyio.CapacityLimiter
) -> Callable[[Any], Any] | None:
    """The handler's own ``method`` as an async callable; None if not overridden."""
    if getattr(type(handler), method) is getattr(ModelHandler, method):
        return None
    return off_loop(getattr(handler, method), limiter)
