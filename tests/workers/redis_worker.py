"""A Redis Streams worker in a process of its own, for the test that kills one: port, stream.

It serves as consumer ``doomed`` and never finishes anything: the batch that
holds the message ``[5, ...]`` computes for an hour (it says so in the key
``{stream}:holding``), and the sink hangs after writing each result, before
the worker acknowledges it. The test kills it with both kinds in hand.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import anyio
import redis

import mds
import mds.workers


class Stuck(mds.ModelHandler[list[float], float]):
    def __init__(self, client: Any, stream: str) -> None:
        self.client = client
        self.stream = stream

    def infer(self, batch: Sequence[list[float]]) -> list[float]:
        if any(item[0] == 5 for item in batch):
            self.client.set(f"{self.stream}:holding", 1)
            time.sleep(3600)
        return [float(sum(item)) for item in batch]


class WritesThenHangs:
    def __init__(self, sink: mds.workers.RedisStreamSink) -> None:
        self.sink = sink

    async def write(self, message: mds.workers.Message, result: bytes) -> None:
        await self.sink.write(message, result)
        await anyio.sleep_forever()


def main(port: str, stream: str) -> None:
    client = redis.Redis(port=int(port))
    runtime = mds.Runtime()
    runtime.add_model(
        "summer",
        lambda: Stuck(client, stream),
        mds.ModelConfig(
            instances=2,
            batching=mds.BatchingConfig(max_batch_size=4, max_queue_delay=0.01),
        ),
    )
    worker = mds.workers.QueueWorker(
        runtime,
        "summer",
        mds.workers.RedisStreamSource(stream, consumer="doomed", client=client),
        WritesThenHangs(mds.workers.RedisStreamSink(f"{stream}:out", client=client)),
        max_in_flight=8,
        visibility=2.0,
        heartbeat=0.2,
        wait=0.1,
    )
    worker.start_sync()
    while True:  # until killed
        time.sleep(1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
