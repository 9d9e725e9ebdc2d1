"""Device identity: the value a handler is given to place its model on."""

# No `from __future__ import annotations`: msgspec reads these annotations at
# run time, and mds/__init__.py gives the classes the public module "mds".

import re

import msgspec

__all__ = ["Device", "DeviceInfo"]

_NAME = re.compile(r"^(?P<kind>[a-z][a-z0-9_]*)(?::(?P<index>\d+))?$")


class Device(msgspec.Struct, frozen=True, kw_only=True):
    """A device that a model instance runs on.

    Handlers never pick their device: the runtime gives one to each instance
    in :attr:`mds.ModelContext.device`. ``name`` is the string torch and
    friends understand (``"cpu"``, ``"cuda:1"``).

    Attributes:
        kind: the device kind, e.g. ``"cpu"``, ``"cuda"``, ``"mps"``.
        index: the device's index among devices of its kind, if it has one.

    Example:
        >>> mds.Device.parse("cuda:1")
        Device(kind='cuda', index=1)
        >>> mds.Device.parse("cuda:1").name
        'cuda:1'

    Added in 0.1.
    """

    kind: str
    index: int | None = None

    @property
    def name(self) -> str:
        """The device's name, as torch writes it: ``"cpu"`` or ``"cuda:0"``."""
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str) -> "Device":
        """Make a device from its name.

        Args:
            name: ``"kind"`` or ``"kind:index"``, e.g. ``"cpu"``, ``"cuda:0"``.

        Raises:
            ValueError: the name is not of that form.
        """
        match = _NAME.match(name)
        if match is None:
            raise ValueError(
                f"{name!r} is not a device name; expected a kind with an "
                "optional index, like 'cpu', 'cuda' or 'cuda:1'"
            )
        index = match["index"]
        return cls(kind=match["kind"], index=None if index is None else int(index))


class DeviceInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What is known about one device now: identity, memory, health.

    Memory is in bytes; a field is ``None`` where the device kind cannot tell.

    Attributes:
        device: which device.
        name: the hardware's name, e.g. ``"NVIDIA H100 80GB HBM3"``.
        total_memory: memory the device has.
        free_memory: memory free now.
        utilization: the share of time the device was busy lately, 0 to 1
            (CUDA with ``pynvml`` installed).
        cores: the CPU cores this process may use (CPU only).
        healthy: whether the device works; ``False`` after a device error.
        error: what went wrong, when not healthy.

    Added in 0.2.
    """

    device: Device
    name: str
    total_memory: int | None = None
    free_memory: int | None = None
    utilization: float | None = None
    cores: int | None = None
    healthy: bool = True
    error: str | None = None
