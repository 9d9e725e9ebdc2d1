"""Device identity: the value a handler is given to place its model on."""

# No `from __future__ import annotations`: msgspec reads these annotations at
# run time, and mds/__init__.py gives the classes the public module "mds".

import re

import msgspec

__all__ = ["Device"]

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
