"""mds.prometheus: what a scrape reads, through real registries, servers and processes."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mds
from mds._batching.stats import SECONDS, Buckets

from ..servers import free_port, running

prometheus_client = pytest.importorskip(
    "prometheus_client", reason="needs prometheus-client (the metrics extra)"
)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import mds.prometheus  # noqa: E402

HERE = Path(__file__).resolve().parent

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Series:
    """Every sample of a scrape, by (sample name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(series: Series, name: str, **labels: str) -> float:
    return series[(name, frozenset(labels.items()))]


def scrape(collector: Any) -> Series:
    registry = prometheus_client.CollectorRegistry()
    registry.register(collector)
    return parse(prometheus_client.generate_latest(registry).decode())


class Scorer(mds.ModelHandler[Any, float]):
    """Doubles a number; anything else is the client's mistake."""

    def preprocess(self, request: Any) -> float:
        if not isinstance(request, int | float):
            raise mds.InvalidInput(f"expected a number, got {type(request).__name__}")
        return float(request)

    def infer(self, batch: Sequence[float]) -> list[float]:
        return [2 * x for x in batch]


class Plain(mds.ModelHandler[Any, Any]):
    def infer(self, batch: Sequence[Any]) -> list[Any]:
        return list(batch)


@pytest.fixture
def runtime() -> Iterator[mds.Runtime]:
    runtime = mds.Runtime()
    runtime.add_model("scorer", Scorer, version="1")
    runtime.add_model("scorer", Scorer, version="2", policy=mds.VersionPolicy(all=True))
    runtime.add_pipeline(
        mds.Pipeline(
            "flow", [mds.Node.model("first", model="scorer"), mds.Node.function("second", abs)]
        )
    )
    runtime.start_sync(load="wait")
    try:
        yield runtime
    finally:
        runtime.stop_sync()


def test_a_scrape_reads_outcomes_histograms_and_gauges(runtime: mds.Runtime) -> None:
    for x in range(7):
        assert mds.serve_sync("scorer", x) == 2 * x
    for bad in ("seven", [1]):
        with pytest.raises(mds.InvalidInput):
            mds.serve_sync("scorer", bad)
    assert runtime.servable("scorer", "1").serve_sync(3) == 6
    assert mds.serve_sync("flow", -2) == 4
    series = scrape(mds.prometheus.Collector(runtime))

    # Version 2 is the newest, so takes the traffic that names no version.
    model = {"model": "scorer", "version": "2"}
    # 7, and the pipeline's.
    assert value(series, "mds_requests_total", outcome="success", **model) == 8
    # Bad input is the client's mistake, apart from the model's own errors.
    assert value(series, "mds_requests_total", outcome="invalid", **model) == 2
    assert value(series, "mds_requests_total", outcome="error", **model) == 0
    assert value(series, "mds_request_errors_total", error="InvalidInput", **model) == 2
    assert value(series, "mds_requests_total", outcome="success", model="scorer", version="1") == 1
    assert value(series, "mds_request_duration_seconds_count", **model) == 8
    assert value(series, "mds_request_duration_seconds_bucket", le="+Inf", **model) == 8
    assert value(series, "mds_preprocess_duration_seconds_count", **model) == 8  # those that passed
    assert value(series, "mds_queue_duration_seconds_count", **model) == 8
    batches = value(series, "mds_batch_size_count", **model)
    assert 1 <= batches <= 8
    assert value(series, "mds_batch_size_sum", **model) == 8
    assert value(series, "mds_infer_duration_seconds_count", **model) == batches
    # Cumulative buckets never go down.
    buckets = [
        value(series, "mds_request_duration_seconds_bucket", le=repr(bound), **model)
        for bound in SECONDS
    ]
    assert buckets == sorted(buckets)
    assert value(series, "mds_model_state", state="ready", **model) == 1
    assert value(series, "mds_model_state", state="failed", **model) == 0
    assert value(series, "mds_queue_depth", **model) == 0
    assert value(series, "mds_requests_in_flight", **model) == 0
    assert value(series, "mds_instances", device="cpu", **model) == 1
    assert value(series, "mds_device_healthy", device="cpu") == 1

    flow = {"pipeline": "flow", "version": "1"}
    assert value(series, "mds_pipeline_requests_total", outcome="success", **flow) == 1
    assert value(series, "mds_pipeline_request_duration_seconds_count", **flow) == 1
    for node, kind in (("first", "model"), ("second", "function")):
        assert value(series, "mds_pipeline_node_calls_total", node=node, kind=kind, **flow) == 1
        assert value(series, "mds_pipeline_node_failures_total", node=node, kind=kind, **flow) == 0


def test_the_namespace_prefixes_every_name(runtime: mds.Runtime) -> None:
    series = scrape(mds.prometheus.Collector(runtime, namespace="serving"))
    assert {name.split("_")[0] for name, _ in series} == {"serving"}


def test_a_failing_pipeline_node_is_counted_where_it_failed(runtime: mds.Runtime) -> None:
    with pytest.raises(mds.InvalidInput):
        mds.serve_sync("flow", "not a number")
    series = scrape(mds.prometheus.Collector(runtime))
    flow = {"pipeline": "flow", "version": "1"}
    assert value(series, "mds_pipeline_requests_total", outcome="invalid", **flow) == 1
    assert value(series, "mds_pipeline_request_errors_total", error="InvalidInput", **flow) == 1
    assert value(
        series, "mds_pipeline_node_failures_total", node="first", kind="model", **flow
    ) == 1  # fmt: skip
    assert value(
        series, "mds_pipeline_node_calls_total", node="second", kind="function", **flow
    ) == 0  # fmt: skip


def test_a_stopped_model_reads_as_stopped_and_keeps_its_counts() -> None:
    runtime = mds.Runtime()
    runtime.add_model("plain", Plain)
    with _started(runtime):
        mds.serve_sync("plain", 1)
    series = scrape(mds.prometheus.Collector(runtime))
    model = {"model": "plain", "version": "1"}
    assert value(series, "mds_model_state", state="stopped", **model) == 1
    assert value(series, "mds_requests_total", outcome="success", **model) == 1
    assert ("mds_instances", frozenset({**model, "device": "cpu"}.items())) not in series


class Summing(mds.ModelHandler[float, float]):
    def infer(self, steps: Sequence[mds.SequenceStep[float, float]]) -> list[float]:
        for step in steps:
            step.state = (step.state or 0.0) + step.input
        return [step.state for step in steps]


def test_a_stateful_models_sequences_live_started_and_ended() -> None:
    runtime = mds.Runtime()
    runtime.add_model("sum", Summing, mds.ModelConfig(sequences=mds.SequenceConfig()))
    model = {"model": "sum", "version": "1"}
    with _started(runtime):
        mds.serve_sync("sum", 1.0, sequence_id="a", sequence_start=True)
        mds.serve_sync("sum", 1.0, sequence_id="b", sequence_start=True)
        mds.serve_sync("sum", 1.0, sequence_id="a", sequence_end=True)
        series = scrape(mds.prometheus.Collector(runtime))
        assert value(series, "mds_sequences", **model) == 1
        assert value(series, "mds_sequences_started_total", **model) == 2
        assert value(series, "mds_sequence_ends_total", reason="ended", **model) == 1
    series = scrape(mds.prometheus.Collector(runtime))
    assert value(series, "mds_sequence_ends_total", reason="stopped", **model) == 1
    assert value(series, "mds_sequences", **model) == 0


class _started:
    def __init__(self, runtime: mds.Runtime) -> None:
        self.runtime = runtime

    def __enter__(self) -> None:
        self.runtime.start_sync(load="wait")

    def __exit__(self, *exc: object) -> None:
        self.runtime.stop_sync()


@pytest.mark.parametrize("kind", ["fastapi", "flask"])
def test_the_adapters_serve_metrics_in_both_formats(kind: str) -> None:
    framework = pytest.importorskip(kind)
    if kind == "fastapi":
        pytest.importorskip("uvicorn")
    runtime = mds.Runtime()
    runtime.add_model("plain", Plain)
    adapter = importlib.import_module(f"mds.{kind}")
    if kind == "fastapi":
        app: Any = framework.FastAPI()
        adapter.add_routes(app, runtime, metrics=True, prefix="/ml")
    else:
        app = framework.Flask(__name__)
        adapter.add_routes(app, runtime, metrics=True, prefix="/ml", load="wait")
    with running(kind, app, runtime) as served:
        _wait_ready(served.client, "/ml")
        assert served.client.post("/ml/models/plain/infer", json=5).json() == 5
        reply = served.client.get("/ml/metrics")
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
        series = parse(reply.text)
        model = {"model": "plain", "version": "1"}
        assert value(series, "mds_requests_total", outcome="success", **model) == 1
        open_metrics = served.client.get(
            "/ml/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
        assert open_metrics.text.endswith("# EOF\n")
        # Only GET (and HEAD): mds's own 405.
        assert served.client.post("/ml/metrics").status_code == 405


def test_a_registry_of_the_users_is_served_as_it_is() -> None:
    fastapi = pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    adapter = importlib.import_module("mds.fastapi")

    runtime = mds.Runtime()
    runtime.add_model("plain", Plain)
    registry = prometheus_client.CollectorRegistry()
    registry.register(mds.prometheus.Collector(runtime))
    own = prometheus_client.Counter("orders", "Orders taken.", registry=registry)
    own.inc(3)
    app = fastapi.FastAPI()
    adapter.add_routes(app, runtime, metrics=registry, load="wait")
    with TestClient(app) as client:
        client.post("/models/plain/infer", json=1)
        series = parse(client.get("/metrics").text)
    assert value(series, "orders_total") == 3
    assert value(series, "mds_requests_total", model="plain", version="1", outcome="success") == 1


def test_no_metrics_route_unless_asked() -> None:
    fastapi = pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    adapter = importlib.import_module("mds.fastapi")

    runtime = mds.Runtime()
    runtime.add_model("plain", Plain)
    app = fastapi.FastAPI()
    adapter.add_routes(app, runtime)
    with TestClient(app) as client:
        assert client.get("/metrics").status_code == 404


def test_metrics_takes_a_registry_or_true() -> None:
    fastapi = pytest.importorskip("fastapi")
    adapter = importlib.import_module("mds.fastapi")
    with pytest.raises(TypeError, match="metrics= takes True or a prometheus_client"):
        adapter.add_routes(fastapi.FastAPI(), mds.Runtime(), metrics="yes")


# -- several processes ---------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import sys
    import mds, mds.prometheus

    class Plain(mds.ModelHandler):
        def infer(self, batch):
            return list(batch)

    runtime = mds.Runtime()
    runtime.add_model("plain", Plain)
    collector = mds.prometheus.Collector(runtime, directory=sys.argv[1], interval=60)
    runtime.start_sync(load="wait")
    for x in range(int(sys.argv[2])):
        mds.serve_sync("plain", x)
    runtime.stop_sync()
    # No close(): the last write happens at exit, as in a worker that is stopped.
    """
)


def run_workers(directory: Path, *requests: int) -> None:
    """One worker process after another, each serving so many requests, then exiting."""
    for count in requests:
        done = subprocess.run(
            [sys.executable, "-c", _WORKER, str(directory), str(count)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr


def test_workers_that_exited_keep_their_counts_but_not_their_gauges(tmp_path: Path) -> None:
    run_workers(tmp_path, 3, 4)
    assert len(list(tmp_path.glob("mds-*.json"))) == 2  # one file per worker
    runtime = mds.Runtime()
    runtime.add_model("plain", Plain)
    collector = mds.prometheus.Collector(runtime, directory=tmp_path, interval=60)
    runtime.start_sync(load="wait")
    try:
        mds.serve_sync("plain", 1)
        series = scrape(collector)
    finally:
        runtime.stop_sync()
        collector.close()
    model = {"model": "plain", "version": "1"}
    assert value(series, "mds_requests_total", outcome="success", **model) == 3 + 4 + 1
    assert value(series, "mds_request_duration_seconds_count", **model) == 8
    # Gauges: this process only (the others exited).
    assert value(series, "mds_model_state", state="ready", **model) == 1
    assert value(series, "mds_model_state", state="stopped", **model) == 0


def test_exited_workers_are_folded_into_one_file_and_still_count(tmp_path: Path) -> None:
    run_workers(tmp_path, 1, 2, 3)
    runtime = mds.Runtime()
    runtime.add_model("plain", Plain)
    collector = mds.prometheus.Collector(runtime, directory=tmp_path, interval=60)
    runtime.start_sync(load="wait")
    try:
        first = scrape(collector)
        files = sorted(path.name for path in tmp_path.glob("mds-*.json"))
        run_workers(tmp_path, 4)
        second = scrape(collector)
    finally:
        runtime.stop_sync()
        collector.close()
    model = {"model": "plain", "version": "1"}
    assert value(first, "mds_requests_total", outcome="success", **model) == 6
    assert len(files) == 2 and "mds-exited.json" in files  # this process's, and the folded
    assert value(second, "mds_requests_total", outcome="success", **model) == 10
    assert value(second, "mds_request_duration_seconds_count", **model) == 10


def test_a_fold_cut_short_never_counts_a_worker_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mds._metrics import shared

    run_workers(tmp_path, 3, 4)
    runtime = mds.Runtime()
    runtime.add_model("plain", Plain)
    collector = mds.prometheus.Collector(runtime, directory=tmp_path, interval=60)
    model = {"model": "plain", "version": "1"}
    try:
        # As if the scraping process died after writing the folded file: the
        # exited workers' own files are left behind.
        with monkeypatch.context() as patched:
            patched.setattr(shared, "_remove", lambda path: None)
            first = scrape(collector)
        assert len(list(tmp_path.glob("mds-*.json"))) == 3
        second = scrape(collector)
    finally:
        collector.close()
    assert value(first, "mds_requests_total", outcome="success", **model) == 7
    assert value(second, "mds_requests_total", outcome="success", **model) == 7
    assert sorted(p.name for p in tmp_path.glob("mds-*.json")) == ["mds-exited.json"]


_PRELOAD = textwrap.dedent(
    """
    import os, sys
    import mds, mds.prometheus

    class Plain(mds.ModelHandler):
        def infer(self, batch):
            return list(batch)

    # As gunicorn --preload: the app (runtime and collector) is made in the
    # master, which forks the workers; only the workers start the runtime.
    runtime = mds.Runtime()
    runtime.add_model("plain", Plain)
    collector = mds.prometheus.Collector(runtime, directory=sys.argv[1], interval=0.05)
    pid = os.fork()
    if pid == 0:
        runtime.start_sync(load="wait")
        for x in range(3):
            mds.serve_sync("plain", x)
        runtime.stop_sync()
        sys.exit(0)
    os.waitpid(pid, 0)
    import pathlib, time
    time.sleep(0.2)  # the master's writer had time to write, if it would
    files = pathlib.Path(sys.argv[1]).glob("mds-*.json")
    print(sorted(path.name.split("-")[1] for path in files))
    print(os.getpid(), pid)
    """
)


def test_a_preloading_master_writes_nothing_its_forked_worker_does(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PRELOAD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    written, pids = done.stdout.strip().splitlines()
    master, worker = pids.split()
    assert written == f"['{worker}']", (written, master)


def test_a_reloaded_or_unloaded_version_keeps_its_counts() -> None:
    runtime = mds.Runtime()
    runtime.add_model("plain", Plain, version="1", policy=mds.VersionPolicy(all=True))
    collector = mds.prometheus.Collector(runtime)
    runtime.start_sync(load="wait")
    try:
        for x in range(3):
            mds.serve_sync("plain", x)
        model = {"model": "plain", "version": "1"}
        assert value(scrape(collector), "mds_requests_total", outcome="success", **model) == 3
        for x in range(4):  # after the scrape, before the reload: counted too
            mds.serve_sync("plain", x)
        runtime.load_model_sync("plain", Plain, version="1")  # a reload counts afresh
        for x in range(2):
            mds.serve_sync("plain", x)
        assert runtime.statistics()["plain"].completed == 2
        series = scrape(collector)
        assert value(series, "mds_requests_total", outcome="success", **model) == 9
        assert value(series, "mds_request_duration_seconds_count", **model) == 9
        runtime.load_model_sync("plain", Plain, version="2")
        runtime.unload_model_sync("plain", "1")
        mds.serve_sync("plain", 0)
        series = scrape(collector)
        # Version 1's series stays, with what it counted; gauges go with it.
        assert value(series, "mds_requests_total", outcome="success", **model) == 9
        assert ("mds_queue_depth", frozenset(model.items())) not in series
        two = {"model": "plain", "version": "2"}
        assert value(series, "mds_requests_total", outcome="success", **two) == 1
    finally:
        runtime.stop_sync()


class Unloadable(mds.ModelHandler[Any, Any]):
    def init(self, context: mds.ModelContext) -> None:
        raise OSError("no weights")

    def infer(self, batch: Sequence[Any]) -> list[Any]:
        return list(batch)


def test_a_failed_load_is_counted_and_the_old_version_serves_on() -> None:
    runtime = mds.Runtime()
    runtime.add_model("plain", Plain)
    collector = mds.prometheus.Collector(runtime)
    runtime.start_sync(load="wait")
    try:
        for _ in range(2):
            with pytest.raises(mds.LifecycleError):
                runtime.load_model_sync("plain", Unloadable, version="2")
        assert mds.serve_sync("plain", 3) == 3
        runtime.load_model_sync("plain", Plain, version="2")  # then it loads
        series = scrape(collector)
    finally:
        runtime.stop_sync()
    # Counted by the model, not by a version's object: a later good load keeps the count.
    assert value(series, "mds_model_load_failures_total", model="plain", version="2") == 2


def test_many_reloads_keep_every_count_and_fold_what_they_keep() -> None:
    runtime = mds.Runtime()
    runtime.add_model("plain", Plain)
    collector = mds.prometheus.Collector(runtime)
    runtime.start_sync(load="wait")
    try:
        for _ in range(12):
            for x in range(3):
                mds.serve_sync("plain", x)
            runtime.load_model_sync("plain", Plain, version="1")
        series = scrape(collector)
        frozen, live = runtime.versions("plain")._retired["1"]
    finally:
        runtime.stop_sync()
    model = {"model": "plain", "version": "1"}
    assert value(series, "mds_requests_total", outcome="success", **model) == 36
    assert value(series, "mds_batch_size_sum", **model) == 36
    assert frozen is not None and len(live) <= 4  # the idle ones folded into one


def test_a_namespace_must_start_a_metric_name() -> None:
    with pytest.raises(mds.ConfigError, match="is not a metric name prefix"):
        mds.prometheus.Collector(mds.Runtime(), namespace="my-app")


@pytest.mark.slow
def test_uvicorn_workers_add_up(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    port = free_port()
    shared = tmp_path / "metrics"
    log = tmp_path / "uvicorn.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn", "--factory", "worker_app:make",
                "--app-dir", str(HERE), "--workers", "2", "--port", str(port),
                "--log-level", "warning",
            ],
            env={**os.environ, "MDS_TEST_METRICS_DIR": str(shared)},
            stdout=output,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        pids: set[int] = set()
        sent = 0
        # A fresh connection each time, so that both workers take some.
        while len(pids) < 2 or sent < 20:
            assert time.monotonic() < deadline, f"only workers {pids} answered"
            assert server.poll() is None, log.read_text()
            try:
                reply = httpx.post(f"{url}/models/pid/infer", json=0, timeout=10)
            except httpx.TransportError:
                time.sleep(0.1)  # still starting
                continue
            if reply.status_code == 503:  # loading
                time.sleep(0.05)
                continue
            assert reply.status_code == 200, reply.text
            pids.add(reply.json())
            sent += 1
        time.sleep(0.5)  # every worker has written since (interval=0.1)
        for _ in range(4):  # whichever worker answers the scrape
            series = parse(httpx.get(f"{url}/metrics", timeout=10).text)
            model = {"model": "pid", "version": "1"}
            assert value(series, "mds_requests_total", outcome="success", **model) == sent
            assert value(series, "mds_request_duration_seconds_count", **model) == sent
            assert value(series, "mds_model_state", state="ready", **model) == 2
            assert value(series, "mds_instances", device="cpu", **model) == 2
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    # Stopped workers leave their final counts behind.
    files = sorted(shared.glob("mds-*.json"))
    assert len(files) == 2


def _wait_ready(client: httpx.Client, prefix: str) -> None:
    deadline = time.monotonic() + 30
    while client.get(f"{prefix}/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "the models never got ready"
        time.sleep(0.02)


# -- histograms ------------------------------------------------------------------

durations = st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=60)


@given(durations, st.integers(min_value=1, max_value=4), st.randoms())
def test_histograms_of_parts_add_up_to_the_whole(
    values: list[float], parts: int, random: Any
) -> None:
    whole = Buckets()
    pieces = [Buckets() for _ in range(parts)]
    for x in values:
        whole.observe(x)
        random.choice(pieces).observe(x)
    total = pieces[0].snapshot()
    for piece in pieces[1:]:
        total = total + piece.snapshot()
    expected = whole.snapshot()
    assert total.counts == expected.counts
    assert total.sum == pytest.approx(expected.sum)
    assert (total - pieces[0].snapshot()).count == len(values) - sum(pieces[0].counts)


@given(durations.filter(bool), st.floats(0, 1), st.floats(0, 1))
def test_quantiles_grow_with_q_and_stay_in_the_observed_buckets(
    values: list[float], q: float, r: float
) -> None:
    buckets = Buckets()
    for x in values:
        buckets.observe(x)
    histogram = buckets.snapshot()
    low, high = sorted((q, r))
    assert histogram.quantile(low) <= histogram.quantile(high)
    # Never above the bound of the highest bucket observed (or the last bound).
    top = min((b for b in SECONDS if b >= max(values)), default=SECONDS[-1])
    assert 0 <= histogram.quantile(high) <= top
