"""gRPC against HTTP: the Open Inference Protocol with Triton's clients on both.

The benchmark MLP of benchmarks/transports.py (256 -> 1024 -> 1024 -> 16, one
torch thread, batches of at most 32 with a 2 ms delay) declares its tensors
(``x``: 256 FP32 -> ``y``: 16 FP32). Two servers run side by side, each
pinned to core 0 (taskset):

  http  mds.fastapi.add_routes on uvicorn (uvloop, httptools); the client
        sends and receives binary tensor data (tritonclient.http.aio)
  grpc  mds.grpc.Server; raw tensor contents (tritonclient.grpc.aio)

The clients run in this process on core 1: at 1 and 64 concurrent calls,
measured in interleaved rounds (medians quoted) so that the machine's drift
falls on both alike. Besides requests/s and p50/p99 it reads each server's
CPU time (/proc) per request: the target is that a gRPC request costs no
more server CPU than an HTTP binary one. Last, the cost of each transport's
lightest call (liveness), its floor: what the framework costs before mds
does anything.

Needs two cores. Run:

    python benchmarks/grpc_vs_http.py [--duration 10] [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
SERVERS = HERE / "http_servers"
LEVELS = (1, 64)
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(kind: str, port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=f"{SERVERS}{os.pathsep}{HERE.parent}")
    return subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, str(SERVERS / "protocol_app.py"), kind, str(port)],
        cwd=SERVERS,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def stop(server: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    except ProcessLookupError:
        pass


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


Call = Callable[[], Awaitable[Any]]


def clients(kind: str, port: int) -> tuple[Any, Call]:
    """A client and one inference call, with a fixed random row."""
    row = np.random.default_rng(0).random((1, 256), dtype=np.float32)
    if kind == "http":
        import tritonclient.http as http
        import tritonclient.http.aio as http_aio

        client: Any = http_aio.InferenceServerClient(f"127.0.0.1:{port}", conn_limit=256)
        given: Any = http.InferInput("x", [1, 256], "FP32")
        given.set_data_from_numpy(row, binary_data=True)
        wanted: Any = [http.InferRequestedOutput("y", binary_data=True)]
    else:
        import tritonclient.grpc as grpc
        import tritonclient.grpc.aio as grpc_aio

        client = grpc_aio.InferenceServerClient(f"127.0.0.1:{port}")
        given = grpc.InferInput("x", [1, 256], "FP32")
        given.set_data_from_numpy(row)
        wanted = [grpc.InferRequestedOutput("y")]

    async def call() -> Any:
        result = await client.infer("mlp", [given], outputs=wanted)
        assert result.as_numpy("y").shape == (1, 16)

    return client, call


def live_call(client: Any) -> Call:
    """The lightest call there is (ServerLive, GET /v2/health/live): the transport's own floor."""

    async def call() -> Any:
        assert await client.is_server_live()

    return call


async def load(call: Call, concurrency: int, seconds: float) -> list[float]:
    """Latencies (ms) of the calls ``concurrency`` callers completed in ``seconds``."""
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def caller() -> None:
        while (began := time.perf_counter()) < end:
            await call()
            latencies.append((time.perf_counter() - began) * 1e3)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies


async def wait_ready(call: Call, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 180
    while True:
        if server.poll() is not None:
            err = server.stderr.read().decode() if server.stderr else ""
            raise RuntimeError(f"the server exited ({server.returncode}):\n{err[-3000:]}")
        try:
            await call()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


async def measure(args: argparse.Namespace) -> None:
    seconds = 2.0 if args.quick else args.duration
    rounds = 1 if args.quick else args.rounds
    servers = {kind: (start(kind, port := free_port()), port) for kind in ("http", "grpc")}
    runs: dict[str, dict[int, list[dict[str, float]]]] = {}
    made: dict[str, tuple[Any, Call]] = {}
    floors: dict[str, float] = {}
    try:
        for kind, (server, port) in servers.items():
            made[kind] = clients(kind, port)
            await wait_ready(made[kind][1], server)
            print(f"{kind}: warming up ...", flush=True)
            await load(made[kind][1], 64, min(3.0, seconds))
        for level in LEVELS:
            for _ in range(rounds):
                for kind, (server, _) in servers.items():
                    cpu = cpu_seconds(server.pid)
                    mine = time.process_time()
                    began = time.perf_counter()
                    latencies = await load(made[kind][1], level, seconds / rounds)
                    wall = time.perf_counter() - began
                    used = cpu_seconds(server.pid) - cpu
                    runs.setdefault(kind, {}).setdefault(level, []).append(
                        {
                            "rps": len(latencies) / wall,
                            "p50": float(np.percentile(latencies, 50)),
                            "p99": float(np.percentile(latencies, 99)),
                            "cpu_us": used / len(latencies) * 1e6,
                            "server_busy": used / wall,
                            "client_busy": (time.process_time() - mine) / wall,
                        }
                    )
            for kind in servers:
                found = median(runs[kind][level])
                print(
                    f"   {kind:<5} {level:>3} clients: {found['rps']:7.0f} req/s"
                    f"  p50 {found['p50']:6.2f} ms  p99 {found['p99']:6.2f} ms"
                    f"  server CPU {found['cpu_us']:5.0f} µs/request"
                    f"  (server core {found['server_busy']:.0%} busy,"
                    f" client core {found['client_busy']:.0%})",
                    flush=True,
                )
        # Where the time goes: the same servers' cost of their lightest call.
        for kind, (server, _) in servers.items():
            floor = live_call(made[kind][0])
            cpu = cpu_seconds(server.pid)
            began = time.perf_counter()
            count = len(await load(floor, 64, seconds / 2))
            used = cpu_seconds(server.pid) - cpu
            floors[kind] = used / count * 1e6
            print(
                f"   {kind:<5} liveness, 64 clients: {count / (time.perf_counter() - began):7.0f}"
                f" calls/s, server CPU {floors[kind]:5.0f} µs/call",
                flush=True,
            )
    finally:
        for client, _ in made.values():
            await client.close()
        for server, _ in servers.values():
            stop(server)

    print()
    for level in LEVELS:
        pairs = list(zip(runs["grpc"][level], runs["http"][level], strict=True))

        def ratio(key: str, pairs: list[tuple[dict[str, float], ...]] = pairs) -> float:
            return statistics.median(g[key] / h[key] for g, h in pairs)

        print(
            f"{level:>3} clients: gRPC/HTTP req/s {ratio('rps'):.2f}x, p50 {ratio('p50'):.2f}x,"
            f" p99 {ratio('p99'):.2f}x, server CPU per request {ratio('cpu_us'):.2f}x"
            " (target <= 1.00x)"
        )
    print("(medians of each round's ratio, the two measured a moment apart)")
    print(
        f"the transports' own floor (a liveness call): gRPC {floors['grpc']:.0f} µs,"
        f" HTTP {floors['http']:.0f} µs of server CPU per call"
    )


def median(found: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(f[key] for f in found) for key in found[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level, in all")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per level")
    parser.add_argument("--quick", action="store_true", help="2 s per level, one round")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("this benchmark needs two cores: the servers on one, the clients on the other")
    os.sched_setaffinity(0, {1})  # the clients' core
    asyncio.run(measure(args))


if __name__ == "__main__":
    main()
