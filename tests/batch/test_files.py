"""Batch jobs over real files (Parquet, CSV), data frames, and the ``mds batch`` command."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import mds
import mds.batch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from scorer import CONFIG, Projector, Scorer  # noqa: E402


def features(n: int) -> Any:
    return np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32)


def parquet_input(path: Path, n: int) -> Any:
    x = features(n)
    column = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 4)
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "features": column}), path)
    return x


def test_parquet_tensors_in_and_out(tmp_path: Path) -> None:
    x = parquet_input(tmp_path / "in.parquet", 250)
    with mds.ModelRuntime(Projector, CONFIG, name="projector") as model:
        report = mds.batch.run_sync(
            model, tmp_path / "in.parquet", tmp_path / "out", part_rows=100, id_column="id"
        )
    assert (report.done, report.failed, report.parts) == (250, 0, 3)
    table = pq.read_table(tmp_path / "out")  # the folder reads as one table
    assert table.column_names == ["index", "id", "scores", "top", "error_type", "error"]
    assert table.column("index").to_pylist() == list(range(250))
    expected = x @ np.arange(8, dtype=np.float32).reshape(4, 2)
    scores = np.stack(table.column("scores").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert table.column("top").to_pylist() == expected.argmax(1).tolist()
    assert table.column("id").to_pylist()[7] == "r7"


def test_csv_records_with_bad_rows_and_frames(tmp_path: Path) -> None:
    csv = tmp_path / "in.csv"
    csv.write_text("x,note\n" + "".join(f"{i},n{i}\n" for i in range(40)))
    with mds.ModelRuntime(Scorer, CONFIG, name="scorer") as model:
        report = mds.batch.run_sync(model, csv, tmp_path / "out", columns=["x"])
        assert (report.done, report.failed) == (39, 1)  # x == 13 is poisoned
        out = pa.csv.read_csv(sorted((tmp_path / "out").glob("part-*.csv"))[0])
        assert out.column_names == ["index", "y", "label", "error_type", "error"]
        assert out.column("y").to_pylist()[:3] == [0.0, 2.0, 4.0]
        assert out.column("error_type").to_pylist()[13] == "InferenceError"
        pandas = pytest.importorskip("pandas")
        polars = pytest.importorskip("polars")
        for frame in (
            pandas.DataFrame({"x": range(30)}),
            polars.DataFrame({"x": list(range(30))}),
            pa.table({"x": list(range(30))}),
        ):
            folder = tmp_path / type(frame).__module__.split(".")[0]
            report = mds.batch.run_sync(model, frame, folder, part_rows=8)
            assert (report.done, report.failed, report.parts) == (29, 1, 4)
            result = pq.read_table(folder)
            assert result.column("y").to_pylist()[:2] == [0.0, 2.0]


def test_tensors_that_do_not_fit_fail_their_rows_only(tmp_path: Path) -> None:
    values = [[1.0, 2.0, 3.0, 4.0], [1.0, 2.0], None, [0.0, 0.0, 0.0, 1.0]]
    pq.write_table(
        pa.table({"features": pa.array(values, pa.list_(pa.float32()))}), tmp_path / "i.parquet"
    )
    with mds.ModelRuntime(Projector, CONFIG, name="projector") as model:
        report = mds.batch.run_sync(model, tmp_path / "i.parquet", tmp_path / "out")
    assert (report.done, report.failed) == (2, 2)
    errors = [
        json.loads(line) for line in (tmp_path / "out" / "_errors.jsonl").read_text().splitlines()
    ]
    assert [(e["index"], e["type"]) for e in errors] == [(1, "InvalidInput"), (2, "InvalidInput")]
    assert "expected shape (4)" in errors[0]["message"]
    assert "null" in errors[1]["message"]


# -- the command line: killed and resumed; progress --------------------------------


CONFIG_FILE = HERE / "scorer.yaml"


def command(*args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
    """``mds batch`` on the SlowScorer: about 1 ms per row, in batches of 32."""
    env = {**os.environ, "PYTHONPATH": str(HERE), "SCORER_DELAY": "0.03"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mds",
            "batch",
            "scorer:SlowScorer",
            *args,
            "--config",
            str(CONFIG_FILE),
        ],
        env=env,
        stdout=subprocess.PIPE,
        **kwargs,
    )


def jsonl_input(path: Path, n: int) -> None:
    path.write_text("".join(json.dumps({"id": i, "x": i % 500}) + "\n" for i in range(n)))


def parts(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.glob("part-*")))


@pytest.mark.slow
def test_killed_with_sigkill_and_resumed_gives_the_same_output(tmp_path: Path) -> None:
    jsonl_input(tmp_path / "in.jsonl", 3000)
    args = ["--part-rows", "100", "--id-column", "id", "--no-progress"]
    whole = command(str(tmp_path / "in.jsonl"), str(tmp_path / "whole"), *args)
    whole.communicate(timeout=120)
    assert whole.returncode == 0
    killed = command(str(tmp_path / "in.jsonl"), str(tmp_path / "out"), *args)
    ledger = tmp_path / "out" / "_mds_ledger.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ledger.exists() and len(ledger.read_bytes().splitlines()) >= 8:
            break
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=10)
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    resumed = command(str(tmp_path / "in.jsonl"), str(tmp_path / "out"), *args, "--resume")
    output, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, output
    assert b"skipped" in output
    assert parts(tmp_path / "out") == parts(tmp_path / "whole")
    errors = (tmp_path / "out" / "_errors.jsonl").read_bytes()
    assert errors == (tmp_path / "whole" / "_errors.jsonl").read_bytes()
    assert [json.loads(line)["index"] for line in errors.splitlines()] == list(range(13, 3000, 500))


@pytest.mark.slow
def test_sigterm_commits_what_is_complete_and_exits_for_resume(tmp_path: Path) -> None:
    jsonl_input(tmp_path / "in.jsonl", 3000)
    job = command(str(tmp_path / "in.jsonl"), str(tmp_path / "out"), "--part-rows", "100")
    ledger = tmp_path / "out" / "_mds_ledger.jsonl"
    while not (ledger.exists() and ledger.read_bytes().count(b"\n") >= 3):
        time.sleep(0.01)
    job.send_signal(signal.SIGTERM)
    output, _ = job.communicate(timeout=60)
    assert job.returncode == 130
    assert b"incomplete (stopped by SIGTERM)" in output
    committed = ledger.read_bytes().count(b"\n")
    assert len(list((tmp_path / "out").glob("part-*.jsonl"))) == committed


@pytest.mark.slow
def test_progress_in_a_pipe_and_in_a_terminal(tmp_path: Path) -> None:
    jsonl_input(tmp_path / "in.jsonl", 600)
    piped = command(
        str(tmp_path / "in.jsonl"),
        str(tmp_path / "a"),
        "--progress-every",
        "0.05",
        stderr=subprocess.PIPE,
    )
    _, err = piped.communicate(timeout=60)
    lines = err.decode().splitlines()
    assert len(lines) >= 2 and "\r" not in err.decode()
    assert lines[-1].startswith("mds batch SlowScorer: 600/600 rows (100%)")
    assert "rows/s" in lines[-1] and "2 errors" in lines[-1]
    primary, secondary = pty.openpty()
    shown = command(str(tmp_path / "in.jsonl"), str(tmp_path / "b"), stderr=secondary)
    os.close(secondary)
    seen = b""
    while True:
        ready, _, _ = select.select([primary], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the terminal closed: the command ended
            break
        if not chunk:
            break
        seen += chunk
    shown.communicate(timeout=60)
    os.close(primary)
    assert shown.returncode == 0
    assert b"\r\x1b[K" in seen and b"[########################] 600/600 rows" in seen
    assert b"ETA" in seen


def test_command_errors_say_what_is_wrong(tmp_path: Path) -> None:
    jsonl_input(tmp_path / "in.jsonl", 5)
    run = command(str(tmp_path / "nothing.jsonl"), str(tmp_path / "out"), stderr=subprocess.PIPE)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 1 and b"does not exist" in err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part-00000.jsonl").write_text("{}\n")
    run = command(str(tmp_path / "in.jsonl"), str(tmp_path / "out"), stderr=subprocess.PIPE)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 1 and b"no _mds_job.json" in err


async def test_reading_happens_off_the_loop(tmp_path: Path) -> None:
    await anyio.to_thread.run_sync(parquet_input, tmp_path / "in.parquet", 50)
    async with mds.ModelRuntime(Projector, CONFIG, name="projector") as model:
        report = await mds.batch.run(model, tmp_path / "in.parquet", tmp_path / "out")
    assert report.done == 50
