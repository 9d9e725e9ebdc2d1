"""``mds serve``: the standalone server, started as users start it, driven by real clients."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import mds
import mds.server

from .servers import free_port, wait_until_ready

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "model_repository"

SLOW_HANDLER = '''
import time

import mds


class Slow(mds.ModelHandler):
    """Answers each number doubled, a second after it was asked."""

    def __init__(self, path):
        self.path = path

    def infer(self, batch):
        time.sleep(1.0)
        return [2 * x for x in batch]
'''


@contextmanager
def serving(
    *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``mds serve *args`` as its own process on a free port; its URL and the process."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mds", "serve", *args, "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, "mds serve")
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        if process.stdout is not None and not process.stdout.closed:
            try:
                process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()


HTTP_SERVERS = pytest.mark.parametrize("http_server", ["granian", "uvicorn"])


@HTTP_SERVERS
def test_the_example_repository_over_http_and_grpc(http_server: str) -> None:
    pytest.importorskip(http_server)
    http_client = pytest.importorskip("tritonclient.http")
    grpc_client = pytest.importorskip("tritonclient.grpc")
    grpc_port = free_port()
    with serving(str(EXAMPLE), "--grpc-port", str(grpc_port), "--http-server", http_server) as (
        url,
        _,
    ):
        answer = httpx.post(f"{url}/models/churn/infer", json=[1, 2, 3, 4])
        assert answer.json() == {"risk": 0.9955, "version": "2"}
        piped = httpx.post(f"{url}/models/churn-alert/infer", json=[1, 2, 3, 4])
        assert piped.json() == {"risk": 0.9955, "version": "2", "alert": True}  # a pipeline
        older = httpx.post(f"{url}/models/churn/versions/1/infer", json=[1, 2, 3, 4])
        assert older.json()["version"] == "1"
        bad = httpx.post(f"{url}/models/churn/infer", json=[1, 2])
        assert bad.status_code == 400 and "expected 4 features" in bad.json()["error"]
        assert httpx.get(f"{url}/models/churn/infer").status_code == 405
        assert httpx.get(f"{url}/nowhere").status_code == 404
        assert httpx.post(f"{url}/models/nope/infer", json=[1]).status_code == 404
        features = np.asarray([[1, 2, 3, 4], [0, 0, 0, 0]], np.float32)
        client = http_client.InferenceServerClient(url.removeprefix("http://"))
        given = http_client.InferInput("features", [2, 4], "FP32")
        given.set_data_from_numpy(features)
        risk = client.infer("churn", [given]).as_numpy("risk")
        assert np.allclose(risk, [0.9955, 0.475], atol=1e-4)
        assert client.is_server_ready()
        remote = grpc_client.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        given = grpc_client.InferInput("features", [2, 4], "FP32")
        given.set_data_from_numpy(features)
        assert np.allclose(remote.infer("churn", [given]).as_numpy("risk"), risk)
        remote.close()
        assert client.get_inference_statistics("churn")["model_stats"]  # /v2/models/churn/stats
        assert httpx.get(f"{url}/v2/models/stats").status_code == 200
        assert httpx.get(f"{url}/health/live/").status_code == 200  # a trailing slash
        metrics = httpx.get(f"{url}/metrics").text
        assert 'mds_requests_total{model="churn",outcome="success",version="2"}' in metrics


def serve_once(*args: str) -> subprocess.CompletedProcess[str]:
    """``mds serve *args`` run to its end (a refusal, here)."""
    command = [sys.executable, "-m", "mds", "serve", *args]
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def slow_repository(root: Path) -> Path:
    model = root / "slow"
    (model / "1").mkdir(parents=True)
    (model / "mds.yaml").write_text(
        "handler: handler.py\nconfig:\n  batching: {max_batch_size: 8, max_queue_delay: 0.05}\n"
    )
    (model / "1" / "handler.py").write_text(textwrap.dedent(SLOW_HANDLER))
    return root


@HTTP_SERVERS
def test_sigterm_lets_the_requests_in_flight_finish(tmp_path: Path, http_server: str) -> None:
    pytest.importorskip(http_server)
    repository = slow_repository(tmp_path / "models")
    flags = ("--drain-timeout", "20", "--http-server", http_server)
    with serving(str(repository), *flags) as (url, process):

        def ask(x: int) -> tuple[int, Any]:
            answer = httpx.post(f"{url}/models/slow/infer", json=x, timeout=30)
            return answer.status_code, answer.json()

        with ThreadPoolExecutor(6) as pool:
            asked = [pool.submit(ask, x) for x in range(6)]
            time.sleep(0.4)  # in flight: the batch computes for a second
            process.send_signal(signal.SIGTERM)
            answers = [future.result() for future in asked]
        output = process.communicate(timeout=30)[0]
    assert answers == [(200, 2 * x) for x in range(6)]
    assert process.returncode == 0, output


def test_a_bad_repository_is_refused_naming_the_file_and_the_field(tmp_path: Path) -> None:
    pytest.importorskip("uvicorn", reason="mds serve needs its server extra")
    model = tmp_path / "models" / "broken"
    (model / "1").mkdir(parents=True)
    (model / "1" / "handler.py").write_text(textwrap.dedent(SLOW_HANDLER))
    (model / "mds.yaml").write_text(
        "handler: handler.py\nconfig:\n  batching: {max_batch_size: 0}\n"
    )
    done = serve_once(str(tmp_path / "models"), "--port", "0")
    assert done.returncode == 1
    assert "mds.yaml" in done.stderr and "max_batch_size" in done.stderr, done.stderr
    shutil.rmtree(model)
    (tmp_path / "models" / "pipelines").mkdir()
    (tmp_path / "models" / "pipelines" / "bad.yaml").write_text(
        "pipeline:\n  name: bad\n  nodes:\n  - name: x\n    model: nowhere\n"
    )
    piped = serve_once(str(tmp_path / "models"), "--port", "0")
    assert piped.returncode == 1 and "nowhere" in piped.stderr, piped.stderr
    missing = serve_once(str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "nowhere" in missing.stderr


@HTTP_SERVERS
def test_a_model_that_fails_to_load_under_load_wait_stops_every_worker(
    tmp_path: Path, http_server: str
) -> None:
    pytest.importorskip(http_server, reason="mds serve needs its server extra")
    model = tmp_path / "models" / "broken"
    (model / "1").mkdir(parents=True)
    (model / "1" / "handler.py").write_text(
        textwrap.dedent(SLOW_HANDLER).replace("self.path = path", "raise OSError('no weights')")
    )
    (model / "mds.yaml").write_text("handler: handler.py\n")
    for workers in ("1", "2"):
        flags = ["--load", "wait", "--workers", workers, "--http-server", http_server]
        done = serve_once(str(tmp_path / "models"), "--port", str(free_port()), *flags)
        assert done.returncode != 0, (workers, done.stderr)
        assert "no weights" in done.stderr, done.stderr


@HTTP_SERVERS
def test_several_workers_answer_and_their_metrics_add_up(http_server: str) -> None:
    pytest.importorskip(http_server)
    pytest.importorskip("prometheus_client")
    # Readiness adds up: 200 from any worker once every worker is ready (loading in the background).
    settings = {"MDS_SERVE_WORKERS": "2", "MDS_SERVE_HTTP_SERVER": http_server}
    with serving(str(EXAMPLE), env=settings) as (url, _):
        for _ in range(20):
            assert httpx.post(f"{url}/models/churn/infer", json=[0, 0, 0, 0]).status_code == 200
        series = 'mds_requests_total{model="churn",outcome="success",version="2"} '
        deadline = time.monotonic() + 20
        while True:  # each worker writes its counts about once a second
            found = [
                line
                for line in httpx.get(f"{url}/metrics").text.splitlines()
                if line.startswith(series)
            ]
            if found and float(found[0].split()[-1]) == 20:
                break
            assert time.monotonic() < deadline, found
            time.sleep(0.2)


def test_settings_come_from_the_file_then_the_environment_then_the_flags(tmp_path: Path) -> None:
    settings = tmp_path / "serve.yaml"
    settings.write_text("repository: models/\nport: 9000\nworkers: 3\nmetrics: false\n")
    environ = {"MDS_SERVE_PORT": "9100", "MDS_SERVE_WATCH": "5", "HOME": "/root"}
    config = mds.server.load_config(
        {"port": 9200, "repository": None}, file=settings, environ=environ
    )
    assert (config.repository, config.port, config.workers) == ("models/", 9200, 3)
    assert (config.metrics, config.watch) == (False, 5.0)
    config = mds.server.load_config({}, file=settings, environ=environ)
    assert config.port == 9100
    with pytest.raises(mds.ConfigError, match="MDS_SERVE_PROT: no such setting"):
        mds.server.load_config({"repository": "m"}, environ={"MDS_SERVE_PROT": "1"})
    with pytest.raises(mds.ConfigError, match=r"serve\.yaml.*workers"):
        settings.write_text("workers: many\n")
        mds.server.load_config({"repository": "m"}, file=settings, environ={})
    with pytest.raises(mds.ConfigError, match=r"flag --port: .*port"):
        mds.server.load_config({"repository": "m", "port": "eighty"}, environ={})
    with pytest.raises(mds.ConfigError, match="environment variable MDS_SERVE_PORT: "):
        mds.server.load_config({"repository": "m"}, environ={"MDS_SERVE_PORT": "abc"})
    words = {"MDS_SERVE_METRICS": "off", "MDS_SERVE_STATUS_PAGE": "yes", "MDS_SERVE_PREFIX": ""}
    config = mds.server.load_config({"repository": "m"}, environ=words)
    assert (config.metrics, config.status_page, config.prefix) == (False, True, "")
    with pytest.raises(mds.ConfigError, match="drain_timeout"):
        mds.server.load_config({"repository": "m", "drain_timeout": "inf"}, environ={})
    config = mds.server.load_config(
        {"repository": str(EXAMPLE), "workers": 2, "repository_routes": True}, environ={}
    )
    with pytest.raises(mds.ConfigError, match="repository_routes with several workers"):
        mds.server.run(config)
    with pytest.raises(mds.ConfigError, match="no model repository"):
        mds.server.load_config({}, environ={})


class Doubler(mds.ModelHandler[float, float]):
    def infer(self, batch: list[float]) -> list[float]:
        return [2 * x for x in batch]


def test_the_lean_app_mounted_in_a_fastapi_app() -> None:
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    import mds.fastapi

    runtime = mds.Runtime()
    runtime.add_model("double", Doubler)
    host = fastapi.FastAPI(lifespan=mds.fastapi.lifespan(runtime, load="wait"))
    host.mount("/fast", mds.server.app(runtime))

    @host.get("/own")
    def own() -> dict[str, str]:
        return {"mine": "yes"}

    with TestClient(host) as client:
        assert client.post("/fast/models/double/infer", json=2.5).json() == 5.0
        assert client.get("/fast/health/ready").status_code == 200
        assert client.get("/own").json() == {"mine": "yes"}
        assert client.get("/fast/v2/models/double/ready").status_code == 200
        assert client.get("/fast/nowhere").status_code == 404
    assert not runtime.running


def test_the_lean_app_routes_right_past_the_paths_it_remembers() -> None:
    """Paths matched once are remembered (a bounded number): old, new and unknown ones alike."""
    TestClient = pytest.importorskip("starlette.testclient").TestClient

    runtime = mds.Runtime()
    runtime.add_model("double", Doubler)
    runtime.add_model("also", Doubler)
    with TestClient(mds.server.app(runtime, load="wait")) as client:
        for _ in range(2):  # the second round reads the remembered matches
            assert client.post("/models/double/infer", json=1.5).json() == 3.0
            assert client.post("/v2/models/also/ready").status_code == 405
            assert client.get("/v2/models/also/versions/1/ready").status_code == 200
            assert client.get("/v2/models/also/versions/7/ready").status_code == 404
            assert client.get("/models/double/infer/").status_code == 405
        for i in range(1100):  # past what is remembered: forgotten, still routed
            reply = client.post(f"/models/m{i}/infer", json=1.0)
            assert reply.status_code == 404 and f"'m{i}'" in reply.json()["error"]
        assert client.post("/models/also/infer", json=4.0).json() == 8.0
        assert client.post("/models/double/infer", json=-1.0).json() == -2.0
        long = "n" * 300  # too long to remember: matched each time
        for _ in range(2):
            assert client.post(f"/models/{long}/infer", json=1.0).status_code == 404


async def test_the_lean_app_refuses_websockets_and_reports_a_failed_start() -> None:
    runtime = mds.Runtime()
    runtime.add_model("double", Doubler)
    served = mds.server.app(runtime, prefix="ml")  # no leading slash: taken as "/ml"
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def connect() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    await served({"type": "websocket", "path": "/ml/ws"}, connect, send)
    assert sent == [{"type": "websocket.close", "code": 1008}]

    class Broken(Doubler):
        def init(self, context: mds.ModelContext) -> None:
            raise OSError("no weights at /nowhere")

    failing = mds.Runtime()
    failing.add_model("broken", Broken)
    messages = iter([{"type": "lifespan.startup"}])

    async def lifespan_receive() -> dict[str, Any]:
        return next(messages)

    sent.clear()
    await mds.server.app(failing, load="wait")({"type": "lifespan"}, lifespan_receive, send)
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert "no weights at /nowhere" in sent[0]["message"]


@pytest.fixture
def example_repository(tmp_path: Path) -> tuple[mds.Runtime, mds.ModelRepository]:
    """The example repository, copied, added to a new runtime."""
    shutil.copytree(EXAMPLE, tmp_path / "models")
    repository = mds.ModelRepository(tmp_path / "models")
    runtime = mds.Runtime()
    repository.add_to(runtime)
    return runtime, repository


def test_the_lean_apps_repository_routes_keep_to_the_body_limit(
    example_repository: tuple[mds.Runtime, mds.ModelRepository],
) -> None:
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    runtime, repository = example_repository
    served = mds.server.app(runtime, load="wait", repository=repository, max_body_bytes=64)
    with TestClient(served) as client:
        assert client.post("/v2/repository/index", json={}).status_code == 200
        padding = {"parameters": {"note": "x" * 100}}
        for route in ("/v2/repository/index", "/v2/repository/models/churn/unload"):
            refused = client.post(route, json=padding)
            assert refused.status_code == 400, route
            assert "max_body_bytes" in refused.json()["error"]

            def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
                yield b'{"parameters": {"note": "'
                yield b"x" * 100
                yield b'"}}'

            streamed = client.post(route, content=chunks())
            assert streamed.status_code == 400 and "max_body_bytes" in streamed.json()["error"]
        assert client.post("/v2/repository/models/churn/unload", json={}).status_code == 200


async def test_a_repository_call_whose_client_left_before_its_body_does_nothing(
    example_repository: tuple[mds.Runtime, mds.ModelRepository],
) -> None:
    runtime, repository = example_repository
    served = mds.server.app(runtime, repository=repository)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def gone() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v2/repository/models/churn/unload",
        "headers": [(b"content-length", b"2")],
        "query_string": b"",
    }
    async with runtime.run(load="wait"):
        await served(scope, gone, send)
        assert sent == []  # no one to answer
        assert runtime.model("churn").ready  # and not unloaded
