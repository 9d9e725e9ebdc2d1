"""A pipeline's graph: its nodes, the checks on it, and its drawings."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, cast

from .._config import check_name
from .._errors import ConfigError
from .nodes import FOLLOWING, FanOutNode, FunctionNode, ModelNode, Node, RouterNode

__all__ = ["Pipeline"]

#: Marks a fan-out's join point in drawings (no node name has a "+").
_JOIN = "+join:"


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
            if node.next is not FOLLOWING:
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
