"""``mds.grpc.Server`` under asyncio, trio and sync code; ``add_to_server`` on your own server."""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

import anyio
import numpy as np
import pytest

# Imported here: numpy imports its testing module on first use, which must not be on the loop.
from numpy.testing import assert_array_equal

import mds
import mds.grpc

pytest.importorskip("grpc")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")

from tests.grpc.conftest import BATCHED, Scale, make_runtime  # noqa: E402

InferInput = tritonclient_grpc.InferInput


def features(array: np.ndarray) -> Any:
    found = InferInput("x", list(array.shape), "FP32")
    found.set_data_from_numpy(array)
    return found


def scaled_by_a_client(port: int, rows: int = 3) -> np.ndarray:
    """What the sync client gets from model ``scale`` for ``rows`` rows (blocks)."""
    triton = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        assert triton.is_server_live() and triton.is_model_ready("scale")
        x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
        result: np.ndarray = triton.infer("scale", [features(x)]).as_numpy("y")
        return result
    finally:
        triton.close()


def scale_runtime() -> mds.Runtime:
    runtime = mds.Runtime()
    runtime.add_model("scale", Scale, BATCHED)
    return runtime


EXPECTED = np.arange(12, dtype=np.float32).reshape(3, 4)


async def test_the_server_runs_the_runtime_for_its_lifetime(anyio_backend: str) -> None:
    """Under asyncio on the host's loop; under trio on mds's loop, the runtime in trio's."""
    runtime = scale_runtime()
    server = mds.grpc.Server(runtime, "127.0.0.1:0", load="wait", grace=1.0)
    with pytest.raises(mds.LifecycleError, match="is not running; its port is bound"):
        _ = server.port
    async with server as entered:
        assert entered is server and runtime.running
        assert f"port {server.port}" in repr(server)
        result = await anyio.to_thread.run_sync(scaled_by_a_client, server.port)
        assert_array_equal(result, EXPECTED)
        with pytest.raises(mds.LifecycleError, match="is already running"):
            await server.__aenter__()
    assert not runtime.running
    assert runtime.model("scale").statistics().completed == 3
    # It can run again.
    async with server:
        assert_array_equal(
            await anyio.to_thread.run_sync(scaled_by_a_client, server.port), EXPECTED
        )


async def test_a_running_runtime_is_left_running(anyio_backend: str) -> None:
    runtime = scale_runtime()
    async with runtime:
        async with mds.grpc.Server(runtime, "127.0.0.1:0") as server:
            result = await anyio.to_thread.run_sync(scaled_by_a_client, server.port)
            assert_array_equal(result, EXPECTED)
        assert runtime.running


def test_sync_code_runs_it_in_mds_background_loop() -> None:
    runtime = scale_runtime()
    with mds.grpc.Server(runtime, "127.0.0.1:0", load="wait") as server:
        assert runtime.running
        assert_array_equal(scaled_by_a_client(server.port), EXPECTED)
        with pytest.raises(mds.LifecycleError, match="already started"):
            server.start_sync()
    assert not runtime.running
    with pytest.raises(mds.LifecycleError, match="was not started"):
        server.stop_sync()


def test_an_address_it_cannot_listen_on_stops_what_it_started() -> None:
    runtime = scale_runtime()
    server = mds.grpc.Server(runtime, "256.0.0.1:99999")
    with pytest.raises(mds.LifecycleError, match=r"cannot listen on 256\.0\.0\.1:99999"):
        server.start_sync()
    assert not runtime.running


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # grpc.aio runs on asyncio
async def test_add_to_server_serves_from_your_own_server(anyio_backend: str) -> None:
    import grpc
    import tritonclient.grpc.aio as aio

    runtime = scale_runtime()
    server = grpc.aio.server()
    mds.grpc.add_to_server(server, runtime)
    port = server.add_insecure_port("127.0.0.1:0")
    async with runtime:
        await server.start()
        triton = aio.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            assert await triton.is_model_ready("scale")
            x = np.ones((2, 4), np.float32)
            result = await triton.infer("scale", [features(x)])
            assert_array_equal(result.as_numpy("y"), x)
            metadata = await triton.get_server_metadata(as_json=True)
            assert "model_repository" not in metadata["extensions"]
        finally:
            await triton.close()
            await server.stop(None)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the aio client runs on asyncio
async def test_hammered_every_call_gets_its_own_answer(anyio_backend: str) -> None:
    """Hundreds of concurrent calls, some bad: each answered right; batches form."""
    import tritonclient.grpc.aio as aio

    runtime = scale_runtime()
    answers: dict[int, Any] = {}
    async with mds.grpc.Server(runtime, "127.0.0.1:0", load="wait") as server:
        triton = aio.InferenceServerClient(f"127.0.0.1:{server.port}")

        async def call(index: int) -> None:
            width = 5 if index % 7 == 0 else 4  # every seventh is bad
            x = np.full((1, width), index, np.float32)
            try:
                result = await triton.infer("scale", [features(x)], request_id=str(index))
                answers[index] = (result.get_response().id, result.as_numpy("y"))
            except Exception as exc:  # tritonclient's InferenceServerException
                answers[index] = exc

        try:
            async with anyio.create_task_group() as tasks:
                for index in range(300):
                    tasks.start_soon(call, index)
        finally:
            await triton.close()
    assert sorted(answers) == list(range(300))
    for index, answer in answers.items():
        if index % 7 == 0:
            assert answer.status() == "StatusCode.INVALID_ARGUMENT", answer
            assert "model 'scale' (version 1)" in answer.message()
        else:
            answered_id, y = answer
            assert answered_id == str(index)
            assert_array_equal(y, np.full((1, 4), index, np.float32))
    stats = runtime.model("scale").statistics()
    assert stats.completed == 300 - len(range(0, 300, 7))
    assert max(stats.batch_sizes) > 1, stats.batch_sizes


def test_the_servers_runtime_lives_in_trio_while_grpc_runs_in_mds_loop() -> None:
    """A trio app: grpc.aio cannot run on trio's loop, and the host's loop is left alone."""
    import trio

    gate = threading.Event()
    gate.set()
    runtime = make_runtime(gate)
    seen: list[Any] = []

    async def app() -> None:
        async with mds.grpc.Server(runtime, "127.0.0.1:0", load="wait") as server:
            seen.append(await trio.to_thread.run_sync(scaled_by_a_client, server.port, 2))
            seen.append(runtime._home.thread == threading.get_ident())  # the runtime's home

    trio.run(app)
    assert_array_equal(seen[0], EXPECTED[:2])
    assert seen[1] is True
    assert not runtime.running


def test_without_grpcio_it_names_the_extra_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['grpc'] = None  # as if not installed\n"
        "import mds, mds.grpc\n"
        "for start in (lambda: mds.grpc.add_to_server(None, mds.Runtime()),\n"
        "              lambda: mds.grpc.Server(mds.Runtime()).start_sync()):\n"
        "    try:\n"
        "        start()\n"
        "    except mds.MissingDependency as exc:\n"
        "        print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    lines = out.stdout.splitlines()
    assert len(lines) == 2
    assert all("mds.grpc needs the optional dependency" in line for line in lines)
    assert all('pip install "mds-serving[grpc]"' in line for line in lines)


def test_add_to_server_refuses_a_sync_server() -> None:
    import concurrent.futures

    import grpc

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(1))
    with pytest.raises(TypeError, match=r"takes a grpc\.aio server, not"):
        mds.grpc.add_to_server(server, mds.Runtime())


def test_the_callers_message_limit_wins() -> None:
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    options = [("grpc.max_receive_message_length", 1024)]
    with mds.grpc.Server(scale_runtime(), "127.0.0.1:0", load="wait", options=options) as server:
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
        rows = np.zeros((100, 4), dtype=np.float32)  # 1.6 kB of tensor: over the limit
        with pytest.raises(InferenceServerException, match="RESOURCE_EXHAUSTED"):
            client.infer("scale", [features(rows)])
        assert client.infer("scale", [features(rows[:2])]).as_numpy("y").shape == (2, 4)
        client.close()
