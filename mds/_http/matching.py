"""Finding a path's endpoint among mds's routes: a dictionary lookup, or a few segment patterns.

Shared by mds's own ASGI application (what ``mds serve`` runs) and the
FastAPI adapter's lane past the framework's router.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, TypeVar

from .asgi import Scope

__all__ = ["PathTable", "route_path"]

T = TypeVar("T")

#: The most matched paths kept (they are forgotten all at once past it), and
#: the longest kept: a path can be as long as a client likes.
_MATCHED = 1024
_REMEMBERED_LENGTH = 256

_NO_PARAMS: Mapping[str, str] = {}
_UNKNOWN: object = object()


class PathTable(Generic[T]):
    """Each route path's target (``"/v2/models/{name}/infer"``: its dispatch), found by path.

    Fixed paths are a dictionary lookup; patterns are matched segment by
    segment (a ``{name}`` segment takes any non-empty segment), infer routes
    first, in the order given otherwise; matched paths are remembered.
    """

    def __init__(self, targets: Mapping[str, T]) -> None:
        self._fixed: dict[str, T] = {}
        # Paths already looked up, with their target and parameters or None:
        # a few models' paths come again and again.
        self._matched: dict[str, tuple[T, Mapping[str, str]] | None] = {}
        # By segment count: (the pattern's segments, its target).
        self._patterns: dict[int, list[tuple[tuple[str, ...], T]]] = {}
        for path, target in targets.items():
            if "{" not in path:
                self._fixed[path] = target
                continue
            segments = tuple(path.split("/"))
            self._patterns.setdefault(len(segments), []).append((segments, target))
        # Infer routes first: they are what most requests ask for.
        for found in self._patterns.values():
            found.sort(key=lambda entry: entry[0][-1] != "infer")

    def find(self, path: str) -> tuple[T, Mapping[str, str]] | None:
        """``path``'s target and its parameters (read-only: copy them), or ``None``."""
        target = self._fixed.get(path)
        if target is not None:
            return target, _NO_PARAMS
        known = self._matched.get(path, _UNKNOWN)
        if known is not _UNKNOWN:
            return known  # type: ignore[return-value]
        found = self._search(path)
        if len(path) <= _REMEMBERED_LENGTH:  # misses too: the app's own paths come again
            if len(self._matched) >= _MATCHED:
                self._matched.clear()
            self._matched[path] = found
        return found

    def _search(self, path: str) -> tuple[T, Mapping[str, str]] | None:
        segments = path.split("/")
        for pattern, target in self._patterns.get(len(segments), ()):
            params: dict[str, str] = {}
            for want, got in zip(pattern, segments, strict=True):
                if want[:1] == "{":
                    if not got:
                        break
                    params[want[1:-1]] = got
                elif want != got:
                    break
            else:
                return target, params
        return None


def route_path(scope: Scope) -> str:
    """The path the app routes by: the request's, less the ``root_path`` it is mounted at.

    As Starlette's routers take it, so that both find the same route.
    """
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root) :] if path[len(root)] == "/" else path
