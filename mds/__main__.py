"""The command line: mds demo, pipeline show, batch, repository check."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ._errors import MdsError
from ._version import __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mds`` command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="mds", description="mds: embeddable model serving.")
    parser.add_argument("--version", action="version", version=f"mds {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="serve a real model through the whole lifecycle and print what happens"
    )
    demo.add_argument("--requests", type=int, default=3000, help="requests to send (default 3000)")
    demo.add_argument("--concurrency", type=int, default=64, help="concurrent callers (default 64)")
    pipeline = commands.add_parser("pipeline", help="work with pipeline files")
    pipeline_commands = pipeline.add_subparsers(dest="pipeline_command", required=True)
    show = pipeline_commands.add_parser(
        "show", help="check a pipeline file and print its graph (text, Mermaid or DOT)"
    )
    show.add_argument("file", help="the pipeline's YAML file")
    show.add_argument(
        "--format",
        choices=("text", "mermaid", "dot"),
        default="text",
        help="text (default), a Mermaid flowchart, or Graphviz DOT",
    )
    show.add_argument("--output", "-o", help="write to this file instead of printing")
    repository = commands.add_parser("repository", help="work with model repositories")
    repository_commands = repository.add_subparsers(dest="repository_command", required=True)
    check = repository_commands.add_parser(
        "check",
        help="read and check a model repository without serving it: every model's config, "
        "versions and model files",
    )
    check.add_argument("path", help="the repository's folder")
    from ._batch.command import add_arguments, run_command

    add_arguments(
        commands.add_parser(
            "batch",
            help="serve every row of a file through a model or pipeline, resumable",
            description="Serve every row of INPUT through a handler or a pipeline, writing "
            "the responses to the folder OUTPUT in committed parts; --resume continues a "
            "run that was stopped or killed.",
        )
    )
    from . import _server_command as server

    server.add_arguments(
        commands.add_parser(
            "serve",
            help="serve every model of a model repository over HTTP (and gRPC)",
            description="Serve every model of the model repository REPOSITORY over mds's "
            "JSON routes and the Open Inference Protocol, until SIGTERM, which drains. Each "
            "flag may also come from MDS_SERVE_<FLAG> or a --config file.",
        )
    )
    from ._workers import command as worker_command

    worker_command.add_arguments(
        commands.add_parser(
            "worker",
            help="serve a queue's messages through a model or pipeline (SQS, Redis Streams)",
            description="Serve the messages of the queue the WORKER file names through a "
            "handler or a pipeline, writing each result to its sink; SIGTERM drains.",
        )
    )
    args = parser.parse_args(argv)
    if args.command == "batch":
        return run_command(args)
    if args.command == "serve":
        return server.run_command(args)
    if args.command == "worker":
        return worker_command.run_command(args)
    if args.command == "repository":
        return _check_repository(args.path)
    if args.command == "pipeline":
        return _show_pipeline(args.file, args.format, args.output)
    if args.command == "demo":
        from ._demo import run_demo

        try:
            run_demo(requests=args.requests, concurrency=args.concurrency)
        except MdsError as exc:
            print(f"mds demo: {exc}", file=sys.stderr)
            return 1
    return 0


def _check_repository(path: str) -> int:
    from ._repository.layout import read

    try:
        folder = read(Path(path))
    except MdsError as exc:
        print(f"mds repository: {exc}", file=sys.stderr)
        return 1
    for name, model in folder.models.items():
        if model.problems:
            print(f"{name}: {_count(len(model.problems), 'problem')}")
            for problem in model.problems:
                print(f"  - {problem}")
            continue
        assert model.spec is not None
        wanted = ", ".join(v.version for v in model.wanted()) or "none"
        print(f"{name}: loads version {wanted} (policy: {model.spec.version_policy})")
    problems = folder.problems
    if not folder.models:
        print(f"mds repository: {path} has no model (a folder with mds.yaml)", file=sys.stderr)
        return 1
    if problems:
        print(f"mds repository: {_count(len(problems), 'problem')} in {path}", file=sys.stderr)
        return 1
    print(f"{path}: {_count(len(folder.models), 'model')}, no problems")
    return 0


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _show_pipeline(file: str, form: str, output: str | None) -> int:
    import warnings

    from ._pipeline.graph import Pipeline

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pipeline = Pipeline.load(file)
        except MdsError as exc:
            print(f"mds pipeline: {exc}", file=sys.stderr)
            return 1
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    drawn = {"text": pipeline.to_text, "mermaid": pipeline.to_mermaid, "dot": pipeline.to_dot}
    text = drawn[form]() + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        with open(output, "w", encoding="utf-8") as out:
            out.write(text)
        print(f"wrote the {form} drawing of pipeline {pipeline.name!r} to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
