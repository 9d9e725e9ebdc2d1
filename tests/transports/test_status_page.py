"""The status page: the JSON it reads, and the page itself in a real headless Chromium.

The browser tests drive Debian's Chromium with Playwright (never Playwright's
own browsers). With ``MDS_STATUS_SCREENSHOT=path`` set, the browser test also
sends steady traffic for a few seconds and saves a screenshot of the page
there: that is how docs/images/status-page.png is made::

    MDS_STATUS_SCREENSHOT=docs/images/status-page.png \\
        pytest tests/transports/test_status_page.py -k browser
"""

from __future__ import annotations

import importlib.util
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import msgspec
import pytest

import mds
import mds.fastapi
import mds.flask
from mds._http.status_page import PAGE, data

from ..servers import Served, running

CHROMIUM = "/usr/bin/chromium"
#: Without the background-networking flags Chromium waits on a closed network.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Classifier(mds.ModelHandler[dict[str, Any], dict[str, Any]]):
    """Labels a request after a short pause that grows with the batch, as a real model would."""

    def infer(self, batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        time.sleep(0.002 + 0.0004 * len(batch))
        return [{"label": "cat" if len(str(item)) % 2 else "dog"} for item in batch]


class Embedder(mds.ModelHandler[Any, list[float]]):
    def infer(self, batch: Sequence[Any]) -> list[list[float]]:
        time.sleep(0.004)
        return [[float(len(str(item))), 1.0] for item in batch]


class Missing(mds.ModelHandler[Any, Any]):
    def init(self, context: mds.ModelContext) -> None:
        raise OSError("no weights at /models/translator/3/model.onnx")

    def infer(self, batch: Sequence[Any]) -> list[Any]:
        return list(batch)


def features(request: dict[str, Any]) -> dict[str, Any]:
    return {"text": request.get("text", ""), "pixels": request.get("pixels", 0)}


def keywords(value: dict[str, Any]) -> list[str]:
    return str(value["text"]).split()[:3]


def decide(output: Any, request: dict[str, Any]) -> dict[str, Any]:
    return {"kind": request["kind"], "output": output}


def make_runtime() -> mds.Runtime:
    """A realistic runtime: a model with a canary, one on demand, one failed; a routed pipeline."""
    runtime = mds.Runtime(fail_fast=False)
    batched = mds.ModelConfig(
        instances=2, batching=mds.BatchingConfig(max_batch_size=8, max_queue_delay=0.003)
    )
    every = mds.VersionPolicy(all=True)
    runtime.add_model("classifier", Classifier, batched, version="1", policy=every)
    runtime.add_model("classifier", Classifier, batched, version="2", policy=every)
    runtime.add_model("embedder", Embedder, on_demand=True)
    runtime.add_model("translator", Missing)
    runtime.add_pipeline(
        mds.Pipeline(
            "triage",
            [
                mds.Node.function("features", features),
                mds.Node.router(
                    "route",
                    "request.kind",
                    {"text": "ensemble", "image": "classify"},
                    default="classify",
                ),
                mds.Node.fan_out("ensemble", ["embed", "keywords"], next="decide"),
                mds.Node.model("embed", model="embedder"),
                mds.Node.function("keywords", keywords),
                mds.Node.model("classify", model="classifier"),
                mds.Node.function("decide", decide),
            ],
        )
    )
    return runtime


def status_app(runtime: mds.Runtime) -> Any:
    """mds's FastAPI routes with the status page, under ``/ml``."""
    from fastapi import FastAPI

    app = FastAPI()
    mds.fastapi.add_routes(app, runtime, prefix="/ml", status_page=True)
    return app


@contextmanager
def serving() -> Iterator[Served]:
    """The realistic runtime on uvicorn, loaded, with a canary taking a tenth of the traffic."""
    runtime = make_runtime()
    with running("fastapi", status_app(runtime), runtime) as served:
        deadline = time.monotonic() + 30
        while not (runtime.model("classifier").ready and runtime.model("translator").failure):
            assert time.monotonic() < deadline, f"never loaded: {runtime.index()}"
            time.sleep(0.02)
        runtime.set_traffic_sync("classifier", {"1": 90, "2": 10})
        yield served


def send(served: Served, count: int, *, clients: int = 8) -> None:
    """``count`` requests from ``clients`` callers at once: images, texts, and the model alone."""

    def one(index: int) -> None:
        if index % 4 == 3:
            reply = served.client.post("/ml/models/classifier/infer", json={"pixels": index})
        else:
            kind = "text" if index % 4 == 0 else "image"
            body = {"kind": kind, "text": f"request number {index}", "pixels": index}
            reply = served.client.post("/ml/models/triage/infer", json=body)
        assert reply.status_code == 200, reply.text

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(count)))


# -- the JSON --------------------------------------------------------------------------


def test_the_data_describes_every_model_version_and_pipeline_graph() -> None:
    runtime = make_runtime()
    runtime.start_sync(load="background")
    try:
        deadline = time.monotonic() + 30
        while not (runtime.model("classifier").ready and runtime.model("translator").failure):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        runtime.set_traffic_sync("classifier", {"1": 90, "2": 10})
        for _ in range(5):
            runtime.serve_sync("triage", {"kind": "image", "pixels": 3})
        found = msgspec.json.decode(data(runtime))
    finally:
        runtime.stop_sync()
    assert found["running"] and found["process"] and found["clock"] > 0 and found["time"] > 0
    models = {m["name"]: m for m in found["models"]}
    assert sorted(models) == ["classifier", "embedder", "translator"]

    translator = models["translator"]
    assert (translator["state"], translator["ready"]) == ("failed", False)
    assert "no weights at /models/translator" in translator["reason"]
    assert translator["versions"][0]["counters"] is not None  # failed, but it exists

    classifier = models["classifier"]
    assert classifier["ready"] and classifier["reason"] is None
    assert classifier["pipelines"] == ["triage"]
    one, two = classifier["versions"]
    assert (one["version"], one["traffic"], two["version"], two["traffic"]) == ("1", 0.9, "2", 0.1)
    assert one["instances"] == 2 and one["devices"] == ["cpu", "cpu"]
    assert one["max_batch_size"] == 8 and one["queue_capacity"] > 0
    completed = one["counters"]["completed"] + two["counters"]["completed"]
    assert completed == 5
    batches = one["counters"]["batch_sizes"] | two["counters"]["batch_sizes"]
    assert sum(batches.values()) >= 1 and all(int(size) >= 1 for size in batches)
    request = one["counters"]["request"]
    assert len(request["counts"]) == len(request["bounds"]) + 1

    embedder = models["embedder"]["versions"][0]
    assert embedder["on_demand"] and models["embedder"]["ready"]

    (triage,) = found["pipelines"]
    assert (triage["name"], triage["state"], triage["ready"]) == ("triage", "ready", True)
    nodes = {n["id"]: n for n in triage["nodes"]}
    assert set(nodes) == {
        "(start)", "(end)", "(join)ensemble",
        "features", "route", "ensemble", "embed", "keywords", "classify", "decide",
    }  # fmt: skip
    assert nodes["classify"]["model"] == "classifier" and nodes["classify"]["state"] == "ready"
    assert nodes["route"]["kind"] == "router" and nodes["features"]["model"] is None
    edges = {(e["source"], e["target"], e["label"]) for e in triage["edges"]}
    # The edges `mds pipeline show` draws, labelled as it labels them.
    assert edges == {
        ("(start)", "features", ""),
        ("features", "route", ""),
        ("route", "ensemble", "text"),
        ("route", "classify", "image"),
        ("route", "classify", "default"),
        ("ensemble", "embed", ""),
        ("ensemble", "keywords", ""),
        ("embed", "(join)ensemble", ""),
        ("keywords", "(join)ensemble", ""),
        ("(join)ensemble", "decide", ""),
        ("classify", "decide", ""),
        ("decide", "(end)", ""),
    }
    assert triage["counters"]["completed"] == 5
    assert (nodes["route"]["calls"], nodes["ensemble"]["calls"], nodes["(end)"]["calls"]) == (
        5,
        0,
        None,
    )


def test_a_pipeline_with_a_failed_node_says_which_node_and_why() -> None:
    runtime = mds.Runtime(fail_fast=False)
    runtime.add_model("translator", Missing)
    runtime.add_pipeline(mds.Pipeline("translate", [mds.Node.model("run", model="translator")]))
    runtime.start_sync()
    try:
        found = msgspec.json.decode(data(runtime))
    finally:
        runtime.stop_sync()
    (pipeline,) = found["pipelines"]
    assert (pipeline["state"], pipeline["ready"]) == ("failed", False)
    assert "node 'run' (model 'translator') is failed" in pipeline["reason"]
    assert "no weights" in pipeline["reason"]


def test_the_data_of_a_runtime_not_started_lists_its_models() -> None:
    found = msgspec.json.decode(data(make_runtime()))
    assert not found["running"]
    states = {m["name"]: (m["state"], m["ready"]) for m in found["models"]}
    assert states["classifier"] == ("created", False)
    assert all(v["counters"] is not None for v in found["models"][0]["versions"])


def test_the_page_loads_nothing_from_elsewhere() -> None:
    text = PAGE.decode()
    assert text.startswith("<!doctype html>")
    # Every URL in it: the SVG namespace is a name, never fetched.
    urls = set(re.findall(r"\w+://[^\s\"'`)]+", text)) - {"http://www.w3.org/2000/svg"}
    assert not urls
    assert not re.search(r"<(link|script|img|iframe)[^>]*\b(src|href)=\"(?!data:)", text)
    assert "@import" not in text and "@font-face" not in text and "url(http" not in text
    assert "connect-src 'self'" in text  # and the page's own policy forbids it


# -- the page in a browser ----------------------------------------------------------------


@pytest.fixture
def browser() -> Iterator[Any]:
    pytest.importorskip("fastapi")  # the page is served by the FastAPI adapter on uvicorn
    pytest.importorskip("uvicorn")
    if not os.path.exists(CHROMIUM):
        pytest.skip("needs Debian's chromium: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs pip install playwright")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield launched
        finally:
            launched.close()


def open_page(browser: Any, served: Served) -> tuple[Any, dict[str, list[str]]]:
    """The status page, polled every quarter second; what it requested and logged as errors."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    seen: dict[str, list[str]] = {"requests": [], "errors": []}
    page.on("request", lambda request: seen["requests"].append(request.url))
    page.on("pageerror", lambda error: seen["errors"].append(str(error)))
    page.on(
        "console",
        lambda message: seen["errors"].append(message.text) if message.type == "error" else None,
    )
    page.goto(served.url + "/ml/status?interval=0.25")
    page.wait_for_selector('[data-model="classifier"] [data-k="completed"]')
    return page, seen


def completed(page: Any, model: str) -> int:
    text = page.inner_text(f'[data-model="{model}"] [data-k="completed"]')
    return int(text.split()[0].replace(",", ""))


@pytest.mark.slow
def test_the_page_in_a_browser_shows_everything_and_updates_in_place(browser: Any) -> None:
    with serving() as served:
        page, seen = open_page(browser, served)
        for model in ("classifier", "embedder", "translator"):
            assert page.is_visible(f'article[data-model="{model}"]')
        # A failed model shows its state and its reason.
        translator = page.locator('article[data-model="translator"]')
        assert translator.locator(".pill").first.inner_text() == "failed"
        assert "no weights at /models/translator/3/model.onnx" in translator.inner_text()
        # Both versions, and the share of traffic each takes.
        versions = page.locator('[data-model="classifier"] li[data-version]')
        assert versions.count() == 2
        assert "90%" in versions.nth(0).inner_text() and "10%" in versions.nth(1).inner_text()
        assert "2 instances on 2 \N{MULTIPLICATION SIGN} cpu" in versions.nth(0).inner_text()
        # The pipeline, drawn: every node and edge `pipeline show` draws, routes labelled.
        pipeline = page.locator('article[data-pipeline="triage"]')
        graph = msgspec.json.decode(served.client.get("/ml/status/data").content)["pipelines"][0]
        for node in graph["nodes"]:
            assert pipeline.locator(f'svg g[data-node="{node["id"]}"]').count() == 1
        # Routes to one node share an edge, labelled with each.
        pairs = {(edge["source"], edge["target"]) for edge in graph["edges"]}
        assert pipeline.locator("svg path.edge").count() == len(pairs)
        labels = pipeline.locator("svg .elabel text").all_text_contents()
        assert sorted(labels) == ["image, default", "text"]
        classify = pipeline.locator('svg g[data-node="classify"] [data-k="state"]')
        assert classify.text_content() == "ready"

        # Traffic: the same elements change, and the page was not reloaded.
        page.evaluate("window.stillTheSamePage = true")
        counter = page.query_selector('[data-model="classifier"] [data-k="completed"]')
        before = completed(page, "classifier")
        send(served, 40)
        expected = served.runtime.versions("classifier").runtimes
        total = sum(v.statistics().completed for v in expected.values())
        assert total > before
        page.wait_for_function(
            "([element, total]) => parseInt(element.textContent.replace(/,/g, '')) === total",
            arg=[counter, total],
        )
        assert counter.evaluate("element => element.isConnected")
        assert page.evaluate("window.stillTheSamePage") is True
        assert page.inner_text('[data-model="classifier"] [data-k="p50"]') != "—"
        assert page.locator('[data-model="classifier"] .bars span').count() == 8

        assert not seen["errors"], seen["errors"]
        # The server out of reach: a clear message, and the last data stays.
        page.route("**/status/data", lambda route: route.abort())
        page.wait_for_selector("#banner:not([hidden])")
        assert "Cannot reach the server" in page.inner_text("#banner")
        assert page.inner_text("#conn") == "offline"
        assert completed(page, "classifier") == total
        page.unroute("**/status/data")
        page.wait_for_selector("#banner[hidden]", state="attached")
        assert page.inner_text("#conn") == "live"
        # The browser logs each request it aborted; nothing else went wrong.
        assert set(seen["errors"]) <= {"Failed to load resource: net::ERR_FAILED"}
        seen["errors"].clear()

        # A narrow window: nothing sticks out sideways (the graph scrolls in its box).
        page.set_viewport_size({"width": 380, "height": 800})
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")

        screenshot = os.environ.get("MDS_STATUS_SCREENSHOT")
        if screenshot:
            take_screenshot(browser, served, screenshot)
        page.close()
    assert not seen["errors"], seen["errors"]
    aborted = served.url + "/ml/status/data"  # the requests aborted on purpose went nowhere else
    strangers = [u for u in seen["requests"] if not u.startswith(served.url + "/") and u != aborted]
    assert not strangers, strangers
    assert {u.split("?")[0] for u in seen["requests"]} == {
        served.url + "/ml/status",
        served.url + "/ml/status/data",
    }


def take_screenshot(browser: Any, served: Served, path: str) -> None:
    """Steady traffic for a few seconds, then the page as a 1280-pixel-wide window shows it."""
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            send(served, 16, clients=6)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
        page.emulate_media(color_scheme="light")
        page.goto(served.url + "/ml/status")  # refreshed every 2 s, as by default
        page.wait_for_timeout(7000)
        page.screenshot(path=path, full_page=True)
        page.close()
    finally:
        stop.set()
        worker.join(30)


@pytest.mark.slow
def test_both_adapters_serve_the_page_and_its_data() -> None:
    flask = pytest.importorskip("flask")
    runtime = make_runtime()
    app = flask.Flask(__name__)
    mds.flask.add_routes(app, runtime, status_page=True)
    with running("flask", app, runtime) as served:
        page = served.client.get("/status")
        assert page.status_code == 200 and page.content == PAGE
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        reply = served.client.get("/status/data")
        assert reply.headers["content-type"].startswith("application/json")
        assert {m["name"] for m in reply.json()["models"]} == {
            "classifier",
            "embedder",
            "translator",
        }
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        return  # the Flask side is checked; FastAPI's is where it is installed
    with serving() as served:
        page = httpx.get(served.url + "/ml/status")
        assert page.status_code == 200 and page.content == PAGE
        assert page.headers["content-type"] == "text/html; charset=utf-8"
