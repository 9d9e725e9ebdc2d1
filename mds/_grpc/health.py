"""gRPC's standard health service (``grpc.health.v1.Health``), from the runtime's readiness.

What Kubernetes' ``grpc`` probes, ``grpc_health_probe`` and load balancers
call. The service ``""`` (the server) and ``inference.GRPCInferenceService``
are serving when every model is ready, as ``ServerReady`` says; a model's or
pipeline's own name asks for that one alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .._errors import ModelNotFound, quote
from .._runtime import Runtime

__all__ = ["Health", "add"]

#: The names that ask for the whole server.
SERVER = ("", "inference.GRPCInferenceService")
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """``Check`` and ``Watch`` for a runtime.

    Args:
        runtime: whose readiness is reported.
        interval: how often ``Watch`` looks again, in seconds.
    """

    def __init__(self, runtime: Runtime, interval: float = 1.0) -> None:
        self.runtime = runtime
        self.interval = interval

    async def status(self, service: str) -> Any:
        """SERVING, NOT_SERVING, or SERVICE_UNKNOWN for a name that is no model's."""
        runtime = self.runtime
        if not runtime.running:
            return _NOT_SERVING
        try:
            if service in SERVER:
                ready = (await runtime.health()).ready
            else:
                ready = (await runtime.servable(service).health()).ready
        except ModelNotFound:
            return _UNKNOWN
        except Exception:  # a health check that fails: not serving
            return _NOT_SERVING
        return _SERVING if ready else _NOT_SERVING

    async def Check(self, request: Any, context: Any) -> Any:
        status = await self.status(request.service)
        if status == _UNKNOWN:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no service {quote(request.service)}: ask for '' (the server) or a model's name",
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        # The protocol's streaming form: the status now, then each change.
        last = None
        while True:
            status = await self.status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await anyio.sleep(self.interval)


def add(server: Any, runtime: Runtime) -> None:
    """Add the health service for ``runtime`` to a grpc.aio ``server``."""
    health_pb2_grpc.add_HealthServicer_to_server(Health(runtime), server)
