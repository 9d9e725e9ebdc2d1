"""mds on Ray against mds alone and against Ray Serve's own batching, side by side in one run.

    python benchmarks/on_ray.py            (a few minutes; --quick for a smoke run)

The benchmark MLP (256 -> 1024 -> 1024 -> 16, one torch thread), on a local
Ray with two CPUs, in interleaved rounds (medians quoted):

(a) batch: the same job (a Parquet file of N rows through ``TorchHandler``,
    batches of 64) on the local batch runner (``mds.batch.run``) and on Ray
    Data (``mds.ray.map_dataset``, one actor): rows/s and the overhead ratio;
(b) online: one Ray Serve replica with mds inside (``mds.ray.application``)
    against one with Ray Serve's ``@serve.batch`` around the same module
    (same batch size and wait, the same ``max_ongoing_requests``), 64
    clients over Ray's HTTP proxy and through the deployment's handle:
    requests/s, p50 and p99, and the mean batch size each formed. mds runs
    twice: with its default policy (an idle model does not wait), and
    waiting as ``@serve.batch`` does (``wait_when_idle``, its 2 ms counted
    from the batch's start: ``delay_from="start"``, see ``build_json_waiting``).
    Target: mds not slower, batches at least as large.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import ray
import torch
from backends import make_mlp  # the same MLP as the backends benchmark
from batch import BATCH, CONFIG, handler, write_input
from ray import serve

import mds
import mds.batch
import mds.ray

HERE = Path(__file__).resolve().parent
CLIENTS = 64


def build() -> mds.Runtime:
    runtime = mds.Runtime()
    runtime.add_model("mlp", handler(), CONFIG)
    return runtime


def build_json() -> mds.Runtime:
    """The online arm's model: JSON ``{"x": [256 floats]}`` in, 16 floats out."""
    from json_mlp import JsonMLP  # a module of this folder, which the replicas import

    runtime = mds.Runtime()
    runtime.add_model("mlp", JsonMLP, CONFIG)
    return runtime


def build_json_waiting() -> mds.Runtime:
    """The same, waiting as ``@serve.batch`` does: at an idle model too, and as long.

    ``@serve.batch`` starts its 2 ms when it takes a batch's first request,
    so a request that queued while the previous batch computed waits that
    batch's time and 2 ms more: mds's ``delay_from="start"``.
    """
    from json_mlp import JsonMLP

    batching = mds.BatchingConfig(
        max_batch_size=BATCH, max_queue_delay=0.002, wait_when_idle=True, delay_from="start"
    )
    runtime = mds.Runtime()
    runtime.add_model("mlp", JsonMLP, mds.ModelConfig(cpu_threads=1, batching=batching))
    return runtime


# -- (a) the batch job ----------------------------------------------------------


def local_job(source: Path, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    runtime = build()
    runtime.start_sync()
    try:
        began = time.perf_counter()
        report = mds.batch.run_sync(runtime.servable("mlp"), source, out, progress=False)
        elapsed = time.perf_counter() - began
    finally:
        runtime.stop_sync()
    assert report.failed == 0
    return report.done / elapsed


def ray_job(source: Path, out: Path, rows: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    began = time.perf_counter()
    scored = mds.ray.map_dataset(
        ray.data.read_parquet(str(source)), build, "mlp", batch_size=1024, num_cpus=1
    )
    scored.write_parquet(str(out))
    elapsed = time.perf_counter() - began
    return rows / elapsed


# -- (b) online -------------------------------------------------------------------


def serve_batch_app(ongoing: int) -> Any:
    """Ray Serve's own way: ``@serve.batch`` around the same module."""

    @serve.deployment(max_ongoing_requests=ongoing, name="mlp")
    class BatchedMLP:
        def __init__(self) -> None:
            torch.set_num_threads(1)
            self.module = make_mlp().eval()
            self.sizes: list[int] = []

        @serve.batch(max_batch_size=BATCH, batch_wait_timeout_s=0.002)
        async def infer(self, rows: list[list[float]]) -> list[list[float]]:
            self.sizes.append(len(rows))
            with torch.inference_mode():
                out = self.module(torch.tensor(np.asarray(rows, dtype=np.float32)))
            return out.numpy().tolist()

        async def __call__(self, request: Any) -> list[float]:
            body = await request.json()
            return await self.infer(body["x"])

        async def score(self, body: dict[str, Any]) -> list[float]:
            return await self.infer(body["x"])

        def mean_batch(self) -> float:
            sizes, self.sizes = self.sizes, []
            return sum(sizes) / len(sizes) if sizes else 0.0

    return BatchedMLP.bind()


BODY = {"x": np.random.default_rng(0).standard_normal(256).astype(np.float32).tolist()}


async def load(url: str, seconds: float) -> tuple[float, float, float]:
    """64 clients over HTTP for ``seconds``: requests/s, p50 and p99 in ms."""
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def call() -> None:
            reply = await client.post(url, json=BODY)
            assert reply.status_code == 200, reply.text

        return await clients(call, seconds)


async def load_handle(handle: Any, arm: str, seconds: float) -> tuple[float, float, float]:
    """64 callers of the deployment's handle (no HTTP proxy) for ``seconds``."""

    async def call() -> None:
        if arm != "serve.batch":
            await handle.serve.remote("mlp", BODY)
        else:
            await handle.score.remote(BODY)

    return await clients(call, seconds)


async def clients(call: Any, seconds: float) -> tuple[float, float, float]:
    """``CLIENTS`` callers of ``call`` in a loop: requests/s, p50 and p99 in ms."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def one() -> None:
        while time.perf_counter() < stop:
            began = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(CLIENTS)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return len(latencies) / elapsed, p(0.5), p(0.99)


def online(port: int, seconds: float, rounds: int) -> None:
    url = f"http://127.0.0.1:{port}"
    options: dict[str, Any] = {"name": "mlp", "ray_actor_options": {"num_cpus": 1}}
    apps = {
        "mds": mds.ray.application(build_json, **options),
        "mds waiting": mds.ray.application(build_json_waiting, **options),
    }
    arms = ("mds", "mds waiting", "serve.batch")
    from mds._ray.serve import ongoing_requests  # the value mds sets, given to both

    same = ongoing_requests(build_json(), None)
    keys = [(via, arm) for via in ("http", "handle") for arm in arms]
    results: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {
        key: [] for key in keys
    }

    def snapshot(handle: Any, arm: str) -> tuple[float, int]:
        """mds: its batch-size histogram's sum and count now; serve.batch: forget its sizes."""
        if arm != "serve.batch":
            batch = handle.statistics.remote().result()["mlp"]["histograms"]["batch_size"]
            return float(batch["sum"]), int(sum(batch["counts"]))
        handle.mean_batch.remote().result()
        return 0.0, 0

    def mean_since(handle: Any, arm: str, before: tuple[float, int]) -> float:
        if arm != "serve.batch":
            total, count = snapshot(handle, arm)
            return (total - before[0]) / max(1, count - before[1])
        return float(handle.mean_batch.remote().result())

    for _ in range(rounds):
        for arm in arms:
            app = apps[arm] if arm in apps else serve_batch_app(same)
            handle = serve.run(app, name="bench", route_prefix="/")
            path = "/" if arm == "serve.batch" else "/models/mlp/infer"
            asyncio.run(load(url + path, 2.0))  # warm
            for via in ("http", "handle"):
                before = snapshot(handle, arm)
                if via == "http":
                    rate, p50, p99 = asyncio.run(load(url + path, seconds))
                else:
                    rate, p50, p99 = asyncio.run(load_handle(handle, arm, seconds))
                mean = mean_since(handle, arm, before)
                results[(via, arm)].append((rate, p50, p99, mean))
            serve.delete("bench")
    print(f"\n(b) online, 64 clients, max_ongoing_requests={same}, medians of {rounds}:")
    print(f"{'':26}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'batch':>8}")
    for (via, arm), rows in results.items():
        m = [statistics.median(r[i] for r in rows) for i in range(4)]
        print(f"{via + ': ' + arm:26}{m[0]:9.0f}{m[1]:9.1f}{m[2]:9.1f}{m[3]:8.1f}")
    for via in ("http", "handle"):
        for arm in apps:
            pairs = list(zip(results[(via, arm)], results[(via, "serve.batch")], strict=True))
            ratio = statistics.median(a[0] / b[0] for a, b in pairs)
            batches = statistics.median(a[3] / max(b[3], 1e-9) for a, b in pairs)
            print(
                f"{via}: {arm} / serve.batch requests/s {ratio:.2f}x (target >= 1.0), "
                f"mean batch {batches:.2f}x (target >= 1.0)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--online-only", action="store_true", help="skip (a), the batch job")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.rounds, args.seconds = 5_000, 1, 3.0
    folder = Path(tempfile.mkdtemp(prefix="mds-on-ray-"))
    source = folder / "rows.parquet"
    write_input(source, args.rows)
    path = os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    try:
        local, on_ray = [], []
        for _ in range(0 if args.online_only else args.rounds):
            local.append(local_job(source, folder / "local"))
            on_ray.append(ray_job(source, folder / "ray", args.rows))
        if local:
            print(f"(a) batch, {args.rows:,} rows, Parquet to Parquet, medians of {args.rounds}:")
            print(f"local batch runner  {statistics.median(local):9,.0f} rows/s")
            print(f"Ray Data (1 actor)  {statistics.median(on_ray):9,.0f} rows/s")
            ratio = statistics.median(r / lo for r, lo in zip(on_ray, local, strict=True))
            print(f"Ray Data / local: {ratio:.2f}x")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        online(port, args.seconds, args.rounds)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
