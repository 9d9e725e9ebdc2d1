"""An Open Inference Protocol request to a servable's requests, and responses back.

A request's tensors are checked against what the model declares (its
signature: names, datatypes, shapes per row), split into rows when the
client sent a batch axis (as Triton's clients do: ``[1, 16]``, ``[N, 16]``),
and each row made into the handler's request by its ``from_tensors``. Each
response becomes named output tensors by ``to_tensors``; rows are joined
back along the batch axis, in order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import msgspec
import numpy as np

from .._errors import InferenceError, InvalidInput, MdsError, excerpt, quote
from .._named import input_check, named_outputs, request_from_tensors
from .._servable import Servable
from .._tensors import TensorSpec, dims
from . import protocol
from .protocol import InferRequest, TensorMetadata

__all__ = ["V2Call", "decode", "encode", "tensor_metadata"]

_encoder = msgspec.json.Encoder()


class V2Call(NamedTuple):
    """A decoded protocol request, ready to serve.

    Attributes:
        target: the model or pipeline it names.
        request: the request body, typed.
        payload: the handler's request (when ``rows`` is ``None``).
        rows: one handler request per row, when the client sent a batch axis.
    """

    target: Servable
    request: InferRequest
    payload: Any
    rows: list[Any] | None


def decode(target: Servable, body: bytes, header_length: str | None) -> V2Call:
    """The call a protocol request body makes of ``target``.

    Raises:
        DecodeError: the body does not fit the protocol.
        InvalidInput: its tensors do not fit what the model declares; the
            message names the input, what was expected and what came.
    """
    request, binary = protocol.decode_request(body, header_length)
    tensors = protocol.decode_inputs(request, binary)
    signature = target.signature()
    if signature is None:
        return V2Call(target, request, request_from_tensors(target, tensors), None)
    inputs, outputs = signature
    _check_names("input", tensors, inputs, missing=True)
    if request.outputs:
        _check_names("output", {o.name: None for o in request.outputs}, outputs, missing=False)
    check = input_check(signature)
    rows = _rows(tensors, inputs)
    if rows is None:
        return V2Call(target, request, request_from_tensors(target, check(tensors)), None)
    capacity = target.queue_capacity
    if capacity is not None and len(rows) > capacity:
        raise InvalidInput(
            f"the request has {len(rows)} rows; the model queues at most {capacity} requests "
            "at once: send at most that many rows"
        )
    return V2Call(target, request, None, [request_from_tensors(target, check(row)) for row in rows])


def _rows(
    tensors: dict[str, np.ndarray], inputs: Mapping[str, TensorSpec]
) -> list[dict[str, np.ndarray]] | None:
    """The rows, if every input carries one axis more than it declares; else ``None``."""
    extra = {name: tensors[name].ndim - len(spec.shape) for name, spec in inputs.items()}
    if not any(extra.values()):
        return None
    counts = {tensors[name].shape[0] for name, more in extra.items() if more == 1}
    if set(extra.values()) != {1} or len(counts) != 1:
        shapes = ", ".join(
            f"{name} {dims(tensors[name].shape)} for {dims(spec.shape)}"
            for name, spec in inputs.items()
        )
        raise InvalidInput(
            "each input carries its declared shape, or all carry one more axis of the "
            f"same size in front (a batch of rows); got {shapes}"
        )
    count = counts.pop()
    if count == 0:
        raise InvalidInput("the batch axis is 0: there are no rows to compute")
    return [{name: tensor[i] for name, tensor in tensors.items()} for i in range(count)]


def encode(call: V2Call, result: Any, *, binary_ok: bool = True) -> tuple[bytes, int | None]:
    """The response body for ``result``, and its JSON part's length if binary data follows.

    ``result`` is the response, or with rows each row's response or error.
    ``binary_ok=False`` keeps the body all JSON (for a stream's events).

    Raises:
        MdsError: a row failed (the first row's class; the message names every
            failed row), or the outputs cannot be sent.
    """
    if call.rows is None:
        values = named_outputs(call.target, result)
    else:
        values = _joined(call.target, result)
    request = call.request
    binary: list[str] | bool = bool((request.parameters or {}).get("binary_data_output"))
    if request.outputs:
        wanted = {o.name: o for o in request.outputs}
        unknown = [n for n in wanted if n not in values]
        if unknown:
            raise InvalidInput(
                f"the model gave no output {quote(unknown[0])}; it gave "
                f"{', '.join(values) or 'none'}"
            )
        values = {n: values[n] for n in wanted}
        binary = [n for n, o in wanted.items() if (o.parameters or {}).get("binary_data", binary)]
    if not binary_ok:
        binary = False
    try:
        outputs, chunks = protocol.encode_outputs(values, binary)
    except ValueError as exc:
        raise InferenceError(str(exc)) from exc
    response = protocol.InferResponse(
        model_name=call.target.name,
        model_version=call.target.version,
        id=request.id,
        outputs=outputs,
    )
    head = _encoder.encode(response)
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)


def _joined(target: Servable, outcomes: Sequence[Any]) -> dict[str, Any]:
    """Rows' outputs stacked along a new batch axis, in order; or their errors, raised."""
    failed = [(i, o) for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
    if failed:
        raise _rows_failed(failed, len(outcomes))
    named = [named_outputs(target, outcome) for outcome in outcomes]
    names = list(named[0])
    if any(list(row) != names for row in named):
        raise InferenceError("the rows' responses have different outputs; they cannot be joined")
    try:
        return {name: np.stack([protocol.as_array(row[name]) for row in named]) for name in names}
    except ValueError as exc:
        raise InferenceError(f"the rows' outputs cannot be joined: {exc}") from exc


def _rows_failed(failed: list[tuple[int, BaseException]], count: int) -> BaseException:
    """One error for the request: the first failed row's class; each row's problem in words."""
    first = failed[0][1]
    if not isinstance(first, MdsError):
        return first
    shown = "; ".join(
        f"row {i}: {excerpt(e.message if isinstance(e, MdsError) else str(e), 300)}"
        for i, e in failed[:10]
    )
    more = f"; {len(failed) - 10} more rows failed" if len(failed) > 10 else ""
    message = f"{len(failed)} of {count} rows failed: {shown}{more}"
    try:
        error = type(first)(message, **first.context())
    except TypeError:  # a handler's own error class with another signature
        error = (InvalidInput if isinstance(first, InvalidInput) else InferenceError)(
            message, **first.context()
        )
    error.__cause__ = first
    return error


def _check_names(
    what: str, given: Mapping[str, Any], declared: Mapping[str, TensorSpec], *, missing: bool
) -> None:
    if not declared:
        return
    unknown = [n for n in given if n not in declared]
    if unknown:
        raise InvalidInput(
            f"the model has no {what} {quote(unknown[0])}; its {what}s are {', '.join(declared)}"
        )
    absent = [n for n in declared if n not in given] if missing else []
    if absent:
        raise InvalidInput(f"{what} {absent[0]!r} is missing; it needs {', '.join(declared)}")


def tensor_metadata(spec: TensorSpec) -> TensorMetadata:
    """A declared tensor as the protocol's metadata gives it (``-1``: any size)."""
    try:
        datatype = protocol.datatype_of(np.dtype(spec.dtype)) or spec.dtype
    except TypeError:
        datatype = spec.dtype
    shape = [d if isinstance(d, int) else -1 for d in spec.shape]
    return TensorMetadata(name=spec.name, datatype=datatype, shape=shape)
