"""The source document's agent, end to end: S3 images, SQS messages, a classifier, verdicts.

A client uploads photos of cars to S3 and sends a message with each one's URL
to an SQS queue; the agent (an mds queue worker) takes the messages, fetches
each image in its handler's preprocess, judges damaged or not with a small
classifier (trained here, in code), and reports each verdict to a results
queue. Messages it cannot read go to a dead-letter queue with the reason.

Run it:   python examples/queue_agent.py
It starts a local S3 and SQS endpoint (moto's server, pip install "moto[server]")
unless AWS_ENDPOINT_URL names one. Needs boto3 (pip install "mds-serving[sqs]").
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import boto3
import numpy as np

import mds
import mds.workers

SIZE = 16  # images are 16 x 16 grey pixels


def photo(damaged: bool, rng: np.random.Generator) -> np.ndarray:
    """A car's photo: noise, and a dark scratch across it when damaged."""
    image = rng.uniform(0.4, 0.6, (SIZE, SIZE))
    if damaged:
        row = rng.integers(2, SIZE - 2)
        image[row : row + 2, rng.integers(0, 4) : rng.integers(SIZE - 4, SIZE)] = 0.05
    return image.astype(np.float32)


def train(rng: np.random.Generator) -> np.ndarray:
    """Logistic regression on the darkest row's mean and a bias: the damage classifier."""
    images = [photo(bool(i % 2), rng) for i in range(400)]
    x = np.stack([features(image) for image in images])
    y = np.array([i % 2 for i in range(400)], dtype=np.float32)
    weights = np.zeros(x.shape[1], dtype=np.float32)
    for _ in range(500):
        p = 1 / (1 + np.exp(-x @ weights))
        weights -= 0.5 * x.T @ (p - y) / len(y)
    return weights


def features(image: np.ndarray) -> np.ndarray:
    darkest = image.mean(axis=1).min()
    return np.array([1.0, darkest * 10], dtype=np.float32)


class DamageClassifier(mds.ModelHandler[dict[str, Any], dict[str, Any]]):
    """A message ``{"claim": ..., "image": "s3://bucket/key"}`` -> a verdict."""

    def __init__(self, weights: np.ndarray, s3: Any) -> None:
        self.weights = weights
        self.s3 = s3

    def preprocess(self, message: dict[str, Any]) -> tuple[str, np.ndarray]:
        # A plain def runs in a worker thread: fetching from S3 blocks no one.
        raw = mds.workers.read_object(message["image"], client=self.s3)
        return message["claim"], features(np.load(io.BytesIO(raw)))

    def infer(self, batch: Sequence[tuple[str, np.ndarray]]) -> list[dict[str, Any]]:
        x = np.stack([f for _, f in batch])  # one matrix product for the whole batch
        damage = 1 / (1 + np.exp(-x @ self.weights))
        return [
            {"claim": claim, "damaged": bool(p > 0.5), "confidence": round(float(p), 3)}
            for (claim, _), p in zip(batch, damage, strict=True)
        ]


@contextmanager
def endpoint() -> Iterator[str]:
    """AWS_ENDPOINT_URL if set, else moto's server on a free port for the run."""
    if "AWS_ENDPOINT_URL" in os.environ:
        yield os.environ["AWS_ENDPOINT_URL"]
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


def main(claims: int = 60) -> None:
    rng = np.random.default_rng(7)
    with endpoint() as url:
        settings = {"endpoint_url": url, "region_name": "us-east-1"}
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
        s3, sqs = boto3.client("s3", **settings), boto3.client("sqs", **settings)
        s3.create_bucket(Bucket="claims-photos")
        inbox = sqs.create_queue(QueueName="claims")["QueueUrl"]
        verdicts = sqs.create_queue(QueueName="verdicts")["QueueUrl"]
        dead = sqs.create_queue(QueueName="claims-dead")["QueueUrl"]

        # The clients: upload each photo, then send its URL.
        truth = {}
        for n in range(claims):
            damaged = bool(rng.integers(0, 2))
            buffer = io.BytesIO()
            np.save(buffer, photo(damaged, rng))
            s3.put_object(Bucket="claims-photos", Key=f"{n}.npy", Body=buffer.getvalue())
            truth[f"claim-{n}"] = damaged
            body = {"claim": f"claim-{n}", "image": f"s3://claims-photos/{n}.npy"}
            sqs.send_message(QueueUrl=inbox, MessageBody=json.dumps(body))
        sqs.send_message(QueueUrl=inbox, MessageBody="a message that is not JSON")

        # The agent: the classifier served by an mds runtime, fed by the queue.
        runtime = mds.Runtime()
        runtime.add_model(
            "damage",
            DamageClassifier(train(rng), s3),
            mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=16, max_queue_delay=0.01)),
        )
        worker = mds.workers.QueueWorker(
            runtime,
            "damage",
            mds.workers.SqsSource(inbox, dead_letters=dead, client=sqs),
            mds.workers.SqsSink(verdicts, client=sqs),
            max_in_flight=32,
            wait=1.0,
        )
        with worker:  # starts the runtime; leaving drains, then stops it
            while worker.statistics().completed + worker.statistics().dead_lettered <= claims:
                time.sleep(0.1)
            stats = worker.statistics()
        batches = runtime.model("damage").statistics().batch_sizes

        # The company's systems: read the verdicts.
        right = 0
        while messages := sqs.receive_message(QueueUrl=verdicts, MaxNumberOfMessages=10).get(
            "Messages"
        ):
            for message in messages:
                verdict = json.loads(message["Body"])["result"]
                right += verdict["damaged"] == truth[verdict["claim"]]
                sqs.delete_message(QueueUrl=verdicts, ReceiptHandle=message["ReceiptHandle"])
        (letter,) = sqs.receive_message(QueueUrl=dead, MessageAttributeNames=["All"])["Messages"]
        reason = letter["MessageAttributes"]["mds-error"]["StringValue"]
        print(f"verdicts: {stats.completed}, right: {right}")
        print(f"dead letters: {stats.dead_lettered} ({reason.split(':')[0]})")
        print(f"batches by size: {dict(sorted(batches.items()))}")


if __name__ == "__main__":
    main()
