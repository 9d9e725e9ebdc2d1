"""Amazon SQS as a worker's source and sink, S3 as a sink and for reading objects; through boto3.

boto3 blocks, so every call runs in a worker thread (the event loop, asyncio
or trio, never waits on the network), each source's and sink's in threads of
its own (see :class:`Lane`). Pass your own boto3 clients (for an endpoint,
credentials, a region), or let these make default ones.
"""

from __future__ import annotations

import inspect
import json
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlparse

from .._deps import require
from .._errors import ConfigError, InvalidInput, Unavailable, describe
from .broker import Lane, Message

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
#: Threads for one source's or sink's calls at once.
_THREADS = 8
#: Messages whose deliveries a source counts itself (when SQS does not say).
_COUNTED = 65536

#: AWS error codes that no retry fixes: the queue or bucket named is not
#: there, or the credentials may not use it.
_WRONG = {
    "AWS.SimpleQueueService.NonExistentQueue",
    "QueueDoesNotExist",
    "InvalidAddress",
    "AccessDenied",
    "AccessDeniedException",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "NoSuchBucket",
    "404",  # HeadBucket's codes: its replies have no body
    "403",
}
#: S3's codes for an object that is not there: the request's fault, no retry fixes it.
#: Any other error (an expired token is a 400 too) may pass.
_NO_OBJECT = {"NoSuchKey", "NoSuchBucket", "InvalidBucketName", "KeyTooLongError", "404"}
#: The most an SQS message may be, body and attributes together.
_LARGEST_MESSAGE = 256 * 1024
#: botocore's errors of a client set up wrong.
_WRONG_SETUP = {"NoRegionError", "NoCredentialsError", "PartialCredentialsError"}


def _code(exc: BaseException) -> str | None:
    """An AWS error's code (``NoSuchKey``, ...); ``None`` for an error of another kind."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = response.get("Error", {}).get("Code")
    return str(code) if code is not None else None


def _as_config_error(exc: Exception, what: str) -> Exception:
    """``exc`` as a :class:`ConfigError` about ``what`` if no retry would fix it; else itself."""
    if _code(exc) in _WRONG or type(exc).__name__ in _WRONG_SETUP:
        return ConfigError(f"{what}: {describe(exc)}")
    return exc


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


async def _checked(lane: Lane, call: Callable[[], Any], what: str) -> None:
    """Make ``call`` (a check); an error no retry fixes as a :class:`ConfigError` about ``what``."""
    try:
        await lane.run(call)
    except Exception as exc:
        raise _as_config_error(exc, what) from None


def _queue_exists(client: Any, url: str) -> None:
    client.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])


def _client(service: str, client: Any) -> Any:
    if client is not None:
        return client
    boto3 = require("boto3", feature="mds.workers' SQS and S3")
    return boto3.client(service)


def _seconds(value: float, most: int) -> int:
    """Whole seconds, as SQS takes them: ``value`` rounded."""
    return max(0, min(most, round(value)))


def _at_least(value: float, most: int) -> int:
    """Whole seconds, at least ``value``: a backoff of 0.3 s is 1 s, not none."""
    return max(0, min(most, math.ceil(value)))


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
        self._lane = Lane(_THREADS)
        # Deliveries counted here, by message id, for an endpoint that does
        # not report ApproximateReceiveCount: else nothing would reach max_deliveries.
        self._deliveries: OrderedDict[str, int] = OrderedDict()

    def __repr__(self) -> str:
        return f"<mds.workers.SqsSource {self.queue_url}>"

    async def _call(self, method: str, **arguments: Any) -> Any:
        return await self._lane.run(lambda: getattr(self.client, method)(**arguments))

    async def check(self) -> None:
        """That the queue exists and failed messages have somewhere to go.

        Raises:
            ConfigError: no such queue (or no access to it); no ``dead_letters``
                queue and no redrive policy; a ``dead_letters`` queue that
                does not exist.
        """
        await _checked(
            self._lane,
            lambda: _queue_exists(self.client, self.queue_url),
            f"the queue {self.queue_url}",
        )
        dead = self._dead_letters
        if dead is not None:
            await _checked(
                self._lane,
                lambda: _queue_exists(self.client, dead),
                f"the dead letters queue {dead}",
            )
        try:
            await self._dead_letter_url()
        except ConfigError:
            raise
        except Exception as exc:  # the redrive policy's queue is gone, say
            raise _as_config_error(exc, f"the dead letters of {self.queue_url}") from None

    def _count(self, message_id: str, reported: Any) -> int:
        """The delivery count: SQS's, or this source's own when SQS gives none."""
        if reported is not None:
            return int(reported)
        counted = self._deliveries.pop(message_id, 0) + 1
        self._deliveries[message_id] = counted
        if len(self._deliveries) > _COUNTED:
            self._deliveries.popitem(last=False)
        return counted

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
                    deliveries=self._count(
                        raw["MessageId"], raw.get("Attributes", {}).get("ApproximateReceiveCount")
                    ),
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
            VisibilityTimeout=_at_least(delay, _LONGEST_VISIBILITY),
        )

    async def extend(self, messages: Sequence[Message], seconds: float) -> None:
        """Every message's visibility, ten a request; then an error naming those that failed."""
        timeout = _at_least(seconds, _LONGEST_VISIBILITY)
        failed: list[str] = []
        for start in range(0, len(messages), _MOST):
            chunk = messages[start : start + _MOST]
            entries = [
                {"Id": str(i), "ReceiptHandle": m.handle, "VisibilityTimeout": timeout}
                for i, m in enumerate(chunk)
            ]
            try:
                reply = await self._call(
                    "change_message_visibility_batch", QueueUrl=self.queue_url, Entries=entries
                )
            except Exception as exc:
                failed += [f"{m.id} ({describe(exc)})" for m in chunk]
                continue
            for message, error in zip(chunk, _failures(reply, len(chunk)), strict=True):
                if error is not None:
                    failed.append(f"{message.id} ({error})")
        if failed:
            raise RuntimeError(
                f"{len(failed)} of {len(messages)} messages were not extended: "
                + "; ".join(failed[:5])
                + ("; ..." if len(failed) > 5 else "")
            )

    async def dead_letter(self, message: Message, reason: str) -> None:
        target = await self._dead_letter_url()
        body = message.body.decode("utf-8", "replace")
        # The body came within SQS's limit; the attributes must not take it past.
        room = _LARGEST_MESSAGE - len(body.encode()) - len(message.id) - 64
        reason = (reason or "-")[: max(1, room // 4)]  # characters of up to 4 bytes
        await self._call(
            "send_message",
            QueueUrl=target,
            MessageBody=body,
            MessageAttributes={
                ID_ATTRIBUTE: {"DataType": "String", "StringValue": message.id},
                ERROR_ATTRIBUTE: {"DataType": "String", "StringValue": reason},
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
                    "dead_letters queue: failed messages would have nowhere to go; give "
                    "SqsSource(dead_letters=...) or the queue a redrive policy"
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
        self._lane = Lane(_THREADS)

    def __repr__(self) -> str:
        return f"<mds.workers.SqsSink {self.queue_url}>"

    async def check(self) -> None:
        """That the queue exists.

        Raises:
            ConfigError: no such queue, or no access to it.
        """
        await _checked(
            self._lane,
            lambda: _queue_exists(self.client, self.queue_url),
            f"the results queue {self.queue_url}",
        )

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
        await self._lane.run(lambda: self.client.send_message(**arguments))

    async def write_many(
        self, results: Sequence[tuple[Message, bytes]]
    ) -> list[BaseException | None]:
        """Up to ten results a request (fewer when they would pass SQS's 256 KiB).

        A request that fails fails its own results, not the others'.
        """
        failures: list[BaseException | None] = []
        for chunk in _chunks(results, _BATCH_BYTES):
            entries: list[dict[str, Any]] = []
            for i, (message, result) in enumerate(chunk):
                entry = {"Id": str(i), **self._arguments(message, result)}
                del entry["QueueUrl"]
                entries.append(entry)
            try:
                reply = await self._lane.run(self._send_batch, entries)
            except Exception as exc:
                failures += [exc] * len(chunk)
                continue
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
        self._lane = Lane(_THREADS)

    def __repr__(self) -> str:
        return f"<mds.workers.S3Sink s3://{self.bucket}/{self.prefix}>"

    async def check(self) -> None:
        """That the bucket exists.

        Raises:
            ConfigError: no such bucket, or no access to it.
        """
        await _checked(
            self._lane,
            lambda: self.client.head_bucket(Bucket=self.bucket),
            f"the bucket {self.bucket}",
        )

    async def write(self, message: Message, result: bytes) -> None:
        key = f"{self.prefix}{message.id}{self.suffix}"
        await self._lane.run(
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
        self._lane = Lane(16)

    async def write(self, message: Message, result: bytes) -> None:
        if inspect.iscoroutinefunction(self.function) or inspect.iscoroutinefunction(
            getattr(self.function, "__call__", None)  # noqa: B004 - an async callable object
        ):
            await self.function(message, result)  # type: ignore[misc]
            return
        # Boxed: trio refuses a thread's function that returns a coroutine.
        (made,) = await self._lane.run(lambda: (self.function(message, result),))
        if inspect.isawaitable(made):  # a plain function that hands back a coroutine
            await made


def read_object(url: str, *, client: Any = None) -> bytes:
    """The bytes of an object at ``s3://bucket/key``, for a handler's ``preprocess``.

    Blocks: call it from a plain ``def preprocess`` (which mds runs in a
    worker thread), not an ``async def`` one.

    Raises:
        InvalidInput: the URL is not an ``s3://`` URL, or there is no such
            bucket or object (the request's fault: a queue worker sends the
            message to the dead letters).
        Unavailable: anything else (throttling, a timeout, S3 unreachable,
            access denied, credentials expired): a queue worker delivers the
            message again later.

    Added in 0.5.
    """
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc or not parsed.path.strip("/"):
        raise InvalidInput(f"{url!r} is not an s3://bucket/key URL")
    try:
        reply = _client("s3", client).get_object(Bucket=parsed.netloc, Key=parsed.path[1:])
        body: bytes = reply["Body"].read()
    except Exception as exc:
        if _code(exc) in _NO_OBJECT:
            raise InvalidInput(f"cannot read {url}: {describe(exc)}") from None
        raise Unavailable(f"reading {url} failed: {describe(exc)}") from exc
    return body
