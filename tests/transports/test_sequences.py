"""A stateful model over HTTP: tritonclient's sequence parameters, and mds's JSON route headers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ..servers import Served

pytestmark = pytest.mark.slow


@pytest.fixture
def triton(server: Served) -> Any:
    client = pytest.importorskip("tritonclient.http")
    found = client.InferenceServerClient(server.url.removeprefix("http://") + "/ml")
    yield found
    found.close()


def step(triton: Any, row: list[float], **sequence: Any) -> np.ndarray:
    import tritonclient.http as client

    x = client.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.asarray([row], np.float32))
    result: np.ndarray = triton.infer("accumulate", [x], **sequence).as_numpy("total")
    return result


def test_tritonclient_sends_steps_of_interleaved_sequences(triton: Any) -> None:
    assert step(triton, [1, 1, 1, 1], sequence_id=11, sequence_start=True).tolist() == [[1] * 4]
    assert step(triton, [5, 0, 0, 0], sequence_id="text-id", sequence_start=True).tolist() == [
        [5, 0, 0, 0]
    ]
    assert step(triton, [1, 2, 3, 4], sequence_id=11).tolist() == [[2, 3, 4, 5]]
    assert step(triton, [1, 0, 0, 0], sequence_id="text-id", sequence_end=True).tolist() == [
        [6, 0, 0, 0]
    ]
    assert step(triton, [0, 0, 0, 1], sequence_id=11, sequence_end=True).tolist() == [[2, 3, 4, 6]]


def test_the_protocols_sequence_mistakes_are_400s_that_name_the_sequence(triton: Any) -> None:
    from tritonclient.utils import InferenceServerException

    cases = [
        ({"sequence_id": 404}, "sequence 404 is not live: its first step must have sequence_start"),
        ({}, "stateful: each request is a step of a sequence"),
    ]
    step(triton, [1, 1, 1, 1], sequence_id=12, sequence_start=True)
    cases.append(({"sequence_id": 12, "sequence_start": True}, "sequence 12 is already live"))
    for sequence, message in cases:
        with pytest.raises(InferenceServerException, match=message) as caught:
            step(triton, [1, 1, 1, 1], **sequence)
        assert caught.value.status() == "400"
    step(triton, [1, 1, 1, 1], sequence_id=12, sequence_end=True)


def test_a_stateless_model_and_a_batch_of_rows_refuse_a_sequence(server: Served) -> None:
    body = {"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    stateless = server.client.post(
        "/ml/v2/models/echo/infer",
        json={**body, "parameters": {"sequence_id": 3, "sequence_start": True}},
    )
    assert stateless.status_code == 400
    assert "not stateful" in stateless.json()["error"]
    rows = {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [0] * 8}
    batch = server.client.post(
        "/ml/v2/models/accumulate/infer",
        json={"inputs": [rows], "parameters": {"sequence_id": 3, "sequence_start": True}},
    )
    assert batch.status_code == 400
    assert "a step of a sequence is one request" in batch.json()["error"]
    flag = server.client.post(
        "/ml/v2/models/accumulate/infer",
        json={**body, "parameters": {"sequence_id": 3, "sequence_start": "yes"}},
    )
    assert flag.status_code == 400
    assert "parameters.sequence_start" in flag.json()["error"]


def test_the_json_route_takes_a_sequence_in_headers(server: Served) -> None:
    def post(row: list[float], **headers: str) -> Any:
        return server.client.post("/ml/models/accumulate/infer", json=row, headers=headers)

    first = post([1, 2, 3, 4], **{"Mds-Sequence-Id": "session-7", "Mds-Sequence-Start": "true"})
    assert first.status_code == 200, first.text
    assert first.json() == {"total": [1, 2, 3, 4]}
    assert post([1, 1, 1, 1], **{"Mds-Sequence-Id": "session-7"}).json() == {"total": [2, 3, 4, 5]}
    # Digits name the integer id: the protocol's sequence_id 21 is the same sequence.
    assert post([1, 0, 0, 0], **{"Mds-Sequence-Id": "21", "Mds-Sequence-Start": "1"}).json()
    last = post([0, 0, 0, 1], **{"Mds-Sequence-Id": "session-7", "Mds-Sequence-End": "true"})
    assert last.json() == {"total": [2, 3, 4, 6]}
    gone = post([0, 0, 0, 1], **{"Mds-Sequence-Id": "session-7"})
    assert gone.status_code == 400
    assert "sequence 'session-7' is not live: it ended (ended)" in gone.json()["error"]
    bad = post([0, 0, 0, 1], **{"Mds-Sequence-Id": "x", "Mds-Sequence-Start": "maybe"})
    assert bad.status_code == 400
    assert "Mds-Sequence-Start" in bad.json()["error"]
    v2 = {"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 0, 0, 0]}]}
    ended = server.client.post(
        "/ml/v2/models/accumulate/infer",
        json={**v2, "parameters": {"sequence_id": 21, "sequence_end": True}},
    )
    assert ended.json()["outputs"][0]["data"] == [2, 0, 0, 0]


def test_the_model_config_says_it_batches_sequences(triton: Any) -> None:
    config = triton.get_model_config("accumulate")  # tritonclient.http: the config itself
    assert "dynamic_batching" not in config
    assert config["sequence_batching"]["max_sequence_idle_microseconds"] == 60_000_000
    assert config["sequence_batching"]["oldest"]["max_candidate_sequences"] == 50
