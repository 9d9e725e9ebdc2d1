"""A model repository on disk: served, checked, and followed while it changes."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import mds
from mds.__main__ import main

from ..waiting import eventually

# A Python handler that lives in each version folder, with its "weights" beside it.
HANDLER = textwrap.dedent(
    """
    import json
    from pathlib import Path

    import mds


    class Scale(mds.ModelHandler):
        def __init__(self, path):
            self.path = Path(path)
            self.version = "?"

        def init(self, context):
            self.scale = json.loads((self.path / "weights.json").read_text())["scale"]
            if self.scale < 0:
                raise RuntimeError("negative scale: corrupt weights")
            self.version = context.version

        def infer(self, batch):
            return [[self.version, x * self.scale] for x in batch]
    """
)

SPEC = "handler: handler.py\nconfig:\n  batching: {max_batch_size: 8, max_queue_delay: 0.001}\n"


def write_version(folder: Path, scale: float, handler: str = HANDLER) -> None:
    folder.mkdir(parents=True)
    (folder / "handler.py").write_text(handler)
    (folder / "weights.json").write_text(json.dumps({"scale": scale}))


def deploy(model: Path, version: int, scale: float, handler: str = HANDLER) -> None:
    """As a deploy does: copy into a hidden folder, then rename it into place."""
    staging = model / f".{version}.incoming"
    write_version(staging, scale, handler)
    os.rename(staging, model / str(version))


def undeploy(model: Path, version: int) -> None:
    gone = model / f".{version}.gone"
    os.rename(model / str(version), gone)
    shutil.rmtree(gone)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    model = tmp_path / "models" / "scale"
    model.mkdir(parents=True)
    (model / "mds.yaml").write_text(SPEC)
    write_version(model / "1", 1.0)
    write_version(model / "2", 2.0)
    return tmp_path / "models"


def test_a_repository_serves_the_versions_its_policy_keeps(repository: Path) -> None:
    runtime = mds.Runtime()
    models = mds.ModelRepository(repository)
    assert models.check() == {"scale": ["2"]}
    models.add_to(runtime)
    with runtime:
        assert runtime.serve_sync("scale", 3) == ["2", 6.0]
        assert runtime.versions("scale").versions == ("2",)
        assert models.index() == [{"name": "scale", "version": "2", "state": "READY"}]


def test_a_policy_in_the_config_keeps_several(repository: Path) -> None:
    (repository / "scale" / "mds.yaml").write_text(SPEC + "version_policy: {latest: 2}\n")
    runtime = mds.Runtime()
    mds.ModelRepository(repository).add_to(runtime)
    with runtime:
        assert runtime.serve_sync("scale", 3) == ["2", 6.0]
        assert runtime.servable("scale", "1").serve_sync(3) == ["1", 3.0]


async def test_watch_applies_deploys_and_removals_while_serving(repository: Path) -> None:
    runtime = mds.Runtime()
    models = mds.ModelRepository(repository)
    await anyio.to_thread.run_sync(lambda: models.add_to(runtime, watch=0.05))
    answers: Counter[str] = Counter()
    failures: list[BaseException] = []
    stop = anyio.Event()

    async def caller() -> None:
        while not stop.is_set():
            try:
                version, value = await runtime.serve("scale", 1)
            except Exception as exc:
                failures.append(exc)
                return
            answers[version] += 1
            assert value == {"1": 1.0, "2": 2.0, "3": 3.0}[version]
            await anyio.sleep(0.001)

    async def serves(version: str) -> bool:
        return bool((await runtime.serve("scale", 1))[0] == version)

    async with runtime, anyio.create_task_group() as tasks:
        for _ in range(8):
            tasks.start_soon(caller)
        await anyio.to_thread.run_sync(deploy, repository / "scale", 3, 3.0)
        await eventually(lambda: serves("3"), "served by version 3")
        assert runtime.versions("scale").versions == ("3",)
        await anyio.to_thread.run_sync(undeploy, repository / "scale", 3)
        # The highest left, loaded again.
        await eventually(lambda: serves("2"), "served by version 2")
        stop.set()
    assert failures == []
    assert answers["3"] > 0 and answers["2"] > 0


async def test_a_bad_new_version_never_takes_the_good_one_down(
    repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = mds.Runtime()
    models = mds.ModelRepository(repository)
    await anyio.to_thread.run_sync(lambda: models.add_to(runtime, watch=0.05))

    def failed() -> list[dict[str, str]]:
        return [e for e in models.index() if e.get("version") == "3"]

    async def listed() -> bool:
        return bool(failed())

    async with runtime:
        await anyio.to_thread.run_sync(deploy, repository / "scale", 3, -1.0)  # init raises
        await eventually(listed, "listed version 3")
        [entry] = failed()
        assert entry["state"] == "UNAVAILABLE"
        assert "negative scale: corrupt weights" in entry["reason"]
        assert await runtime.serve("scale", 2) == ["2", 4.0]
        # Fixed in place: new files, so it is tried again.
        await anyio.to_thread.run_sync(undeploy, repository / "scale", 3)
        await anyio.to_thread.run_sync(deploy, repository / "scale", 3, 3.0)

        async def fixed() -> bool:
            return bool((await runtime.serve("scale", 1))[0] == "3")

        await eventually(fixed, "served by the fixed version 3")
    assert "version '3' failed to load" in caplog.text


async def test_a_broken_config_changes_nothing_and_is_reported(repository: Path) -> None:
    runtime = mds.Runtime()
    models = mds.ModelRepository(repository)
    await anyio.to_thread.run_sync(lambda: models.add_to(runtime))
    async with runtime:
        config = anyio.Path(repository / "scale" / "mds.yaml")
        await config.write_text(SPEC + "config: {instances: 0}\n")
        with pytest.raises(mds.ConfigError, match=r"mds\.yaml"):
            await models.load("scale")
        assert await runtime.serve("scale", 2) == ["2", 4.0]
        await config.write_text(SPEC)
        await models.load("scale")


async def test_a_ready_file_holds_a_version_back_until_it_is_there(repository: Path) -> None:
    config = repository / "scale" / "mds.yaml"
    await anyio.Path(config).write_text(SPEC + "ready_file: READY\n")
    await anyio.to_thread.run_sync(lambda: (repository / "scale" / "2" / "READY").touch())
    runtime = mds.Runtime()
    models = mds.ModelRepository(repository)
    await anyio.to_thread.run_sync(lambda: models.add_to(runtime))
    async with runtime:
        await anyio.to_thread.run_sync(write_version, repository / "scale" / "3", 3.0)
        await models.refresh()
        assert await runtime.serve("scale", 1) == ["2", 2.0]  # 3 is not complete yet
        await anyio.to_thread.run_sync(lambda: (repository / "scale" / "3" / "READY").touch())
        await models.refresh()
        assert await runtime.serve("scale", 1) == ["3", 3.0]


async def test_unload_and_load_through_the_repository(repository: Path) -> None:
    runtime = mds.Runtime()
    models = mds.ModelRepository(repository)
    await anyio.to_thread.run_sync(lambda: models.add_to(runtime, watch=0.05))
    async with runtime:
        await models.unload("scale")
        await anyio.sleep(0.2)  # the watch leaves an unloaded model alone
        with pytest.raises(mds.ModelNotFound):
            await runtime.serve("scale", 1)
        assert models.index() == [
            {"name": "scale", "version": "2", "state": "UNAVAILABLE", "reason": "unloaded"}
        ]
        override = json.dumps(
            {"handler": "handler.py", "version_policy": {"specific": [1]}, "config": {}}
        )
        await models.load("scale", config=override)
        assert await runtime.serve("scale", 1) == ["1", 1.0]
        with pytest.raises(mds.ModelNotFound, match="no model 'nothing' in the repository"):
            await models.load("nothing")
        with pytest.raises(mds.InvalidInput, match="the config given to load"):
            await models.load("scale", config='{"instances": 2}')


def test_check_lists_every_problem_with_its_file(tmp_path: Path, capsys: Any) -> None:
    root = tmp_path / "models"
    bad_field = root / "bad_field"
    bad_field.mkdir(parents=True)
    (bad_field / "mds.yaml").write_text("config: {instances: 0}\n")
    no_file = root / "no_file"
    (no_file / "1").mkdir(parents=True)
    (no_file / "mds.yaml").write_text("config: {}\n")
    broken = root / "broken"
    write_version(broken / "1", 1.0, handler="import not_a_module_anywhere\n")
    (broken / "mds.yaml").write_text(SPEC)
    typo = root / "typo"
    typo.mkdir()
    (typo / "mds.yaml").write_text("handlr: x.py\n")
    with pytest.raises(mds.ConfigError) as caught:
        mds.ModelRepository(root).check()
    message = str(caught.value)
    assert "4 problems" in message
    assert f"{bad_field / 'mds.yaml'}: Expected `int` >= 1 - at `$.config.instances`" in message
    assert f"{no_file / '1'}: a version folder needs one model file" in message
    assert f"{broken / '1' / 'handler.py'}: importing it failed: ModuleNotFoundError" in message
    assert "Object contains unknown field `handlr`" in message
    assert main(["repository", "check", str(root)]) == 1
    out = capsys.readouterr()
    assert "bad_field: 1 problem\n" in out.out and "4 problems in" in out.err


def test_check_passes_a_good_repository(repository: Path, capsys: Any) -> None:
    assert main(["repository", "check", str(repository)]) == 0
    assert "scale: loads version 2 (policy: latest 1)" in capsys.readouterr().out


async def test_onnx_versions_are_served_with_no_code(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import numpy as np

    from tests.two_inputs import onnx_bytes, reference

    model = tmp_path / "models" / "linear"
    data = await anyio.to_thread.run_sync(onnx_bytes)

    def build() -> None:
        (model / "1").mkdir(parents=True)
        (model / "1" / "model.onnx").write_bytes(data)
        (model / "mds.yaml").write_text("config: {batching: {max_batch_size: 4}}\n")

    await anyio.to_thread.run_sync(build)
    runtime = mds.Runtime()
    await anyio.to_thread.run_sync(mds.ModelRepository(tmp_path / "models").add_to, runtime)
    async with runtime:
        x = np.ones(4, np.float32)
        ids = np.array(3, np.int64)
        answer = await runtime.serve("linear", {"x": x, "ids": ids})
        scores, best = reference(x[None], ids[None])
        assert np.allclose(answer["scores"], scores[0]) and answer["best"] == best[0]
        assert runtime.servable("linear").platform == "onnxruntime_onnx"


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")
async def test_torchscript_versions_are_served_with_no_code(tmp_path: Path) -> None:
    torch = await anyio.to_thread.run_sync(pytest.importorskip, "torch")
    model = tmp_path / "models" / "double"

    def build() -> None:
        (model / "1").mkdir(parents=True)
        scripted = torch.jit.script(torch.nn.Linear(2, 1, bias=False).eval())
        with torch.no_grad():
            scripted.weight.fill_(2.0)
        scripted.save(str(model / "1" / "model.pt"))
        (model / "mds.yaml").write_text("config: {batching: {max_batch_size: 4}}\n")

    await anyio.to_thread.run_sync(build)
    runtime = mds.Runtime()
    await anyio.to_thread.run_sync(mds.ModelRepository(tmp_path / "models").add_to, runtime)
    async with runtime:
        request = await anyio.to_thread.run_sync(torch.tensor, [1.0, 2.0])
        answer = await runtime.serve("double", request)
        assert answer.tolist() == [6.0]


async def test_the_watch_leaves_a_model_the_runtime_unloaded(repository: Path) -> None:
    runtime = mds.Runtime()
    models = mds.ModelRepository(repository)
    await anyio.to_thread.run_sync(lambda: models.add_to(runtime, watch=0.05))
    async with runtime:
        await runtime.unload_model("scale")
        await anyio.sleep(0.3)  # several polls
        with pytest.raises(mds.ModelNotFound):
            await runtime.serve("scale", 1)
        await models.load("scale")  # asked for: loaded again
        assert await runtime.serve("scale", 1) == ["2", 2.0]


def test_a_policy_that_keeps_nothing_is_a_problem(repository: Path) -> None:
    (repository / "scale" / "mds.yaml").write_text(SPEC + "version_policy: {specific: [7]}\n")
    (repository / "scale" / "02").mkdir()
    with pytest.raises(mds.ConfigError) as caught:
        mds.ModelRepository(repository).check()
    assert "keeps none of the complete version folders (there are: 1, 2)" in str(caught.value)
    assert "version 2 is also 02; keep one folder per version" in str(caught.value)


def test_an_on_demand_model_is_listed_ready_before_it_loads(repository: Path) -> None:
    (repository / "scale" / "mds.yaml").write_text(SPEC + "on_demand: true\n")
    runtime = mds.Runtime()
    models = mds.ModelRepository(repository)
    models.add_to(runtime)
    with runtime:
        assert models.index() == [
            {
                "name": "scale",
                "version": "2",
                "state": "READY",
                "reason": "loads on its first request",
            }
        ]
        assert runtime.serve_sync("scale", 1) == ["2", 2.0]
        assert models.index() == [{"name": "scale", "version": "2", "state": "READY"}]


async def test_a_config_file_rewritten_in_place_never_unloads_the_model(repository: Path) -> None:
    runtime = mds.Runtime()
    models = mds.ModelRepository(repository)
    await anyio.to_thread.run_sync(lambda: models.add_to(runtime, watch=0.02))
    config = anyio.Path(repository / "scale" / "mds.yaml")
    async with runtime:
        for _ in range(5):
            await config.unlink()  # as an editor or a checkout rewrites it
            await anyio.sleep(0.1)
            assert await runtime.serve("scale", 1) == ["2", 2.0]
            await config.write_text(SPEC)
            await anyio.sleep(0.05)
        await config.unlink()
        await anyio.sleep(0.1)
        [entry] = models.index()
        assert "mds.yaml is missing" in entry["reason"]


async def test_a_bad_config_given_to_load_is_refused_and_not_kept(repository: Path) -> None:
    runtime = mds.Runtime()
    models = mds.ModelRepository(repository)
    await anyio.to_thread.run_sync(lambda: models.add_to(runtime, watch=0.05))
    async with runtime:
        with pytest.raises(mds.InvalidInput, match=r"config given to load: .*which is not there"):
            await models.load("scale", config='{"backend": "onnx"}')
        await anyio.to_thread.run_sync(deploy, repository / "scale", 3, 3.0)

        async def serves_3() -> bool:
            return bool((await runtime.serve("scale", 1))[0] == "3")

        # The watch goes on with the files' own config.
        await eventually(serves_3, "served by version 3")


async def test_exported_programs_are_served_with_no_code(tmp_path: Path) -> None:
    torch = await anyio.to_thread.run_sync(pytest.importorskip, "torch")
    model = tmp_path / "models" / "double"

    def build() -> None:
        (model / "1").mkdir(parents=True)
        layer = torch.nn.Linear(2, 1, bias=False).eval()
        with torch.no_grad():
            layer.weight.fill_(2.0)
        batch = torch.export.Dim("batch", min=1, max=64)
        program = torch.export.export(layer, (torch.zeros(2, 2),), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(model / "1" / "model.pt2"))
        (model / "mds.yaml").write_text("config: {batching: {max_batch_size: 4}}\n")

    await anyio.to_thread.run_sync(build)
    runtime = mds.Runtime()
    await anyio.to_thread.run_sync(mds.ModelRepository(tmp_path / "models").add_to, runtime)
    async with runtime:
        request = await anyio.to_thread.run_sync(torch.tensor, [1.0, 2.0])
        answer = await runtime.serve("double", request)
        assert answer.tolist() == [6.0]
