"""Serve a queue's messages with a runtime's models: the source document's agent, built in.

A :class:`QueueWorker` receives messages from a broker (:class:`SqsSource`,
:class:`RedisStreamSource`), serves each through a model or pipeline (they
batch together in its batcher), writes each result to a sink
(:class:`SqsSink`, :class:`S3Sink`, :class:`RedisStreamSink`,
:class:`CallbackSink`, or your own), and acknowledges the message only
then::

    worker = mds.workers.QueueWorker(
        runtime, "classifier",
        mds.workers.SqsSource(queue_url, dead_letters=dlq_url),
        mds.workers.SqsSink(results_url),
    )
    await worker.run()          # until cancelled, or worker.stop() (SIGTERM)

Messages in flight are bounded, kept invisible while held, routed by
error kind (dead letters or another delivery), and released when the worker
stops. SQS and S3 need ``boto3``, Redis Streams ``redis``.

Added in 0.5.
"""

from __future__ import annotations

from ._workers.broker import Message as Message
from ._workers.broker import Sink as Sink
from ._workers.broker import Source as Source
from ._workers.broker import WorkerHealth as WorkerHealth
from ._workers.broker import WorkerState as WorkerState
from ._workers.broker import WorkerStatistics as WorkerStatistics
from ._workers.core import QueueWorker as QueueWorker
from ._workers.redis import RedisStreamSink as RedisStreamSink
from ._workers.redis import RedisStreamSource as RedisStreamSource
from ._workers.sqs import CallbackSink as CallbackSink
from ._workers.sqs import S3Sink as S3Sink
from ._workers.sqs import SqsSink as SqsSink
from ._workers.sqs import SqsSource as SqsSource
from ._workers.sqs import read_object as read_object

__all__ = [
    "CallbackSink",
    "Message",
    "QueueWorker",
    "RedisStreamSink",
    "RedisStreamSource",
    "S3Sink",
    "Sink",
    "Source",
    "SqsSink",
    "SqsSource",
    "WorkerHealth",
    "WorkerState",
    "WorkerStatistics",
    "read_object",
]

# Reprs and tracebacks show the public path, not the private module.
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
