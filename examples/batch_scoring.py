"""Batch serving: score a Parquet file with the MLP classifier, killed half-way, then resumed.

The same handler the app examples serve over HTTP scores every row of a
file. The first run is ``mds batch`` in a child process, killed with
SIGKILL mid-way; the second resumes it from Python: committed parts are
skipped, and the output is what one uninterrupted run would have written.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from mlp_model import CONFIG, FEATURES, MLPClassifier

import mds
import mds.batch

ROWS = 20_000

with tempfile.TemporaryDirectory() as folder:
    work = Path(folder)
    rows = np.random.default_rng(1).standard_normal((ROWS, FEATURES)).astype(np.float32)
    features = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), FEATURES)
    ids = pa.array([f"item-{i}" for i in range(ROWS)])
    pq.write_table(pa.table({"id": ids, "features": features}), work / "items.parquet")
    # The model's config for the command line: mlp_model.CONFIG, as YAML.
    (work / "model.yaml").write_text("batching:\n  max_batch_size: 32\ntimeout: 2.0\n")

    # 1. The command line, killed with SIGKILL once a few parts are committed.
    here = str(Path(__file__).parent)
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mds",
            "batch",
            "mlp_model:MLPClassifier",
            str(work / "items.parquet"),
            str(work / "scores"),
            "--config",
            str(work / "model.yaml"),
            "--name",
            "classifier",
            "--id-column",
            "id",
            "--part-rows",
            "1000",
            "--no-progress",
        ],
        cwd=here,
        stdout=subprocess.DEVNULL,
    )
    ledger = work / "scores" / "_mds_ledger.jsonl"
    while first.poll() is None and not (ledger.exists() and ledger.read_text().count("\n") >= 3):
        time.sleep(0.005)
    first.send_signal(signal.SIGKILL)
    first.wait()
    print(f"killed the first run with {ledger.read_text().count(chr(10))} of 20 parts committed")

    # 2. The same job, resumed from Python: the same model, config and settings.
    runtime = mds.Runtime()
    runtime.add_model("classifier", MLPClassifier, CONFIG)
    with runtime:
        report = mds.batch.run_sync(
            runtime.servable("classifier"),
            work / "items.parquet",
            work / "scores",
            id_column="id",
            part_rows=1000,
            resume=True,
        )
    print(
        f"resumed: skipped {report.skipped:,} rows, scored {report.done:,}, failed {report.failed}"
    )

    scores = pq.read_table(work / "scores")  # the parts read as one table, in input order
    print(f"{scores.num_rows:,} rows; columns {', '.join(scores.column_names)}")
    first_rows = scores.slice(0, 3).to_pylist()
    for row in first_rows:
        print(f"  {row['id']}: {row['label']} {np.round(row['probabilities'], 3).tolist()}")
