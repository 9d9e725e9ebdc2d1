"""m1: turns a sentence into a bag-of-words vector (hashed into 64 buckets)."""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np

import mds

DIMENSIONS = 64


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


class Featurizer(mds.ModelHandler[str, np.ndarray]):
    """A batched feature extractor: one row of word counts per sentence."""

    def preprocess(self, request: str) -> list[str]:
        if not isinstance(request, str) or not request.strip():
            raise mds.InvalidInput(f"expected a non-empty sentence, got {request!r}")
        return words(request)

    def infer(self, batch: Sequence[list[str]]) -> np.ndarray:
        counts = np.zeros((len(batch), DIMENSIONS), dtype=np.float32)
        for row, tokens in enumerate(batch):
            for token in tokens:
                counts[row, zlib.crc32(token.encode()) % DIMENSIONS] += 1.0
        return counts
