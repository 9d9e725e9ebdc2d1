"""A pipeline's nodes: one class per kind, made by the constructors on :class:`Node`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from .._config import ModelConfig
from .._errors import ConfigError
from .._handler import ModelHandler

__all__ = ["FOLLOWING", "FanOutNode", "FunctionNode", "ModelNode", "Node", "RouterNode"]


class _Following:
    """``next`` left out: the next listed node (the end after the last)."""

    def __repr__(self) -> str:
        return "<the next listed node>"


FOLLOWING: Any = _Following()


class Node:
    """One step of a :class:`Pipeline`. Make one with a constructor below.

    - :meth:`model`: a handler with its own batcher, devices and instances;
    - :meth:`function`: a plain or ``async`` function (feature extraction,
      preprocessing, business logic);
    - :meth:`router`: forwards to the next node by a value of the request or
      of the previous output, with a default branch;
    - :meth:`fan_out`: runs several nodes at once on the same input and
      joins their outputs.

    ``next`` names the node that follows. Left out, it is the next node in
    the pipeline's list that is not a fan-out's branch (and the end after
    the last); ``None`` ends the pipeline at this node. Each kind of node is
    a class of its own; ``kind`` names it.

    Added in 0.2.
    """

    __slots__ = ("name", "next", "origin", "unloaded")

    #: ``"model"``, ``"function"``, ``"router"`` or ``"fan_out"``.
    kind: ClassVar[str] = ""

    def __init__(self, name: str, *, next: Any = FOLLOWING) -> None:
        self.name = name
        self.next: str | None = next
        #: Where the node came from, for messages: the document path
        #: (``pipeline.nodes[2]``) or what it runs (``m1.model:Handler``).
        self.origin = ""
        #: What a node of a pipeline file would import, while it is not
        #: loaded (a node that cannot be reached is never imported).
        self.unloaded: str | None = None

    def __repr__(self) -> str:
        return f"<Node {self.name!r} {self.kind}>"

    @classmethod
    def model(
        cls,
        name: str,
        handler: ModelHandler[Any, Any] | Callable[[], ModelHandler[Any, Any]] | None = None,
        config: ModelConfig | None = None,
        *,
        version: str = "1",
        model: str | None = None,
        next: str | None = FOLLOWING,
    ) -> Node:
        """A model node: ``handler`` served as the model ``<pipeline>.<name>``.

        Args:
            name: the node's name.
            handler: a handler object, or a factory (such as its class).
            config: the model's serving policy (batching, devices, instances).
            version: the model's version.
            model: instead of ``handler``, the name of a model the runtime
                already serves (shared with other pipelines and callers).
            next: the node that follows.
        """
        if (handler is None) == (model is None):
            raise ConfigError(f"model node {name!r}: give either a handler or a model name")
        return ModelNode(
            name, handler=handler, config=config, version=version, model=model, next=next
        )

    @classmethod
    def function(cls, name: str, fn: Callable[..., Any], *, next: str | None = FOLLOWING) -> Node:
        """A function node: ``fn(value)`` gives the value for the next node.

        A plain function runs in a worker thread, an ``async def`` on the
        event loop. A function with a second parameter named ``request``
        also gets the pipeline's original request by that name.
        """
        if not callable(fn):
            raise ConfigError(f"function node {name!r}: {fn!r} is not callable")
        return FunctionNode(name, fn, next=next)

    @classmethod
    def router(
        cls,
        name: str,
        by: str | Callable[[Any, Any], Any],
        routes: Mapping[Any, str],
        *,
        default: str | None = None,
    ) -> Node:
        """A router: forwards its input, unchanged, to the node ``routes[value]``.

        In YAML, quote route values such as ``"yes"``, ``"no"``, ``"on"``
        and ``"off"``: unquoted, YAML reads them as true and false.

        Args:
            name: the node's name.
            by: where the value is: ``"request.<path>"`` in the pipeline's
                request, ``"input.<path>"`` in this node's input (the
                previous output); a path is keys, attributes or indices
                joined by dots. Or a function ``(input, request) -> value``.
            routes: the next node for each value (values are compared as
                strings).
            default: the next node for any other value, or a value that
                cannot be read; without one, such a request fails with
                :class:`mds.InvalidInput`.
        """
        return RouterNode(name, by, routes, default=default)

    @classmethod
    def fan_out(
        cls,
        name: str,
        branches: Sequence[str],
        *,
        join: Callable[[dict[str, Any]], Any] | None = None,
        next: str | None = FOLLOWING,
    ) -> Node:
        """A fan-out: runs the ``branches`` nodes at once on its input.

        Each branch is a model or function node that only this fan-out
        reaches. Their outputs are joined by ``join(outputs)``, where
        ``outputs`` maps each branch's name to its output; without ``join``
        the mapping itself goes on. If a branch fails, the others are
        cancelled and the call fails with that branch's error.
        """
        return FanOutNode(name, branches, join=join, next=next)

    def targets(self) -> list[tuple[str, str]]:
        """``(label, node)`` for each edge out of this node (resolved ``next`` only)."""
        return [("", self.next)] if self.next is not None else []

    def children(self) -> tuple[str, ...]:
        """The nodes this node runs itself (a fan-out's branches)."""
        return ()

    def describe(self) -> str:
        """What the node runs, in a few words."""
        raise NotImplementedError


class ModelNode(Node):
    """A model node: a handler served as a model, or a model the runtime serves."""

    __slots__ = ("config", "handler", "model_name", "version")
    kind = "model"

    def __init__(
        self,
        name: str,
        *,
        handler: ModelHandler[Any, Any] | Callable[[], ModelHandler[Any, Any]] | None = None,
        config: ModelConfig | None = None,
        version: str = "1",
        model: str | None = None,
        next: Any = FOLLOWING,
    ) -> None:
        super().__init__(name, next=next)
        self.handler = handler
        self.config = config
        self.version = version
        self.model_name = model

    def describe(self) -> str:
        if self.model_name is not None:
            return f"model {self.model_name!r} of the runtime"
        if self.unloaded is not None:
            return f"model {self.unloaded} (not loaded)"
        return f"model {_name_of(self.handler)}"


class FunctionNode(Node):
    """A function node: business logic, feature extraction, preprocessing."""

    __slots__ = ("fn",)
    kind = "function"

    def __init__(self, name: str, fn: Callable[..., Any] | None, *, next: Any = FOLLOWING) -> None:
        super().__init__(name, next=next)
        self.fn = fn

    def describe(self) -> str:
        if self.unloaded is not None:
            return f"function {self.unloaded} (not loaded)"
        return f"function {_name_of(self.fn)}"


class RouterNode(Node):
    """A router: forwards its input to the node its routes name."""

    __slots__ = ("default", "on", "routes")
    kind = "router"

    def __init__(
        self,
        name: str,
        by: str | Callable[[Any, Any], Any],
        routes: Mapping[Any, str],
        *,
        default: str | None = None,
    ) -> None:
        super().__init__(name, next=None)
        self.on = by
        self.routes: dict[str, str] = {str(key): target for key, target in routes.items()}
        self.default = default

    def targets(self) -> list[tuple[str, str]]:
        edges = [(str(key), target) for key, target in self.routes.items()]
        if self.default is not None:
            edges.append(("default", self.default))
        return edges

    def describe(self) -> str:
        if self.unloaded is not None:
            return f"router by {self.unloaded} (not loaded)"
        by = self.on if isinstance(self.on, str) else _name_of(self.on)
        return f"router by {by}"


class FanOutNode(Node):
    """A fan-out: runs its branches at once on its input and joins their outputs."""

    __slots__ = ("branches", "join")
    kind = "fan_out"

    def __init__(
        self,
        name: str,
        branches: Sequence[str],
        *,
        join: Callable[[dict[str, Any]], Any] | None = None,
        next: Any = FOLLOWING,
    ) -> None:
        super().__init__(name, next=next)
        self.branches = tuple(branches)
        self.join = join

    def children(self) -> tuple[str, ...]:
        return self.branches

    def describe(self) -> str:
        if self.unloaded is not None:
            join = f"{self.unloaded} (not loaded)"
        elif self.join is not None:
            join = _name_of(self.join)
        else:
            join = "a mapping by node name"
        return f"fan-out to {', '.join(self.branches)}, joined by {join}"


def _name_of(obj: Any) -> str:
    if obj is None:
        return "-"
    named = isinstance(obj, type) or (callable(obj) and hasattr(obj, "__qualname__"))
    target = obj if named else type(obj)
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", repr(target))
    return f"{module}:{qualname}" if module else qualname
