"""The repository routes and version-addressed routes over real HTTP, with tritonclient."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mds
import mds.fastapi
import mds.flask
from tests.servers import Served, running
from tests.versions.test_repository import SPEC, deploy, write_version

# A handler for the protocol: one named tensor in, one out; its version in the output.
TENSORS = """
import json
from pathlib import Path

import numpy as np

import mds
import mds.fastapi
import mds.flask


class Scale(mds.ModelHandler):
    def __init__(self, path):
        self.path = Path(path)

    def init(self, context):
        self.scale = json.loads((self.path / "weights.json").read_text())["scale"]
        self.version = int(context.version)

    def signature(self):
        return (
            {"x": mds.TensorSpec(name="x", dtype="float32", shape=(None,))},
            {
                "y": mds.TensorSpec(name="y", dtype="float32", shape=(None,)),
                "v": mds.TensorSpec(name="v", dtype="int64", shape=(1,)),
            },
        )

    def from_tensors(self, tensors):
        return tensors["x"]

    def to_tensors(self, response):
        return {"y": response, "v": np.array([self.version])}

    def infer(self, batch):
        return [np.asarray(x, np.float32) * self.scale for x in batch]
"""

TOKEN = "secret"


@pytest.fixture(params=["fastapi", "flask"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Served, Path]]:
    kind = request.param
    pytest.importorskip(kind)
    if kind == "fastapi":
        pytest.importorskip("uvicorn")
    root = tmp_path / "models"
    model = root / "scale"
    write_version(model / "1", 1.0, handler=TENSORS)
    (model / "mds.yaml").write_text(SPEC + "version_policy: {all: true}\n")
    other = root / "other"
    write_version(other / "1", 5.0, handler=TENSORS)
    (other / "mds.yaml").write_text(SPEC)
    runtime = mds.Runtime()
    repository = mds.ModelRepository(root)
    repository.add_to(runtime)
    if kind == "fastapi":
        from fastapi import Depends, FastAPI, Header, HTTPException

        def admin(authorization: str = Header("")) -> None:
            if authorization != f"Bearer {TOKEN}":
                raise HTTPException(401, "admins only")

        app: Any = FastAPI()
        mds.fastapi.add_routes(
            app,
            runtime,
            load="wait",
            repository=repository,
            repository_dependencies=[Depends(admin)],
        )
    else:
        import functools

        from flask import Flask
        from flask import request as flask_request

        def admin_only(view: Any) -> Any:
            @functools.wraps(view)
            def guarded(**kwargs: Any) -> Any:
                if flask_request.headers.get("authorization") != f"Bearer {TOKEN}":
                    return {"error": "admins only"}, 401
                return view(**kwargs)

            return guarded

        app = Flask(__name__)
        mds.flask.add_routes(
            app, runtime, load="wait", repository=repository, repository_decorator=admin_only
        )
    with running(kind, app, runtime) as served:
        yield served, root


def test_tritonclient_drives_the_repository(server: tuple[Served, Path]) -> None:
    http = pytest.importorskip("tritonclient.http")
    served, root = server
    headers = {"Authorization": f"Bearer {TOKEN}"}
    client = http.InferenceServerClient(served.url.removeprefix("http://"))

    def infer(name: str, version: str = "") -> tuple[float, int, str]:
        x = http.InferInput("x", [3], "FP32")
        x.set_data_from_numpy(np.array([1, 2, 3], np.float32))
        result = client.infer(name, [x], model_version=version)
        answer = result.get_response()
        return float(result.as_numpy("y")[0]), int(result.as_numpy("v")[0]), answer["model_version"]

    assert client.get_model_repository_index(headers=headers) == [
        {"name": "other", "version": "1", "state": "READY"},
        {"name": "scale", "version": "1", "state": "READY"},
    ]
    assert infer("scale") == (1.0, 1, "1")
    deploy(root / "scale", 2, 2.0, handler=TENSORS)
    client.load_model("scale", headers=headers)
    assert infer("scale") == (2.0, 2, "2")  # the new version takes the traffic
    assert infer("scale", "1") == (1.0, 1, "1")  # the old one, by version (policy: all)
    assert client.is_model_ready("scale", "2") and client.is_model_ready("scale", "1")
    assert client.get_model_metadata("scale", "2")["versions"] == ["1", "2"]
    client.unload_model("other", headers=headers)
    index = client.get_model_repository_index(headers=headers)
    assert {"name": "other", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"} in index
    assert not client.is_model_ready("other")
    with pytest.raises(Exception, match="no model named 'other'"):
        infer("other")
    # A config given with the load replaces mds.yaml: only version 1 now.
    config = json.dumps({"handler": "handler.py", "version_policy": {"specific": [1]}})
    client.load_model("scale", config=config, headers=headers)
    assert infer("scale") == (1.0, 1, "1")
    client.load_model("other", headers=headers)
    assert infer("other") == (5.0, 1, "1")
    assert "model_repository" in client.get_server_metadata()["extensions"]


def test_repository_routes_refuse_without_auth_and_bad_requests(
    server: tuple[Served, Path],
) -> None:
    served, root = server
    client = served.client
    assert client.post("/v2/repository/index").status_code == 401
    assert client.post("/v2/repository/models/scale/unload").status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    missing = client.post("/v2/repository/models/nothing/load", headers=auth)
    assert missing.status_code == 404
    assert "no model 'nothing' in the repository" in missing.json()["error"]
    bad = client.post("/v2/repository/models/scale/load", headers=auth, content=b"{not json")
    assert bad.status_code == 400 and "not valid" in bad.json()["error"]
    files = client.post(
        "/v2/repository/models/scale/load",
        headers=auth,
        json={"parameters": {"file:1/model.onnx": "AAAA"}},
    )
    assert files.status_code == 400 and "does not take model files" in files.json()["error"]
    config = client.post(
        "/v2/repository/models/scale/load",
        headers=auth,
        json={"parameters": {"config": '{"instances": 2}'}},
    )
    assert config.status_code == 400 and "the config given to load" in config.json()["error"]
    # A version that fails to load: a 500 that says why; the old version serves on.
    deploy(root / "scale", 2, -1.0, handler=TENSORS.replace("self.scale = json", "1/0; json"))
    failed = client.post("/v2/repository/models/scale/load", headers=auth)
    assert failed.status_code == 500
    assert "version '2' failed to load" in failed.json()["error"]
    assert "ZeroDivisionError" in failed.json()["error"]
    reply = client.post("/models/scale/infer", json=[1.0, 2.0])
    assert reply.status_code == 200 and reply.headers["Mds-Model-Version"] == "1"
    pinned = client.post("/models/scale/versions/1/infer", json=[1.0])
    assert pinned.json() == [1.0]
    unknown = client.post("/models/scale/versions/9/infer", json=[1.0])
    assert unknown.status_code == 404
