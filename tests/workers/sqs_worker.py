"""A worker in a process of its own, for the test that kills one: endpoint, queue, dead, bucket."""

from __future__ import annotations

import sys

import boto3

import mds.workers
from tests.workers.models import Scorer, runtime_with


def main(endpoint: str, queue: str, dead: str, bucket: str) -> None:
    def client(service: str) -> object:
        return boto3.client(
            service,
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    worker = mds.workers.QueueWorker(
        runtime_with(Scorer(), max_batch_size=4),
        "scorer",
        mds.workers.SqsSource(queue, dead_letters=dead, client=client("sqs")),
        mds.workers.S3Sink(bucket, client=client("s3")),
        max_in_flight=8,
        visibility=2.0,
        heartbeat=0.5,
        wait=0.5,
    )
    worker.start_sync()
    print("serving", flush=True)
    import time

    while True:  # until killed
        time.sleep(1)


if __name__ == "__main__":
    main(*sys.argv[1:5])
