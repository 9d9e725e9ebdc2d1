"""mds/ reads as layers: each module imports only from its own layer or those below."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mds"

#: Lowest first. A module may import modules of its own layer or of a lower one.
LAYERS: list[tuple[str, set[str]]] = [
    (
        "leaves: errors, the loop, exit, threads, dependencies, tensors, logs, tracing, requests",
        {
            "_errors",
            "_version",
            "_deps",
            "_loop",
            "_exit",
            "_threads",
            "_tensors",
            "_deprecation",
            "_logs",
            "_tracing",
            "_request",
        },
    ),
    ("calls into a loop from elsewhere", {"_bridge"}),
    ("devices, config, collation", {"_devices", "_config", "_collate"}),
    ("the handler, and what a stateful one sees", {"_handler", "_stateful"}),
    ("what callers read, backends", {"_status", "_backends"}),
    ("batching", {"_batching"}),
    ("one instance, per-request steps, counters", {"_instance", "_steps", "_statistics"}),
    ("a model's instances, a stateful model's sequences", {"_instances", "_sequences"}),
    ("the servable contract, a model, named tensors", {"_servable", "_model", "_named"}),
    ("a model's versions", {"_versions"}),
    ("pipelines", {"_pipeline"}),
    (
        "the runtime, mds.serve",
        {"_runtime", "_by_name", "_current", "_hosting", "_managing", "_residency"},
    ),
    ("the model repository", {"_repository"}),
    ("the Open Inference Protocol, apart from its transports", {"_oip"}),
    (
        "transports, public namespaces",
        {
            "_http",
            "_grpc",
            "_batch",
            "_workers",
            "workers",
            "_ray",
            "ray",
            "_metrics",
            "batch",
            "fastapi",
            "flask",
            "grpc",
            "server",
            "prometheus",
            "testing",
            "_demo",
        },
    ),
    ("the package and the command line", {"__init__", "__main__", "_server_command"}),
]
LEVEL = {name: level for level, (_, names) in enumerate(LAYERS) for name in names}


def top(module: str) -> str:
    """The first part of ``mds.<part>...``, for the layer table."""
    return module.split(".")[1] if module.count(".") else "__init__"


def imports(path: Path) -> list[tuple[int, str]]:
    """``(line, mds.module)`` for each import of mds's own modules in ``path``."""
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(relative.parts[:-1]) if relative.name != "__init__" else list(relative.parts)
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            found += [(node.lineno, name) for name in names if name.startswith("mds")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("mds")]
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    names = {top("mds." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)) for p in MODULES}
    assert names - {"__init__"} <= set(LEVEL), sorted(names - set(LEVEL))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_downwards(path: Path) -> None:
    module = "mds." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    own = LEVEL[top(module.removesuffix(".__init__"))]
    upward = [
        f"line {line}: {name} ({LAYERS[LEVEL[top(name)]][0]})"
        for line, name in imports(path)
        if name != "mds" and LEVEL.get(top(name), -1) > own
    ]
    assert not upward, f"{module} ({LAYERS[own][0]}) imports upwards: " + "; ".join(upward)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_long(path: Path) -> None:
    # A module holds one concept; past this, it probably holds two.
    assert len(path.read_text().splitlines()) <= 650
