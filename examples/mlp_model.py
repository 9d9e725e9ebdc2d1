"""A small torch MLP classifier as an mds handler, shared by the app examples.

The network is built in code with fixed seeds, so every run serves the same
model without downloading weights.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

import mds

FEATURES = 16
LABELS = ("cat", "dog", "fox", "owl")
_BUILDING = threading.Lock()


class MLPClassifier(mds.ModelHandler[list[float], dict[str, Any]]):
    """``[16 floats]`` → ``{"label": ..., "scores": {...}}``.

    The same handler serves the Open Inference Protocol: a protocol request's
    ``features`` tensor becomes the list (``from_tensors``) and the response
    becomes a ``label`` and a ``probabilities`` tensor (``to_tensors``), so
    one model (one batcher, one copy of the weights) answers both routes.
    Its ``signature`` lets mds check protocol requests per row, and split
    a batch of rows (``[N, 16]``, as Triton's clients send) through the batcher.
    """

    def init(self, context: mds.ModelContext) -> None:
        torch.set_num_threads(1)
        self.device = torch.device(context.device.name)
        # torch's random generator is process-wide and models start in
        # parallel: seed and build under a lock, so every copy is the same.
        with _BUILDING:
            torch.manual_seed(0)
            net = torch.nn.Sequential(
                torch.nn.Linear(FEATURES, 64),
                torch.nn.ReLU(),
                torch.nn.Linear(64, len(LABELS)),
            )
        self.net = net.to(self.device).eval()

    def warmup(self) -> list[list[float]]:
        return [[0.0] * FEATURES, [1.0] * FEATURES]

    async def preprocess(self, request: list[float]) -> torch.Tensor:
        if not isinstance(request, list) or len(request) != FEATURES:
            raise mds.InvalidInput(f"expected a list of {FEATURES} numbers")
        return torch.tensor(request, dtype=torch.float32)

    def infer(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.net(torch.stack(list(batch)).to(self.device))
            return torch.softmax(logits, dim=1).cpu()

    async def postprocess(self, scores: torch.Tensor) -> dict[str, Any]:
        values = scores.tolist()
        best = max(range(len(LABELS)), key=values.__getitem__)
        return {"label": LABELS[best], "scores": dict(zip(LABELS, values, strict=True))}

    # -- the Open Inference Protocol: named tensors in and out -------------

    def signature(self) -> tuple[dict[str, mds.TensorSpec], dict[str, mds.TensorSpec]]:
        return (
            {"features": mds.TensorSpec(name="features", dtype="float32", shape=(FEATURES,))},
            {
                "label": mds.TensorSpec(name="label", dtype="object", shape=()),
                # labels: the protocol's classification names the classes.
                "probabilities": mds.TensorSpec(
                    name="probabilities", dtype="float32", shape=(len(LABELS),), labels=LABELS
                ),
            },
        )

    def from_tensors(self, tensors: dict[str, Any]) -> list[float]:
        return list(tensors["features"].tolist())  # one row, checked against the signature

    def to_tensors(self, response: dict[str, Any]) -> dict[str, Any]:
        scores = response["scores"]
        probabilities = np.array([scores[label] for label in LABELS], dtype=np.float32)
        return {"label": response["label"], "probabilities": probabilities}


class MLPRanked(MLPClassifier):
    """The same network, streaming: the labels from most to least likely, one at a time."""

    def postprocess(self, scores: torch.Tensor) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        values = scores.tolist()
        for index in sorted(range(len(LABELS)), key=values.__getitem__, reverse=True):
            yield {"label": LABELS[index], "score": values[index]}

    def signature(self) -> tuple[dict[str, mds.TensorSpec], dict[str, mds.TensorSpec]]:
        inputs, _ = super().signature()
        return inputs, {
            "label": mds.TensorSpec(name="label", dtype="object", shape=()),
            "score": mds.TensorSpec(name="score", dtype="float32", shape=()),
        }

    def to_tensors(self, chunk: dict[str, Any]) -> dict[str, Any]:
        return {"label": chunk["label"], "score": np.float32(chunk["score"])}  # one chunk


CONFIG = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=32), timeout=2.0)
