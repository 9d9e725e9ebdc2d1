"""What the graph backends share: a model file with named input and output tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from .._handler import ModelHandler
from .._tensors import InputCheck, TensorSpec
from .._threads import plain_as

__all__ = ["GraphHandler"]


class GraphHandler(ModelHandler[Any, Any]):
    """A model whose inputs and outputs are named tensors (ONNX, TensorFlow).

    A subclass fills in ``inputs`` and ``outputs`` (with the batch axis, as
    the model declares them), ``batched`` and ``_check`` in ``init``; this
    gives the request path: checked requests, stacked batches, split outputs.
    """

    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    examples: list[Any] | None
    batched: bool
    _check: InputCheck

    def warmup(self) -> Sequence[Any] | None:
        return self.examples

    def signature(self) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
        """The model's inputs and outputs as one request carries them.

        With a batch axis, a request is one item: the axis is left out.
        """
        if not self.batched:
            return dict(self.inputs), dict(self.outputs)

        def item(specs: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
            return {
                name: msgspec.structs.replace(spec, shape=spec.shape[1:])
                for name, spec in specs.items()
            }

        return item(self.inputs), item(self.outputs)

    # -- a request --------------------------------------------------------------

    @plain_as("check")  # mds calls check itself, on the loop
    async def preprocess(self, request: Any) -> Any:
        """Check the request against the model's inputs (see :meth:`check`).

        Cheap, so it runs on the event loop (no thread hop). A subclass that
        decodes or tokenises should override it with a plain ``def`` that
        calls :meth:`check` at the end.
        """
        return self.check(request)

    def check(self, request: Any) -> dict[str, np.ndarray]:
        """The request as input arrays, checked against the model's inputs.

        Lists become arrays of the input's dtype; an array must have the
        input's dtype already. Call it from your own ``preprocess``.

        Raises:
            InvalidInput: a missing or unknown input, a wrong dtype or shape.
        """
        return self._check(request)

    # -- a batch ----------------------------------------------------------------

    def collate(self, items: Sequence[Any]) -> Any:
        if not self.batched:
            return items[0]
        return super().collate(items)

    def split(self, outputs: Any, batch: Any) -> Sequence[Any]:
        if not self.batched:
            return outputs  # type: ignore[no-any-return]
        return super().split(outputs, batch)
