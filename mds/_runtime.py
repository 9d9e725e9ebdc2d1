"""A runtime: many models by name, started and stopped together; ``mds.serve``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager
from types import MappingProxyType, TracebackType
from typing import Any, Literal, Protocol, Self

import anyio
import anyio.abc

from . import _current
from ._bridge import Home, LoopBound, process_portal
from ._by_name import ByName
from ._config import ModelConfig, VersionPolicy, check_name, version_key
from ._devices.manager import DeviceManager
from ._errors import ConfigError, LifecycleError, MdsError, ModelNotFound, NotReady, quote
from ._handler import ModelHandler, RequestT, ResponseT
from ._hosting import Hosting
from ._managing import Managing
from ._model import ModelRuntime
from ._pipeline.graph import Pipeline
from ._pipeline.nodes import ModelNode
from ._pipeline.running import PipelineRuntime
from ._residency import Residency, ResidencyStatistics
from ._servable import Servable
from ._status import (
    ModelHealth,
    ModelStatistics,
    PipelineStatistics,
    RuntimeHealth,
    WorkerHealth,
    WorkerStatistics,
)
from ._versions import ModelVersions

__all__ = ["Load", "Runtime"]

#: How a runtime loads its models when it starts: see :meth:`Runtime.run`.
Load = Literal["wait", "background"]

logger = logging.getLogger("mds.runtime")


class Reporting(Protocol):
    """What runs on a runtime and reports beside its models: a queue worker."""

    def health(self) -> WorkerHealth: ...

    def statistics(self) -> WorkerStatistics: ...


class Runtime(Managing, ByName, LoopBound):
    """Holds models by name and serves them; starts and stops them together.

    ``async with runtime:`` starts every model (init, warm-up) at once and,
    on leaving, drains in-flight requests and tears the models down;
    ``async with runtime.run(load="background"):`` returns before the models
    are ready (see :meth:`run`). From sync code (Flask, scripts, notebooks)
    use :meth:`start_sync` and :meth:`stop_sync`, or ``with runtime:``. While
    it runs, it is the runtime that :func:`mds.serve` uses (the most recently
    started one).

    Args:
        fail_fast: if a model fails to start, stop the others and raise
            (the default). With ``False`` the runtime runs without it; the
            model reports ``FAILED`` with its cause, readiness is false, and
            :meth:`start_model` can try again. (Loading in the background,
            a model that fails stays ``FAILED`` either way.)
        devices: the device manager that places its models' instances;
            defaults to :meth:`DeviceManager.default`.
        max_resident_models: the most models added with ``on_demand=True``
            loaded at once; past it, the least recently used is unloaded
            (idle ones first, each after its requests in flight). ``None``:
            no limit. Added in 0.4.
        max_resident_memory: the most memory, by device name (such as
            ``{"cuda:0": 20 * 2**30}``), that on-demand models may take
            there, as measured when each loads (on devices that report
            their free memory). Added in 0.4.

    Example:
        >>> runtime = mds.Runtime()
        >>> runtime.add_model("doubler", Doubler)
        >>> async with runtime:
        ...     assert await runtime.serve("doubler", 2.0) == 4.0

    Added in 0.1.
    """

    def __init__(
        self,
        *,
        fail_fast: bool = True,
        devices: DeviceManager | None = None,
        max_resident_models: int | None = None,
        max_resident_memory: Mapping[str, int] | None = None,
    ) -> None:
        self.fail_fast = fail_fast
        self.devices: DeviceManager = devices if devices is not None else DeviceManager.default()
        self._versions: dict[str, ModelVersions] = {}
        self._pipelines: dict[str, PipelineRuntime] = {}
        self._servables: dict[str, Servable] = {}  # both, by name: what requests name
        self._unloaded: dict[str, ModelVersions] = {}  # every version unloaded
        self._locks: dict[str, anyio.Lock] = {}  # one load or unload of a model at a time
        self._hosting = Hosting(self)
        self._residency = Residency(
            self._hosting, self.devices, max_resident_models, max_resident_memory
        )
        # What runs beside the models while the runtime runs (a repository's watch).
        self._companions: list[Callable[[], Coroutine[Any, Any, None]]] = []
        # The queue workers serving from it, by name: in its health and statistics.
        self._workers: dict[str, Reporting] = {}
        self._home = Home(self._not_running)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        pipelines = f" pipelines={sorted(self._pipelines)}" if self._pipelines else ""
        return f"<Runtime {state} models={sorted(self._versions)}{pipelines}>"

    @property
    def running(self) -> bool:
        """Whether the runtime is started and not yet stopped."""
        return self._hosting.open

    @property
    def models(self) -> Mapping[str, ModelRuntime[Any, Any]]:
        """Each model's default version, by name (read-only; a new mapping each time).

        :meth:`versions` has all of a model's versions.
        """
        return MappingProxyType({name: v.runtime() for name, v in sorted(self._versions.items())})

    def versions(self, name: str) -> ModelVersions:
        """The versions of the model called ``name``, and how requests are routed to them.

        Raises:
            ModelNotFound: there is no such model; the message lists the names.

        Added in 0.4.
        """
        found = self._versions.get(name)
        if found is None:
            raise self._no_model(name)
        return found

    def _no_model(self, name: str) -> ModelNotFound:
        known = ", ".join(repr(n) for n in sorted(self._versions)) or "none"
        pipelines = ", ".join(repr(n) for n in sorted(self._pipelines))
        extra = f"; pipelines: {pipelines}" if pipelines else ""
        return ModelNotFound(f"no model named {quote(name)}; this runtime serves: {known}{extra}")

    def _all_runtimes(self) -> list[ModelRuntime[Any, Any]]:
        """The models to start with the runtime: all but those loaded on demand."""
        return [m for v in self._versions.values() for m in v.runtimes.values() if not m.on_demand]

    def add_model(
        self,
        name: str,
        handler: ModelHandler[RequestT, ResponseT]
        | Callable[[], ModelHandler[RequestT, ResponseT]],
        config: ModelConfig | None = None,
        *,
        version: str = "1",
        policy: VersionPolicy | None = None,
        on_demand: bool = False,
    ) -> ModelRuntime[RequestT, ResponseT]:
        """Add a model, or another version of one; it starts with the runtime.

        Versions of one name are served side by side: requests that name no
        version go to the highest (see :meth:`set_traffic`). To add or
        replace a version while the runtime runs, use :meth:`load_model`.

        Args:
            name: the name requests use; letters, digits, ``_``, ``.``, ``-``.
            handler: a handler object, or a factory (such as its class) that
                makes one per instance.
            config: the model's serving policy.
            version: the model's version; letters, digits, ``_``, ``.``, ``-``.
            policy: which of the model's versions stay loaded (by default,
                or as set before, the latest one): see :class:`VersionPolicy`.
            on_demand: do not load it when the runtime starts: its first
                request does (one load, however many requests wait for it),
                and it may be unloaded when idle to make room for another
                (see ``max_resident_models``). It counts as ready meanwhile.

        Returns:
            The version's :class:`ModelRuntime`, typed with the handler's
            request and response types.

        Raises:
            ConfigError: the name (or this version of it) is taken or not
                allowed, or the version policy would not keep it.
            LifecycleError: the runtime is already running.

        Added in 0.1; several versions, ``policy`` and ``on_demand`` in 0.4.
        """
        if self.running:
            raise LifecycleError(
                f"cannot add model {name!r} to a running runtime; add models before "
                "starting it, or load it with Runtime.load_model"
            )
        check_name(name)
        check_name(version, "version")
        if name in self._pipelines:
            raise ConfigError(f"a pipeline named {name!r} was already added")
        versions = self._versions.get(name)
        if versions is None:
            versions = ModelVersions(name, self._home, policy)
        elif version in versions.runtimes:
            raise ConfigError(f"model {name!r}, version {version!r} was already added")
        policy = policy or versions.policy
        dropped = (set(versions.runtimes) | {version}) - policy.keeps([*versions.runtimes, version])
        if dropped:
            raise ConfigError(
                f"model {name!r}: the version policy ({policy}) would not keep version "
                f"{', '.join(sorted(dropped))}; pass policy=mds.VersionPolicy(all=True) "
                "(or latest=N) to serve several versions"
            )
        model = ModelRuntime(handler, config, name=name, version=version, devices=self.devices)
        model._sequence_ends = versions.sequence_ends
        if on_demand:
            self._residency.adopt(model)
        versions.policy = policy
        versions._install(model, default=not versions.runtimes or _newest(version, versions))
        self._versions[name] = versions
        self._servables[name] = versions
        return model

    @property
    def pipelines(self) -> Mapping[str, PipelineRuntime]:
        """The pipelines, by name (read-only)."""
        return MappingProxyType(self._pipelines)

    def add_pipeline(self, pipeline: Pipeline) -> PipelineRuntime:
        """Add a pipeline; its model nodes start with the runtime.

        Each model node with a handler becomes the model
        ``<pipeline>.<node>``, with the node's config; a node that names a
        model uses that model of this runtime (add it first). A node that
        cannot be reached from the start is not loaded.

        Returns:
            The :class:`PipelineRuntime` that serves it.

        Raises:
            ConfigError: the name is taken (by a model or a pipeline), or a
                node names a model this runtime does not have.
            LifecycleError: the runtime is already running.
        """
        name = pipeline.name
        if self.running:
            raise LifecycleError(
                f"cannot add pipeline {name!r} to a running runtime; add it before starting"
            )
        if name in self._versions or name in self._pipelines:
            raise ConfigError(f"a model or pipeline named {name!r} was already added")
        models: dict[str, ModelVersions] = {}
        reachable = pipeline.reachable()
        nodes = [
            node
            for node in pipeline.nodes.values()
            if isinstance(node, ModelNode) and node.name in reachable
        ]
        for node in nodes:
            if node.model_name is None:
                continue
            if node.model_name not in self._versions:
                known = ", ".join(repr(n) for n in sorted(self._versions)) or "none"
                raise ConfigError(
                    f"pipeline {name!r}, node {node.name!r}: no model named "
                    f"{node.model_name!r} in this runtime (add it before the pipeline); "
                    f"models: {known}"
                )
            models[node.name] = self._versions[node.model_name]
        own = [(node, f"{name}.{node.name}") for node in nodes if node.model_name is None]
        for _, model_name in own:
            if model_name in self._versions:
                raise ConfigError(
                    f"pipeline {name!r}: a model named {model_name!r} was already added"
                )
        for node, model_name in own:
            assert node.handler is not None
            self.add_model(model_name, node.handler, node.config, version=node.version)
            models[node.name] = self._versions[model_name]
        served = PipelineRuntime(pipeline, models, home=self._home)
        self._pipelines[name] = self._servables[name] = served
        return served

    @property
    def servables(self) -> Mapping[str, Servable]:
        """Every model and pipeline, by name (read-only; a new mapping each time).

        Added in 0.3.
        """
        return MappingProxyType(dict(sorted(self._servables.items())))

    def pipeline(self, name: str) -> PipelineRuntime:
        """The pipeline called ``name``.

        Raises:
            ModelNotFound: there is no such pipeline; the message lists the names.
        """
        try:
            return self._pipelines[name]
        except KeyError:
            known = ", ".join(repr(n) for n in sorted(self._pipelines)) or "none"
            raise ModelNotFound(f"no pipeline named {name!r}; pipelines: {known}") from None

    def servable(self, name: str, version: str | None = None) -> Servable:
        """The model or pipeline called ``name``; pinned to ``version`` if given.

        For a model this is its :class:`ModelVersions`, which routes each
        request to a version; with ``version``, a servable that serves with
        that version alone (looked up at each call, so a reload of it takes
        effect).

        Raises:
            ModelNotFound: there is no such model or pipeline, or it has no
                such version; the message lists what there is.

        Added in 0.3.
        """
        found = self._servables.get(name)
        if found is None:
            raise self._no_model(name)
        if version is None:
            return found
        if isinstance(found, ModelVersions):
            return found.pinned(version)
        if version not in found.versions:
            have = ", ".join(found.versions)
            raise ModelNotFound(f"no version {version!r}; it has version {have}", model=name)
        return found

    def model(self, name: str, version: str | None = None) -> ModelRuntime[Any, Any]:
        """The :class:`ModelRuntime` of model ``name``: its default version, or ``version``.

        Raises:
            ModelNotFound: there is no such model or version; the message
                lists the names.

        Added in 0.1; ``version`` in 0.4.
        """
        return self.versions(name).runtime(version)

    # -- lifecycle ----------------------------------------------------------

    def run(self, *, load: Load = "wait") -> AbstractAsyncContextManager[Runtime]:
        """The runtime's lifetime, as ``async with runtime`` but with a choice of loading.

        Args:
            load: ``"wait"``: entering returns once every model is ready (or,
                with ``fail_fast``, raises if one failed). ``"background"``:
                entering returns at once and the models load meanwhile; the
                runtime is live, readiness says which model is still loading
                (or failed, and why), and a request to a model that is not
                ready yet gets :class:`NotReady` (a 503). A model that fails
                stays ``FAILED``, whatever ``fail_fast`` says; leaving stops
                models still loading. Servers want this: a load that takes
                minutes must not keep a liveness probe from being answered.

        Example:
            >>> async with runtime.run(load="background"):
            ...     ...  # health probes answer at once; models come ready

        Added in 0.3.
        """
        return _Lifetime(self, load)

    async def __aenter__(self) -> Self:
        await self._enter("wait")
        return self

    def start_sync(self, *, load: Load = "wait") -> None:
        """Start in mds's background event loop, for code with no loop of its own.

        Blocks until every model is ready (``load="wait"``), or only until
        the runtime runs and its models are loading (``"background"``, see
        :meth:`run`). Pair with :meth:`stop_sync`, or use ``with``; whatever
        is still running at interpreter exit is stopped then.

        Raises:
            LifecycleError: already started, or (waiting, with ``fail_fast``)
                a model failed to start.

        Added in 0.1; ``load`` in 0.3.
        """
        self._start_sync(self.run(load=load))

    async def _enter(self, load: Load) -> None:
        if self.running:
            raise LifecycleError(f"{self!r} is already running")
        await self._home.open()
        try:
            await self._hosting.enter()
        except BaseException:  # pragma: no cover - entering a task group does not fail
            await self._home.close()
            raise
        try:
            if load == "background":
                self._hosting.start_all_in_background(self._all_runtimes())
            else:
                await self._load_or_fail()
            for companion in self._companions:
                self._hosting.start_soon(companion)
        except BaseException:
            await self._close(cancel=False)
            raise
        _current.started(self)

    async def _load_or_fail(self) -> None:
        models = self._all_runtimes()
        failures = await self._hosting.start_all(models)
        if failures and self.fail_fast:
            names = "; ".join(
                f"{model.name!r}: {model.failure or exc}" for model, exc in failures.items()
            )
            raise LifecycleError(
                f"{len(failures)} of {len(models)} models failed to start: {names}"
            ) from next(iter(failures.values()))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.running:
            return
        try:
            # Leaving on an error: stop at once, without waiting for a drain.
            await self._close(cancel=exc_type is not None)
        finally:
            _current.stopped(self)

    async def _close(self, *, cancel: bool) -> None:
        """Stop every model (draining unless ``cancel``), then stop taking calls."""
        try:
            await self._hosting.close(cancel=cancel)
        finally:
            await self._home.close()

    async def start_model(self, name: str) -> None:
        """Start one model (its default version) again, after a failure or a stop.

        Raises:
            ModelNotFound: no such model.
            LifecycleError: the runtime is not running, the model is already
                running, or it failed to start again (cause chained).
        """
        model = self.model(name)
        if not self.running:
            raise LifecycleError(f"{self!r} is not running; start it first")
        if self._hosting.hosts(model):
            raise LifecycleError(f"model {name!r} is already {model.state.value}")
        await self._hosting.start(model)

    async def stop_model(self, name: str) -> None:
        """Stop one model's default version (drain, then teardown); the others go on serving.

        It stays in the runtime, ``STOPPED``, and :meth:`start_model` starts
        it again; :meth:`unload_model` removes it.

        Raises:
            ModelNotFound: no such model.
            LifecycleError: the model is not running.
        """
        if not await self._hosting.stop(self.model(name)):
            raise LifecycleError(f"model {name!r} is not running")

    def _not_running(self) -> MdsError:
        return NotReady(
            f"{self!r} is not running; start it first (async with runtime, or runtime.start_sync())"
        )

    # -- what callers can read ----------------------------------------------

    def health(self) -> Coroutine[Any, Any, RuntimeHealth]:
        """Liveness and readiness, overall and for each model. Await it."""
        return self._home.call(self._health)

    async def _health(self) -> RuntimeHealth:
        reports: dict[str, ModelHealth] = {}

        async def check(name: str, model: ModelVersions) -> None:
            reports[name] = await model._health()

        async with anyio.create_task_group() as tasks:
            for name, model in self._versions.items():
                tasks.start_soon(check, name, model)
        return self._health_of(reports)

    def _health_of(self, reports: Mapping[str, ModelHealth]) -> RuntimeHealth:
        models = {name: reports[name] for name in sorted(reports)}
        pipelines = {
            name: self._pipelines[name].health_from(models) for name in sorted(self._pipelines)
        }
        live = self.running
        return RuntimeHealth(
            live=live,
            ready=live and all(h.ready for h in models.values()),
            models=models,
            pipelines=pipelines,
            workers={name: w.health() for name, w in sorted(self._workers.copy().items())},
        )

    def health_sync(self) -> RuntimeHealth:
        """Blocking form of :meth:`health`, for threads with no event loop."""
        if self._home.portal is None:  # not running: nothing to drain, nothing is ready
            return process_portal().call(self._health)
        return self._home.call_sync(self._health)

    def residency(self) -> ResidencyStatistics:
        """How on-demand models were loaded and unloaded: see ``max_resident_models``.

        Added in 0.4.
        """
        return self._residency.statistics()

    def statistics(self) -> dict[str, ModelStatistics]:
        """Each model's counters (its default version's), by name.

        Every loaded version's: ``runtime.versions(name).runtimes[v].statistics()``.
        """
        return {name: model.statistics() for name, model in sorted(self._versions.items())}

    def pipeline_statistics(self) -> dict[str, PipelineStatistics]:
        """Each pipeline's counters and its nodes', by name.

        Added in 0.5.
        """
        return {name: p.statistics() for name, p in sorted(self._pipelines.items())}

    def worker_statistics(self) -> dict[str, WorkerStatistics]:
        """The counters of each queue worker running on the runtime, by the worker's name.

        Added in 0.5.
        """
        return {name: w.statistics() for name, w in sorted(self._workers.copy().items())}

    def _attach(self, name: str, worker: Reporting) -> None:
        """Report ``worker`` in health and statistics until :meth:`_detach`."""
        if self._workers.get(name, worker) is not worker:
            raise ConfigError(
                f"a worker named {name!r} already runs on this runtime; give each one a name"
            )
        self._workers[name] = worker

    def _detach(self, name: str, worker: Reporting) -> None:
        if self._workers.get(name) is worker:
            del self._workers[name]


def _newest(version: str, versions: ModelVersions) -> bool:
    """Whether ``version`` is above every version ``versions`` has."""
    return all(version_key(version) > version_key(v) for v in versions.runtimes)


class _Lifetime:
    """``async with runtime.run(load=...)``."""

    def __init__(self, runtime: Runtime, load: Load) -> None:
        self._runtime = runtime
        self._load = load

    async def __aenter__(self) -> Runtime:
        await self._runtime._enter(self._load)
        return self._runtime

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._runtime.__aexit__(exc_type, exc, tb)
