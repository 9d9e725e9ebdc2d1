"""Feature extraction -> preprocessing -> model -> business logic, from YAML.

    python examples/pipeline_scoring.py

scoring/pipeline.yaml names its nodes in scoring/fraud_nodes.py (``module:name``;
the file's folder is on the import path while it loads).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import mds

PIPELINE = Path(__file__).resolve().parent / "scoring" / "pipeline.yaml"


async def main() -> None:
    pipeline = mds.Pipeline.load(PIPELINE)
    print(pipeline.to_text())
    runtime = mds.Runtime()
    runtime.add_pipeline(pipeline)
    async with runtime:
        transactions = [
            {"id": 1, "amount": 25.0, "hour": 14},
            {"id": 2, "amount": 1800.0, "hour": 3, "country": "FR", "first_time_merchant": True},
            {"id": 3, "amount": 400.0, "hour": 2, "transactions_last_hour": 6, "country": "US"},
        ]
        for transaction in transactions:
            print(await mds.serve("fraud", transaction))

        traced = await mds.serve("fraud", transactions[1], trace=True)
        for node in traced.trace.nodes:
            extra = f", batch of {node.call.batch_size}" if node.call else ""
            print(f"  {node.node:10} {node.kind:8} {node.seconds * 1e3:6.2f} ms{extra}")

        many = [{"id": i, "amount": 10.0 * i, "hour": i % 24} for i in range(500)]
        decisions = await asyncio.gather(*(mds.serve("fraud", t) for t in many))
        actions = {
            a: sum(d["action"] == a for d in decisions) for a in ("approve", "review", "block")
        }
        model = runtime.models["fraud.model"].statistics()
        print(f"{len(decisions)} transactions: {actions}; mean batch {model.mean_batch_size:.1f}")

        try:
            await mds.serve("fraud", {"id": 9, "amount": "lots"})
        except mds.InvalidInput as exc:
            print("bad input fails alone:", exc)


if __name__ == "__main__":
    asyncio.run(main())
