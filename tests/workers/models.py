"""The worker tests' models: numpy only, recording what they computed."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import mds


class Scorer(mds.ModelHandler[dict[str, Any], float]):
    """``{"x": [4 numbers]}`` -> their sum.

    ``"x"`` missing is the client's mistake (``InvalidInput``). ``"flaky"``
    fails its first computation (an ``InferenceError``), ``"doomed"`` every
    one. ``"sleep"`` seconds are slept per batch. Records each batch's size.
    """

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.failed_once: set[str] = set()
        self.lock = threading.Lock()
        self.computed: list[str] = []

    def preprocess(self, request: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(request, dict) or "x" not in request:
            raise mds.InvalidInput("a request needs 'x', four numbers")
        return request

    def infer(self, batch: Sequence[dict[str, Any]]) -> list[Any]:
        pause = max(float(item.get("sleep", 0)) for item in batch)
        if pause:
            time.sleep(pause)
        with self.lock:
            self.sizes.append(len(batch))
            found: list[Any] = []
            for item in batch:
                key = str(item.get("key", ""))
                self.computed.append(key)
                if item.get("doomed"):
                    found.append(mds.InferenceError("this one never works"))
                elif item.get("flaky") and key not in self.failed_once:
                    self.failed_once.add(key)
                    found.append(mds.InferenceError("a transient failure"))
                else:
                    found.append(float(sum(item["x"])))
            return found


def runtime_with(model: Scorer, max_batch_size: int = 16) -> mds.Runtime:
    runtime = mds.Runtime()
    batching = mds.BatchingConfig(max_batch_size=max_batch_size, max_queue_delay=0.005)
    runtime.add_model("scorer", lambda: model, mds.ModelConfig(batching=batching))
    return runtime
