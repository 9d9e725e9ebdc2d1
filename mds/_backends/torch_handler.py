"""The PyTorch backend: a ready handler for an ``nn.Module``.

torch is imported when the handler is initialised, never by ``import mds``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import numpy as np

from .._collate import Collator, Pad, Padded, Stack, _WithLengths
from .._deps import require
from .._devices.device import Device
from .._errors import ConfigError, DeviceError
from .._handler import ModelContext, ModelHandler
from .._tensors import InputCheck, Signature, TensorSpec, is_tensor
from .._threads import plain_as

if TYPE_CHECKING:
    import torch

__all__ = ["TorchHandler"]

logger = logging.getLogger("mds.backends")

_DTYPES = ("float32", "float16", "bfloat16")


class TorchHandler(ModelHandler[Any, Any]):
    """Serve a PyTorch model: loaded onto its device, run under inference mode.

    Give exactly one source: ``module`` (an ``nn.Module``, or a factory
    that makes one, with optional ``weights``), ``torchscript`` or
    ``exported``. Each instance loads the model onto the device the runtime
    gives it, sets its CPU thread budget, and runs every batch under
    ``torch.inference_mode()``.

    A request is an array or tensor (or a dict or tuple of them); the
    :attr:`collator` (:class:`mds.Stack` by default, :class:`mds.Pad` for
    sequences) batches them on the host, and the batch is moved to the
    device.

    Requests are checked before they are batched when the model's inputs are
    known: declared in ``inputs``, or read from the warm-up ``examples``
    (their dtypes and shapes; with :class:`mds.Pad`, the first axis may
    vary; not when a subclass's own ``preprocess`` makes the model's input
    from them: declare ``inputs`` then). A missing or unknown input, a wrong
    dtype (a float64 row for a float32 model, strings) or a wrong shape then
    fails that request alone with :class:`mds.InvalidInput` naming the input,
    what was expected and what came, and lists (from JSON) become arrays of
    the input's dtype.
    The inputs are the model's :meth:`signature` for the protocol routes.

    :meth:`forward` calls the module: ``module(**batch)`` for a dict,
    ``module(*batch)`` for a tuple, ``module(values, mask)`` for a
    :class:`mds.Padded`, else ``module(batch)``. Outputs come back to the
    host as numpy arrays, one row per request.

    Subclass it to add ``preprocess`` / ``postprocess``, to build the module
    in :meth:`load`, or to pick outputs in :meth:`forward`. With several
    instances, pass a factory, e.g. ``functools.partial(mds.TorchHandler,
    make_model)``.

    Args:
        module: an ``nn.Module``, or a zero-argument factory that makes one.
        weights: a ``state_dict`` file (``torch.save``) loaded into the
            module (strictly), with ``weights_only=True``.
        torchscript: a TorchScript file (``torch.jit.save``).
        exported: a ``torch.export`` program file (``torch.export.save``).
        dtype: run the model in ``"float16"`` or ``"bfloat16"`` (floating
            inputs are cast too); ``None`` keeps the model's own.
        compile: ``torch.compile`` the module; ``True`` or a dict of
            ``torch.compile`` keyword arguments. Warm-up then compiles it at
            each warm-up batch size before the model is ready.
        pin_memory: on CUDA, stage inputs in reused page-locked buffers so
            host-to-device copies are asynchronous.
        copy_stream: on CUDA, copy inputs on a side stream that the compute
            stream waits for, so copies overlap other work on the GPU.
        examples: example requests for warm-up (see
            :meth:`ModelHandler.warmup`); without ``inputs`` (and with this
            class's own ``preprocess``), they also say what a request must
            look like.
        inputs: the tensors one request carries (no batch axis), to check
            requests against: one for a request that is an array, several
            for a dict (added in 0.3).
        to_numpy: return outputs as numpy arrays; ``False`` keeps CPU tensors.

    Raises:
        ConfigError: not exactly one source, or an unknown ``dtype``.

    Example:
        >>> handler = mds.TorchHandler(make_mlp, weights="mlp.pt",
        ...                            examples=[np.zeros(16, np.float32)])
        >>> async with mds.ModelRuntime(handler) as model:
        ...     scores = await model.serve(np.ones(16, np.float32))

    Added in 0.2.
    """

    collator: ClassVar[Collator | None] = Stack()
    platform: ClassVar[str] = "pytorch"

    def __init__(
        self,
        module: torch.nn.Module | Callable[[], torch.nn.Module] | None = None,
        *,
        weights: str | Path | None = None,
        torchscript: str | Path | None = None,
        exported: str | Path | None = None,
        dtype: Literal["float32", "float16", "bfloat16"] | None = None,
        compile: bool | Mapping[str, Any] = False,
        pin_memory: bool = True,
        copy_stream: bool = True,
        examples: Sequence[Any] | None = None,
        inputs: Sequence[TensorSpec] | None = None,
        to_numpy: bool = True,
    ) -> None:
        given = [name for name, v in (("module", module), ("torchscript", torchscript),
                                      ("exported", exported)) if v is not None]  # fmt: skip
        if len(given) > 1 or (not given and type(self).load is TorchHandler.load):
            raise ConfigError(
                "TorchHandler needs exactly one source: module, torchscript or exported"
                + (f"; got {', '.join(given)}" if given else "")
                + " (or a subclass that overrides load)"
            )
        if weights is not None and module is None:
            raise ConfigError("TorchHandler: weights are loaded into a module; give module too")
        if dtype is not None and dtype not in _DTYPES:
            raise ConfigError(f"TorchHandler: dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
        self.source = module
        self.weights = weights
        self.torchscript = torchscript
        self.exported = exported
        self.dtype = dtype
        self.compile = compile
        self.pin_memory = pin_memory
        self.copy_stream = copy_stream
        self.examples = list(examples) if examples is not None else None
        self.inputs: dict[str, TensorSpec] | None = (
            {spec.name: spec for spec in inputs} if inputs is not None else None
        )
        self.to_numpy = to_numpy
        self._check: InputCheck | None = None
        self.module: Any = None
        self._staging: dict[Any, Any] = {}
        self._stream: Any = None
        self._slot = 0
        self._cuda = False

    # -- lifecycle ------------------------------------------------------------

    def load(self, context: ModelContext) -> torch.nn.Module:
        """Make the module from the source given; override to build your own.

        Called in :meth:`init`, on the instance's thread. The module may be
        returned on the CPU: ``init`` moves it to the device.
        """
        th = _torch()
        device = self.torch_device(context.device)
        if self.torchscript is not None:
            return cast("torch.nn.Module", th.jit.load(str(self.torchscript), map_location=device))
        if self.exported is not None:
            return cast("torch.nn.Module", th.export.load(str(self.exported)).module())
        source = self.source
        module = source if isinstance(source, th.nn.Module) else source()  # type: ignore[misc]
        if not isinstance(module, th.nn.Module):
            raise ConfigError(
                f"TorchHandler: the module factory returned {type(module).__name__}, "
                "not a torch.nn.Module"
            )
        if self.weights is not None:
            state = th.load(str(self.weights), map_location=device, weights_only=True)
            module.load_state_dict(state)
        return cast("torch.nn.Module", module)

    def torch_device(self, device: Device) -> torch.device:
        """The torch device for ``device``; override to run on a kind of your own.

        Raises:
            DeviceError: torch has no such device.
        """
        th = _torch()
        try:
            return cast("torch.device", th.device(device.name))
        except RuntimeError as exc:
            raise DeviceError(
                f"torch has no device {device}: {exc}; for a device kind of your own, "
                "override TorchHandler.torch_device"
            ) from None

    def init(self, context: ModelContext) -> None:
        """Load the module onto ``context.device``; apply the thread budget."""
        torch = _torch()
        if context.threads is not None:
            torch.set_num_threads(context.threads)
        self.device = self.torch_device(context.device)
        self._dtype = getattr(torch, self.dtype) if self.dtype is not None else None
        module = self.load(context)
        module = module.to(self.device)
        if self._dtype is not None:
            module = module.to(self._dtype)
        try:
            module.eval()
        except NotImplementedError:  # an exported program's module: its mode was fixed at export
            pass
        if self.compile:
            options = dict(self.compile) if isinstance(self.compile, Mapping) else {}
            module = torch.compile(module, **options)
        self.module = module
        self._cuda = self.device.type == "cuda"
        if self._cuda and self.copy_stream:
            self._stream = torch.cuda.Stream(device=self.device)
        # A subclass's own preprocess takes requests of its own form: its
        # examples say nothing about the model's input.
        own_preprocess = type(self).preprocess is TorchHandler.preprocess
        if self.inputs is None and self.examples and own_preprocess:
            self.inputs = _inputs_of(self.examples, varying_first=isinstance(self.collator, Pad))
        elif self.inputs is None and self.examples:
            logger.info(
                "%s has a preprocess of its own, so its examples are not read as the model's "
                "inputs; pass inputs=[mds.TensorSpec(...)] to check requests",
                type(self).__name__,
            )
        if self.inputs:
            self._check = InputCheck(self.inputs)

    def warmup(self) -> Sequence[Any] | None:
        return self.examples

    def signature(self) -> Signature | None:
        """The inputs one request carries, if known (``inputs`` or the examples)."""
        return (dict(self.inputs), {}) if self.inputs else None

    # -- a request --------------------------------------------------------------

    @plain_as("check")  # mds calls check itself, on the loop
    async def preprocess(self, request: Any) -> Any:
        """Check the request against the model's inputs, if known (see :meth:`check`).

        Cheap, so it runs on the event loop (no thread hop). A subclass that
        decodes or tokenises should override it with a plain ``def`` that
        calls :meth:`check` at the end, and declare ``inputs``.
        """
        return self.check(request)

    def check(self, request: Any) -> Any:
        """The request, checked against the model's inputs: an array, or a dict of them.

        A model with one input gets its array (or tensor), sent alone or in
        a dict under the input's name (as the protocol sends it); one with
        several, a dict by input name. With no inputs known, the request as
        it is.

        Raises:
            InvalidInput: a missing or unknown input, a wrong dtype or shape.

        Added in 0.3.
        """
        check = self._check
        if check is None:
            return request
        single = check.single
        if single is not None:
            if type(request) is dict and len(request) == 1 and single in request:
                return check.one(single, request[single])  # as the protocol sends it
            if isinstance(request, np.ndarray) or not isinstance(request, Mapping):
                return check.one(single, request)
        checked = check(request)
        if len(checked) == 1:
            return next(iter(checked.values()))
        return checked

    def teardown(self) -> None:
        self.module = None
        self._staging.clear()
        self._stream = None
        if getattr(self, "_cuda", False):
            _torch().cuda.empty_cache()

    # -- a batch ----------------------------------------------------------------

    def collate(self, items: Sequence[Any]) -> Any:
        """Batch ``items`` on the host with the collator, then move the batch to the device."""
        torch = _torch()
        host = super().collate(items)
        self._slot = 0
        if not self._cuda or self._stream is None:
            return self.to_device(host)
        with torch.cuda.stream(self._stream):
            batch = self.to_device(host)
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        return batch

    def to_device(self, value: Any) -> Any:
        """Move a host batch (arrays, tensors, and dicts, tuples, ``Padded`` of them)."""
        if isinstance(value, Padded):
            return Padded(self.to_device(value.values), self.to_device(value.mask), value.lengths)
        if isinstance(value, _WithLengths):
            moved = {key: self.to_device(v) for key, v in value.items()}
            return _WithLengths(moved, value.lengths)
        if isinstance(value, Mapping):
            return {key: self.to_device(v) for key, v in value.items()}
        if isinstance(value, tuple):
            return tuple(self.to_device(v) for v in value)
        torch = _torch()
        if isinstance(value, np.ndarray):
            tensor = torch.from_numpy(np.ascontiguousarray(value))
        elif isinstance(value, torch.Tensor):
            tensor = value
        else:
            return value
        if self._dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self._dtype)
        if tensor.device == self.device:
            return tensor
        if self._cuda and self.pin_memory and tensor.device.type == "cpu":
            return self._stage(tensor).to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """Copy ``tensor`` into a reused page-locked buffer (grown as needed).

        Each tensor of a batch has its own buffer (its slot); a buffer is
        reused by the next batch, whose collate runs after this batch's
        outputs were copied back, so after its copy to the device finished.
        """
        th = _torch()
        key = (self._slot, tensor.dtype)
        self._slot += 1
        buffer = self._staging.get(key)
        if buffer is None or buffer.numel() < tensor.numel():
            buffer = th.empty(max(tensor.numel(), 1), dtype=tensor.dtype, pin_memory=True)
            self._staging[key] = buffer
        staged = buffer[: tensor.numel()].view(tensor.shape)
        staged.copy_(tensor)
        return cast("torch.Tensor", staged)

    def forward(self, batch: Any) -> Any:
        """Call the module on a device batch; override to pick or reshape outputs."""
        module = self.module
        if isinstance(batch, Padded):
            return module(batch.values, batch.mask)
        if isinstance(batch, Mapping):
            return module(**batch)
        if isinstance(batch, tuple):
            return module(*batch)
        return module(batch)

    def infer(self, batch: Any) -> Any:
        """Run :meth:`forward` under ``torch.inference_mode()``."""
        with _torch().inference_mode():
            return self.forward(batch)

    def split(self, outputs: Any, batch: Any) -> Sequence[Any]:
        """Bring ``outputs`` to the host and split them into one per request."""
        return super().split(self.to_host(outputs), batch)

    def to_host(self, value: Any) -> Any:
        """Outputs on the host: CPU tensors, or numpy arrays with ``to_numpy``."""
        torch = _torch()
        if isinstance(value, torch.Tensor):
            tensor = value.detach()
            if self.to_numpy and tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
                tensor = tensor.float()
            tensor = tensor.cpu()
            return tensor.numpy() if self.to_numpy else tensor
        if isinstance(value, Mapping):
            return {key: self.to_host(v) for key, v in value.items()}
        if isinstance(value, tuple):
            return tuple(self.to_host(v) for v in value)
        if isinstance(value, list):
            return [self.to_host(v) for v in value]
        return value


def _inputs_of(examples: Sequence[Any], *, varying_first: bool) -> dict[str, TensorSpec] | None:
    """The inputs the warm-up examples show: names, dtypes, and the dimensions they share.

    ``None`` where they show nothing to check by (tuples, objects, examples
    that disagree on names, dtypes or ranks). Python floats are taken as
    torch's default dtype, ints as int64, as ``torch.tensor`` takes them.
    """
    first = examples[0]
    names = list(first) if isinstance(first, Mapping) else ["input"]
    found: dict[str, TensorSpec] = {}
    for name in names:
        values = [ex.get(name) if isinstance(ex, Mapping) else ex for ex in examples]
        described = [_dtype_and_shape(value) for value in values]
        if any(d is None for d in described):
            return None
        dtypes = {d[0] for d in described if d is not None}
        shapes = [d[1] for d in described if d is not None]
        if len(dtypes) != 1 or len({len(s) for s in shapes}) != 1:
            return None
        shape: list[int | str | None] = [
            dim if all(s[i] == dim for s in shapes) else None for i, dim in enumerate(shapes[0])
        ]
        if varying_first and shape:
            shape[0] = None
        found[name] = TensorSpec(name=name, dtype=dtypes.pop(), shape=tuple(shape))
    return found


def _dtype_and_shape(value: Any) -> tuple[str, tuple[int, ...]] | None:
    if isinstance(value, np.ndarray):
        return (value.dtype.name, value.shape) if value.dtype.kind in "biuf" else None
    if is_tensor(value):
        return str(value.dtype).removeprefix("torch."), tuple(value.shape)
    if isinstance(value, (list, int, float, bool)):
        try:
            array = np.asarray(value)
        except ValueError:  # ragged
            return None
        if array.dtype.kind == "f":
            return str(_torch().get_default_dtype()).removeprefix("torch."), array.shape
        if array.dtype.kind in "bi":
            return ("bool" if array.dtype.kind == "b" else "int64"), array.shape
    return None


def _torch() -> Any:
    return require("torch", feature="mds.TorchHandler")
