"""What a hot swap costs the requests in flight, and how soon a new version serves.

    python benchmarks/versions.py            (about a minute; --quick for a smoke run)

A numpy MLP (256 -> 512 -> 512 -> 16, weights built in ``init``, warm-up at
batch sizes 1, 8 and 32) under a steady load of concurrent callers, in
interleaved rounds:

- steady: no swap; the latency of each request;
- swapping: the same load while ``Runtime.load_model`` swaps in a new
  version every half second; the latency of the requests sent while a swap
  is in progress (from its start until the old version has drained);

p50 and p99 of both, the ratio swapping/steady (medians over rounds), and
the requests that failed (the target is none). Then the time from "new
version present" to "serving it": from ``load_model`` being called to its
return (a direct swap), and from a version folder renamed into a watched
repository to the first answer it computes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np

import mds

CONFIG = mds.ModelConfig(
    batching=mds.BatchingConfig(max_batch_size=32, max_queue_delay=0.002),
    warmup_batch_sizes=(1, 8, 32),
)


class MLP(mds.ModelHandler[np.ndarray, tuple[str, int]]):
    """Three dense layers; answers its version and the argmax."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def init(self, context: mds.ModelContext) -> None:
        rng = np.random.default_rng(self.seed + int(context.version))
        shapes = [(256, 512), (512, 512), (512, 16)]
        self.layers = [rng.standard_normal(s).astype(np.float32) / 16 for s in shapes]
        self.version = context.version

    def warmup(self) -> list[np.ndarray]:
        return [np.zeros(256, np.float32)]

    def infer(self, batch: list[np.ndarray]) -> list[tuple[str, int]]:
        x = np.stack(batch)
        for layer in self.layers[:-1]:
            x = np.maximum(x @ layer, 0)
        best = (x @ self.layers[-1]).argmax(axis=1)
        return [(self.version, int(b)) for b in best]


REPOSITORY_HANDLER = """
import sys
sys.path.insert(0, {folder!r})
from versions import MLP as handler
"""


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def load_round(swaps: int, seconds: float, callers: int) -> dict[str, Any]:
    """One round under load: latencies (sent while swapping, and not), failures."""
    runtime = mds.Runtime()
    runtime.add_model("mlp", MLP(), CONFIG)
    swapping = False
    during: list[float] = []
    steady: list[float] = []
    failures: list[BaseException] = []
    stop = anyio.Event()
    x = np.random.default_rng(1).standard_normal(256).astype(np.float32)

    async def caller() -> None:
        while not stop.is_set():
            began, in_swap = time.perf_counter(), swapping
            try:
                await runtime.serve("mlp", x)
            except Exception as exc:
                failures.append(exc)
                continue
            (during if in_swap or swapping else steady).append(time.perf_counter() - began)

    swap_seconds: list[float] = []
    async with runtime, anyio.create_task_group() as tasks:
        for _ in range(callers):
            tasks.start_soon(caller)
        await anyio.sleep(seconds / (swaps + 1))
        for version in range(2, swaps + 2):
            swapping = True
            began = time.perf_counter()
            old = runtime.model("mlp")
            await runtime.load_model("mlp", MLP(), CONFIG, version=str(version))
            swap_seconds.append(time.perf_counter() - began)
            # Until the old one has drained (its state is all there is to watch).
            while old.state is not mds.ModelState.STOPPED:  # noqa: ASYNC110
                await anyio.sleep(0.001)
            swapping = False
            await anyio.sleep(seconds / (swaps + 1))
        stop.set()
    return {"steady": steady, "during": during, "failures": failures, "swaps": swap_seconds}


async def repository_round(interval: float) -> float:
    """Seconds from a version folder renamed into a watched repository to its first answer."""
    with tempfile.TemporaryDirectory() as folder:
        model = Path(folder) / "mlp"
        runtime = mds.Runtime()
        await anyio.to_thread.run_sync(make_repository, model, runtime, interval)
        x = np.zeros(256, np.float32)
        async with runtime:
            began = time.perf_counter()
            await anyio.to_thread.run_sync(os.rename, model / ".2.incoming", model / "2")
            # Polled, as a client would see it: the first answer version 2 computes.
            while (await runtime.serve("mlp", x))[0] != "2":  # noqa: ASYNC110
                await anyio.sleep(0.001)
            return time.perf_counter() - began


def make_repository(model: Path, runtime: mds.Runtime, interval: float) -> None:
    """One version of the MLP in a repository, a second staged beside it, watched."""
    (model / "1").mkdir(parents=True)
    here = str(Path(__file__).resolve().parent)
    (model / "1" / "handler.py").write_text(REPOSITORY_HANDLER.format(folder=here))
    config = {"handler": "handler.py", "config": json.loads(mds_config_json())}
    (model / "mds.yaml").write_text(json.dumps(config))
    mds.ModelRepository(model.parent).add_to(runtime, watch=interval)
    shutil.copytree(model / "1", model / ".2.incoming")


def mds_config_json() -> str:
    import msgspec

    return msgspec.json.encode(CONFIG).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--callers", type=int, default=32)
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    seconds = 2.0 if args.quick else 10.0
    swaps = 3 if args.quick else 19  # with the first version: 20 versions a round
    p50s, p99s, failed = [], [], 0
    steady_all: list[float] = []
    during_all: list[float] = []
    swap_all: list[float] = []
    for number in range(rounds):
        found = anyio.run(load_round, swaps, seconds, args.callers)
        steady, during = found["steady"], found["during"]
        failed += len(found["failures"])
        steady_all += steady
        during_all += during
        swap_all += found["swaps"]
        p50s.append(quantile(during, 0.5) / quantile(steady, 0.5))
        p99s.append(quantile(during, 0.99) / quantile(steady, 0.99))
        print(
            f"round {number + 1}: {len(steady) + len(during):,} requests, "
            f"{len(during):,} during {swaps} swaps; p50 {quantile(steady, 0.5) * 1e3:.2f} ms "
            f"steady / {quantile(during, 0.5) * 1e3:.2f} ms swapping; p99 "
            f"{quantile(steady, 0.99) * 1e3:.2f} / {quantile(during, 0.99) * 1e3:.2f} ms"
        )
    print()
    print(f"failed requests: {failed}")
    print(
        f"latency while swapping / steady: p50 {statistics.median(p50s):.2f}x, "
        f"p99 {statistics.median(p99s):.2f}x (median of {rounds} rounds)"
    )
    print(
        f"load_model (build, warm up, health check, swap): median "
        f"{statistics.median(swap_all) * 1e3:.0f} ms over {len(swap_all)} swaps"
    )
    for interval in (0.1, 1.0) if not args.quick else (0.1,):
        times = [anyio.run(repository_round, interval) for _ in range(rounds)]
        print(
            f"repository watch every {interval:g} s: a renamed-in version serves after a "
            f"median {statistics.median(times):.2f} s (it settles for one interval first)"
        )


if __name__ == "__main__":
    main()
