"""How a model describes its tensors."""

# No `from __future__ import annotations`: msgspec reads these annotations.

from collections.abc import Mapping

import msgspec

__all__ = ["Signature", "TensorSpec"]


class TensorSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One input or output of a model, as the model declares it.

    Attributes:
        name: the tensor's name.
        dtype: its numpy dtype's name (``"float32"``, ``"int64"``, ``"object"``
            for strings).
        shape: its dimensions; a string or ``None`` for a dimension of any size.

    Added in 0.2.
    """

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name} ({self.dtype} [{dims}])"


#: The named tensors one request carries and one response gives.
Signature = tuple[Mapping[str, TensorSpec], Mapping[str, TensorSpec]]
