"""Models for the gRPC tests, and a real server (``mds.grpc.Server``) for a whole module."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

import mds
import mds.grpc

from .. import accumulate

SPEC = mds.TensorSpec


class Scale(mds.ModelHandler[np.ndarray, np.ndarray]):
    """``y = x * scale``: 4 floats a row; ``scale`` is a request parameter (1 if not given)."""

    def signature(self) -> Any:
        return (
            {"x": SPEC(name="x", dtype="float32", shape=(4,))},
            {"y": SPEC(name="y", dtype="float32", shape=(4,), labels=("a", "b", "c", "d"))},
        )

    def from_tensors(self, tensors: dict[str, Any]) -> np.ndarray:
        x: np.ndarray = tensors["x"]
        return x

    def to_tensors(self, response: np.ndarray) -> dict[str, Any]:
        return {"y": response}

    def preprocess(self, request: np.ndarray) -> np.ndarray:
        scale = mds.request_context().parameters.get("scale", 1)
        return request * np.float32(scale)

    def infer(self, batch: Sequence[np.ndarray]) -> list[np.ndarray]:
        return list(batch)


class Parameters(mds.ModelHandler[Any, Any]):
    """Gives back, as JSON text, the request context its ``preprocess`` saw."""

    def preprocess(self, request: Any) -> str:
        context = mds.request_context()
        return json.dumps({"id": context.id, "parameters": dict(context.parameters)})

    def infer(self, batch: Sequence[str]) -> list[str]:
        return list(batch)

    def to_tensors(self, response: str) -> dict[str, Any]:
        return {"seen": np.array([response.encode()], dtype=object)}


class Echo(mds.ModelHandler[Any, Any]):
    """Gives back the tensors it was sent (no signature: as they come, by name)."""

    def infer(self, batch: Sequence[Any]) -> list[Any]:
        return list(batch)


class Upper(mds.ModelHandler[Any, Any]):
    """BYTES in, BYTES out: each element upper-cased (no signature: the tensors as they come)."""

    def infer(self, batch: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        return [{"text": np.vectorize(bytes.upper, otypes=[object])(r["text"])} for r in batch]


class Words(mds.ModelHandler[str, str]):
    """Streams its text back a word at a time; the word 'boom' fails the stream there."""

    def from_tensors(self, tensors: dict[str, Any]) -> str:
        text: str = tensors["text"].item().decode()
        return text

    def infer(self, batch: Sequence[str]) -> list[str]:
        return list(batch)

    def postprocess(self, output: str) -> Iterator[str]:
        for word in output.split():
            if word == "boom":
                raise ValueError("the stream broke at 'boom'")
            yield word


class Said(Words):
    """Streams its words, each with the request's id as each chunk's step saw it."""

    def postprocess(self, output: str) -> Iterator[str]:
        for word in output.split():
            yield f"{word}@{mds.request_context().id}"


class Held(mds.ModelHandler[Any, Any]):
    """One request at a time, each held until ``gate`` opens; one more may queue."""

    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate

    def infer(self, batch: Sequence[Any]) -> list[Any]:
        self.gate.wait(30)
        return list(batch)


class Fails(mds.ModelHandler[Any, Any]):
    def infer(self, batch: Sequence[Any]) -> list[Any]:
        raise RuntimeError("the weights are gone")


class Broken(mds.ModelHandler[Any, Any]):
    def init(self, context: mds.ModelContext) -> None:
        raise OSError("no weights at /models/broken")

    def infer(self, batch: Sequence[Any]) -> list[Any]:
        return list(batch)


class Unreadable:
    """An output numpy cannot read: a bug in a handler, not a client's mistake."""

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals")


class Weird(mds.ModelHandler[Any, Any]):
    def infer(self, batch: Sequence[Any]) -> list[Any]:
        return [Unreadable() for _ in batch]


BATCHED = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=8, max_queue_delay=0.002))


def make_runtime(gate: threading.Event) -> mds.Runtime:
    runtime = mds.Runtime(fail_fast=False)
    runtime.add_model("scale", Scale, BATCHED)
    runtime.add_model("counted", Scale, BATCHED)  # served a known number of times
    runtime.add_model("parameters", Parameters)
    runtime.add_model("echo", Echo)
    runtime.add_model("totals", accumulate.Accumulate, accumulate.STATEFUL)
    runtime.add_model("upper", Upper)
    runtime.add_model("words", Words)
    runtime.add_model("said", Said)
    runtime.add_model(
        "held",
        lambda: Held(gate),
        mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=1, max_queue_size=1)),
    )
    runtime.add_model("fails", Fails)
    runtime.add_model("broken", Broken)
    runtime.add_model("weird", Weird)
    return runtime


@pytest.fixture(scope="session", autouse=True)
def grpc_aio_kept_up() -> Iterator[None]:
    """grpc.aio stays initialised for the whole session, so that it never shuts down in a test.

    grpc.aio shuts itself down (joining its poller thread) whenever its last
    channel or server is freed, on whichever thread frees it: in an async
    test, the event loop, where the blocking-call guard fails the join and
    leaves grpc half shut down for the tests after it. A channel held (and
    never used) for the session keeps that out of the tests.
    """
    grpc = pytest.importorskip("grpc")
    from mds._bridge import process_portal

    async def open_channel() -> Any:
        return grpc.aio.insecure_channel("127.0.0.1:1")

    portal = process_portal()
    kept = [portal.call(open_channel)]
    yield
    portal.call(kept[0].close)
    kept.clear()  # grpc.aio shuts down here, in no event loop


class Served:
    """A running ``mds.grpc.Server``: its runtime, address, and the held model's gate."""

    def __init__(self, server: mds.grpc.Server, gate: threading.Event) -> None:
        self.server = server
        self.runtime = server.runtime
        self.url = f"127.0.0.1:{server.port}"
        self.gate = gate
        self.held = self.runtime.model("held")

    @contextmanager
    def holding(self) -> Iterator[mds.ModelRuntime[Any, Any]]:
        """The held model with its gate shut; open, and the model idle again, after."""
        self.gate.clear()
        try:
            yield self.held
        finally:
            self.gate.set()
            # Idle: a batch still computing would find the next test's gate shut.
            eventually(lambda: _idle(self.held.statistics()), "idle")

    def fill(self, send: Callable[[], Any]) -> Any:
        """With the gate shut, ``send()`` three requests: one computes, one is handed over
        to follow it, one is queued (the queue is then full). The last ``send()``'s value."""
        send()
        eventually(lambda: self.held.statistics().batches_in_flight == 1, "computing")
        send()
        eventually(lambda: self.held.statistics().batches_in_flight == 2, "handed over")
        last = send()
        eventually(lambda: self.held.statistics().queued == 1, "queued")
        return last


def _idle(stats: mds.ModelStatistics) -> bool:
    return stats.in_flight == 0 and stats.batches_in_flight == 0 and stats.queued == 0


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """A server for the module, started the sync way (in mds's background loop)."""
    gate = threading.Event()
    gate.set()
    server = mds.grpc.Server(make_runtime(gate), "127.0.0.1:0", load="wait")
    server.start_sync()
    try:
        yield Served(server, gate)
    finally:
        gate.set()
        server.stop_sync()
    assert not server.runtime.running  # it started the runtime, so it stopped it


@pytest.fixture
def client(served: Served) -> Iterator[Any]:
    """tritonclient's sync gRPC client for ``served``."""
    import tritonclient.grpc

    triton = tritonclient.grpc.InferenceServerClient(served.url)
    try:
        yield triton
    finally:
        triton.close()


def eventually(check: Callable[[], bool], what: str, seconds: float = 20) -> None:
    """Wait (in this thread) until ``check()`` holds; fail, saying ``what``, if it never does."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.01)


@pytest.fixture(name="eventually", scope="session")
def _eventually() -> Callable[..., None]:
    """``eventually(lambda: ..., "what")``: see ``eventually``."""
    return eventually
