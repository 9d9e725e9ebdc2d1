"""mds's routes as OpenAPI operations, for an app's schema (FastAPI's ``/docs``).

The routes are raw ASGI endpoints, which FastAPI does not describe; this
describes them from the same route tables and the msgspec structs their
bodies are, so the schema cannot drift from what is served.
"""

# No `from __future__ import annotations`: msgspec reads these annotations.

import re
from collections.abc import Iterable
from typing import Any

import msgspec

from .._oip.protocol import InferRequest, InferResponse, ModelMetadata, ServerMetadata
from .._status import ModelHealth, ModelStatistics, RuntimeHealth

__all__ = ["describe", "operations"]

#: Component names are prefixed, so that they cannot collide with the app's own.
PREFIX = "Mds"


class ErrorBody(msgspec.Struct, kw_only=True):
    """An error reply: what was wrong, its class, and where (the fields that apply)."""

    error: str
    type: str
    model: str | None = None
    version: str | None = None
    pipeline: str | None = None
    node: str | None = None


class Live(msgspec.Struct):
    """Whether the runtime runs."""

    live: bool


class Ready(msgspec.Struct):
    """A protocol model-ready reply."""

    name: str
    ready: bool


class RepositoryIndex(msgspec.Struct, kw_only=True):
    """A repository index request: ``ready`` lists only the ready versions."""

    ready: bool = False


class RepositoryEntry(msgspec.Struct, kw_only=True):
    """One version of a repository's model, as the index lists it."""

    name: str
    version: str | None = None
    state: str | None = None
    reason: str | None = None


class RepositoryLoad(msgspec.Struct, kw_only=True):
    """A load request: ``parameters.config``, a model's ``mds.yaml`` fields as a JSON string."""

    parameters: dict[str, Any] = {}


_OIP = "Open Inference Protocol"
_OBJECT: dict[str, Any] = {"type": "object"}
_ANY: dict[str, Any] = {}

# route -> (summary, tag, request body, reply body); bodies are structs or schemas.
_ROUTES: dict[str, tuple[str, str, Any, Any]] = {
    "live": ("Liveness: 200 while the runtime runs", "mds", None, Live),
    "ready": ("Readiness: 200 when every model is ready", "mds", None, RuntimeHealth),
    "models": ("Every model's and pipeline's metadata", "mds", None, list[ModelMetadata]),
    "metadata": ("A model's or pipeline's metadata", "mds", None, ModelMetadata),
    "model_ready": (
        "A model's health (a pipeline's: its PipelineHealth): 200 when ready",
        "mds",
        None,
        ModelHealth,
    ),
    "infer": ("Serve a request: the handler's own JSON in and out", "mds", _ANY, _ANY),
    "statistics": ("Each model's counters", "mds", None, dict[str, ModelStatistics]),
    "server_metadata": ("Server metadata", _OIP, None, ServerMetadata),
    "v2_ready": ("Model readiness", _OIP, None, Ready),
    "v2_infer": (
        "Inference on named tensors",
        _OIP,
        InferRequest,
        InferResponse,
    ),
    "stats": ("Statistics (Triton's shape)", _OIP, None, _OBJECT),
    "config": ("Model configuration (Triton's shape)", _OIP, None, _OBJECT),
    "repository_index": (
        "The model repository's models and versions",
        _OIP,
        RepositoryIndex,
        list[RepositoryEntry],
    ),
    "repository_load": (
        "Load or reload a model from the repository",
        _OIP,
        RepositoryLoad,
        list[RepositoryEntry],
    ),
    "repository_unload": (
        "Unload a model",
        _OIP,
        RepositoryLoad,
        list[RepositoryEntry],
    ),
}
_TEXT = {
    "metrics": ("Prometheus metrics", "text/plain"),
    "status_page": ("The status page", "text/html"),
    "status_data": ("What the status page shows", "application/json"),
}
# Routes whose 503 carries their own report, not an error.
_HEALTH = frozenset({"live", "ready", "model_ready", "v2_ready"})
# The statuses an error may have on each kind of route.
_INFER_ERRORS = ("400", "404", "429", "500", "503", "504")


def operations(
    routes: Iterable[tuple[str, str, str]], prefix: str = ""
) -> tuple[dict[str, Any], dict[str, Any]]:
    """OpenAPI path items for ``(method, path, route)`` triples, and the components they use.

    Returns:
        ``(paths, schemas)``: to merge into the document's ``paths`` and
        ``components.schemas``.
    """
    wanted: list[Any] = []
    found: dict[str, Any] = {}
    for method, path, route in routes:
        operation = _operation(route, prefix + path, wanted)
        params = re.findall(r"\{(\w+)\}", path)
        if params:
            operation["parameters"] = [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                for p in params
            ]
        found.setdefault(prefix + path, {})[method.lower()] = operation
    kinds = list(dict.fromkeys([ErrorBody, *wanted]))
    refs, schemas = msgspec.json.schema_components(
        kinds, ref_template=f"#/components/schemas/{PREFIX}{{name}}"
    )
    by_kind = dict(zip(kinds, refs, strict=True))
    _resolve(found, by_kind)
    return found, {PREFIX + name: schema for name, schema in schemas.items()}


def _operation(route: str, path: str, wanted: list[Any]) -> dict[str, Any]:
    if route in _TEXT:
        summary, media = _TEXT[route]
        return {
            "summary": summary,
            "tags": ["mds"],
            "operationId": _operation_id(route, path),
            "responses": {"200": {"description": "OK", "content": {media: {"schema": {}}}}},
        }
    summary, tag, request, reply = _ROUTES[route]
    operation: dict[str, Any] = {
        "summary": summary,
        "tags": [tag],
        "operationId": _operation_id(route, path),
        "responses": {"200": {"description": "OK", "content": _json(reply, wanted)}},
    }
    if request is not None:
        content = _json(request, wanted)
        if route == "v2_infer":
            # The binary tensor data extension: the JSON, then raw tensors.
            content["application/octet-stream"] = {"schema": {"type": "string"}}
        operation["requestBody"] = {"required": route.endswith("infer"), "content": content}
    errors = _INFER_ERRORS if route.endswith("infer") else ("400", "404", "500", "503")
    for status in errors:
        operation["responses"][status] = {
            "description": "An error: what was wrong and where",
            "content": _json(ErrorBody, wanted),
        }
    if route in _HEALTH:
        # Not ready: the same report, with a 503 (and Retry-After).
        operation["responses"]["503"] = {
            "description": "Not ready (or not running): the same report",
            "content": _json(reply, wanted),
        }
    return operation


def _operation_id(route: str, path: str) -> str:
    """Unique in the app: the route and its whole path (with the prefix)."""
    return "mds_" + re.sub(r"\W+", "_", f"{route}{path}").strip("_")


def _json(kind: Any, wanted: list[Any]) -> dict[str, Any]:
    if isinstance(kind, dict):
        return {"application/json": {"schema": kind}}
    wanted.append(kind)
    return {"application/json": {"schema": {"$mds": kind}}}


def _resolve(tree: Any, refs: dict[Any, Any]) -> None:
    """Replace each ``{"$mds": kind}`` placeholder with the kind's schema (or reference)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if isinstance(value, dict) and "$mds" in value:
                tree[key] = refs[value["$mds"]]
            else:
                _resolve(value, refs)


def describe(app: Any, routes: list[tuple[str, str, str]], prefix: str) -> None:
    """Add ``routes`` to a FastAPI app's OpenAPI schema (its ``/docs``); a Starlette app has none.

    The app's own ``openapi()`` makes its schema once and keeps it; mds's
    operations and components are merged into it then.
    """
    if not callable(getattr(app, "openapi", None)):
        return  # a plain Starlette app has no schema
    made = app.openapi
    merged: list[dict[str, Any]] = []  # the schema merged into, once

    def openapi() -> dict[str, Any]:
        schema: dict[str, Any] = made()  # FastAPI's, made once and kept
        if not merged or merged[0] is not schema:
            paths, components = operations(routes, prefix)
            for path, items in paths.items():
                schema.setdefault("paths", {}).setdefault(path, {}).update(items)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            merged[:] = [schema]
        return schema

    app.openapi = openapi
