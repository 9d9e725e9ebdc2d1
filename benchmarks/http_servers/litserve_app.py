"""(c) LitServe with the same batch settings (runs in its own venv)."""

from __future__ import annotations

import sys

import litserve as ls
from model import MAX_BATCH, MAX_DELAY, make_model, run_batch


class MLPApi(ls.LitAPI):
    def setup(self, device):
        self.model = make_model()

    def decode_request(self, request):
        return request["x"]

    def batch(self, inputs):
        return inputs

    def predict(self, rows):
        return run_batch(self.model, rows)

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return {"y": output}


if __name__ == "__main__":
    server = ls.LitServer(
        MLPApi(max_batch_size=MAX_BATCH, batch_timeout=MAX_DELAY),
        accelerator="cpu",
        workers_per_device=1,
    )
    server.run(port=int(sys.argv[1]), generate_client_file=False)
