"""``inference.GRPCInferenceService`` for one runtime: each RPC, and mds's errors as statuses.

Handlers run in the grpc.aio server's (asyncio) loop; the runtime may live
in another loop, and every call into it is forwarded there
(:meth:`mds.Servable.serve` works from any loop). A client that cancels, or
whose deadline passes, has its handler task cancelled, and the
cancellation reaches the runtime: the batcher drops the request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf import json_format
from tritonclient.grpc import (
    model_config_pb2,
    service_pb2,
    service_pb2_grpc,
)

from .._errors import DecodeError, InvalidInput, MdsError, quote
from .._oip import call as v2_call
from .._oip import reports
from .._repository.repository import ModelRepository
from .._request import use_request_context
from .._runtime import Runtime
from .._servable import Servable
from .._version import __version__
from . import codec
from .calls import abort, deadline, metadata, prepared, served
from .stream import Stream

__all__ = ["Servicer", "add"]


def _unserved(method: str, what: str, instead: str) -> Callable[..., Awaitable[None]]:
    """An RPC mds does not serve: UNIMPLEMENTED, saying what to do instead."""

    async def unserved(self: Servicer, request: Any, context: Any) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, f"{method}: mds does not serve {what}; {instead}"
        )

    unserved.__name__ = method
    return unserved


_SHARED = "send tensors in the request (raw_input_contents)"


class Servicer:
    """The service's RPCs for one runtime (and its repository, if given).

    ``service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server`` looks
    each RPC up by name. An RPC's errors end it with their status
    (:data:`~.calls.ERROR_STATUS`).
    """

    def __init__(self, runtime: Runtime, repository: ModelRepository | None = None) -> None:
        self.runtime = runtime
        self.repository = repository
        self.extensions = sorted(reports.extensions(repository is not None))

    def target(self, name: str, version: str) -> Servable:
        """The model or pipeline ``name``; at ``version``, unless empty (the protocol's "any")."""
        return self.runtime.servable(name, version or None)

    # -- health and metadata ------------------------------------------------

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=self.runtime.running)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        try:
            health = await self.runtime.health()
            return service_pb2.ServerReadyResponse(ready=health.ready)
        except Exception as exc:
            await abort(context, exc)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        try:
            health = await self.target(request.name, request.version).health()
            return service_pb2.ModelReadyResponse(ready=health.ready)
        except Exception as exc:
            await abort(context, exc)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerMetadataResponse(
            name="mds", version=__version__, extensions=self.extensions
        )

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        try:
            found = reports.metadata(self.target(request.name, request.version))
            tensor = service_pb2.ModelMetadataResponse.TensorMetadata
            return service_pb2.ModelMetadataResponse(
                name=found.name,
                versions=found.versions,
                platform=found.platform,
                inputs=[
                    tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in found.inputs
                ],
                outputs=[
                    tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in found.outputs
                ],
            )
        except Exception as exc:
            await abort(context, exc)

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        try:
            found = reports.model_config(self.runtime, request.name, request.version or None)
            config = json_format.ParseDict(found, model_config_pb2.ModelConfig())
            return service_pb2.ModelConfigResponse(config=config)
        except Exception as exc:
            await abort(context, exc)

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        try:
            found = reports.statistics(self.runtime, request.name or None, request.version or None)
            return json_format.ParseDict(found, service_pb2.ModelStatisticsResponse())
        except Exception as exc:
            await abort(context, exc)

    # -- inference ----------------------------------------------------------

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        headers = metadata(context)
        try:
            with served("ModelInfer", headers, request.id or None):
                target = self.target(request.model_name, request.model_version).choose()
                try:
                    return await self._infer(target, request, headers, context)
                except MdsError as exc:
                    target.add_context(exc)
                    raise
        except Exception as exc:
            await abort(context, exc)

    async def _infer(
        self, target: Servable, request: Any, headers: Mapping[str, str], context: Any
    ) -> Any:
        if target.streams:
            raise InvalidInput(
                "it streams its responses: call ModelStreamInfer (tritonclient: "
                "start_stream and async_stream_infer, or the aio client's stream_infer)"
            )
        call, _ = await prepared(target, request, headers)
        timeout = deadline(call, context)
        with use_request_context(call.context):
            if call.rows is None:
                result = await target.serve(call.payload, timeout=timeout, priority=call.priority)
            else:
                result = await target.serve_many(call.rows, timeout=timeout, priority=call.priority)
        return codec.response(call, v2_call.outputs(call, result))

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> None:
        await Stream(self.target, request_iterator, context).run()

    async def model_infer_bytes(self, raw: bytes, context: Any) -> Any:
        """``ModelInfer`` from the message's bytes (one that does not parse: the client's error)."""
        try:
            request = codec.parse(raw)
        except DecodeError as exc:
            await abort(context, exc)
        return await self.ModelInfer(request, context)

    # -- the model repository -----------------------------------------------

    def _repository(self, method: str, name: str) -> ModelRepository:
        if self.repository is None:
            raise _Unimplemented(
                f"{method}: this server serves no model repository (give mds.grpc.Server "
                "or mds.grpc.add_to_server a repository= to serve one)"
            )
        if name:
            raise InvalidInput(
                f"repository_name {quote(name)}: mds serves one repository; leave it empty"
            )
        return self.repository

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        try:
            repository = self._repository("RepositoryIndex", request.repository_name)
            entries = repository.index(ready=request.ready)
            model = service_pb2.RepositoryIndexResponse.ModelIndex
            return service_pb2.RepositoryIndexResponse(models=[model(**e) for e in entries])
        except Exception as exc:
            await _abort(context, exc)

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        try:
            repository = self._repository("RepositoryModelLoad", request.repository_name)
            config = _load_config(request.parameters, repository)
            await repository.load(request.model_name, config)
            return service_pb2.RepositoryModelLoadResponse()
        except Exception as exc:
            await _abort(context, exc)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        try:
            repository = self._repository("RepositoryModelUnload", request.repository_name)
            for key, value in request.parameters.items():
                if key != "unload_dependents":
                    raise InvalidInput(
                        f"unrecognized unload parameter {quote(key)}; mds takes 'unload_dependents'"
                    )
                # Accepted as Triton takes it: no pipeline depends on a model being loaded.
                if value.WhichOneof("parameter_choice") != "bool_param":
                    raise InvalidInput("parameter 'unload_dependents' must be a bool_param")
            await repository.unload(request.model_name)
            return service_pb2.RepositoryModelUnloadResponse()
        except Exception as exc:
            await _abort(context, exc)

    # -- what mds does not serve --------------------------------------------

    SystemSharedMemoryStatus = _unserved("SystemSharedMemoryStatus", "shared memory", _SHARED)
    SystemSharedMemoryRegister = _unserved("SystemSharedMemoryRegister", "shared memory", _SHARED)
    SystemSharedMemoryUnregister = _unserved(
        "SystemSharedMemoryUnregister", "shared memory", _SHARED
    )
    CudaSharedMemoryStatus = _unserved("CudaSharedMemoryStatus", "CUDA shared memory", _SHARED)
    CudaSharedMemoryRegister = _unserved("CudaSharedMemoryRegister", "CUDA shared memory", _SHARED)
    CudaSharedMemoryUnregister = _unserved(
        "CudaSharedMemoryUnregister", "CUDA shared memory", _SHARED
    )
    TraceSetting = _unserved(
        "TraceSetting",
        "trace settings",
        "mds traces with OpenTelemetry once the host app configures an SDK",
    )
    LogSettings = _unserved(
        "LogSettings", "log settings", "configure the 'mds' loggers in the host app"
    )


class _Unimplemented(Exception):
    """An RPC this server does not serve as it was set up."""


async def _abort(context: Any, exc: BaseException) -> None:
    if isinstance(exc, _Unimplemented):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, str(exc))
    await abort(context, exc)


def _load_config(given: Mapping[str, Any], repository: ModelRepository) -> str | None:
    """The ``config`` a load request carries, if any; refuses what mds cannot do."""
    config: str | None = None
    for key, value in given.items():
        kind = value.WhichOneof("parameter_choice")
        if key == "config":
            if kind != "string_param":
                raise InvalidInput(
                    "parameter 'config' must be a string_param holding the model's config as "
                    f"JSON, not {kind or 'empty'}"
                )
            config = value.string_param
        elif key.startswith("file:"):
            raise InvalidInput(
                f"parameter {quote(key)}: mds does not take model files over gRPC; deploy them "
                f"into the repository folder ({repository.path})"
            )
        else:
            raise InvalidInput(f"unrecognized load parameter {quote(key)}; mds takes 'config'")
    return config


class _Captured:
    """Stands in for a server to catch the handlers the generated code would register."""

    handlers: dict[str, Any]

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        # grpcio before 1.63's generated code registers this way only.
        self.handlers = dict(getattr(handlers[0], "_method_handlers", {}))

    def add_registered_method_handlers(self, name: str, handlers: dict[str, Any]) -> None:
        self.handlers = dict(handlers)


def add(
    server: Any, runtime: Runtime, repository: ModelRepository | None, health: bool = True
) -> None:
    """Add the service for ``runtime`` to a grpc.aio ``server``, and gRPC's health service.

    The generated handlers, but for inference: those take the message's bytes
    and parse them (:func:`.codec.parse`), so that one that does not parse is an
    ``INVALID_ARGUMENT`` (on a stream: that request's error).
    """
    servicer = Servicer(runtime, repository)
    captured = _Captured()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, captured)
    handlers = captured.handlers
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        servicer.model_infer_bytes,
        response_serializer=service_pb2.ModelInferResponse.SerializeToString,
    )
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer,
        response_serializer=service_pb2.ModelStreamInferResponse.SerializeToString,
    )
    name = "inference.GRPCInferenceService"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    register = getattr(server, "add_registered_method_handlers", None)
    if register is not None:
        register(name, handlers)
    if health:
        from . import health as standard

        standard.add(server, runtime)
