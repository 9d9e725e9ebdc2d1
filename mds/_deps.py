"""Imports of optional dependencies, with an error that says what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from ._errors import MissingDependency

# module to import -> the extra that installs it
_EXTRAS = {
    "torch": "torch",
    "onnxruntime": "onnx",
    "onnx": "onnx",
    "fastapi": "fastapi",
    "starlette": "fastapi",
    "flask": "flask",
    "pyarrow": "arrow",
    "tensorflow": "tensorflow",
    "prometheus_client": "metrics",
    "opentelemetry": "tracing",
    "grpc": "grpc",
    "grpc_health": "grpc",
    "boto3": "sqs",
    "tritonclient": "grpc",
    "redis": "redis",
    "ray": "ray",
    "uvicorn": "server",
    "granian": "server",
}

DISTRIBUTION = "mds-serving"


def require(module: str, *, feature: str) -> ModuleType:
    """Import an optional dependency or raise :class:`MissingDependency`.

    Args:
        module: the importable name, e.g. ``"torch"``.
        feature: what the caller was trying to use, for the message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = _EXTRAS.get(module.partition(".")[0])
        hint = f'pip install "{DISTRIBUTION}[{extra}]"' if extra else f"pip install {module}"
        raise MissingDependency(
            f"{feature} needs the optional dependency {module!r}, which is not "
            f"installed ({exc}); install it with: {hint}"
        ) from exc
