"""The benchmark's model: a small torch MLP (256 -> 1024 -> 1024 -> 16), one thread."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

torch.set_num_threads(1)
torch.set_num_interop_threads(1)

MAX_BATCH = 32
MAX_DELAY = 0.002  # seconds


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 16),
    )
    return model.eval()


def run_batch(model: torch.nn.Module, rows: list[list[float]]) -> list[list[float]]:
    """One forward pass over a batch of rows; one output row per input row."""
    with torch.inference_mode():
        x = torch.from_numpy(np.asarray(rows, dtype=np.float32))
        return model(x).tolist()


def run_uvicorn(app: Any, port: int) -> None:
    """Serve ``app`` as every uvicorn arm does: uvloop, httptools, no access log."""
    import uvicorn

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )
