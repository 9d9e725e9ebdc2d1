"""The TensorFlow backend: a ready handler for a SavedModel directory.

tensorflow is imported when the handler is initialised, never by ``import mds``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .._collate import Collator, Stack
from .._deps import require
from .._devices.device import Device
from .._errors import ConfigError, DeviceError
from .._handler import ModelContext
from .._tensors import InputCheck, TensorSpec, dims
from .graph import GraphHandler
from .onnx_handler import _Sessions

__all__ = ["TensorFlowHandler"]

logger = logging.getLogger("mds.backends")

# TensorFlow's dtype names -> the numpy dtypes mds feeds (strings as objects)
_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(dtype)
    for name, dtype in {
        "float16": np.float16,
        "float32": np.float32,
        "float64": np.float64,
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

#: Loaded SavedModels, one per directory and device, shared by the instances there.
_loaded = _Sessions()


class TensorFlowHandler(GraphHandler):
    """Serve a TensorFlow SavedModel through one of its signatures.

    The directory is what ``tf.saved_model.save`` writes (or Keras's
    ``model.export``): the handler loads it with ``tf.saved_model.load``
    and calls the signature's function, under ``tf.device`` for the
    instance's device: the CPU, or the GPU of the same index on ``cuda:N``
    (with a TensorFlow build that has GPU support). Instances on the same
    device share one loaded model.

    Inputs, outputs, dtypes and shapes are read from the signature (the
    tensors in the order of their names, as TensorFlow lists them). When
    every input's first dimension is dynamic, that is the batch axis and
    requests are batched along it; a request is then one item without that
    axis. Otherwise a request is the model's whole input, and the model's
    ``max_batch_size`` must be 1.

    A request is a dict of input name to array (or nested lists), or, for a
    model with one input, that array alone. A missing or unknown input, or
    a wrong dtype or shape, fails that request alone with
    :class:`mds.InvalidInput` naming the input, what was expected and what
    came. The response is a dict of output name to numpy array (strings as
    ``bytes``), or the array alone for a model with one output.

    TensorFlow's thread pools belong to the process and are set once, before
    it runs anything: the handler sets them when it is the first to use
    TensorFlow in the process (otherwise they stay as they were, and it
    logs so). On a GPU it turns on TensorFlow's memory growth, where it can
    still be set, so that TensorFlow does not take the whole GPU.

    Args:
        path: the SavedModel directory (the one holding ``saved_model.pb``).
        signature: the signature to serve (``saved_model_cli show --dir
            PATH`` lists them).
        tags: the tags of the MetaGraph to load, for a SavedModel of
            TensorFlow 1 with several; default the ``serve`` one.
        inputs: corrections to the signature's inputs, by name, as the
            signature declares them (batch axis included): a shape for an
            input of unknown rank, or a narrower one to check requests by.
            The dtype must be the signature's.
        outputs: the outputs to return; default all.
        intra_op_threads: threads for one operator; defaults to the CPU
            thread budget (:attr:`ModelContext.threads`).
        inter_op_threads: threads across operators.
        examples: example requests for warm-up.

    Example:
        >>> handler = mds.TensorFlowHandler("saved/", examples=[{"x": np.zeros(4, np.float32)}])
        >>> async with mds.ModelRuntime(handler) as model:
        ...     result = await model.serve({"x": np.ones(4, np.float32)})

    Added in 0.4.
    """

    collator: ClassVar[Collator | None] = Stack()
    platform: ClassVar[str] = "tensorflow_savedmodel"

    def __init__(
        self,
        path: str | Path,
        *,
        signature: str = "serving_default",
        tags: Sequence[str] | None = None,
        inputs: Sequence[TensorSpec] | None = None,
        outputs: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        examples: Sequence[Any] | None = None,
    ) -> None:
        self.path = path
        self.signature_name = signature
        self.tags = list(tags) if tags is not None else None
        self.input_overrides = {spec.name: spec for spec in inputs or ()}
        self.output_names = list(outputs) if outputs is not None else None
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.examples = list(examples) if examples is not None else None
        self.model: Any = None
        self.function: Any = None
        self.inputs: dict[str, TensorSpec] = {}
        self.outputs: dict[str, TensorSpec] = {}
        self.batched = False
        self._device = "/CPU:0"
        self._key: tuple[Any, ...] | None = None
        self._check = InputCheck({})

    # -- lifecycle ------------------------------------------------------------

    def tf_device(self, device: Device) -> str:
        """TensorFlow's name for ``device``; override to run on other kinds.

        Raises:
            DeviceError: TensorFlow has no such device.
        """
        tf = _tf()
        if device.kind == "cpu":
            return "/CPU:0"
        if device.kind == "cuda":
            gpus = tf.config.list_physical_devices("GPU")
            index = device.index or 0
            if index >= len(gpus):
                raise DeviceError(
                    f"TensorFlow sees {len(gpus)} GPU(s), so it cannot run on {device}"
                    + ("" if gpus else "; install a TensorFlow with GPU support (tensorflow)")
                )
            try:
                tf.config.experimental.set_memory_growth(gpus[index], True)
            except (RuntimeError, ValueError):  # already initialised: it stays as it is
                pass
            return f"/GPU:{index}"
        raise DeviceError(
            f"TensorFlowHandler does not know which TensorFlow device runs on {device}; "
            "subclass it and override tf_device()"
        )

    def init(self, context: ModelContext) -> None:
        """Load (or share) the SavedModel on ``context.device``; read its signature."""
        tf = _tf()
        path = Path(self.path).resolve()
        graph = next(
            (path / name for name in ("saved_model.pb", "saved_model.pbtxt")
             if (path / name).is_file()),
            None,
        )  # fmt: skip
        if graph is None:
            raise ConfigError(f"TensorFlowHandler: no SavedModel at {path} (no saved_model.pb)")
        _set_threads(tf, self.intra_op_threads or context.threads, self.inter_op_threads)
        self._device = self.tf_device(context.device)
        tags = tuple(self.tags) if self.tags is not None else None
        self._key = (str(path), graph.stat().st_mtime_ns, tags, self._device)

        def load() -> Any:
            with tf.device(self._device):
                return tf.saved_model.load(str(path), tags=list(tags) if tags else None)

        self.model = _loaded.acquire(self._key, load)
        signatures = self.model.signatures
        if self.signature_name not in signatures:
            raise ConfigError(
                f"TensorFlowHandler: the SavedModel has no signature {self.signature_name!r}; "
                f"it has {', '.join(signatures) or 'none'}"
            )
        self.function = signatures[self.signature_name]
        args, kwargs = self.function.structured_input_signature
        if args:  # signatures are called by keyword; this is a plain tf.function
            raise ConfigError(
                f"TensorFlowHandler: signature {self.signature_name!r} takes positional "
                "inputs, which mds cannot name"
            )
        # A SavedModel keeps a signature's tensors in protobuf maps, whose order
        # changes from load to load: they are taken in the order of their names.
        self.inputs = {name: _spec(name, kwargs[name]) for name in sorted(kwargs)}
        self._override_inputs({name for name, spec in kwargs.items() if spec.shape.rank is None})
        outputs = self.function.structured_outputs
        self.outputs = {name: _spec(name, outputs[name], output=True) for name in sorted(outputs)}
        unknown = [n for n in self.output_names or () if n not in self.outputs]
        if unknown:
            raise ConfigError(
                f"TensorFlowHandler: outputs {unknown} are not in signature "
                f"{self.signature_name!r}; it has {', '.join(self.outputs)}"
            )
        self._run_outputs = self.output_names or list(self.outputs)
        self.batched = bool(self.inputs) and all(
            spec.shape and not isinstance(spec.shape[0], int) for spec in self.inputs.values()
        )
        self._check = InputCheck(self.signature()[0], batched=self.batched)
        if not self.batched and context.config.batching.max_batch_size > 1:
            fixed = ", ".join(spec.describe() for spec in self.inputs.values())
            raise ConfigError(
                f"{context.name}: the model has no dynamic batch axis ({fixed}), so it "
                "cannot batch requests; set batching.max_batch_size to 1"
            )

    def _override_inputs(self, unknown_rank: set[str]) -> None:
        """Apply ``inputs``: each must fit the signature; every rank must be known after."""
        for name, given in self.input_overrides.items():
            spec = self.inputs.get(name)
            if spec is None:
                raise ConfigError(
                    f"TensorFlowHandler: inputs names {name!r}, which signature "
                    f"{self.signature_name!r} does not take; it takes {', '.join(self.inputs)}"
                )
            if np.dtype(given.dtype) != np.dtype(spec.dtype):
                raise ConfigError(
                    f"TensorFlowHandler: input {name!r} is {spec.dtype} in the signature, "
                    f"not {given.dtype}"
                )
            if name not in unknown_rank and (
                len(given.shape) != len(spec.shape)
                or any(
                    isinstance(want, int) and want != got
                    for want, got in zip(spec.shape, given.shape, strict=True)
                )
            ):
                raise ConfigError(
                    f"TensorFlowHandler: input {name!r} has shape {dims(spec.shape)} in the "
                    f"signature; {dims(given.shape)} does not fit it"
                )
            self.inputs[name] = given
        unknown = sorted(unknown_rank - self.input_overrides.keys())
        if unknown:
            raise ConfigError(
                f"TensorFlowHandler: the rank of input {unknown[0]!r} is not known; give its "
                f"shape with inputs=[mds.TensorSpec(name={unknown[0]!r}, ...)]"
            )

    def teardown(self) -> None:
        if self._key is not None:
            _loaded.release(self._key)
            self._key = None
        self.model = self.function = None

    # -- a batch ----------------------------------------------------------------

    def infer(self, batch: Any) -> Any:
        """Call the signature's function on the batch's input arrays."""
        tf = _tf()
        with tf.device(self._device):
            results = self.function(**{name: tf.constant(v) for name, v in batch.items()})
        arrays = {name: results[name].numpy() for name in self._run_outputs}
        outputs = next(iter(arrays.values())) if len(arrays) == 1 else arrays
        return outputs if self.batched else [outputs]


def _spec(name: str, spec: Any, *, output: bool = False) -> TensorSpec:
    """Our :class:`TensorSpec` for one of a signature's ``tf.TensorSpec``."""
    dtype = _DTYPES.get(spec.dtype.name)
    if dtype is None:
        raise ConfigError(
            f"TensorFlowHandler: {'output' if output else 'input'} {name!r} has dtype "
            f"{spec.dtype.name}, which mds cannot {'return' if output else 'feed'}"
        )
    # An unknown rank: an input's shape must then be given in ``inputs``; an
    # output's is only reported, as one dimension of any size.
    known = spec.shape.rank is not None
    shape: tuple[int | None, ...] = tuple(spec.shape.as_list()) if known else (None,)
    return TensorSpec(name=name, dtype=dtype.name, shape=shape)


def _set_threads(tf: Any, intra: int | None, inter: int | None) -> None:
    """Size TensorFlow's thread pools, where they are not running yet."""
    threading = tf.config.threading
    for what, wanted, get, set_ in (
        ("intra-op", intra, threading.get_intra_op_parallelism_threads,
         threading.set_intra_op_parallelism_threads),
        ("inter-op", inter, threading.get_inter_op_parallelism_threads,
         threading.set_inter_op_parallelism_threads),
    ):  # fmt: skip
        if not wanted or get() == wanted:
            continue
        try:
            set_(wanted)
        except RuntimeError:  # TensorFlow has run something: its pools are fixed
            logger.debug(
                "TensorFlow's %s thread pool is already running (%s threads), so it stays "
                "as it is rather than %d",
                what,
                get() or "default",
                wanted,
            )


def _tf() -> Any:
    return require("tensorflow", feature="mds.TensorFlowHandler")
