"""Models that evolve: deploy a new version into a repository while callers hammer it.

The runtime serves ``examples/model_repository`` (copied to a temporary
folder, holding only version 1 of the churn model at first) and watches it.
Thirty-two callers send requests the whole time. Version 2 is deployed the
way a deploy job writes it: copied into a hidden folder, then renamed into
place. The watch loads it beside version 1, warms it up, and swaps it in;
version 1 finishes what it was doing. Then a rollback sends the traffic
back to version 1 (the policy keeps the two newest loaded). Not one request
fails, and every answer says which version computed it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import anyio

import mds

HERE = Path(__file__).parent / "model_repository"


def deploy(source: Path, model: Path, version: str) -> None:
    """Copy a version beside the others, then rename it into place: never half-copied."""
    staging = model / f".{version}.incoming"
    shutil.copytree(source / version, staging)
    staging.rename(model / version)


async def main(root: Path) -> None:
    shutil.copytree(HERE, root, ignore=shutil.ignore_patterns("2", "__pycache__"))
    runtime = mds.Runtime()
    repository = mds.ModelRepository(root)
    repository.add_to(runtime, watch=0.2)
    answered: Counter[str] = Counter()
    failures: list[Exception] = []
    stop = anyio.Event()

    async def caller(seed: int) -> None:
        features = [seed % 3, 1.0, 0.5, -0.2]
        while not stop.is_set():
            try:
                answer = await runtime.serve("churn", features)
            except mds.MdsError as exc:
                failures.append(exc)
                continue
            answered[str(answer["version"])] += 1
            await anyio.sleep(0.001)

    async def serving(version: str) -> None:
        # As a client sees it: until an answer comes from that version.
        while (await runtime.serve("churn", [0, 0, 0, 0]))["version"] != version:  # noqa: ASYNC110
            await anyio.sleep(0.01)

    async with runtime, anyio.create_task_group() as tasks:
        print("serving versions:", runtime.versions("churn").versions)
        for seed in range(32):
            tasks.start_soon(caller, seed)
        await anyio.sleep(1.0)

        deployed = time.perf_counter()
        await anyio.to_thread.run_sync(deploy, HERE / "churn", root / "churn", "2")
        await serving("2")
        print(f"version 2 deployed; it serves after {time.perf_counter() - deployed:.2f} s")
        print("serving versions:", runtime.versions("churn").versions)
        await anyio.sleep(1.0)

        await runtime.rollback("churn")
        await serving("1")
        print("rolled back; traffic:", runtime.versions("churn").traffic)
        await anyio.sleep(0.5)
        stop.set()
        for entry in repository.index():
            print("index:", entry)

    print(f"answers by version: {dict(sorted(answered.items()))}")
    print(f"failed requests: {len(failures)}")


with tempfile.TemporaryDirectory() as folder:
    anyio.run(main, Path(folder) / "models")
