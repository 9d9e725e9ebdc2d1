"""gRPC's standard health service, as Kubernetes' gRPC probes call it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import mds
import mds.grpc

from .conftest import Served

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def health(served: Served) -> Iterator[Any]:
    with grpc.insecure_channel(served.url) as channel:
        yield health_pb2_grpc.HealthStub(channel)


def check(health: Any, service: str) -> Any:
    return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_the_server_and_each_model_answer(health: Any) -> None:
    # A model failed to load: the server is not serving (as ServerReady says),
    # while each ready model is.
    assert check(health, "") == NOT_SERVING
    assert check(health, "inference.GRPCInferenceService") == NOT_SERVING
    assert check(health, "echo") == SERVING
    assert check(health, "broken") == NOT_SERVING


def test_an_unknown_service_is_not_found(health: Any) -> None:
    with pytest.raises(grpc.RpcError) as failed:
        check(health, "nothing")
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no service 'nothing'" in failed.value.details()


def test_watch_sends_the_status_now(health: Any) -> None:
    stream = health.Watch(health_pb2.HealthCheckRequest(service="echo"), timeout=10)
    assert next(stream).status == SERVING
    stream.cancel()


class Ready(mds.ModelHandler[Any, Any]):
    def infer(self, batch: Any) -> list[Any]:
        return list(batch)


def test_a_stopped_runtime_is_not_serving_and_health_can_be_left_out() -> None:
    runtime = mds.Runtime()
    runtime.add_model("ready", Ready)
    with mds.grpc.Server(runtime, "127.0.0.1:0", load="wait") as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert check(stub, "") == SERVING
    runtime = mds.Runtime()
    runtime.add_model("ready", Ready)
    with mds.grpc.Server(runtime, "127.0.0.1:0", health=False) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.RpcError) as failed:
                check(health_pb2_grpc.HealthStub(channel), "")
            assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_not_serving_once_the_runtime_stops() -> None:
    from mds._grpc.health import Health

    runtime = mds.Runtime()
    runtime.add_model("ready", Ready)
    service = Health(runtime)
    async with runtime:
        assert await service.status("") == SERVING
    assert await service.status("") == NOT_SERVING
