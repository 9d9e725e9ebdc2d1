"""The seed's three-node pipeline, loaded unchanged from YAML and served.

    python examples/pipeline_seed/run.py

pipeline.yaml is the seed's document as is: m1 (a featurizer) goes to m3
(a sentiment classifier) by its explicit ``next``; m2 (a normaliser) comes
next in the list but nothing leads to it, so loading warns and m2 is not
loaded. The handler modules m1/, m2/ and m3/ sit beside the file.
"""

from __future__ import annotations

import asyncio
import warnings
from pathlib import Path

import mds

HERE = Path(__file__).resolve().parent


async def main() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline = mds.Pipeline.load(HERE / "pipeline.yaml")
    for warning in caught:
        print("warning:", str(warning.message).split(": ", 1)[1])
    print(pipeline.to_text())

    runtime = mds.Runtime()
    runtime.add_pipeline(pipeline)
    async with runtime:
        print("models:", ", ".join(runtime.models))
        health = await runtime.health()
        print("ready:", health.pipelines["test_pipeline"].ready)

        for text in ["I love this, what a wonderful day", "awful food and rude staff"]:
            print(f"{text!r} -> {await mds.serve('test_pipeline', text)}")

        traced = await mds.serve("test_pipeline", "really good work", trace=True)
        print("path:", " -> ".join(traced.trace.path))
        for node in traced.trace.nodes:
            call = node.call
            assert call is not None
            print(
                f"  {node.node}: {node.seconds * 1e3:.2f} ms "
                f"(queue {call.queue_wait * 1e3:.2f} ms, batch of {call.batch_size})"
            )

        # The seed's file sets no batching (so batches of 1); each model node
        # has its own batcher, set here at run time (or under
        # model_load_meta.config in the file).
        for model in runtime.models.values():
            model.set_batching(mds.BatchingConfig(max_batch_size=32))
        texts = [f"good day number {i}" for i in range(200)]
        results = await asyncio.gather(*(mds.serve("test_pipeline", t) for t in texts))
        print(f"{len(results)} concurrent requests, all {results[0]['label']}")
        for model in runtime.models.values():
            stats = model.statistics()
            print(f"  {model.name}: {stats.batches} batches, mean size {stats.mean_batch_size:.1f}")

        try:
            await mds.serve("test_pipeline", "   ")
        except mds.InvalidInput as exc:
            print("a bad request fails alone:", exc)


if __name__ == "__main__":
    asyncio.run(main())
