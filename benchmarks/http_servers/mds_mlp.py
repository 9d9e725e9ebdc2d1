"""The benchmark MLP as an mds handler: for mds_app.py and the repository `mds serve` serves."""

from __future__ import annotations

from typing import Any

from model import MAX_BATCH, MAX_DELAY, make_model, run_batch

import mds


class MLP(mds.ModelHandler[dict[str, Any], dict[str, Any]]):
    def init(self, context: mds.ModelContext) -> None:
        self.model = make_model()

    def warmup(self) -> list[dict[str, Any]]:
        return [{"x": [0.0] * 256}]

    def infer(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Everything per batch in the instance's thread: the loop only routes.
        return [{"y": y} for y in run_batch(self.model, [r["x"] for r in batch])]


#: mds's batching in every arm: the peers' settings (model.py).
CONFIG = mds.ModelConfig(
    batching=mds.BatchingConfig(max_batch_size=MAX_BATCH, max_queue_delay=MAX_DELAY),
    warmup_batch_sizes=(1, MAX_BATCH),
)
