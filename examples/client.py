"""A client for the example apps: every kind of call mds's routes answer.

Run an app first (python examples/fastapi_app.py), then:

    python examples/client.py http://127.0.0.1:8000

Uses only the standard library and numpy.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any

import numpy as np


def call(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    """One request; returns (status, headers, body bytes)."""
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def post_json(url: str, payload: Any, **headers: str) -> Any:
    status, got, body = call(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json", **headers}
    )
    return status, got, body


def main(base: str) -> None:
    features = [0.5] * 16

    status, _, body = call(f"{base}/health/ready")
    print(f"ready: {status} {json.loads(body)['ready']}")

    status, _, body = call(f"{base}/v2/models/mlp")
    print(f"metadata: {json.loads(body)}")

    # mds's own JSON route: the request as the handler takes it.
    status, _, body = post_json(f"{base}/models/mlp/infer", features)
    print(f"mds route: {status} {json.loads(body)['label']}")

    # The Open Inference Protocol, JSON tensors: the same model, named tensors.
    request = {
        "inputs": [{"name": "features", "shape": [16], "datatype": "FP32", "data": features}],
        "outputs": [{"name": "probabilities"}],
    }
    status, _, body = post_json(f"{base}/v2/models/mlp/infer", request)
    (output,) = json.loads(body)["outputs"]
    print(f"v2 json: {status} {output['name']} {np.round(output['data'], 4).tolist()}")

    # The two most likely classes, by label (the classification extension).
    request["outputs"] = [{"name": "probabilities", "parameters": {"classification": 2}}]
    status, _, body = post_json(f"{base}/v2/models/mlp/infer", request)
    print(f"v2 top classes: {status} {json.loads(body)['outputs'][0]['data']}")

    # A batch of rows, as Triton's clients send by default: each row goes
    # through the batcher, and the outputs come back with the batch axis.
    rows = {
        "inputs": [{"name": "features", "shape": [2, 16], "datatype": "FP32", "data": features * 2}]
    }
    status, _, body = post_json(f"{base}/v2/models/mlp/infer", rows)
    shapes = {o["name"]: o["shape"] for o in json.loads(body)["outputs"]}
    print(f"v2 rows: {status} {shapes}")

    # The same with binary tensors both ways: raw float32 after the JSON header.
    raw = np.asarray(features, dtype="<f4").tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "shape": [16],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    status, headers, body = call(
        f"{base}/v2/models/mlp/infer",
        head + raw,
        {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(head)),
        },
    )
    size = int(headers["Inference-Header-Content-Length"])
    (output,) = json.loads(body[:size])["outputs"]
    values = np.frombuffer(body[size:], dtype="<f4").astype(np.float64)
    print(f"v2 binary: {status} {output['name']} {np.round(values, 4).tolist()}")

    # A streaming model answers with server-sent events, one per chunk.
    status, _, body = post_json(f"{base}/models/mlp-ranked/infer", features)
    events = [
        json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")
    ]
    print(f"stream: {status} {[e['label'] for e in events]}")

    # Errors say what was wrong, with a status from one table.
    status, _, body = post_json(f"{base}/models/mlp/infer", [1.0, 2.0])
    print(f"bad input: {status} {json.loads(body)['error']}")
    status, _, body = post_json(f"{base}/models/nothing/infer", features)
    print(f"unknown model: {status} {json.loads(body)['type']}")
    status, _, body = post_json(f"{base}/models/mlp/infer", features, **{"Mds-Timeout": "nan"})
    print(f"bad deadline header: {status} {json.loads(body)['error']}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000")
