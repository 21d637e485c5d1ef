"""
How monedge's throughput scales with C{--workers N} on this machine.

    .venv/bin/python bench/workers.py [--workers 1,2] [--rounds 2]

Starts the bench upstream (bench/upstream.py, one process) and, for each N,
monedge with C{--workers N} (N = 1 is the plain single process) and its
access log on, written to a file. Nothing is pinned: the workers need every
core, and so do wrk and the upstream, which is the point of the report.
For each N, interleaved over rounds, wrk loads C{/bench/} (-t1 -c50 by
default) and the report shows the median req/s and p99, and where the
machine's CPU went: monedge (supervisor and workers), the upstream, and
everything else (wrk, mostly), in percent of one CPU.

Loopback only; bounded (each wrk run has a deadline); every process it
starts is stopped on exit. See docs/performance.md, "Several cores".
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from run import (  # noqa: E402
    BenchError,
    Server,
    Wrk,
    cpuModel,
    cpuSeconds,
    ensureWrk,
    fetch,
    monedgeCommand,
    parseWrk,
    processTree,
    stopAll,
    writeRegistry,
)

from monedge.testing import freePort  # noqa: E402

READY_TIMEOUT = 30.0


def machineBusy() -> float:
    """
    CPU seconds the whole machine has spent busy (all CPUs), from /proc/stat.
    """
    with open("/proc/stat") as f:
        fields = [int(value) for value in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def waitReady(adminPort: int, server: Server) -> None:
    """
    Return once the admin port's /readyz answers 200 (every worker is up).
    """
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        server.checkAlive()
        try:
            status, _ = fetch(adminPort, "/readyz")
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"{server.name} not ready within {READY_TIMEOUT:g} s")


def measure(
    wrk: Wrk, url: str, seconds: float, proxy: Server, upstream: Server
) -> dict[str, Any]:
    """
    One wrk run; its results and the CPU split in percent of one CPU.
    """
    group = processTree(proxy.pid)
    groups = {"monedge": group, "upstream": [upstream.pid]}
    before = {name: sum(cpuSeconds(p) for p in pids) for name, pids in groups.items()}
    busy = machineBusy()
    started = time.monotonic()
    output, _, _ = wrk.run(url, seconds)
    elapsed = time.monotonic() - started
    used = {
        name: 100.0 * (sum(cpuSeconds(p) for p in pids) - before[name]) / elapsed
        for name, pids in groups.items()
    }
    total = 100.0 * (machineBusy() - busy) / elapsed
    result = parseWrk(output)
    return {
        "requestsPerSecond": result.requestsPerSecond,
        "p99": result.p99ms,
        "errors": result.errors,
        "monedge": used["monedge"],
        "upstream": used["upstream"],
        "other": max(total - used["monedge"] - used["upstream"], 0.0),
        "processes": len(group),
    }


def parseArguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="values of N (1,2)")
    parser.add_argument("--duration", type=float, default=10, help="seconds (10)")
    parser.add_argument("--warmup", type=float, default=2, help="warm-up s (2)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (2)")
    parser.add_argument("--connections", type=int, default=50, help="wrk -c (50)")
    parser.add_argument("--threads", type=int, default=1, help="wrk -t (1)")
    args = parser.parse_args(argv)
    try:
        args.counts = [int(value) for value in args.workers.split(",")]
    except ValueError:
        parser.error("--workers: a comma-separated list of numbers")
    if min(args.counts) < 1 or args.rounds < 1 or args.duration <= 0:
        parser.error("--workers values, --rounds and --duration must be positive")
    return args


def benchmark(args: argparse.Namespace, directory: Path) -> None:
    wrk = Wrk(ensureWrk(), [], args.threads, args.connections)
    upstreamPort = freePort()
    registry = directory / "services.yaml"
    writeRegistry(registry, upstreamPort)
    upstream = Server(
        "upstream",
        [sys.executable, str(BENCH / "upstream.py"), "--port", str(upstreamPort)],
        upstreamPort,
        directory / "upstream.log",
    )
    servers = [upstream]
    proxies: list[tuple[int, Server, int]] = []
    for count in args.counts:
        port, adminPort = freePort(), freePort()
        command = monedgeCommand(
            [], port, adminPort, registry, str(directory / f"access-{count}.log")
        )
        server = Server(
            f"monedge --workers {count}",
            [*command, "--workers", str(count)],
            port,
            directory / f"monedge-{count}.log",
        )
        servers.append(server)
        proxies.append((count, server, adminPort))
    runs: dict[int, list[dict[str, Any]]] = {count: [] for count in args.counts}
    try:
        for server in servers:
            server.start()
        upstream.waitUntilListening()
        for _, server, adminPort in proxies:
            server.waitUntilListening()
            waitReady(adminPort, server)
        print("monedge --workers scaling")
        print(f"  command:  {shlex.join([sys.executable, *sys.argv])}")
        print(f"  cpu:      {cpuModel()}, {len(os.sched_getaffinity(0))} usable")
        print(f"  load:     {shlex.join(wrk.command('URL', args.duration))}, unpinned")
        print(flush=True)
        for number in range(1, args.rounds + 1):
            for count, server, _ in proxies:
                url = f"http://127.0.0.1:{server.port}/bench/"
                if args.warmup:
                    wrk.run(url, args.warmup)
                run = measure(wrk, url, args.duration, server, upstream)
                runs[count].append(run)
                print(
                    f"  round {number}, --workers {count}: "
                    f"{run['requestsPerSecond']:,.0f} req/s, p99 {run['p99']:.2f} ms, "
                    f"{run['errors']} errors",
                    flush=True,
                )
    finally:
        stopAll(servers)

    def median(count: int, key: str) -> float:
        return statistics.median(run[key] for run in runs[count])

    base = median(args.counts[0], "requestsPerSecond")
    print()
    print(
        "| --workers | req/s | vs first | p99 ms | monedge CPU % "
        "| upstream CPU % | wrk and the rest CPU % |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for count in args.counts:
        rate = median(count, "requestsPerSecond")
        print(
            f"| {count} | {rate:,.0f} | {rate / base:.2f}x "
            f"| {median(count, 'p99'):.2f} | {median(count, 'monedge'):.0f} "
            f"| {median(count, 'upstream'):.0f} | {median(count, 'other'):.0f} |"
        )
    errors = sum(run["errors"] for count in args.counts for run in runs[count])
    if errors:
        raise BenchError(f"wrk saw {errors} errors")


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt()


def main(argv: list[str] | None = None) -> int:
    args = parseArguments(argv)
    signal.signal(signal.SIGTERM, _terminated)
    with tempfile.TemporaryDirectory(prefix="monedge-workers-bench-") as directory:
        try:
            benchmark(args, Path(directory))
        except BenchError as e:
            print(f"workers bench failed: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
