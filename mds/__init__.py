"""mds: serve ML models from inside your own application.

Subclass :class:`ModelHandler`, add it to a :class:`Runtime`, start the
runtime, and call :func:`serve` (or :func:`serve_sync`) from your own routes.
Everything not re-exported here is private.
"""

from __future__ import annotations

from ._backends.onnx_handler import OnnxHandler as OnnxHandler
from ._backends.tf_handler import TensorFlowHandler as TensorFlowHandler
from ._backends.torch_handler import TorchHandler as TorchHandler
from ._collate import Collator as Collator
from ._collate import Pad as Pad
from ._collate import Padded as Padded
from ._collate import Stack as Stack
from ._config import BatchingConfig as BatchingConfig
from ._config import ModelConfig as ModelConfig
from ._config import SequenceConfig as SequenceConfig
from ._config import VersionPolicy as VersionPolicy
from ._current import current_runtime as current_runtime
from ._current import serve as serve
from ._current import serve_sync as serve_sync
from ._devices.device import Device as Device
from ._devices.device import DeviceInfo as DeviceInfo
from ._devices.kinds import DeviceKind as DeviceKind
from ._devices.manager import DeviceManager as DeviceManager
from ._errors import ConfigError as ConfigError
from ._errors import DeadlineExceeded as DeadlineExceeded
from ._errors import DecodeError as DecodeError
from ._errors import DeviceError as DeviceError
from ._errors import InferenceError as InferenceError
from ._errors import InvalidInput as InvalidInput
from ._errors import LifecycleError as LifecycleError
from ._errors import MdsError as MdsError
from ._errors import MissingDependency as MissingDependency
from ._errors import ModelNotFound as ModelNotFound
from ._errors import NotReady as NotReady
from ._errors import Overloaded as Overloaded
from ._errors import RequestError as RequestError
from ._errors import Unavailable as Unavailable
from ._handler import ModelContext as ModelContext
from ._handler import ModelHandler as ModelHandler
from ._handler import ModelState as ModelState
from ._model import ModelRuntime as ModelRuntime
from ._pipeline.graph import Pipeline as Pipeline
from ._pipeline.nodes import Node as Node
from ._pipeline.running import PipelineRuntime as PipelineRuntime
from ._repository.repository import ModelRepository as ModelRepository
from ._request import RequestContext as RequestContext
from ._request import request_context as request_context
from ._request import use_request_context as use_request_context
from ._residency import ResidencyStatistics as ResidencyStatistics
from ._runtime import Runtime as Runtime
from ._servable import Servable as Servable
from ._stateful import SequenceEnd as SequenceEnd
from ._stateful import SequenceStep as SequenceStep
from ._status import CallTrace as CallTrace
from ._status import Histogram as Histogram
from ._status import ModelHealth as ModelHealth
from ._status import ModelHistograms as ModelHistograms
from ._status import ModelStatistics as ModelStatistics
from ._status import NodeStatistics as NodeStatistics
from ._status import NodeTrace as NodeTrace
from ._status import PipelineHealth as PipelineHealth
from ._status import PipelineStatistics as PipelineStatistics
from ._status import PipelineTrace as PipelineTrace
from ._status import RuntimeHealth as RuntimeHealth
from ._status import Traced as Traced
from ._status import VersionStatus as VersionStatus
from ._tensors import TensorSpec as TensorSpec
from ._version import __version__ as __version__
from ._versions import ModelVersions as ModelVersions

__all__ = [
    "BatchingConfig",
    "CallTrace",
    "Collator",
    "ConfigError",
    "DeadlineExceeded",
    "DecodeError",
    "Device",
    "DeviceError",
    "DeviceInfo",
    "DeviceKind",
    "DeviceManager",
    "Histogram",
    "InferenceError",
    "InvalidInput",
    "LifecycleError",
    "MdsError",
    "MissingDependency",
    "ModelConfig",
    "ModelContext",
    "ModelHandler",
    "ModelHealth",
    "ModelHistograms",
    "ModelNotFound",
    "ModelRepository",
    "ModelRuntime",
    "ModelState",
    "ModelStatistics",
    "ModelVersions",
    "Node",
    "NodeStatistics",
    "NodeTrace",
    "NotReady",
    "OnnxHandler",
    "Overloaded",
    "Pad",
    "Padded",
    "Pipeline",
    "PipelineHealth",
    "PipelineRuntime",
    "PipelineStatistics",
    "PipelineTrace",
    "RequestContext",
    "RequestError",
    "ResidencyStatistics",
    "Runtime",
    "RuntimeHealth",
    "SequenceConfig",
    "SequenceEnd",
    "SequenceStep",
    "Servable",
    "Stack",
    "TensorFlowHandler",
    "TensorSpec",
    "TorchHandler",
    "Traced",
    "Unavailable",
    "VersionPolicy",
    "VersionStatus",
    "__version__",
    "current_runtime",
    "request_context",
    "serve",
    "serve_sync",
    "use_request_context",
]

# Reprs and tracebacks show the public path, not the private module.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("mds._"):
        try:
            _obj.__module__ = __name__
        except (AttributeError, TypeError):  # pragma: no cover - builtins-like objects
            pass
del _name, _obj
