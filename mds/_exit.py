"""Interpreter exit: one hook for everything mds must finish before the process ends.

``atexit`` runs too late: by then ``concurrent.futures`` has shut every
executor, and a handler's ``teardown`` could not run in a thread. The hook
registered here runs before that, as the stdlib's own do. It runs the
callbacks by stage: first what stops runtimes and models (which may still
run calls in mds's threads), then what lets those threads go.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable

__all__ = ["STOP", "THREADS", "on_exit"]

logger = logging.getLogger("mds.runtime")

#: Stopping what was started with ``start_sync`` (drains, teardown).
STOP = 0
#: Closing mds's worker threads, once nothing needs them.
THREADS = 1

_lock = threading.Lock()
_callbacks: list[tuple[int, Callable[[], None]]] = []
_hooked = False


def on_exit(fn: Callable[[], None], *, stage: int = STOP) -> None:
    """Call ``fn`` at interpreter exit, in ``stage`` order (latest first within one)."""
    global _hooked
    with _lock:
        _callbacks.append((stage, fn))
        if not _hooked:
            _hooked = True
            register = getattr(threading, "_register_atexit", None)
            if register is None:  # pragma: no cover - not CPython
                atexit.register(_run)
            else:
                register(_run)


def _run() -> None:
    with _lock:
        callbacks = list(reversed(_callbacks))
    for _, fn in sorted(callbacks, key=lambda entry: entry[0]):  # stable: latest first
        try:
            fn()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            logger.exception("mds: %r failed at interpreter exit", fn)
