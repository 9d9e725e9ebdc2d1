"""Collators: how preprocessed items become one batch, and outputs become items again.

A collator has ``collate(items) -> batch`` and ``split(outputs, batch) ->
per-item outputs``. It may also have ``length(item)`` (used for padding
numbers) and ``bucket(item)`` (items only share a batch with items of the
same bucket). Numpy arrays are handled with numpy and torch tensors with
torch; torch is only touched when the items are tensors.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from ._errors import ConfigError
from ._tensors import is_tensor

__all__ = ["Collator", "Pad", "Padded", "Stack"]


@runtime_checkable
class Collator(Protocol):
    """What a handler's ``collator`` must do.

    Implement ``collate`` and ``split``; add ``length(item) -> int`` to get
    padding numbers and ``bucket(item) -> Hashable`` to batch only items of
    the same bucket together.

    Added in 0.1.
    """

    def collate(self, items: Sequence[Any]) -> Any:
        """Make ``infer``'s input from a batch of preprocessed items."""
        ...

    def split(self, outputs: Any, batch: Any) -> Sequence[Any]:
        """Make one output per item from ``infer``'s output for ``batch``."""
        ...


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    kind = type(value).__name__
    return f"{kind} of shape {tuple(shape)}" if shape is not None else kind


def _stack(items: Sequence[Any], where: str) -> Any:
    first = items[0]
    if type(first) is np.ndarray:
        shape, dtype = first.shape, first.dtype
        # The common case at C speed: np.array on arrays of one shape and
        # dtype makes what np.stack makes, without its per-item Python (about
        # 3x faster for 32 rows); with mixed dtypes it would promote them
        # differently, and 0-d object arrays it would keep as items rather
        # than unwrap. Anything else takes the checked path below.
        if (shape or dtype.kind != "O") and all(
            type(item) is np.ndarray and item.shape == shape and item.dtype == dtype
            for item in items
        ):
            return np.array(items)
    if isinstance(first, Mapping):
        keys = first.keys()
        for index, item in enumerate(items):
            # type() first: isinstance against an ABC costs a Python call.
            if not (type(item) is dict or isinstance(item, Mapping)) or item.keys() != keys:
                got = sorted(item) if isinstance(item, Mapping) else type(item).__name__
                raise TypeError(
                    f"{where}item {index} has keys {got}, item 0 has {sorted(keys)}; "
                    "items must have the same keys"
                )
        return {key: _stack([item[key] for item in items], f"{where}[{key!r}] ") for key in first}
    if isinstance(first, tuple):
        for index, item in enumerate(items):
            if not isinstance(item, tuple) or len(item) != len(first):
                raise TypeError(f"{where}item {index} is not a tuple of {len(first)} like item 0")
        return tuple(
            _stack([item[i] for item in items], f"{where}[{i}] ") for i in range(len(first))
        )
    if is_tensor(first):
        import torch

        _same_shapes(items, where)
        return torch.stack(list(items))
    if isinstance(first, (np.ndarray, np.generic, int, float, complex)) and not isinstance(
        first, bool
    ):
        _same_shapes(items, where)
        return np.stack([np.asarray(item) for item in items])
    return list(items)  # lists, strings, other objects: passed through as a list


def _same_shapes(items: Sequence[Any], where: str) -> None:
    shape = np.shape(items[0]) if not is_tensor(items[0]) else tuple(items[0].shape)
    for index, item in enumerate(items):
        other = tuple(item.shape) if is_tensor(item) else np.shape(item)
        if other != shape:
            raise ValueError(
                f"{where}item {index} is {_describe(item)}, item 0 is "
                f"{_describe(items[0])}; stacked items need the same shape "
                "(use mds.Pad for variable lengths)"
            )


def _rows(outputs: Any, count: int) -> Any:
    if isinstance(outputs, np.ndarray):
        return list(outputs)
    if isinstance(outputs, Mapping):
        columns = {key: _rows(value, count) for key, value in outputs.items()}
        return [{key: column[i] for key, column in columns.items()} for i in range(count)]
    if isinstance(outputs, tuple):
        columns_t = [_rows(value, count) for value in outputs]
        return [tuple(column[i] for column in columns_t) for i in range(count)]
    if is_tensor(outputs):
        return list(outputs.unbind(0))
    return outputs  # already one output per item (a list); checked by the caller


class Stack:
    """Stack items along a new first axis: arrays, tensors, numbers, dicts, tuples.

    Dicts and tuples are stacked per field. Other values (lists, strings,
    objects) pass through as a list.

    ``split`` undoes it: arrays and tensors are split into rows, dicts and
    tuples per element.

    Example:
        >>> class Classifier(mds.ModelHandler[Image, Label]):
        ...     collator = mds.Stack()
        ...     def infer(self, batch: torch.Tensor) -> torch.Tensor:
        ...         return self.net(batch)  # batch: (B, C, H, W)

    Added in 0.1.
    """

    def collate(self, items: Sequence[Any]) -> Any:
        """Stack ``items``; raises ``ValueError`` naming the item that does not fit."""
        return _stack(items, "")

    def split(self, outputs: Any, batch: Any) -> Sequence[Any]:
        """Split ``outputs`` along the first axis into one output per item."""
        rows: Sequence[Any] = _rows(outputs, _batch_size(batch))
        return rows


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Padded):
        return len(batch.lengths)
    if isinstance(batch, Mapping):
        return _batch_size(next(iter(batch.values())))
    if isinstance(batch, tuple):
        return _batch_size(batch[0])
    return len(batch)


class Padded(NamedTuple):
    """A padded batch of sequences.

    Attributes:
        values: the items, padded to the longest: ``(batch, length, ...)``.
        mask: ``True`` where ``values`` holds an item's data, ``False`` on padding.
        lengths: each item's own length.

    Added in 0.1.
    """

    values: Any
    mask: Any
    lengths: tuple[int, ...]


class Pad(Stack):
    """Pad variable-length sequences to the longest in the batch, with a mask.

    Items are arrays or tensors whose first axis varies (token ids, frames),
    lists of numbers, or dicts of them that share one length (such as a
    tokenizer's ``input_ids`` and ``attention_mask``).

    - Array, tensor and list items collate to :class:`Padded`
      ``(values, mask, lengths)``.
    - Dict items collate to a dict of padded arrays; with ``mask_key`` the
      mask is added under that key.

    Args:
        value: the padding value, or one per dict key.
        buckets: length boundaries, e.g. ``(32, 64, 128)``: items batch only
            with items in the same bucket (``<=32``, ``<=64``, ``<=128``,
            longer), so short inputs are not padded to the length of long ones.
        mask_key: for dict items, the key to add the mask under.
        trim: ``split`` cuts each item's output back to its own length along
            the padded axis (for per-token outputs).

    Example:
        >>> class Encoder(mds.ModelHandler[str, np.ndarray]):
        ...     collator = mds.Pad({"input_ids": 0, "attention_mask": 0}, buckets=(32, 128))

    Added in 0.1.
    """

    def __init__(
        self,
        value: float | Mapping[str, float] = 0,
        *,
        buckets: Sequence[int] = (),
        mask_key: str | None = None,
        trim: bool = False,
    ) -> None:
        if list(buckets) != sorted(set(buckets)) or any(b < 1 for b in buckets):
            raise ConfigError(f"Pad: buckets must be increasing positive lengths, got {buckets!r}")
        self.value = value
        self.buckets = tuple(buckets)
        self.mask_key = mask_key
        self.trim = trim

    def __repr__(self) -> str:
        return f"Pad(value={self.value!r}, buckets={self.buckets!r}, mask_key={self.mask_key!r})"

    def length(self, item: Any) -> int:
        """The item's length along its first axis."""
        if isinstance(item, Mapping):
            lengths = {key: _length(value) for key, value in item.items()}
            if len(set(lengths.values())) > 1:
                raise ValueError(f"the item's fields differ in length: {lengths}")
            return next(iter(lengths.values()))
        return _length(item)

    def bucket(self, item: Any) -> Hashable:
        """The index of the first bucket boundary the item fits under."""
        if not self.buckets:
            return None
        return bisect.bisect_left(self.buckets, self.length(item))

    def collate(self, items: Sequence[Any]) -> Any:
        """Pad ``items`` to the longest of them."""
        lengths = tuple(self.length(item) for item in items)
        if isinstance(items[0], Mapping):
            keys = list(items[0])
            padded = {
                key: _pad([item[key] for item in items], lengths, self._value_for(key))
                for key in keys
            }
            if self.mask_key is not None and self.mask_key not in padded:
                padded[self.mask_key] = _mask(lengths, padded[keys[0]])
            return _WithLengths(padded, lengths)
        values = _pad(items, lengths, self._value_for(None))
        return Padded(values, _mask(lengths, values), lengths)

    def split(self, outputs: Any, batch: Any) -> Sequence[Any]:
        """One output per item; with ``trim``, cut back to each item's length."""
        lengths = batch.lengths
        rows: Sequence[Any] = _rows(outputs, len(lengths))
        if self.trim:
            return [_trim(row, length) for row, length in zip(rows, lengths, strict=True)]
        return rows

    def _value_for(self, key: str | None) -> float:
        if isinstance(self.value, Mapping):
            if key is None or key not in self.value:
                raise KeyError(f"Pad has no padding value for {key!r}; give one per key")
            return self.value[key]
        return self.value


class _WithLengths(dict[str, Any]):
    """A dict batch that remembers its items' lengths (for ``split``)."""

    def __init__(self, fields: dict[str, Any], lengths: tuple[int, ...]) -> None:
        super().__init__(fields)
        self.lengths = lengths


def _length(value: Any) -> int:
    if is_tensor(value) or isinstance(value, np.ndarray):
        if not value.shape:
            raise ValueError("a scalar has no length to pad")
        return int(value.shape[0])
    return len(value)


def _pad(items: Sequence[Any], lengths: tuple[int, ...], value: float) -> Any:
    longest = max(lengths)
    first = items[0]
    if is_tensor(first):
        import torch

        out = torch.full(
            (len(items), longest, *first.shape[1:]), value, dtype=first.dtype, device=first.device
        )
        for row, (item, length) in enumerate(zip(items, lengths, strict=True)):
            out[row, :length] = item
        return out
    arrays = [np.asarray(item) for item in items]
    dtype = np.result_type(*arrays) if all(a.size for a in arrays) else arrays[0].dtype
    out_np = np.full((len(items), longest, *arrays[0].shape[1:]), value, dtype=dtype)
    for row, (array, length) in enumerate(zip(arrays, lengths, strict=True)):
        out_np[row, :length] = array
    return out_np


def _mask(lengths: tuple[int, ...], like: Any) -> Any:
    longest = max(lengths)
    if is_tensor(like):
        import torch

        positions = torch.arange(longest, device=like.device)
        return positions.unsqueeze(0) < torch.tensor(lengths, device=like.device).unsqueeze(1)
    return np.arange(longest)[None, :] < np.asarray(lengths)[:, None]


def _trim(row: Any, length: int) -> Any:
    if isinstance(row, Mapping):
        return {key: _trim(value, length) for key, value in row.items()}
    if isinstance(row, tuple):
        return tuple(_trim(value, length) for value in row)
    return row[:length]
