"""Many models in little memory: on-demand models loaded on first use, least recently used out.

A model added with ``on_demand=True`` does not start with the runtime. Its
first request loads it (one load, however many requests arrive meanwhile);
when the runtime holds its limit of such models, or their measured memory
on a device passes its limit, the least recently used one is unloaded:
idle ones first, and each only after its requests in flight are answered.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import anyio
import msgspec

from ._devices.device import Device
from ._devices.manager import DeviceManager
from ._errors import ConfigError, DeadlineExceeded, NotReady
from ._hosting import Hosting
from ._model import ModelRuntime

__all__ = ["RETRY_AFTER", "Residency", "ResidencyStatistics"]

#: Seconds after a failed on-demand load before a request tries it again.
RETRY_AFTER = 5.0

logger = logging.getLogger("mds.runtime")


class ResidencyStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """How a runtime's on-demand models came and went.

    Attributes:
        max_models: the most on-demand models loaded at once (``None``: no limit).
        max_memory: the most memory, by device, they may take there.
        resident: the on-demand models loaded now (``name:version``), least
            recently used first.
        memory: what each resident model was measured to take, by device,
            where the device reports its free memory.
        hits: requests that found their model loaded.
        misses: requests that had to wait for their model to load.
        loads: loads of on-demand models (``failed_loads`` of them failed).
        failed_loads: loads that failed.
        evictions: models unloaded to make room.
        load_seconds: time spent loading, in total.

    Added in 0.4.
    """

    max_models: int | None
    max_memory: dict[str, int]
    resident: tuple[str, ...]
    memory: dict[str, dict[str, int]]
    hits: int
    misses: int
    loads: int
    failed_loads: int
    evictions: int
    load_seconds: float


class Residency:
    """The runtime's on-demand models, by recency of use; loads and evicts them."""

    def __init__(
        self,
        hosting: Hosting,
        devices: DeviceManager,
        max_models: int | None,
        max_memory: Mapping[str, int] | None,
    ) -> None:
        if max_models is not None and max_models < 1:
            raise ConfigError(f"max_resident_models: {max_models!r} is not 1 or more")
        memory: dict[str, int] = {}
        for name, size in (max_memory or {}).items():
            try:
                device = Device.parse(name)
            except ValueError as exc:
                raise ConfigError(f"max_resident_memory: {exc}") from None
            if not (isinstance(size, int) and size > 0):
                raise ConfigError(f"max_resident_memory[{name!r}]: {size!r} is not a byte count")
            memory[str(device)] = size
        self._hosting = hosting
        self._devices = devices
        self.max_models = max_models
        self.max_memory = memory
        self._lru: OrderedDict[ModelRuntime[Any, Any], None] = OrderedDict()
        self._loading: dict[ModelRuntime[Any, Any], anyio.Event] = {}
        self._admitted: set[ModelRuntime[Any, Any]] = set()  # loading, with a slot
        self._forgotten: weakref.WeakSet[ModelRuntime[Any, Any]] = weakref.WeakSet()
        self._wanted: dict[ModelRuntime[Any, Any], int] = {}  # requests waiting for a load
        self._change: anyio.Event | None = None
        self._leaving: dict[ModelRuntime[Any, Any], anyio.Event] = {}
        self._footprint: dict[ModelRuntime[Any, Any], dict[str, int]] = {}  # while loaded
        self._measured: dict[ModelRuntime[Any, Any], dict[str, int]] = {}  # when last loaded
        self._failures: dict[ModelRuntime[Any, Any], tuple[float, str]] = {}  # when, why
        self.hits = self.misses = self.loads = self.failed_loads = self.evictions = 0
        self.load_seconds = 0.0

    def adopt(self, model: ModelRuntime[Any, Any]) -> None:
        """Serve ``model`` on demand: its requests load it (see :meth:`wake`)."""
        model._on_demand = self

    def touch(self, model: ModelRuntime[Any, Any]) -> None:
        """A request found ``model`` loaded: it is now the most recently used."""
        self.hits += 1
        if model in self._lru:
            self._lru.move_to_end(model)

    async def wake(self, model: ModelRuntime[Any, Any], timeout: float | None) -> float | None:
        """Load ``model`` for a request that found it not loaded; one load for all who wait.

        The load runs in a task of its own: a request whose ``timeout``
        passes meanwhile gets :class:`DeadlineExceeded`, and the load goes
        on for the others. Returns what is left of ``timeout``.
        """
        self.misses += 1
        failed = self._failures.get(model)
        now = anyio.current_time()
        if failed is not None and now - failed[0] < RETRY_AFTER:
            raise NotReady(
                f"not ready: loading it on demand failed {now - failed[0]:.1f} s ago: "
                f"{failed[1]}; the next load is tried {RETRY_AFTER:g} s after that one",
                model=model.name,
                version=model.version,
            )
        self._wanted[model] = self._wanted.get(model, 0) + 1
        try:
            with anyio.fail_after(timeout):
                await self._wait_loaded(model, background=True)
        except TimeoutError:
            raise DeadlineExceeded(
                f"the deadline ({timeout:g} s) passed while the model loaded on demand",
                model=model.name,
                version=model.version,
            ) from None
        finally:
            self._wanted[model] -= 1
            if not self._wanted[model]:
                del self._wanted[model]
        if model in self._lru:
            self._lru.move_to_end(model)
        return None if timeout is None else max(timeout - (anyio.current_time() - now), 1e-9)

    async def load_now(self, model: ModelRuntime[Any, Any]) -> None:
        """Load ``model`` in this task, raising what its start raises (a load asked for)."""
        await self._wait_loaded(model, background=False)

    async def _wait_loaded(self, model: ModelRuntime[Any, Any], *, background: bool) -> None:
        while not _ready(model):
            if model in self._forgotten:  # unloaded or swapped out meanwhile: never loaded again
                raise model._not_ready()
            leaving = self._leaving.get(model)
            if leaving is not None:
                await leaving.wait()
                continue
            loading = self._loading.get(model)
            if loading is not None:
                await loading.wait()
                if _ready(model):
                    break
                failed = self._failures.get(model)
                if failed is not None:
                    raise NotReady(
                        f"not ready: loading it on demand failed: {failed[1]}",
                        model=model.name,
                        version=model.version,
                    )
                continue  # loaded, then unloaded again before this request ran: again
            if not self._hosting.open:
                raise model._not_ready()
            if background:
                self._loading[model] = anyio.Event()
                self._hosting.start_soon(functools.partial(self._load_quietly, model))
            else:
                await self._load(model)

    async def _load_quietly(self, model: ModelRuntime[Any, Any]) -> None:
        """:meth:`_load` as a task of its own: its failure is recorded, not raised."""
        try:
            await self._load(model)
        except Exception as exc:  # the waiters read it from _failures
            logger.debug("on-demand load of %r failed: %s", model, exc)

    async def _load(self, model: ModelRuntime[Any, Any]) -> None:
        done = self._loading.get(model) or anyio.Event()
        self._loading[model] = done
        began = anyio.current_time()
        self.loads += 1
        try:
            await self._admit(model)
            before = await anyio.to_thread.run_sync(self._free)
            try:
                await self._hosting.start(model)
            except Exception as exc:
                self.failed_loads += 1
                reason = model.failure or str(exc)
                self._failures[model] = (anyio.current_time(), reason)
                logger.error("on-demand %r failed to load: %s", model, reason)
                raise NotReady(
                    f"not ready: loading it on demand failed: {model.failure or exc}",
                    model=model.name,
                    version=model.version,
                ) from exc
            if model in self._forgotten:  # unloaded or retired while it loaded
                await self._hosting.stop(model)
                raise model._not_ready()
            after = await anyio.to_thread.run_sync(self._free)
            self._footprint[model] = self._measured[model] = {
                device: max(0, before[device] - after[device])
                for device in before
                if device in after and device in self._devices_of(model)
            }
            self._lru[model] = None
            self._failures.pop(model, None)
            logger.info("on-demand %r loaded in %.2f s", model, anyio.current_time() - began)
            await self._fit_memory(model)
        finally:
            self.load_seconds += anyio.current_time() - began
            del self._loading[model]
            self._admitted.discard(model)
            self._changed()
            done.set()

    async def _admit(self, model: ModelRuntime[Any, Any]) -> None:
        """Take a slot under the count limit for ``model``, unloading others to make one.

        Only loads that hold a slot count, so loads waiting for one never
        keep each other out.
        """
        limit = self.max_models
        while limit is not None and len(self._lru) + len(self._admitted) >= limit:
            victim = self._victim(exclude=model)
            if victim is not None:
                await self._evict(victim, "to make room")
                continue
            if self._change is None:  # every slot is loading: wait until one is done
                self._change = anyio.Event()
            await self._change.wait()
        self._admitted.add(model)
        # What it took when it last loaded: make that room first.
        for device, size in self._measured.get(model, {}).items():
            limit_bytes = self.max_memory.get(device)
            while limit_bytes is not None and self._used(device) + size > limit_bytes:
                victim = self._victim(exclude=model)
                if victim is None:
                    break
                await self._evict(victim, f"to make room on {device}")

    def _changed(self) -> None:
        change, self._change = self._change, None
        if change is not None:
            change.set()

    async def _fit_memory(self, model: ModelRuntime[Any, Any]) -> None:
        """Unload least recently used models while a device's limit is passed."""
        for device, limit in self.max_memory.items():
            while self._used(device) > limit:
                victim = self._victim(exclude=model)
                if victim is None:
                    logger.warning(
                        "on-demand models take %d bytes on %s, above its limit of %d, and "
                        "none can be unloaded",
                        self._used(device),
                        device,
                        limit,
                    )
                    break
                await self._evict(victim, f"to stay under the memory limit on {device}")

    def _used(self, device: str) -> int:
        return sum(f.get(device, 0) for m, f in self._footprint.items() if m in self._lru)

    def _victim(self, exclude: ModelRuntime[Any, Any]) -> ModelRuntime[Any, Any] | None:
        """The least recently used resident model, preferring one no request is using or awaits."""
        candidates = [m for m in self._lru if m is not exclude]
        idle = [m for m in candidates if not m._counts.in_flight and m not in self._wanted]
        found = idle or candidates
        return found[0] if found else None

    async def _evict(self, model: ModelRuntime[Any, Any], why: str) -> None:
        del self._lru[model]
        self.evictions += 1
        logger.info("on-demand %r unloaded %s (least recently used)", model, why)
        gone = self._leaving[model] = anyio.Event()
        try:
            await self._hosting.stop(model)  # drains its requests in flight first
        finally:
            del self._leaving[model]
            self._footprint.pop(model, None)
            self._changed()
            gone.set()

    def forget(self, model: ModelRuntime[Any, Any]) -> None:
        """``model`` was unloaded some other way: it no longer counts (nor loads, if loading)."""
        self._lru.pop(model, None)
        self._footprint.pop(model, None)
        self._measured.pop(model, None)
        self._failures.pop(model, None)
        self._forgotten.add(model)

    def _devices_of(self, model: ModelRuntime[Any, Any]) -> set[str]:
        loaded = model._loaded
        if loaded is None:
            return set()
        return {str(instance.device) for instance in loaded.instances}

    def _free(self) -> dict[str, int]:
        """Free memory by device, for the devices with a limit that report it."""
        found: dict[str, int] = {}
        for name in self.max_memory:
            try:
                info = self._devices.info(Device.parse(name))
            except Exception:  # a device that cannot say: not measured
                continue
            if info.free_memory is not None:
                found[name] = info.free_memory
        return found

    def statistics(self) -> ResidencyStatistics:
        # A copy made in one C call: a scrape reads this from another thread
        # while requests move models to the end.
        resident = list(self._lru)
        return ResidencyStatistics(
            max_models=self.max_models,
            max_memory=dict(self.max_memory),
            resident=tuple(f"{m.name}:{m.version}" for m in resident),
            memory={f"{m.name}:{m.version}": dict(self._footprint.get(m, {})) for m in resident},
            hits=self.hits,
            misses=self.misses,
            loads=self.loads,
            failed_loads=self.failed_loads,
            evictions=self.evictions,
            load_seconds=self.load_seconds,
        )


def _ready(model: ModelRuntime[Any, Any]) -> bool:
    return model._ready
