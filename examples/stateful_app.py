"""A stateful model over HTTP: a recurrent network fed one audio frame at a time.

Each caller's session is a sequence. Its first frame starts it, its last
ends it, and between them mds carries the network's hidden state from one
frame to the next; the frames of many sessions run as one batch.

Run it:   python examples/stateful_app.py          (PORT=8000 by default)
Try it:   a frame of 16 numbers per request, the session in headers:

    frame=$(python -c 'print([0.1] * 16)')
    curl -s localhost:8000/models/keyword/infer -d "$frame" \
         -H 'Mds-Sequence-Id: call-7' -H 'Mds-Sequence-Start: true'
    curl -s localhost:8000/models/keyword/infer -d "$frame" -H 'Mds-Sequence-Id: call-7'
    curl -s localhost:8000/models/keyword/infer -d "$frame" \
         -H 'Mds-Sequence-Id: call-7' -H 'Mds-Sequence-End: true'

Triton's clients send the same as the protocol's parameters:
``client.infer("keyword", inputs, sequence_id=7, sequence_start=True)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from fastapi import FastAPI

import mds
import mds.fastapi

FEATURES, HIDDEN = 16, 32
KEYWORDS = ("silence", "yes", "no")


class KeywordSpotter(mds.ModelHandler[list[float], dict[str, Any]]):
    """A GRU over audio frames: after each frame, the keyword heard so far."""

    def init(self, context: mds.ModelContext) -> None:
        torch.manual_seed(0)  # stands in for trained weights
        torch.set_num_threads(context.threads or 1)
        self.cell = torch.nn.GRUCell(FEATURES, HIDDEN).eval()
        self.head = torch.nn.Linear(HIDDEN, len(KEYWORDS)).eval()

    def preprocess(self, frame: list[float]) -> torch.Tensor:
        if not isinstance(frame, list) or len(frame) != FEATURES:
            raise mds.InvalidInput(f"expected a frame of {FEATURES} numbers")
        return torch.tensor(frame, dtype=torch.float32)

    def sequence_start(self, sequence_id: int | str) -> torch.Tensor:
        return torch.zeros(HIDDEN)  # a new session starts from silence

    @torch.inference_mode()
    def infer(self, steps: Sequence[mds.SequenceStep[torch.Tensor, torch.Tensor]]) -> list[Any]:
        # One frame of each session in the batch, with that session's state.
        frames = torch.stack([step.input for step in steps])
        hidden = self.cell(frames, torch.stack([step.state for step in steps]))
        for step, state in zip(steps, hidden, strict=True):
            step.state = state  # what the session's next frame gets
        return list(self.head(hidden).softmax(dim=-1))

    def postprocess(self, probabilities: torch.Tensor) -> dict[str, Any]:
        best = int(probabilities.argmax())
        return {"keyword": KEYWORDS[best], "confidence": round(float(probabilities[best]), 4)}

    def sequence_end(self, sequence_id: int | str, state: Any, reason: mds.SequenceEnd) -> None:
        # Always called: the caller ended it, it went idle, its caller left, or we stop.
        print(f"session {sequence_id} ended: {reason.value}", flush=True)


runtime = mds.Runtime()
runtime.add_model(
    "keyword",
    KeywordSpotter,
    mds.ModelConfig(
        batching=mds.BatchingConfig(max_batch_size=32, max_queue_delay=0.002),
        sequences=mds.SequenceConfig(max_sequences=1000, idle_timeout=30.0),
    ),
)
app = FastAPI()
mds.fastapi.add_routes(app, runtime)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
