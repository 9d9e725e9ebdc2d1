"""A small torch MLP classifier as an mds handler, shared by the app examples.

The network is built in code with fixed seeds, so every run serves the same
model without downloading weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

import mds

FEATURES = 16
LABELS = ("cat", "dog", "fox", "owl")


class MLPClassifier(mds.ModelHandler[list[float], dict[str, Any]]):
    """``[16 floats]`` → ``{"label": ..., "scores": {...}}``."""

    def init(self, context: mds.ModelContext) -> None:
        torch.manual_seed(0)
        torch.set_num_threads(1)
        self.device = torch.device(context.device.name)
        self.net = (
            torch.nn.Sequential(
                torch.nn.Linear(FEATURES, 64),
                torch.nn.ReLU(),
                torch.nn.Linear(64, len(LABELS)),
            )
            .to(self.device)
            .eval()
        )

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


CONFIG = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=32), timeout=2.0)
