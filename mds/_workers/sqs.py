"""Amazon SQS as a worker's source and sink, S3 as a sink and for reading objects; through boto3.

boto3 blocks, so every call runs in a worker thread (the event loop, asyncio
or trio, never waits on the network). Pass your own boto3 clients (for an
endpoint, credentials, a region), or let these make default ones.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlparse

import anyio

from .._deps import require
from .._errors import ConfigError
from .core import Message

__all__ = ["CallbackSink", "S3Sink", "SqsSink", "SqsSource", "read_object"]

#: The most SQS takes in one receive, or one batch call.
_MOST = 10
#: SQS's longest visibility timeout and long poll.
_LONGEST_VISIBILITY = 12 * 3600
_LONGEST_WAIT = 20
#: The message attributes mds writes.
ID_ATTRIBUTE = "mds-message-id"
ERROR_ATTRIBUTE = "mds-error"


#: A batch of results stays under SQS's 256 KiB a request, with room for attributes.
_BATCH_BYTES = 200 * 1024


def _failures(reply: Any, count: int) -> list[BaseException | None]:
    """One failure (or ``None``) per entry of a batch request's reply, by the entries' ids."""
    found: list[BaseException | None] = [None] * count
    for failed in reply.get("Failed", []):
        found[int(failed["Id"])] = RuntimeError(
            f"{failed.get('Code', 'error')}: {failed.get('Message', '')}"
        )
    return found


def _chunks(
    results: Sequence[tuple[Message, bytes]], most: int
) -> list[Sequence[tuple[Message, bytes]]]:
    """Consecutive runs of at most ten results of at most ``most`` bytes together."""
    chunks: list[Sequence[tuple[Message, bytes]]] = []
    start, size = 0, 0
    for index, (_, result) in enumerate(results):
        if index > start and (index - start == _MOST or size + len(result) > most):
            chunks.append(results[start:index])
            start, size = index, 0
        size += len(result)
    if start < len(results):
        chunks.append(results[start:])
    return chunks


def _client(service: str, client: Any) -> Any:
    if client is not None:
        return client
    boto3 = require("boto3", feature="mds.workers' SQS and S3")
    return boto3.client(service)


def _seconds(value: float, most: int) -> int:
    return max(0, min(most, round(value)))


class SqsSource:
    """An SQS queue a :class:`QueueWorker` receives from.

    Args:
        queue_url: the queue's URL.
        dead_letters: the URL of the queue failed messages go to, with the
            reason in their ``mds-error`` attribute. ``None``: the queue's
            own redrive policy's dead-letter queue.
        client: a boto3 SQS client (its endpoint, credentials and region).

    Added in 0.5.
    """

    def __init__(self, queue_url: str, *, dead_letters: str | None = None, client: Any = None):
        self.queue_url = queue_url
        self.name = queue_url.rstrip("/").rsplit("/", 1)[-1]
        self.client = _client("sqs", client)
        self._dead_letters = dead_letters

    def __repr__(self) -> str:
        return f"<mds.workers.SqsSource {self.queue_url}>"

    async def _call(self, method: str, **arguments: Any) -> Any:
        return await anyio.to_thread.run_sync(
            lambda: getattr(self.client, method)(**arguments), abandon_on_cancel=False
        )

    async def receive(self, limit: int, wait: float, visibility: float) -> Sequence[Message]:
        reply = await self._call(
            "receive_message",
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=max(1, min(_MOST, limit)),
            WaitTimeSeconds=_seconds(wait, _LONGEST_WAIT),
            VisibilityTimeout=_seconds(visibility, _LONGEST_VISIBILITY),
            MessageSystemAttributeNames=["ApproximateReceiveCount"],
            MessageAttributeNames=["All"],
        )
        found = []
        for raw in reply.get("Messages", []):
            attributes = {
                name: str(value.get("StringValue", ""))
                for name, value in raw.get("MessageAttributes", {}).items()
            }
            found.append(
                Message(
                    id=raw["MessageId"],
                    body=raw["Body"].encode(),
                    deliveries=int(raw.get("Attributes", {}).get("ApproximateReceiveCount", 1)),
                    attributes=attributes,
                    handle=raw["ReceiptHandle"],
                )
            )
        return found

    async def acknowledge(self, message: Message) -> None:
        await self._call("delete_message", QueueUrl=self.queue_url, ReceiptHandle=message.handle)

    async def acknowledge_many(self, messages: Sequence[Message]) -> list[BaseException | None]:
        """Delete up to ten messages in one request; a failure per message that failed."""
        entries = [{"Id": str(i), "ReceiptHandle": m.handle} for i, m in enumerate(messages)]
        reply = await self._call("delete_message_batch", QueueUrl=self.queue_url, Entries=entries)
        return _failures(reply, len(messages))

    async def release(self, message: Message, delay: float) -> None:
        await self._call(
            "change_message_visibility",
            QueueUrl=self.queue_url,
            ReceiptHandle=message.handle,
            VisibilityTimeout=_seconds(delay, _LONGEST_VISIBILITY),
        )

    async def extend(self, messages: Sequence[Message], seconds: float) -> None:
        timeout = _seconds(seconds, _LONGEST_VISIBILITY)
        for start in range(0, len(messages), _MOST):
            entries = [
                {"Id": str(i), "ReceiptHandle": m.handle, "VisibilityTimeout": timeout}
                for i, m in enumerate(messages[start : start + _MOST])
            ]
            await self._call(
                "change_message_visibility_batch", QueueUrl=self.queue_url, Entries=entries
            )

    async def dead_letter(self, message: Message, reason: str) -> None:
        target = await self._dead_letter_url()
        await self._call(
            "send_message",
            QueueUrl=target,
            MessageBody=message.body.decode("utf-8", "replace"),
            MessageAttributes={
                ID_ATTRIBUTE: {"DataType": "String", "StringValue": message.id},
                ERROR_ATTRIBUTE: {"DataType": "String", "StringValue": reason or "-"},
            },
        )
        await self.acknowledge(message)

    async def _dead_letter_url(self) -> str:
        if self._dead_letters is None:
            reply = await self._call(
                "get_queue_attributes", QueueUrl=self.queue_url, AttributeNames=["RedrivePolicy"]
            )
            policy = reply.get("Attributes", {}).get("RedrivePolicy")
            if policy is None:
                raise ConfigError(
                    f"queue {self.name} has no redrive policy and SqsSource was given no "
                    "dead_letters queue: failed messages have nowhere to go"
                )
            arn = json.loads(policy)["deadLetterTargetArn"]
            name, account = arn.rsplit(":", 1)[-1], arn.split(":")[4]
            reply = await self._call(
                "get_queue_url", QueueName=name, QueueOwnerAWSAccountId=account
            )
            self._dead_letters = str(reply["QueueUrl"])
        return self._dead_letters

    async def lag(self) -> int | None:
        reply = await self._call(
            "get_queue_attributes",
            QueueUrl=self.queue_url,
            AttributeNames=["ApproximateNumberOfMessages"],
        )
        value = reply.get("Attributes", {}).get("ApproximateNumberOfMessages")
        return int(value) if value is not None else None


class SqsSink:
    """Each result as a message of an SQS queue, with the source message's id.

    The result's message carries the source message's id in its
    ``mds-message-id`` attribute; on a FIFO queue (``.fifo``) that id is
    also its deduplication id, so a redelivered message writes its result
    once. A standard queue may then hold the same result twice, never two
    different results for one message.

    Added in 0.5.
    """

    def __init__(self, queue_url: str, *, client: Any = None, group: str = "mds") -> None:
        self.queue_url = queue_url
        self.client = _client("sqs", client)
        self.group = group

    def _arguments(self, message: Message, result: bytes) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "QueueUrl": self.queue_url,
            "MessageBody": result.decode("utf-8", "replace"),
            "MessageAttributes": {ID_ATTRIBUTE: {"DataType": "String", "StringValue": message.id}},
        }
        if self.queue_url.endswith(".fifo"):
            arguments["MessageDeduplicationId"] = message.id[:128]
            arguments["MessageGroupId"] = self.group
        return arguments

    async def write(self, message: Message, result: bytes) -> None:
        arguments = self._arguments(message, result)
        await anyio.to_thread.run_sync(lambda: self.client.send_message(**arguments))

    async def write_many(
        self, results: Sequence[tuple[Message, bytes]]
    ) -> list[BaseException | None]:
        """Up to ten results in one request (fewer when they would pass SQS's 256 KiB)."""
        failures: list[BaseException | None] = []
        for chunk in _chunks(results, _BATCH_BYTES):
            entries: list[dict[str, Any]] = []
            for i, (message, result) in enumerate(chunk):
                entry = {"Id": str(i), **self._arguments(message, result)}
                del entry["QueueUrl"]
                entries.append(entry)
            reply = await anyio.to_thread.run_sync(self._send_batch, entries)
            failures += _failures(reply, len(chunk))
        return failures

    def _send_batch(self, entries: list[dict[str, Any]]) -> Any:
        return self.client.send_message_batch(QueueUrl=self.queue_url, Entries=entries)


class S3Sink:
    """Each result as an object, ``{prefix}{message id}{suffix}``: written once per message.

    Added in 0.5.
    """

    def __init__(
        self, bucket: str, *, prefix: str = "", suffix: str = ".json", client: Any = None
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.suffix = suffix
        self.client = _client("s3", client)

    async def write(self, message: Message, result: bytes) -> None:
        key = f"{self.prefix}{message.id}{self.suffix}"
        await anyio.to_thread.run_sync(
            lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=result)
        )


class CallbackSink:
    """Each result handed to your function ``write(message, result)``, plain or ``async``.

    A plain function runs in a worker thread. Raise to have the message
    delivered again.

    Added in 0.5.
    """

    def __init__(self, write: Callable[[Message, bytes], Awaitable[None] | None]) -> None:
        self.function = write

    async def write(self, message: Message, result: bytes) -> None:
        if inspect.iscoroutinefunction(self.function) or inspect.iscoroutinefunction(
            getattr(self.function, "__call__", None)  # noqa: B004 - an async callable object
        ):
            await self.function(message, result)  # type: ignore[misc]
            return
        # Boxed: trio refuses a thread's function that returns a coroutine.
        (made,) = await anyio.to_thread.run_sync(lambda: (self.function(message, result),))
        if inspect.isawaitable(made):  # a plain function that hands back a coroutine
            await made


def read_object(url: str, *, client: Any = None) -> bytes:
    """The bytes of an object at ``s3://bucket/key``, for a handler's ``preprocess``.

    Blocks: call it from a plain ``def preprocess`` (which mds runs in a
    worker thread), not an ``async def`` one.

    Raises:
        InvalidInput: the URL is not an ``s3://`` URL.

    Added in 0.5.
    """
    from .._errors import InvalidInput

    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc or not parsed.path.strip("/"):
        raise InvalidInput(f"{url!r} is not an s3://bucket/key URL")
    reply = _client("s3", client).get_object(Bucket=parsed.netloc, Key=parsed.path[1:])
    body: bytes = reply["Body"].read()
    return body
