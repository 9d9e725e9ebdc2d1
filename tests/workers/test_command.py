"""``mds worker``: a worker file, a handler, real SQS and S3 (moto's server); SIGTERM drains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import Aws, free_port
from .test_sqs import counts, eventually, received_all, send

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent.parent

WORKER_FILE = """\
source:
  sqs: ${QUEUE}
  dead_letters: ${DEAD}
sink:
  sqs: ${RESULTS}
endpoint_url: ${ENDPOINT}
region: us-east-1
max_in_flight: 16
visibility: 10
heartbeat: 2
wait: 1
"""


def test_the_command_serves_and_drains_on_sigterm(aws: Aws, tmp_path: Path) -> None:
    queue, dead, results = aws.queue("in"), aws.queue("dead"), aws.queue("out")
    (tmp_path / "worker.yaml").write_text(WORKER_FILE)
    (tmp_path / "model.yaml").write_text("batching:\n  max_batch_size: 8\n")
    ids = send(aws, queue, [json.dumps({"x": [i, 0, 0, 0]}) for i in range(20)] + ["{"])
    health_port = free_port()
    env = {
        **os.environ,
        "QUEUE": queue,
        "DEAD": dead,
        "RESULTS": results,
        "ENDPOINT": aws.url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "PYTHONPATH": str(ROOT),
    }
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "mds", "worker", "tests.workers.models:Scorer"),
            *("worker.yaml", "--config", "model.yaml", "--name", "scorer"),
            *("--health-port", str(health_port)),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        eventually(lambda: counts(aws, results)[0] == 20, "twenty results", seconds=60)
        base = f"http://127.0.0.1:{health_port}"
        ready = httpx.get(f"{base}/health/ready", timeout=10)
        assert ready.status_code == 200 and ready.json()["state"] in ("receiving", "full")
        assert httpx.get(f"{base}/health/live", timeout=10).json()["live"] is True
        statistics = httpx.get(f"{base}/statistics", timeout=10).json()
        assert statistics["worker"]["completed"] >= 20
        assert statistics["worker"]["throughput"] > 0
        assert statistics["models"]["scorer"]["completed"] >= 20
        # Some more while it runs, then SIGTERM: it drains and exits 0.
        send(aws, queue, [json.dumps({"x": [1, 1, 1, 1], "sleep": 0.5}) for _ in range(4)])
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "mds worker: stopped;" in out
    assert counts(aws, queue)[1] == 0  # nothing left invisible
    answered = {
        json.loads(m["Body"])["id"]: json.loads(m["Body"])["result"]
        for m in received_all(aws, results)
    }
    assert {ids[i]: float(i) for i in range(20)}.items() <= answered.items()
    (letter,) = received_all(aws, dead)
    assert letter["Body"] == "{"


def test_a_bad_worker_file_says_what_is_wrong(tmp_path: Path) -> None:
    (tmp_path / "worker.yaml").write_text("source:\n  sqs: ${NOT_SET_ANYWHERE}\nsink: {}\n")
    done = subprocess.run(
        [sys.executable, "-m", "mds", "worker", "tests.workers.models:Scorer", "worker.yaml"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "${NOT_SET_ANYWHERE} is not set in the environment" in done.stderr
    (tmp_path / "worker.yaml").write_text("source:\n  sqs: q\nsink:\n  sqs: r\nmax_in_flihgt: 3\n")
    done = subprocess.run(
        [sys.executable, "-m", "mds", "worker", "tests.workers.models:Scorer", "worker.yaml"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "max_in_flihgt" in done.stderr
