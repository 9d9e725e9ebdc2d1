"""Pipelines from YAML documents: the typed document, and the imports it names."""

# No `from __future__ import annotations`: msgspec reads these annotations.

import importlib
import inspect
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import msgspec.yaml

from .._config import ModelConfig
from .._errors import ConfigError
from .._handler import ModelHandler
from .graph import Pipeline
from .nodes import FOLLOWING, FanOutNode, FunctionNode, ModelNode, Node, RouterNode

__all__ = ["find_handler", "from_document", "load_file", "resolve_handler", "resolve_object"]


class _Spec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ModelLoadMeta(_Spec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    handler_module: str
    config: ModelConfig | None = None
    version: str = "1"


class RouterSpec(_Spec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    by: str
    routes: dict[str, str]
    default: str | None = None


class FanOutSpec(_Spec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    nodes: list[str]
    join: str | None = None


class NodeSpec(_Spec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    model_load_meta: ModelLoadMeta | None = None
    model: str | None = None
    function: str | None = None
    router: RouterSpec | None = None
    fan_out: FanOutSpec | None = None
    next: str | msgspec.UnsetType | None = msgspec.UNSET


class PipelineSpec(_Spec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    nodes: list[NodeSpec]
    start_node_name: str | None = None
    timeout: float | None = None
    version: str = "1"


class Document(_Spec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pipeline: PipelineSpec


_KINDS = ("model_load_meta", "model", "function", "router", "fan_out")


def load_file(path: Any) -> Pipeline:
    """Read, check and build the pipeline in the YAML file at ``path``."""
    file = Path(os.fspath(path))
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the pipeline file: {exc}") from exc
    try:
        document = msgspec.yaml.decode(data)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    return from_document(document, str(file), file.resolve().parent)


def from_document(document: Any, source: str, folder: Path | None) -> Pipeline:
    """Check ``document`` against the format and build its pipeline.

    The graph is checked first, with nothing imported; then the nodes a call
    can reach import their handlers and functions. A node that cannot be
    reached is never imported (its drawing says it is not loaded).
    """
    if not isinstance(document, Mapping):
        raise ConfigError(
            f"{source}: a pipeline document is a mapping with a 'pipeline' key, "
            f"not {type(document).__name__}"
        )
    try:
        spec = msgspec.convert(document, Document)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_explain(str(exc), document)}") from None
    where = f"{source}: pipeline {spec.pipeline.name!r}"
    problems: list[str] = []
    nodes: list[Node] = []
    specs: dict[str, tuple[NodeSpec, str]] = {}
    for index, node_spec in enumerate(spec.pipeline.nodes):
        at = f"node {node_spec.name!r} (pipeline.nodes[{index}])"
        try:
            node = _skeleton(node_spec, at)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        node.origin = f"pipeline.nodes[{index}]"
        nodes.append(node)
        specs.setdefault(node_spec.name, (node_spec, at))
    if problems:
        raise ConfigError(where + ":\n" + "\n".join(f"  - {p}" for p in problems))
    pipeline = Pipeline(
        spec.pipeline.name,
        nodes,
        start=spec.pipeline.start_node_name,
        timeout=spec.pipeline.timeout,
        version=spec.pipeline.version,
        source=source,
    )
    if folder is not None and str(folder) not in sys.path:
        # Handler modules sit next to the file (the seed's m1/, m2/, ...).
        sys.path.insert(0, str(folder))
    reachable = pipeline.reachable()
    for node in pipeline.nodes.values():
        if node.name not in reachable or node.unloaded is None:
            continue
        node_spec, at = specs[node.name]
        try:
            _load(node, node_spec, at)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(where + ":\n" + "\n".join(f"  - {p}" for p in problems))
    return pipeline


def _explain(message: str, document: Any) -> str:
    """The decoder's message, with the node's name beside its ``$.pipeline.nodes[i]`` path."""
    match = re.search(r"\$\.pipeline\.nodes\[(\d+)\]", message)
    if match:
        try:
            name = document["pipeline"]["nodes"][int(match.group(1))]["name"]
        except (KeyError, IndexError, TypeError):
            name = None
        if isinstance(name, str):
            return f"node {name!r}: {message}"
    return message


def _skeleton(spec: NodeSpec, at: str) -> Node:
    """The node, with what it would import named but not imported yet."""
    kinds = [kind for kind in _KINDS if getattr(spec, kind) is not None]
    if len(kinds) != 1:
        given = ", ".join(kinds) if kinds else "none"
        raise ConfigError(f"{at}: a node needs exactly one of {', '.join(_KINDS)} (it has {given})")
    nxt = FOLLOWING if spec.next is msgspec.UNSET else spec.next
    kind = kinds[0]
    node: Node
    unloaded: str | None = None
    if kind == "model_load_meta":
        meta = spec.model_load_meta
        assert meta is not None
        node = ModelNode(spec.name, config=meta.config, version=meta.version, next=nxt)
        unloaded = meta.handler_module
    elif kind == "model":
        assert spec.model is not None
        node = ModelNode(spec.name, model=spec.model, next=nxt)
    elif kind == "function":
        assert spec.function is not None
        node = FunctionNode(spec.name, None, next=nxt)
        unloaded = spec.function
    elif kind == "router":
        router = spec.router
        assert router is not None
        if spec.next is not msgspec.UNSET:
            raise ConfigError(f"{at}: a router has no next; its routes and default lead on")
        node = RouterNode(spec.name, router.by, router.routes, default=router.default)
        if not re.match(r"^(request|input)(\.|$)", router.by):
            unloaded = router.by
    else:
        fan_out = spec.fan_out
        assert fan_out is not None
        node = FanOutNode(spec.name, fan_out.nodes, next=nxt)
        unloaded = fan_out.join
    node.unloaded = unloaded
    return node


def _load(node: Node, spec: NodeSpec, at: str) -> None:
    """Import what ``node`` runs (its handler, function, router function or join)."""
    path = node.unloaded
    assert path is not None
    if isinstance(node, ModelNode):
        node.handler = resolve_handler(path, at)
    elif isinstance(node, FunctionNode):
        node.fn = resolve_object(path, at, "function")
    elif isinstance(node, RouterNode):
        node.on = resolve_object(path, at, "router function")
    elif isinstance(node, FanOutNode):
        node.join = resolve_object(path, at, "join function")
    node.unloaded = None


def _import(module_name: str, at: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            f"{at}: importing module {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc


def resolve_object(path: str, at: str, what: str) -> Any:
    """The object ``module:attr`` (or ``module.attr``) names; it must be callable."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    elif "." in path:
        module_name, _, attr = path.rpartition(".")
    else:
        raise ConfigError(f"{at}: {what} {path!r} must be written module:name")
    module = _import(module_name, at)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(
                f"{at}: module {module_name!r} has no {attr!r} (the {what} {path!r})"
            ) from None
    if not callable(obj):
        raise ConfigError(f"{at}: {path!r} is a {type(obj).__name__}, not a callable {what}")
    return obj


def find_handler(module: Any, label: str, at: str) -> Any:
    """``module``'s ``handler`` attribute, else the one :class:`ModelHandler` subclass in it."""
    obj = getattr(module, "handler", None)
    if obj is not None:
        return obj
    found = [
        value
        for value in vars(module).values()
        if inspect.isclass(value)
        and issubclass(value, ModelHandler)
        and value.__module__ == module.__name__
        and not inspect.isabstract(value)
    ]
    if not found:
        raise ConfigError(
            f"{at}: module {label!r} has no handler: define a ModelHandler subclass "
            "in it, or a 'handler' attribute, or write module:name"
        )
    if len(found) > 1:
        names = ", ".join(f"{label}:{cls.__name__}" for cls in found)
        raise ConfigError(
            f"{at}: module {label!r} defines {len(found)} handlers; name one: {names}"
        )
    return found[0]


def resolve_handler(path: str, at: str) -> Any:
    """The handler that ``handler_module`` names.

    ``module:attr`` names it outright. A bare module gives its ``handler``
    attribute if it has one, else the one :class:`ModelHandler` subclass
    defined in it.
    """
    if ":" in path:
        obj = resolve_object(path, at, "handler")
    else:
        obj = find_handler(_import(path, at), path, at)
    if not (isinstance(obj, ModelHandler) or callable(obj)):
        raise ConfigError(
            f"{at}: {path!r} is a {type(obj).__name__}, not a ModelHandler or a factory of one"
        )
    return obj
