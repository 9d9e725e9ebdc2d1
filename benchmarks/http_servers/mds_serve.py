"""(s) `mds serve` on a repository holding the benchmark MLP: the standalone server."""

from __future__ import annotations

import sys
from pathlib import Path

from mds.__main__ import main

if __name__ == "__main__":
    repository = Path(__file__).resolve().parent / "repository"
    flags = ["--port", sys.argv[1], "--log-level", "warning", *sys.argv[2:]]
    sys.exit(main(["serve", str(repository), *flags]))
