"""moto's server, with its SQS queues' message lists changed under the queue's lock.

moto (5.2.5) rebuilds a queue's list of messages on every delete without a
lock, so two DeleteMessageBatch requests at once can put a deleted message
back, where it stays invisible and is delivered again after its visibility
timeout. SQS does not do that, and the worker sends acknowledgements from
several threads; here a delete takes the lock moto's own appends take.

Run as ``python moto_server.py -H HOST -p PORT``, moto.server's arguments.
"""

from __future__ import annotations

import functools
from typing import Any

from moto.server import main
from moto.sqs.models import Queue


def _locked(delete: Any) -> Any:
    @functools.wraps(delete)
    def locked(self: Queue, receipt_handle: str) -> None:
        with self._messages_lock:
            delete(self, receipt_handle)

    return locked


Queue.delete_message = _locked(Queue.delete_message)  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
