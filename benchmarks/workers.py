"""Queue workers: mds's QueueWorker against hand-written boto3 loops, on one local SQS endpoint.

The benchmark MLP (256 -> 1024 -> 1024 -> 16, one torch thread) judges
messages ``{"x": [256 floats]}`` from an SQS queue and sends each result to
another; the endpoint is moto's server (SQS over real HTTP) in a process of
its own. A feeder keeps the input queue at about 100 messages (moto's
receive slows down with a queue's length; SQS's does not), so that every
variant sees the same endpoint. Side by side, in interleaved rounds:

  (a) mds: mds.workers.QueueWorker (SqsSource, SqsSink; batches of at most 32)
  (b) a hand-written loop, one message at a time: receive 1, infer, send, delete
  (c) a hand-written loop batching receives: receive 10, infer them as one
      batch, send_message_batch, delete_message_batch

Run:

    python benchmarks/workers.py [--messages 600] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import numpy as np
from botocore.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parent / "http_servers"))
from model import make_model, run_batch

import mds
import mds.workers

KEEP = 100  # messages the feeder keeps waiting in the input queue


def endpoint() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return server, f"http://127.0.0.1:{port}"


class Queues:
    def __init__(self, url: str) -> None:
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
        self.url = url

    def client(self) -> Any:
        return boto3.client(
            "sqs",
            endpoint_url=self.url,
            region_name="us-east-1",
            config=Config(max_pool_connections=64),
        )

    def make(self) -> tuple[str, str, str]:
        sqs = self.client()
        return tuple(  # type: ignore[return-value]
            sqs.create_queue(QueueName=f"{kind}-{uuid.uuid4().hex[:8]}")["QueueUrl"]
            for kind in ("in", "out", "dead")
        )


def feed(queues: Queues, queue: str, count: int, stop: threading.Event) -> None:
    """Send ``count`` messages, keeping about KEEP waiting."""
    sqs = queues.client()
    body = json.dumps({"x": np.random.default_rng(0).random(256).round(4).tolist()})
    sent = 0
    while sent < count and not stop.is_set():
        waiting = int(
            sqs.get_queue_attributes(
                QueueUrl=queue, AttributeNames=["ApproximateNumberOfMessages"]
            )["Attributes"]["ApproximateNumberOfMessages"]
        )
        if waiting >= KEEP:
            time.sleep(0.01)
            continue
        chunk = min(10, count - sent)
        sqs.send_message_batch(
            QueueUrl=queue,
            Entries=[{"Id": str(i), "MessageBody": body} for i in range(chunk)],
        )
        sent += chunk


def results(queues: Queues, queue: str) -> int:
    found = queues.client().get_queue_attributes(
        QueueUrl=queue,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(found["ApproximateNumberOfMessages"]) + int(
        found["ApproximateNumberOfMessagesNotVisible"]
    )


class MLP(mds.ModelHandler[dict[str, Any], list[float]]):
    def init(self, context: mds.ModelContext) -> None:
        self.model = make_model()

    def infer(self, batch: list[dict[str, Any]]) -> list[list[float]]:
        return run_batch(self.model, [item["x"] for item in batch])


def with_mds(queues: Queues, source: str, sink: str, dead: str, count: int) -> None:
    runtime = mds.Runtime()
    batching = mds.BatchingConfig(max_batch_size=32, max_queue_delay=0.002)
    runtime.add_model("mlp", MLP, mds.ModelConfig(batching=batching))
    sqs = queues.client()
    worker = mds.workers.QueueWorker(
        runtime,
        "mlp",
        mds.workers.SqsSource(source, dead_letters=dead, client=sqs),
        mds.workers.SqsSink(sink, client=sqs),
        max_in_flight=64,
        wait=1.0,
    )
    with worker:
        while worker.statistics().completed < count:
            time.sleep(0.01)


def one_at_a_time(queues: Queues, source: str, sink: str, dead: str, count: int) -> None:
    sqs, model, done = queues.client(), make_model(), 0
    while done < count:
        for message in sqs.receive_message(QueueUrl=source, WaitTimeSeconds=1).get("Messages", []):
            (y,) = run_batch(model, [json.loads(message["Body"])["x"]])
            body = json.dumps({"id": message["MessageId"], "result": y})
            sqs.send_message(QueueUrl=sink, MessageBody=body)
            sqs.delete_message(QueueUrl=source, ReceiptHandle=message["ReceiptHandle"])
            done += 1


def batching_receives(queues: Queues, source: str, sink: str, dead: str, count: int) -> None:
    sqs, model, done = queues.client(), make_model(), 0
    while done < count:
        reply = sqs.receive_message(QueueUrl=source, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        messages = reply.get("Messages", [])
        if not messages:
            continue
        ys = run_batch(model, [json.loads(m["Body"])["x"] for m in messages])
        entries = [
            {"Id": str(i), "MessageBody": json.dumps({"id": m["MessageId"], "result": y})}
            for i, (m, y) in enumerate(zip(messages, ys, strict=True))
        ]
        sqs.send_message_batch(QueueUrl=sink, Entries=entries)
        sqs.delete_message_batch(
            QueueUrl=source,
            Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)
            ],
        )
        done += len(messages)


VARIANTS: dict[str, Callable[..., None]] = {
    "a  mds QueueWorker": with_mds,
    "b  hand loop, one at a time": one_at_a_time,
    "c  hand loop, batched receives": batching_receives,
}


def measure(queues: Queues, run: Callable[..., None], count: int) -> float:
    source, sink, dead = queues.make()
    stop = threading.Event()
    feeder = threading.Thread(target=feed, args=(queues, source, count, stop), daemon=True)
    began = time.perf_counter()
    feeder.start()
    try:
        run(queues, source, sink, dead, count)
    finally:
        stop.set()
        feeder.join()
    elapsed = time.perf_counter() - began
    assert results(queues, sink) >= count, "a result is missing"
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=600, help="messages per run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--quick", action="store_true", help="200 messages, one round")
    args = parser.parse_args()
    if args.quick:
        args.messages, args.rounds = 200, 1
    server, url = endpoint()
    queues = Queues(url)
    found: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        for _ in range(args.rounds):
            for name, run in VARIANTS.items():
                rate = measure(queues, run, args.messages)
                found[name].append(rate)
                print(f"   {name:<32} {rate:7.1f} messages/s", flush=True)
    finally:
        server.terminate()
        server.wait(10)
    medians = {name: statistics.median(rates) for name, rates in found.items()}
    print()
    for name, rate in medians.items():
        print(f"{name:<32} {rate:7.1f} messages/s (median of {args.rounds})")
    mine = found["a  mds QueueWorker"]
    for other in ("b  hand loop, one at a time", "c  hand loop, batched receives"):
        ratio = statistics.median(m / o for m, o in zip(mine, found[other], strict=True))
        print(f"mds / {other[3:]}: {ratio:.2f}x")
    print("(ratios: medians of each round's ratio; the endpoint is moto's, in Python)")


if __name__ == "__main__":
    main()
