"""ModelStreamInfer with Triton's clients: chunks, Triton's final-response convention, errors."""

from __future__ import annotations

import queue
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

# Imported here: numpy imports its testing module on first use, which must not be on the loop.
from numpy.testing import assert_array_equal

pytest.importorskip("grpc")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")

if TYPE_CHECKING:
    from tests.grpc.conftest import Served

InferInput = tritonclient_grpc.InferInput


def text(value: str) -> Any:
    found = InferInput("text", [1], "BYTES")
    found.set_data_from_numpy(np.array([value.encode()], dtype=object))
    return found


def features(*shape: int) -> Any:
    found = InferInput("x", list(shape), "FP32")
    found.set_data_from_numpy(np.arange(np.prod(shape), dtype=np.float32).reshape(shape))
    return found


class Responses:
    """What a sync stream's callback got, read in order."""

    def __init__(self) -> None:
        self.got: queue.Queue[tuple[Any, Any]] = queue.Queue()

    def __call__(self, result: Any, error: Any) -> None:
        self.got.put((result, error))

    def next(self, count: int) -> list[tuple[Any, Any]]:
        return [self.got.get(timeout=30) for _ in range(count)]


def final(result: Any) -> bool | None:
    """The response's ``triton_final_response`` parameter, if it has one."""
    parameters = result.get_response().parameters
    return parameters["triton_final_response"].bool_param if parameters else None


def word(result: Any) -> bytes:
    value: bytes = result.as_numpy("output0").item()
    return value


def test_each_chunk_is_one_response(client: Any) -> None:
    responses = Responses()
    client.start_stream(callback=responses)
    try:
        client.async_stream_infer("words", [text("hello big world")], request_id="w1")
        got = responses.next(3)
        assert [error for _, error in got] == [None] * 3
        assert [word(result) for result, _ in got] == [b"hello", b"big", b"world"]
        assert {r.get_response().id for r, _ in got} == {"w1"}
        assert {final(r) for r, _ in got} == {None}  # not asked for
    finally:
        client.stop_stream()


def test_the_empty_final_response_as_tritons_decoupled_models_send_it(client: Any) -> None:
    responses = Responses()
    client.start_stream(callback=responses)
    try:
        client.async_stream_infer(
            "words", [text("a b")], request_id="w2", enable_empty_final_response=True
        )
        first, second, last = (result for result, _ in responses.next(3))
        assert (word(first), final(first)) == (b"a", False)
        assert (word(second), final(second)) == (b"b", False)
        assert final(last) is True and not last.get_response().outputs
        assert last.get_response().id == "w2"
        # A model that does not stream: its one response is the final one.
        client.async_stream_infer(
            "scale", [features(4)], request_id="s1", enable_empty_final_response=True
        )
        ((result, error),) = responses.next(1)
        assert error is None and final(result) is True
        assert_array_equal(result.as_numpy("y"), np.arange(4, dtype=np.float32))
    finally:
        client.stop_stream()


def test_an_error_answers_its_request_and_the_stream_goes_on(client: Any) -> None:
    responses = Responses()
    client.start_stream(callback=responses)
    try:
        client.async_stream_infer("words", [text("x boom y")], request_id="w3")
        (first, no_error), (nothing, error) = responses.next(2)
        assert word(first) == b"x" and no_error is None and nothing is None
        assert "model 'words' (version 1)" in error.message()
        assert "the stream broke at 'boom'" in error.message()
        client.async_stream_infer("nope", [features(4)])
        ((_, error),) = responses.next(1)
        assert error.message().startswith("no model named 'nope'")
        client.async_stream_infer("scale", [features(5)])
        ((_, error),) = responses.next(1)
        assert "model 'scale' (version 1)" in error.message()
        client.async_stream_infer("scale", [features(2, 4)], request_id="s2")
        ((result, error),) = responses.next(1)
        assert error is None and result.get_response().id == "s2"
        assert result.as_numpy("y").shape == (2, 4)
    finally:
        client.stop_stream()


def test_a_streams_requests_are_served_together(client: Any, served: Served) -> None:
    responses = Responses()
    client.start_stream(callback=responses)
    try:
        for index in range(20):
            client.async_stream_infer("scale", [features(4)], request_id=str(index))
        got = responses.next(20)
    finally:
        client.stop_stream()
    assert all(error is None for _, error in got)
    assert sorted(int(r.get_response().id) for r, _ in got) == list(range(20))


def test_closing_a_stream_cancels_its_requests_in_the_batcher(
    client: Any, served: Served, eventually: Any
) -> None:
    before = served.held.statistics()
    with served.holding() as held:
        client.start_stream(callback=Responses())
        served.fill(lambda: client.async_stream_infer("held", [features(4)]))
        client.stop_stream(cancel_requests=True)
        eventually(lambda: held.statistics().cancelled == before.cancelled + 3, "cancelled")
    # The batches that had started were computed; no request was answered.
    assert held.statistics().completed == before.completed


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # grpc.aio runs on asyncio
async def test_the_aio_clients_stream(served: Served, anyio_backend: str) -> None:
    aio = pytest.importorskip("tritonclient.grpc.aio")
    triton = aio.InferenceServerClient(served.url)

    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield {"model_name": "words", "inputs": [text("one two")], "request_id": "w"}
        yield {"model_name": "scale", "inputs": [features(2, 4)], "request_id": "s"}
        yield {"model_name": "nope", "inputs": [features(4)], "request_id": "n"}

    try:
        got = [answer async for answer in triton.stream_infer(requests())]
    finally:
        await triton.close()
    results = [result for result, error in got if error is None]
    errors = [error.message() for result, error in got if error is not None]
    assert sorted(word(r) for r in results if r.get_response().id == "w") == [b"one", b"two"]
    (scores,) = [r for r in results if r.get_response().id == "s"]
    assert scores.as_numpy("y").shape == (2, 4)
    assert len(errors) == 1 and errors[0].startswith("no model named 'nope'")


def test_each_chunk_sees_its_own_requests_context(client: Any) -> None:
    responses = Responses()
    client.start_stream(callback=responses)
    try:
        for n in range(6):
            client.async_stream_infer("said", [text("a b c")], request_id=f"req-{n}")
        got = [result for result, error in responses.next(18) if error is None]
    finally:
        client.stop_stream()
    assert len(got) == 18
    for result in got:
        chunk = word(result).decode()
        assert chunk.endswith(f"@{result.get_response().id}"), chunk


def test_a_message_that_does_not_parse_fails_alone(served: Served) -> None:
    import grpc
    from tritonclient.grpc import service_pb2

    good = service_pb2.ModelInferRequest(model_name="echo", id="good")
    tensor = good.inputs.add(name="x", datatype="FP32", shape=[2])
    del tensor  # described; its data is the raw contents below
    good.raw_input_contents.append(np.array([1, 2], dtype=np.float32).tobytes())
    with grpc.insecure_channel(served.url) as channel:
        stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )
        bad = b"\x0a\x02\xc3\x28"  # model_name: not UTF-8
        got = list(stream(iter([bad, good.SerializeToString(), bad]), timeout=30))
    errors = [r.error_message for r in got if r.error_message]
    assert (
        errors
        == [
            "the message is not a ModelInferRequest: Error parsing message "
            "with type 'inference.ModelInferRequest'"
        ]
        * 2
    )
    (answered,) = [r.infer_response for r in got if not r.error_message]
    assert answered.id == "good"
