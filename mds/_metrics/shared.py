"""Metrics of several worker processes added up through a shared directory.

Each process writes its own families to ``mds-<pid>-<start>.json`` in the
directory (atomically: write, then rename), every ``interval`` seconds, at
each scrape and at exit, once its runtime has run (a ``--preload`` master,
whose runtime never starts, writes nothing). A scrape, whichever process
answers it, reads every file and adds them up: counters and histograms over
every process that ever wrote (a worker that exited keeps its counts, so
totals never go down), gauges over the processes still alive. The files of
exited workers are folded into one, ``mds-exited.json``, so that the
directory does not grow with restarts; a lock file keeps readers from seeing
a worker's counts twice, or not at all, while that happens.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec

from .._status import Histogram
from .families import Family, Sample

__all__ = ["SharedDirectory", "merge"]

logger = logging.getLogger("mds.metrics")

_PREFIX = "mds-"
_EXITED = "mds-exited.json"
_LOCK = ".mds-metrics.lock"


class _File(msgspec.Struct):
    pid: int
    families: list[Family]
    started: int = 0  # the process's start time (Linux clock ticks), to tell a reused pid
    folded: list[str] = msgspec.field(default_factory=list)  # mds-exited.json: files in it


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_File)


class SharedDirectory:
    """This process's families in ``path``, and everyone's added up.

    Args:
        path: the directory every worker shares (made if missing).
        snapshot: this process's families now.
        interval: seconds between writes in the background.
        active: whether this process has numbers to write yet.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        snapshot: Callable[[], list[Family]],
        interval: float,
        active: Callable[[], bool],
    ) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._snapshot = snapshot
        self._active = active
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
        """Write this process's families now (if its runtime has run)."""
        if not self._active():
            return
        pid = os.getpid()
        started = _started(pid)
        target = self.path / f"{_PREFIX}{pid}-{started}.json"
        temporary = self.path / f".{_PREFIX}{pid}-{started}.tmp"
        # The snapshot is taken under the lock too: an older one never
        # replaces a newer one (counts would seem to go down).
        with self._lock:
            data = _encoder.encode(_File(pid=pid, started=started, families=self._snapshot()))
            temporary.write_bytes(data)
            os.replace(temporary, target)

    def merged(self) -> list[Family]:
        """Every process's families added up (this one's written first, so it is fresh)."""
        self.write()
        with self._locked():
            self._fold_exited()
            exited = self.path / _EXITED
            files = list(self._read([exited])) if exited.exists() else []
            folded = set(files[0].folded) if files else set()
            paths = self.path.glob(f"{_PREFIX}*.json")
            others = [p for p in paths if p.name != _EXITED and p.name not in folded]
            files += self._read(sorted(others))
        return merge(files)

    def _fold_exited(self) -> None:
        """Fold the files of exited workers into ``mds-exited.json`` (under the lock).

        The folded file names the files in it: one left behind by a fold that
        was interrupted is removed, not counted again.
        """
        exited = self.path / _EXITED
        before = list(self._read([exited])) if exited.exists() else []
        done = set(before[0].folded) if before else set()
        gone: list[Path] = []
        files: list[_File] = []
        for path in self.path.glob(f"{_PREFIX}*.json"):
            if path.name == _EXITED:
                continue
            if path.name in done:
                _remove(path)
                continue
            for read in self._read([path]):
                if not _alive(read.pid, read.started):
                    gone.append(path)
                    files.append(read)
        if not gone:
            return
        names = sorted(done & {p.name for p in self.path.glob(f"{_PREFIX}*.json")})
        folded = _File(
            pid=0,
            families=merge(files + before, gauges=False),
            folded=names + [path.name for path in gone],
        )
        temporary = self.path / f".{_EXITED}.tmp"
        temporary.write_bytes(_encoder.encode(folded))
        os.replace(temporary, exited)
        for path in gone:
            _remove(path)
            _remove(path.parent / f".{path.stem}.tmp")

    def _read(self, paths: list[Path]) -> Iterator[_File]:
        for path in paths:
            try:
                yield _decoder.decode(path.read_bytes())
            except FileNotFoundError:
                continue  # folded meanwhile
            except (OSError, msgspec.DecodeError) as exc:
                logger.warning("skipping metrics file %s: %s", path, exc)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl  # POSIX only: imported where it is used

        with open(self.path / _LOCK, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def merge(files: list[_File], *, gauges: bool = True) -> list[Family]:
    """The files' families, added up (gauges only of processes alive, and only if ``gauges``)."""
    found: dict[str, Family] = {}
    values: dict[str, dict[tuple[str, ...], float | Histogram]] = {}
    for file in files:
        alive = gauges and file.pid != 0 and _alive(file.pid, file.started)
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


def _started(pid: int) -> int:
    """When process ``pid`` started (clock ticks since boot, from /proc); 0 where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    # The command name (field 2) may hold spaces: count from its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:  # the next fold tries again; the scrape goes on
        logger.warning("could not remove metrics file %s: %s", path, exc)


def _alive(pid: int, started: int) -> bool:
    """Whether the process that wrote a file runs still (not another one given its pid since)."""
    if pid == os.getpid():
        return not started or started == _started(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return not started or _started(pid) in (0, started)


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
