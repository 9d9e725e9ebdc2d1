"""An Open Inference Protocol request to a servable's requests, and responses back.

Transport-neutral: the HTTP routes decode a JSON (or binary) body, the gRPC
service a protobuf message, into the same :class:`~.protocol.InferRequest`
and input arrays; :func:`prepare` does the rest. A request's tensors are
checked against what the model declares (its signature: names, datatypes,
shapes per row), split into rows when the client sent a batch axis (as
Triton's clients do: ``[1, 16]``, ``[N, 16]``), and each row made into the
handler's request by its ``from_tensors``. The request's ``parameters``
give its deadline and priority (``timeout``, ``priority``) and the rest
reach the handler (:func:`mds.request_context`). Each response becomes named
output tensors by ``to_tensors``; rows are joined back along the batch axis,
in order; outputs asked for with ``classification`` become their top classes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import msgspec
import numpy as np

from .._errors import InferenceError, InvalidInput, MdsError, excerpt, quote
from .._named import input_check, named_outputs, output_namer, request_from_tensors
from .._request import EMPTY_CONTEXT, RequestContext, use_request_context
from .._servable import Servable
from .._stateful import in_sequence
from .._tensors import TensorSpec, dims
from . import protocol
from .protocol import InferRequest, TensorMetadata

__all__ = ["V2Call", "decode", "encode", "outputs", "prepare", "tensor_metadata"]

_encoder = msgspec.json.Encoder()

#: Request parameters mds acts on itself; the handler gets the others.
RESERVED = frozenset(
    {"timeout", "priority", "binary_data_output", "sequence_id", "sequence_start", "sequence_end"}
)


class V2Call(NamedTuple):
    """A decoded protocol request, ready to serve.

    Attributes:
        target: the model or pipeline it names.
        request: the request, typed (its inputs' data may be left out).
        payload: the handler's request (when ``rows`` is ``None``).
        rows: one handler request per row, when the client sent a batch axis.
        context: what the handler may read of it (:func:`mds.request_context`).
        timeout: the deadline its ``timeout`` parameter sets, in seconds.
        priority: the mds priority level its ``priority`` parameter sets.
    """

    target: Servable
    request: InferRequest
    payload: Any
    rows: list[Any] | None
    context: RequestContext
    timeout: float | None = None
    priority: int | None = None


def decode(
    target: Servable, body: bytes, header_length: str | None, request_id: str | None = None
) -> V2Call:
    """The call an HTTP request body (JSON, or JSON then binary tensors) makes of ``target``.

    Raises:
        DecodeError: the body does not fit the protocol.
        InvalidInput: its tensors or parameters do not fit what the model
            declares; the message names the input, what was expected and what came.
    """
    request, binary = protocol.decode_request(body, header_length)
    return prepare(target, request, protocol.decode_inputs(request, binary), request_id)


def prepare(
    target: Servable,
    request: InferRequest,
    tensors: dict[str, np.ndarray],
    request_id: str | None = None,
) -> V2Call:
    """The call a decoded request (its input arrays by name) makes of ``target``.

    ``request_id`` stands in for a request without an ``id`` (a transport's
    own request id header).

    Raises:
        InvalidInput: as :func:`decode`.
    """
    timeout, priority, parameters = _limits(request.parameters)
    if priority is not None:
        _check_level(target, priority)
    wanted = _wanted(request)
    given = request.id or request_id
    # The one empty context when there is nothing to read: the route then sets none.
    context = (
        RequestContext(id=given, parameters=parameters, outputs=wanted)
        if given or parameters or wanted
        else EMPTY_CONTEXT
    )
    if request.parameters and any(key in request.parameters for key in _SEQUENCE):
        context = _sequence(target, request.parameters, context)
    signature = target.signature()
    with use_request_context(context):
        if signature is None:
            payload = request_from_tensors(target, tensors)
            return V2Call(target, request, payload, None, context, timeout, priority)
        inputs, declared = signature
        _check_names("input", tensors, inputs, missing=True)
        if wanted:
            _check_names("output", wanted, declared, missing=False)
        check = input_check(signature)
        rows = _rows(tensors, inputs)
        if rows is None:
            payload = request_from_tensors(target, check(tensors))
            return V2Call(target, request, payload, None, context, timeout, priority)
        capacity = target.queue_capacity
        if context.sequence_id is not None and len(rows) > 1:
            raise InvalidInput(
                f"the request has {len(rows)} rows; a step of a sequence is one request: "
                "send one row, or the tensors without a batch axis"
            )
        if capacity is not None and len(rows) > capacity:
            raise InvalidInput(
                f"the request has {len(rows)} rows; the model queues at most {capacity} "
                "requests at once: send at most that many rows"
            )
        requests = [request_from_tensors(target, check(row)) for row in rows]
        return V2Call(target, request, None, requests, context, timeout, priority)


def _limits(
    parameters: Mapping[str, Any] | None,
) -> tuple[float | None, int | None, dict[str, Any]]:
    """The deadline and priority level the request's parameters set, and the others.

    ``timeout`` is in microseconds and ``priority`` counts from 1 (the
    highest), 0 being the model's default, as in Triton; mds's levels count
    from 0.
    """
    if not parameters:
        return None, None, {}
    timeout: float | None = None
    priority: int | None = None
    raw = parameters.get("timeout")
    if raw is not None:
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not raw >= 0:
            raise InvalidInput(
                f"parameters.timeout: {excerpt(repr(raw), 40)} is not a number of "
                "microseconds (0 or more)"
            )
        try:
            timeout = raw / 1e6 if raw > 0 and math.isfinite(raw) else None
        except OverflowError:  # an int past any float: no deadline, as infinity
            timeout = None
    raw = parameters.get("priority")
    if raw is not None:
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
            raise InvalidInput(
                f"parameters.priority: {excerpt(repr(raw), 40)} is not a priority "
                "(1 is the highest; 0, the model's default)"
            )
        priority = raw - 1 if raw > 0 else None
    binary = parameters.get("binary_data_output")
    if binary is not None and not isinstance(binary, bool):
        raise InvalidInput(
            f"parameters.binary_data_output: {excerpt(repr(binary), 40)} is not true or false"
        )
    return timeout, priority, {k: v for k, v in parameters.items() if k not in RESERVED}


_SEQUENCE = ("sequence_id", "sequence_start", "sequence_end")


def _sequence(
    target: Servable, parameters: Mapping[str, Any], context: RequestContext
) -> RequestContext:
    """``context`` with the sequence its parameters name (Triton's: 0 or "" for none)."""
    flags: list[bool] = []
    for name in ("sequence_start", "sequence_end"):
        flag = parameters.get(name, False)
        if not isinstance(flag, bool):
            raise InvalidInput(f"parameters.{name}: {excerpt(repr(flag), 40)} is not true or false")
        flags.append(flag)
    sequence_id = parameters.get("sequence_id")
    if sequence_id in (None, 0, "") and not isinstance(sequence_id, bool):
        if any(flags):
            raise InvalidInput("parameters.sequence_start and sequence_end need a sequence_id")
        return context
    with use_request_context(context):
        return in_sequence(target, sequence_id, flags[0], flags[1], "parameters.sequence_id")


def _check_level(target: Servable, level: int) -> None:
    """Refuse a ``priority`` parameter past the model's levels, in the client's numbering."""
    config = getattr(target, "config", None)  # a model's; a pipeline has no levels of its own
    levels = getattr(getattr(config, "batching", None), "priority_levels", None)
    if isinstance(levels, int) and level >= levels:
        raise InvalidInput(
            f"parameters.priority: {level + 1} is not a priority of this model: it has "
            f"{levels} (1, the highest, to {levels}; 0 for its default)"
        )


def _wanted(request: InferRequest) -> dict[str, Mapping[str, Any]]:
    """The outputs asked for, by name, with their parameters (checked)."""
    if not request.outputs:
        return {}
    wanted: dict[str, Mapping[str, Any]] = {}
    for index, output in enumerate(request.outputs):
        where = f"outputs[{index}] {quote(output.name)}"
        if output.name in wanted:
            raise InvalidInput(f"{where} is asked for twice")
        parameters = output.parameters or {}
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise InvalidInput(
                f"{where}: parameters.binary_data: {excerpt(repr(binary), 40)} is not true or false"
            )
        classes = parameters.get("classification")
        if classes is not None and (
            isinstance(classes, bool) or not isinstance(classes, int) or classes < 0
        ):
            raise InvalidInput(
                f"{where}: parameters.classification: {excerpt(repr(classes), 40)} is not "
                "a number of classes"
            )
        wanted[output.name] = parameters
    return wanted


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


def outputs(call: V2Call, result: Any) -> dict[str, Any]:
    """The output values the client gets for ``result``, by name, in the order asked.

    ``result`` is the response, or with rows each row's response or error.
    Outputs asked for with ``classification`` are their top classes.

    Raises:
        MdsError: a row failed (the first row's class; the message names every
            failed row), or an output asked for is not given.
    """
    with use_request_context(call.context):
        if call.rows is None:
            values = named_outputs(call.target, result)
        else:
            values = _joined(call.target, result)
    wanted = call.context.outputs
    if not wanted:
        return values
    unknown = [n for n in wanted if n not in values]
    if unknown:
        raise InvalidInput(
            f"the model gave no output {quote(unknown[0])}; it gave {', '.join(values) or 'none'}"
        )
    chosen: dict[str, Any] = {}
    for name, parameters in wanted.items():
        classes = parameters.get("classification")
        value = values[name]
        chosen[name] = _classes(call, name, value, classes) if classes else value
    return chosen


def encode(call: V2Call, result: Any, *, binary_ok: bool = True) -> tuple[bytes, int | None]:
    """The HTTP response body for ``result``, and its JSON part's length if binary data follows.

    ``binary_ok=False`` keeps the body all JSON (for a stream's events).

    Raises:
        MdsError: as :func:`outputs`, or the outputs cannot be sent.
    """
    values = outputs(call, result)
    request = call.request
    binary: list[str] | bool = bool((request.parameters or {}).get("binary_data_output"))
    if call.context.outputs:
        binary = [
            n for n, p in call.context.outputs.items() if p.get("binary_data", binary) is True
        ]
    if not binary_ok:
        binary = False
    try:
        encoded, chunks = protocol.encode_outputs(values, binary)
    except ValueError as exc:
        raise InferenceError(str(exc)) from exc
    response = protocol.InferResponse(
        model_name=call.target.name,
        model_version=call.target.version,
        id=request.id,
        outputs=encoded,
    )
    head = _encoder.encode(response)
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)


def _classes(call: V2Call, name: str, value: Any, count: int) -> np.ndarray:
    """An output's ``count`` highest values, as Triton's classification extension gives them.

    Each is the text ``"value:index"``, or ``"value:index:label"`` when the
    output's :class:`~mds.TensorSpec` has ``labels``: per row with rows, else
    over the whole output.
    """
    array = protocol.as_array(value)
    if array.dtype.kind not in "biuf":
        raise InvalidInput(
            f"output {quote(name)} holds {array.dtype} values: only numbers can be classified"
        )
    signature = call.target.signature()
    spec = signature[1].get(name) if signature is not None else None
    labels = spec.labels if spec is not None else None
    rows = array.reshape(len(array), -1) if call.rows is not None else array.reshape(1, -1)
    found = np.empty((len(rows), min(count, rows.shape[1])), dtype=object)
    for r, row in enumerate(rows):
        top = np.argsort(-row.astype(np.float64), kind="stable")[: found.shape[1]]
        for c, index in enumerate(top):
            score = row[index]
            text = f"{score:f}" if array.dtype.kind == "f" else str(score)
            label = f":{labels[index]}" if labels is not None and index < len(labels) else ""
            found[r, c] = f"{text}:{index}{label}".encode()
    return found if call.rows is not None else found[0]


def _joined(target: Servable, outcomes: Sequence[Any]) -> dict[str, Any]:
    """Rows' outputs stacked along a new batch axis, in order; or their errors, raised."""
    failed = [(i, o) for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
    if failed:
        raise _rows_failed(failed, len(outcomes))
    name = output_namer(target)
    named = [name(outcome) for outcome in outcomes]
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
