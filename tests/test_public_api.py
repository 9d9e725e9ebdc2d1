"""The public API is what ``mds`` exports, reported under public names."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mds
import mds.batch
import mds.fastapi
import mds.flask
import mds.grpc
import mds.prometheus
import mds.ray
import mds.server
import mds.testing
import mds.workers

PUBLIC_MODULES = {
    "mds",
    "mds.testing",
    "mds.fastapi",
    "mds.flask",
    "mds.batch",
    "mds.prometheus",
    "mds.grpc",
    "mds.workers",
    "mds.ray",
    "mds.server",
}

# The public API, pinned: a change here is a design decision, with docs and a
# changelog line (as httpx pins its own).
EXPECTED = {
    "mds": [
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
    ],
    "mds.testing": ["LifecycleReport", "assert_batch_invariant", "run_lifecycle"],
    "mds.fastapi": ["add_error_handlers", "add_routes", "lifespan", "router"],
    "mds.flask": ["add_error_handlers", "add_routes", "blueprint"],
    "mds.batch": ["JobFailed", "Progress", "Report", "run", "run_sync"],
    "mds.prometheus": ["Collector", "exposition"],
    "mds.grpc": ["Server", "add_to_server"],
    "mds.ray": ["Replica", "ServeBatches", "application", "call", "map_dataset"],
    "mds.server": ["ServerConfig", "app", "load_config", "run"],
    "mds.workers": [
        "CallbackSink",
        "Message",
        "QueueWorker",
        "RedisStreamSink",
        "RedisStreamSource",
        "S3Sink",
        "Sink",
        "Source",
        "SqsSink",
        "SqsSource",
        "WorkerHealth",
        "WorkerState",
        "WorkerStatistics",
        "read_object",
    ],
}


@pytest.mark.parametrize(
    "module",
    [
        mds,
        mds.testing,
        mds.fastapi,
        mds.flask,
        mds.batch,
        mds.prometheus,
        mds.grpc,
        mds.workers,
        mds.ray,
        mds.server,
    ],
)
def test_all_is_pinned(module: object) -> None:
    assert module.__all__ == EXPECTED[module.__name__]  # type: ignore[attr-defined]


def test_all_lists_exactly_the_exports() -> None:
    exported = {name for name in vars(mds) if not name.startswith("_")}
    # public submodules; the __future__ import
    exported -= {"testing", "fastapi", "flask", "batch", "prometheus", "grpc", "workers", "ray"}
    exported -= {"server"}
    exported -= {"annotations"}
    assert sorted(mds.__all__) == mds.__all__
    assert set(mds.__all__) - {"__version__"} == exported


@pytest.mark.parametrize(
    "module",
    [
        mds,
        mds.testing,
        mds.fastapi,
        mds.flask,
        mds.batch,
        mds.prometheus,
        mds.grpc,
        mds.workers,
        mds.ray,
        mds.server,
    ],
)
def test_every_export_reports_a_public_module(module: object) -> None:
    for name in module.__all__:  # type: ignore[attr-defined]
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ in PUBLIC_MODULES, f"{name} reports {obj.__module__}"


@pytest.mark.parametrize(
    "form", ["serve", "serve_sync", "serve_many", "serve_many_sync", "stream", "stream_sync"]
)
def test_the_runtime_serves_by_name_as_a_servable_does(form: str) -> None:
    # Runtime.<form>(name, ...) takes what Servable.<form>(...) takes, after the name.
    by_name = list(inspect.signature(getattr(mds.Runtime, form)).parameters.values())
    direct = list(inspect.signature(getattr(mds.Servable, form)).parameters.values())
    assert [p.name for p in by_name[:3]] == ["self", "model", direct[1].name]
    assert [(p.name, p.kind, p.default) for p in by_name[3:]] == [
        (p.name, p.kind, p.default) for p in direct[2:]
    ]


def test_every_exported_exception_derives_from_mds_error() -> None:
    for name in mds.__all__:
        obj = getattr(mds, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            assert issubclass(obj, mds.MdsError), name


def test_builtin_meanings_are_kept() -> None:
    assert issubclass(mds.ConfigError, ValueError)
    assert issubclass(mds.InvalidInput, ValueError)
    assert issubclass(mds.DeadlineExceeded, TimeoutError)
    assert issubclass(mds.MissingDependency, ImportError)
    assert issubclass(mds.ModelNotFound, LookupError)
    assert issubclass(mds.Overloaded, mds.Unavailable)
    assert issubclass(mds.NotReady, mds.Unavailable)


def test_the_version_is_the_changelogs_newest() -> None:
    changelog = Path(__file__).resolve().parent.parent / "docs" / "changelog.md"
    newest = re.search(r"^## (\S+)", changelog.read_text(), flags=re.M)
    assert newest is not None
    assert mds.__version__.split(".dev")[0] == newest[1]


def test_import_mds_loads_no_optional_dependency() -> None:
    code = (
        "import sys, mds, mds.testing, mds.prometheus, mds.grpc, mds.workers, mds.ray\n"
        "heavy = {'torch', 'onnxruntime', 'fastapi', 'flask', 'starlette', 'trio',\n"
        "         'tensorflow', 'pyarrow', 'prometheus_client', 'opentelemetry',\n"
        "         'grpc', 'tritonclient', 'google.protobuf', 'redis', 'boto3', 'botocore',\n"
        "         'ray'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=45
    )
    assert out.stdout.strip() == "[]"


def test_import_mds_changes_nothing_in_the_host() -> None:
    code = (
        "import logging, sys, threading, signal\n"
        "handlers = list(logging.getLogger().handlers)\n"
        "sigint = signal.getsignal(signal.SIGINT)\n"
        "threads = threading.active_count()\n"
        "import mds, mds.testing\n"
        "assert logging.getLogger().handlers == handlers\n"
        "assert logging.getLogger('mds').handlers == []\n"
        "assert signal.getsignal(signal.SIGINT) is sigint\n"
        "assert threading.active_count() == threads\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=45)


def test_a_missing_extra_names_the_install_command() -> None:
    from mds._deps import require

    with pytest.raises(mds.MissingDependency) as info:
        require("torch_that_does_not_exist", feature="the thing")
    assert "the thing needs the optional dependency 'torch_that_does_not_exist'" in str(info.value)
    assert "pip install torch_that_does_not_exist" in str(info.value)


def test_a_missing_torch_names_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # as if not installed\n"
        "from mds._demo import run_demo\n"
        "import mds\n"
        "try:\n"
        "    run_demo(requests=10, concurrency=1)\n"
        "except mds.MissingDependency as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=45
    )
    assert 'pip install "mds-serving[torch]"' in out.stdout


def test_the_package_ships_its_type_information() -> None:
    from importlib.resources import files

    assert files("mds").joinpath("py.typed").is_file()
