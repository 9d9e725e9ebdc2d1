"""HTTP serving: mds in FastAPI against plain FastAPI, LitServe and Mosec.

One small torch MLP (256 -> 1024 -> 1024 -> 16, one torch thread), a JSON
body {"x": [256 floats]}, batches of at most 32 with a 2 ms delay. Each server
runs pinned to core 0 (taskset, its children too); wrk runs on core 1 with a
Lua POST script, at 1, 64 and 256 connections, one server after another in
the same run:

  (a1) mds: the route mds.fastapi.add_routes adds (POST /models/mlp/infer)
  (a2) mds: the app's own async def route that awaits mds.serve
  (b)  plain FastAPI: an async def route calling the model per request
  (c)  LitServe, same batch settings      (own venv, made on first run)
  (d)  Mosec, same batch settings         (own venv, made on first run)

Needs wrk (apt-get install wrk) and two cores. Run:

    python benchmarks/transports.py [--duration 10] [--quick] [--skip-peers]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVERS = HERE / "http_servers"
VENVS = Path(os.environ.get("MDS_BENCH_VENVS", HERE / ".venvs"))
PEERS = {
    "litserve": ["torch==2.13.0", "numpy", "litserve", "uvloop", "httptools"],
    "mosec": ["torch==2.13.0", "numpy", "mosec", "msgspec"],
}
LEVELS = (1, 64, 256)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peer_python(name: str) -> Path:
    venv = VENVS / name
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"making a venv for {name} in {venv} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEERS[name]], check=True)
    return python


def start(python: Path | str, script: str, port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=f"{SERVERS}{os.pathsep}{HERE.parent}")
    return subprocess.Popen(
        ["taskset", "-c", "0", str(python), str(SERVERS / script), str(port)],
        cwd=SERVERS,
        env=env,
        start_new_session=True,  # so that stopping it stops its children too
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def stop(server: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    except ProcessLookupError:
        pass


def post(url: str, body: bytes) -> bytes:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read()


def wait_ready(server: subprocess.Popen[bytes], url: str, body: bytes) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            err = server.stderr.read().decode() if server.stderr else ""
            raise RuntimeError(f"the server exited ({server.returncode}):\n{err[-3000:]}")
        try:
            post(url, body)
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within 180 s")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url: str, script: Path, connections: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    found: dict[str, float] = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])}
    for pct in ("50", "99"):
        match = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        found[f"p{pct}"] = float(match[1]) * _UNITS[match[2]] if match else float("nan")
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors:.*", out)
    found["errors"] = float(errors[1]) if errors else 0.0
    if socket_errors:
        print(f"      ({socket_errors[0].strip()})")
    return found


def batch_sizes(base: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{base}/statistics", timeout=5) as response:
        return {k: int(v) for k, v in json.load(response)["mlp"]["batch_sizes"].items()}


def mean_batch(before: dict[str, int], after: dict[str, int]) -> float:
    counts = {int(k): after.get(k, 0) - before.get(k, 0) for k in after}
    batches = sum(counts.values())
    return sum(k * n for k, n in counts.items()) / batches if batches else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    parser.add_argument("--quick", action="store_true", help="2 s per level")
    parser.add_argument("--skip-peers", action="store_true", help="no LitServe or Mosec")
    args = parser.parse_args()
    seconds = 2.0 if args.quick else args.duration
    if shutil.which("wrk") is None:
        sys.exit("this benchmark needs wrk: apt-get install wrk")
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("this benchmark needs two cores: the server on one, wrk on the other")

    body = json.dumps({"x": [0.5] * 256}).encode()
    script = Path(tempfile.mkdtemp()) / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{body.decode()}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    targets: list[tuple[str, Path | str, str, str]] = [
        ("a1 mds adapter route", sys.executable, "mds_app.py", "/models/mlp/infer"),
        ("a2 mds in own route", sys.executable, "mds_app.py", "/predict"),
        ("b  plain FastAPI", sys.executable, "plain_app.py", "/predict"),
    ]
    if not args.skip_peers:
        targets += [
            ("c  LitServe", peer_python("litserve"), "litserve_app.py", "/predict"),
            ("d  Mosec", peer_python("mosec"), "mosec_app.py", "/inference"),
        ]

    results: dict[str, dict[int, dict[str, float]]] = {}
    batches: dict[str, dict[int, float]] = {}
    for label, python, app, path in targets:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = start(python, app, port)
        try:
            wait_ready(server, base + path, body)
            print(f"{label}: warming up ...", flush=True)
            wrk(base + path, script, 64, min(3.0, seconds))
            results[label] = {}
            for level in LEVELS:
                before = batch_sizes(base) if label.startswith("a") else {}
                results[label][level] = found = wrk(base + path, script, level, seconds)
                if label.startswith("a"):
                    batches.setdefault(label, {})[level] = mean_batch(before, batch_sizes(base))
                print(
                    f"   {level:>3} clients: {found['rps']:8.0f} req/s  p50 {found['p50']:6.2f} ms"
                    f"  p99 {found['p99']:6.2f} ms  errors {found['errors']:.0f}",
                    flush=True,
                )
        finally:
            stop(server)

    print()
    print(f"{'server':<22}" + "".join(f"{f'{n} clients':>30}" for n in LEVELS))
    for label, by_level in results.items():
        cells = "".join(
            "{:>30}".format(f"{r['rps']:.0f}/s p50 {r['p50']:.2f} p99 {r['p99']:.2f}")
            for r in by_level.values()
        )
        print(f"{label:<22}{cells}")
    for label, by_level in batches.items():
        sizes = ", ".join(f"{n} clients: {b:.1f}" for n, b in by_level.items())
        print(f"mean batch size, {label.split(' ', 1)[1]}: {sizes}")
    print()
    plain = results["b  plain FastAPI"]
    for label in ("a1 mds adapter route", "a2 mds in own route"):
        mine = results[label]
        print(f"{label}:")
        print(
            f"   64 clients: {mine[64]['rps'] / plain[64]['rps']:.2f}x plain FastAPI (target >= 2x)"
        )
        if "d  Mosec" in results:
            mosec = results["d  Mosec"]
            print(f"   64 clients: {mine[64]['rps'] / mosec[64]['rps']:.2f}x Mosec (target > 1x)")
        if "c  LitServe" in results:
            lit = results["c  LitServe"]
            print(f"   64 clients: {mine[64]['rps'] / lit[64]['rps']:.2f}x LitServe")
        print(
            f"    1 client:  p50 {mine[1]['p50'] / plain[1]['p50']:.2f}x plain FastAPI's"
            " (target <= 1.10x)"
        )


if __name__ == "__main__":
    main()
