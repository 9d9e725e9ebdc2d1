"""``ModelInferRequest`` to the protocol's request and arrays; outputs to ``ModelInferResponse``.

A request's tensors travel either all as raw little-endian bytes
(``raw_input_contents``, one entry per input, in order: what Triton's
clients send) or each in the typed ``contents`` field its datatype takes
(``fp32_contents``, ``int64_contents``, ``bytes_contents``, ...). Responses
always carry raw bytes (``raw_output_contents``), as Triton's do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError as ProtobufError
from tritonclient.grpc import service_pb2

from .._errors import DecodeError, InferenceError, quote
from .._oip import protocol
from .._oip.call import V2Call
from .._oip.protocol import InferRequest, RequestInput, RequestOutput

__all__ = ["CONTENTS", "decode", "empty", "parameters", "parse", "response"]

#: Datatype -> the typed contents field that carries it. FP16 and BF16 have
#: none: they travel as raw bytes only.
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

#: The values a typed contents field holds, as numpy reads them before the
#: datatype's range is checked.
_WIDE = {
    "int_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint64),
}


def parameters(given: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    """``InferParameter`` values by name as plain values; ``None`` if there are none.

    Raises:
        DecodeError: a parameter with no value set.
    """
    if not given:
        return None
    found: dict[str, Any] = {}
    for key, value in given.items():
        kind = value.WhichOneof("parameter_choice")
        if kind is None:
            raise DecodeError(
                f"{where}parameters[{quote(key)}] has no value: set bool_param, int64_param, "
                "uint64_param, double_param or string_param"
            )
        found[key] = getattr(value, kind)
    return found


def decode(message: Any) -> tuple[InferRequest, dict[str, np.ndarray]]:
    """The protocol request a ``ModelInferRequest`` holds, and its inputs as arrays by name.

    The request's inputs carry no data: the arrays do.

    Raises:
        DecodeError: naming the input: an unknown datatype, a bad shape,
            contents that do not make the shape, both raw and typed
            contents, or raw contents that are not one per input.
    """
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise DecodeError(
            f"raw_input_contents holds {len(raw)} tensors for {len(message.inputs)} inputs: "
            "send one per input, in the inputs' order (or none, and each input's contents)"
        )
    inputs: list[RequestInput] = []
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.inputs):
        name = tensor.name
        where = f"input {quote(name)}"
        if name in arrays:
            raise DecodeError(f"{where} is given twice")
        datatype = tensor.datatype
        dtype = protocol.DATATYPES.get(datatype)
        if dtype is None:
            raise DecodeError(
                f"{where}: unknown datatype {quote(datatype)}; the protocol's are "
                f"{', '.join(protocol.DATATYPES)}"
            )
        shape = list(tensor.shape)
        protocol.check_shape(shape, dtype, where)
        typed = [field.name for field, _ in tensor.contents.ListFields()]
        if raw:
            if typed:
                raise DecodeError(
                    f"{where}: has contents.{typed[0]} and raw_input_contents too; a request "
                    "sends all its inputs raw, or each in its contents"
                )
            arrays[name] = _from_raw(raw[index], index, datatype, dtype, shape, where)
        else:
            arrays[name] = _from_contents(tensor.contents, typed, datatype, dtype, shape, where)
        inputs.append(
            RequestInput(
                name=name,
                shape=shape,
                datatype=datatype,
                parameters=parameters(tensor.parameters, f"{where}: "),
            )
        )
    outputs = [
        RequestOutput(
            name=output.name,
            parameters=parameters(output.parameters, f"output {quote(output.name)}: "),
        )
        for output in message.outputs
    ]
    request = InferRequest(
        inputs=inputs,
        id=message.id or None,
        parameters=parameters(message.parameters, ""),
        outputs=outputs or None,
    )
    return request, arrays


def _from_raw(
    raw: bytes, index: int, datatype: str, dtype: np.dtype[Any], shape: list[int], where: str
) -> np.ndarray:
    if datatype != "BYTES":
        # Checked here, so that the message names the gRPC field, not HTTP's binary_data_size.
        need = math.prod(shape) * dtype.itemsize
        if len(raw) != need:
            raise DecodeError(
                f"{where}: shape {quote(shape)} of {datatype} needs {need} bytes; "
                f"raw_input_contents[{index}] has {len(raw)}"
            )
    return protocol.from_bytes(memoryview(raw), datatype, dtype, shape, where)


def _from_contents(
    contents: Any,
    typed: list[str],
    datatype: str,
    dtype: np.dtype[Any],
    shape: list[int],
    where: str,
) -> np.ndarray:
    """An input from its typed contents, checked against its datatype and shape."""
    field = CONTENTS.get(datatype)
    count = math.prod(shape)
    if field is None:
        raise DecodeError(
            f"{where}: {datatype} has no typed contents in the protocol; send it in "
            "raw_input_contents"
        )
    wrong = [name for name in typed if name != field]
    if wrong:
        raise DecodeError(
            f"{where}: datatype {datatype} travels in contents.{field}, not contents.{wrong[0]}"
        )
    values = getattr(contents, field)
    if len(values) != count:
        if not typed:
            raise DecodeError(f"{where}: has no data: send contents.{field} or raw_input_contents")
        raise DecodeError(
            f"{where}: shape {quote(shape)} needs {count} values; contents.{field} has "
            f"{len(values)}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    native = dtype.newbyteorder("=")
    wide = _WIDE.get(field)
    if wide is None:
        return np.asarray(values, dtype=native).reshape(shape)
    array = np.asarray(values, dtype=wide)
    info = np.iinfo(native)
    if count and (array.min() < info.min or array.max() > info.max):
        bad = array.min() if array.min() < info.min else array.max()
        raise DecodeError(
            f"{where}: {bad} in contents.{field} is out of {datatype}'s range "
            f"({info.min} to {info.max})"
        )
    return array.astype(native).reshape(shape)


def response(call: V2Call, values: Mapping[str, Any], final: bool | None = None) -> Any:
    """The ``ModelInferResponse`` carrying output ``values`` raw, for ``call``.

    ``final``: the ``triton_final_response`` parameter a stream's response
    carries when the client asked for an empty final response; ``None``: none.

    Raises:
        InferenceError: an output that no protocol datatype carries.
    """
    try:
        outputs, chunks = protocol.encode_outputs(values, True)
    except ValueError as exc:
        raise InferenceError(str(exc)) from exc
    message = empty(call, final)
    for output in outputs:
        message.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
    message.raw_output_contents.extend(chunks)
    return message


def empty(call: V2Call, final: bool | None = None) -> Any:
    """A response with no outputs: a stream's last (``final``), or one that carries an error."""
    message = service_pb2.ModelInferResponse(
        model_name=call.target.name, model_version=call.target.version, id=call.request.id or ""
    )
    if final is not None:
        message.parameters["triton_final_response"].bool_param = final
    return message


def parse(raw: bytes) -> Any:
    """A ``ModelInferRequest`` from its bytes.

    Raises:
        DecodeError: they are not one (gRPC's own parsing would end the call
            with ``UNKNOWN``, or a stream with all its requests).
    """
    try:
        return service_pb2.ModelInferRequest.FromString(raw)
    except ProtobufError as exc:
        raise DecodeError(f"the message is not a ModelInferRequest: {exc}") from None
