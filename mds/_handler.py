"""The handler base class, its context, and the lifecycle states."""

# No `from __future__ import annotations`: msgspec reads these annotations at
# run time, and mds/__init__.py gives the classes the public module "mds".

import abc
import enum
from collections.abc import Awaitable, Hashable, Sequence
from typing import Any, ClassVar, Generic, cast

import msgspec
from typing_extensions import TypeVar

from ._collate import Collator
from ._config import ModelConfig
from ._devices.device import Device
from ._stateful import SequenceEnd, SequenceId
from ._tensors import Signature

__all__ = ["ModelContext", "ModelHandler", "ModelState"]

RequestT = TypeVar("RequestT", default=Any)
ResponseT = TypeVar("ResponseT", default=Any)


class ModelState(enum.Enum):
    """Where a model is in its lifecycle.

    ``CREATED → LOADING → WARMING → READY → DRAINING → STOPPED``, or
    ``FAILED`` (with a reason) when ``init`` or warm-up raised. A ``FAILED``
    or ``STOPPED`` model can be started again. Only a ``READY`` model takes
    requests.

    Added in 0.1.
    """

    CREATED = "created"
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class ModelContext(msgspec.Struct, frozen=True, kw_only=True):
    """What a handler instance is told when it is initialised.

    Attributes:
        name: the model's name.
        version: the model's version.
        device: the device this instance must use; the handler never picks one.
        instance: this instance's index among the model's instances.
        config: the model's whole serving config.
        threads: on the CPU, how many intra-op threads this instance may
            use (``ModelConfig.cpu_threads``, or the usable cores shared
            among the model's CPU instances); ``None`` on other devices.
            The backends apply it; a handler of your own should too.

    Added in 0.1.
    """

    name: str
    version: str
    device: Device
    instance: int
    config: ModelConfig
    threads: int | None = None

    @property
    def parameters(self) -> dict[str, Any]:
        """The handler's own settings: ``config.parameters``."""
        return self.config.parameters


class ModelHandler(abc.ABC, Generic[RequestT, ResponseT]):
    """Base class for a served model: subclass it and implement ``infer``.

    The runtime calls the methods in lifecycle order: ``init`` once per
    instance, ``warmup`` (its examples run through the real path), then for
    each request ``preprocess`` → (batched) ``infer`` → ``postprocess``,
    ``health`` when asked, and ``teardown`` on stop.

    Any method may be a plain ``def`` or an ``async def``. Plain methods are
    assumed to block (model calls, decoding) and run in a worker thread, never
    on the event loop; write a method as ``async def`` when it is cheap and
    does not block, and it runs on the loop with no thread hop.

    ``preprocess``, ``postprocess`` and ``health`` may run concurrently for
    different requests; ``init``, ``infer`` and ``teardown`` of one instance
    never overlap.

    Between ``preprocess`` and ``infer`` the batcher groups items: ``cost``
    says how much of ``max_batch_size`` an item takes, ``bucket`` which
    items may share a batch, and ``collate`` / ``split`` (or a ``collator``
    such as :class:`mds.Stack` or :class:`mds.Pad`) turn items into
    ``infer``'s input and its output back into one output per item.

    Type parameters: ``RequestT`` is what callers send, ``ResponseT`` what
    they get back.

    Example:
        >>> class Doubler(mds.ModelHandler[float, float]):
        ...     def infer(self, batch: Sequence[float]) -> list[float]:
        ...         return [2 * x for x in batch]

    Added in 0.1.
    """

    #: Collates items for ``infer`` and splits its output; ``None`` gives
    #: ``infer`` the list of items and takes its output as one per item.
    collator: ClassVar[Collator | None] = None

    #: What the model runs on, as the Open Inference Protocol's metadata
    #: reports it (``"pytorch"``, ``"onnxruntime_onnx"``, ...). Added in 0.3.
    platform: ClassVar[str] = "python"

    def init(self, context: ModelContext) -> Awaitable[None] | None:
        """Load weights, sessions and tokenizers onto ``context.device``.

        Raise to fail the start; the model goes to ``FAILED`` with the cause.
        """
        return None

    def warmup(self) -> Sequence[RequestT] | Awaitable[Sequence[RequestT] | None] | None:
        """Give example requests for warm-up, or ``None`` for none.

        Before the model reports ready, the runtime runs these examples
        through ``preprocess``, ``infer`` (at each warm-up batch size, see
        :attr:`ModelConfig.warmup_batch_sizes`) and ``postprocess`` on every
        instance. Any error fails the start.
        """
        return None

    def health(self) -> bool | Awaitable[bool]:
        """Check this instance; return ``False`` or raise when it is unwell."""
        return True

    def preprocess(self, request: RequestT) -> Any:
        """Turn one request into one model input: decode, validate, featurise.

        Runs per request, outside the batch. An exception here fails this
        request alone with :class:`mds.InvalidInput`.
        """
        return request

    def cost(self, item: Any) -> int:
        """How much of ``max_batch_size`` this preprocessed item takes; 1 by default.

        Give tokens, pixels or rows, so that a batch never holds more than
        the model can take. Runs on the event loop for every request: keep it
        cheap. An item that costs more than ``max_batch_size`` is rejected.
        """
        return 1

    def bucket(self, item: Any) -> Hashable:
        """Items share a batch only with items of the same bucket.

        By default the collator's ``bucket`` (see :class:`mds.Pad`), else
        one bucket for all. Runs on the event loop for every request.
        """
        collator = self.collator
        bucket = getattr(collator, "bucket", None)
        return bucket(item) if bucket is not None else None

    def collate(self, items: Sequence[Any]) -> Any:
        """Make ``infer``'s input from preprocessed items.

        By default the collator's ``collate``, else the list of items. Runs
        with ``infer`` (in its thread when ``infer`` is a plain method).
        """
        collator = self.collator
        return collator.collate(items) if collator is not None else list(items)

    @abc.abstractmethod
    def infer(self, batch: Any) -> Sequence[Any] | Awaitable[Sequence[Any]]:
        """Compute a batch: one output per preprocessed item, in order.

        ``batch`` is what ``collate`` made: by default the list of
        preprocessed items. Return an exception instance in an item's place
        to fail that item alone. Returning more or fewer outputs than items
        fails the batch; raising fails it too, and the batcher retries its
        halves to find the items at fault.
        """

    def split(self, outputs: Any, batch: Any) -> Sequence[Any]:
        """Make one output per item from ``infer``'s ``outputs`` for ``batch``.

        By default the collator's ``split``, else ``outputs`` as they are (a
        list, or an array or tensor split into rows).
        """
        collator = self.collator
        return collator.split(outputs, batch) if collator is not None else outputs

    def postprocess(self, output: Any) -> ResponseT | Awaitable[ResponseT]:
        """Shape one item's output into the response its caller gets."""
        return cast(ResponseT, output)

    def teardown(self) -> Awaitable[None] | None:
        """Release what ``init`` acquired. Called once per started instance."""
        return None

    def sequence_start(self, sequence_id: SequenceId) -> Any:
        """A stateful model's sequence starts: return its first state (``None`` by default).

        Runs on the instance that computes the sequence's first step, just
        before that step's batch, as ``infer`` runs (in its thread, for a
        plain ``infer``). The first step's :attr:`SequenceStep.state` is what
        this returns. Keep state of your own keyed by ``sequence_id`` here
        instead, if you prefer, and release it in :meth:`sequence_end`.
        Raising fails the first step, and the sequence does not start.

        Added in 0.5.
        """
        return None

    def sequence_end(
        self, sequence_id: SequenceId, state: Any, reason: SequenceEnd
    ) -> Awaitable[None] | None:
        """A stateful model's sequence ended: release what it held.

        Called once for every sequence whose :meth:`sequence_start` ran,
        whatever ended it (``reason``: its client, its idle timeout, a
        cancelled step, a step past its deadline, a failed first step, the
        model stopping or being swapped), on the instance where it started, never during its own
        steps. ``state`` is its last state. An exception is logged.

        Added in 0.5.
        """
        return None

    def from_tensors(self, tensors: dict[str, Any]) -> RequestT:
        """The request that one Open Inference Protocol request's tensors make.

        ``tensors`` maps each input's name to its numpy array (one row: a
        batch axis sent by the client is split off first). By default the
        dict itself is the request. Override it, with :meth:`to_tensors`,
        so that one handler serves both mds's JSON route (its own request
        type) and the protocol (named tensors), with one batcher and one
        copy of the weights. Runs on the event loop for every protocol
        request: keep it cheap. Raise :class:`mds.InvalidInput` for tensors
        that make no request.

        Example:
            >>> def from_tensors(self, tensors):
            ...     return tensors["features"].tolist()

        Added in 0.3.
        """
        return cast(RequestT, tensors)

    def to_tensors(self, response: ResponseT) -> Any:
        """The output tensors for one response, for the Open Inference Protocol.

        Return a mapping of output name to value (arrays, tensors, numbers,
        lists, strings), or one value: it is named after the model's single
        declared output (see :meth:`signature`), else ``output0``. By
        default the response as it is. Runs on the event loop: keep it cheap.

        Added in 0.3.
        """
        return response

    def signature(self) -> Signature | None:
        """The named tensors one request carries and one response gives, if known.

        Called after ``init``. The transports' metadata routes report it (the
        Open Inference Protocol's model metadata), and name a single
        unnamed response after its one output. ``None`` (the default) when
        the handler does not say. :class:`mds.OnnxHandler` reads it from
        the model.

        Added in 0.2.
        """
        return None
