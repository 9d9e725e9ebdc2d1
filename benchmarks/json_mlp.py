"""The benchmark MLP behind a JSON request, ``{"x": [256 floats]}`` -> 16 floats (on_ray.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from backends import make_mlp

import mds


class JsonMLP(mds.ModelHandler[dict[str, Any], list[float]]):
    def init(self, context: mds.ModelContext) -> None:
        torch.set_num_threads(1)
        self.module = make_mlp().eval()

    def preprocess(self, request: dict[str, Any]) -> np.ndarray:
        return np.asarray(request["x"], dtype=np.float32)

    def infer(self, batch: Sequence[np.ndarray]) -> list[list[float]]:
        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.stack(batch)))
        return out.numpy().tolist()
