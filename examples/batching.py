"""Dynamic batching: padding by length bucket, cost in tokens, priorities, traces.

A small "sentence scorer" takes token-id sequences of different lengths. The
batcher pads each batch to its longest sequence (with a mask), keeps short and
long sequences in different buckets, limits a batch to 64 tokens, serves
interactive requests before background ones, and reports where time went.

Run it: python examples/batching.py
"""

from __future__ import annotations

import random
import time

import anyio
import numpy as np

import mds


class SentenceScorer(mds.ModelHandler[list[int], float]):
    """Scores a sentence: the masked mean of per-token weights (a stand-in model)."""

    # Pad to the longest in the batch; sequences of <=8, <=16 and longer
    # tokens never share a batch, so short ones are not padded to long ones.
    collator = mds.Pad(0, buckets=(8, 16))

    def init(self, context: mds.ModelContext) -> None:
        self.weights = np.random.default_rng(0).normal(size=1000)

    def warmup(self) -> list[list[int]]:
        return [[1, 2, 3], list(range(12)), list(range(30))]

    def cost(self, item: list[int]) -> int:
        return len(item)  # max_batch_size counts tokens, not requests

    def infer(self, batch: mds.Padded) -> np.ndarray:
        tokens, mask = np.asarray(batch.values), np.asarray(batch.mask)
        time.sleep(0.001 + 0.00002 * tokens.size)  # a real model's compute time
        return (self.weights[tokens] * mask).sum(axis=1) / mask.sum(axis=1)

    def split(self, outputs: np.ndarray, batch: mds.Padded) -> list[float]:
        return [round(float(score), 4) for score in outputs]


config = mds.ModelConfig(
    batching=mds.BatchingConfig(
        max_batch_size=64,  # tokens per batch
        max_queue_delay=0.002,  # while busy, wait up to 2 ms for a fuller batch
        priority_levels=2,  # 0: interactive, 1: background
        default_priority=1,
    ),
    timeout=10.0,  # no request waits longer: its caller gets DeadlineExceeded
)


async def main() -> None:
    rng = random.Random(0)
    sentences = [[rng.randrange(1000) for _ in range(rng.randint(2, 40))] for _ in range(400)]
    async with mds.ModelRuntime(SentenceScorer, config, name="scorer") as model:
        scores: dict[int, float] = {}

        async def background(i: int) -> None:
            scores[i] = await model.serve(sentences[i])  # default priority: 1

        async with anyio.create_task_group() as tasks:
            for i in range(len(sentences)):
                tasks.start_soon(background, i)
            await anyio.sleep(0.05)
            waiting = model.statistics().queued
            # An interactive request jumps the background queue.
            traced = await model.serve([5, 6, 7], priority=0, trace=True)
        print(f"scored {len(scores)} background sentences ({waiting} were waiting)")
        t = traced.trace
        print(
            f"interactive request: score {traced.value}, queue wait {t.queue_wait * 1e3:.2f} ms, "
            f"batch of {t.batch_size} ({t.batch_cost} tokens), padding {t.padding_ratio:.0%}"
        )

        try:
            await model.serve(list(range(100)))  # 100 tokens never fit a 64-token batch
        except mds.InvalidInput as exc:
            print("too long:", exc)

        stats = model.statistics()
        print(
            f"{stats.batches} batches, mean {stats.mean_batch_size:.1f} requests and "
            f"{stats.batched_cost / stats.batches:.1f} tokens each; "
            f"mean padding {stats.padding_ratio:.0%}; "
            f"queue wait p50 {stats.queue_wait_p50 * 1e3:.2f} ms, "
            f"p99 {stats.queue_wait_p99 * 1e3:.2f} ms"
        )


if __name__ == "__main__":
    anyio.run(main)
