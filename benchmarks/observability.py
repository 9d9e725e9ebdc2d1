"""What metrics and traces cost per request, measured side by side in one run.

    python benchmarks/observability.py            (about two minutes; --quick for a smoke run)

Each variant runs in a fresh process (an OpenTelemetry SDK, once set, stays
for the process), in interleaved rounds; medians are quoted and compared
as ratios against ``counting off`` (the machines are shared and noisy):

- ``counting off``: mds with its histograms' observations made no-ops, the
  request path as it was before metrics (the clock reads remain);
- ``metrics``: mds as shipped (histograms counted on every request);
- ``metrics + scrapes``: the same, with a Prometheus scrape of the runtime
  every 100 ms from another thread (a real server scrapes every 15-60 s);
- ``tracing, no SDK``: ``opentelemetry-api`` installed, no SDK configured;
- ``tracing, 1% sampled``: an SDK tracer provider sampling 1% of the traces
  (``ParentBased(TraceIdRatioBased(0.01))``), as production tracing runs;
- ``tracing, every span``: the same recording every span, handed to a
  ``BatchSpanProcessor`` whose exporter drops them: the cost of making spans.

Two workloads: a trivial model at 256 concurrent callers (requests/s: the
per-request overhead, all of it mds's), and one caller at a time (p50
latency). Target: ``metrics`` within noise of ``counting off`` (ratio >= 0.97
on throughput).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import anyio

import mds

VARIANTS = (
    "counting off",
    "metrics",
    "metrics + scrapes",
    "tracing, no SDK",
    "tracing, 1% sampled",
    "tracing, every span",
)


class Trivial(mds.ModelHandler[int, int]):
    def infer(self, batch: Sequence[int]) -> list[int]:
        return list(batch)


def prepare(variant: str) -> None:
    if variant == "counting off":
        from mds._batching import stats

        stats.Buckets.observe = lambda self, value: None  # type: ignore[method-assign]
    if variant in ("tracing, 1% sampled", "tracing, every span"):
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        class Nowhere(SpanExporter):
            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        sampler = ParentBased(TraceIdRatioBased(0.01 if "sampled" in variant else 1.0))
        provider = TracerProvider(sampler=sampler)
        provider.add_span_processor(BatchSpanProcessor(Nowhere()))
        trace.set_tracer_provider(provider)
    elif variant.startswith("tracing"):
        import opentelemetry.trace  # noqa: F401  (installed, nothing configured)


async def measure(variant: str, requests: int, single: int) -> dict[str, float]:
    runtime = mds.Runtime()
    runtime.add_model(
        "trivial",
        Trivial,
        mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=64, max_queue_size=4096)),
    )
    stop = threading.Event()
    scraper = None
    async with runtime:
        if variant == "metrics + scrapes":
            import prometheus_client

            from mds.prometheus import Collector

            registry = prometheus_client.CollectorRegistry()
            registry.register(Collector(runtime))

            def scrape() -> None:
                while not stop.wait(0.1):
                    prometheus_client.generate_latest(registry)

            scraper = threading.Thread(target=scrape, daemon=True)
            scraper.start()
        callers = 256
        per_caller = requests // callers

        async def caller() -> None:
            for x in range(per_caller):
                await mds.serve("trivial", x)

        for _ in range(2):  # warm up
            await mds.serve("trivial", 0)
        began = time.perf_counter()
        async with anyio.create_task_group() as tasks:
            for _ in range(callers):
                tasks.start_soon(caller)
        rate = callers * per_caller / (time.perf_counter() - began)
        latencies = []
        for x in range(single):
            began = time.perf_counter()
            await mds.serve("trivial", x)
            latencies.append(time.perf_counter() - began)
    stop.set()
    if scraper is not None:
        scraper.join()
    return {"rate": rate, "p50": statistics.median(latencies)}


def one(variant: str, requests: int, single: int) -> None:
    prepare(variant)
    print(json.dumps(anyio.run(measure, variant, requests, single)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small and short")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=0)
    parser.add_argument("--single", type=int, default=0)
    args = parser.parse_args()
    requests = args.requests or (5_120 if args.quick else 51_200)
    single = args.single or (200 if args.quick else 2_000)
    if args.one:
        one(args.one, requests, single)
        return
    rounds = 2 if args.quick else 7
    results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for round in range(rounds):
        order = VARIANTS if round % 2 == 0 else tuple(reversed(VARIANTS))
        for variant in order:
            done = subprocess.run(
                [sys.executable, __file__, "--one", variant, "--requests", str(requests),
                 "--single", str(single)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            results[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"round {round + 1}/{rounds} done", file=sys.stderr)
    base_rate = statistics.median(r["rate"] for r in results["counting off"])
    base_p50 = statistics.median(r["p50"] for r in results["counting off"])
    print(f"trivial model, 256 callers x {requests // 256} requests; 1 caller x {single}")
    print(f"medians of {rounds} interleaved rounds, each variant in its own process\n")
    print(f"{'variant':<20} {'req/s':>9} {'ratio':>7} {'p50 (us)':>9} {'ratio':>7}")
    for variant in VARIANTS:
        rate = statistics.median(r["rate"] for r in results[variant])
        p50 = statistics.median(r["p50"] for r in results[variant])
        print(
            f"{variant:<20} {rate:9.0f} {rate / base_rate:7.3f} {p50 * 1e6:9.1f} "
            f"{p50 / base_p50:7.3f}"
        )


if __name__ == "__main__":
    main()
