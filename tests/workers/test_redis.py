"""The queue worker on Redis Streams: a real redis-server (started here), real redis-py.

Each test gets streams of its own on one server for the module. Blocking
Redis calls of the tests themselves run in threads (the loop never waits on
them), and the clocks are real: Redis counts idle time in real time.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import mds
import mds.workers

redis = pytest.importorskip("redis", reason="the Redis worker tests need redis-py (test extra)")

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
GROUP = "mds"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """Both backends on their real clocks: Redis' idle times do not follow a mock one."""
    return request.param


# -- the server -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(executable: str, directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A redis-server on a free port, answering PING; tries another port if one was taken."""
    for _ in range(5):
        port = free_port()
        # Nothing persisted: no snapshots, no append-only file.
        options = ["--save", "", "--appendonly", "no", "--dir", str(directory)]
        process = subprocess.Popen(
            [executable, "--port", str(port), "--bind", "127.0.0.1", *options],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=port, socket_connect_timeout=1)
        try:
            deadline = time.monotonic() + 30
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    client.ping()
                    return process, port
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        process.kill()
        process.wait(10)
    raise AssertionError("redis-server did not start")


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A redis-server of the module's own, in a temporary directory, persisting nothing."""
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.skip(
            "redis-server is not installed: install Debian's redis-server package "
            "(apt-get install redis-server), as .ci/run does"
        )
    process, port = start_server(executable, tmp_path_factory.mktemp("redis"))
    try:
        yield port
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def client(redis_port: int) -> Iterator[Any]:
    found = redis.Redis(port=redis_port)
    try:
        yield found
    finally:
        found.close()


@pytest.fixture
def stream() -> str:
    """A stream of this test's own (results in ``:out``, dead letters in ``:dead``)."""
    return f"requests-{uuid.uuid4().hex[:8]}"


# -- what the tests serve ---------------------------------------------------


class Summer(mds.ModelHandler[list[float], float]):
    """``[key, a, b, c]`` -> the sum of the four; records batches and what it computed.

    Anything but four numbers is the sender's mistake (``InvalidInput``). Keys
    in ``flaky`` fail their first computation with an ``InferenceError``, keys
    in ``doomed`` every one. ``pause`` seconds are slept per batch; while
    ``gate`` is shut, batches wait for it.
    """

    def __init__(
        self,
        *,
        flaky: Sequence[float] = (),
        doomed: Sequence[float] = (),
        pause: float = 0.0,
        gate: threading.Event | None = None,
        computed: list[float] | None = None,
    ) -> None:
        self.flaky, self.doomed = set(flaky), set(doomed)
        self.pause = pause
        self.gate = gate
        self.lock = threading.Lock()
        self.sizes: list[int] = []
        self.computed = computed if computed is not None else []
        self.computing = threading.Event()

    def preprocess(self, request: Any) -> list[float]:
        if not (
            isinstance(request, list)
            and len(request) == 4
            and all(isinstance(x, int | float) for x in request)
        ):
            raise mds.InvalidInput(f"a request is four numbers, not {str(request)[:40]}")
        return request

    def infer(self, batch: Sequence[list[float]]) -> list[Any]:
        with self.lock:
            self.sizes.append(len(batch))
            self.computed.extend(item[0] for item in batch)
        self.computing.set()
        if self.gate is not None:
            assert self.gate.wait(60), "the test never opened the gate"
        if self.pause:
            time.sleep(self.pause)
        outputs: list[Any] = []
        with self.lock:
            for item in batch:
                key = item[0]
                if key in self.doomed:
                    outputs.append(mds.InferenceError("this one never works"))
                elif key in self.flaky:
                    self.flaky.discard(key)
                    outputs.append(mds.InferenceError("a transient failure"))
                else:
                    outputs.append(float(sum(item)))
        return outputs


def runtime_with(model: Summer, *, max_batch_size: int = 16) -> mds.Runtime:
    runtime = mds.Runtime()
    batching = mds.BatchingConfig(max_batch_size=max_batch_size, max_queue_delay=0.005)
    runtime.add_model("summer", lambda: model, mds.ModelConfig(batching=batching))
    return runtime


def worker_for(
    runtime: mds.Runtime, client: Any, stream: str, consumer: str = "a", **options: Any
) -> mds.workers.QueueWorker:
    settings: dict[str, Any] = {
        "max_in_flight": 32,
        "visibility": 2.0,
        "heartbeat": 0.2,
        "backoff": (0.02, 0.1),
        "wait": 0.05,
        "drain_timeout": 10.0,
    }
    settings.update(options)
    return mds.workers.QueueWorker(
        runtime,
        "summer",
        mds.workers.RedisStreamSource(stream, consumer=consumer, client=client),
        mds.workers.RedisStreamSink(f"{stream}:out", client=client),
        **settings,
    )


def request(key: int) -> list[float]:
    return [float(key), 0.25, 0.5, 0.125 * key]


def answer(key: int) -> float:
    return float(sum(request(key)))


# -- reading Redis (blocking: from threads in async tests) --------------------


def add(client: Any, stream: str, entries: Sequence[bytes | dict[str, str]]) -> list[str]:
    """Add each entry (a body, or a whole field map); their ids, in order."""
    pipe = client.pipeline(transaction=False)
    for entry in entries:
        pipe.xadd(stream, entry if isinstance(entry, dict) else {"body": entry})
    return [entry_id.decode() for entry_id in pipe.execute()]


def add_requests(client: Any, stream: str, keys: Sequence[int]) -> dict[str, int]:
    """Add a request for each key; key by message id."""
    ids = add(client, stream, [msgspec.json.encode(request(key)) for key in keys])
    return dict(zip(ids, keys, strict=True))


def results(client: Any, stream: str) -> dict[str, Any]:
    """The results hash: message id -> result."""
    found = client.hgetall(f"{stream}:out:results")
    return {key.decode(): msgspec.json.decode(value)["result"] for key, value in found.items()}


def result_entries(client: Any, stream: str) -> list[str]:
    """The message id of each entry of the result stream, in order."""
    return [fields[b"id"].decode() for _, fields in client.xrange(f"{stream}:out")]


def dead_letters(client: Any, stream: str) -> list[tuple[str, bytes, str]]:
    """(message id, body, error) of each dead letter, in order."""
    return [
        (fields[b"id"].decode(), fields[b"body"], fields[b"error"].decode())
        for _, fields in client.xrange(f"{stream}:dead")
    ]


def pending(client: Any, stream: str) -> int:
    """Entries delivered to the group's consumers and not acknowledged (0: no group yet)."""
    try:
        return int(client.xpending(stream, GROUP)["pending"])
    except redis.ResponseError as exc:
        if "NOGROUP" not in str(exc):
            raise
        return 0  # the worker has not made the group yet


async def until(check: Callable[[], bool], what: str, seconds: float = 40.0) -> None:
    """Wait for ``check()`` (called in a thread: it may ask Redis) to hold."""
    deadline = time.monotonic() + seconds
    while not await anyio.to_thread.run_sync(check):
        assert time.monotonic() < deadline, f"never {what}"
        await anyio.sleep(0.02)


def eventually(check: Callable[[], bool], what: str, seconds: float = 40.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.02)


def blocking(fn: Callable[..., Any], *args: Any) -> Any:
    return anyio.to_thread.run_sync(fn, *args)


# -- the tests --------------------------------------------------------------


async def test_thousands_of_messages_answered_once_and_poison_dead_lettered_once(
    client: Any, stream: str
) -> None:
    """Every good message gets one right result, every bad one one dead letter; batches form."""
    rng = random.Random(7)
    good = list(range(2000))
    poison: list[bytes | dict[str, str]] = [b"not json %d {" % i for i in range(20)]
    poison += [msgspec.json.encode([float(i), 1.0, 2.0]) for i in range(20)]  # three numbers
    poison += [{"kind": "fields", "n": str(i)} for i in range(5)]  # no body: the fields' JSON
    entries: list[tuple[str, Any]] = [("good", key) for key in good]
    entries += [("poison", entry) for entry in poison]
    rng.shuffle(entries)
    bodies = [msgspec.json.encode(request(v)) if kind == "good" else v for kind, v in entries]
    ids = await blocking(add, client, stream, bodies)
    keys = {i: v for i, (kind, v) in zip(ids, entries, strict=True) if kind == "good"}
    bad = {i: v for i, (kind, v) in zip(ids, entries, strict=True) if kind == "poison"}

    model = Summer()
    worker = worker_for(runtime_with(model), client, stream, max_in_flight=64)
    async with worker:
        await until(
            lambda: (
                worker.statistics().completed + worker.statistics().dead_lettered == len(entries)
            ),
            "served every message",
        )
        assert await worker.source.lag() == 0  # the group has read the whole stream

    assert await blocking(results, client, stream) == {i: answer(k) for i, k in keys.items()}
    written = await blocking(result_entries, client, stream)
    assert sorted(written) == sorted(keys)  # one entry each
    dead = await blocking(dead_letters, client, stream)
    assert sorted(i for i, _, _ in dead) == sorted(bad)  # once each
    for message_id, body, error in dead:
        sent = bad[message_id]
        if isinstance(sent, dict):
            assert msgspec.json.decode(body) == sent
            assert "InvalidInput" in error
        elif sent.startswith(b"not json"):
            assert body == sent
            assert error.startswith("the message does not decode")
        else:
            assert body == sent
            assert "InvalidInput" in error and "four numbers" in error
    assert await blocking(pending, client, stream) == 0
    assert max(model.sizes) > 1  # messages in flight together were batched together
    statistics = worker.statistics()
    assert (statistics.completed, statistics.dead_lettered) == (len(keys), len(bad))
    assert (statistics.released, statistics.source_errors) == (0, 0)


async def test_a_transient_failure_is_delivered_again_and_a_lasting_one_dead_lettered(
    client: Any, stream: str
) -> None:
    """An InferenceError is retried with the real delivery count, up to max_deliveries."""
    keys = await blocking(add_requests, client, stream, range(40))
    model = Summer(flaky=[3.0, 17.0, 30.0], doomed=[8.0])
    worker = worker_for(runtime_with(model), client, stream, max_deliveries=3)
    async with worker:
        await until(
            lambda: worker.statistics().completed == 39 and worker.statistics().dead_lettered == 1,
            "served the 40",
        )
    by_key = {key: message_id for message_id, key in keys.items()}
    found = await blocking(results, client, stream)
    assert found == {i: answer(k) for i, k in keys.items() if k != 8}
    assert sorted(await blocking(result_entries, client, stream)) == sorted(found)
    [(message_id, _, error)] = await blocking(dead_letters, client, stream)
    assert message_id == by_key[8]
    assert "this one never works" in error and "delivered 3 times" in error
    # Computed as many times as delivered: twice for a transient failure,
    # max_deliveries times for a lasting one, once for the rest.
    times = {key: model.computed.count(float(key)) for key in range(40)}
    assert times == {key: {3: 2, 17: 2, 30: 2, 8: 3}.get(key, 1) for key in range(40)}
    assert await blocking(pending, client, stream) == 0


def test_a_killed_consumers_messages_are_taken_over_and_written_once(
    client: Any, stream: str, redis_port: int, tmp_path: Path
) -> None:
    """SIGKILL mid-batch: another worker reclaims its messages; each result is added once."""
    keys = add_requests(client, stream, range(20))
    log = (tmp_path / "worker.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, str(HERE / "redis_worker.py"), str(redis_port), stream],
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def holding() -> bool:
        assert process.poll() is None, (tmp_path / "worker.log").read_text()
        try:
            found = client.xinfo_consumers(stream, GROUP)
        except redis.ResponseError:  # no group yet: the worker has not received yet
            return False
        consumers = {c["name"]: c["pending"] for c in found}
        return (
            consumers.get(b"doomed") == 8  # max_in_flight
            and client.exists(f"{stream}:holding") == 1  # one batch computing
            and client.hlen(f"{stream}:out:results") >= 4  # the others written, not acknowledged
        )

    try:
        eventually(holding, "held messages both computing and written")
        written = results(client, stream)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        log.close()

    heir = worker_for(runtime_with(Summer()), client, stream, consumer="heir")
    heir.start_sync()
    try:
        eventually(lambda: heir.statistics().completed == 20, "served the 20")
    finally:
        heir.stop_sync()
    found = results(client, stream)
    assert found == {i: answer(k) for i, k in keys.items()}
    assert {i: found[i] for i in written} == written
    assert sorted(result_entries(client, stream)) == sorted(keys)  # once each
    assert pending(client, stream) == 0
    assert heir.statistics().received == 20
    assert client.xinfo_consumers(stream, GROUP)[0]["name"] == b"doomed"


async def test_stopping_releases_what_does_not_finish_in_time_for_another_at_once(
    client: Any, stream: str
) -> None:
    """stop() while messages compute: past drain_timeout they are released, claimable at once."""
    keys = await blocking(add_requests, client, stream, range(10))
    gate = threading.Event()
    model = Summer(gate=gate)
    runtime = runtime_with(model)
    # A visibility far longer than the test: only a release frees them this soon.
    # Room to spare: a full worker would see stop() only once a place frees
    # (QueueWorker waits for a free place before it looks at the stop).
    options = {"visibility": 30.0, "heartbeat": 10.0, "max_in_flight": 16}
    async with runtime:
        try:
            worker = worker_for(runtime, client, stream, drain_timeout=0.2, **options)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(worker.run)
                await until(
                    lambda: worker.statistics().in_flight == 10 and model.computing.is_set(),
                    "held the 10",
                )
                worker.stop()
            statistics = worker.statistics()
            assert statistics.state is mds.workers.WorkerState.STOPPED
            assert (statistics.completed, statistics.released) == (0, 10)
            idle = await blocking(
                lambda: client.xpending_range(stream, GROUP, "-", "+", 100, consumername="a")
            )
            assert len(idle) == 10
            assert all(entry["time_since_delivered"] >= 30_000 for entry in idle)
            assert all(entry["times_delivered"] == 1 for entry in idle)  # a release is none
        finally:
            gate.set()  # the runtime's own drain waits for the batch

    heir = worker_for(runtime_with(Summer()), client, stream, consumer="b", **options)
    async with heir:
        await until(lambda: heir.statistics().completed == 10, "served the 10")
    assert await blocking(results, client, stream) == {i: answer(k) for i, k in keys.items()}
    assert sorted(await blocking(result_entries, client, stream)) == sorted(keys)
    assert await blocking(pending, client, stream) == 0


async def test_stopping_lets_the_messages_in_flight_finish(client: Any, stream: str) -> None:
    """stop() while messages compute: within drain_timeout they complete, none is released."""
    keys = await blocking(add_requests, client, stream, range(10))
    gate = threading.Event()
    model = Summer(gate=gate)
    worker = worker_for(runtime_with(model), client, stream, max_in_flight=16, drain_timeout=30)
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(worker.run)
            await until(
                lambda: worker.statistics().in_flight == 10 and model.computing.is_set(),
                "held the 10",
            )
            worker.stop()
            await until(lambda: worker.state is mds.workers.WorkerState.DRAINING, "began draining")
            gate.set()
    finally:
        gate.set()
    statistics = worker.statistics()
    assert (statistics.completed, statistics.released, statistics.received) == (10, 0, 10)
    assert await blocking(results, client, stream) == {i: answer(k) for i, k in keys.items()}
    assert await blocking(pending, client, stream) == 0


async def test_the_heartbeat_keeps_a_slow_models_messages_from_other_workers(
    client: Any, stream: str
) -> None:
    """A batch that takes longer than visibility is computed once: no other worker takes it."""
    await blocking(add_requests, client, stream, range(6))
    computed: list[float] = []
    options = {"visibility": 1.0, "heartbeat": 0.1, "max_in_flight": 4}
    first = worker_for(
        runtime_with(Summer(pause=2.5, computed=computed)), client, stream, "a", **options
    )
    second = worker_for(
        runtime_with(Summer(pause=2.5, computed=computed)), client, stream, "b", **options
    )
    async with first, second:
        await until(
            lambda: first.statistics().completed + second.statistics().completed == 6,
            "served the 6",
        )
    assert sorted(computed) == [float(key) for key in range(6)]  # once each
    assert first.statistics().received + second.statistics().received == 6
    assert first.statistics().released == second.statistics().released == 0
    written = await blocking(result_entries, client, stream)
    assert sorted(written) == sorted(await blocking(results, client, stream))


async def test_a_worker_never_holds_more_than_max_in_flight(client: Any, stream: str) -> None:
    """Backpressure: a busy model stops the receiving; Redis' pending list says the same."""
    await blocking(add_requests, client, stream, range(30))
    gate = threading.Event()
    model = Summer(gate=gate)
    worker = worker_for(runtime_with(model), client, stream, max_in_flight=5)
    most = {"in_flight": 0, "pending": 0}

    async def watch() -> None:
        while True:
            most["in_flight"] = max(most["in_flight"], worker.statistics().in_flight)
            most["pending"] = max(most["pending"], await blocking(pending, client, stream))
            await anyio.sleep(0.005)

    try:
        async with worker, anyio.create_task_group() as tasks:
            tasks.start_soon(watch)
            await until(lambda: model.computing.is_set(), "computed")
            await until(lambda: worker.statistics().in_flight == 5, "held 5")
            for _ in range(10):  # receive after receive would have had the chance
                assert worker.state is mds.workers.WorkerState.FULL
                assert worker.statistics().in_flight == 5
                assert await blocking(pending, client, stream) == 5
                await anyio.sleep(0.02)
            source = worker.source
            assert await source.lag() == 25
            gate.set()
            await until(lambda: worker.statistics().completed == 30, "served the 30")
            tasks.cancel_scope.cancel()
    finally:
        gate.set()
    assert most == {"in_flight": 5, "pending": 5}
    assert await blocking(pending, client, stream) == 0


# -- the source's own terms ---------------------------------------------------


async def test_an_entry_without_a_body_is_its_fields_as_json(client: Any, stream: str) -> None:
    [plain, whole] = await blocking(add, client, stream, [b"\x00raw", {"a": "1", "b": "two"}])
    source = mds.workers.RedisStreamSource(stream, consumer="a", client=client)
    received = await source.receive(10, 0.01, 5.0)
    assert [(m.id, m.body, m.deliveries, m.handle) for m in received] == [
        (plain, b"\x00raw", 1, plain),
        (whole, b'{"a":"1","b":"two"}', 1, whole),
    ]
    # Released at once, it is taken over by the next receive: a second delivery.
    await source.release(received[0], 0.0)
    [again] = await source.receive(10, 0.01, 5.0)
    assert (again.id, again.body, again.deliveries) == (plain, b"\x00raw", 2)
    await source.acknowledge(again)
    await source.dead_letter(received[1], "no good")
    assert await blocking(pending, client, stream) == 0
    assert await blocking(dead_letters, client, stream) == [
        (whole, b'{"a":"1","b":"two"}', "no good")
    ]


async def test_the_sink_adds_each_result_once_however_often_it_is_written(
    client: Any, stream: str
) -> None:
    sink = mds.workers.RedisStreamSink(f"{stream}:out", client=client)
    first, second = (mds.workers.Message(id=i, body=b"") for i in ("1-0", "2-0"))
    await sink.write(first, b'{"id":"1-0","result":1}')
    await blocking(client.script_flush)  # the batched form loads its script again
    outcomes = await sink.write_many(
        [(first, b'{"id":"1-0","result":1}'), (second, b'{"id":"2-0","result":2}')]
    )
    assert outcomes == [None, None]
    await sink.write(second, b'{"id":"2-0","result":2}')
    assert await blocking(results, client, stream) == {"1-0": 1, "2-0": 2}
    assert await blocking(result_entries, client, stream) == ["1-0", "2-0"]


async def test_a_missing_group_is_named_when_the_source_may_not_create_it(
    client: Any, stream: str
) -> None:
    source = mds.workers.RedisStreamSource(stream, group="g", client=client, create=False)
    with pytest.raises(mds.ConfigError, match="XGROUP CREATE") as info:
        await source.receive(1, 0.01, 5.0)
    assert f"stream {stream!r} has no consumer group 'g'" in str(info.value)


async def test_a_worker_on_a_missing_group_is_refused_at_start(client: Any, stream: str) -> None:
    runtime = runtime_with(Summer())
    worker = mds.workers.QueueWorker(
        runtime,
        "summer",
        mds.workers.RedisStreamSource(stream, group="g", client=client, create=False),
        mds.workers.RedisStreamSink(f"{stream}:out", client=client),
    )
    with pytest.raises(mds.ConfigError, match=f"XGROUP CREATE {stream} g 0 MKSTREAM"):
        async with worker:
            pass
    assert not runtime.running


def test_without_redis_py_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(mds.MissingDependency, match=r'pip install "mds-serving\[redis\]"'):
        mds.workers.RedisStreamSource("requests")
    with pytest.raises(mds.MissingDependency, match=r'pip install "mds-serving\[redis\]"'):
        mds.workers.RedisStreamSink("results")
