"""Churn risk: logistic regression over four account features, weights in weights.json."""

import json
from pathlib import Path

import numpy as np

import mds


class Churn(mds.ModelHandler[list[float], dict[str, object]]):
    def __init__(self, path: Path) -> None:
        self.path = path  # this version's folder; read in init, not here

    def init(self, context: mds.ModelContext) -> None:
        weights = json.loads((self.path / "weights.json").read_text())
        self.w = np.asarray(weights["w"], np.float32)
        self.b = np.float32(weights["b"])
        self.version = context.version

    def warmup(self) -> list[list[float]]:
        return [[0.0, 0.0, 0.0, 0.0]]

    def preprocess(self, request: list[float]) -> np.ndarray:
        x = np.asarray(request, np.float32)
        if x.shape != (4,):
            raise mds.InvalidInput(f"expected 4 features, got shape {x.shape}")
        return x

    # The Open Inference Protocol (Triton's clients): a "features" tensor of
    # 4 floats per row in, a "risk" float per row out.
    def signature(self) -> tuple[dict[str, mds.TensorSpec], dict[str, mds.TensorSpec]]:
        features = mds.TensorSpec(name="features", dtype="float32", shape=(4,))
        risk = mds.TensorSpec(name="risk", dtype="float32", shape=())
        return {"features": features}, {"risk": risk}

    def from_tensors(self, tensors: dict[str, np.ndarray]) -> list[float]:
        return tensors["features"].tolist()

    def to_tensors(self, response: dict[str, object]) -> dict[str, object]:
        return {"risk": np.float32(response["risk"])}

    def infer(self, batch: list[np.ndarray]) -> list[dict[str, object]]:
        risk = 1 / (1 + np.exp(-(np.stack(batch) @ self.w + self.b)))
        return [{"risk": round(float(r), 4), "version": self.version} for r in risk]
