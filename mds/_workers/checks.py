"""What a worker checks when it starts: mistakes that would fail every message, one by one.

A target the runtime does not serve, a queue or bucket that is not there,
nowhere to dead-letter: each would send every message to the dead letters
(or round and round), so the worker refuses to start with a ConfigError
that says what is wrong. A broker out of reach is no such mistake: the
worker starts, and backs off while it receives.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from .._errors import ConfigError, ModelNotFound, describe
from .._runtime import Runtime

__all__ = ["check"]

logger = logging.getLogger("mds.workers")


async def check(runtime: Runtime, target: str, parts: Iterable[Any]) -> None:
    """Refuse what would fail every message; ``parts``: the source and sink (their ``check()``).

    Raises:
        ConfigError: no such target, or a stateful one; a source or sink set wrong.
    """
    try:
        servable = runtime.servable(target)
    except ModelNotFound as exc:
        raise ConfigError(f"the worker cannot serve {target!r}: {exc.message}") from None
    if servable.stateful:
        raise ConfigError(
            f"the worker cannot serve {target!r}: it is stateful, and a queue's messages "
            "are not steps of sequences"
        )
    for part in parts:
        checked = getattr(part, "check", None)
        if checked is None:
            continue
        try:
            await checked()
        except ConfigError:
            raise
        except Exception as exc:  # out of reach now, say: receiving backs off and retries
            logger.warning("could not check %r before starting: %s", part, describe(exc))
