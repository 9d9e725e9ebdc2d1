"""Collators: splitting a collated batch gives back the items; padding and masks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mds
import mds.testing

shapes = hnp.array_shapes(min_dims=0, max_dims=3, max_side=4)


@st.composite
def same_shape_items(draw: st.DrawFn) -> list[Any]:
    """Items of one structure: arrays, numbers, dicts and tuples of them, strings."""
    shape = draw(shapes)
    count = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["array", "number", "dict", "tuple", "text"]))

    def array() -> np.ndarray:
        return draw(hnp.arrays(np.float32, shape, elements=st.floats(-100, 100, width=32)))

    if kind == "array":
        return [array() for _ in range(count)]
    if kind == "number":
        return [draw(st.integers(-1000, 1000)) for _ in range(count)]
    if kind == "dict":
        return [{"a": array(), "b": draw(st.text(max_size=3))} for _ in range(count)]
    if kind == "tuple":
        return [(array(), draw(st.integers())) for _ in range(count)]
    return [draw(st.text(max_size=5)) for _ in range(count)]


def assert_same(got: Any, want: Any) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want)
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
    elif isinstance(want, (np.ndarray, int, float)) and not isinstance(want, bool):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    else:
        assert got == want


@settings(max_examples=60, deadline=None)
@given(items=same_shape_items())
def test_splitting_a_stacked_batch_gives_back_the_items(items: list[Any]) -> None:
    stack = mds.Stack()
    batch = stack.collate(items)
    back = stack.split(batch, batch)
    assert len(back) == len(items)
    for got, want in zip(back, items, strict=True):
        assert_same(got, want)


dtypes = st.sampled_from(["float32", "float64", "int8", "int64", "bool", "complex64", "<U3"])


@settings(max_examples=60, deadline=None)
@given(data=st.data(), shape=shapes, count=st.integers(1, 6))
def test_stacking_arrays_matches_numpy_stack_whatever_their_dtypes(
    data: st.DataObject, shape: tuple[int, ...], count: int
) -> None:
    # Equal-shaped arrays take a fast path; it must promote and copy as np.stack does.
    items = [data.draw(hnp.arrays(data.draw(dtypes), shape)) for _ in range(count)]
    batch = mds.Stack().collate(items)
    want = np.stack(items)
    assert batch.dtype == want.dtype and batch.shape == want.shape
    np.testing.assert_array_equal(batch, want)
    assert not any(np.shares_memory(batch, item) for item in items)  # copied, as np.stack does


def test_arrays_mixed_with_lists_and_numbers_still_stack() -> None:
    batch = mds.Stack().collate([np.arange(3.0), [1.0, 2.0, 3.0], np.ones(3, np.float32)])
    np.testing.assert_array_equal(batch, [[0, 1, 2], [1, 2, 3], [1, 1, 1]])
    objects = [np.array([b"a", b"bc"], dtype=object), np.array([b"d", b""], dtype=object)]
    assert mds.Stack().collate(objects).tolist() == [[b"a", b"bc"], [b"d", b""]]
    scalars = [np.array("a", dtype=object), np.array("bc", dtype=object)]  # one string each
    batch = mds.Stack().collate(scalars)
    assert batch.shape == (2,) and [type(item) for item in batch] == [str, str]


def test_stack_names_the_item_that_does_not_fit() -> None:
    with pytest.raises(ValueError, match=r"item 2 is ndarray of shape \(3,\), item 0 is "):
        mds.Stack().collate([np.zeros(2), np.ones(2), np.ones(3)])
    with pytest.raises(TypeError, match=r"\['x'\] item 1 is not a tuple"):
        mds.Stack().collate([{"x": (1, 2)}, {"x": 3}])
    with pytest.raises(TypeError, match="item 1 has keys \\['b'\\], item 0 has \\['a'\\]"):
        mds.Stack().collate([{"a": 1}, {"b": 1}])


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=6), value=st.integers(-5, 5))
def test_padding_keeps_every_item_and_masks_the_rest(lengths: list[int], value: int) -> None:
    items = [np.arange(1, n + 1, dtype=np.int64) * 10 for n in lengths]
    padded = mds.Pad(value).collate(items)
    assert isinstance(padded, mds.Padded)
    assert padded.values.shape == (len(items), max(lengths))
    assert padded.lengths == tuple(lengths)
    for row, (item, n) in enumerate(zip(items, lengths, strict=True)):
        np.testing.assert_array_equal(padded.values[row, :n], item)
        assert (padded.values[row, n:] == value).all()
        assert padded.mask[row].tolist() == [True] * n + [False] * (max(lengths) - n)


def test_padding_dicts_of_token_fields_with_a_mask_key_and_trimmed_outputs() -> None:
    pad = mds.Pad({"input_ids": 0, "attention_mask": 0}, mask_key="valid", trim=True)
    items = [
        {"input_ids": [101, 7, 102], "attention_mask": [1, 1, 1]},
        {"input_ids": [101, 102], "attention_mask": [1, 1]},
    ]
    batch = pad.collate(items)
    assert batch["input_ids"].tolist() == [[101, 7, 102], [101, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["valid"].tolist() == [[True, True, True], [True, True, False]]
    per_token = np.arange(6).reshape(2, 3)
    assert [row.tolist() for row in pad.split(per_token, batch)] == [[0, 1, 2], [3, 4]]
    with pytest.raises(ValueError, match="fields differ in length"):
        pad.length({"input_ids": [1, 2], "attention_mask": [1]})
    with pytest.raises(KeyError, match="no padding value for 'token_type_ids'"):
        pad.collate([{"token_type_ids": [0]}])


def test_buckets_are_length_ranges() -> None:
    pad = mds.Pad(buckets=(4, 16))
    assert [pad.bucket([0] * n) for n in (1, 4, 5, 16, 17, 100)] == [0, 0, 1, 1, 2, 2]
    assert mds.Pad().bucket([1, 2]) is None
    with pytest.raises(ValueError, match="buckets must be increasing"):
        mds.Pad(buckets=(8, 4))


def test_torch_tensors_stack_and_pad_with_torch() -> None:
    torch = pytest.importorskip("torch")
    stacked = mds.Stack().collate([torch.ones(3), torch.zeros(3)])
    assert isinstance(stacked, torch.Tensor) and stacked.shape == (2, 3)
    assert [t.tolist() for t in mds.Stack().split(stacked, stacked)] == [[1.0] * 3, [0.0] * 3]
    padded = mds.Pad(-1).collate([torch.tensor([1, 2, 3]), torch.tensor([4])])
    assert isinstance(padded.values, torch.Tensor)
    assert padded.values.tolist() == [[1, 2, 3], [4, -1, -1]]
    assert padded.mask.tolist() == [[True, True, True], [True, False, False]]


class MaskedMean(mds.ModelHandler[list[float], float]):
    """Averages variable-length sequences over the mask: batch-invariant."""

    collator = mds.Pad(0.0, buckets=(3,))

    def infer(self, batch: mds.Padded) -> np.ndarray:
        values, mask = np.asarray(batch.values, dtype=np.float64), np.asarray(batch.mask)
        return (values * mask).sum(axis=1) / mask.sum(axis=1)

    def split(self, outputs: Any, batch: Any) -> Sequence[Any]:
        return [float(x) for x in outputs]


class UnmaskedMean(MaskedMean):
    """Forgets the mask: the padding leaks into the result."""

    def infer(self, batch: mds.Padded) -> np.ndarray:
        return np.asarray(batch.values, dtype=np.float64).mean(axis=1)


@settings(max_examples=25, deadline=None)
@given(
    sequences=st.lists(
        st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=6),
        min_size=2,
        max_size=8,
    )
)
def test_padded_batched_results_equal_unbatched_ones(sequences: list[list[float]]) -> None:
    mds.testing.assert_batch_invariant(MaskedMean, sequences, rtol=1e-9, atol=1e-9)


def test_forgetting_the_mask_is_caught() -> None:
    with pytest.raises(AssertionError, match="batched results differ"):
        mds.testing.assert_batch_invariant(UnmaskedMean, [[1.0, 2.0, 3.0], [4.0]])
