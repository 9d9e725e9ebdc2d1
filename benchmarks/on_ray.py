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

Where the time goes, per arm: batches a second, the model's busy share of
the wall time, and the mean idle time between one batch's end and the
next one's start (the rest of a batch's cycle): at the same requests/s, a
batch holds what arrives in one cycle.

    --pin          the replica on a core of its own (as ``num_cpus=1`` gives
                   it in a cluster), the callers, the proxy and Ray's daemons
                   on the other
    --width 4096   a wider MLP (256 -> W -> W -> 16), to make the model, not
                   Ray's per-request work, the replica's bottleneck
    --wait-ms 4    "mds waiting" waits this long (2 ms, as ``@serve.batch``)
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

    wait = float(os.environ.get("ON_RAY_WAIT_MS", "2")) / 1000  # --wait-ms
    batching = mds.BatchingConfig(
        max_batch_size=BATCH, max_queue_delay=wait, wait_when_idle=True, delay_from="start"
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
            from json_mlp import module

            torch.set_num_threads(1)
            self.module = module()
            self.items = self.batches = 0
            self.seconds = 0.0

        @serve.batch(max_batch_size=BATCH, batch_wait_timeout_s=0.002)
        async def infer(self, rows: list[list[float]]) -> list[list[float]]:
            began = time.perf_counter()
            with torch.inference_mode():
                out = self.module(torch.tensor(np.asarray(rows, dtype=np.float32)))
            result: list[list[float]] = out.numpy().tolist()
            self.seconds += time.perf_counter() - began
            self.items += len(rows)
            self.batches += 1
            return result

        async def __call__(self, request: Any) -> list[float]:
            body = await request.json()
            return await self.infer(body["x"])

        async def score(self, body: dict[str, Any]) -> list[float]:
            return await self.infer(body["x"])

        def counters(self) -> tuple[int, int, float]:
            return self.items, self.batches, self.seconds

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


def pin() -> None:
    """The replica's process on core 1; this process, Ray's daemons and its other workers on 0.

    Every thread of each process in this one's tree (``ray.init`` started
    Ray's daemons, which started its workers; an affinity is a thread's
    own), so the callers, Ray's proxy and the raylet leave the replica its
    core.
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # a process that has just ended
                continue
            parent = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [os.getpid()]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    for pid in tree:
        try:
            line = Path(f"/proc/{pid}/cmdline").read_bytes()
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        cores = {1} if b"ServeReplica:bench" in line else {0}
        for task in tasks:
            try:
                os.sched_setaffinity(int(task.name), cores)
            except OSError:  # a thread that has just ended
                pass


def online(port: int, seconds: float, rounds: int, pinned: bool) -> None:
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
    results: dict[tuple[str, str], list[tuple[float, ...]]] = {key: [] for key in keys}

    def counters(handle: Any, arm: str) -> tuple[float, float, float, float]:
        """Items batched, batches, seconds in the model, and the time now."""
        if arm != "serve.batch":
            stats = handle.statistics.remote().result()["mlp"]
            items, batches = stats["batched_items"], stats["batches"]
            seconds = stats["infer_seconds"]
        else:
            items, batches, seconds = handle.counters.remote().result()
        return float(items), float(batches), float(seconds), time.perf_counter()

    def cycle(before: tuple[float, ...], after: tuple[float, ...]) -> tuple[float, ...]:
        """Mean batch, batches a second, the model's busy share, idle ms between batches."""
        items, batches, busy, wall = (a - b for a, b in zip(after, before, strict=True))
        batches = max(batches, 1.0)
        return items / batches, batches / wall, busy / wall, (wall - busy) / batches * 1000

    for _ in range(rounds):
        for arm in arms:
            app = apps[arm] if arm in apps else serve_batch_app(same)
            handle = serve.run(app, name="bench", route_prefix="/")
            if pinned:
                pin()
            path = "/" if arm == "serve.batch" else "/models/mlp/infer"
            asyncio.run(load(url + path, 2.0))  # warm
            for via in ("http", "handle"):
                before = counters(handle, arm)
                if via == "http":
                    rate, p50, p99 = asyncio.run(load(url + path, seconds))
                else:
                    rate, p50, p99 = asyncio.run(load_handle(handle, arm, seconds))
                results[(via, arm)].append((rate, p50, p99, *cycle(before, counters(handle, arm))))
            serve.delete("bench")
    layout = "the replica on a core of its own" if pinned else "all on two shared cores"
    print(
        f"\n(b) online, 64 clients, MLP width {os.environ['ON_RAY_WIDTH']}, {layout}, "
        f"max_ongoing_requests={same}, mds waiting {os.environ['ON_RAY_WAIT_MS']} ms, "
        f"medians of {rounds}:"
    )
    print(
        f"{'':26}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'batch':>8}"
        f"{'batch/s':>9}{'busy':>7}{'idle ms':>9}"
    )
    for (via, arm), rows in results.items():
        m = [statistics.median(r[i] for r in rows) for i in range(7)]
        print(
            f"{via + ': ' + arm:26}{m[0]:9.0f}{m[1]:9.1f}{m[2]:9.1f}{m[3]:8.1f}"
            f"{m[4]:9.0f}{m[5]:7.0%}{m[6]:9.1f}"
        )
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
    parser.add_argument("--pin", action="store_true", help="(b): the replica on a core of its own")
    parser.add_argument("--width", type=int, default=1024, help="(b): the MLP's hidden width")
    parser.add_argument("--wait-ms", type=float, default=2.0, help='(b): "mds waiting"\'s wait')
    args = parser.parse_args()
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        parser.error("--pin needs two cores")
    if args.quick:
        args.rows, args.rounds, args.seconds = 5_000, 1, 3.0
    folder = Path(tempfile.mkdtemp(prefix="mds-on-ray-"))
    source = folder / "rows.parquet"
    write_input(source, args.rows)
    settings = {"ON_RAY_WIDTH": str(args.width), "ON_RAY_WAIT_MS": str(args.wait_ms)}
    os.environ.update(settings)  # build_json_waiting runs here too
    path = os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path, **settings}},
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
        online(port, args.seconds, args.rounds, args.pin)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
