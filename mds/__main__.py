"""The command line: ``python -m mds demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run_demo

        try:
            run_demo(requests=args.requests, concurrency=args.concurrency)
        except MdsError as exc:
            print(f"mds demo: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
