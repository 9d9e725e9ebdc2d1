"""(d) Mosec with the same batch settings (runs in its own venv)."""

from __future__ import annotations

import sys

from model import MAX_BATCH, MAX_DELAY, make_model, run_batch
from mosec import Server, Worker


class MLP(Worker):
    def __init__(self):
        super().__init__()
        self.model = make_model()

    def forward(self, data: list[dict]) -> list[dict]:
        return [{"y": y} for y in run_batch(self.model, [d["x"] for d in data])]


if __name__ == "__main__":
    port = sys.argv[1]
    sys.argv = [sys.argv[0], "--port", port, "--address", "127.0.0.1", "--log-level", "warning"]
    server = Server()
    server.append_worker(MLP, num=1, max_batch_size=MAX_BATCH, max_wait_time=int(MAX_DELAY * 1000))
    server.run()
