"""The ONNX Runtime backend: a ready handler for an .onnx model.

onnxruntime is imported when the handler is initialised, never by ``import mds``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from .._collate import Collator, Stack
from .._deps import require
from .._devices.device import Device
from .._errors import ConfigError, DeviceError
from .._handler import ModelContext
from .._tensors import InputCheck, TensorSpec
from .graph import GraphHandler

__all__ = ["OnnxHandler", "TensorSpec"]

logger = logging.getLogger("mds.backends")

# onnxruntime's type strings -> numpy dtypes
_DTYPES: dict[str, np.dtype[Any]] = {
    f"tensor({name})": np.dtype(dtype)
    for name, dtype in {
        "float": np.float32,
        "float16": np.float16,
        "double": np.float64,
        "int8": np.int8,
        "int16": np.int16,
        "int32": np.int32,
        "int64": np.int64,
        "uint8": np.uint8,
        "uint16": np.uint16,
        "uint32": np.uint32,
        "uint64": np.uint64,
        "bool": np.bool_,
        "string": np.object_,
    }.items()
}

_OPTIMIZATION = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


class _Sessions:
    """One session per model and device, shared by the instances there."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[Any, ...], list[Any]] = {}  # key -> [session, users]

    def acquire(self, key: tuple[Any, ...], make: Any) -> Any:
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                entry = self._open[key] = [make(), 0]
            entry[1] += 1
            return entry[0]

    def release(self, key: tuple[Any, ...]) -> None:
        with self._lock:
            entry = self._open.get(key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._open[key]


_sessions = _Sessions()


class OnnxHandler(GraphHandler):
    """Serve an ONNX model with onnxruntime.

    The execution provider comes from the instance's device: CUDA with its
    device id on ``cuda:N``, else the CPU. Instances on the same device
    share one session (sessions are safe to run concurrently).

    Inputs, outputs, dtypes and shapes are read from the model. When every
    input's first dimension is dynamic, that is the batch axis and requests
    are batched along it; a request is then one item without that axis.
    Otherwise a request is the model's whole input, and the model's
    ``max_batch_size`` must be 1.

    A request is a dict of input name to array (or nested lists), or, for a
    model with one input, that array alone. A missing or unknown input, or
    a wrong dtype or shape, fails that request alone with
    :class:`mds.InvalidInput` naming the input, what was expected and what
    came. The response is a dict of output name to array, or the array
    alone for a model with one output.

    Args:
        model: an ``.onnx`` file, or the model's bytes.
        provider_options: options for the execution provider (e.g. CUDA's
            ``gpu_mem_limit``), merged over the device id.
        intra_op_threads: threads for one operator; defaults to the CPU
            thread budget (:attr:`ModelContext.threads`).
        inter_op_threads: threads across operators (parallel execution mode).
        graph_optimization: ``"disable"``, ``"basic"``, ``"extended"`` or ``"all"``.
        outputs: the outputs to compute; default all.
        examples: example requests for warm-up.

    Raises:
        ConfigError: an unknown ``graph_optimization``.

    Example:
        >>> handler = mds.OnnxHandler("model.onnx", examples=[{"x": np.zeros(4, np.float32)}])
        >>> async with mds.ModelRuntime(handler) as model:
        ...     result = await model.serve({"x": np.ones(4, np.float32)})

    Added in 0.2.
    """

    collator: ClassVar[Collator | None] = Stack()
    platform: ClassVar[str] = "onnxruntime_onnx"

    def __init__(
        self,
        model: str | Path | bytes,
        *,
        provider_options: Mapping[str, Any] | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        graph_optimization: Literal["disable", "basic", "extended", "all"] = "all",
        outputs: Sequence[str] | None = None,
        examples: Sequence[Any] | None = None,
    ) -> None:
        if graph_optimization not in _OPTIMIZATION:
            raise ConfigError(
                f"OnnxHandler: graph_optimization {graph_optimization!r} is not one of "
                f"{', '.join(_OPTIMIZATION)}"
            )
        self.model = model
        self.provider_options = dict(provider_options or {})
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.graph_optimization = graph_optimization
        self.output_names = list(outputs) if outputs is not None else None
        self.examples = list(examples) if examples is not None else None
        self.session: Any = None
        self.inputs: dict[str, TensorSpec] = {}
        self.outputs: dict[str, TensorSpec] = {}
        self.batched = False
        self._key: tuple[Any, ...] | None = None
        self._check = InputCheck({})

    # -- lifecycle ------------------------------------------------------------

    def providers(self, device: Device) -> list[Any]:
        """The execution providers for ``device``; override for other kinds.

        Raises:
            DeviceError: onnxruntime has no provider for the device.
        """
        ort = _ort()
        if device.kind == "cpu":
            return [("CPUExecutionProvider", self.provider_options)]
        if device.kind == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise DeviceError(
                    f"onnxruntime has no CUDA provider for {device} (available: "
                    f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu"
                )
            options = {"device_id": device.index or 0, **self.provider_options}
            return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
        raise DeviceError(
            f"OnnxHandler does not know which execution provider runs on {device}; "
            "subclass it and override providers()"
        )

    def init(self, context: ModelContext) -> None:
        """Open (or share) the session for ``context.device``; read the model's tensors."""
        ort = _ort()
        threads = self.intra_op_threads or context.threads or 0
        if isinstance(self.model, bytes):
            identity: Any = hashlib.sha256(self.model).hexdigest()
        else:
            path = Path(self.model).resolve()
            if not path.is_file():
                raise ConfigError(f"OnnxHandler: no model file at {path}")
            identity = (str(path), path.stat().st_mtime_ns)
        providers = self.providers(context.device)
        self._key = (
            identity,
            context.device,
            threads,
            self.inter_op_threads,
            self.graph_optimization,
            repr(providers),
        )

        def make() -> Any:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            if self.inter_op_threads:
                options.inter_op_num_threads = self.inter_op_threads
                options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
            level = _OPTIMIZATION[self.graph_optimization]
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
            source = self.model if isinstance(self.model, bytes) else str(self.model)
            return ort.InferenceSession(source, sess_options=options, providers=providers)

        self.session = _sessions.acquire(self._key, make)
        self.inputs = {i.name: _spec(i) for i in self.session.get_inputs()}
        self.outputs = {o.name: _spec(o) for o in self.session.get_outputs()}
        unknown = [n for n in self.output_names or () if n not in self.outputs]
        if unknown:
            raise ConfigError(
                f"OnnxHandler: outputs {unknown} are not in the model; it has "
                f"{', '.join(self.outputs)}"
            )
        self._run_outputs = self.output_names or list(self.outputs)
        self.batched = all(
            spec.shape and not isinstance(spec.shape[0], int) for spec in self.inputs.values()
        )
        self._check = InputCheck(self.signature()[0], batched=self.batched)
        if not self.batched and context.config.batching.max_batch_size > 1:
            fixed = ", ".join(spec.describe() for spec in self.inputs.values())
            raise ConfigError(
                f"{context.name}: the model has no dynamic batch axis ({fixed}), so it "
                "cannot batch requests; set batching.max_batch_size to 1"
            )

    def teardown(self) -> None:
        if self._key is not None:
            _sessions.release(self._key)
            self._key = None
        self.session = None

    # -- a batch ----------------------------------------------------------------

    def infer(self, batch: Any) -> Any:
        """Run the session on the batch's input arrays."""
        arrays = self.session.run(self._run_outputs, dict(batch))
        if len(arrays) == 1:
            return arrays[0] if self.batched else [arrays[0]]
        outputs = dict(zip(self._run_outputs, arrays, strict=True))
        return outputs if self.batched else [outputs]


def _spec(arg: Any) -> TensorSpec:
    dtype = _DTYPES.get(arg.type)
    if dtype is None:
        raise ConfigError(f"OnnxHandler: {arg.name!r} has type {arg.type}, which mds cannot feed")
    shape = tuple(d if isinstance(d, int) else (d or None) for d in arg.shape)
    return TensorSpec(name=arg.name, dtype=dtype.name, shape=shape)


def _ort() -> Any:
    return require("onnxruntime", feature="mds.OnnxHandler")
