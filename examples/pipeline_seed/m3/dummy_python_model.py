"""m3: a sentiment classifier (torch logistic regression, trained in ``init``)."""

from __future__ import annotations

import numpy as np
import torch
from m1.dummy_python_model import DIMENSIONS, Featurizer

import mds

TRAINING = [
    ("i love this, it is wonderful", 1),
    ("what a great and happy day", 1),
    ("excellent work, really good", 1),
    ("this is fantastic and lovely", 1),
    ("good food and great friends", 1),
    ("i like it a lot", 1),
    ("i hate this, it is awful", 0),
    ("what a terrible and sad day", 0),
    ("poor work, really bad", 0),
    ("this is horrible and ugly", 0),
    ("bad food and rude staff", 0),
    ("i dislike it a lot", 0),
]


class Sentiment(mds.ModelHandler[np.ndarray, dict[str, float | str]]):
    collator = mds.Stack()

    def init(self, context: mds.ModelContext) -> None:
        torch.manual_seed(0)
        torch.set_num_threads(context.threads or 1)
        featurizer = Featurizer()
        features = featurizer.infer([featurizer.preprocess(text) for text, _ in TRAINING])
        x = torch.from_numpy(features)
        y = torch.tensor([label for _, label in TRAINING], dtype=torch.float32)
        self.model = torch.nn.Linear(DIMENSIONS, 1)
        optimiser = torch.optim.SGD(self.model.parameters(), lr=0.5)
        for _ in range(300):
            optimiser.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(self.model(x)[:, 0], y)
            loss.backward()
            optimiser.step()
        self.model.eval()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.sigmoid(self.model(torch.from_numpy(batch))[:, 0]).numpy()

    def split(self, outputs: np.ndarray, batch: np.ndarray) -> list[float]:
        return [float(p) for p in outputs]

    def postprocess(self, output: float) -> dict[str, float | str]:
        return {
            "label": "positive" if output >= 0.5 else "negative",
            "p_positive": round(output, 3),
        }
