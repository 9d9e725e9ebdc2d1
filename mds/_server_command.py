"""``mds serve``: its flags, one per :class:`mds.server.ServerConfig` field, and its run."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._errors import MdsError
from .server import ServerConfig, load_config, run

__all__ = ["add_arguments", "run_command"]


_HELP = {
    "host": "the address to listen on (default 127.0.0.1)",
    "port": "the HTTP port (default 8000)",
    "workers": "worker processes, each with its own runtime (default 1)",
    "grpc_port": "also serve Triton's gRPC service on this port",
    "prefix": "a path prefix for every route",
    "load": "background (default): listen at once; wait: once every model is ready",
    "watch": "read the repository every this many seconds and apply what changed",
    "repository_routes": "add the protocol's repository routes (no auth: only behind yours)",
    "metrics": "serve GET /metrics (default on)",
    "status_page": "serve GET /status",
    "drain_timeout": "on SIGTERM, seconds requests in flight may take (default 30)",
    "max_body_bytes": "the largest request body, in bytes (default 64 MiB)",
    "log_level": "debug, info (default), warning or error",
    "access_log": "log every request",
    "http_server": "auto (default: uvicorn if installed, else granian), granian or uvicorn",
}


def add_arguments(parser: Any) -> None:
    """The ``mds serve`` flags: one per :class:`ServerConfig` field."""
    parser.add_argument("repository", nargs="?", help="the model repository's folder")
    parser.add_argument("--config", help="a YAML file of settings (see ServerConfig)")
    defaults = ServerConfig(repository=".")
    for name in ServerConfig.__struct_fields__:
        if name == "repository":
            continue
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=_HELP[name])
        else:
            parser.add_argument(flag, help=_HELP[name])


def run_command(args: Any) -> int:
    """Run ``mds serve`` with parsed ``args``; the exit status."""
    flags = {name: getattr(args, name, None) for name in ServerConfig.__struct_fields__}
    try:
        config = load_config(flags, file=args.config)
        run(config)
    except MdsError as exc:
        print(f"mds serve: {exc}", file=sys.stderr)
        return 1
    return 0
