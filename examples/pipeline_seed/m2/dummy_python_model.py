"""m2: scales each feature vector to unit length (torch)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

import mds


class Normaliser(mds.ModelHandler[np.ndarray, np.ndarray]):
    collator = mds.Stack()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        rows = torch.from_numpy(batch)
        return torch.nn.functional.normalize(rows, dim=1).numpy()

    def split(self, outputs: np.ndarray, batch: Sequence[np.ndarray]) -> list[np.ndarray]:
        return list(outputs)
