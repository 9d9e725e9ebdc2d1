"""The Ray tests' models and the functions that build their runtimes (imported by Ray's workers)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

import mds

FEATURES = 4


class Scorer(mds.ModelHandler[dict[str, Any], dict[str, Any]]):
    """Named tensors ``x`` (four float32) -> ``score`` (their sum) and ``size`` (its batch's size).

    A row whose ``x`` sums to a negative number is rejected in ``preprocess``
    (the client's mistake). Each batch takes 20 ms, so that concurrent
    requests meet in the queue.
    """

    def signature(self) -> tuple[dict[str, mds.TensorSpec], dict[str, mds.TensorSpec]]:
        return (
            {"x": mds.TensorSpec(name="x", dtype="float32", shape=(FEATURES,))},
            {
                "score": mds.TensorSpec(name="score", dtype="float32", shape=()),
                "size": mds.TensorSpec(name="size", dtype="int64", shape=()),
            },
        )

    def from_tensors(self, tensors: dict[str, Any]) -> dict[str, Any]:
        return {"x": np.asarray(tensors["x"], dtype=np.float32)}

    def to_tensors(self, response: dict[str, Any]) -> dict[str, Any]:
        return {"score": np.float32(response["score"]), "size": np.int64(response["size"])}

    def preprocess(self, request: dict[str, Any]) -> np.ndarray:
        x = np.asarray(request["x"], dtype=np.float32)
        if x.shape != (FEATURES,):
            raise mds.InvalidInput(f"x must be {FEATURES} numbers, not shape {x.shape}")
        if float(x.sum()) < 0:
            raise mds.InvalidInput("x sums to a negative number")
        return x

    def infer(self, batch: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        time.sleep(0.02)
        sums = np.stack(batch).sum(axis=1)
        return [{"score": float(s), "size": len(batch)} for s in sums]


class Broken(mds.ModelHandler[float, float]):
    """Fails to load."""

    def init(self, context: Any) -> None:
        raise RuntimeError("the weights are not there")

    def infer(self, batch: Sequence[float]) -> list[float]:
        return list(batch)


def scoring() -> mds.Runtime:
    runtime = mds.Runtime()
    batching = mds.BatchingConfig(max_batch_size=16, max_queue_delay=0.005)
    runtime.add_model("scorer", Scorer, mds.ModelConfig(batching=batching))
    return runtime


def broken() -> mds.Runtime:
    runtime = mds.Runtime()
    runtime.add_model("broken", Broken)
    return runtime


async def remote_score(value: dict[str, Any]) -> dict[str, Any]:
    """A pipeline node whose model is another deployment: called through its handle."""
    from ray import serve

    import mds.ray

    handle = serve.get_deployment_handle("scores", app_name="scores")
    found: dict[str, Any] = await mds.ray.call(handle, "scorer", value)
    return found


def features(request: dict[str, Any]) -> dict[str, Any]:
    return {"x": [float(v) for v in request["values"]]}


def fronting() -> mds.Runtime:
    """A pipeline whose scoring node is the "scores" application's model, through a handle."""
    runtime = mds.Runtime()
    runtime.add_pipeline(
        mds.Pipeline(
            "front",
            [mds.Node.function("features", features), mds.Node.function("score", remote_score)],
        )
    )
    return runtime
