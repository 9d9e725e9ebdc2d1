"""A pipeline's graph: its nodes, the checks on it, and its drawings."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, cast

from .._config import ModelConfig, check_name
from .._errors import ConfigError
from .._handler import ModelHandler

__all__ = ["FanOutNode", "FunctionNode", "ModelNode", "Node", "Pipeline", "RouterNode"]


class _Following:
    """``next`` left out: the next listed node (the end after the last)."""

    def __repr__(self) -> str:
        return "<the next listed node>"


_FOLLOWING: Any = _Following()

#: Marks a fan-out's join point in drawings (no node name has a "+").
_JOIN = "+join:"


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

    def __init__(self, name: str, *, next: Any = _FOLLOWING) -> None:
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
        next: str | None = _FOLLOWING,
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
    def function(cls, name: str, fn: Callable[..., Any], *, next: str | None = _FOLLOWING) -> Node:
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
        next: str | None = _FOLLOWING,
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
        next: Any = _FOLLOWING,
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

    def __init__(self, name: str, fn: Callable[..., Any] | None, *, next: Any = _FOLLOWING) -> None:
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
        next: Any = _FOLLOWING,
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


class Pipeline:
    """A graph of nodes served like one model.

    Build one from nodes in Python, or load one with :meth:`load` (a YAML
    file) or :meth:`from_dict`; add it to a :class:`Runtime` with
    :meth:`Runtime.add_pipeline`, and serve it by name like a model.

    The graph is checked when it is built: every ``next``, route and branch
    names a node, the graph has no cycle, each node has one kind, and names
    are unique. Every problem found is reported at once, in one
    :class:`ConfigError`. A node that cannot be reached from the start is
    allowed, with a warning.

    Args:
        name: the pipeline's name, used by :func:`mds.serve`.
        nodes: its nodes; a node that leaves out ``next`` goes on to the
            next one listed.
        start: the first node's name; defaults to the first listed.
        timeout: a default deadline, in seconds, for the whole call.
        version: the pipeline's version, as its metadata reports it (added in 0.3).
        source: where the pipeline was defined (a file), for messages.

    Raises:
        ConfigError: a problem with the graph; the message names the file,
            the node and the problem.

    Example:
        >>> pipeline = mds.Pipeline("scoring", [
        ...     mds.Node.function("features", extract),
        ...     mds.Node.model("model", Scorer),
        ...     mds.Node.function("decision", decide),
        ... ])

    Added in 0.2.
    """

    def __init__(
        self,
        name: str,
        nodes: Iterable[Node],
        *,
        start: str | None = None,
        timeout: float | None = None,
        version: str = "1",
        source: str | None = None,
    ) -> None:
        self.name = name
        self.source = source
        self.timeout = timeout
        self.version = version
        listed = list(nodes)
        problems: list[str] = []
        try:
            check_name(name, "pipeline")
        except ConfigError as exc:
            problems.append(str(exc))
        if timeout is not None and not timeout > 0:
            problems.append(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.nodes: dict[str, Node] = {}
        for index, node in enumerate(listed):
            if not isinstance(cast(object, node), Node):
                problems.append(f"nodes[{index}] is a {type(node).__name__}, not a mds.Node")
                continue
            if node.name in self.nodes:
                problems.append(f"{self._at(node)}: the name is already used by an earlier node")
                continue
            try:
                check_name(node.name, "node")
            except ConfigError as exc:
                problems.append(f"{self._at(node)}: {exc}")
            self.nodes[node.name] = node
        if not self.nodes and not problems:
            problems.append("it has no nodes")
        self.start = start if start is not None else (listed[0].name if self.nodes else "")
        if self.nodes:
            self._resolve_following(listed)
            problems += self._check_edges()
            if not problems:
                problems += self._check_cycles()
        if problems:
            raise ConfigError(self._where() + ":\n" + "\n".join(f"  - {p}" for p in problems))
        unreachable = [n for n in self.nodes if n not in self.reachable()]
        for node_name in unreachable:
            warnings.warn(
                f"{self._where()}: {self._at(self.nodes[node_name])} cannot be reached from "
                f"the start node {self.start!r}; it will never run, and is not loaded",
                UserWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        return f"<Pipeline {self.name!r} nodes={list(self.nodes)}>"

    # -- building -------------------------------------------------------------

    @classmethod
    def load(cls, path: Any) -> Pipeline:
        """Load a pipeline from a YAML file (the seed's format and its extensions).

        Handler and function modules are imported relative to the file's
        folder too. See the pipelines guide for the format.

        Raises:
            ConfigError: the file cannot be read or parsed, or describes a
                bad pipeline; the message names the file, the node (with its
                path in the document) and the problem.
        """
        from .loading import load_file

        return load_file(path)

    @classmethod
    def from_dict(cls, document: Mapping[str, Any], *, source: str = "<dict>") -> Pipeline:
        """Build a pipeline from the YAML document's content (``{"pipeline": {...}}``).

        Raises:
            ConfigError: as for :meth:`load`; ``source`` names the document.
        """
        from .loading import from_document

        return from_document(document, source, None)

    # -- checks -----------------------------------------------------------------

    def _where(self) -> str:
        where = f"pipeline {self.name!r}"
        return f"{self.source}: {where}" if self.source else where

    @staticmethod
    def _at(node: Node) -> str:
        return f"node {node.name!r}" + (f" ({node.origin})" if node.origin else "")

    def _resolve_following(self, listed: list[Node]) -> None:
        branch_nodes = {b for node in listed for b in node.children()}
        for index, node in enumerate(listed):
            if node.next is not _FOLLOWING:
                continue
            if node.name in branch_nodes:
                node.next = None  # a branch ends at its join
                continue
            # The next listed node that is not a branch (branches run only
            # from their fan-out); the end after the last.
            following = [n.name for n in listed[index + 1 :] if n.name not in branch_nodes]
            node.next = following[0] if following else None

    def _unknown(self, what: str, name: Any) -> str:
        if not isinstance(name, str):
            return f"{what} must be a node name, not {type(name).__name__}"
        close = difflib.get_close_matches(name, list(self.nodes), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{what} {name!r} is not a node of this pipeline{hint}; its nodes: " + ", ".join(
            self.nodes
        )

    def _check_edges(self) -> list[str]:
        problems: list[str] = []
        if self.start not in self.nodes:
            problems.append(self._unknown("the start node", self.start))
        owner: dict[str, str] = {}
        for node in self.nodes.values():
            at = self._at(node)
            for label, target in node.targets():
                what = f"route {label!r} ->" if isinstance(node, RouterNode) else "next"
                if target not in self.nodes:
                    problems.append(f"{at}: " + self._unknown(what, target))
            if isinstance(node, RouterNode) and not node.routes:
                problems.append(f"{at}: a router needs at least one route")
            if isinstance(node, FanOutNode):
                if len(node.branches) < 1:
                    problems.append(f"{at}: a fan-out needs at least one branch")
                for branch in node.branches:
                    if branch not in self.nodes:
                        problems.append(f"{at}: " + self._unknown("branch", branch))
                        continue
                    if branch in owner:
                        problems.append(
                            f"{at}: branch {branch!r} is already a branch of {owner[branch]!r}"
                        )
                    owner[branch] = node.name
                    branch_node = self.nodes[branch]
                    if not isinstance(branch_node, ModelNode | FunctionNode):
                        problems.append(
                            f"{at}: branch {branch!r} is a {branch_node.kind} node; branches "
                            "must be model or function nodes"
                        )
                    if branch_node.next is not None:
                        problems.append(
                            f"{self._at(branch_node)}: a branch of fan-out {node.name!r} ends "
                            f"at its join, so it cannot have next {branch_node.next!r}"
                        )
        for node in self.nodes.values():
            for _, target in node.targets():
                if target in owner:
                    problems.append(
                        f"{self._at(node)}: {target!r} is a branch of fan-out "
                        f"{owner[target]!r}; only that fan-out may lead to it"
                    )
        if self.start in owner:
            problems.append(f"the start node {self.start!r} cannot be a branch of a fan-out")
        return problems

    def _check_cycles(self) -> list[str]:
        problems: list[str] = []
        state: dict[str, int] = {}  # 1: on the current path, 2: done
        path: list[str] = []

        def visit(name: str) -> None:
            state[name] = 1
            path.append(name)
            for _, target in self.nodes[name].targets():
                if state.get(target) == 1:
                    loop = [*path[path.index(target) :], target]
                    problems.append(
                        f"{self._at(self.nodes[name])}: leads back to {target!r}, a cycle: "
                        + " -> ".join(loop)
                    )
                elif target not in state:
                    visit(target)
            path.pop()
            state[name] = 2

        for name in self.nodes:
            if name not in state:
                visit(name)
        return problems

    def reachable(self) -> set[str]:
        """The nodes a call can reach from the start node."""
        seen: set[str] = set()
        todo = [self.start]
        while todo:
            name = todo.pop()
            if name in seen or name not in self.nodes:
                continue
            seen.add(name)
            node = self.nodes[name]
            todo += [target for _, target in node.targets()]
            todo += list(node.children())
        return seen

    # -- drawings -----------------------------------------------------------------

    def to_text(self) -> str:
        """The graph as indented text: each node, what it runs, where it leads."""
        lines = [f"pipeline {self.name} (start: {self.start})"]
        reachable = self.reachable()
        width = max(len(name) for name in self.nodes)
        branches = self._branches()
        for node in self.nodes.values():
            if isinstance(node, RouterNode):
                leads = ", ".join(f"{label} -> {target}" for label, target in node.targets())
            elif isinstance(node, FanOutNode):
                leads = f"join -> {node.next or 'end'}"
            elif node.name in branches:
                leads = "-> join"
            else:
                leads = f"-> {node.next or 'end'}"
            note = "" if node.name in reachable else "   (unreachable)"
            lines.append(f"  {node.name:<{width}}  [{node.describe()}]  {leads}{note}")
        return "\n".join(lines)

    def to_mermaid(self) -> str:
        """The graph as a Mermaid flowchart."""
        ids = {name: f"n{i}" for i, name in enumerate(self.nodes)}
        shapes = {
            "model": ("[", "]"),
            "function": ("([", "])"),
            "router": ("{", "}"),
            "fan_out": ("[[", "]]"),
        }
        lines = ["flowchart LR", "  start((start))", "  finish((end))"]
        for name, node in self.nodes.items():
            left, right = shapes[node.kind]
            lines.append(f'  {ids[name]}{left}"{name}<br/><small>{node.kind}</small>"{right}')
        for name, node in self.nodes.items():
            if isinstance(node, FanOutNode):
                lines.append(f"  {ids[name]}_join((join))")

        def mermaid_id(end: str | None) -> str:
            if end is None:
                return "finish"
            if end.startswith(_JOIN):
                return ids[end[len(_JOIN) :]] + "_join"
            return ids[end]

        lines.append(f"  start --> {ids[self.start]}")
        for source, target, label in self._edges():
            arrow = f'-->|"{label}"|' if label else "-->"
            lines.append(f"  {mermaid_id(source)} {arrow} {mermaid_id(target)}")
        return "\n".join(lines)

    def to_dot(self) -> str:
        """The graph in Graphviz DOT."""
        shapes = {"model": "box", "function": "ellipse", "router": "diamond", "fan_out": "box3d"}
        lines = [
            f'digraph "{self.name}" {{',
            "  rankdir=LR;",
            '  start [shape=circle, label="start"];',
            '  finish [shape=doublecircle, label="end"];',
        ]
        for name, node in self.nodes.items():
            lines.append(f'  "{name}" [shape={shapes[node.kind]}, label="{name}\\n{node.kind}"];')
            if isinstance(node, FanOutNode):
                lines.append(f'  "{name}_join" [shape=point, label="join"];')

        def dot_id(end: str | None) -> str:
            if end is None:
                return "finish"
            if end.startswith(_JOIN):
                return f'"{end[len(_JOIN) :]}_join"'
            return f'"{end}"'

        lines.append(f'  start -> "{self.start}";')
        for source, target, label in self._edges():
            a, b = dot_id(source), dot_id(target)
            attrs = f' [label="{label}"]' if label else ""
            lines.append(f"  {a} -> {b}{attrs};")
        lines.append("}")
        return "\n".join(lines)

    def _edges(self) -> list[tuple[str | None, str | None, str]]:
        """Edges for drawing: node to node, node to end (``None``), and joins."""
        edges: list[tuple[str | None, str | None, str]] = []
        branches = self._branches()
        for name, node in self.nodes.items():
            if isinstance(node, FanOutNode):
                join = _JOIN + name
                for branch in node.branches:
                    edges.append((name, branch, ""))
                    edges.append((branch, join, ""))
                edges.append((join, node.next, ""))
                continue
            if name in branches:
                continue
            targets = node.targets()
            for label, target in targets:
                edges.append((name, target, label))
            if not targets and not isinstance(node, RouterNode):
                edges.append((name, None, ""))
        return edges

    def _branches(self) -> set[str]:
        """Every node that is a fan-out's branch."""
        return {branch for node in self.nodes.values() for branch in node.children()}
