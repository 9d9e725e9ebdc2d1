"""The queue worker on SQS and S3: a real local endpoint (moto's server), real boto3 over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import mds
import mds.workers

from .. import waiting
from .conftest import Aws
from .models import Scorer, runtime_with

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent


def eventually(
    check: Callable[[], bool],
    what: str,
    seconds: float = 120,
    detail: Callable[[], object] | None = None,
) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"never {what}" + (
            f": {detail()}" if detail is not None else ""
        )
        time.sleep(0.05)


def send(aws: Aws, queue: str, bodies: list[str]) -> list[str]:
    """Send ``bodies``; their message ids, in order."""
    sqs = aws.client("sqs")
    ids: list[str] = []
    for start in range(0, len(bodies), 10):
        chunk = bodies[start : start + 10]
        reply = sqs.send_message_batch(
            QueueUrl=queue,
            Entries=[{"Id": str(i), "MessageBody": body} for i, body in enumerate(chunk)],
        )
        assert not reply.get("Failed"), reply
        by_entry = {entry["Id"]: entry["MessageId"] for entry in reply["Successful"]}
        ids += [by_entry[str(i)] for i in range(len(chunk))]
    return ids


def counts(aws: Aws, queue: str) -> tuple[int, int]:
    """(visible, invisible) messages in the queue."""
    found = aws.client("sqs").get_queue_attributes(
        QueueUrl=queue,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return (
        int(found["ApproximateNumberOfMessages"]),
        int(found["ApproximateNumberOfMessagesNotVisible"]),
    )


def received_all(aws: Aws, queue: str) -> list[dict[str, Any]]:
    """Every message now visible in ``queue`` (taken out of it)."""
    sqs = aws.client("sqs")
    found: list[dict[str, Any]] = []
    while True:
        reply = sqs.receive_message(
            QueueUrl=queue, MaxNumberOfMessages=10, MessageAttributeNames=["All"], WaitTimeSeconds=0
        )
        messages = reply.get("Messages", [])
        if not messages:
            return found
        for message in messages:
            found.append(message)
            sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])


def results(aws: Aws, bucket: str) -> dict[str, Any]:
    """The results the S3 sink wrote: message id -> result."""
    s3 = aws.client("s3")
    found: dict[str, Any] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            body = json.loads(s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read())
            assert item["Key"] == f"{body['id']}.json"
            found[body["id"]] = body["result"]
    return found


def worker_for(
    aws: Aws, model: Scorer, queue: str, dead: str, bucket: str, **options: Any
) -> mds.workers.QueueWorker:
    settings: dict[str, Any] = {"visibility": 30.0, "heartbeat": 5.0, "wait": 1.0, **options}
    return mds.workers.QueueWorker(
        runtime_with(model),
        "scorer",
        mds.workers.SqsSource(queue, dead_letters=dead, client=aws.client("sqs")),
        mds.workers.S3Sink(bucket, client=aws.client("s3")),
        **settings,
    )


@pytest.mark.timeout(300)
def test_thousands_of_messages_with_poison(aws: Aws) -> None:
    queue, dead, bucket = aws.queue("in"), aws.queue("dead"), aws.bucket()
    bodies: list[str] = []
    for i in range(2000):
        if i % 97 == 13:
            bodies.append(f"not json {i}")  # does not decode
        elif i % 101 == 7:
            bodies.append(json.dumps({"y": i}))  # the model rejects it
        else:
            bodies.append(json.dumps({"x": [i, 1, 1, 1], "key": str(i)}))
    model = Scorer()
    worker = worker_for(aws, model, queue, dead, bucket, max_in_flight=64)
    ids: list[str] = []
    worker.start_sync()
    try:
        # Sent in waves while the worker serves: moto's receive slows down with
        # the queue's length (SQS's does not), so the queue is kept short.
        for start in range(0, len(bodies), 100):
            eventually(lambda: counts(aws, queue)[0] < 100, "the queue short again")
            ids += send(aws, queue, bodies[start : start + 100])
        eventually(
            lambda: worker.statistics().completed + worker.statistics().dead_lettered == 2000,
            "every message done",
            seconds=240,
            detail=lambda: (worker.statistics(), counts(aws, queue)),
        )
    finally:
        worker.stop_sync()
    poison = {ids[i]: bodies[i] for i in range(len(bodies)) if "x" not in bodies[i]}
    stats = worker.statistics()
    assert (stats.completed, stats.dead_lettered, stats.released) == (
        2000 - len(poison),
        len(poison),
        0,
    )
    assert stats.state is mds.workers.WorkerState.STOPPED
    written = results(aws, bucket)
    good = {ids[i]: float(i + 3) for i in range(len(bodies)) if ids[i] not in poison}
    assert written == good  # each good message answered once, rightly
    letters = received_all(aws, dead)
    assert sorted(m["Body"] for m in letters) == sorted(poison.values())  # each poison once
    for letter in letters:
        attributes = letter["MessageAttributes"]
        assert poison[attributes["mds-message-id"]["StringValue"]] == letter["Body"]
        reason = attributes["mds-error"]["StringValue"]
        if letter["Body"].startswith("not json"):
            assert reason.startswith("the message does not decode: the message body is not JSON")
        else:
            assert reason == "InvalidInput: a request needs 'x', four numbers"
    left = counts(aws, queue)
    assert left == (0, 0), (left, stats)  # nothing left, nothing invisible
    assert max(model.sizes) > 1  # messages batched together


def test_transient_failures_are_delivered_again_then_dead_lettered(aws: Aws) -> None:
    queue, dead, bucket = aws.queue("in"), aws.queue("dead"), aws.bucket()
    flaky = json.dumps({"x": [1, 2, 3, 4], "key": "flaky", "flaky": True})
    doomed = json.dumps({"x": [1, 1, 1, 1], "key": "doomed", "doomed": True})
    flaky_id, doomed_id = send(aws, queue, [flaky, doomed])
    model = Scorer()
    worker = worker_for(
        aws, model, queue, dead, bucket, max_deliveries=3, backoff=(0.0, 0.0), wait=0.2
    )
    with worker:
        eventually(
            lambda: worker.statistics().completed == 1 and worker.statistics().dead_lettered == 1,
            "the flaky one done and the doomed one dead",
        )
    assert results(aws, bucket) == {flaky_id: 10.0}
    (letter,) = received_all(aws, dead)
    assert letter["MessageAttributes"]["mds-message-id"]["StringValue"] == doomed_id
    reason = letter["MessageAttributes"]["mds-error"]["StringValue"]
    assert reason == ("InferenceError: this one never works (delivered 3 times, the most allowed)")
    assert model.computed.count("doomed") == 3 and model.computed.count("flaky") == 2
    assert worker.statistics().released == 3  # flaky once, doomed twice
    assert counts(aws, queue) == (0, 0)


def test_the_redrive_policys_dead_letter_queue_is_used(aws: Aws) -> None:
    dead = aws.queue("dead")
    arn = aws.client("sqs").get_queue_attributes(QueueUrl=dead, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    policy = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": "10"})
    queue, bucket = aws.queue("in", RedrivePolicy=policy), aws.bucket()
    (bad_id,) = send(aws, queue, ["{"])
    worker = mds.workers.QueueWorker(
        runtime_with(Scorer()),
        "scorer",
        mds.workers.SqsSource(queue, client=aws.client("sqs")),
        mds.workers.S3Sink(bucket, client=aws.client("s3")),
        wait=0.2,
    )
    with worker:
        eventually(lambda: worker.statistics().dead_lettered == 1, "dead-lettered")
    (letter,) = received_all(aws, dead)
    assert letter["MessageAttributes"]["mds-message-id"]["StringValue"] == bad_id


def test_a_killed_worker_s_messages_are_served_by_the_next(aws: Aws, tmp_path: Path) -> None:
    queue, dead, bucket = aws.queue("in"), aws.queue("dead"), aws.bucket()
    bodies = [json.dumps({"x": [i, 0, 0, 0], "key": str(i), "sleep": 0.3}) for i in range(40)]
    ids = send(aws, queue, bodies)
    first = subprocess.Popen(
        [sys.executable, str(HERE / "sqs_worker.py"), aws.url, queue, dead, bucket],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(HERE.parent.parent)},
    )
    try:
        assert first.stdout is not None
        assert first.stdout.readline().strip() == "serving"
        # Killed while it holds messages, some of them written already.
        eventually(lambda: counts(aws, queue)[1] > 0 and len(results(aws, bucket)) >= 2, "busy")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
        assert first.stdout is not None
        first.stdout.close()
    done_by_first = set(results(aws, bucket))
    assert len(done_by_first) < 40
    model = Scorer()
    second = worker_for(aws, model, queue, dead, bucket, max_in_flight=16)
    with second:
        # Its messages come back once their visibility (2 s) runs out.
        eventually(lambda: len(results(aws, bucket)) == 40, "every message served")
        eventually(lambda: counts(aws, queue) == (0, 0), "the queue empty")
    written = results(aws, bucket)
    assert written == {ids[i]: float(i) for i in range(40)}  # one result per message
    assert set(model.computed) >= {str(i) for i, m in enumerate(ids) if m not in done_by_first}


def test_stopping_releases_what_it_holds(aws: Aws) -> None:
    queue, dead, bucket = aws.queue("in"), aws.queue("dead"), aws.bucket()
    send(aws, queue, [json.dumps({"x": [i, 0, 0, 0], "sleep": 1.0}) for i in range(30)])
    model = Scorer()
    worker = worker_for(aws, model, queue, dead, bucket, max_in_flight=8, drain_timeout=0.2)
    worker.start_sync()
    eventually(lambda: worker.statistics().in_flight == 8, "holding eight")
    worker.stop_sync()
    stats = worker.statistics()
    assert stats.in_flight == 0 and stats.released >= 1
    # Nothing lost, nothing left invisible: the rest are there to take at once.
    visible, invisible = counts(aws, queue)
    assert invisible == 0
    assert visible + stats.completed == 30
    assert len(results(aws, bucket)) == stats.completed


def test_a_slow_model_keeps_its_messages(aws: Aws) -> None:
    queue, dead, bucket = aws.queue("in"), aws.queue("dead"), aws.bucket()
    (only,) = send(aws, queue, [json.dumps({"x": [1, 1, 1, 1], "key": "slow", "sleep": 4})])
    model = Scorer()
    worker = worker_for(aws, model, queue, dead, bucket, visibility=2.0, heartbeat=0.5)
    sqs = aws.client("sqs")
    with worker:
        eventually(lambda: model.sizes == [] and worker.statistics().in_flight == 1, "taken")
        # Past its first visibility, another consumer still finds nothing.
        for _ in range(3):
            time.sleep(1)
            assert "Messages" not in sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=0)
        eventually(lambda: worker.statistics().completed == 1, "done")
    assert model.computed == ["slow"]  # computed once
    assert results(aws, bucket) == {only: 4.0}


def test_no_more_messages_held_than_the_limit(aws: Aws) -> None:
    queue, dead, bucket = aws.queue("in"), aws.queue("dead"), aws.bucket()
    send(aws, queue, [json.dumps({"x": [i, 0, 0, 0], "sleep": 0.05}) for i in range(60)])
    model = Scorer()
    worker = worker_for(aws, model, queue, dead, bucket, max_in_flight=5)
    seen: list[tuple[int, int]] = []
    with worker:
        while worker.statistics().completed < 60:
            seen.append((worker.statistics().in_flight, counts(aws, queue)[1]))
            time.sleep(0.02)
    assert max(held for held, _ in seen) <= 5
    assert max(invisible for _, invisible in seen) <= 5
    assert max(model.sizes) <= 5


class Images(mds.ModelHandler[dict[str, Any], dict[str, Any]]):
    """The seed's agent: the message names an object in S3; the verdict is its size."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def preprocess(self, request: dict[str, Any]) -> bytes:  # a worker thread: it may block
        return mds.workers.read_object(request["url"], client=self.client)

    def infer(self, batch: list[bytes]) -> list[dict[str, Any]]:
        return [{"bytes": len(image), "damaged": image.startswith(b"X")} for image in batch]


def test_objects_fetched_in_preprocess_and_verdicts_to_a_queue(aws: Aws) -> None:
    queue, dead, results_queue, bucket = (
        aws.queue("in"),
        aws.queue("dead"),
        aws.queue("verdicts"),
        aws.bucket(),
    )
    s3 = aws.client("s3")
    s3.put_object(Bucket=bucket, Key="cars/1.jpg", Body=b"X" * 100)
    s3.put_object(Bucket=bucket, Key="cars/2.jpg", Body=b"ok" * 10)
    ids = send(
        aws,
        queue,
        [json.dumps({"url": f"s3://{bucket}/cars/{n}.jpg"}) for n in (1, 2, 3)],
    )
    runtime = mds.Runtime()
    runtime.add_model("images", Images(aws.client("s3")))
    called: list[str] = []
    lock = threading.Lock()

    def audit(message: mds.workers.Message, result: bytes) -> None:
        with lock:
            called.append(message.id)

    worker = mds.workers.QueueWorker(
        runtime,
        "images",
        mds.workers.SqsSource(queue, dead_letters=dead, client=aws.client("sqs")),
        mds.workers.SqsSink(results_queue, client=aws.client("sqs")),
        wait=0.2,
    )
    with worker:
        eventually(lambda: worker.statistics().completed == 2, "two verdicts")
        eventually(lambda: worker.statistics().dead_lettered == 1, "the missing one dead")
    verdicts = {
        m["MessageAttributes"]["mds-message-id"]["StringValue"]: json.loads(m["Body"])
        for m in received_all(aws, results_queue)
    }
    assert verdicts == {
        ids[0]: {"id": ids[0], "result": {"bytes": 100, "damaged": True}},
        ids[1]: {"id": ids[1], "result": {"bytes": 20, "damaged": False}},
    }
    (letter,) = received_all(aws, dead)
    assert "NoSuchKey" in letter["MessageAttributes"]["mds-error"]["StringValue"]
    callback = mds.workers.CallbackSink(audit)
    assert isinstance(callback, mds.workers.Sink)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(mds.ConfigError, match="heartbeat"):
        mds.workers.QueueWorker(
            mds.Runtime(),
            "m",
            object(),
            object(),
            visibility=5,
            heartbeat=5,  # type: ignore[arg-type]
        )


async def test_the_worker_runs_in_the_hosts_loop(aws: Aws, anyio_backend: str) -> None:
    import anyio

    def prepare() -> tuple[list[str], str, mds.workers.QueueWorker]:
        # boto3 blocks (even making a client reads files): not on the loop.
        queue, dead, bucket = aws.queue("in"), aws.queue("dead"), aws.bucket()
        ids = send(aws, queue, [json.dumps({"x": [i, 1, 0, 0]}) for i in range(20)])
        return ids, bucket, worker_for(aws, Scorer(), queue, dead, bucket, wait=0.2)

    ids, bucket, worker = await anyio.to_thread.run_sync(prepare)
    async with worker:  # asyncio or trio: boto3 runs in worker threads
        await waiting.eventually(lambda: worker.statistics().completed >= 20, "completed 20", 60)
        assert worker.state in (mds.workers.WorkerState.RECEIVING, mds.workers.WorkerState.FULL)
    assert worker.state is mds.workers.WorkerState.STOPPED
    written = await anyio.to_thread.run_sync(results, aws, bucket)
    assert written == {ids[i]: float(i + 1) for i in range(20)}


async def test_batched_calls_each_get_their_own_outcome(anyio_backend: str) -> None:
    import anyio

    from mds._workers.batched import Batched

    sent: list[list[int]] = []

    async def send(items: Any) -> list[BaseException | None]:
        sent.append(list(items))
        return [ValueError(f"odd {i}") if i % 2 else None for i in items]

    batched: Batched[int] = Batched(send, size=4, delay=0.01)
    outcomes: dict[int, str] = {}

    async def one(i: int) -> None:
        try:
            await batched(i)
            outcomes[i] = "ok"
        except ValueError as exc:
            outcomes[i] = str(exc)

    async with anyio.create_task_group() as tasks:
        for i in range(10):
            tasks.start_soon(one, i)
    assert outcomes == {i: f"odd {i}" if i % 2 else "ok" for i in range(10)}
    assert sorted(i for batch in sent for i in batch) == list(range(10))
    assert max(len(batch) for batch in sent) == 4 and len(sent) >= 3


def test_a_full_worker_stops_too(aws: Aws) -> None:
    queue, dead, bucket = aws.queue("in"), aws.queue("dead"), aws.bucket()
    send(aws, queue, [json.dumps({"x": [i, 0, 0, 0], "sleep": 3.0}) for i in range(6)])
    worker = worker_for(
        aws, Scorer(), queue, dead, bucket, max_in_flight=2, drain_timeout=0.2, wait=0.2
    )
    worker.start_sync()
    eventually(lambda: worker.state is mds.workers.WorkerState.FULL, "full")
    worker.stop_sync()  # holding its most: the stop still drains, and releases
    assert worker.statistics().released == 2
    assert counts(aws, queue)[1] == 0


async def test_a_cancelled_first_caller_still_sends_its_batch(anyio_backend: str) -> None:
    import anyio

    from mds._workers.batched import Batched

    sent: list[int] = []

    async def send(items: Any) -> list[BaseException | None]:
        sent.extend(items)
        return [None for _ in items]

    batched: Batched[int] = Batched(send, size=10, delay=0.2)
    async with anyio.create_task_group() as tasks:
        with anyio.CancelScope() as first:
            tasks.start_soon(batched, 2)  # joins the first's batch
            await anyio.lowlevel.checkpoint()
            first.cancel()
            await batched(1)  # the first: cancelled while it waits for company
    assert sorted(sent) == [1, 2]
    await batched(3)  # and the next batch has a first caller again
    assert sorted(sent) == [1, 2, 3]


async def test_every_kind_of_callback_writes(anyio_backend: str) -> None:
    got: list[str] = []
    message = mds.workers.Message(id="m", body=b"")

    class Recorder:
        async def __call__(self, message: mds.workers.Message, result: bytes) -> None:
            got.append("callable object")

    async def coroutine(text: str) -> None:
        got.append(text)

    def plain(message: mds.workers.Message, result: bytes) -> None:
        got.append("plain")

    for write in (Recorder(), lambda m, r: coroutine("returns a coroutine"), plain):
        await mds.workers.CallbackSink(write).write(message, b"result")
    assert got == ["callable object", "returns a coroutine", "plain"]


def test_a_result_that_does_not_encode_is_dead_lettered(aws: Aws) -> None:
    queue, dead, bucket = aws.queue("in"), aws.queue("dead"), aws.bucket()
    send(aws, queue, [json.dumps({"x": [1, 1, 1, 1]})])

    def encode(message: mds.workers.Message, result: Any) -> bytes:
        raise TypeError("cannot encode this result")

    worker = worker_for(aws, Scorer(), queue, dead, bucket, wait=0.2, encode=encode)
    with worker:
        eventually(lambda: worker.statistics().dead_lettered == 1, "dead-lettered")
    (letter,) = received_all(aws, dead)
    reason = letter["MessageAttributes"]["mds-error"]["StringValue"]
    assert reason == "the result does not encode: TypeError: cannot encode this result"
