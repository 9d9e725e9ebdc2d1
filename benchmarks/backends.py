"""The backends under load against calling the model directly, side by side.

    python benchmarks/backends.py           (about a minute; --quick for a smoke run)

One model, an MLP 256 -> 1024 -> 1024 -> 16 on the CPU with torch (and
onnxruntime) on one thread, served at saturating load: 256 concurrent
callers send one row each, batched up to 32. "Direct" calls the module (or
the session) on batches of the same size, one after another, including the
numpy <-> tensor conversions a caller needs. Rounds are interleaved; each
round's ratio compares two runs a moment apart, and the median ratio is
quoted. Target: mds at least 90% of direct throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import time
import warnings
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

import mds

BATCH = 32
CALLERS = 256


def make_mlp(width: int = 1024) -> torch.nn.Module:
    """The benchmark MLP, 256 -> width -> width -> 16."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(256, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, 16),
    ).eval()


def onnx_bytes() -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            make_mlp(),
            (torch.zeros(2, 256),),
            buffer,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            dynamo=False,
        )
    return buffer.getvalue()


ROWS = np.random.default_rng(0).standard_normal((4096, 256)).astype(np.float32)


def direct_torch(seconds: float) -> float:
    module = make_mlp()
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        start = (done * BATCH) % (len(ROWS) - BATCH)
        rows = [ROWS[start + i] for i in range(BATCH)]  # requests arrive one by one
        with torch.inference_mode():
            out = module(torch.from_numpy(np.stack(rows))).numpy()
        _ = list(out)
        done += 1
    return done * BATCH / (time.perf_counter() - began)


def direct_onnx(model: bytes, seconds: float) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        start = (done * BATCH) % (len(ROWS) - BATCH)
        rows = [ROWS[start + i] for i in range(BATCH)]
        (out,) = session.run(["y"], {"x": np.stack(rows)})
        _ = list(out)
        done += 1
    return done * BATCH / (time.perf_counter() - began)


async def under_mds(handler: mds.ModelHandler[Any, Any], seconds: float) -> tuple[float, float]:
    config = mds.ModelConfig(
        cpu_threads=1,
        batching=mds.BatchingConfig(max_batch_size=BATCH, max_queue_delay=0.002),
    )
    async with mds.ModelRuntime(handler, config) as model:
        stop = time.perf_counter() + seconds
        served = 0

        async def caller(offset: int) -> None:
            nonlocal served
            index = offset
            while time.perf_counter() < stop:
                await model.serve(ROWS[index % len(ROWS)])
                served += 1
                index += CALLERS

        began = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(CALLERS)))
        elapsed = time.perf_counter() - began
        return served / elapsed, model.statistics().mean_batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    args = parser.parse_args()
    rounds, seconds = (2, 0.5) if args.quick else (9, 1.5)
    torch.set_num_threads(1)
    model = onnx_bytes()
    example = [ROWS[0]]
    direct = {"torch": lambda: direct_torch(seconds), "onnx": lambda: direct_onnx(model, seconds)}
    handlers = {
        "torch": lambda: mds.TorchHandler(make_mlp, examples=example),
        "onnx": lambda: mds.OnnxHandler(model, examples=example),
    }
    runs: dict[str, list[float]] = {}
    for _ in range(rounds):
        for backend in ("torch", "onnx"):
            plain = direct[backend]()
            rate, mean = asyncio.run(under_mds(handlers[backend](), seconds))
            # Each round's ratio compares two runs a moment apart: the
            # machine's drift over the whole run cancels out.
            for key, value in (("direct", plain), ("mds", rate), ("batch", mean)):
                runs.setdefault(f"{key} {backend}", []).append(value)
            runs.setdefault(f"ratio {backend}", []).append(rate / plain)
    med = {name: statistics.median(values) for name, values in runs.items()}
    print(
        f"MLP 256-1024-1024-16, CPU, 1 torch/onnxruntime thread, batches of {BATCH}, "
        f"{CALLERS} callers, {rounds} rounds of {seconds:g} s (medians; the ratio is "
        "the median of each round's ratio)"
    )
    for backend in ("torch", "onnx"):
        ratio = med[f"ratio {backend}"]
        verdict = "ok" if ratio >= 0.9 else "BELOW TARGET"
        print(
            f"  {backend:5}  direct {med[f'direct {backend}']:8,.0f} rows/s   "
            f"mds {med[f'mds {backend}']:8,.0f} rows/s (mean batch {med[f'batch {backend}']:.1f})"
            f"   ratio {ratio:.2f} (target >= 0.90: {verdict})"
        )


if __name__ == "__main__":
    main()
