"""How `mds serve` scales with worker processes, simulated on two cores.

    python benchmarks/server_workers.py     (about 3 minutes; needs wrk and two cores)

The transports benchmark's model and body (the benchmark MLP, batches of at
most 32, 2 ms delay), 64 connections a worker, in interleaved rounds
(medians):

- 1 worker pinned to core 0, wrk on core 1 (the transports benchmark's setup);
- 2 workers, the server pinned to cores 0-1 together, wrk (128 connections)
  on the same two cores.

With wrk sharing the cores in the second, requests/s alone do not tell the
scaling; what does is the server's CPU per request (every process of the
server, read from /proc), and so the requests/s per core of server CPU. If
that rate holds from 1 worker to 2, N workers on N free cores serve about N
times one worker's requests/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from transports import SERVERS, free_port, post_script, stop, wait_ready, wrk

HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")


def start(workers: int, cores: str, port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=f"{SERVERS}{os.pathsep}{HERE.parent}")
    command = [sys.executable, str(SERVERS / "mds_serve.py"), str(port), "--workers", str(workers)]
    return subprocess.Popen(
        ["taskset", "-c", cores, *command],
        cwd=SERVERS,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def cpu_seconds(group: int) -> float:
    """User and system CPU of every live process in the process group ``group``."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == group:  # pgrp
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def batches(base: str) -> tuple[float, float]:
    """The sum and count of the batch-size histogram, added up over the workers (/metrics)."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = [0.0, 0.0]
    for line in text.splitlines():
        for i, name in enumerate(("mds_batch_size_sum{", "mds_batch_size_count{")):
            if line.startswith(name) and 'model="mlp"' in line:
                found[i] += float(line.rsplit(" ", 1)[1])
    return found[0], found[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per round and setup")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("this benchmark needs two cores")
    body, script = post_script()
    setups = {"1 worker, core 0": (1, "0", "1"), "2 workers, cores 0-1": (2, "0,1", "0,1")}
    servers = {}
    try:
        for name, (workers, cores, _) in setups.items():
            port = free_port()
            servers[name] = (start(workers, cores, port), f"http://127.0.0.1:{port}")
            wait_ready(servers[name][0], servers[name][1] + "/models/mlp/infer", body)
        url = "/models/mlp/infer"
        for name, (_, _, load_cores) in setups.items():  # warm every worker's path
            wrk(servers[name][1] + url, script, 64, 3.0, cores=load_cores)
        results: dict[str, list[tuple[float, ...]]] = {name: [] for name in setups}
        for _ in range(args.rounds):
            for name, (_, _, load_cores) in setups.items():
                server, base = servers[name]
                sized = batches(base)
                before = cpu_seconds(server.pid)
                began = time.perf_counter()
                connections = 64 * setups[name][0]  # 64 a worker: the same load on each
                found = wrk(base + url, script, connections, args.seconds, cores=load_cores)
                elapsed = time.perf_counter() - began
                used = cpu_seconds(server.pid) - before
                total, count = (b - a for a, b in zip(sized, batches(base), strict=True))
                per_core = found["rps"] / (used / elapsed)
                results[name].append(
                    (found["rps"], found["p99"], used / elapsed, per_core, total / max(count, 1))
                )
    finally:
        for server, _ in servers.values():
            stop(server)
    rounds = f"{args.rounds} rounds of {args.seconds:.0f} s"
    print(f"mds serve, 64 connections a worker, {rounds} (medians):")
    print(f"{'':24}{'req/s':>9}{'p99 ms':>9}{'server cores':>14}{'req/s per core':>16}{'batch':>7}")
    for name, rows in results.items():
        m = [statistics.median(r[i] for r in rows) for i in range(5)]
        print(f"{name:24}{m[0]:9,.0f}{m[1]:9.1f}{m[2]:14.2f}{m[3]:16,.0f}{m[4]:7.1f}")
    one, two = (results[name] for name in setups)
    kept = statistics.median(b[3] / a[3] for a, b in zip(one, two, strict=True))
    print(
        f"requests/s per core of server CPU, 2 workers against 1: {kept:.2f}x "
        f"(so N workers on N free cores: about {kept:.2f} x N x one worker's requests/s)"
    )


if __name__ == "__main__":
    main()
