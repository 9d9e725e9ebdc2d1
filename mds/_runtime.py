"""A runtime: many models by name, started and stopped together; ``mds.serve``."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType, TracebackType
from typing import Any, Self

import anyio
import anyio.abc

from ._config import ModelConfig
from ._devices.manager import DeviceManager
from ._errors import ConfigError, LifecycleError, MdsError, ModelNotFound, NotReady
from ._handler import ModelHandler, RequestT, ResponseT
from ._model import ModelRuntime, check_name
from ._status import ModelHealth, ModelStatistics, RuntimeHealth
from ._sync import LoopBound

__all__ = ["Runtime", "current_runtime", "serve", "serve_sync"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_running: list[Runtime] = []  # started runtimes, most recent last


class _Hosted:
    """The task that keeps one model running inside a runtime."""

    def __init__(self) -> None:
        self.stop = anyio.Event()
        self.done = anyio.Event()


class Runtime(LoopBound):
    """Holds models by name and serves them; starts and stops them together.

    ``async with runtime:`` starts every model (init, warm-up) at once and,
    on leaving, drains in-flight requests and tears the models down. From
    sync code (Flask, scripts, notebooks) use :meth:`start_sync` and
    :meth:`stop_sync`, or ``with runtime:``. While it runs, it is the runtime
    that :func:`mds.serve` uses (the most recently started one).

    Args:
        fail_fast: if a model fails to start, stop the others and raise
            (the default). With ``False`` the runtime runs without it; the
            model reports ``FAILED`` with its cause, readiness is false, and
            :meth:`start_model` can try again.
        devices: the device manager that places its models' instances;
            defaults to :meth:`DeviceManager.default`.

    Example:
        >>> runtime = mds.Runtime()
        >>> runtime.add_model("doubler", Doubler)
        >>> async with runtime:
        ...     assert await runtime.serve("doubler", 2.0) == 4.0

    Added in 0.1.
    """

    def __init__(self, *, fail_fast: bool = True, devices: DeviceManager | None = None) -> None:
        self.fail_fast = fail_fast
        self.devices: DeviceManager = devices if devices is not None else DeviceManager.default()
        self._models: dict[str, ModelRuntime[Any, Any]] = {}
        self._hosted: dict[str, _Hosted] = {}
        self._tasks: anyio.abc.TaskGroup | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Runtime {state} models={sorted(self._models)}>"

    @property
    def running(self) -> bool:
        """Whether the runtime is started and not yet stopped."""
        return self._tasks is not None

    @property
    def models(self) -> Mapping[str, ModelRuntime[Any, Any]]:
        """The models, by name (read-only)."""
        return MappingProxyType(self._models)

    def add_model(
        self,
        name: str,
        handler: ModelHandler[RequestT, ResponseT]
        | Callable[[], ModelHandler[RequestT, ResponseT]],
        config: ModelConfig | None = None,
        *,
        version: str = "1",
    ) -> ModelRuntime[RequestT, ResponseT]:
        """Add a model; it starts with the runtime.

        Args:
            name: the name requests use; letters, digits, ``_``, ``.``, ``-``.
            handler: a handler object, or a factory (such as its class) that
                makes one per instance.
            config: the model's serving policy.
            version: the model's version.

        Returns:
            The model's :class:`ModelRuntime`, typed with the handler's
            request and response types.

        Raises:
            ConfigError: the name is taken or not allowed.
            LifecycleError: the runtime is already running.
        """
        if self.running:
            raise LifecycleError(
                f"cannot add model {name!r} to a running runtime; add models before starting it"
            )
        check_name(name)
        if name in self._models:
            raise ConfigError(f"a model named {name!r} was already added")
        model = ModelRuntime(handler, config, name=name, version=version, devices=self.devices)
        self._models[name] = model
        return model

    def model(self, name: str) -> ModelRuntime[Any, Any]:
        """The model called ``name``.

        Raises:
            ModelNotFound: there is no such model; the message lists the names.
        """
        try:
            return self._models[name]
        except KeyError:
            known = ", ".join(repr(n) for n in sorted(self._models)) or "none"
            raise ModelNotFound(f"no model named {name!r}; this runtime serves: {known}") from None

    # -- lifecycle ----------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self.running:
            raise LifecycleError(f"{self!r} is already running")
        await self._open_bridge()
        tasks = anyio.create_task_group()
        try:
            await tasks.__aenter__()
        except BaseException:  # pragma: no cover - entering a task group does not fail
            await self._close_bridge()
            raise
        self._tasks = tasks
        try:
            failures = await self._start_models(list(self._models))
            if failures and self.fail_fast:
                names = "; ".join(
                    f"{name!r}: {self._models[name].failure or exc}"
                    for name, exc in failures.items()
                )
                raise LifecycleError(
                    f"{len(failures)} of {len(self._models)} models failed to start: {names}"
                ) from next(iter(failures.values()))
        except BaseException:
            await self._close(tasks, cancel=False)
            raise
        with _lock:
            _running.append(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tasks = self._tasks
        if tasks is None:
            return
        try:
            # Leaving on an error: stop at once, without waiting for a drain.
            await self._close(tasks, cancel=exc_type is not None)
        finally:
            with _lock:
                if self in _running:
                    _running.remove(self)

    async def _close(self, tasks: anyio.abc.TaskGroup, *, cancel: bool) -> None:
        """Stop every model (draining unless ``cancel``), then the task group."""
        if cancel:
            tasks.cancel_scope.cancel()
        for hosted in self._hosted.values():
            hosted.stop.set()
        try:
            await tasks.__aexit__(None, None, None)
        finally:
            self._tasks = None
            self._hosted.clear()
            await self._close_bridge()

    async def _start_models(self, names: list[str]) -> dict[str, MdsError]:
        """Start models at once; the failures, by name."""
        failures: dict[str, MdsError] = {}

        async def start(name: str) -> None:
            try:
                await self._start_model(name)
            except MdsError as exc:
                failures[name] = exc

        async with anyio.create_task_group() as tasks:
            for name in names:
                tasks.start_soon(start, name)
        return failures

    async def _start_model(self, name: str) -> None:
        assert self._tasks is not None
        hosted = _Hosted()
        self._hosted[name] = hosted
        try:
            await self._tasks.start(self._host, self._models[name], hosted)
        except BaseException:
            del self._hosted[name]
            raise

    @staticmethod
    async def _host(
        model: ModelRuntime[Any, Any],
        hosted: _Hosted,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            async with model:
                task_status.started()
                await hosted.stop.wait()
        finally:
            hosted.done.set()

    async def start_model(self, name: str) -> None:
        """Start one model of a running runtime: again after a failure or a stop.

        Raises:
            ModelNotFound: no such model.
            LifecycleError: the runtime is not running, the model is already
                running, or it failed to start again (cause chained).
        """
        model = self.model(name)
        if not self.running:
            raise LifecycleError(f"{self!r} is not running; start it first")
        if name in self._hosted:
            raise LifecycleError(f"model {name!r} is already {model.state.value}")
        await self._start_model(name)

    async def stop_model(self, name: str) -> None:
        """Stop one model (drain, then teardown); the others go on serving.

        Raises:
            ModelNotFound: no such model.
            LifecycleError: the model is not running.
        """
        self.model(name)
        hosted = self._hosted.pop(name, None)
        if hosted is None:
            raise LifecycleError(f"model {name!r} is not running")
        hosted.stop.set()
        await hosted.done.wait()

    def _not_running(self) -> MdsError:
        return NotReady(
            f"{self!r} is not running; start it first (async with runtime, or runtime.start_sync())"
        )

    # -- requests -----------------------------------------------------------

    async def serve(
        self,
        model: str,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: bool = False,
    ) -> Any:
        """Serve one request with the model called ``model``.

        Callable from any thread or event loop (forwarded to the runtime's own
        loop when needed).

        Args:
            model: the model's name.
            request: the request, as the model's ``preprocess`` takes it.
            timeout: deadline in seconds from now; defaults to the model's.
            priority: priority level (0 is the highest); defaults to the model's.
            trace: return a :class:`Traced` with where the call's time went.

        Returns:
            The model's response (in a :class:`Traced` with ``trace=True``).

        Raises:
            ModelNotFound: no such model.
            MdsError: the errors :meth:`ModelRuntime.infer` raises (``NotReady``,
                ``Overloaded``, ``InvalidInput``, ``DeadlineExceeded``,
                ``InferenceError``).
        """
        return await self.model(model).infer(
            request,
            timeout=timeout,
            priority=priority,
            trace=trace,
        )

    def serve_sync(
        self,
        model: str,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: bool = False,
    ) -> Any:
        """Blocking form of :meth:`serve`, for threads with no event loop (Flask).

        Thread-safe; every call reuses the runtime's one loop.
        """
        call = functools.partial(
            self.model(model).infer, request, timeout=timeout, priority=priority, trace=trace
        )
        return self._call_sync(call)

    # -- what callers can read ----------------------------------------------

    async def health(self) -> RuntimeHealth:
        """Liveness and readiness, overall and for each model."""
        if not self._at_home() and self._portal is not None:
            return await self._call_from_elsewhere(self._health)
        return await self._health()

    async def _health(self) -> RuntimeHealth:
        reports: dict[str, ModelHealth] = {}

        async def check(name: str, model: ModelRuntime[Any, Any]) -> None:
            reports[name] = await model._health()

        async with anyio.create_task_group() as tasks:
            for name, model in self._models.items():
                tasks.start_soon(check, name, model)
        models = {name: reports[name] for name in sorted(reports)}
        live = self.running
        return RuntimeHealth(
            live=live, ready=live and all(h.ready for h in models.values()), models=models
        )

    def health_sync(self) -> RuntimeHealth:
        """Blocking form of :meth:`health`, for threads with no event loop."""
        if self._portal is None:  # not running: no loop to ask, nothing is ready
            models = {name: model._not_ready_report() for name, model in self._models.items()}
            return RuntimeHealth(live=False, ready=False, models=dict(sorted(models.items())))
        return self._call_sync(self._health)

    def statistics(self) -> dict[str, ModelStatistics]:
        """Each model's counters, by name."""
        return {name: model.statistics() for name, model in sorted(self._models.items())}


def current_runtime() -> Runtime:
    """The runtime :func:`serve` uses: the most recently started one still running.

    Raises:
        NotReady: no runtime is running.
    """
    try:
        return _running[-1]  # no lock: a read of a list item is atomic
    except IndexError:
        pass
    raise NotReady(
        "no mds runtime is running: start one (async with runtime, or "
        "runtime.start_sync()) before calling mds.serve"
    )


async def serve(
    model: str,
    request: Any,
    *,
    timeout: float | None = None,
    priority: int | None = None,
    trace: bool = False,
) -> Any:
    """Serve one request with a model of the running runtime; for async routes.

    Uses :func:`current_runtime`. Works in asyncio and trio apps, whichever
    loop or thread the runtime runs in.

    Args:
        model: the model's name.
        request: the request, as the model's ``preprocess`` takes it.
        timeout: deadline in seconds from now; defaults to the model's.
        priority: priority level (0 is the highest); defaults to the model's.
        trace: return a :class:`Traced` with where the call's time went.

    Returns:
        The model's response (in a :class:`Traced` with ``trace=True``).

    Raises:
        NotReady: no runtime is running, or the model is not ready.
        ModelNotFound: the runtime has no such model.
        MdsError: the errors :meth:`ModelRuntime.infer` raises (``Overloaded``,
            ``InvalidInput``, ``DeadlineExceeded``, ``InferenceError``).

    Example:
        >>> @app.post("/classify")
        ... async def classify(body: Body) -> dict[str, str]:
        ...     return {"label": await mds.serve("classifier", body.pixels)}

    Added in 0.1.
    """
    runtime = current_runtime()
    if trace:
        return await runtime.serve(model, request, timeout=timeout, priority=priority, trace=True)
    return await runtime.serve(model, request, timeout=timeout, priority=priority)


def serve_sync(
    model: str,
    request: Any,
    *,
    timeout: float | None = None,
    priority: int | None = None,
    trace: bool = False,
) -> Any:
    """Blocking form of :func:`serve`, for Flask views, WSGI apps and threads.

    Thread-safe. Every call goes to the runtime's one event loop; none starts
    a loop of its own. Works from a thread that already runs a loop (a
    notebook) when the runtime lives elsewhere (started with ``start_sync``).

    Example:
        >>> @app.post("/classify")
        ... def classify():
        ...     return {"label": mds.serve_sync("classifier", request.json["pixels"])}

    Added in 0.1.
    """
    return current_runtime().serve_sync(
        model, request, timeout=timeout, priority=priority, trace=trace
    )
