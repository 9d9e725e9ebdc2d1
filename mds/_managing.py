"""Changing a running runtime's models: load, swap, unload, split traffic, roll back."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

import anyio

from ._bridge import Home
from ._config import ModelConfig, VersionPolicy, check_name
from ._devices.manager import DeviceManager
from ._errors import ConfigError, LifecycleError
from ._handler import ModelHandler, RequestT, ResponseT
from ._hosting import Hosting
from ._model import ModelRuntime
from ._residency import Residency
from ._servable import Servable
from ._status import VersionStatus
from ._versions import ModelVersions

if TYPE_CHECKING:
    from ._pipeline.running import PipelineRuntime

__all__ = ["Managing"]

logger = logging.getLogger("mds.runtime")


class Managing:
    """Mixin for :class:`Runtime`: the calls that change which model versions serve.

    Each runs in the runtime's loop, one at a time per model.
    """

    devices: DeviceManager
    _home: Home
    _hosting: Hosting
    _versions: dict[str, ModelVersions]
    _unloaded: dict[str, ModelVersions]
    _pipelines: dict[str, PipelineRuntime]
    _servables: dict[str, Servable]
    _locks: dict[str, anyio.Lock]
    _residency: Residency

    @property
    def running(self) -> bool:
        raise NotImplementedError

    def versions(self, name: str) -> ModelVersions:
        raise NotImplementedError

    def load_model(
        self,
        name: str,
        handler: ModelHandler[RequestT, ResponseT]
        | Callable[[], ModelHandler[RequestT, ResponseT]],
        config: ModelConfig | None = None,
        *,
        version: str,
        default: bool = True,
        policy: VersionPolicy | None = None,
        on_demand: bool = False,
    ) -> Coroutine[Any, Any, ModelRuntime[RequestT, ResponseT]]:
        """Load a model version into the running runtime: a new model, a new version, or a reload.

        A warm, atomic swap. The version is built beside whatever serves
        now: its instances initialised and warmed up (at every batch size
        warm-up runs) and its health checked; only then does it take
        requests. A version it replaces (the same version loaded again, or
        the previous default when the version policy does not keep it)
        takes no new requests from that moment, finishes those it has
        queued and in flight, and then tears down, in the background.
        No request fails or is dropped because of it.
        If the new version fails to initialise, warm up or pass its health
        check, nothing changes: what served goes on serving, the failure is
        raised here and listed by :meth:`index`. Loads of one model happen
        one at a time. Await it; callable from any event loop.

        Args:
            name: the model's name.
            handler: a handler object, or a factory that makes one per instance.
            config: the version's serving policy.
            version: the version to load.
            default: whether the version then takes every request that names
                no version. With ``False`` it serves only requests that name
                it, until :meth:`set_traffic` gives it a share (a canary).
            policy: which of the model's versions stay loaded from now on
                (see :class:`VersionPolicy`); versions it does not keep, and
                that take no traffic, are unloaded once this one serves.
            on_demand: once swapped in (loaded and checked as any other),
                the version may be unloaded when idle and loaded again by a
                request (see :meth:`add_model`).

        Returns:
            The new version's :class:`ModelRuntime`.

        Raises:
            LifecycleError: the runtime is not running, or the version failed
                to load (its cause chained); what served goes on serving.
            ConfigError: a bad name or version, a pipeline's name, or a
                version the policy would not keep.

        Example:
            >>> await runtime.load_model("classifier", ClassifierV2, version="2")

        Added in 0.4.
        """
        return self._home.call(
            self._load, name, handler, config, version, default, policy, on_demand
        )

    async def _load(
        self,
        name: str,
        handler: Any,
        config: ModelConfig | None,
        version: str,
        default: bool,
        policy: VersionPolicy | None,
        on_demand: bool = False,
    ) -> ModelRuntime[Any, Any]:
        if not self.running:
            raise LifecycleError(
                f"{self!r} is not running; add models to a stopped runtime with add_model"
            )
        check_name(name)
        check_name(version, "version")
        if name in self._pipelines:
            raise ConfigError(f"{name!r} is a pipeline; load models, not pipelines")
        async with self._lock(name):
            versions = self._versions.get(name) or self._unloaded.get(name)
            if versions is None:
                versions = ModelVersions(name, self._home, policy)
            policy = policy or versions.policy
            if not default and version not in versions._kept(version, policy):
                raise ConfigError(
                    f"model {name!r}: the version policy ({policy}) would not keep version "
                    f"{version!r}, loaded without traffic (default=False)"
                )
            model = ModelRuntime(handler, config, name=name, version=version, devices=self.devices)
            model._sequence_ends = versions.sequence_ends
            logger.info("model %r: loading version %r", name, version)
            if on_demand:
                self._residency.adopt(model)
            try:
                if on_demand:  # loaded now all the same, so that a bad one never swaps in
                    await self._residency.load_now(model)
                else:
                    await self._hosting.start(model)
                report = await model.health()
                if not report.ready:
                    raise LifecycleError(f"its health check failed: {report.reason}")
            except Exception as exc:
                with anyio.CancelScope(shield=True):
                    self._residency.forget(model)
                    await self._hosting.stop(model)
                reason = model.failure or str(exc)
                versions._failed(version, reason)
                if name not in self._versions:  # a new model: listed by index() as failed
                    self._unloaded[name] = versions
                serving = (
                    f"; version {versions.version} goes on serving"
                    if name in self._versions
                    else ""
                )
                raise LifecycleError(
                    f"model {name!r}: version {version!r} failed to load: {reason}{serving}"
                ) from exc
            except BaseException:
                with anyio.CancelScope(shield=True):
                    self._residency.forget(model)
                    await self._hosting.stop(model)
                raise
            versions.policy = policy
            replaced = versions._install(model, default=default)
            self._unloaded.pop(name, None)
            self._versions[name] = self._servables[name] = versions
            retired = ([replaced] if replaced is not None else []) + versions._prune()
            logger.info("model %r: version %r serves; traffic %s", name, version, versions.traffic)
            for old in retired:
                self._residency.forget(old)
                await self._hosting.stop(old, wait=False)  # it drains, then tears down
        return model

    def load_model_sync(
        self,
        name: str,
        handler: ModelHandler[RequestT, ResponseT]
        | Callable[[], ModelHandler[RequestT, ResponseT]],
        config: ModelConfig | None = None,
        *,
        version: str,
        default: bool = True,
        policy: VersionPolicy | None = None,
        on_demand: bool = False,
    ) -> ModelRuntime[RequestT, ResponseT]:
        """Blocking form of :meth:`load_model`, for threads with no event loop.

        Added in 0.4.
        """
        return self._home.call_sync(
            self._load, name, handler, config, version, default, policy, on_demand
        )

    def unload_model(self, name: str, version: str | None = None) -> Coroutine[Any, Any, None]:
        """Unload a version of a model, or all of them; returns once they are torn down.

        Each version takes no new requests, finishes those it has, then
        tears down. Unloading the version that takes the traffic moves the
        traffic to the highest version left. Unloading every version
        removes the model: requests that name it get :class:`ModelNotFound`
        until it is loaded again. Await it; callable from any event loop.

        Raises:
            ModelNotFound: no such model or version.

        Added in 0.4.
        """
        return self._home.call(self._unload, name, version)

    async def _unload(self, name: str, version: str | None) -> None:
        versions = self.versions(name)
        async with self._lock(name):
            targets = [version] if version is not None else list(versions.runtimes)
            for each in targets:
                versions.runtime(each)  # raises if not loaded
            removed = [versions._remove(each) for each in targets]
            if not versions.runtimes:
                del self._versions[name], self._servables[name]
                self._unloaded[name] = versions
            logger.info("model %r: unloading version %s", name, ", ".join(targets))
            for model in removed:
                self._residency.forget(model)
                await self._hosting.stop(model)

    def unload_model_sync(self, name: str, version: str | None = None) -> None:
        """Blocking form of :meth:`unload_model`.

        Added in 0.4.
        """
        self._home.call_sync(self._unload, name, version)

    def set_traffic(self, name: str, weights: Mapping[str, float]) -> Coroutine[Any, Any, None]:
        """Split the requests that name no version among loaded versions, by weight.

        ``{"1": 90, "2": 10}`` sends about one request in ten to version 2
        (a canary), picked at random per request; ``{"2": 1}`` sends them
        all to version 2. A request that names a version still gets that
        version. Versions that no longer take traffic are unloaded if the
        version policy does not keep them. Await it.

        Raises:
            ModelNotFound: no such model, or a version that is not loaded.
            ConfigError: a negative weight, or no weight above 0.

        Added in 0.4.
        """
        return self._home.call(self._set_traffic, name, dict(weights))

    def set_traffic_sync(self, name: str, weights: Mapping[str, float]) -> None:
        """Blocking form of :meth:`set_traffic`.

        Added in 0.4.
        """
        self._home.call_sync(self._set_traffic, name, dict(weights))

    async def _set_traffic(self, name: str, weights: dict[str, float]) -> None:
        versions = self.versions(name)
        async with self._lock(name):
            versions._route(weights)
            await self._rerouted(name, versions)

    async def _rerouted(self, name: str, versions: ModelVersions) -> None:
        logger.info("model %r: traffic %s", name, versions.traffic)
        for old in versions._prune():
            self._residency.forget(old)
            await self._hosting.stop(old, wait=False)

    def rollback(self, name: str) -> Coroutine[Any, Any, dict[str, float]]:
        """Route traffic as it was before the last change (a load or :meth:`set_traffic`).

        Only while the versions it went to are still loaded: keep the
        previous version with ``VersionPolicy(latest=2)`` to be able to
        roll back to it. Await it.

        Returns:
            The traffic split now (see :attr:`ModelVersions.traffic`).

        Raises:
            ModelNotFound: no such model.
            LifecycleError: no earlier split whose versions are all loaded.

        Added in 0.4.
        """
        return self._home.call(self._rollback, name)

    def rollback_sync(self, name: str) -> dict[str, float]:
        """Blocking form of :meth:`rollback`.

        Added in 0.4.
        """
        return self._home.call_sync(self._rollback, name)

    async def _rollback(self, name: str) -> dict[str, float]:
        versions = self.versions(name)
        async with self._lock(name):
            previous = versions._previous()
            if previous is None:
                raise LifecycleError(
                    f"model {name!r}: nothing to roll back to; the versions it served before "
                    f"are no longer loaded (version policy: {versions.policy}; keep them with "
                    "VersionPolicy(latest=2))"
                )
            versions._route(previous, remember=False)
            await self._rerouted(name, versions)
        return versions.traffic

    def index(self) -> list[VersionStatus]:
        """Every model version this runtime serves, failed to load, or unloaded, by name.

        Added in 0.4.
        """
        found = {**self._unloaded, **self._versions}
        return [status for name in sorted(found) for status in found[name].status()]

    def _lock(self, name: str) -> anyio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = anyio.Lock()
        return lock
