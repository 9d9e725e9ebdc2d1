"""The device manager: finds devices, places instances, budgets CPU threads."""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, ClassVar

from .._errors import ConfigError, DeviceError
from .device import Device, DeviceInfo
from .kinds import CpuKind, CudaKind, DeviceKind, MpsKind, usable_cores

if TYPE_CHECKING:
    from .._config import ModelConfig

__all__ = ["DeviceManager", "Placer"]

logger = logging.getLogger("mds.devices")

#: Environment variable that gives this process's worker index.
WORKER_INDEX_ENV = "MDS_WORKER_INDEX"


class DeviceManager:
    """Finds devices through their kinds and places model instances on them.

    The default manager (:meth:`default`) knows the CPU, CUDA GPUs and Apple
    MPS; the GPU kinds ask torch, and only when a GPU is asked for. Add your
    own kinds with :meth:`register`, or give a runtime a manager of its own
    (``mds.Runtime(devices=...)``).

    Args:
        kinds: the device kinds this manager knows; default CPU, CUDA, MPS.
        worker_index: this process's index among several serving processes
            on one host; round-robin placement starts at a different device
            in each, so the processes spread over the GPUs. Defaults to the
            ``MDS_WORKER_INDEX`` environment variable, else 0.

    Raises:
        ConfigError: ``MDS_WORKER_INDEX`` is not a whole number.

    Example:
        >>> manager = mds.DeviceManager.default()
        >>> print(*(info.device for info in manager.devices()))
        cpu cuda:0 cuda:1

    Added in 0.2.
    """

    _default: ClassVar[DeviceManager | None] = None
    _default_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self, kinds: Sequence[DeviceKind] | None = None, *, worker_index: int | None = None
    ) -> None:
        self._kinds: dict[str, DeviceKind] = {}
        for kind in kinds if kinds is not None else (CpuKind(), CudaKind(), MpsKind()):
            self.register(kind)
        if worker_index is None:
            raw = os.environ.get(WORKER_INDEX_ENV, "0")
            try:
                worker_index = int(raw)
            except ValueError:
                raise ConfigError(
                    f"{WORKER_INDEX_ENV}={raw!r} is not a worker index; give a whole number"
                ) from None
        if worker_index < 0:
            raise ConfigError(f"worker_index must be 0 or more, not {worker_index}")
        self.worker_index = worker_index
        self._failed: dict[Device, str] = {}

    def __repr__(self) -> str:
        return f"<DeviceManager kinds={sorted(self._kinds)} worker_index={self.worker_index}>"

    @classmethod
    def default(cls) -> DeviceManager:
        """The process's shared manager, made on first use."""
        with cls._default_lock:
            if cls._default is None:
                cls._default = cls()
            return cls._default

    @property
    def kinds(self) -> Mapping[str, DeviceKind]:
        """The registered kinds, by name (read-only)."""
        return MappingProxyType(self._kinds)

    def register(self, kind: DeviceKind) -> None:
        """Add a device kind, or replace the kind of the same name.

        Raises:
            ConfigError: ``kind`` is not a :class:`DeviceKind` or has no usable name.
        """
        if not isinstance(kind, DeviceKind):
            raise ConfigError(f"{kind!r} is not a DeviceKind; subclass mds.DeviceKind")
        try:
            Device.parse(kind.name)
        except ValueError:
            raise ConfigError(
                f"{type(kind).__name__}.name is {kind.name!r}; give the kind a name like "
                "'npu': lower-case letters, digits and '_'"
            ) from None
        self._kinds[kind.name] = kind

    def kind(self, name: str) -> DeviceKind:
        """The kind called ``name``.

        Raises:
            DeviceError: no such kind is registered.
        """
        try:
            return self._kinds[name]
        except KeyError:
            raise DeviceError(
                f"unknown device kind {name!r}; the kinds registered are "
                f"{', '.join(sorted(self._kinds))} (add one with DeviceManager.register)"
            ) from None

    def devices(self, kind: str | None = None) -> list[DeviceInfo]:
        """The visible devices, with their memory and health now.

        Args:
            kind: only this kind; ``None`` for all (which asks torch for GPUs
                if torch is installed).
        """
        kinds = [self.kind(kind)] if kind is not None else list(self._kinds.values())
        return [self._with_failure(info) for k in kinds for info in self._discover(k)]

    def info(self, device: Device) -> DeviceInfo:
        """One device's identity, memory and health now.

        Raises:
            DeviceError: the device is not there.
        """
        for info in self.devices(device.kind):
            if info.device == device:
                return info
        raise DeviceError(self._missing(device))

    # -- placement ------------------------------------------------------------

    def placer(self, config: ModelConfig, *, where: str) -> Placer:
        """Plan where the instances of a model with ``config`` go; ``where`` names it in logs.

        Raises:
            DeviceError: a named device is not there (and ``cpu_fallback`` is off).
        """
        return Placer(self, config, self._resolve(config, where), where)

    def _resolve(self, config: ModelConfig, where: str) -> list[Device]:
        """The candidate devices for ``config.devices``, in order, no repeats."""
        found: list[Device] = []
        for name in config.devices:
            for device in self._expand(name, config.cpu_fallback, where):
                if device not in found:
                    found.append(device)
        return found

    def _expand(self, name: str, fallback: bool, where: str) -> list[Device]:
        cpu = Device(kind="cpu")
        if name == "auto":
            for kind in self._kinds.values():
                if kind.accelerator:
                    devices = [info.device for info in self._discover(kind) if info.healthy]
                    if devices:
                        return devices
            return [cpu]
        wanted = Device.parse(name)
        try:
            kind = self.kind(wanted.kind)
            visible = [info for info in self._discover(kind)]
            if wanted.index is None:
                matches = [info for info in visible if info.healthy]
            else:
                matches = [info for info in visible if info.device == wanted]
            if not matches:
                raise DeviceError(self._missing(wanted, visible))
            failed = [info for info in matches if self._failed.get(info.device)]
            if failed and len(failed) == len(matches):
                info = failed[0]
                raise DeviceError(
                    f"device {info.device} failed earlier "
                    f"({self._failed[info.device]}); it takes no new instances"
                )
        except DeviceError as exc:
            if not fallback or wanted.kind == "cpu":
                raise
            logger.warning("%s: %s; cpu_fallback is on, so it runs on the CPU instead", where, exc)
            return [cpu]
        return [info.device for info in matches if info.device not in self._failed]

    def _missing(self, device: Device, visible: Sequence[DeviceInfo] | None = None) -> str:
        if visible is None:
            visible = self._discover(self.kind(device.kind)) if device.kind in self._kinds else []
        names = ", ".join(info.device.name for info in visible) or "none"
        message = f"device {device} is not there; visible {device.kind} devices: {names}"
        if device.kind == "cuda" and "CUDA_VISIBLE_DEVICES" in os.environ:
            message += f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r})"
        return message + "; set ModelConfig.cpu_fallback to run on the CPU instead"

    def _cpu_threads(self, config: ModelConfig, devices: Sequence[Device]) -> int:
        """The intra-op threads each CPU instance of the model may use."""
        if config.cpu_threads is not None:
            return config.cpu_threads
        on_cpu = sum(1 for device in devices if device.kind == "cpu")
        return max(1, usable_cores() // max(1, on_cpu))

    # -- health ---------------------------------------------------------------

    def _discover(self, kind: DeviceKind) -> list[DeviceInfo]:
        try:
            return list(kind.discover())
        except Exception as exc:
            raise DeviceError(
                f"finding {kind.name} devices failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _with_failure(self, info: DeviceInfo) -> DeviceInfo:
        reason = self._failed.get(info.device)
        if reason is None:
            return info
        return DeviceInfo(
            device=info.device,
            name=info.name,
            total_memory=info.total_memory,
            free_memory=info.free_memory,
            utilization=info.utilization,
            cores=info.cores,
            healthy=False,
            error=reason,
        )

    def mark_failed(self, device: Device, reason: str) -> None:
        """Mark ``device`` failed: it reports unhealthy and takes no new instances.

        mds calls it when ``infer`` raises an error that the device's kind
        says means the device failed (:meth:`DeviceKind.is_device_failure`).
        The first reason given is kept.

        Added in 0.3.
        """
        if device not in self._failed:
            logger.error("device %s failed: %s", device, reason)
            self._failed[device] = reason


class Placer:
    """Hands out devices to a model's instances, one at a time, by the policy."""

    def __init__(
        self, manager: DeviceManager, config: ModelConfig, candidates: list[Device], where: str
    ) -> None:
        #: The device manager it places with.
        self.manager = manager
        self._config = config
        self._candidates = candidates
        self._where = where
        self._placed: Counter[Device] = Counter()
        self._order: list[Device] = []
        self._need = config.instance_memory
        self._free_before: int | None = None
        #: The memory policy with no stated size measures each instance, so
        #: instances must be placed and initialised one after another.
        self.sequential = config.placement == "memory" and self._need is None

    @property
    def devices(self) -> list[Device]:
        """The devices handed out so far, in instance order."""
        return list(self._order)

    def next(self) -> Device:
        """The device for the next instance.

        Raises:
            DeviceError: with memory placement, no candidate has room.
        """
        if self._config.placement == "memory":
            device = self._by_memory()
        else:
            offset = self.manager.worker_index * self._config.instances
            device = self._candidates[(offset + len(self._order)) % len(self._candidates)]
        self._placed[device] += 1
        self._order.append(device)
        return device

    def place_all(self) -> list[Device]:
        """A device for every instance (not for sequential placement)."""
        return [self.next() for _ in range(self._config.instances - len(self._order))]

    def _by_memory(self) -> Device:
        infos = {info.device: info for info in self.manager.devices() if info.healthy}
        best: tuple[float, int, int] | None = None
        chosen = self._candidates[0]
        most_free: int | None = None
        for position, device in enumerate(self._candidates):
            info = infos.get(device)
            if info is None:
                continue
            free = info.free_memory
            if free is not None and self._config.instance_memory is not None:
                free -= self._placed[device] * self._config.instance_memory  # not yet allocated
            if free is not None:
                most_free = free if most_free is None else max(most_free, free)
            # most free memory first; unknown memory counts as none; then
            # fewest instances, then the order given
            key = (-(free if free is not None else -1), self._placed[device], position)
            if best is None or key < best:
                best, chosen = key, device
        need = self._need
        if need is not None and most_free is not None and most_free < need:
            how = "stated in instance_memory" if self._config.instance_memory else "measured"
            raise DeviceError(
                f"instance {len(self._order)} needs about {_size(need)} "
                f"({how}); the most free on {', '.join(map(str, self._candidates))} "
                f"is {_size(most_free)}"
            )
        if self.sequential:
            self._free_before = infos[chosen].free_memory if chosen in infos else None
        return chosen

    def initialised(self, device: Device) -> None:
        """The instance last placed on ``device`` has loaded: measure what it took."""
        if not self.sequential or self._free_before is None:
            return
        after = self.manager.info(device).free_memory
        if after is None:
            return
        used = self._free_before - after
        if used > 0:
            self._need = max(self._need or 0, used)
            logger.info("%s: an instance takes about %s on %s", self._where, _size(used), device)

    def cpu_threads(self) -> int:
        return self.manager._cpu_threads(self._config, self._predicted())

    def _predicted(self) -> list[Device]:
        """The devices of every instance, assuming the rest follow round-robin."""
        order = list(self._order)
        while len(order) < self._config.instances:
            order.append(self._candidates[len(order) % len(self._candidates)])  # a guess
        return order


def _size(count: float) -> str:
    """Bytes as a short human-readable size."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError  # pragma: no cover
