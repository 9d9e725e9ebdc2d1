"""How a model describes its tensors."""

# No `from __future__ import annotations`: msgspec reads these annotations.

from collections.abc import Mapping, Sequence
from typing import Any, cast

import msgspec
import numpy as np

from ._errors import ConfigError, InvalidInput, excerpt, quote

__all__ = ["InputCheck", "Signature", "TensorSpec", "dims", "is_tensor"]


class TensorSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One input or output of a model, as the model declares it.

    Attributes:
        name: the tensor's name.
        dtype: its numpy dtype's name (``"float32"``, ``"int64"``, ``"object"``
            for strings).
        shape: its dimensions; a string or ``None`` for a dimension of any size.
        labels: for an output of scores, the class each position stands for:
            the Open Inference Protocol's ``classification`` names them.
            Added in 0.5.

    Added in 0.2.
    """

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]
    labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        try:
            np.dtype(self.dtype)
        except TypeError:
            raise ConfigError(
                f"TensorSpec {self.name!r}: {self.dtype!r} is not a numpy dtype's name "
                "(float32, int64, bool, object, ...)"
            ) from None

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
        # What each value is compared with, worked out once: this runs per
        # request. A shape of fixed sizes is compared as one tuple.
        self._expect = {
            name: (np.dtype(spec.dtype), spec.shape, _fixed(spec.shape))
            for name, spec in self.specs.items()
        }
        #: The one input's name, for a model with one input.
        self.single: str | None = next(iter(self.specs)) if len(self.specs) == 1 else None

    def __call__(self, request: Any) -> dict[str, Any]:
        """The request's value for each input, checked; raises :class:`InvalidInput`."""
        specs = self.specs
        if isinstance(request, np.ndarray) or not isinstance(request, Mapping):
            if self.single is None:
                raise InvalidInput(
                    f"the model takes {len(specs)} inputs "
                    f"({', '.join(s.describe() for s in specs.values())}); send a dict "
                    "of input name to array"
                )
            return {self.single: self.one(self.single, request)}
        if request.keys() != specs.keys():  # (a Mapping's keys may not be set-like)
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
        expected, shape, fixed = self._expect[name]
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
            except (TypeError, ValueError, OverflowError) as exc:
                raise InvalidInput(
                    f"input {name!r}: expected {expected} values, got {excerpt(str(exc))}"
                ) from None
            array = _cast(array, expected, name)
        got_shape = tuple(array.shape)
        if got_shape != fixed and (
            len(got_shape) != len(shape)
            or any(
                isinstance(want, int) and want != got
                for want, got in zip(shape, got_shape, strict=False)
            )
        ):
            per = " per request (the batch axis is added by batching)" if self.batched else ""
            raise InvalidInput(
                f"input {name!r}: expected shape {dims(shape)}{per}, got {dims(got_shape)}"
            )
        return array

    def column(self, name: str, values: np.ndarray) -> tuple[np.ndarray, bool]:
        """Many rows of input ``name`` at once (a column, rows on the first axis).

        Returns the column cast to the input's dtype where its values allow it
        (a CSV's float64 for a float32 input), and whether every row fits as
        it is, so that the rows need no check of their own.
        """
        expected, _, fixed = self._expect[name]
        if values.dtype != expected and values.dtype != object:
            try:
                values = _cast(values, expected, name)
            except InvalidInput:
                return values, False  # each row's own check says what is wrong with it
        fits = values.dtype == expected and fixed is not None and values.shape[1:] == fixed
        return values, fits


def _fixed(shape: tuple[int | str | None, ...]) -> tuple[int, ...] | None:
    """``shape`` where every dimension has a size; else ``None``."""
    if all(isinstance(dim, int) for dim in shape):
        return cast(tuple[int, ...], shape)
    return None


def _cast(array: np.ndarray, expected: np.dtype[Any], name: str) -> np.ndarray:
    """Values that came as lists (from JSON), as ``expected``: never wrapped, never inf."""
    if array.dtype == expected:
        return array
    kind, want = array.dtype.kind, expected.kind
    got = f"{array.dtype} values" if kind != "O" else "values of mixed or unbounded types"
    if want in "iu":
        if kind not in "iu":
            raise InvalidInput(f"input {name!r}: expected whole numbers ({expected}), got {got}")
        if array.size:
            info = np.iinfo(expected)
            low, high = array.min(), array.max()
            if low < info.min or high > info.max:
                bad = low if low < info.min else high
                raise InvalidInput(
                    f"input {name!r}: {bad} is out of {expected}'s range ({info.min} to {info.max})"
                )
        return array.astype(expected)
    if want in "fc":
        if kind not in "iuf":
            raise InvalidInput(f"input {name!r}: expected numbers ({expected}), got {got}")
        with np.errstate(over="ignore"):
            cast = array.astype(expected)
        if not np.isfinite(cast[np.isfinite(array)]).all():
            raise InvalidInput(f"input {name!r}: a value is out of {expected}'s range")
        return cast
    if want == "b" and kind != "b":
        raise InvalidInput(f"input {name!r}: expected true or false (bool), got {got}")
    if want == "O" and kind not in "USO":
        raise InvalidInput(f"input {name!r}: expected strings, got {got}")
    return array.astype(expected)


def dims(shape: Sequence[Any]) -> str:
    """A shape for messages: ``(?, 16)``."""
    return "(" + ", ".join("?" if not isinstance(d, int) else str(d) for d in shape) + ")"


def is_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor (told without importing torch)."""
    return type(value).__module__.startswith("torch") and hasattr(value, "shape")
