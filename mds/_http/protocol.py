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

from .._errors import DecodeError

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
    "datatype_of",
    "decode_inputs",
    "decode_request",
    "encode_outputs",
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
        if any(d < 0 for d in tensor.shape):
            raise DecodeError(f"{where}: shape {tensor.shape} has a negative dimension")
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
            arrays[tensor.name] = _from_bytes(raw, tensor.datatype, dtype, tensor.shape, where)
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


def _from_bytes(
    raw: memoryview, datatype: str, dtype: np.dtype[Any], shape: list[int], where: str
) -> np.ndarray:
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
    if not isinstance(data, list):
        data = [data]
    try:
        if datatype == "BYTES":
            flat = _flatten(data)
            array = np.empty(len(flat), dtype=object)
            array[:] = [_as_bytes(v, where) for v in flat]
        elif datatype == "BF16":
            array = np.asarray(data, dtype=np.float32)
        else:
            array = np.asarray(data, dtype=dtype.newbyteorder("="))
            if datatype == "BOOL" and not all(isinstance(v, bool) for v in _flatten(data)):
                raise ValueError("BOOL data must be true or false")
    except DecodeError:
        raise
    except (ValueError, TypeError, OverflowError) as exc:
        raise DecodeError(f"{where}: data does not fit {datatype}: {exc}") from None
    if array.size != count:
        raise DecodeError(f"{where}: shape {shape} needs {count} values; data has {array.size}")
    return array.reshape(shape)


def _flatten(data: list[Any]) -> list[Any]:
    if not any(isinstance(v, list) for v in data):
        return data
    flat: list[Any] = []
    for value in data:
        flat.extend(_flatten(value) if isinstance(value, list) else [value])
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
            flat = array.astype(np.float32).ravel().tolist()
        else:
            flat = array.ravel().tolist()
        outputs.append(ResponseOutput(name=name, shape=shape, datatype=datatype, data=flat))
    return outputs, chunks


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
