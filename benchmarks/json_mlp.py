"""The benchmark MLP behind a JSON request, ``{"x": [256 floats]}`` -> 16 floats (on_ray.py)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from backends import make_mlp

import mds


def module() -> torch.nn.Module:
    """The benchmark MLP; ``ON_RAY_WIDTH`` (set by ``on_ray.py --width``) widens it."""
    return make_mlp(int(os.environ.get("ON_RAY_WIDTH", "1024")))


class JsonMLP(mds.ModelHandler[dict[str, Any], list[float]]):
    def init(self, context: mds.ModelContext) -> None:
        torch.set_num_threads(1)
        self.module = module()

    async def preprocess(self, request: dict[str, Any]) -> list[float]:
        # Cheap: on the loop (async def), as the docs advise, with no thread hop;
        # the rows become one array in infer, as in the @serve.batch arm.
        return request["x"]  # type: ignore[no-any-return]

    def infer(self, batch: Sequence[list[float]]) -> list[list[float]]:
        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.asarray(batch, dtype=np.float32)))
        return out.numpy().tolist()  # type: ignore[no-any-return]
