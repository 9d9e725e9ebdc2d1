"""The Open Inference Protocol (KServe V2) over HTTP: bodies, tensors, binary data.

Bodies are msgspec structs. Tensors travel as JSON lists or, with the binary
tensor data extension, as raw little-endian bytes after the JSON header; both
become numpy arrays here, and numpy arrays become both.
"""

# No `from __future__ import annotations`: msgspec reads these annotations.

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import numpy as np

from .._errors import DecodeError, quote

__all__ = [
    "BINARY_HEADER",
    "DATATYPES",
    "InferRequest",
    "InferResponse",
    "ModelMetadata",
    "RequestInput",
    "RequestOutput",
    "ResponseOutput",
    "ServerMetadata",
    "TensorMetadata",
    "as_array",
    "check_shape",
    "datatype_of",
    "decode_inputs",
    "decode_request",
    "encode_outputs",
    "from_bytes",
]

#: The header that says how long the JSON part of a binary body is.
BINARY_HEADER = "Inference-Header-Content-Length"

#: Protocol datatype -> the numpy dtype its values travel as (little-endian).
#: BF16 has no numpy dtype: it travels as 16-bit words and arrives as float32.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
    "BYTES": np.dtype(np.object_),
}

#: The most dimensions a tensor may have (numpy 1's limit; numpy 2 allows 64).
MAX_DIMS = 32
#: The most bytes one tensor may describe, even when it holds none (a 0 in
#: its shape): what numpy can index.
_MAX_BYTES = np.iinfo(np.intp).max

_BY_KIND = {
    np.dtype(np.bool_): "BOOL",
    **{np.dtype(dt).newbyteorder("="): name for name, dt in DATATYPES.items() if name[0] in "UIF"},
}


class RequestInput(msgspec.Struct, kw_only=True):
    """One input tensor of an inference request."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class RequestOutput(msgspec.Struct, kw_only=True):
    """An output the client asks for, with its own parameters (``binary_data``)."""

    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(msgspec.Struct, kw_only=True):
    """An inference request body."""

    inputs: list[RequestInput]
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[RequestOutput] | None = None


class ResponseOutput(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One output tensor of an inference response."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An inference response body."""

    model_name: str
    outputs: list[ResponseOutput]
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None


class TensorMetadata(msgspec.Struct, kw_only=True):
    """A tensor a model takes or gives: ``-1`` for a dimension of any size."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(msgspec.Struct, kw_only=True):
    """``GET /v2/models/{name}``."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(msgspec.Struct, kw_only=True):
    """``GET /v2``."""

    name: str
    version: str
    extensions: list[str]


_request_decoder = msgspec.json.Decoder(InferRequest)


def decode_request(
    body: bytes, header_length: str | None
) -> tuple[InferRequest, memoryview | None]:
    """The request's JSON part, decoded and typed, and its binary part if any.

    Raises:
        DecodeError: bad JSON, a field of the wrong type (with its path), or
            a bad ``Inference-Header-Content-Length``.
    """
    binary: memoryview | None = None
    head: bytes | memoryview = body
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise DecodeError(
                f"{BINARY_HEADER} must be a whole number of bytes, not {header_length!r}"
            ) from None
        if not 0 <= size <= len(body):
            raise DecodeError(f"{BINARY_HEADER} is {size}, but the body has only {len(body)} bytes")
        view = memoryview(body)
        head, binary = view[:size], view[size:]
    try:
        return _request_decoder.decode(head), binary
    except msgspec.ValidationError as exc:
        raise DecodeError(f"the request body does not fit the protocol: {exc}") from None
    except msgspec.DecodeError as exc:
        raise DecodeError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise DecodeError("the request body's JSON is nested too deeply") from None


def decode_inputs(request: InferRequest, binary: memoryview | None) -> dict[str, np.ndarray]:
    """Each input as a numpy array of its shape, by name.

    Raises:
        DecodeError: naming the input: an unknown datatype, a bad shape, data
            that does not match the shape or datatype, a duplicate name, or
            binary data that does not add up.
    """
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in request.inputs:
        where = f"input {tensor.name!r}"
        if tensor.name in arrays:
            raise DecodeError(f"{where} is given twice")
        dtype = DATATYPES.get(tensor.datatype)
        if dtype is None:
            raise DecodeError(
                f"{where}: unknown datatype {tensor.datatype!r}; the protocol's are "
                f"{', '.join(DATATYPES)}"
            )
        check_shape(tensor.shape, dtype, where)
        count = math.prod(tensor.shape)
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise DecodeError(f"{where}: binary_data_size must be a whole number, not {size!r}")
            if binary is None or offset + size > len(binary):
                have = 0 if binary is None else len(binary) - offset
                raise DecodeError(
                    f"{where}: binary_data_size is {size} bytes, but only {have} bytes of "
                    "binary data are left in the body"
                )
            if tensor.data is not None:
                raise DecodeError(f"{where}: has both data and binary_data_size")
            raw = binary[offset : offset + size]
            offset += size
            arrays[tensor.name] = from_bytes(raw, tensor.datatype, dtype, tensor.shape, where)
        else:
            if tensor.data is None:
                raise DecodeError(f"{where}: has no data (and no binary_data_size)")
            arrays[tensor.name] = _from_json(
                tensor.data, tensor.datatype, dtype, count, tensor.shape, where
            )
    if binary is not None and offset != len(binary):
        raise DecodeError(
            f"the body has {len(binary) - offset} bytes of binary data that no input claims "
            "(binary_data_size)"
        )
    return arrays


def check_shape(shape: list[int], dtype: np.dtype[Any], where: str) -> None:
    """Refuse a shape numpy cannot make, before anything is made of it."""
    if len(shape) > MAX_DIMS:
        raise DecodeError(
            f"{where}: shape has {len(shape)} dimensions; a tensor has at most {MAX_DIMS}"
        )
    if any(d < 0 for d in shape):
        raise DecodeError(f"{where}: shape {quote(shape)} has a negative dimension")
    # Its size as if no dimension were 0: numpy refuses such shapes even when empty.
    if math.prod(max(d, 1) for d in shape) * max(dtype.itemsize, 8) > _MAX_BYTES:
        raise DecodeError(f"{where}: shape {quote(shape)} is too large for any tensor")


def from_bytes(
    raw: memoryview, datatype: str, dtype: np.dtype[Any], shape: list[int], where: str
) -> np.ndarray:
    """A tensor from its raw little-endian bytes (BYTES: length-prefixed elements).

    ``dtype`` is ``DATATYPES[datatype]``; ``where`` names the tensor in errors.

    Raises:
        DecodeError: the bytes do not make ``shape`` of ``datatype``.
    """
    count = math.prod(shape)
    if datatype == "BYTES":
        items = _unpack_bytes(raw, where)
        if len(items) != count:
            raise DecodeError(
                f"{where}: shape {shape} needs {count} elements; the binary data holds {len(items)}"
            )
        array = np.empty(count, dtype=object)
        array[:] = items
        return array.reshape(shape)
    need = count * dtype.itemsize
    if len(raw) != need:
        raise DecodeError(
            f"{where}: shape {shape} of {datatype} needs {need} bytes; binary_data_size is "
            f"{len(raw)}"
        )
    # A copy: the body is read-only, and handlers may write to (or torch may wrap) it.
    array = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    return _widen_bf16(array) if datatype == "BF16" else array.astype(dtype.newbyteorder("="))


def _from_json(
    data: Any, datatype: str, dtype: np.dtype[Any], count: int, shape: list[int], where: str
) -> np.ndarray:
    flat = _flatten(data if isinstance(data, list) else [data])
    if len(flat) != count:
        raise DecodeError(
            f"{where}: shape {quote(shape)} needs {count} values; data has {len(flat)}"
        )
    kinds = set(map(type, flat))
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = [_as_bytes(v, where) for v in flat]
    elif datatype == "BOOL":
        if not kinds <= {bool}:
            raise DecodeError(f"{where}: BOOL data must be true or false, {_odd(flat, bool)}")
        array = np.asarray(flat, dtype=np.bool_)
    elif datatype[0] in "IU":  # INT8 ... UINT64
        if not kinds <= {int}:
            raise DecodeError(f"{where}: {datatype} data must be whole numbers, {_odd(flat, int)}")
        array = _integers(flat, dtype.newbyteorder("="), datatype, where)
    else:  # FP16, FP32, FP64, BF16 (which arrives as float32)
        if not kinds <= {int, float}:
            raise DecodeError(f"{where}: {datatype} data must be numbers, {_odd(flat, int, float)}")
        array = _floats(
            flat, np.dtype(np.float32) if datatype == "BF16" else dtype, datatype, where
        )
    return array.reshape(shape)


def _odd(flat: list[Any], *kinds: type) -> str:
    """``"got 'x' (str) at 3"``: the first value not of ``kinds``, for a message."""
    index = next(i for i, v in enumerate(flat) if type(v) not in kinds)
    return f"got {quote(flat[index])} ({type(flat[index]).__name__}) at {index} (row-major)"


def _integers(flat: list[int], dtype: np.dtype[Any], datatype: str, where: str) -> np.ndarray:
    """Whole numbers as ``dtype``; one out of its range is refused, never wrapped."""
    info = np.iinfo(dtype)
    low, high = (min(flat), max(flat)) if flat else (0, 0)
    if low < info.min or high > info.max:
        bad = low if low < info.min else high
        raise DecodeError(
            f"{where}: {quote(bad)} is out of {datatype}'s range ({info.min} to {info.max})"
        )
    return np.asarray(flat, dtype=dtype)


def _floats(flat: list[float], dtype: np.dtype[Any], datatype: str, where: str) -> np.ndarray:
    """Numbers as ``dtype``; one that would overflow to infinity is refused."""
    try:
        wide = np.asarray(flat, dtype=np.float64)
    except OverflowError:  # an integer beyond any float
        raise DecodeError(f"{where}: a value is out of {datatype}'s range") from None
    with np.errstate(over="ignore"):
        array = wide.astype(dtype.newbyteorder("="))
    finite = np.isfinite(array)
    if not finite.all():  # JSON carries no infinity: this one overflowed
        index = int(np.argmin(finite))
        largest = float(np.finfo(dtype).max)
        raise DecodeError(
            f"{where}: {flat[index]!r} at {index} (row-major) is out of {datatype}'s range "
            f"(at most {largest:g} in magnitude)"
        )
    return array


def _flatten(data: list[Any]) -> list[Any]:
    """Nested lists' values in row-major order (without recursion: any depth)."""
    if not any(isinstance(v, list) for v in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def _as_bytes(value: Any, where: str) -> bytes:
    if isinstance(value, str):
        return value.encode()
    raise DecodeError(f"{where}: BYTES data must be strings, not {type(value).__name__}")


def _widen_bf16(words: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> float32 values (exact: bf16 is float32's top half)."""
    return (words.astype("<u4") << 16).view("<f4").astype(np.float32)


def _unpack_bytes(raw: memoryview, where: str) -> list[bytes]:
    items: list[bytes] = []
    position, end = 0, len(raw)
    while position < end:
        if position + 4 > end:
            raise DecodeError(f"{where}: BYTES binary data ends inside an element's length")
        (length,) = struct.unpack_from("<I", raw, position)
        position += 4
        if position + length > end:
            raise DecodeError(
                f"{where}: a BYTES element says {length} bytes, but only {end - position} remain"
            )
        items.append(bytes(raw[position : position + length]))
        position += length
    return items


def _pack_bytes(array: np.ndarray, name: str) -> bytes:
    parts: list[bytes] = []
    for value in array.ravel():
        data = value.encode() if isinstance(value, str) else _raw(value, name)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def datatype_of(dtype: np.dtype[Any]) -> str | None:
    """The protocol datatype that carries numpy ``dtype``; ``None`` if none does."""
    if dtype.kind in "OUS":
        return "BYTES"
    if dtype.name == "bfloat16":  # ml_dtypes' bfloat16, if the handler uses it
        return "BF16"
    return _BY_KIND.get(dtype.newbyteorder("="))


def as_array(value: Any) -> np.ndarray:
    """An output value as a numpy array (torch tensors are brought to the host)."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            tensor = tensor.float()
        return np.asarray(tensor.numpy())
    if isinstance(value, (str, bytes)):
        return np.asarray([value], dtype=object).reshape(())
    array = np.asarray(value)
    if array.dtype.kind in "US":
        array = array.astype(object)
    return array


def encode_outputs(
    values: Mapping[str, Any], binary: Sequence[str] | bool
) -> tuple[list[ResponseOutput], list[bytes]]:
    """Response tensors for ``values``; those named in ``binary`` (or all) as bytes.

    Raises:
        ValueError: an output no protocol datatype can carry, or BYTES that
            are not UTF-8 text asked for as JSON; the message names it.
    """
    outputs: list[ResponseOutput] = []
    chunks: list[bytes] = []
    for name, value in values.items():
        array = as_array(value)
        datatype = datatype_of(array.dtype)
        if datatype is None:
            raise ValueError(
                f"output {name!r} has dtype {array.dtype}, which no protocol datatype carries"
            )
        shape = list(array.shape)
        if binary is True or (binary is not False and name in binary):
            if datatype == "BYTES":
                data = _pack_bytes(array, name)
            elif datatype == "BF16":
                data = np.ascontiguousarray(array).view("<u2").tobytes()
            else:
                data = np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()
            chunks.append(data)
            outputs.append(
                ResponseOutput(
                    name=name,
                    shape=shape,
                    datatype=datatype,
                    parameters={"binary_data_size": len(data)},
                )
            )
            continue
        flat: list[Any]
        if datatype == "BYTES":
            flat = [_as_text(v, name) for v in array.ravel()]
        elif datatype == "BF16":
            flat = _json_floats(array.astype(np.float32))
        elif datatype[0] == "F":
            flat = _json_floats(array)
        else:
            flat = array.ravel().tolist()
        outputs.append(ResponseOutput(name=name, shape=shape, datatype=datatype, data=flat))
    return outputs, chunks


#: How JSON data writes what JSON has no number for. Triton's clients (which
#: make numpy arrays of the data with its dtype) read these back exactly.
_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _json_floats(array: np.ndarray) -> list[Any]:
    """Floats for JSON data: NaN and the infinities as the strings numpy reads back."""
    flat: list[Any] = array.ravel().tolist()
    if not np.isfinite(array).all():
        flat = [v if math.isfinite(v) else _NON_FINITE[repr(v)] for v in flat]
    return flat


def _raw(value: Any, name: str) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview | np.bytes_):
        return bytes(value)
    raise ValueError(
        f"output {name!r} holds {type(value).__name__} values; the protocol carries "
        "numbers, booleans and text (str or bytes)"
    )


def _as_text(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return _raw(value, name).decode()
    except UnicodeDecodeError:
        raise ValueError(
            f"output {name!r} holds bytes that are not UTF-8 text; ask for it with "
            '"binary_data": true'
        ) from None
