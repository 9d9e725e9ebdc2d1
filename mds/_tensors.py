"""How a model describes its tensors."""

# No `from __future__ import annotations`: msgspec reads these annotations.

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import numpy as np

from ._errors import InvalidInput, excerpt, quote

__all__ = ["InputCheck", "Signature", "TensorSpec", "dims", "is_tensor"]


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
        """``"x (float32 [?, 4])"``, for messages."""
        if not self.shape:
            return f"{self.name} ({self.dtype} scalar)"
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name} ({self.dtype} [{dims}])"


#: The named tensors one request carries and one response gives.
Signature = tuple[Mapping[str, TensorSpec], Mapping[str, TensorSpec]]


class InputCheck:
    """Checks one request's tensors against the inputs a model declares.

    A request is a dict of input name to value, or, for a model with one
    input, that value alone. Lists become arrays of the input's dtype (when
    their values cast safely: ints to floats, not floats to ints); an array
    (or a torch tensor) must have the input's dtype already. Shapes are
    compared dimension by dimension; ``None`` or a name matches any size.

    Args:
        specs: the inputs, as one request carries them.
        batched: whether batching adds a batch axis (for messages only).
    """

    def __init__(self, specs: Mapping[str, TensorSpec], *, batched: bool = True) -> None:
        self.specs = dict(specs)
        self.batched = batched
        # What each value is compared with, worked out once: this runs per request.
        self._expect = {
            name: (np.dtype(spec.dtype), spec.shape) for name, spec in self.specs.items()
        }

    def __call__(self, request: Any) -> dict[str, Any]:
        """The request's value for each input, checked; raises :class:`InvalidInput`."""
        specs = self.specs
        if not isinstance(request, Mapping):
            if len(specs) != 1:
                raise InvalidInput(
                    f"the model takes {len(specs)} inputs "
                    f"({', '.join(s.describe() for s in specs.values())}); send a dict "
                    "of input name to array"
                )
            request = {next(iter(specs)): request}
        missing = [name for name in specs if name not in request]
        if missing:
            raise InvalidInput(
                f"input {missing[0]!r} is missing; the model takes "
                + ", ".join(spec.describe() for spec in specs.values())
            )
        unknown = [name for name in request if name not in specs]
        if unknown:
            raise InvalidInput(
                f"the model has no input {quote(unknown[0])}; its inputs are {', '.join(specs)}"
            )
        return {name: self.one(name, request[name]) for name in specs}

    def one(self, name: str, value: Any) -> Any:
        """``value`` for input ``name``, checked: an array (or the torch tensor given)."""
        expected, shape = self._expect[name]
        if isinstance(value, np.ndarray):
            if value.dtype != expected:
                raise InvalidInput(f"input {name!r}: expected dtype {expected}, got {value.dtype}")
            array: Any = value
        elif is_tensor(value):
            got = str(value.dtype).removeprefix("torch.")
            if got != expected.name:
                raise InvalidInput(f"input {name!r}: expected dtype {expected}, got {got}")
            array = value
        else:
            try:
                array = np.asarray(value)
                if array.dtype != expected and not np.can_cast(
                    array.dtype, expected, casting="same_kind"
                ):
                    raise TypeError(f"{array.dtype} values")
                array = array.astype(expected, copy=False)
            except (TypeError, ValueError, OverflowError) as exc:
                raise InvalidInput(
                    f"input {name!r}: expected {expected} values, got {excerpt(str(exc))}"
                ) from None
        got_shape = tuple(array.shape)
        if len(got_shape) != len(shape) or any(
            isinstance(want, int) and want != got
            for want, got in zip(shape, got_shape, strict=False)
        ):
            per = " per request (the batch axis is added by batching)" if self.batched else ""
            raise InvalidInput(
                f"input {name!r}: expected shape {dims(shape)}{per}, got {dims(got_shape)}"
            )
        return array


def dims(shape: Sequence[Any]) -> str:
    """A shape for messages: ``(?, 16)``."""
    return "(" + ", ".join("?" if not isinstance(d, int) else str(d) for d in shape) + ")"


def is_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor (told without importing torch)."""
    return type(value).__module__.startswith("torch") and hasattr(value, "shape")
