"""``python -m mds demo``: a real model served through the whole lifecycle.

It trains a small torch classifier on a synthetic spiral data set, saves its
weights to a file, and serves it: init loads the file, warm-up runs examples,
then concurrent callers send requests through ``mds.serve``, some of them
malformed, and the runtime drains with requests still in flight.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import anyio
import anyio.lowlevel
import numpy as np

from ._config import BatchingConfig, ModelConfig
from ._current import serve
from ._deps import require
from ._errors import MdsError
from ._handler import ModelContext, ModelHandler
from ._runtime import Runtime

__all__ = ["run_demo"]

CLASSES = ("red", "green", "blue")


def spiral(points_per_class: int, seed: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Three interleaved spiral arms in 2-D: a small, not linearly separable task."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label in range(len(CLASSES)):
        radius = np.linspace(0.05, 1.0, points_per_class)
        angle = label * 2.1 + radius * 4.0 + rng.normal(0.0, 0.15, points_per_class)
        xs.append(np.stack([radius * np.sin(angle), radius * np.cos(angle)], axis=1))
        ys.append(np.full(points_per_class, label))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def build_net() -> Any:
    torch = require("torch", feature="the demo")
    return torch.nn.Sequential(
        torch.nn.Linear(2, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, len(CLASSES)),
    )


def train(path: Path, out: TextIO) -> float:
    """Train the classifier, save its weights to ``path``; its training accuracy."""
    torch = require("torch", feature="the demo")
    torch.manual_seed(0)
    x, y = spiral(300, seed=0)
    features, labels = torch.from_numpy(x), torch.from_numpy(y)
    net = build_net()
    optimiser = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(400):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(features), labels)
        loss.backward()
        optimiser.step()
    accuracy = float((net(features).argmax(1) == labels).float().mean())
    torch.save(net.state_dict(), path)
    print(f"trained a 2-64-64-3 MLP on {len(x)} spiral points: accuracy {accuracy:.1%}", file=out)
    return accuracy


class SpiralClassifier(ModelHandler[dict[str, Any], dict[str, Any]]):
    """Classifies a 2-D point: ``{"x": [a, b]}`` → ``{"label", "confidence"}``."""

    def init(self, context: ModelContext) -> None:
        torch = require("torch", feature="the demo")
        torch.set_num_threads(1)  # one thread per instance: they run side by side
        self.torch = torch
        self.device = context.device.name
        self.net = build_net()
        self.net.load_state_dict(torch.load(context.parameters["weights"], weights_only=True))
        self.net.to(self.device).eval()

    def warmup(self) -> list[dict[str, Any]]:
        return [{"x": [0.0, 0.5]}, {"x": [-0.3, 0.1]}]

    async def preprocess(self, request: dict[str, Any]) -> Any:
        # Cheap and non-blocking: async def runs it on the loop, no thread hop.
        point = request.get("x") if isinstance(request, dict) else None
        if not isinstance(point, list) or len(point) != 2:
            raise ValueError(f"'x' must be a list of 2 numbers, got {point!r}")
        if not all(isinstance(v, (int, float)) for v in point):
            raise ValueError(f"'x' must hold numbers, got {point!r}")
        return self.torch.tensor(point, dtype=self.torch.float32)

    def infer(self, batch: Sequence[Any]) -> Any:
        with self.torch.inference_mode():
            logits = self.net(self.torch.stack(list(batch)).to(self.device))
            return self.torch.softmax(logits, dim=1).cpu()

    async def postprocess(self, output: Any) -> dict[str, Any]:
        index = int(output.argmax())
        return {"label": CLASSES[index], "confidence": round(float(output[index]), 4)}


class _Printer(logging.Handler):
    """Prints mds's lifecycle log lines as they happen."""

    def __init__(self, out: TextIO, began: float) -> None:
        super().__init__(logging.INFO)
        self.out, self.began = out, began

    def emit(self, record: logging.LogRecord) -> None:
        elapsed = time.perf_counter() - self.began
        print(f"  [{elapsed:6.2f} s] {record.getMessage()}", file=self.out)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


async def _load_test(
    requests: list[dict[str, Any]], concurrency: int
) -> tuple[list[Any], list[float], float]:
    """Send ``requests`` from ``concurrency`` callers; answers, latencies, seconds."""
    answers: list[Any] = [None] * len(requests)
    latencies: list[float] = []
    next_index = 0

    async def caller() -> None:
        nonlocal next_index
        while next_index < len(requests):
            index, next_index = next_index, next_index + 1
            began = time.perf_counter()
            try:
                answers[index] = await serve("spiral", requests[index])
            except MdsError as exc:
                answers[index] = exc
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    async with anyio.create_task_group() as tasks:
        for _ in range(concurrency):
            tasks.start_soon(caller)
    return answers, latencies, time.perf_counter() - began


async def _demo(requests: int, concurrency: int, out: TextIO) -> None:
    began = time.perf_counter()
    printer = _Printer(out, began)
    mds_logger = logging.getLogger("mds")
    mds_logger.addHandler(printer)
    saved_level = mds_logger.level
    mds_logger.setLevel(logging.INFO)
    try:
        with tempfile.TemporaryDirectory() as folder:
            weights = Path(folder) / "spiral.pt"
            print("== 1. a real model", file=out)
            train(weights, out)
            await _serve(weights, requests, concurrency, out)
    finally:
        mds_logger.removeHandler(printer)
        mds_logger.setLevel(saved_level)


async def _serve(weights: Path, requests: int, concurrency: int, out: TextIO) -> None:
    runtime = Runtime()
    config = ModelConfig(
        instances=2,
        batching=BatchingConfig(max_batch_size=32, max_queue_size=4096),
        timeout=30.0,
        parameters={"weights": str(weights)},
    )
    model = runtime.add_model("spiral", SpiralClassifier, config)
    health = await runtime.health()
    print(
        f"\n== 2. before start: ready={health.ready} ({health.models['spiral'].reason})", file=out
    )
    print("\n== 3. start: init (loads the weights file) and warm-up, per instance", file=out)
    in_flight: list[Any] = []

    async def late_caller(payload: dict[str, Any]) -> None:
        try:
            in_flight.append(await serve("spiral", payload))
        except MdsError as exc:
            in_flight.append(exc)

    async with anyio.create_task_group() as late_callers, runtime:
        health = await runtime.health()
        stats = model.statistics()
        print(
            f"   ready={health.ready}, live={health.live}; init took "
            f"{stats.init_seconds * 1e3:.1f} ms, warm-up {stats.warmup_seconds * 1e3:.1f} ms",
            file=out,
        )

        x, y = spiral(requests // 3 + 1, seed=1)
        payloads = [{"x": [float(a), float(b)]} for a, b in x[:requests]]
        print(f"\n== 4. {len(payloads)} requests from {concurrency} concurrent callers", file=out)
        answers, latencies, seconds = await _load_test(payloads, concurrency)
        correct = sum(
            isinstance(a, dict) and a["label"] == CLASSES[label]
            for a, label in zip(answers, y[:requests], strict=True)
        )
        stats = model.statistics()
        print(
            f"   throughput {len(payloads) / seconds:,.0f} requests/s; latency "
            f"p50 {_percentile(latencies, 50) * 1e3:.2f} ms, "
            f"p90 {_percentile(latencies, 90) * 1e3:.2f} ms, "
            f"p99 {_percentile(latencies, 99) * 1e3:.2f} ms",
            file=out,
        )
        print(
            f"   accuracy on unseen points {correct / len(payloads):.1%}; "
            f"mean batch size {stats.mean_batch_size:.1f} over {stats.batches} batches",
            file=out,
        )
        print(f"   e.g. {payloads[0]} -> {answers[0]}", file=out)

        print("\n== 5. bad requests fail alone, with a clear error", file=out)
        mixed: list[dict[str, Any]] = [
            {"x": [0.1, 0.2]},
            {"x": [1.0]},
            {"x": "up"},
            {"y": 3},
            {"x": [0.4, -0.2]},
        ]
        answers, _, _ = await _load_test(mixed, len(mixed))
        for payload, answer in zip(mixed, answers, strict=True):
            shown = (
                f"{type(answer).__name__}: {answer}" if isinstance(answer, Exception) else answer
            )
            print(f"   {payload} -> {shown}", file=out)

        print("\n== 6. stop with requests in flight: drain answers all of them", file=out)
        admitted = model.statistics().requests + 300
        for payload in payloads[:300]:
            late_callers.start_soon(late_caller, payload)
        # Let every caller get in (nothing signals an admission; poll the count).
        while model.statistics().requests < admitted:
            await anyio.lowlevel.checkpoint()
        queued = model.statistics().in_flight
        # Leaving the block stops the runtime while those requests are in flight.
    answered = sum(isinstance(a, dict) for a in in_flight)
    print(
        f"   {queued} requests were in flight at stop; {answered} answered with a result", file=out
    )
    stats = model.statistics()
    print(
        f"\n== 7. done: {stats.completed} completed, {stats.failed} failed "
        f"({', '.join(f'{k}: {v}' for k, v in stats.errors.items()) or 'none'}), "
        f"{stats.rejected} rejected; state {stats.state.value}",
        file=out,
    )


def run_demo(requests: int = 3000, concurrency: int = 64, out: TextIO = sys.stdout) -> None:
    """Run the demo, printing what happens to ``out``."""
    anyio.run(_demo, requests, concurrency, out)
