"""The benchmark MLP as a repository model (model.py is on the server's PYTHONPATH)."""

from pathlib import Path
from typing import Any

from model import make_model, run_batch

import mds


class MLP(mds.ModelHandler[dict[str, Any], dict[str, Any]]):
    def __init__(self, path: Path) -> None:
        self.path = path

    def init(self, context: mds.ModelContext) -> None:
        self.model = make_model()

    def warmup(self) -> list[dict[str, Any]]:
        return [{"x": [0.0] * 256}]

    def infer(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"y": y} for y in run_batch(self.model, [r["x"] for r in batch])]
