"""A model repository that a runtime serves, and follows as it changes."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec

from .._errors import ConfigError, InvalidInput, LifecycleError, MdsError, ModelNotFound
from .._handler import ModelState
from .._runtime import Runtime
from .layout import CONFIG_FILE, Folder, ModelFolder, ModelSpec, factory, read, revise

__all__ = ["ModelRepository"]

logger = logging.getLogger("mds.repository")

Stamp = tuple[Any, ...]


@dataclass(frozen=True)
class _Entry:
    """One line of the protocol's repository index."""

    name: str
    version: str | None = None
    state: str | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, str]:
        found = {"name": self.name}
        for key in ("version", "state", "reason"):
            value = getattr(self, key)
            if value is not None:
                found[key] = value
        return found


# mds's states as the protocol's index names them.
_STATES = {
    ModelState.READY: "READY",
    ModelState.LOADING: "LOADING",
    ModelState.WARMING: "LOADING",
    ModelState.DRAINING: "UNLOADING",
}


class ModelRepository:
    """A folder of models, one sub-folder per version, that a runtime serves.

    Layout: ``<path>/<model>/mds.yaml`` says how the model is served (a
    handler or a backend, its :class:`ModelConfig`, its
    :class:`VersionPolicy`); ``<path>/<model>/<version>/`` holds a version's
    files, such as ``model.onnx``. The guide "Models that evolve" has the details.

    Args:
        path: the repository's folder (read by :meth:`check` and :meth:`add_to`).

    Example:
        >>> repository = mds.ModelRepository("models/")
        >>> repository.add_to(runtime, watch=2.0)

    Added in 0.4.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._runtime: Runtime | None = None
        self._folder = Folder(self.path)
        # What this repository loaded: model -> version -> the stamp of its files and config.
        self._applied: dict[str, dict[str, Stamp]] = {}
        self._failed: dict[tuple[str, str], Stamp] = {}  # loads that failed, until files change
        self._reported: dict[str, tuple[str, ...]] = {}  # problems already logged
        self._held: set[str] = set()  # unloaded on request: left alone until loaded again
        self._overrides: dict[str, ModelSpec] = {}
        self._previous: dict[tuple[str, str], Stamp] = {}  # the last poll's stamps, to settle
        self._missing: set[str] = set()  # models gone at the last poll: unloaded if still gone
        self._lock: anyio.Lock | None = None

    def __repr__(self) -> str:
        return f"<ModelRepository {str(self.path)!r}>"

    # -- checking ---------------------------------------------------------------

    def check(self) -> dict[str, list[str]]:
        """Read and check every model: each model's versions that would load.

        Returns:
            Each model's name, with the versions its policy loads.

        Raises:
            ConfigError: something is wrong; the message lists every
                problem, each with its file (and field).
        """
        folder = read(self.path)
        problems = folder.problems
        if problems:
            raise ConfigError(
                f"{self.path}: {len(problems)} problems in the model repository:\n- "
                + "\n- ".join(problems)
            )
        return {name: [v.version for v in m.wanted()] for name, m in folder.models.items()}

    # -- serving ------------------------------------------------------------------

    def add_to(self, runtime: Runtime, *, watch: float | None = None) -> None:
        """Add every model of the repository (the versions its policy keeps) to ``runtime``.

        Args:
            runtime: a runtime not yet started; the models start with it.
            watch: while the runtime runs, read the repository every
                ``watch`` seconds and apply what changed: a new version is
                loaded with a warm swap, a removed one drained and
                unloaded, a changed config reloads the model. A version
                counts once its files have stayed the same for one whole
                interval. A version that fails to load is reported (logs,
                :meth:`index`) and the one before goes on serving.

        Raises:
            ConfigError: a problem in the repository (all are listed), or a
                name the runtime already has.
            LifecycleError: the runtime is running, or this repository
                was already added to a runtime.
        """
        if self._runtime is not None:
            raise LifecycleError(f"{self!r} was already added to {self._runtime!r}")
        if runtime.running:
            raise LifecycleError(f"add {self!r} to a runtime before starting it")
        if watch is not None and not watch > 0:
            raise ConfigError(f"watch: {watch!r} is not a positive number of seconds")
        self.check()
        folder = read(self.path)
        for name, model in folder.models.items():
            spec = model.spec
            assert spec is not None
            for version in model.wanted():
                runtime.add_model(
                    name,
                    factory(model, version),
                    spec.config,
                    version=version.version,
                    policy=spec.version_policy,
                    on_demand=spec.on_demand,
                )
                self._applied.setdefault(name, {})[version.version] = _stamp(model, version)
        self._folder = folder
        self._runtime = runtime
        if watch is not None:
            runtime._companions.append(lambda: self._watch(watch))

    async def _watch(self, interval: float) -> None:
        while True:
            await anyio.sleep(interval)
            try:
                await self._refresh(settle=True)
            except Exception:  # the watch goes on; the next read may do better
                logger.exception("%r: reading the repository failed", self)

    def refresh(self) -> Coroutine[Any, Any, None]:
        """Apply what changed in the repository now, as the watch does. Await it.

        Raises:
            LifecycleError: the repository was not added to a runtime.
        """
        return self._on_loop(self._refresh, False)

    def load(self, name: str, config: str | None = None) -> Coroutine[Any, Any, None]:
        """Load (or reload) one model from the repository, as the protocol's load route does.

        Versions whose files changed are loaded with a warm swap; a version
        that failed before is tried again. Await it.

        Args:
            name: the model's folder name.
            config: a JSON document that replaces the model's ``mds.yaml``
                (from now on, until a load without one).

        Raises:
            ModelNotFound: no such model in the repository.
            InvalidInput: a bad ``config``.
            ConfigError: a problem in the model's files.
            LifecycleError: a version failed to load (the one before goes on
                serving).
        """
        return self._on_loop(self._load, name, config)

    def load_sync(self, name: str, config: str | None = None) -> None:
        """Blocking form of :meth:`load`, for threads with no event loop."""
        self._bound()._home.call_sync(self._load, name, config)

    def unload(self, name: str) -> Coroutine[Any, Any, None]:
        """Unload every version of a model, and leave it unloaded until :meth:`load`.

        Await it.

        Raises:
            ModelNotFound: the runtime has no such model.
        """
        return self._on_loop(self._unload, name)

    def unload_sync(self, name: str) -> None:
        """Blocking form of :meth:`unload`."""
        self._bound()._home.call_sync(self._unload, name)

    def refresh_sync(self) -> None:
        """Blocking form of :meth:`refresh`."""
        self._bound()._home.call_sync(self._refresh, False)

    def index(self, *, ready: bool = False) -> list[dict[str, str]]:
        """The protocol's repository index: every model and each version's state.

        A model of the repository that was never loaded is listed by name
        alone; a version that failed or was unloaded is ``UNAVAILABLE``, with
        the reason.

        Args:
            ready: list only the versions that are ready.
        """
        runtime = self._bound()
        entries: list[_Entry] = []
        listed: set[str] = set()
        for status in runtime.index():
            listed.add(status.name)
            state = _STATES.get(status.state, "UNAVAILABLE")
            reason = status.reason
            if status.on_demand and status.state in (ModelState.CREATED, ModelState.STOPPED):
                state, reason = "READY", "loads on its first request"
            elif reason is None and state == "UNAVAILABLE":
                reason = status.state.value
            problems = self._reported.get(status.name)
            if problems and reason is None:
                reason = "its files have problems, so it is not reloaded: " + "; ".join(problems)
            entries.append(_Entry(status.name, status.version, state, reason))
        for name, model in self._folder.models.items():
            if name not in listed:
                problem = "; ".join(model.problems) or None
                entries.append(_Entry(name, None, problem and "UNAVAILABLE", problem))
        if ready:
            entries = [e for e in entries if e.state == "READY"]
        return [e.to_json() for e in sorted(entries, key=lambda e: (e.name, e.version or ""))]

    # -- in the runtime's loop ------------------------------------------------------

    def _bound(self) -> Runtime:
        if self._runtime is None:
            raise LifecycleError(f"{self!r} was not added to a runtime (ModelRepository.add_to)")
        return self._runtime

    def _on_loop(
        self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any
    ) -> Coroutine[Any, Any, None]:
        runtime = self._bound()
        if not runtime.running:
            raise LifecycleError(f"{runtime!r} is not running; start it first")
        return runtime._home.call(fn, *args)

    def _guard(self) -> anyio.Lock:
        if self._lock is None:
            self._lock = anyio.Lock()
        return self._lock

    async def _refresh(self, settle: bool) -> None:
        async with self._guard():
            folder = await anyio.to_thread.run_sync(read, self.path)
            self._folder = folder
            for name, model in folder.models.items():
                if name in self._held:
                    continue
                override = self._overrides.get(name)
                if override is not None:
                    model = await anyio.to_thread.run_sync(revise, model, override)
                if settle and not self._settled(model):
                    continue
                await self._apply(model, quiet=True)
            for name in set(self._applied) - set(folder.models):
                if await anyio.Path(self.path / name).is_dir():  # its mds.yaml is rewritten, say
                    self._report(name, (f"{self.path / name / CONFIG_FILE} is missing",))
                    continue
                if settle and name not in self._missing:
                    self._missing.add(name)  # gone twice in a row before it is unloaded
                    continue
                self._missing.discard(name)
                logger.info("%r: model %r was removed; unloading it", self, name)
                await self._unload_applied(name)
            self._missing &= set(self._applied) - set(folder.models)
            for key in [k for k in self._previous if k[0] not in folder.models]:
                del self._previous[key]

    def _settled(self, model: ModelFolder) -> bool:
        """Whether ``model``'s files are as the last poll saw them (a copy has finished)."""
        now: dict[tuple[str, str], Stamp] = {(model.name, ""): (model.stamp,)}
        now.update({(model.name, v): version.stamp for v, version in model.versions.items()})
        before = {key: self._previous.get(key) for key in now}
        for key, stamp in now.items():
            self._previous[key] = stamp
        return all(before[key] == stamp for key, stamp in now.items())

    async def _apply(self, model: ModelFolder, *, quiet: bool) -> None:
        """Load what changed in ``model``, unload what is gone; a failure keeps what serves."""
        runtime = self._bound()
        name = model.name
        if model.problems:
            self._report(name, tuple(model.problems))
            if quiet:
                return
            raise ConfigError("; ".join(model.problems))
        self._reported.pop(name, None)
        spec = model.spec
        assert spec is not None
        applied = self._applied.setdefault(name, {})
        wanted = model.wanted()
        newest = wanted[-1].version if wanted else None
        errors: list[MdsError] = []
        for version in wanted:
            stamp = _stamp(model, version)
            key = (name, version.version)
            if applied.get(version.version) == stamp and (
                quiet or _serving(runtime, name, version.version)
            ):
                continue  # as loaded; unloaded since by someone: left so, unless asked
            if quiet and self._failed.get(key) == stamp:
                continue  # it failed as it is; try again once its files change
            try:
                make = await anyio.to_thread.run_sync(factory, model, version)
                await runtime.load_model(
                    name,
                    make,
                    spec.config,
                    version=version.version,
                    default=version.version == newest,
                    policy=spec.version_policy,
                    on_demand=spec.on_demand,
                )
            except (LifecycleError, ConfigError) as exc:
                self._failed[key] = stamp
                logger.error("%r: %s", self, exc)
                errors.append(exc)
                continue
            self._failed.pop(key, None)
            applied[version.version] = stamp
        if errors:  # what served goes on serving until a wanted version loads
            if not quiet:
                raise errors[0]
            return
        kept = {v.version for v in wanted}
        for gone in [v for v in applied if v not in kept]:
            del applied[gone]
            if _serving(runtime, name, gone):
                await runtime.unload_model(name, gone)

    def _report(self, name: str, problems: tuple[str, ...]) -> None:
        """Log ``name``'s problems once (until they change); what serves goes on serving."""
        if self._reported.get(name) != problems:
            self._reported[name] = problems
            serving = "; what was loaded goes on serving" if name in self._applied else ""
            logger.error("%r: model %r: %s%s", self, name, "; ".join(problems), serving)

    async def _load(self, name: str, config: str | None) -> None:
        async with self._guard():
            folder = await anyio.to_thread.run_sync(read, self.path)
            self._folder = folder
            model = folder.models.get(name)
            if model is None:
                known = ", ".join(repr(n) for n in sorted(folder.models)) or "none"
                raise ModelNotFound(
                    f"no model {name!r} in the repository at {self.path} (a folder with "
                    f"{CONFIG_FILE}); it has: {known}"
                )
            if config is not None:
                try:
                    spec = msgspec.json.decode(config, type=ModelSpec)
                except (msgspec.ValidationError, msgspec.DecodeError, ConfigError) as exc:
                    raise InvalidInput(f"model {name!r}: the config given to load: {exc}") from None
                model = await anyio.to_thread.run_sync(revise, model, spec)
                if model.problems:  # the caller's config is at fault: kept only if it works
                    raise InvalidInput(
                        f"model {name!r}: the config given to load: " + "; ".join(model.problems)
                    )
                self._overrides[name] = spec
            else:
                self._overrides.pop(name, None)
            self._held.discard(name)
            for key in [k for k in self._failed if k[0] == name]:
                del self._failed[key]
            await self._apply(model, quiet=False)

    async def _unload(self, name: str) -> None:
        async with self._guard():
            runtime = self._bound()
            runtime.versions(name)  # raises ModelNotFound
            self._held.add(name)
            self._applied.pop(name, None)
            await runtime.unload_model(name)

    async def _unload_applied(self, name: str) -> None:
        runtime = self._bound()
        for version in self._applied.pop(name, {}):
            if _serving(runtime, name, version):
                await runtime.unload_model(name, version)


def _stamp(model: ModelFolder, version: Any) -> Stamp:
    return (model.stamp, version.stamp, model.spec)


def _serving(runtime: Runtime, name: str, version: str) -> bool:
    try:
        runtime.versions(name).runtime(version)
    except ModelNotFound:
        return False
    return True
