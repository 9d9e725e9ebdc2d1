"""A gRPC client for examples/grpc_app.py: Triton's own client, unchanged.

Run the app first (python examples/grpc_app.py), then:

    python examples/grpc_client.py 127.0.0.1:8001

Needs tritonclient[grpc] (pip install "mds-serving[grpc]").
"""

from __future__ import annotations

import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def main(address: str) -> None:
    client = triton.InferenceServerClient(address)
    print(f"ready: {client.is_server_live()} {client.is_model_ready('mlp')}")
    metadata = client.get_model_metadata("mlp", as_json=True)
    print(f"inputs: {[(i['name'], i['datatype'], i['shape']) for i in metadata['inputs']]}")
    config = client.get_model_config("mlp", as_json=True)["config"]
    print(f"max batch size: {config['max_batch_size']}")

    # Two rows in one call: tensors travel as raw bytes; each row goes
    # through the batcher, and the outputs come back with the batch axis.
    features = np.full((2, 16), 0.5, dtype=np.float32)
    given = triton.InferInput("features", list(features.shape), "FP32")
    given.set_data_from_numpy(features)
    result = client.infer("mlp", [given], outputs=[triton.InferRequestedOutput("probabilities")])
    print(f"probabilities: {result.as_numpy('probabilities').shape}")

    # The two most likely classes by label, with a deadline (microseconds)
    # and a request parameter the handler may read (mds.request_context()).
    top = triton.InferRequestedOutput("probabilities", class_count=2)
    result = client.infer(
        "mlp", [given], outputs=[top], timeout=2_000_000, parameters={"caller": "example"}
    )
    print(f"top classes: {[v.decode() for v in result.as_numpy('probabilities')[0]]}")

    # A streaming model over ModelStreamInfer: one response per chunk.
    chunks: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: chunks.put(error or result))
    one = triton.InferInput("features", [16], "FP32")
    one.set_data_from_numpy(features[0])
    client.async_stream_infer("mlp-ranked", [one], request_id="ranked-1")
    labels = []
    for _ in range(4):
        chunk = chunks.get(timeout=10)
        labels.append(chunk.as_numpy("label").item().decode())
    client.stop_stream()
    print(f"stream: {labels}")

    # Errors are gRPC statuses, with mds's message.
    for call in (
        lambda: client.infer("nothing", [given]),
        lambda: client.infer("mlp", [bad_input()]),
    ):
        try:
            call()
        except InferenceServerException as error:
            print(f"error: {error.status()} {error.message()}")

    stats = client.get_inference_statistics("mlp", as_json=True)["model_stats"][0]
    print(f"served: {stats['inference_stats']['success']['count']} requests")
    client.close()


def bad_input() -> Any:
    wrong = triton.InferInput("features", [3], "FP32")  # 3 features, not 16
    wrong.set_data_from_numpy(np.zeros(3, dtype=np.float32))
    return wrong


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8001")
