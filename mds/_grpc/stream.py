"""``ModelStreamInfer``: a stream of requests, each served as it comes, answered as it ends.

The requests of one stream are served at once (they batch together), and
each response is written as soon as it is made, so responses may come in
another order than their requests: the response's ``id`` says which request
it answers, as with Triton. A model that streams (a ``postprocess`` that
yields) gives one response per chunk. With the request parameter
``triton_enable_empty_final_response``, as Triton's decoupled models do, its
chunks carry ``triton_final_response=false`` and an empty response with
``triton_final_response=true`` follows the last; any other model's one
response carries ``true``. An error goes into its request's response
(``error_message``), and the stream goes on. The steps of one sequence (a
stateful model's) are served in the order they came: each waits for the one
before it on the stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from tritonclient.grpc import service_pb2

from .._errors import DecodeError, InvalidInput, MdsError
from .._oip import call as v2_call
from .._oip.call import V2Call
from .._request import use_request_context
from .._servable import Servable
from . import codec
from .calls import EMPTY_FINAL, deadline, error_status, metadata, named, prepared, traced

__all__ = ["Stream"]

#: Responses made and not yet written: past it, the requests' tasks wait
#: for the client to read.
_BUFFER = 16

Send = MemoryObjectSendStream[Any]


class Stream:
    """One ``ModelStreamInfer`` call.

    Args:
        target: the servable a request names, by name and version.
        requests: the call's request iterator.
        context: the call's servicer context.
    """

    def __init__(self, target: Callable[[str, str], Servable], requests: Any, context: Any) -> None:
        self.target = target
        self.requests = requests
        self.context = context
        self.headers = metadata(context)
        # The last step of each sequence on this stream: set when it has been answered.
        self._steps: dict[Any, anyio.Event] = {}

    async def run(self) -> None:
        """Serve every request until the client closes its side; write each response."""
        send, receive = anyio.create_memory_object_stream[Any](_BUFFER)
        with traced("ModelStreamInfer", self.headers):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._read, send)
                async with receive:
                    async for response in receive:
                        await self.context.write(response)

    async def _read(self, send: Send) -> None:
        async with send:
            async with anyio.create_task_group() as tasks:
                async for raw in self.requests:
                    try:
                        # Bytes from the server (mds parses them); messages from a test's stub.
                        message = codec.parse(raw) if isinstance(raw, bytes) else raw
                    except DecodeError as exc:
                        # That request's error; the stream and its other requests go on.
                        details = error_status(exc)[1]
                        await send.send(service_pb2.ModelStreamInferResponse(error_message=details))
                        continue
                    key = _sequence(message)
                    if key is None:
                        tasks.start_soon(self._one, message, send)
                        continue
                    # Chained here, in the order they came: tasks start in no set order.
                    before, done = self._steps.get(key), anyio.Event()
                    self._steps[key] = done
                    tasks.start_soon(self._in_turn, message, send, key, before, done)

    async def _in_turn(
        self, message: Any, send: Send, key: Any, before: anyio.Event | None, done: anyio.Event
    ) -> None:
        """:meth:`_one` for a step of a sequence, once the one before it has been answered."""
        try:
            if before is not None:
                await before.wait()
            await self._one(message, send)
        finally:
            done.set()
            if self._steps.get(key) is done:
                del self._steps[key]

    async def _one(self, message: Any, send: Send) -> None:
        """Serve one request; send its responses, or its error."""
        target: Servable | None = None
        call: V2Call | None = None
        try:
            with named(self.headers, message.id or None):
                target = self.target(message.model_name, message.model_version).choose()
                call, final = await prepared(target, message, self.headers)
                if target.streams:
                    await self._chunks(target, call, final, send)
                    return
                timeout = deadline(call, self.context)
                with use_request_context(call.context):
                    if call.rows is None:
                        result = await target.serve(
                            call.payload, timeout=timeout, priority=call.priority
                        )
                    else:
                        result = await target.serve_many(
                            call.rows, timeout=timeout, priority=call.priority
                        )
                values = v2_call.outputs(call, result)
                response = codec.response(call, values, True if final else None)
        except Exception as exc:
            if isinstance(exc, MdsError) and target is not None:
                target.add_context(exc)
            response = None
            error = self._error(message, target, exc)
        if response is None:
            await send.send(error)
            return
        await send.send(service_pb2.ModelStreamInferResponse(infer_response=response))

    async def _chunks(self, target: Servable, call: V2Call, final: bool, send: Send) -> None:
        """A streaming model's chunks, one response each, then the empty final one if asked."""
        if call.rows is not None:
            raise InvalidInput(
                "it streams its responses, so it takes one request at a time: send the "
                "tensors without a batch axis"
            )
        timeout = deadline(call, self.context)
        with use_request_context(call.context):
            chunks = target.stream(call.payload, timeout=timeout, priority=call.priority)
            try:
                async for chunk in chunks:
                    response = codec.response(
                        call, v2_call.outputs(call, chunk), False if final else None
                    )
                    await send.send(service_pb2.ModelStreamInferResponse(infer_response=response))
            finally:
                close = getattr(chunks, "aclose", None)
                if close is not None:
                    with anyio.CancelScope(shield=True):
                        await close()
        if final:
            response = codec.empty(call, True)
            await send.send(service_pb2.ModelStreamInferResponse(infer_response=response))

    def _error(self, message: Any, target: Servable | None, exc: BaseException) -> Any:
        """The response that carries one request's error; the last of its request."""
        _, details = error_status(exc)
        response = service_pb2.ModelInferResponse(
            model_name=message.model_name,
            model_version=target.version if target is not None else message.model_version,
            id=message.id,
        )
        asked = message.parameters.get(EMPTY_FINAL)
        if asked is not None and asked.WhichOneof("parameter_choice") == "bool_param":
            if asked.bool_param:
                response.parameters["triton_final_response"].bool_param = True
        return service_pb2.ModelStreamInferResponse(error_message=details, infer_response=response)


def _sequence(message: Any) -> tuple[str, Any] | None:
    """The model and sequence a request is a step of; ``None`` if none (0 and "" are none)."""
    parameters = message.parameters
    chosen = parameters.get("sequence_id") if parameters else None
    kind = chosen.WhichOneof("parameter_choice") if chosen is not None else None
    value = getattr(chosen, kind) if kind else None
    return (message.model_name, value) if value else None
