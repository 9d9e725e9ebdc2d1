"""mds in a Ray Data job: a real local Ray, a Parquet file with planted bad rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mds.ray

from .models import scoring

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROWS = 1000


def planted(i: int) -> str | None:
    """Why row ``i`` fails, if it does: some here and there, and a run of 300 (whole blocks)."""
    if 400 <= i < 700:
        return "negative"
    if i % 97 == 5:
        return "null"
    if i % 89 == 11:
        return "negative"
    return None


def test_a_job_over_parquet_records_each_bad_row_and_keeps_the_order(
    ray_cluster: Any, tmp_path: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    values = []
    for i in range(ROWS):
        kind = planted(i)
        values.append(None if kind == "null" else [-9.0 if kind else float(i), 1.0, 1.0, 1.0])
    x = pa.array(values, type=pa.list_(pa.float32(), 4))
    table = pa.table({"id": [f"row-{i}" for i in range(ROWS)], "x": x})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=128)

    scored = mds.ray.map_dataset(
        ray.data.read_parquet(str(tmp_path / "rows.parquet")).repartition(8),
        scoring,
        "scorer",
        id_column="id",
        batch_size=100,
        concurrency=2,  # two actors: the order is Ray Data's to keep
        num_cpus=0.5,
    )
    # Every block has the same columns (one of only failures too): they concatenate as they are.
    found = pa.concat_tables(ray.get(scored.to_arrow_refs()))
    assert found.column("id").to_pylist() == [f"row-{i}" for i in range(ROWS)]  # in order
    errors = found.column("error_type").to_pylist()
    messages = found.column("error").to_pylist()
    scores = found.column("score").to_pylist()
    for i in range(ROWS):
        kind = planted(i)
        if kind is None:
            assert errors[i] is None and scores[i] == pytest.approx(i + 3.0), i
        else:
            assert errors[i] == "InvalidInput" and scores[i] is None, i
            wanted = "is null in this row" if kind == "null" else "x sums to a negative number"
            assert wanted in messages[i], (i, messages[i])
    sizes = np.array(found.column("size").to_pylist(), dtype=float)
    assert np.nanmax(sizes) > 1  # rows batched together in the actor's runtime
