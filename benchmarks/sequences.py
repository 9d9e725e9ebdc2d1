"""Stateful models: N concurrent sequences through mds, side by side in one run.

    python benchmarks/sequences.py           (about a minute; --quick for a smoke run)

The model is a GRU cell (64 features in, 256 hidden, torch on one thread):
each step of a sequence is one frame, and the hidden state is the sequence's
state. N clients each send the steps of their own sequence, one after the
other, each waiting for the last step's answer (a streaming client). Rows,
in steps per second (medians of interleaved rounds):

1. mds, stateful: ``ModelConfig.sequences``; the state is kept by mds.
2. A hand-written per-sequence loop: each sequence run alone, step by step,
   no serving (what one writes without a batcher: a batch of one a step).
3. mds, stateless, same clients: the same GRU steps sent as stateless
   requests, each carrying its hidden state (here zeros), stacked as the
   stateful handler stacks its states; the same N clients each waiting for
   its answer: what the sequencer's order and bookkeeping cost.
4. mds, stateless, every step at once: the N x T steps all sent at once, no
   order to keep, so batches fill to the limit: what keeping order costs.
5. A hand-written lockstep loop: all N sequences advanced together, one
   batch of N a step, no serving: the ceiling for N streaming clients.

Issue 21 names no target. Ours: well above the per-sequence loop (2), met
(about 2.2x); at least 0.9x stateless at the same clients (3), not met
(about 0.8x): see benchmarks/README.md for where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

import mds

FEATURES, HIDDEN = 64, 256


def make_cell() -> torch.nn.GRUCell:
    torch.manual_seed(0)
    return torch.nn.GRUCell(FEATURES, HIDDEN).eval()


class Stateful(mds.ModelHandler[torch.Tensor, torch.Tensor]):
    def init(self, context: mds.ModelContext) -> None:
        torch.set_num_threads(1)
        self.cell = make_cell()

    def sequence_start(self, sequence_id: int | str) -> torch.Tensor:
        return torch.zeros(HIDDEN)

    @torch.inference_mode()
    def infer(self, steps: Sequence[mds.SequenceStep[torch.Tensor, torch.Tensor]]) -> Any:
        hidden = self.cell(
            torch.stack([step.input for step in steps]), torch.stack([step.state for step in steps])
        )
        states = list(hidden)  # split once: the steps' states are their outputs
        for step, state in zip(steps, states, strict=True):
            step.state = state
        return states


class Stateless(mds.ModelHandler[tuple[torch.Tensor, torch.Tensor], torch.Tensor]):
    """The same step, with the state carried in the request: (frame, hidden)."""

    def init(self, context: mds.ModelContext) -> None:
        torch.set_num_threads(1)
        self.cell = make_cell()

    @torch.inference_mode()
    def infer(self, batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        return self.cell(
            torch.stack([frame for frame, _ in batch]), torch.stack([state for _, state in batch])
        )


def config(stateful: bool, max_batch: int) -> mds.ModelConfig:
    return mds.ModelConfig(
        batching=mds.BatchingConfig(max_batch_size=max_batch, max_queue_size=1 << 16),
        sequences=mds.SequenceConfig(max_sequences=4096) if stateful else None,
    )


async def through_mds(
    stateful: bool, frames: torch.Tensor, max_batch: int, at_once: bool
) -> tuple[float, list[float], float]:
    """Steps per second, each step's latency, and the mean batch size."""
    handler = Stateful if stateful else Stateless
    n, steps = frames.shape[0], frames.shape[1]
    latencies: list[float] = []
    zeros = torch.zeros(HIDDEN)
    async with mds.ModelRuntime(handler, config(stateful, max_batch)) as model:

        async def client(index: int) -> None:
            for step in range(steps):
                began = time.perf_counter()
                if stateful:
                    await model.serve(
                        frames[index, step],
                        sequence_id=index + 1,
                        sequence_start=step == 0,
                        sequence_end=step == steps - 1,
                    )
                else:
                    await model.serve((frames[index, step], zeros))
                latencies.append(time.perf_counter() - began)

        began = time.perf_counter()
        if at_once:
            await model.serve_many([(frames[i, s], zeros) for i in range(n) for s in range(steps)])
        else:
            await asyncio.gather(*(client(i) for i in range(n)))
        seconds = time.perf_counter() - began
        stats = model.statistics()
    return n * steps / seconds, latencies, stats.mean_batch_size


@torch.inference_mode()
def per_sequence(frames: torch.Tensor) -> float:
    torch.set_num_threads(1)
    cell = make_cell()
    began = time.perf_counter()
    for sequence in frames:
        hidden = torch.zeros(1, HIDDEN)
        for frame in sequence:
            hidden = cell(frame[None], hidden)
    return frames.shape[0] * frames.shape[1] / (time.perf_counter() - began)


@torch.inference_mode()
def lockstep(frames: torch.Tensor) -> float:
    torch.set_num_threads(1)
    cell = make_cell()
    began = time.perf_counter()
    hidden = torch.zeros(frames.shape[0], HIDDEN)
    for step in range(frames.shape[1]):
        hidden = cell(frames[:, step], hidden)
    return frames.shape[0] * frames.shape[1] / (time.perf_counter() - began)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=64, help="N concurrent sequences")
    parser.add_argument("--steps", type=int, default=40, help="steps per sequence")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.sequences, args.steps, args.rounds = 8, 5, 1
    torch.set_num_threads(1)
    frames = torch.randn(args.sequences, args.steps, FEATURES)
    runs: dict[str, list[float]] = {
        k: [] for k in ("stateful", "loop", "stateless", "at_once", "lockstep")
    }
    tails: dict[str, list[float]] = {"stateful": [], "stateless": []}
    batches: dict[str, list[float]] = {"stateful": [], "stateless": [], "at_once": []}
    for _ in range(args.rounds):  # interleaved: each round measures every row
        for name, stateful, at_once in (
            ("stateful", True, False),
            ("stateless", False, False),
            ("at_once", False, True),
        ):
            rate, latencies, mean_batch = asyncio.run(
                through_mds(stateful, frames, args.max_batch, at_once)
            )
            runs[name].append(rate)
            batches[name].append(mean_batch)
            if latencies:
                tails[name].extend(latencies)
        runs["loop"].append(per_sequence(frames))
        runs["lockstep"].append(lockstep(frames))
    rate = {name: statistics.median(values) for name, values in runs.items()}
    print(
        f"GRU cell {FEATURES}->{HIDDEN}, one torch thread; {args.sequences} sequences x "
        f"{args.steps} steps, max batch {args.max_batch}; {args.rounds} rounds (medians)"
    )
    rows = (
        ("stateful", "1. mds, stateful (clients wait for each step)"),
        ("loop", "2. hand-written per-sequence loop (batch of 1)"),
        ("stateless", "3. mds, stateless, same clients"),
        ("at_once", "4. mds, stateless, every step at once"),
        ("lockstep", "5. hand-written lockstep loop (ceiling)"),
    )
    for name, label in rows:
        extra = ""
        if name in batches:
            extra += f"  mean batch {statistics.median(batches[name]):5.1f}"
        if tails.get(name):
            p50, p99 = quantile(tails[name], 0.5), quantile(tails[name], 0.99)
            extra += f"  p50 {p50 * 1e3:6.2f} ms  p99 {p99 * 1e3:6.2f} ms"
        print(f"   {label:50s} {rate[name]:9,.0f} steps/s{extra}")
    print("ratios:")
    print(f"   stateful / per-sequence loop          {rate['stateful'] / rate['loop']:5.2f}x")
    print(f"   stateful / stateless, same clients    {rate['stateful'] / rate['stateless']:5.2f}x")
    print(f"   stateful / stateless, all at once     {rate['stateful'] / rate['at_once']:5.2f}x")
    print(f"   stateful / lockstep ceiling           {rate['stateful'] / rate['lockstep']:5.2f}x")


if __name__ == "__main__":
    main()
