"""A stateful model over gRPC: tritonclient's sequence parameters on ModelInfer and on a stream."""

from __future__ import annotations

import queue
from typing import Any

import numpy as np
import pytest

pytest.importorskip("grpc")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


def row(*values: float) -> Any:
    found = tritonclient_grpc.InferInput("x", [1, 4], "FP32")
    found.set_data_from_numpy(np.asarray([values], np.float32))
    return found


def total(result: Any) -> list[float]:
    found: list[float] = result.as_numpy("total")[0].tolist()
    return found


def test_model_infer_carries_the_sequence(client: Any) -> None:
    assert (
        total(client.infer("totals", [row(1, 1, 1, 1)], sequence_id=31, sequence_start=True))
        == [1] * 4
    )
    assert total(
        client.infer("totals", [row(1, 2, 3, 4)], sequence_id="g-1", sequence_start=True)
    ) == [1, 2, 3, 4]
    assert total(client.infer("totals", [row(2, 2, 2, 2)], sequence_id=31)) == [3] * 4
    assert total(
        client.infer("totals", [row(1, 0, 0, 0)], sequence_id="g-1", sequence_end=True)
    ) == [2, 2, 3, 4]
    assert total(client.infer("totals", [row(0, 0, 0, 1)], sequence_id=31, sequence_end=True)) == [
        3,
        3,
        3,
        4,
    ]
    with pytest.raises(
        InferenceServerException, match="sequence 31 is not live: it ended"
    ) as caught:
        client.infer("totals", [row(1, 1, 1, 1)], sequence_id=31)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="not stateful") as caught:
        client.infer("echo", [row(1, 1, 1, 1)], sequence_id=5, sequence_start=True)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_a_streams_steps_keep_their_order_and_sequences_interleave(client: Any) -> None:
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    sequences = {41: 1.0, 42: 10.0, "s-43": 100.0}
    steps = 8
    try:
        for index in range(steps):  # sent without waiting for answers
            for sequence_id, value in sequences.items():
                client.async_stream_infer(
                    "totals",
                    [row(value, index, 0, 0)],
                    request_id=f"{sequence_id}/{index}",
                    sequence_id=sequence_id,
                    sequence_start=index == 0,
                    sequence_end=index == steps - 1,
                )
        answers = [got.get(timeout=30) for _ in range(steps * len(sequences))]
    finally:
        client.stop_stream()
    assert [error for _, error in answers] == [None] * len(answers)
    by_id = {result.get_response().id: total(result) for result, _ in answers}
    for sequence_id, value in sequences.items():
        for index in range(steps):
            expected = [value * (index + 1), sum(range(index + 1)), 0, 0]
            assert by_id[f"{sequence_id}/{index}"] == expected
