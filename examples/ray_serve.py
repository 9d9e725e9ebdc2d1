"""A model on Ray Serve: two replicas, each running an mds runtime, answering mds's routes.

Each replica builds the runtime (the function below), starts it, and serves
through mds's batcher; Ray Serve routes requests between the replicas. The
same clients work as against one process: a DeploymentHandle, mds's JSON
route and the Open Inference Protocol over Ray Serve's HTTP proxy.

Run it:   python examples/ray_serve.py      (pip install "mds-serving[ray]")
It starts a local Ray with two CPUs, and stops it at the end.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

import httpx
import numpy as np
import ray
from ray import serve

import mds
import mds.ray

FEATURES = 8


class Risk(mds.ModelHandler[list[float], float]):
    """Eight features -> the probability that a claim is fraudulent (a fixed logistic model)."""

    def init(self, context: mds.ModelContext) -> None:
        self.weights = np.random.default_rng(0).normal(size=FEATURES).astype(np.float32)

    def preprocess(self, request: list[float]) -> np.ndarray:
        features = np.asarray(request, dtype=np.float32)
        if features.shape != (FEATURES,):
            raise mds.InvalidInput(f"expected {FEATURES} features, got shape {features.shape}")
        return features

    def infer(self, batch: Sequence[np.ndarray]) -> list[float]:
        logits = np.stack(batch) @ self.weights
        return (1 / (1 + np.exp(-logits))).round(4).tolist()

    def signature(self) -> tuple[dict[str, mds.TensorSpec], dict[str, mds.TensorSpec]]:
        return (
            {"features": mds.TensorSpec(name="features", dtype="float32", shape=(FEATURES,))},
            {"risk": mds.TensorSpec(name="risk", dtype="float32", shape=())},
        )

    def from_tensors(self, tensors: dict[str, np.ndarray]) -> list[float]:
        return [float(v) for v in tensors["features"]]

    def to_tensors(self, response: float) -> dict[str, np.float32]:
        return {"risk": np.float32(response)}


def build() -> mds.Runtime:
    """The runtime each replica runs: the models, their batching."""
    runtime = mds.Runtime()
    batching = mds.BatchingConfig(max_batch_size=32, max_queue_delay=0.005)
    runtime.add_model("risk", Risk, mds.ModelConfig(batching=batching))
    return runtime


def main() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(os.environ.get("MDS_RAY_PORT", sock.getsockname()[1]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        # max_ongoing_requests comes from the batching (Ray's default, 5, would cap it).
        app = mds.ray.application(build, num_replicas=2, ray_actor_options={"num_cpus": 0.5})
        handle = serve.run(app, name="claims", route_prefix="/")
        claim = [0.5, -1.2, 0.3, 2.0, 0.0, 1.1, -0.4, 0.9]
        print("handle:", handle.serve.remote("risk", claim).result())
        url = f"http://127.0.0.1:{port}"
        print("JSON route:", httpx.post(f"{url}/models/risk/infer", json=claim).json())
        v2 = {"inputs": [{"name": "features", "shape": [8], "datatype": "FP32", "data": claim}]}
        reply = httpx.post(f"{url}/v2/models/risk/infer", json=v2).json()
        print("protocol:", reply["outputs"][0]["data"])
        bad = httpx.post(f"{url}/models/risk/infer", json=[1.0, 2.0])
        print("a bad request:", bad.status_code, bad.json()["error"])
        answers = [handle.serve.remote("risk", claim) for _ in range(200)]
        print("200 concurrent calls:", len({a.result() for a in answers}), "distinct answer")
        print("replicas ready:", httpx.get(f"{url}/health/ready").json()["ready"])
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
