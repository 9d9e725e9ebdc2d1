"""Protocol tensors <-> numpy arrays, for arbitrary arrays of every datatype."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mds._oip.protocol import (
    InferRequest,
    RequestInput,
    decode_inputs,
    decode_request,
    encode_outputs,
)

NUMERIC = [
    np.bool_,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.float16,
    np.float32,
    np.float64,
]

shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
numeric_arrays = st.sampled_from(NUMERIC).flatmap(
    lambda dtype: hnp.arrays(
        dtype,
        shapes,
        elements={"allow_nan": False, "allow_infinity": False}
        if np.dtype(dtype).kind == "f"
        else None,
    )
)
text_arrays = shapes.flatmap(
    lambda shape: st.lists(
        st.text(max_size=8), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))
    ).map(lambda items: np.array([*items, None], dtype=object)[:-1].reshape(shape))
)


def _round_trip(array: np.ndarray, binary: bool) -> np.ndarray:
    """Encode as a response, resend as a request (as a client would), decode."""
    outputs, chunks = encode_outputs({"t": array}, binary)
    (output,) = outputs
    inputs = [
        RequestInput(
            name=output.name,
            shape=output.shape,
            datatype=output.datatype,
            parameters=output.parameters,
            data=output.data,
        )
    ]
    head = msgspec.json.encode(InferRequest(inputs=inputs))
    body = head + b"".join(chunks)
    request, raw = decode_request(body, str(len(head)) if binary else None)
    return decode_inputs(request, raw)["t"]


@settings(max_examples=150, deadline=None)
@given(array=st.one_of(numeric_arrays, text_arrays), binary=st.booleans())
def test_arrays_survive_the_protocol_both_ways(array: np.ndarray, binary: bool) -> None:
    back = _round_trip(array, binary)
    assert back.shape == array.shape
    if array.dtype == object:
        assert [b.decode() for b in back.ravel()] == list(array.ravel())
    else:
        assert back.dtype == array.dtype.newbyteorder("=")
        np.testing.assert_array_equal(back, array)
        assert back.flags.writeable


@given(values=hnp.arrays(np.float32, st.integers(0, 16), elements={"allow_nan": False}))
def test_bf16_arrives_as_float32_truncated_to_bf16(values: np.ndarray) -> None:
    words = (values.view("<u4") >> 16).astype("<u2")
    body, header = _binary("BF16", list(values.shape), words.tobytes())
    request, raw = decode_request(body, header)
    got = decode_inputs(request, raw)["t"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view("<u4"), words.astype("<u4") << 16)


def _binary(datatype: str, shape: list[int], raw: bytes) -> tuple[bytes, str]:
    head = msgspec.json.encode(
        {
            "inputs": [
                {
                    "name": "t",
                    "datatype": datatype,
                    "shape": shape,
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    )
    return head + raw, str(len(head))


def test_an_output_no_datatype_carries_is_named() -> None:
    import pytest

    with pytest.raises(ValueError, match="output 'z' has dtype complex64"):
        encode_outputs({"z": np.zeros(2, np.complex64)}, False)
    with pytest.raises(ValueError, match="output 'b' holds bytes that are not UTF-8"):
        encode_outputs({"b": np.array([b"\xff"], dtype=object)}, False)
    for binary in (False, True):
        with pytest.raises(ValueError, match="output 'd' holds dict values"):
            encode_outputs({"d": {"a": 1}}, binary)


def test_torch_tensors_and_plain_values_are_outputs_too() -> None:
    import pytest

    torch = pytest.importorskip("torch")

    outputs, _ = encode_outputs(
        {"t": torch.ones(2, dtype=torch.bfloat16), "n": 3, "s": "hi", "l": [[1.5, 2.5]]}, False
    )
    got: dict[str, Any] = {o.name: (o.datatype, o.shape, o.data) for o in outputs}
    assert got == {
        "t": ("FP32", [2], [1.0, 1.0]),
        "n": ("INT64", [], [3]),
        "s": ("BYTES", [], ["hi"]),
        "l": ("FP64", [1, 2], [1.5, 2.5]),
    }
