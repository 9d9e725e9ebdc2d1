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
    done = mds_worker(tmp_path, "source:\n  sqs: ${NOT_SET_ANYWHERE}\nsink: {}\n")
    assert done.returncode == 1
    assert "${NOT_SET_ANYWHERE} is not set in the environment" in done.stderr
    done = mds_worker(tmp_path, "source:\n  sqs: q\nsink:\n  sqs: r\nmax_in_flihgt: 3\n")
    assert done.returncode == 1 and "max_in_flihgt" in done.stderr


def mds_worker(tmp_path: Path, text: str, **env: str | None) -> subprocess.CompletedProcess[str]:
    """``mds worker`` on the worker file ``text``, with ``env`` set (``None``: unset)."""
    (tmp_path / "worker.yaml").write_text(text)
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-m", "mds", "worker", "tests.workers.models:Scorer", "worker.yaml"],
        cwd=tmp_path,
        env={name: value for name, value in environment.items() if value is not None},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_variables_are_values_never_yaml(aws: Aws, tmp_path: Path) -> None:
    text = (
        "# a comment may name ${NOT_SET_ANYWHERE}\n"
        "source:\n  sqs: ${QUEUE}\n  dead_letters: d\nsink:\n  sqs: r\n"
        f"endpoint_url: {aws.url}\nregion: us-east-1\nmax_in_flight: ${{MOST}}\n"
    )
    # MOST, a number given as text, is read as one, and checked.
    done = mds_worker(tmp_path, text, QUEUE="q", MOST="0")
    assert done.returncode == 1
    assert "mds worker: max_in_flight must be 1 or more, not 0" in done.stderr
    # A variable is one value: its newline adds no setting (max_in_flight: 0).
    keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    done = mds_worker(tmp_path, text, QUEUE="q-gone\nmax_in_flight: 0", MOST="3", **keys)
    assert done.returncode == 1
    assert "mds worker: the queue q-gone\nmax_in_flight: 0: " in done.stderr
    done = mds_worker(tmp_path, "source: {sqs: ${QUEUE}}\nsink: {sqs: r}\n", QUEUE="q")
    assert done.returncode == 1
    assert 'a ${NAME} inside {...} or [...] needs quotes: "${NAME}"' in done.stderr


def test_a_client_that_cannot_be_made_is_said_plainly(tmp_path: Path) -> None:
    no_region = {"AWS_DEFAULT_REGION": None, "AWS_REGION": None, "AWS_CONFIG_FILE": "/nonexistent"}
    done = mds_worker(
        tmp_path, "source:\n  sqs: q\n  dead_letters: d\nsink:\n  sqs: r\n", **no_region
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "worker.yaml: cannot set up the source or sink: NoRegionError" in done.stderr
    done = mds_worker(
        tmp_path,
        "source:\n  redis: {stream: s, url: 'nope://x'}\nsink:\n  sqs: r\nregion: eu-west-1\n",
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "worker.yaml: cannot set up the source or sink: ValueError" in done.stderr
