"""mds on Ray Serve: a real local Ray, its HTTP proxy, tritonclient, DeploymentHandles."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

import mds
import mds.ray

from .models import broken, fronting, scoring

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

#: Each test's replicas take a quarter of a CPU: several apps live at once on Ray's two.
LIGHT = {"num_cpus": 0.25}


@pytest.fixture(scope="module")
def scoring_app(serve_port: int) -> Any:
    from ray import serve

    handle = serve.run(
        mds.ray.application(scoring, name="scoring", ray_actor_options=LIGHT),
        name="scoring",
        route_prefix="/",
    )
    yield handle
    serve.delete("scoring")


def test_routes_tritonclient_and_handles_reach_batches_formed_in_the_replica(
    serve_port: int, scoring_app: Any
) -> None:
    import tritonclient.http as triton

    url = f"http://127.0.0.1:{serve_port}"
    assert httpx.get(f"{url}/health/ready").json()["ready"] is True
    reply = httpx.post(f"{url}/models/scorer/infer", json={"x": [1, 2, 3, 4]})
    assert reply.status_code == 200 and reply.json()["score"] == 10.0
    bad = httpx.post(f"{url}/models/scorer/infer", json={"x": [1, 2]})
    assert bad.status_code == 400 and "x must be 4 numbers" in bad.json()["error"]

    # tritonclient's own concurrency (gevent: one client, not shared by threads).
    client = triton.InferenceServerClient(f"127.0.0.1:{serve_port}", concurrency=16)
    assert client.is_model_ready("scorer")
    pending = []
    for i in range(48):
        x = triton.InferInput("x", [4], "FP32")
        x.set_data_from_numpy(np.array([i, 1, 1, 1], dtype=np.float32))
        pending.append(client.async_infer("scorer", [x]))
    results = [p.get_result() for p in pending]
    assert [float(r.as_numpy("score")) for r in results] == [i + 3.0 for i in range(48)]
    client.close()
    responses = [scoring_app.serve.remote("scorer", {"x": [i, 0, 0, 0]}) for i in range(64)]
    answers = [response.result() for response in responses]
    assert [a["score"] for a in answers] == [float(i) for i in range(64)]
    # Batches really formed inside the replica (Ray's default cap of 5 would
    # have kept them at 5 or fewer).
    assert max(a["size"] for a in answers) > 5
    histogram = scoring_app.statistics.remote().result()["scorer"]["histograms"]["batch_size"]
    assert histogram["sum"] >= 48 + 64 + 1


def test_a_client_error_through_a_handle_is_the_mds_error(scoring_app: Any) -> None:
    with pytest.raises(mds.InvalidInput, match="x sums to a negative number"):
        scoring_app.serve.remote("scorer", {"x": [-5, 0, 0, 0]}).result()
    with pytest.raises(mds.ModelNotFound, match="no model named 'scorre'"):
        scoring_app.serve.remote("scorre", {"x": [1, 1, 1, 1]}).result()


def test_user_config_changes_the_replicas_batching(serve_port: int) -> None:
    from ray import serve

    app = mds.ray.application(
        scoring,
        name="small",
        user_config={"batching": {"scorer": {"max_batch_size": 2}}},
        ray_actor_options=LIGHT,
    )
    handle = serve.run(app, name="small", route_prefix="/small")
    try:
        answers = [handle.serve.remote("scorer", {"x": [i, 0, 0, 0]}) for i in range(20)]
        assert max(a.result()["size"] for a in answers) <= 2
        assert handle.statistics.remote().result()["scorer"]["max_batch_size"] == 2
    finally:
        serve.delete("small")


def test_a_replica_whose_model_fails_to_load_is_reported_unhealthy(serve_port: int) -> None:
    from ray import serve

    with pytest.raises(Exception) as info:
        serve.run(
            mds.ray.application(broken, name="broken", ray_actor_options=LIGHT),
            name="broken",
            route_prefix="/broken",
        )
    status = serve.status().applications["broken"]
    assert status.status in ("DEPLOY_FAILED", "UNHEALTHY")
    assert "the weights are not there" in status.deployments["broken"].message + str(info.value)
    serve.delete("broken")


def test_a_cap_on_ongoing_requests_that_would_cap_the_batches_is_refused() -> None:
    pytest.importorskip("ray.serve", reason="the Ray tests need ray (the ray extra)")
    with pytest.raises(mds.ConfigError, match="max_ongoing_requests=5 caps every batch") as info:
        mds.ray.application(scoring, max_ongoing_requests=5)
    assert "model scorer:1 needs 16 requests at once" in str(info.value)


def test_a_pipeline_node_can_be_a_deployment_of_its_own(serve_port: int) -> None:
    from ray import serve

    serve.run(
        mds.ray.application(scoring, name="scores", ray_actor_options=LIGHT),
        name="scores",
        route_prefix="/scores",
    )
    front = serve.run(
        mds.ray.application(fronting, name="front", ray_actor_options=LIGHT),
        name="front",
        route_prefix="/front",
    )
    try:
        answer = front.serve.remote("front", {"values": [1, 2, 3, 4]}).result()
        assert answer["score"] == 10.0
        url = f"http://127.0.0.1:{serve_port}/front/models/front/infer"
        replies = [httpx.post(url, json={"values": [i, 0, 0, 0]}) for i in range(5)]
        assert [r.json()["score"] for r in replies] == [0.0, 1.0, 2.0, 3.0, 4.0]
        bad = httpx.post(url, json={"values": [-9, 0, 0, 0]})  # refused by the other deployment
        assert bad.status_code == 400 and "x sums to a negative number" in bad.json()["error"]
    finally:
        serve.delete("front")
        serve.delete("scores")
