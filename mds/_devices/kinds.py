"""Device kinds: how devices of one kind are found, checked and recovered.

The built-in kinds are the CPU (always there) and, through torch, CUDA GPUs
and Apple MPS. torch is imported only when a GPU kind is asked about, and
only if it is installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import platform
import sys
from collections.abc import Sequence
from types import ModuleType

from .device import Device, DeviceInfo

__all__ = ["CpuKind", "CudaKind", "DeviceKind", "MpsKind"]

logger = logging.getLogger("mds.devices")


class DeviceKind:
    """One kind of device (``"cpu"``, ``"cuda"``, your own): the protocol.

    Subclass it and implement :meth:`discover` to add a kind of device;
    register an instance with :meth:`mds.DeviceManager.register`. The other
    methods have defaults that suit a device that never runs out of memory
    and never fails.

    Attributes:
        name: the kind, as device names write it (``"npu"`` in ``"npu:0"``).
        accelerator: whether ``"auto"`` placement prefers it to the CPU.

    Example:
        >>> class Npus(mds.DeviceKind):
        ...     name = "npu"
        ...     accelerator = True
        ...     def discover(self):
        ...         return [mds.DeviceInfo(device=mds.Device(kind="npu", index=i),
        ...                                name="My NPU") for i in range(npu.count())]

    Added in 0.2.
    """

    name: str = ""
    accelerator: bool = False

    def discover(self) -> Sequence[DeviceInfo]:
        """The visible devices of this kind, with memory and health as of now.

        Called when instances are placed and when health is asked for; it
        should be quick. Return no devices when there are none.
        """
        raise NotImplementedError(f"{type(self).__name__}.discover")

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether ``exc``, raised by ``infer``, means the batch did not fit."""
        return False

    def is_device_failure(self, exc: BaseException) -> bool:
        """Whether ``exc``, raised by ``infer``, means the device itself failed."""
        return False

    def release_memory(self, device: Device) -> None:
        """Give cached memory back after an out-of-memory error, before a retry."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. under taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


class CpuKind(DeviceKind):
    """The host CPU: one device, ``"cpu"``."""

    name = "cpu"

    def discover(self) -> Sequence[DeviceInfo]:
        total = free = None
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            total = page * os.sysconf("SC_PHYS_PAGES")
            free = page * os.sysconf("SC_AVPHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
            pass
        return [
            DeviceInfo(
                device=Device(kind="cpu"),
                name=platform.processor() or platform.machine() or "cpu",
                total_memory=total,
                free_memory=free,
                cores=usable_cores(),
            )
        ]


def _torch() -> ModuleType | None:
    """The torch module if it is installed (imported now if need be), else ``None``."""
    module = sys.modules.get("torch")
    if module is not None:
        return module
    if importlib.util.find_spec("torch") is None:
        return None
    return importlib.import_module("torch")


def _message_says(exc: BaseException, *phrases: str) -> bool:
    text = str(exc)
    return any(phrase in text for phrase in phrases)


class CudaKind(DeviceKind):
    """NVIDIA GPUs through torch; honours ``CUDA_VISIBLE_DEVICES`` as torch does."""

    name = "cuda"
    accelerator = True

    def discover(self) -> Sequence[DeviceInfo]:
        torch = _torch()
        if torch is None or not torch.cuda.is_available():
            return []
        return [self._info(torch, index) for index in range(torch.cuda.device_count())]

    def _info(self, torch: ModuleType, index: int) -> DeviceInfo:
        device = Device(kind="cuda", index=index)
        try:
            name = torch.cuda.get_device_name(index)
            free, total = torch.cuda.mem_get_info(index)
        except Exception as exc:  # a device that fails to answer is unhealthy
            return DeviceInfo(
                device=device, name="unknown", healthy=False, error=f"{type(exc).__name__}: {exc}"
            )
        utilization: float | None
        try:
            utilization = torch.cuda.utilization(index) / 100.0
        except Exception:  # needs pynvml; not every driver answers
            utilization = None
        return DeviceInfo(
            device=device,
            name=name,
            total_memory=int(total),
            free_memory=int(free),
            utilization=utilization,
        )

    def is_out_of_memory(self, exc: BaseException) -> bool:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(exc, torch.OutOfMemoryError):
            return True
        # onnxruntime's CUDA provider reports it in its message
        return _message_says(exc, "CUDA out of memory", "CUDNN_STATUS_ALLOC_FAILED") or (
            "Failed to allocate memory" in str(exc) and "CUDA" in str(exc)
        )

    def is_device_failure(self, exc: BaseException) -> bool:
        if self.is_out_of_memory(exc):
            return False
        torch = sys.modules.get("torch")
        accelerator_error = getattr(torch, "AcceleratorError", None) if torch else None
        if accelerator_error is not None and isinstance(exc, accelerator_error):
            return True
        return _message_says(
            exc,
            "CUDA error: an illegal memory access",
            "device-side assert triggered",
            "CUDA error: unspecified launch failure",
            "CUDA error: uncorrectable ECC error",
            "CUDA driver error",
        )

    def release_memory(self, device: Device) -> None:
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.cuda.empty_cache()


class MpsKind(DeviceKind):
    """Apple silicon GPUs through torch: one device, ``"mps"``."""

    name = "mps"
    accelerator = True

    def discover(self) -> Sequence[DeviceInfo]:
        torch = _torch()
        if torch is None or not torch.backends.mps.is_available():
            return []
        total = used = None
        try:
            total = int(torch.mps.recommended_max_memory())
            used = int(torch.mps.driver_allocated_memory())
        except Exception:  # older torch
            pass
        return [
            DeviceInfo(
                device=Device(kind="mps"),
                name="Apple MPS",
                total_memory=total,
                free_memory=None if total is None or used is None else total - used,
            )
        ]

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return _message_says(exc, "MPS backend out of memory")

    def release_memory(self, device: Device) -> None:
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.mps.empty_cache()
