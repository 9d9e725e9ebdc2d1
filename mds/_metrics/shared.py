"""Metrics of several worker processes added up through a shared directory.

Each process writes its own families to ``mds-<pid>.json`` in the directory
(atomically: write, then rename), every ``interval`` seconds, at each scrape
and at exit. A scrape, whichever process answers it, reads every file and
adds them up: counters and histograms over every process that ever wrote
(a worker that exited keeps its counts, so totals never go down), gauges
over the processes still alive.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import msgspec

from .._status import Histogram
from .families import Family, Sample

__all__ = ["SharedDirectory"]

logger = logging.getLogger("mds.metrics")

_PREFIX = "mds-"


class _File(msgspec.Struct):
    pid: int
    families: list[Family]


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_File)


class SharedDirectory:
    """This process's families in ``path``, and everyone's added up.

    Args:
        path: the directory every worker shares (made if missing).
        snapshot: this process's families now.
        interval: seconds between writes in the background.
    """

    def __init__(
        self, path: str | os.PathLike[str], snapshot: Callable[[], list[Family]], interval: float
    ) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._snapshot = snapshot
        self._interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._start()
        # A worker forked after this was made (gunicorn --preload) writes its own file.
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _restart(ref))
        atexit.register(_final, ref)

    def _start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mds-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.write()
            except Exception:  # the next write may work; a scrape reports its own error
                logger.warning(
                    "writing this process's metrics to %s failed", self.path, exc_info=True
                )

    def close(self) -> None:
        """Stop the background writes, after a last one."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self.write()

    def write(self) -> None:
        """Write this process's families now."""
        pid = os.getpid()
        data = _encoder.encode(_File(pid=pid, families=self._snapshot()))
        target = self.path / f"{_PREFIX}{pid}.json"
        temporary = self.path / f".{_PREFIX}{pid}.{threading.get_ident()}.tmp"
        with self._lock:
            temporary.write_bytes(data)
            os.replace(temporary, target)

    def merged(self) -> list[Family]:
        """Every process's families added up (this one's written first, so it is fresh)."""
        self.write()
        files: list[_File] = []
        for path in sorted(self.path.glob(f"{_PREFIX}*.json")):
            try:
                files.append(_decoder.decode(path.read_bytes()))
            except (OSError, msgspec.DecodeError) as exc:
                logger.warning("skipping metrics file %s: %s", path, exc)
        return merge(files)


def merge(files: list[_File]) -> list[Family]:
    """The files' families, added up (gauges of exited processes left out)."""
    found: dict[str, Family] = {}
    values: dict[str, dict[tuple[str, ...], float | Histogram]] = {}
    for file in files:
        alive = _alive(file.pid)
        for family in file.families:
            if family.kind == "gauge" and not alive:
                continue
            mine = found.setdefault(
                family.name,
                Family(
                    family.name, family.kind, family.help, family.labels, combine=family.combine
                ),
            )
            if mine.kind != family.kind or mine.labels != family.labels:
                continue  # another mds version's family of that name: not comparable
            series = values.setdefault(family.name, {})
            for sample in family.samples:
                before = series.get(sample.labels)
                series[sample.labels] = _combine(mine, before, sample.value)
    for name, family in found.items():
        family.samples = [Sample(labels, value) for labels, value in values.get(name, {}).items()]
    return list(found.values())


def _combine(
    family: Family, before: float | Histogram | None, value: float | Histogram
) -> float | Histogram:
    if before is None:
        return value
    if isinstance(before, Histogram) and isinstance(value, Histogram):
        return before + value if before.bounds == value.bounds else before
    if isinstance(before, Histogram) or isinstance(value, Histogram):
        return before
    if family.combine == "max":
        return max(before, value)
    return before + value


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _restart(ref: weakref.ref[SharedDirectory]) -> None:
    shared = ref()
    if shared is not None and not shared._stop.is_set():
        shared._lock = threading.Lock()
        shared._start()


def _final(ref: weakref.ref[SharedDirectory]) -> None:
    shared = ref()
    if shared is not None and not shared._stop.is_set():
        shared._stop.set()
        try:
            shared.write()
        except Exception:  # at exit: nothing more to do
            pass
