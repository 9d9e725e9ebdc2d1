"""What a worker refuses at start, and the SQS and S3 calls' own errors: real boto3, moto's server.

Where the endpoint cannot be made to fail on cue, a botocore event hook on the
real client fails one call (as a dropped connection would) or drops a field
of the reply (as an SQS-compatible endpoint without it would).
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

import mds
import mds.workers

from .conftest import Aws
from .models import Scorer, runtime_with
from .test_sqs import counts, eventually, received_all, send

pytestmark = pytest.mark.slow


def source(aws: Aws, queue: str, dead: str | None) -> mds.workers.SqsSource:
    return mds.workers.SqsSource(queue, dead_letters=dead, client=aws.client("sqs"))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_target_the_runtime_does_not_have_is_refused_at_start(aws: Aws) -> None:
    queue, dead, bucket = aws.queue("in"), aws.queue("dead"), aws.bucket()
    send(aws, queue, [json.dumps({"x": [1, 1, 1, 1]})])
    runtime = runtime_with(Scorer())
    worker = mds.workers.QueueWorker(
        runtime,
        "scorre",
        source(aws, queue, dead),
        mds.workers.S3Sink(bucket, client=aws.client("s3")),
    )
    with pytest.raises(mds.ConfigError, match="the worker cannot serve 'scorre'") as info:
        worker.start_sync()
    assert "no model named 'scorre'; this runtime serves: 'scorer'" in str(info.value)
    assert not runtime.running  # the runtime it started is stopped again
    assert counts(aws, queue) == (1, 0)  # no message was taken, none dead-lettered
    assert received_all(aws, dead) == []


class Stateful(mds.ModelHandler[Any, Any]):
    def infer(self, steps: Any) -> list[Any]:
        return [step.input for step in steps]


def test_a_stateful_target_is_refused_at_start(aws: Aws) -> None:
    queue, dead = aws.queue("in"), aws.queue("dead")
    runtime = mds.Runtime()
    runtime.add_model("steps", Stateful, mds.ModelConfig(sequences=mds.SequenceConfig()))
    worker = mds.workers.QueueWorker(
        runtime, "steps", source(aws, queue, dead), mds.workers.CallbackSink(lambda *_: None)
    )
    with pytest.raises(mds.ConfigError, match="'steps': it is stateful"):
        worker.start_sync()
    assert not runtime.running


@pytest.mark.parametrize(
    "case",
    ["no dead letters", "no queue", "no dead letters queue", "no bucket", "no results queue"],
)
def test_a_broker_set_wrong_is_refused_at_start(aws: Aws, case: str) -> None:
    queue, dead, bucket = aws.queue("in"), aws.queue("dead"), aws.bucket()
    gone = queue + "-gone"
    made: dict[str, tuple[Any, Any, str]] = {
        "no dead letters": (
            source(aws, queue, None),
            mds.workers.S3Sink(bucket, client=aws.client("s3")),
            "has no redrive policy and SqsSource was given no dead_letters queue",
        ),
        "no queue": (
            source(aws, gone, dead),
            mds.workers.S3Sink(bucket, client=aws.client("s3")),
            f"the queue {gone}: QueueDoesNotExist",
        ),
        "no dead letters queue": (
            source(aws, queue, gone),
            mds.workers.S3Sink(bucket, client=aws.client("s3")),
            f"the dead letters queue {gone}: QueueDoesNotExist",
        ),
        "no bucket": (
            source(aws, queue, dead),
            mds.workers.S3Sink(bucket + "-gone", client=aws.client("s3")),
            f"the bucket {bucket}-gone",
        ),
        "no results queue": (
            source(aws, queue, dead),
            mds.workers.SqsSink(gone, client=aws.client("sqs")),
            f"the results queue {gone}: QueueDoesNotExist",
        ),
    }
    the_source, sink, says = made[case]
    runtime = runtime_with(Scorer())
    worker = mds.workers.QueueWorker(runtime, "scorer", the_source, sink)
    with pytest.raises(mds.ConfigError) as info:
        worker.start_sync()
    assert says in str(info.value)
    assert not runtime.running
    assert worker.state is mds.workers.WorkerState.CREATED


def test_a_broker_out_of_reach_at_start_is_retried_and_said_in_health(aws: Aws) -> None:
    import boto3
    from botocore.config import Config

    unreachable = boto3.client(
        "sqs",
        endpoint_url=f"http://127.0.0.1:{closed_port()}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"max_attempts": 1}, connect_timeout=0.5),
    )
    url = f"{aws.url}/123456789012/far"
    runtime = runtime_with(Scorer())
    worker = mds.workers.QueueWorker(
        runtime,
        "scorer",
        mds.workers.SqsSource(url, dead_letters=url, client=unreachable),
        mds.workers.CallbackSink(lambda message, result: None),
        backoff=(0.2, 0.2),
        wait=0.1,
    )
    with worker:  # not a setting that is wrong: it may come back
        eventually(lambda: worker.state is mds.workers.WorkerState.BACKING_OFF, "backing off")
        health = runtime.health_sync().workers["far"]
        assert health.ready is False and health.state is mds.workers.WorkerState.BACKING_OFF
        assert health.reason is not None
        assert health.reason.startswith("the worker is backing_off: receiving from far failed:")
        assert "EndpointConnectionError" in health.reason
        assert runtime.health_sync().ready  # the models' readiness is theirs alone
    assert worker.statistics().source_errors >= 1


def test_one_failed_request_of_a_batch_write_fails_its_own_results_only(aws: Aws) -> None:
    import anyio
    from botocore.exceptions import EndpointConnectionError

    results_queue = aws.queue("out")
    client = aws.client("sqs")
    calls = [0]

    def second_fails(**_: Any) -> None:
        calls[0] += 1
        if calls[0] == 2:
            raise EndpointConnectionError(endpoint_url="http://dropped")

    client.meta.events.register("before-call.sqs.SendMessageBatch", second_fails)
    sink = mds.workers.SqsSink(results_queue, client=client)
    items = [(mds.workers.Message(id=f"m{i}", body=b""), b'{"r":%d}' % i) for i in range(25)]
    outcomes = anyio.run(sink.write_many, items)  # three requests: 10, 10, 5
    assert [outcome is None for outcome in outcomes] == [True] * 10 + [False] * 10 + [True] * 5
    assert "EndpointConnectionError" in repr(outcomes[10])
    written = sorted(m["Body"] for m in received_all(aws, results_queue))
    assert written == sorted(f'{{"r":{i}}}' for i in [*range(10), *range(20, 25)])


def test_extending_names_the_messages_it_could_not_keep(aws: Aws) -> None:
    import anyio

    queue = aws.queue("in")
    (sent,) = send(aws, queue, ["{}"])
    the_source = source(aws, queue, queue)
    (held,) = anyio.run(the_source.receive, 1, 1.0, 30.0)
    stale = mds.workers.Message(id="stale-one", body=b"", handle="not-a-receipt-handle")
    with pytest.raises(RuntimeError, match="1 of 2 messages were not extended") as info:
        anyio.run(the_source.extend, [held, stale], 30.0)
    assert "stale-one (ReceiptHandleIsInvalid" in str(info.value)
    assert held.id == sent and counts(aws, queue) == (0, 1)  # the good one was extended


def test_deliveries_are_counted_where_the_endpoint_does_not_count_them(aws: Aws) -> None:
    import anyio

    queue = aws.queue("in")
    send(aws, queue, ["{}"])
    client = aws.client("sqs")

    def without_receive_count(parsed: dict[str, Any], **_: Any) -> None:
        for message in parsed.get("Messages", []):
            message.get("Attributes", {}).pop("ApproximateReceiveCount", None)

    client.meta.events.register("after-call.sqs.ReceiveMessage", without_receive_count)
    the_source = mds.workers.SqsSource(queue, dead_letters=queue, client=client)
    seen = []
    for _ in range(3):
        (message,) = anyio.run(the_source.receive, 1, 1.0, 30.0)
        seen.append(message.deliveries)
        anyio.run(the_source.release, message, 0.0)
    assert seen == [1, 2, 3]  # so max_deliveries is reached, and nothing cycles forever


def test_reading_an_object_tells_a_bad_url_from_a_store_out_of_reach(aws: Aws) -> None:
    import boto3
    from botocore.config import Config

    bucket = aws.bucket()
    s3 = aws.client("s3")
    with pytest.raises(mds.InvalidInput, match=f"cannot read s3://{bucket}/gone.jpg: NoSuchKey"):
        mds.workers.read_object(f"s3://{bucket}/gone.jpg", client=s3)
    with pytest.raises(mds.InvalidInput, match="is not an s3://bucket/key URL"):
        mds.workers.read_object("https://example.com/a.jpg", client=s3)
    far = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{closed_port()}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"max_attempts": 1}, connect_timeout=0.5),
    )
    # Transient: a worker delivers the message again instead of dead-lettering it.
    with pytest.raises(mds.Unavailable, match=f"reading s3://{bucket}/a.jpg failed"):
        mds.workers.read_object(f"s3://{bucket}/a.jpg", client=far)


def test_backoff_out_of_order_is_refused() -> None:
    runtime = mds.Runtime()
    for backoff in [(5.0, 1.0), (-1.0, 1.0)]:
        with pytest.raises(mds.ConfigError, match="backoff must be"):
            mds.workers.QueueWorker(runtime, "m", object(), object(), backoff=backoff)  # type: ignore[arg-type]


def test_an_expired_token_is_no_fault_of_the_message(aws: Aws) -> None:
    from botocore.exceptions import ClientError

    bucket = aws.bucket()
    s3 = aws.client("s3")
    s3.put_object(Bucket=bucket, Key="a.jpg", Body=b"x")

    def expired(**_: Any) -> None:
        error = {"Code": "ExpiredToken", "Message": "The provided token has expired."}
        raise ClientError(
            {"Error": error, "ResponseMetadata": {"HTTPStatusCode": 400}}, "GetObject"
        )

    s3.meta.events.register("before-call.s3.GetObject", expired)
    # A 400, but no bad URL: delivered again (Unavailable), not dead-lettered (InvalidInput).
    with pytest.raises(mds.Unavailable, match="ExpiredToken"):
        mds.workers.read_object(f"s3://{bucket}/a.jpg", client=s3)


def test_a_dead_letter_that_fails_comes_back_and_is_dead_lettered_then(aws: Aws) -> None:
    from botocore.exceptions import EndpointConnectionError

    queue, dead, bucket = aws.queue("in"), aws.queue("dead"), aws.bucket()
    (poison,) = send(aws, queue, ["not json"])
    client = aws.client("sqs")
    sends = [0]

    def first_send_fails(params: dict[str, Any], **_: Any) -> None:
        if params.get("QueueUrl") == dead:
            sends[0] += 1
            if sends[0] == 1:
                raise EndpointConnectionError(endpoint_url="http://dropped")

    client.meta.events.register("before-parameter-build.sqs.SendMessage", first_send_fails)
    worker = mds.workers.QueueWorker(
        runtime_with(Scorer()),
        "scorer",
        mds.workers.SqsSource(queue, dead_letters=dead, client=client),
        mds.workers.S3Sink(bucket, client=aws.client("s3")),
        backoff=(0.0, 0.0),
        wait=0.2,
    )
    with worker:
        eventually(lambda: worker.statistics().dead_lettered == 1, "dead-lettered at last")
    stats = worker.statistics()
    assert (stats.received, stats.released, stats.source_errors) == (2, 1, 1)
    (letter,) = received_all(aws, dead)  # once
    assert letter["MessageAttributes"]["mds-message-id"]["StringValue"] == poison
    assert counts(aws, queue) == (0, 0)


def test_one_sink_serves_workers_on_two_event_loops() -> None:
    import threading
    import time

    import anyio

    def slow(message: mds.workers.Message, result: bytes) -> None:
        time.sleep(0.01)

    sink = mds.workers.CallbackSink(slow)  # plain: its calls take threads of its lane
    finished: list[int] = []

    async def many(loop: int) -> None:
        async with anyio.create_task_group() as tasks:
            for i in range(60):  # more at once than the lane's threads, on each loop
                tasks.start_soon(sink.write, mds.workers.Message(id=f"{loop}-{i}", body=b""), b"")
        finished.append(loop)

    threads = [
        threading.Thread(target=anyio.run, args=(many, n), kwargs={"backend": backend})
        for n, backend in enumerate(["asyncio", "asyncio", "trio"])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(finished) == [0, 1, 2]  # none waits on a limiter another loop would wake
