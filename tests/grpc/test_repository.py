"""The model repository RPCs (index, load, unload) with Triton's sync client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mds
import mds.grpc
from tests.versions.test_http import TENSORS
from tests.versions.test_repository import SPEC, deploy, write_version

pytest.importorskip("grpc")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")

import grpc  # noqa: E402
from tritonclient.grpc import service_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture
def repository(tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    """A server of a repository: 'scale' (every version kept) and 'other'; a client; the root."""
    root = tmp_path / "models"
    write_version(root / "scale" / "1", 1.0, handler=TENSORS)
    (root / "scale" / "mds.yaml").write_text(SPEC + "version_policy: {all: true}\n")
    write_version(root / "other" / "1", 5.0, handler=TENSORS)
    (root / "other" / "mds.yaml").write_text(SPEC)
    runtime = mds.Runtime()
    models = mds.ModelRepository(root)
    models.add_to(runtime)
    with mds.grpc.Server(runtime, "127.0.0.1:0", repository=models, load="wait") as server:
        client = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            yield client, root
        finally:
            client.close()


def infer(client: Any, name: str, version: str = "") -> tuple[float, int, str]:
    x = tritonclient_grpc.InferInput("x", [3], "FP32")
    x.set_data_from_numpy(np.array([1, 2, 3], np.float32))
    result = client.infer(name, [x], model_version=version)
    version_served = result.get_response().model_version
    return float(result.as_numpy("y")[0]), int(result.as_numpy("v")[0]), version_served


def index(client: Any) -> list[dict[str, str]]:
    models: list[dict[str, str]] = client.get_model_repository_index(as_json=True)["models"]
    return models


def stub_of(client: Any) -> Any:
    """The raw stub behind tritonclient's client, for what the client does not send."""
    from tritonclient.grpc import service_pb2_grpc

    return service_pb2_grpc.GRPCInferenceServiceStub(client._channel)


def status_of(call: Any) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status(), info.value.message()


def test_index_load_and_unload(repository: tuple[Any, Path]) -> None:
    client, root = repository
    assert "model_repository" in client.get_server_metadata(as_json=True)["extensions"]
    assert index(client) == [
        {"name": "other", "version": "1", "state": "READY"},
        {"name": "scale", "version": "1", "state": "READY"},
    ]
    assert infer(client, "scale") == (1.0, 1, "1")
    deploy(root / "scale", 2, 2.0, handler=TENSORS)
    client.load_model("scale")
    assert infer(client, "scale") == (2.0, 2, "2")  # the new version takes the traffic
    assert infer(client, "scale", "1") == (1.0, 1, "1")  # the old one, by version
    client.unload_model("other", unload_dependents=True)
    assert {"name": "other", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"} in (
        index(client)
    )
    ready = stub_of(client).RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True))
    assert [(m.name, m.version) for m in ready.models] == [("scale", "1"), ("scale", "2")]
    status, message = status_of(lambda: infer(client, "other"))
    assert status == "StatusCode.NOT_FOUND" and "no model named 'other'" in message
    # A config given with the load replaces mds.yaml: only version 1 now.
    config = json.dumps({"handler": "handler.py", "version_policy": {"specific": [1]}})
    client.load_model("scale", config=config)
    assert infer(client, "scale") == (1.0, 1, "1")
    client.load_model("other")
    assert infer(client, "other") == (5.0, 1, "1")


def test_what_the_repository_rpcs_refuse(repository: tuple[Any, Path]) -> None:
    client, root = repository
    status, message = status_of(lambda: client.load_model("nothing"))
    assert status == "StatusCode.NOT_FOUND" and "no model 'nothing' in the repository" in message
    status, message = status_of(
        lambda: client.load_model("scale", files={"file:1/model.onnx": b"AAAA"})
    )
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert "mds does not take model files over gRPC; deploy them into the repository" in message
    status, message = status_of(lambda: client.load_model("scale", config='{"instances": 2}'))
    assert status == "StatusCode.INVALID_ARGUMENT" and "the config given to load" in message
    # A version that fails to load: INTERNAL, saying why; the old version serves on.
    deploy(root / "scale", 2, -1.0, handler=TENSORS.replace("self.scale = json", "1/0; json"))
    status, message = status_of(lambda: client.load_model("scale"))
    assert status == "StatusCode.INTERNAL"
    assert "version '2' failed to load" in message and "ZeroDivisionError" in message
    assert infer(client, "scale") == (1.0, 1, "1")
    stub = stub_of(client)
    flag = service_pb2.ModelRepositoryParameter(bool_param=True)
    for call, request, expected in [
        (
            stub.RepositoryIndex,
            service_pb2.RepositoryIndexRequest(repository_name="elsewhere"),
            "repository_name 'elsewhere': mds serves one repository; leave it empty",
        ),
        (
            stub.RepositoryModelUnload,
            service_pb2.RepositoryModelUnloadRequest(model_name="scale", parameters={"all": flag}),
            "unrecognized unload parameter 'all'",
        ),
        (
            stub.RepositoryModelLoad,
            service_pb2.RepositoryModelLoadRequest(model_name="scale", parameters={"x": flag}),
            "unrecognized load parameter 'x'; mds takes 'config'",
        ),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            call(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert expected in info.value.details()
