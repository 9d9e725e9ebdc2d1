"""HTTP serving: mds in FastAPI against plain FastAPI, LitServe and Mosec.

One small torch MLP (256 -> 1024 -> 1024 -> 16, one torch thread), a JSON
body {"x": [256 floats]}, batches of at most 32 with a 2 ms delay. Each server
runs pinned to core 0 (taskset, its children too); wrk runs on core 1 with a
Lua POST script, at 1, 64 and 256 connections, in the same run. (s), (a1)-(a4),
(b), (f) and (d) are measured in interleaved rounds (medians quoted),
so that the machine's drift falls on them alike: the mds servers, plain
FastAPI and the floor run side by side, Mosec is started afresh for each of
its runs; LitServe follows alone, one run per level:

  (s)  mds serve: the standalone server on a repository holding the model
  (a1) mds: the route mds.fastapi.add_routes adds (POST /models/mlp/infer)
  (a2) mds: the app's own async def route that awaits mds.serve
  (a3) mds: mds.server.app mounted in the same FastAPI app (/lean/...)
  (a4) mds: the app's own route as a plain Starlette route (app.add_route)
       (the FastAPI app calls gc.freeze() once its models are loaded, as
       mds serve does: see benchmarks/README.md)
  (b)  plain FastAPI: an async def route calling the model per request
  (f)  the floor: a bare ASGI app awaiting runtime.serve (no router, no
       headers, no error table): what any route over mds costs at least
  (c)  LitServe, same batch settings      (own venv, made on first run)
  (d)  Mosec, same batch settings         (own venv, made on first run)

Needs wrk (apt-get install wrk) and two cores. Run:

    python benchmarks/transports.py [--duration 10] [--rounds 5] [--quick] [--skip-peers]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
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


#: Servers started afresh for each run (see main).
FRESH = {"mosec_app.py"}


def up(python: Path | str, app: str, path: str, body: bytes) -> tuple[subprocess.Popen[bytes], str]:
    """``app`` started on a free port and answering; the process and its base URL."""
    port = free_port()
    server, base = start(python, app, port), f"http://127.0.0.1:{port}"
    wait_ready(server, base + path, body)
    return server, base


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


def wrk(
    url: str, script: Path, connections: int, seconds: float, cores: str = "1"
) -> dict[str, float]:
    command = ["taskset", "-c", cores, "wrk", f"-t{len(cores.split(','))}", f"-c{connections}"]
    command += [f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "10s"]
    command += ["-s", str(script), url]
    for _ in range(3):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0:
            break
        # wrk fails now and then when it cannot open its connections in time.
        print(f"      (wrk exited {done.returncode}: {done.stderr.strip()[-200:]}; again)")
        time.sleep(1.0)
    else:
        done.check_returncode()
    out = done.stdout
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


def batch_count(before: dict[str, int], after: dict[str, int]) -> dict[int, int]:
    """Batches formed between two readings of the statistics, by size."""
    return {int(k): after.get(k, 0) - before.get(k, 0) for k in after}


def mean_size(counts: dict[int, int]) -> float:
    batches = sum(counts.values())
    return sum(k * n for k, n in counts.items()) / batches if batches else 0.0


def median_of(found: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the rounds (errors: their sum)."""
    merged = {key: statistics.median(f[key] for f in found) for key in found[0]}
    merged["errors"] = sum(f["errors"] for f in found)
    return merged


def post_script() -> tuple[bytes, Path]:
    """The benchmark's JSON body, and a wrk Lua script that POSTs it."""
    body = json.dumps({"x": [0.5] * 256}).encode()
    script = Path(tempfile.mkdtemp()) / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{body.decode()}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return body, script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds per level and server, in all"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per level")
    parser.add_argument("--quick", action="store_true", help="2 s per level")
    parser.add_argument("--skip-peers", action="store_true", help="no LitServe or Mosec")
    args = parser.parse_args()
    seconds = 2.0 if args.quick else args.duration
    if args.quick:
        args.rounds = 1
    if shutil.which("wrk") is None:
        sys.exit("this benchmark needs wrk: apt-get install wrk")
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("this benchmark needs two cores: the server on one, wrk on the other")

    body, script = post_script()
    # Servers in one group run side by side (each pinned to core 0, idle
    # while another is measured) and are measured in interleaved rounds: the
    # machine's drift then falls on all of them alike. Medians of the rounds.
    groups: list[list[tuple[str, Path | str, str, str]]] = [
        [
            ("s  mds serve", sys.executable, "mds_serve.py", "/models/mlp/infer"),
            ("a1 mds adapter route", sys.executable, "mds_app.py", "/models/mlp/infer"),
            ("a2 mds in own route", sys.executable, "mds_app.py", "/predict"),
            ("a3 mds app mounted", sys.executable, "mds_app.py", "/lean/models/mlp/infer"),
            ("a4 mds in own Starlette route", sys.executable, "mds_app.py", "/predict-plain"),
            ("b  plain FastAPI", sys.executable, "plain_app.py", "/predict"),
            ("f  floor: bare ASGI", sys.executable, "floor_app.py", "/"),
        ]
    ]
    if not args.skip_peers:
        # Mosec in the interleaved rounds, so that the machine's drift does not
        # fall between mds serve and it; started afresh for each run, since
        # after idling through the others' rounds it refused connections at
        # 256 clients. LitServe, far slower, alone.
        groups[0].append(("d  Mosec", peer_python("mosec"), "mosec_app.py", "/inference"))
        groups.append([("c  LitServe", peer_python("litserve"), "litserve_app.py", "/predict")])

    runs: dict[str, dict[int, list[dict[str, float]]]] = {}
    counted: dict[str, dict[int, dict[int, int]]] = {}
    for group in groups:
        servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        try:
            for _, python, app, path in group:
                if app not in servers and app not in FRESH:
                    servers[app] = up(python, app, path, body)
            for label, _, app, path in group:
                if app not in FRESH:
                    print(f"{label}: warming up ...", flush=True)
                    wrk(servers[app][1] + path, script, 64, min(3.0, seconds))
            # A server alone has nothing to interleave with: one run per level.
            rounds = args.rounds if len(group) > 1 else 1
            for level in LEVELS:
                for _ in range(rounds):
                    for label, python, app, path in group:
                        if app in FRESH:
                            servers[app] = up(python, app, path, body)
                            wrk(servers[app][1] + path, script, 64, 2.0)  # warm
                        base = servers[app][1]
                        mds_server = label.startswith(("a", "s"))
                        before = batch_sizes(base) if mds_server else {}
                        found = wrk(base + path, script, level, seconds / rounds)
                        if app in FRESH:
                            stop(servers.pop(app)[0])
                        runs.setdefault(label, {}).setdefault(level, []).append(found)
                        if mds_server:
                            sizes = counted.setdefault(label, {}).setdefault(level, {})
                            for size, n in batch_count(before, batch_sizes(base)).items():
                                sizes[size] = sizes.get(size, 0) + n
                for label, *_ in group:
                    found = median_of(runs[label][level])
                    print(
                        f"   {label}  {level:>3} clients: {found['rps']:8.0f} req/s"
                        f"  p50 {found['p50']:6.2f} ms  p99 {found['p99']:6.2f} ms"
                        f"  errors {found['errors']:.0f}",
                        flush=True,
                    )
        finally:
            for server, _ in servers.values():
                stop(server)
    results = {
        label: {level: median_of(found) for level, found in by_level.items()}
        for label, by_level in runs.items()
    }
    batches = {
        label: {level: mean_size(sizes) for level, sizes in by_level.items()}
        for label, by_level in counted.items()
    }

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

    def paired(label: str, level: int, key: str) -> float:
        """The median of each round's ratio to plain FastAPI (measured a moment apart)."""
        pairs = zip(runs[label][level], runs["b  plain FastAPI"][level], strict=True)
        return statistics.median(mine[key] / plain[key] for mine, plain in pairs)

    served = results["s  mds serve"]
    for label in (
        "s  mds serve",
        "a1 mds adapter route",
        "a2 mds in own route",
        "a3 mds app mounted",
        "a4 mds in own Starlette route",
    ):
        mine = results[label]
        print(f"{label}:")
        print(f"   64 clients: {paired(label, 64, 'rps'):.2f}x plain FastAPI (target >= 2x)")
        if "d  Mosec" in results:
            mosec = results["d  Mosec"]
            target = "1.5x" if label.startswith("s") else "1x"
            for level in (64, 256):
                rps = mine[level]["rps"] / mosec[level]["rps"]
                p99 = mine[level]["p99"] / mosec[level]["p99"]
                print(
                    f"   {level} clients: {rps:.2f}x Mosec's req/s (target >= {target}); "
                    f"p99 {p99:.2f}x Mosec's (target <= 1x for mds serve)"
                )
        if not label.startswith("s"):
            share = mine[64]["rps"] / served[64]["rps"]
            print(f"   64 clients: {share:.2f}x mds serve's req/s (target >= 0.8x)")
        floor = results["f  floor: bare ASGI"]
        shares = ", ".join(
            f"{mine[level]['rps'] / floor[level]['rps']:.2f}x at {level}" for level in (64, 256)
        )
        print(f"   the floor's req/s (a bare ASGI app awaiting runtime.serve): {shares}")
        if "c  LitServe" in results:
            lit = results["c  LitServe"]
            print(f"   64 clients: {mine[64]['rps'] / lit[64]['rps']:.2f}x LitServe")
        print(
            f"    1 client:  p50 {paired(label, 1, 'p50'):.2f}x plain FastAPI's (target <= 1.10x)"
        )
    print("(ratios to plain FastAPI: medians of each round's ratio; to the peers: of the medians)")


if __name__ == "__main__":
    main()
