"""The nodes of examples/scoring/pipeline.yaml: a card-transaction fraud scorer.

feature extraction -> feature preprocessing -> model -> business logic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

import mds

FEATURES = ("log_amount", "night", "foreign", "new_merchant", "velocity")


def extract_features(request: dict[str, Any]) -> dict[str, float]:
    """Raw transaction -> named features (feature extraction)."""
    try:
        amount = float(request["amount"])
        hour = int(request["hour"])
    except (KeyError, TypeError, ValueError) as exc:
        raise mds.InvalidInput(f"a transaction needs a numeric amount and hour: {exc}") from None
    return {
        "log_amount": math.log1p(max(amount, 0.0)),
        "night": 1.0 if hour < 6 else 0.0,
        "foreign": 1.0 if request.get("country", "GB") != "GB" else 0.0,
        "new_merchant": 1.0 if request.get("first_time_merchant") else 0.0,
        "velocity": float(request.get("transactions_last_hour", 0)),
    }


MEANS = np.array([4.0, 0.25, 0.2, 0.3, 1.5], dtype=np.float32)
SCALES = np.array([1.5, 0.43, 0.4, 0.46, 2.0], dtype=np.float32)


def standardise(features: dict[str, float]) -> np.ndarray:
    """Named features -> the model's standardised input row (feature preprocessing)."""
    row = np.array([features[name] for name in FEATURES], dtype=np.float32)
    return (row - MEANS) / SCALES


class FraudModel(mds.ModelHandler[np.ndarray, float]):
    """A logistic model with fixed, hand-set weights (torch), batched."""

    collator = mds.Stack()

    def init(self, context: mds.ModelContext) -> None:
        torch.set_num_threads(context.threads or 1)
        self.linear = torch.nn.Linear(len(FEATURES), 1)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[1.2, 0.8, 0.9, 0.7, 1.1]]))
            self.linear.bias.fill_(-2.5)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.sigmoid(self.linear(torch.from_numpy(batch)))[:, 0].numpy()

    def split(self, outputs: np.ndarray, batch: Any) -> Sequence[float]:
        return [float(p) for p in outputs]


def decide(probability: float, request: dict[str, Any]) -> dict[str, Any]:
    """Score -> decision (business logic): the thresholds are policy, not model."""
    limit = 0.5 if float(request["amount"]) < 1000 else 0.3
    action = "block" if probability >= 0.9 else "review" if probability >= limit else "approve"
    return {"id": request.get("id"), "fraud_probability": round(probability, 3), "action": action}
