"""A two-input model for the ONNX and protocol tests, built with numpy and ``onnx`` alone.

``scores = x @ W.T + B + ids`` (``x``: float32 ``[batch, 4]``, ``ids``: int64
``[batch]``), ``best = argmax(scores)``. The same model as an ``.onnx`` file
(built with the ``onnx`` package, no torch) and as numpy, for the reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

_rng = np.random.default_rng(0)
W = _rng.standard_normal((2, 4)).astype(np.float32)
B = _rng.standard_normal(2).astype(np.float32)


def reference(x: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The model's outputs, computed with numpy."""
    scores = x @ W.T + B + ids[..., None].astype(np.float32)
    return scores.astype(np.float32), scores.argmax(axis=-1)


def linear(x: np.ndarray) -> np.ndarray:
    """The layer alone: ``x @ W.T + B``."""
    result: np.ndarray = (x @ W.T + B).astype(np.float32)
    return result


def onnx_bytes(*, batch_axis: bool = True) -> bytes:
    """The model as an ``.onnx`` file; skips the test if the ``onnx`` package is missing."""
    onnx = pytest.importorskip("onnx", reason="building the test model needs the onnx package")
    from onnx import TensorProto, helper, numpy_helper

    batch: Any = "batch" if batch_axis else 1
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4]),
        helper.make_tensor_value_info("ids", TensorProto.INT64, [batch]),
    ]
    outputs = [
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, 2]),
        helper.make_tensor_value_info("best", TensorProto.INT64, [batch]),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "W", "B"], ["linear"], transB=1),
        helper.make_node("Cast", ["ids"], ["ids_float"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["ids_float", "axis1"], ["ids_column"]),
        helper.make_node("Add", ["linear", "ids_column"], ["scores"]),
        helper.make_node("ArgMax", ["scores"], ["best"], axis=1, keepdims=0),
    ]
    weights = [
        numpy_helper.from_array(W, "W"),
        numpy_helper.from_array(B, "B"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    graph = helper.make_graph(nodes, "two_inputs", inputs, outputs, weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data
