"""Score a Parquet file on Ray Data with the same handler: a row that fails is recorded, not fatal.

Two actors each hold an mds runtime; each block of rows is served through
its batcher. A row the model rejects gets an ``error_type`` and ``error``
beside a null score, and the job goes on; the rows keep their order.

Run it:   python examples/ray_data.py      (pip install "mds-serving[ray]")
It writes its files in a temporary folder and starts a local Ray with two CPUs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

import mds
import mds.ray

FEATURES = 8


class Risk(mds.ModelHandler[dict[str, list[float]], float]):
    """A row's eight ``features`` -> the probability that its claim is fraudulent."""

    def init(self, context: mds.ModelContext) -> None:
        self.weights = np.random.default_rng(0).normal(size=FEATURES).astype(np.float32)

    def preprocess(self, request: dict[str, list[float]]) -> np.ndarray:
        features = request.get("features")
        if features is None or len(features) != FEATURES:
            raise mds.InvalidInput(f"a claim needs {FEATURES} features")
        return np.asarray(features, dtype=np.float32)

    def infer(self, batch: Sequence[np.ndarray]) -> list[float]:
        logits = np.stack(batch) @ self.weights
        return (1 / (1 + np.exp(-logits))).round(4).tolist()


def build() -> mds.Runtime:
    """The runtime each actor runs."""
    runtime = mds.Runtime()
    batching = mds.BatchingConfig(max_batch_size=64, max_queue_delay=0.002)
    runtime.add_model("risk", Risk, mds.ModelConfig(batching=batching))
    return runtime


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(1)
    claims = [rng.normal(size=FEATURES).tolist() for _ in range(5000)]
    for bad in (7, 1234, 4321):
        claims[bad] = claims[bad][:3]  # a claim with three features: the model rejects it
    table = pa.table({"claim": [f"c{i}" for i in range(5000)], "features": claims})
    pq.write_table(table, folder / "claims.parquet")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        scored = mds.ray.map_dataset(
            ray.data.read_parquet(str(folder / "claims.parquet")),
            build,
            "risk",
            rows="records",  # each row is {"features": [...]}, as preprocess takes it
            columns=["features"],
            id_column="claim",
            concurrency=2,  # two actors, each with a runtime
            num_cpus=0.5,  # each; the rest of the two CPUs reads the file
        )
        result = pa.concat_tables(ray.get(scored.to_arrow_refs()))
    finally:
        ray.shutdown()
    pq.write_table(result, folder / "scored.parquet")
    failed = result.filter(pa.compute.is_valid(result["error"]))
    print("rows:", result.num_rows)
    print("failed:", failed["claim"].to_pylist())
    print("why:", failed["error"][0].as_py())
    print("in order:", result["claim"].to_pylist() == table["claim"].to_pylist())


if __name__ == "__main__":
    main()
