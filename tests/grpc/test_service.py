"""Every RPC over a real server, with Triton's sync client (and the raw stub for typed contents)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

# Imported here: numpy imports its testing module on first use, which must not be on the loop.
from numpy.testing import assert_array_equal

import mds

pytest.importorskip("grpc")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")

import grpc  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

if TYPE_CHECKING:
    from tests.grpc.conftest import Served

InferInput = tritonclient_grpc.InferInput
InferRequestedOutput = tritonclient_grpc.InferRequestedOutput


def given(name: str, array: np.ndarray, datatype: str) -> Any:
    found = InferInput(name, list(array.shape), datatype)
    found.set_data_from_numpy(array)
    return found


def features(*shape: int) -> Any:
    return given("x", np.arange(np.prod(shape), dtype=np.float32).reshape(shape), "FP32")


def fails_with(code: str, call: Callable[[], Any]) -> str:
    """``call()``'s error message, checking its status is ``code``."""
    with pytest.raises(InferenceServerException) as info:
        call()
    assert info.value.status() == f"StatusCode.{code}", info.value.message()
    message: str = info.value.message()
    return message


# -- health and metadata --------------------------------------------------------


def test_liveness_readiness_and_server_metadata(client: Any) -> None:
    assert client.is_server_live()
    assert not client.is_server_ready()  # the broken model keeps the server unready
    assert client.is_model_ready("scale") and client.is_model_ready("scale", "1")
    assert not client.is_model_ready("broken")
    metadata = client.get_server_metadata(as_json=True)
    assert metadata == {
        "name": "mds",
        "version": mds.__version__,
        "extensions": [
            "classification",
            "model_configuration",
            "parameters",
            "schedule_policy",
            "statistics",
        ],
    }


def test_model_metadata_and_config(client: Any) -> None:
    metadata = client.get_model_metadata("scale", as_json=True)
    assert metadata == {
        "name": "scale",
        "versions": ["1"],
        "platform": "python",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": ["4"]}],  # int64 in proto JSON
        "outputs": [{"name": "y", "datatype": "FP32", "shape": ["4"]}],
    }
    config = client.get_model_config("scale", as_json=True)["config"]
    assert config["name"] == "scale" and config["backend"] == "mds"
    assert config["max_batch_size"] == 8
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": ["4"]}]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == "2000"
    assert config["instance_group"] == [{"name": "scale_0", "kind": "KIND_CPU", "count": 1}]
    assert config["version_policy"] == {"latest": {"num_versions": 1}}  # the default policy


def test_statistics_count_what_was_served(client: Any, served: Served) -> None:
    for _ in range(3):
        client.infer("counted", [features(4)])
    client.infer("counted", [features(5, 4)])  # five rows: five requests
    (stats,) = client.get_inference_statistics("counted", as_json=True)["model_stats"]
    own = served.runtime.model("counted").statistics()
    assert own.batched_items == 8 and own.completed == 8
    assert int(stats["inference_count"]) == own.batched_items
    assert int(stats["execution_count"]) == own.batches
    assert int(stats["inference_stats"]["success"]["count"]) == own.completed
    sizes = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats["batch_stats"]}
    assert sizes == own.batch_sizes
    everything = client.get_inference_statistics(as_json=True)["model_stats"]
    assert {s["name"] for s in everything} == set(served.runtime.models)


# -- inference ----------------------------------------------------------------------


def test_one_row_and_a_batch_of_rows(client: Any) -> None:
    one = client.infer("scale", [features(4)], request_id="first")
    assert_array_equal(one.as_numpy("y"), np.arange(4, dtype=np.float32))
    response = one.get_response()
    assert (response.model_name, response.model_version, response.id) == ("scale", "1", "first")
    rows = client.infer("scale", [features(3, 4)], model_version="1")
    assert_array_equal(rows.as_numpy("y"), np.arange(12, dtype=np.float32).reshape(3, 4))


def test_bytes_in_and_out(client: Any) -> None:
    text = np.array([[b"ab", b"cd"], [b"", "é".encode()]], dtype=object)
    result = client.infer("upper", [given("text", text, "BYTES")])
    back = result.as_numpy("text")
    assert back.shape == (2, 2)
    assert back.tolist() == [[b"AB", b"CD"], [b"", "é".encode()]]
    assert result.get_output("text").datatype == "BYTES"


def test_request_parameters_reach_the_handler_and_mds_keeps_its_own(client: Any) -> None:
    parameters = {"flag": True, "count": 3, "ratio": 0.5, "tag": "blue"}
    result = client.infer(
        "parameters",
        [given("any", np.zeros(1, np.float32), "FP32")],
        request_id="r-1",
        parameters=parameters,
        priority=1,
        timeout=30_000_000,
    )
    seen = json.loads(result.as_numpy("seen")[0])
    assert seen == {"id": "r-1", "parameters": parameters}  # not priority, not timeout


def test_the_scale_parameter_changes_the_answer(client: Any) -> None:
    result = client.infer("scale", [features(2, 4)], parameters={"scale": 2})
    assert_array_equal(result.as_numpy("y"), 2 * np.arange(8, dtype=np.float32).reshape(2, 4))


def test_priority_beyond_the_models_levels_is_refused(client: Any) -> None:
    client.infer("scale", [features(4)], priority=1)  # the highest, and only, level
    message = fails_with(
        "INVALID_ARGUMENT", lambda: client.infer("scale", [features(4)], priority=5)
    )
    assert "priority" in message


def test_classification_gives_the_top_classes_with_their_labels(client: Any) -> None:
    asked = [InferRequestedOutput("y", class_count=2)]
    one = client.infer("scale", [features(4)], outputs=asked)
    assert one.as_numpy("y").tolist() == [b"3.000000:3:d", b"2.000000:2:c"]
    rows = client.infer("scale", [features(2, 4)], outputs=asked)
    assert rows.as_numpy("y").tolist() == [
        [b"3.000000:3:d", b"2.000000:2:c"],
        [b"7.000000:3:d", b"6.000000:2:c"],
    ]


# -- typed contents, through the raw stub ------------------------------------------


@pytest.fixture
def stub(served: Served) -> Any:
    with grpc.insecure_channel(served.url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def typed(name: str, datatype: str, shape: list[int], field: str, values: list[Any]) -> Any:
    tensor = service_pb2.ModelInferRequest.InferInputTensor(
        name=name, datatype=datatype, shape=shape
    )
    getattr(tensor.contents, field).extend(values)
    return tensor


TYPED = [
    ("BOOL", "bool_contents", [True, False, True, True], np.bool_),
    ("INT8", "int_contents", [-128, 0, 5, 127], np.int8),
    ("INT16", "int_contents", [-32768, 0, 5, 32767], np.int16),
    ("INT32", "int_contents", [-(2**31), 0, 5, 2**31 - 1], np.int32),
    ("INT64", "int64_contents", [-(2**63), 0, 5, 2**63 - 1], np.int64),
    ("UINT8", "uint_contents", [0, 1, 200, 255], np.uint8),
    ("UINT16", "uint_contents", [0, 1, 200, 65535], np.uint16),
    ("UINT32", "uint_contents", [0, 1, 200, 2**32 - 1], np.uint32),
    ("UINT64", "uint64_contents", [0, 1, 200, 2**64 - 1], np.uint64),
    ("FP32", "fp32_contents", [0.5, -1.25, 3.0, 2.0**100], np.float32),
    ("FP64", "fp64_contents", [0.1, -1e300, 3.0, 2.5], np.float64),
    ("BYTES", "bytes_contents", [b"a", b"", b"\xff\x00", "é".encode()], np.object_),
]


@pytest.mark.parametrize(("datatype", "field", "values", "dtype"), TYPED, ids=[t[0] for t in TYPED])
def test_typed_contents_of_every_datatype(
    stub: Any, datatype: str, field: str, values: list[Any], dtype: Any
) -> None:
    request = service_pb2.ModelInferRequest(
        model_name="echo", inputs=[typed("t", datatype, [2, 2], field, values)]
    )
    response = stub.ModelInfer(request)
    (output,) = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("t", datatype, [2, 2])
    back = tritonclient_grpc.InferResult(response).as_numpy("t")
    assert back.dtype == np.dtype(dtype)
    assert back.ravel().tolist() == list(values)


def test_typed_contents_serve_a_model_with_a_signature(stub: Any) -> None:
    request = service_pb2.ModelInferRequest(
        model_name="scale", inputs=[typed("x", "FP32", [2, 4], "fp32_contents", list(range(8)))]
    )
    back = tritonclient_grpc.InferResult(stub.ModelInfer(request)).as_numpy("y")
    assert_array_equal(back, np.arange(8, dtype=np.float32).reshape(2, 4))


def invalid(stub: Any, inputs: list[Any], raw: list[bytes] | None = None) -> str:
    request = service_pb2.ModelInferRequest(
        model_name="echo", inputs=inputs, raw_input_contents=raw or []
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    details: str = info.value.details()
    return details


def test_bad_typed_contents_are_refused_naming_the_input(stub: Any) -> None:
    assert "input 'a': shape [2, 2] needs 4 values; contents.fp32_contents has 3" in invalid(
        stub, [typed("a", "FP32", [2, 2], "fp32_contents", [1, 2, 3])]
    )
    assert (
        "input 'a': datatype FP32 travels in contents.fp32_contents, not contents.int_contents"
        in (invalid(stub, [typed("a", "FP32", [1], "int_contents", [1])]))
    )
    assert "input 'a': FP16 has no typed contents" in invalid(
        stub, [typed("a", "FP16", [1], "fp32_contents", [1.0])]
    )
    assert "input 'a': 300 in contents.int_contents is out of INT8's range (-128 to 127)" in (
        invalid(stub, [typed("a", "INT8", [1], "int_contents", [300])])
    )
    assert "input 'a': has no data: send contents.int64_contents or raw_input_contents" in (
        invalid(stub, [typed("a", "INT64", [2], "int64_contents", [])])
    )
    assert "input 'a': unknown datatype 'FP128'" in invalid(
        stub, [typed("a", "FP128", [1], "fp64_contents", [1.0])]
    )
    assert "input 'a': shape [-1] has a negative dimension" in invalid(
        stub, [typed("a", "FP32", [-1], "fp32_contents", [])]
    )
    assert "input 'a' is given twice" in invalid(
        stub, [typed("a", "FP32", [1], "fp32_contents", [1.0])] * 2
    )


def test_bad_raw_contents_are_refused_naming_the_input(stub: Any) -> None:
    plain = service_pb2.ModelInferRequest.InferInputTensor
    four = np.zeros(1, np.float32).tobytes()
    assert "raw_input_contents holds 1 tensors for 2 inputs" in invalid(
        stub, [plain(name="a", datatype="FP32", shape=[1])] * 2, [four]
    )
    assert "input 'a': shape [2] of FP32 needs 8 bytes; raw_input_contents[0] has 4" in invalid(
        stub, [plain(name="a", datatype="FP32", shape=[2])], [four]
    )
    assert "input 'a': has contents.fp32_contents and raw_input_contents too" in invalid(
        stub, [typed("a", "FP32", [1], "fp32_contents", [1.0])], [four]
    )
    assert "input 'a': shape [2] needs 2 elements; the binary data holds 1" in invalid(
        stub, [plain(name="a", datatype="BYTES", shape=[2])], [b"\x01\x00\x00\x00x"]
    )


def test_a_parameter_without_a_value_is_refused(stub: Any) -> None:
    request = service_pb2.ModelInferRequest(
        model_name="echo", inputs=[typed("a", "FP32", [1], "fp32_contents", [1.0])]
    )
    request.parameters["empty"].SetInParent()
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameters['empty'] has no value" in info.value.details()


# -- errors and their statuses ----------------------------------------------------------


def test_each_error_gets_its_status_and_mds_message(client: Any, served: Served) -> None:
    message = fails_with("NOT_FOUND", lambda: client.infer("nope", [features(4)]))
    assert message.startswith("no model named 'nope'; this runtime serves: ")
    message = fails_with("NOT_FOUND", lambda: client.infer("scale", [features(4)], "7"))
    assert message.startswith("model 'scale': no version '7'")
    assert "model 'scale'" in fails_with("NOT_FOUND", lambda: client.is_model_ready("scale", "7"))
    fails_with("NOT_FOUND", lambda: client.get_model_metadata("nope"))
    fails_with("NOT_FOUND", lambda: client.get_model_config("nope"))
    fails_with("NOT_FOUND", lambda: client.get_inference_statistics("nope"))
    message = fails_with("INVALID_ARGUMENT", lambda: client.infer("scale", [features(5)]))
    assert message.startswith("model 'scale' (version 1): ")
    message = fails_with("UNAVAILABLE", lambda: client.infer("broken", [features(4)]))
    assert "model 'broken'" in message and "no weights at /models/broken" in message
    message = fails_with("INTERNAL", lambda: client.infer("fails", [features(4)]))
    assert "model 'fails' (version 1)" in message and "the weights are gone" in message
    message = fails_with("INVALID_ARGUMENT", lambda: client.infer("words", [features(4)]))
    assert "it streams its responses: call ModelStreamInfer" in message


def test_an_error_message_is_bounded(client: Any) -> None:
    message = fails_with("NOT_FOUND", lambda: client.infer("n" * 10_000, [features(4)]))
    # The name is quoted by its start; what the runtime serves is still said.
    assert len(message) < 1000 and "this runtime serves: 'broken'" in message


def test_a_bug_is_a_bare_internal_error_and_a_logged_traceback(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="mds.grpc"):
        message = fails_with("INTERNAL", lambda: client.infer("weird", [features(4)]))
    assert message == "internal server error"
    (record,) = [r for r in caplog.records if r.name == "mds.grpc"]
    assert record.exc_info is not None and "secret internals" in str(record.exc_info[1])


def test_a_full_queue_is_resource_exhausted(client: Any, served: Served, eventually: Any) -> None:
    answers: list[Any] = []
    with served.holding():
        served.fill(
            lambda: client.async_infer(
                "held", [features(4)], lambda result, error: answers.append(error)
            )
        )
        message = fails_with("RESOURCE_EXHAUSTED", lambda: client.infer("held", [features(4)]))
        assert message.startswith("model 'held' (version 1): the queue is full")
    eventually(lambda: len(answers) == 3, "answered")
    assert answers == [None, None, None]


def test_deadlines_from_the_parameter_and_from_the_call(
    client: Any, served: Served, eventually: Any
) -> None:
    with served.holding() as held:
        before = held.statistics().deadline_misses
        # The timeout parameter is in microseconds, as Triton's.
        message = fails_with(
            "DEADLINE_EXCEEDED", lambda: client.infer("held", [features(4)], timeout=1000)
        )
        assert message.startswith("model 'held' (version 1): ")
        eventually(lambda: held.statistics().deadline_misses == before + 1, "counted")
        fails_with(
            "DEADLINE_EXCEEDED", lambda: client.infer("held", [features(4)], client_timeout=0.05)
        )


def test_a_client_that_cancels_cancels_its_request_in_the_batcher(
    client: Any, served: Served, eventually: Any
) -> None:
    before = served.held.statistics()
    answers: list[Any] = []
    with served.holding() as held:
        queued = served.fill(
            lambda: client.async_infer(
                "held", [features(4)], lambda result, error: answers.append(error)
            )
        )
        queued.cancel()
        eventually(lambda: held.statistics().cancelled == before.cancelled + 1, "cancelled")
        assert held.statistics().queued == 0
    eventually(lambda: len(answers) == 3, "answered")
    assert answers.count(None) == 2  # the cancelled one's callback says it was cancelled
    after = held.statistics()
    assert after.completed == before.completed + 2  # never the cancelled one
    assert after.batched_items == before.batched_items + 2


def test_rpcs_mds_does_not_serve_say_so(client: Any) -> None:
    message = fails_with("UNIMPLEMENTED", client.get_system_shared_memory_status)
    assert message.startswith("SystemSharedMemoryStatus: mds does not serve shared memory")
    fails_with("UNIMPLEMENTED", client.get_cuda_shared_memory_status)
    message = fails_with("UNIMPLEMENTED", client.get_trace_settings)
    assert "OpenTelemetry" in message
    fails_with("UNIMPLEMENTED", client.get_log_settings)
    message = fails_with("UNIMPLEMENTED", client.get_model_repository_index)
    assert "this server serves no model repository" in message


def test_tritonclients_http_and_grpc_live_in_one_process() -> None:
    code = (
        "import tritonclient.http, tritonclient.http.aio\n"
        "import tritonclient.grpc, tritonclient.grpc.aio\n"
        "import mds.grpc\n"
        "from mds._grpc import service\n"
        "print(service.service_pb2.ModelInferRequest.DESCRIPTOR.full_name)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "inference.ModelInferRequest"


def test_a_message_that_does_not_parse_is_invalid_argument(served: Served) -> None:
    with grpc.insecure_channel(served.url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as failed:
            infer(b"\x0a\x02\xc3\x28", timeout=10)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a ModelInferRequest" in failed.value.details()


def test_large_typed_contents_are_decoded(served: Served) -> None:
    values = np.arange(400_000, dtype=np.float32)  # 1.6 MB: decoded off the loop
    request = service_pb2.ModelInferRequest(model_name="echo")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[len(values)])
    tensor.contents.fp32_contents.extend(values.tolist())
    with grpc.insecure_channel(served.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        reply = stub.ModelInfer(request, timeout=30)
    back = np.frombuffer(reply.raw_output_contents[0], dtype="<f4")
    assert_array_equal(back, values)
