"""A model repository on disk: what a folder holds, read and checked, and the handler it makes.

::

    models/
      classifier/
        mds.yaml          # handler or backend, config, version policy
        1/model.onnx      # a version: an ONNX file, served with no code
        2/model.onnx
      scorer/
        mds.yaml          # handler: handler.py
        3/handler.py      # a Python handler, with its weights beside it
        3/weights.npz

A version folder is named by a number; any other name (``3.partial``,
``.tmp-3``) is ignored, so a deploy that copies into such a name and renames
it never shows a half-copied version. With ``ready_file`` set, a version
counts only once that file is in it.
"""

# No `from __future__ import annotations`: msgspec reads these annotations.

import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import msgspec.yaml

from .._config import ModelConfig, VersionPolicy, check_name, is_name, version_key
from .._errors import ConfigError
from .._handler import ModelHandler
from .._pipeline.loading import find_handler, resolve_handler
from .._tensors import TensorSpec

__all__ = [
    "CONFIG_FILE",
    "Folder",
    "ModelFolder",
    "ModelSpec",
    "VersionFolder",
    "factory",
    "read",
    "revise",
]

#: The file that makes a folder of the repository a model.
CONFIG_FILE = "mds.yaml"

Backend = Literal["python", "onnx", "torchscript", "torch_export", "tensorflow"]

#: The file (or folder) that says which backend serves a version, by name.
MODEL_FILES: dict[str, Backend] = {
    "model.onnx": "onnx",
    "model.pt": "torchscript",
    "model.pt2": "torch_export",
    "model.savedmodel": "tensorflow",
    "handler.py": "python",
}

_VERSION = re.compile(r"^[0-9]+$")


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A model's ``mds.yaml``.

    Attributes:
        handler: a Python handler: ``module:Class`` importable where mds
            runs, or a file in each version folder (``handler.py``, or
            ``handler.py:Class``). Without it, the version's files say.
        backend: ``onnx``, ``torchscript``, ``torch_export``,
            ``tensorflow`` or ``python``; without it, the version's model
            file says (``model.onnx``, ``model.pt``, ``model.pt2``,
            ``model.savedmodel/``, ``handler.py``).
        options: keyword arguments of the backend's handler
            (:class:`OnnxHandler`, :class:`TorchHandler`,
            :class:`TensorFlowHandler`).
        config: the :class:`ModelConfig` each version is served with.
        version_policy: which versions are loaded (latest 1 by default).
        ready_file: a version folder counts only once this file is in it.
        on_demand: load it on its first request, not at the start, and let
            it be unloaded when idle (see ``Runtime(max_resident_models=)``).
    """

    handler: str | None = None
    backend: Backend | None = None
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    config: ModelConfig = msgspec.field(default_factory=ModelConfig)
    version_policy: VersionPolicy = msgspec.field(default_factory=VersionPolicy)
    ready_file: str | None = None
    on_demand: bool = False


@dataclass(frozen=True)
class VersionFolder:
    """One complete version folder, and a stamp of its files (changes when they do)."""

    version: str
    path: Path
    stamp: tuple[tuple[str, int, int], ...]


@dataclass
class ModelFolder:
    """One model folder: its spec, its complete versions, and what is wrong with it."""

    name: str
    path: Path
    spec: ModelSpec | None
    stamp: tuple[int, int]  # the config file's size and mtime
    versions: dict[str, VersionFolder] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def wanted(self) -> list[VersionFolder]:
        """The versions its policy loads, oldest first."""
        if self.spec is None:
            return []
        keep = self.spec.version_policy.keeps(self.versions)
        return [self.versions[v] for v in sorted(keep, key=version_key)]


@dataclass
class Folder:
    """What a repository folder holds now: its models by name, and its problems."""

    path: Path
    models: dict[str, ModelFolder] = field(default_factory=dict)

    @property
    def problems(self) -> list[str]:
        return [p for model in self.models.values() for p in model.problems]


def read(root: Path) -> Folder:
    """Read and check every model under ``root``; a model's problems never stop the others'."""
    if not root.is_dir():
        raise ConfigError(f"{root}: the model repository is not a folder")
    found = Folder(root)
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        config = entry / CONFIG_FILE
        if not config.is_file():
            continue  # not a model folder (yet): its config file is written last
        found.models[entry.name] = _read_model(entry, config)
    return found


def _read_model(path: Path, config: Path) -> ModelFolder:
    stat = config.stat()
    model = ModelFolder(path.name, path, None, (stat.st_size, stat.st_mtime_ns))
    if not is_name(path.name):
        model.problems.append(f"{path}: {_bad_name(path.name)}")
        return model
    try:
        spec = msgspec.yaml.decode(config.read_bytes(), type=ModelSpec)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        model.problems.append(f"{config}: {exc}")
        return model
    except ConfigError as exc:
        model.problems.append(f"{config}: {exc}")
        return model
    return revise(model, spec)


def revise(model: ModelFolder, spec: ModelSpec) -> ModelFolder:
    """``model`` served by ``spec``: its complete versions, and its problems, read again."""
    revised = ModelFolder(model.name, model.path, spec, model.stamp)
    for entry in sorted(model.path.iterdir()):
        if not entry.is_dir() or not _VERSION.match(entry.name):
            continue
        if spec.ready_file is not None and not (entry / spec.ready_file).is_file():
            continue
        number = str(int(entry.name))
        if number in revised.versions:
            revised.problems.append(
                f"{entry}: version {number} is also {revised.versions[number].path.name}; "
                "keep one folder per version"
            )
            continue
        revised.versions[number] = VersionFolder(number, entry, _stamp(entry))
    if not revised.wanted():
        have = ", ".join(sorted(revised.versions, key=version_key)) or "none"
        revised.problems.append(
            f"{model.path}: no version to load: the version policy ({spec.version_policy}) "
            f"keeps none of the complete version folders (there are: {have})"
        )
    for wanted in revised.wanted():
        try:
            factory(revised, wanted)
        except ConfigError as exc:
            revised.problems.append(str(exc))
    return revised


def _bad_name(name: str) -> str:
    try:
        check_name(name)
    except ConfigError as exc:
        return str(exc)
    return ""


def _stamp(path: Path) -> tuple[tuple[str, int, int], ...]:
    files = []
    for folder, _, names in os.walk(path):
        for name in names:
            full = Path(folder, name)
            try:
                stat = full.stat()
            except OSError:  # removed while read: the next read sees it
                continue
            files.append((str(full.relative_to(path)), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(files))


def factory(model: ModelFolder, version: VersionFolder) -> Callable[[], ModelHandler[Any, Any]]:
    """What makes one of ``version``'s handlers; raises :class:`ConfigError` naming the file."""
    spec = model.spec
    assert spec is not None
    at = f"{version.path}"
    backend = spec.backend
    if spec.handler is not None:
        backend = "python"
    if backend is None:
        present = [name for name in MODEL_FILES if (version.path / name).exists()]
        if len(present) != 1:
            expected = ", ".join(MODEL_FILES)
            what = "has none" if not present else f"has several: {', '.join(present)}"
            raise ConfigError(
                f"{at}: a version folder needs one model file ({expected}); it {what}. "
                f"Or set handler or backend in {model.path / CONFIG_FILE}"
            )
        backend = MODEL_FILES[present[0]]
    options = dict(spec.options)
    if backend == "python":
        return _python(spec.handler or "handler.py", model, version, options)
    file = next(name for name, kind in MODEL_FILES.items() if kind == backend)
    source = version.path / file
    if not source.exists():
        raise ConfigError(f"{at}: backend {backend!r} serves {file}, which is not there")
    if "inputs" in options:
        try:
            options["inputs"] = msgspec.convert(options["inputs"], list[TensorSpec])
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{model.path / CONFIG_FILE}: options.inputs: {exc}") from None
    make = _backend(backend, source, options)
    try:
        make()  # the backends' constructors check their options and load nothing
    except TypeError as exc:
        raise ConfigError(f"{model.path / CONFIG_FILE}: options: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{model.path / CONFIG_FILE}: options: {exc}") from None
    return make


def _backend(backend: Backend, source: Path, options: dict[str, Any]) -> Callable[[], Any]:
    if backend == "onnx":
        from .._backends.onnx_handler import OnnxHandler

        return lambda: OnnxHandler(source, **options)
    if backend in ("torchscript", "torch_export"):
        from .._backends.torch_handler import TorchHandler

        if backend == "torchscript":
            return lambda: TorchHandler(torchscript=source, **options)
        return lambda: TorchHandler(exported=source, **options)
    from .._backends.tf_handler import TensorFlowHandler

    return lambda: TensorFlowHandler(source, **options)


def _python(
    handler: str, model: ModelFolder, version: VersionFolder, options: dict[str, Any]
) -> Callable[[], ModelHandler[Any, Any]]:
    """A Python handler: in a file of the version folder, or importable by name."""
    file, _, attr = handler.partition(":")
    at = f"{model.path / CONFIG_FILE}: handler {handler!r}"
    if file.endswith(".py"):
        path = version.path / file
        if not path.is_file():
            raise ConfigError(f"{at}: {path} is not there")
        module = _import_file(path, f"mds_repository.{model.name}.v{version.version}")
        found = _attribute(module, attr, at) if attr else find_handler(module, str(path), at)
    else:
        found = resolve_handler(handler, at)
    if isinstance(found, ModelHandler):
        instance = found
        return lambda: instance
    takes_path = _takes(found, "path")
    if takes_path:
        return lambda: found(path=version.path, **options)
    if options:
        return lambda: found(**options)
    return found  # type: ignore[no-any-return]


def _attribute(module: Any, name: str, at: str) -> Any:
    try:
        return getattr(module, name)
    except AttributeError:
        raise ConfigError(f"{at}: {module.__file__} has no {name!r}") from None


def _takes(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


# Each file's module, with the size and time it was imported at: one per file.
_imported: dict[Path, tuple[int, int, Any]] = {}


def _import_file(path: Path, name: str) -> Any:
    """The module in ``path``, imported under ``name`` (each version its own), once per change."""
    stat = path.stat()
    key = path.resolve()
    found = _imported.get(key)
    if found is not None and found[:2] == (stat.st_size, stat.st_mtime_ns):
        return found[2]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: cannot be imported as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ConfigError(f"{path}: importing it failed: {type(exc).__name__}: {exc}") from exc
    _imported[key] = (stat.st_size, stat.st_mtime_ns, module)
    return module
