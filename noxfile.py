"""Sessions: tests (core only), tests_extras, tests_tensorflow, lint, types, docs, examples.

Sessions install the built package, not the source tree, so tests see what
users get. Run all with ``nox``, one with ``nox -s lint``.
"""

from __future__ import annotations

import nox

nox.options.sessions = [
    "tests",
    "tests_extras",
    "tests_tensorflow",
    "lint",
    "types",
    "docs",
    "examples",
]
nox.options.default_venv_backend = "venv"

PYTHON = "3.11"
# On the project's machines torch comes from a local CPU wheel; pin it so pip
# never reaches for a multi-GB CUDA build.
TORCH = "torch==2.13.0"


def install(session: nox.Session, extras: str, *extra: str) -> None:
    session.install(f".[{extras}]", *extra)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The suite with the core dependencies only: optional parts skip."""
    install(session, "test")
    session.run("pytest", *session.posargs)


#: What each extra's session installs beside it: torch pinned; onnx builds
#: the ONNX test model (no torch needed); uvicorn serves the FastAPI app.
EXTRA_PINS = {
    "torch": [TORCH],
    "onnx": ["onnx>=1.16"],
    "fastapi": ["uvicorn"],
    "flask": [],
    "arrow": [],
    "metrics": [],
    "tracing": [],
    "grpc": [],
    "redis": [],
    "sqs": [],
    # Ray Serve's replicas are FastAPI apps on uvicorn.
    "ray": ["uvicorn"],
    "server": [],
}


@nox.session(python=PYTHON)
@nox.parametrize("extra", list(EXTRA_PINS))
def tests_extras(session: nox.Session, extra: str) -> None:
    """The suite with one optional dependency at a time: its own tests run, the others skip."""
    install(session, f"test,{extra}", *EXTRA_PINS[extra])
    session.run("pytest", "-rs", *session.posargs)


@nox.session(python=PYTHON)
def tests_tensorflow(session: nox.Session) -> None:
    """The TensorFlow backend's tests with that extra alone.

    Not one of ``tests_extras``: TensorFlow is a large install, and the rest of
    the suite never imports it, so running all of it again here would only
    repeat the ``tests`` session. ``import mds`` staying light is checked too.
    """
    install(session, "test,tensorflow")
    session.run(
        "pytest", "-rs", "tests/backends/test_tensorflow.py", "tests/test_public_api.py",
        *session.posargs,
    )  # fmt: skip


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "mds", "tests", "examples", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "mds", "tests", "examples", "benchmarks", "noxfile.py")


@nox.session(python=PYTHON)
def types(session: nox.Session) -> None:
    """mypy --strict on the package and on the user-side typing checks."""
    # The adapters are checked against the real frameworks' types.
    install(session, "test,fastapi,flask,metrics,tracing,grpc,redis,sqs,server", "mypy>=1.11")
    session.run("mypy")
    session.run("mypy", "--strict", "tests/typing")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the docs site (API reference from docstrings); warnings fail."""
    install(session, "all,docs", TORCH)
    session.run("mkdocs", "build", "--strict", "--site-dir", str(session.create_tmp() + "/site"))


@nox.session(python=PYTHON)
def examples(session: nox.Session) -> None:
    """Run every example (the app examples over real HTTP) and the README's code."""
    install(session, "all,test,examples", TORCH, "uvicorn")
    session.run("pytest", "tests/test_examples.py", *session.posargs)
