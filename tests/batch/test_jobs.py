"""mds.batch.run over iterables and files: outputs, order, errors, resume, progress."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import mds
import mds.batch

sys.path.insert(0, str(Path(__file__).parent))
from scorer import CONFIG, Scorer


def blocking(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a thread: the tests' own file reads stay off the loop."""
    return anyio.to_thread.run_sync(fn, *args)


def rows_of(folder: Path) -> list[dict[str, Any]]:
    """Every output row of a JSON Lines job, parts in order."""
    found: list[dict[str, Any]] = []
    for part in sorted(folder.glob("part-*.jsonl")):
        found += [json.loads(line) for line in part.read_text().splitlines()]
    return found


def errors_of(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "_errors.jsonl").read_text().splitlines()]


async def scorer(**parameters: Any) -> mds.ModelRuntime[Any, Any]:
    config = mds.ModelConfig(batching=CONFIG.batching, parameters=parameters)
    return mds.ModelRuntime(Scorer, config, name="scorer")


async def test_every_row_answered_in_order_with_planted_failures(tmp_path: Path) -> None:
    requests: list[Any] = [{"x": i} for i in range(300)]
    requests[5] = {"x": "five"}  # bad input
    requests[13] = {"x": 13}  # poisoned in postprocess
    requests[200] = "not a dict"
    async with await scorer(jitter=0.003) as model:
        report = await mds.batch.run(model, requests, tmp_path / "out", part_rows=64)
    assert (report.rows, report.done, report.failed, report.complete) == (300, 297, 3, True)
    assert report.parts == 5
    rows = await blocking(rows_of, tmp_path / "out")
    assert [row["index"] for row in rows] == list(range(300))
    assert rows[7]["response"] == {"y": 14.0, "label": "small"}
    assert rows[5]["response"] is None and rows[5]["error"]["type"] == "InvalidInput"
    assert rows[13]["error"]["type"] == "InferenceError"
    assert "poisoned row" in rows[13]["error"]["message"]
    errors = await blocking(errors_of, tmp_path / "out")
    assert [(e["index"], e["type"]) for e in errors] == [
        (5, "InvalidInput"),
        (13, "InferenceError"),
        (200, "InvalidInput"),
    ]
    assert await anyio.Path(tmp_path / "out" / "_SUCCESS").exists()


async def test_completion_order_when_asked(tmp_path: Path) -> None:
    async with await scorer(jitter=0.005) as model:
        await mds.batch.run(
            model, [{"x": i} for i in range(200)], tmp_path / "out", part_rows=100, ordered=False
        )
    rows = await blocking(rows_of, tmp_path / "out")
    assert sorted(row["index"] for row in rows) == list(range(200))
    for row in rows:
        if row["index"] != 13:  # the poisoned row
            assert row["response"]["y"] == 2.0 * row["index"]


async def test_async_iterable_and_pipeline(tmp_path: Path) -> None:
    async def requests() -> Any:
        for i in range(50):
            yield {"x": i}

    runtime = mds.Runtime()
    runtime.add_model("scorer", Scorer, CONFIG)
    runtime.add_pipeline(
        mds.Pipeline(
            "scoring",
            [mds.Node.function("double", _double), mds.Node.model("score", model="scorer")],
        )
    )
    async with runtime:
        report = await mds.batch.run(runtime.servable("scoring"), requests(), tmp_path / "out")
    assert report.done == 50
    assert [row["response"]["y"] for row in await blocking(rows_of, tmp_path / "out")] == [
        4.0 * i for i in range(50)
    ]


def _double(request: dict[str, Any]) -> dict[str, Any]:
    return {"x": request["x"] * 2}


async def test_jsonl_input_with_ids_and_bad_lines(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": f"r{i}", "x": i}) for i in range(20)]
    lines[3] = '{"id": "r3", "x": '  # torn
    lines.insert(10, "")  # blank lines are not rows
    await anyio.Path(source).write_text("\n".join(lines) + "\n")
    async with await scorer() as model:
        report = await mds.batch.run(model, source, tmp_path / "out", id_column="id")
    assert (report.done, report.failed) == (18, 2)  # the torn line, and x == 13
    rows = await blocking(rows_of, tmp_path / "out")
    assert [row["index"] for row in rows] == list(range(20))
    assert rows[4] == {
        "index": 4,
        "id": "r4",
        "response": {"y": 8.0, "label": "small"},
        "error": None,
    }
    assert rows[3]["error"]["type"] == "DecodeError"
    assert "line 4" in rows[3]["error"]["message"]
    assert (await blocking(errors_of, tmp_path / "out"))[0]["index"] == 3


async def test_resume_skips_committed_parts_and_refuses_a_changed_job(tmp_path: Path) -> None:
    requests = [{"x": i} for i in range(100)]
    out = tmp_path / "out"
    async with await scorer() as model:
        first = await mds.batch.run(model, requests, out, part_rows=30)
        whole = await blocking(rows_of, out)
        with pytest.raises(mds.ConfigError, match="already holds"):
            await mds.batch.run(model, requests, out, part_rows=30)
        # A run that lost its last two parts (as if killed) redoes only those.
        ledger = anyio.Path(out / "_mds_ledger.jsonl")
        kept = (await ledger.read_text()).splitlines(keepends=True)[:2]
        await ledger.write_text("".join(kept))
        await anyio.Path(out / "part-00003.jsonl").unlink()
        again = await mds.batch.run(model, requests, out, part_rows=30, resume=True)
        assert (again.skipped, again.done, again.failed, again.parts) == (60, 40, 0, 2)
        assert await blocking(rows_of, out) == whole and first.failed == 1
        assert [e["index"] for e in await blocking(errors_of, out)] == [13]
        with pytest.raises(mds.ConfigError, match="part_rows: 30 then, 20 now"):
            await mds.batch.run(model, requests, out, part_rows=20, resume=True)
        changed = [*requests[:10], {"x": -1}, *requests[11:]]
        with pytest.raises(mds.ConfigError, match="the input changed since part 0"):
            await mds.batch.run(model, changed, out, part_rows=30, resume=True)
    async with mds.ModelRuntime(Scorer, CONFIG, name="scorer", version="2") as newer:
        with pytest.raises(mds.ConfigError, match=r"target\.version: '1' then, '2' now"):
            await mds.batch.run(newer, requests, out, part_rows=30, resume=True)
        report = await mds.batch.run(newer, requests, out, part_rows=30, overwrite=True)
        assert report.done == 99


async def test_retry_failed_serves_only_the_failed_rows_again(tmp_path: Path) -> None:
    flag = tmp_path / "flaky"
    await anyio.Path(flag).touch()
    requests = [{"x": i} for i in range(40)]
    out = tmp_path / "out"
    async with await scorer(flaky=str(flag)) as model:
        first = await mds.batch.run(model, requests, out, part_rows=16)
        assert first.failed == 2  # 7 (flaky) and 13 (poisoned)
        await anyio.Path(flag).unlink()
        again = await mds.batch.run(
            model, requests, out, part_rows=16, resume=True, retry_failed=True
        )
    assert (again.retried, again.done, again.failed, again.skipped) == (2, 1, 1, 24)
    rows = await blocking(rows_of, out)
    assert [row["index"] for row in rows] == list(range(40))
    assert rows[7]["response"] == {"y": 14.0, "label": "small"}
    assert [e["index"] for e in await blocking(errors_of, out)] == [13]


async def test_error_rate_stops_the_job(tmp_path: Path) -> None:
    requests = [{"x": "bad"} if i % 2 else {"x": i} for i in range(1000)]
    async with await scorer() as model:
        with pytest.raises(mds.batch.JobFailed, match="too many rows failed") as caught:
            await mds.batch.run(model, requests, tmp_path / "out", part_rows=50, max_error_rate=0.2)
    report = caught.value.report
    assert report is not None and not report.complete and report.rows < 1000
    assert not await anyio.Path(tmp_path / "out" / "_SUCCESS").exists()


async def test_rows_in_flight_and_reading_ahead_stay_bounded(tmp_path: Path) -> None:
    pulled = 0
    served: list[int] = []

    def requests() -> Any:
        nonlocal pulled
        for i in range(2000):
            pulled += 1
            yield {"x": i}

    class Watching(Scorer):
        async def preprocess(self, request: dict[str, Any]) -> float:
            served.append(pulled - request["x"])  # rows read but not yet served
            return await super().preprocess(request)

    async with mds.ModelRuntime(Watching, CONFIG, name="scorer") as model:
        await mds.batch.run(model, requests(), tmp_path / "out", part_rows=50, in_flight=8)
    # Open parts (3) and one read ahead bound what is read beyond what is served.
    assert max(served) <= 5 * 50


async def test_progress_callback_and_options_errors(tmp_path: Path) -> None:
    seen: list[mds.batch.Progress] = []
    async with await scorer() as model:
        await mds.batch.run(
            model, [{"x": i} for i in range(30)], tmp_path / "o", progress=seen.append
        )
        with pytest.raises(mds.ConfigError, match="part_rows"):
            await mds.batch.run(model, [], tmp_path / "p", part_rows=0)
        with pytest.raises(mds.ConfigError, match="does not exist"):
            await mds.batch.run(model, tmp_path / "missing.jsonl", tmp_path / "q")
        with pytest.raises(mds.ConfigError, match="cannot tell the input format"):
            await anyio.Path(tmp_path / "rows.txt").write_text("{}")
            await mds.batch.run(model, tmp_path / "rows.txt", tmp_path / "q")
    assert (seen[-1].done, seen[-1].failed, seen[-1].total) == (29, 1, 30)
    model = await scorer()
    with pytest.raises(mds.NotReady, match="not ready"):
        await mds.batch.run(model, [{"x": 1}], tmp_path / "r")


def test_run_sync_from_threads_and_inside_a_running_loop(tmp_path: Path) -> None:
    import threading

    with mds.ModelRuntime(Scorer, CONFIG, name="scorer") as model:
        reports: list[mds.batch.Report] = []

        def job(n: int) -> None:
            reports.append(
                mds.batch.run_sync(model, [{"x": i} for i in range(50)], tmp_path / f"t{n}")
            )

        threads = [threading.Thread(target=job, args=(n,)) for n in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [r.done for r in reports] == [49, 49, 49]

        async def in_a_notebook() -> mds.batch.Report:
            # A notebook's cell runs inside its own loop: the blocking form still works.
            return mds.batch.run_sync(model, [{"x": 1}], tmp_path / "nb")

        assert anyio.run(in_a_notebook).done == 1


def test_report_round_trips_as_json() -> None:
    report = mds.batch.Report(
        target="m",
        output="o",
        rows=1,
        done=1,
        failed=0,
        skipped=0,
        retried=0,
        parts=1,
        seconds=0.1,
        rows_per_second=10.0,
        complete=True,
        stopped=None,
        errors_file="e",
    )
    assert msgspec.json.decode(msgspec.json.encode(report), type=mds.batch.Report) == report
    assert "complete" in report.summary()


async def test_a_full_queue_is_retried_not_recorded(tmp_path: Path) -> None:
    small = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=4, max_queue_size=4))
    async with mds.ModelRuntime(Scorer, small, name="scorer") as model:
        report = await mds.batch.run(
            model, [{"x": i} for i in range(200)], tmp_path / "out", in_flight=64
        )
    assert (report.done, report.failed) == (199, 1)  # only the poisoned row
    assert model.statistics().rejected > 0  # the queue was full, and the rows waited


async def test_the_model_going_away_stops_the_job_and_keeps_its_parts(tmp_path: Path) -> None:
    runtime = mds.Runtime()
    runtime.add_model(
        "scorer", Scorer, mds.ModelConfig(batching=CONFIG.batching, parameters={"jitter": 0.002})
    )
    started = anyio.Event()

    def watch(progress: mds.batch.Progress) -> None:
        if progress.done >= 200:
            started.set()

    failure: list[BaseException] = []

    async def job() -> None:
        try:
            await mds.batch.run(
                runtime.servable("scorer"),
                ({"x": i} for i in range(100_000)),
                tmp_path / "out",
                part_rows=100,
                progress=watch,
            )
        except mds.batch.JobFailed as exc:
            failure.append(exc)

    async with runtime, anyio.create_task_group() as tasks:
        tasks.start_soon(job)
        await started.wait()
        await runtime.stop_model("scorer")
    (error,) = failure
    assert "not ready" in str(error) and error.report is not None
    assert error.report.parts >= 1 and not error.report.complete
