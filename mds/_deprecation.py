"""Old names that keep working for a release, with a warning that names the new one."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar, cast

__all__ = ["renamed"]

F = TypeVar("F", bound=Callable[..., Any])


def renamed(new: F, *, old: str, owner: str, since: str = "0.3", removed: str = "0.4") -> F:
    """``new`` under its old name ``old``, warning with ``DeprecationWarning`` on each call."""
    message = (
        f"{owner}.{old} is deprecated since mds {since} and goes in {removed}; "
        f"use {owner}.{new.__name__}"
    )

    @functools.wraps(new)
    def shim(*args: Any, **kwargs: Any) -> Any:
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return new(*args, **kwargs)

    shim.__name__ = shim.__qualname__ = old
    shim.__doc__ = f"Deprecated since {since}: use :meth:`{new.__name__}`."
    return cast(F, shim)
