"""Prometheus metrics for a runtime: a collector you register on your own registry.

Nothing is registered at import and nothing is counted twice: mds counts
as it serves (its statistics), and :class:`Collector` reads those numbers
when Prometheus scrapes::

    from prometheus_client import CollectorRegistry
    registry = CollectorRegistry()
    registry.register(mds.prometheus.Collector(runtime))

Serve the registry as you serve your other metrics, or let the adapters mount
``/metrics`` (``mds.fastapi.add_routes(app, runtime, metrics=True)``). With
several worker processes (gunicorn, ``uvicorn --workers``), give each
worker's collector the same ``directory`` and every scrape adds up all the
workers. See docs/observability.md for every metric and its Triton
counterpart.

Added in 0.5.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ._deps import require
from ._devices.manager import DeviceManager
from ._errors import ConfigError
from ._handler import ModelState
from ._metrics.families import Family, families
from ._metrics.shared import SharedDirectory
from ._runtime import Runtime
from ._status import Histogram

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric  # type: ignore[import-not-found,unused-ignore]

__all__ = ["Collector", "exposition"]

_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class Collector:
    """Reads a runtime's numbers at scrape time, as Prometheus metric families.

    Every model version loaded, pipeline and pipeline node, on-demand loading,
    and the memory of the devices the models run on. Metric names start with
    ``namespace`` (``mds_``); durations are seconds, sizes bytes.

    Args:
        runtime: the runtime to report on (running or not).
        namespace: the prefix of every metric name.
        directory: a directory that several worker processes share, each
            with its own runtime and collector: each scrape, whichever worker
            answers it, reports the sum of all of them (counters and
            histograms of every worker that ever ran, gauges of those alive).
            Each worker writes its numbers there every ``interval`` seconds
            and at exit. Empty it when the server (re)starts, as
            ``prometheus_client``'s own ``PROMETHEUS_MULTIPROC_DIR`` (the same
            directory may serve both). ``None``: this process only.
        interval: seconds between a worker's writes to ``directory``: how
            stale the other workers' numbers may be in a scrape.
        devices: where the models' devices are looked up; the default
            manager if ``None``.

    Counters and histograms never go down: when a version is reloaded (its
    counts start again) or unloaded (its series vanish), what it counted is
    kept and added to what is counted under the same labels after it.

    Raises:
        MissingDependency: ``prometheus_client`` is not installed
            (``pip install mds-serving[metrics]``).
        ConfigError: ``namespace`` cannot start a metric name, or
            ``directory`` is given where there are no POSIX file locks (Windows).

    Example:
        >>> registry = prometheus_client.CollectorRegistry()
        >>> registry.register(mds.prometheus.Collector(runtime))
        >>> prometheus_client.generate_latest(registry)
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        namespace: str = "mds",
        directory: str | os.PathLike[str] | None = None,
        interval: float = 1.0,
        devices: DeviceManager | None = None,
    ) -> None:
        require("prometheus_client", feature="mds.prometheus")
        if not _NAME.fullmatch(namespace):
            raise ConfigError(
                f"namespace {namespace!r} is not a metric name prefix ([a-zA-Z_][a-zA-Z0-9_]*)"
            )
        if directory is not None and os.name != "posix":
            raise ConfigError(
                "directory= shares metrics between processes with POSIX file locks; "
                "it is not supported on this platform"
            )
        self.runtime = runtime
        self.namespace = namespace
        self._devices = devices
        self._shared = (
            SharedDirectory(directory, self._own, interval, self._has_run)
            if directory is not None
            else None
        )

    def __repr__(self) -> str:
        where = f" directory={str(self._shared.path)!r}" if self._shared is not None else ""
        return f"<mds.prometheus.Collector {self.runtime!r}{where}>"

    def _has_run(self) -> bool:
        """Whether this process's runtime has started (a ``--preload`` master's never does)."""
        runtime = self.runtime
        return runtime.running or any(
            model.state is not ModelState.CREATED for model in list(runtime.models.values())
        )

    def _own(self) -> list[Family]:
        return families(self.runtime, self._devices)

    def collect(self) -> Iterator[Metric]:
        """The metric families now (what a registry calls at each scrape)."""
        found = self._shared.merged() if self._shared is not None else self._own()
        for family in found:
            yield _metric(f"{self.namespace}_{family.name}", family)

    def close(self) -> None:
        """Stop writing to ``directory`` in the background (after a last write)."""
        if self._shared is not None:
            self._shared.close()


def exposition(registry: Any, accept: str | None = None) -> tuple[bytes, str]:
    """``registry``'s metrics in the format ``accept`` asks for, and its content type.

    Prometheus' text format, or OpenMetrics when the scraper asks for it (as
    ``prometheus_client`` negotiates). What the adapters' ``/metrics`` sends.
    """
    exposition = require("prometheus_client.exposition", feature="mds.prometheus")
    encode, content_type = exposition.choose_encoder(accept or "")
    return encode(registry), content_type


def _metric(name: str, family: Family) -> Metric:
    core = require("prometheus_client.core", feature="mds.prometheus")
    labels = list(family.labels)
    if family.kind == "counter":
        metric = core.CounterMetricFamily(name, family.help, labels=labels)
        for sample in family.samples:
            metric.add_metric(list(sample.labels), _number(sample.value))
    elif family.kind == "gauge":
        metric = core.GaugeMetricFamily(name, family.help, labels=labels)
        for sample in family.samples:
            metric.add_metric(list(sample.labels), _number(sample.value))
    else:
        metric = core.HistogramMetricFamily(name, family.help, labels=labels)
        for sample in family.samples:
            histogram = sample.value
            assert isinstance(histogram, Histogram)
            buckets = [(_bound(bound), count) for bound, count in histogram.cumulative()]
            metric.add_metric(list(sample.labels), buckets, histogram.sum)
    return metric  # type: ignore[no-any-return,unused-ignore]


def _number(value: float | Histogram) -> float:
    assert not isinstance(value, Histogram)
    return float(value)


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))
