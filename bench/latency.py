"""
The latency monedge adds at a fixed, moderate request rate.

    .venv/bin/python bench/latency.py          (about two minutes)

run.py measures throughput: wrk's connections send as fast as they can, so
its latencies are queueing at saturation.  This measures what a client sees
at a rate monedge handles comfortably: on 127.0.0.1 it starts the bench
upstream (bench/upstream.py, answering C{hello\\n}) and monedge in front of
it with every default feature on (its access log written to a file), the
proxy pinned to one CPU and the upstream and wrk to another, as run.py
does.  Then:

  1. capacity: wrk (run.py's settings: 1 thread, 50 connections, no delay)
     loads monedge's C{/bench/} for 5 s after a 2 s warm-up; its req/s is
     monedge's capacity;
  2. the rate asked: a quarter of that (C{--fraction}), or C{--rate};
  3. for each round, the upstream directly (C{/}) and then monedge
     (C{/bench/}) get that rate from wrk (1 thread, C{--connections}
     keep-alive connections) running a Lua script the bench writes to its
     temporary directory, for C{--duration} seconds after a 2 s warm-up run
     that is not measured;
  4. from wrk's report: the rate achieved (which must be at least 80 % of
     the rate asked), the p50, p75, p90 and p99 latency (C{--latency}), and
     monedge's CPU use during its runs.  Any response but 2xx or 3xx, or
     any socket error, fails the run.

How the load is paced: before each request, every connection waits an
exponentially distributed think time (wrk's C{delay()} hook, in whole
milliseconds) with a mean of C{connections * 1000 / rate} ms.  Summed over
the connections, requests then arrive approximately as a Poisson process
at the rate asked (slightly under it: each connection's cycle is its think
time plus the response time, which at this load is small next to it).
wrk measures each request's latency from writing it to reading its
response.

Why not C{h2load --rps}: its clients start together and fire their
per-second timers in lockstep, so requests arrive in bursts of up to one
per client, and its latencies are mostly the queueing of those bursts, not
the latency at a moderate rate.

The pacing is closed-loop per connection: a connection's next think time
starts only when its response arrives, so a slow response delays that
connection's next request (coordinated omission).  With a mean think time
tens of times the response time, the load it hides is negligible, but not
zero: a stall lowers the arrival rate a little while it lasts, so the tail
is if anything understated.

It prints a Markdown table of the medians over rounds and the p99 and p50
monedge adds to the direct path (the target: under 2 ms at p99), and writes
every round's numbers to bench/results/latency-<UTC time>.json.  Every
process it starts is stopped on exit; it exits 1 if it cannot measure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from run import (  # noqa: E402
    BODY,
    RESULTS,
    BenchError,
    Server,
    Wrk,
    ensureWrk,
    fetch,
    machine,
    monedgeCommand,
    parseWrk,
    pinning,
    processTree,
    runBench,
    stopAll,
    writeRegistry,
)

from monedge.testing import freePort  # noqa: E402

CAPACITY_WARMUP = 2
CAPACITY_SECONDS = 5
CAPACITY_CONNECTIONS = 50
WARMUP = 2
# The least share of the rate asked that a run must achieve.
MINIMUM_ACHIEVED = 0.8
TARGET_P99_MS = 2.0

DIRECT = "direct"
MONEDGE = "monedge"

# wrk calls delay() before each request and waits that many milliseconds.
POISSON_SCRIPT = """\
-- Written by bench/latency.py: exponential think times before each
-- request, so that the connections' requests arrive approximately as a
-- Poisson process.
local mean = {mean!r}
math.randomseed(os.time())
function delay()
  return math.floor(-mean * math.log(1 - math.random()) + 0.5)
end
"""

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_DISTRIBUTION = re.compile(
    r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M
)


def parsePercentiles(output: str) -> dict[int, float]:
    """
    The 50th, 75th, 90th and 99th percentile latencies, in milliseconds,
    from the distribution that wrk run with C{--latency} prints.
    """
    found = {
        int(m.group(1)): float(m.group(2)) * _UNITS_MS[m.group(3)]
        for m in _DISTRIBUTION.finditer(output)
    }
    if set(found) != {50, 75, 90, 99}:
        raise BenchError(f"could not parse wrk's latency distribution:\n{output}")
    return found


@dataclass
class Latencies:
    """
    What one paced wrk run measured.
    """

    requests: int
    requestsPerSecond: float
    p50ms: float
    p75ms: float
    p90ms: float
    p99ms: float
    monedgeCpuPercent: float
    upstreamCpuPercent: float


# Latencies' fields reported per percentile, with their table headings.
COLUMNS = {
    "p50ms": "p50 ms",
    "p75ms": "p75 ms",
    "p90ms": "p90 ms",
    "p99ms": "p99 ms",
}


@dataclass
class PacedWrk(Wrk):
    """
    How to run wrk with the think-time script at C{script}.
    """

    script: str = ""

    def command(
        self, url: str, seconds: float, headers: Mapping[str, str] | None = None
    ) -> list[str]:
        *options, last = super().command(url, seconds, headers)
        return [*options, "-s", self.script, last]


def measureRun(
    wrk: PacedWrk,
    url: str,
    duration: int,
    asked: float,
    monedgePids: Sequence[int],
    upstreamPids: Sequence[int],
) -> tuple[Latencies, str]:
    """
    Warm up, then run C{wrk} against C{url} for C{duration} seconds; what it
    measured, and its output.  Fail if wrk saw errors or achieved under
    L{MINIMUM_ACHIEVED} of the rate C{asked}.
    """
    wrk.run(url, WARMUP)
    output, cpu, _ = wrk.run(
        url, duration, {"monedge": monedgePids, "upstream": upstreamPids}
    )
    result = parseWrk(output)
    if result.errors:
        raise BenchError(
            f"wrk on {url}: {result.non2xx} responses not 2xx or 3xx, "
            f"socket errors {result.socketErrors}:\n{output}"
        )
    if result.requestsPerSecond < MINIMUM_ACHIEVED * asked:
        raise BenchError(
            f"wrk on {url} achieved {result.requestsPerSecond:,.0f} req/s, under "
            f"{MINIMUM_ACHIEVED * 100:g} % of the {asked:,.0f} req/s asked: "
            f"the server (or wrk) could not keep up:\n{output}"
        )
    percentiles = parsePercentiles(output)
    return (
        Latencies(
            requests=result.requests,
            requestsPerSecond=result.requestsPerSecond,
            p50ms=percentiles[50],
            p75ms=percentiles[75],
            p90ms=percentiles[90],
            p99ms=percentiles[99],
            monedgeCpuPercent=cpu["monedge"],
            upstreamCpuPercent=cpu["upstream"],
        ),
        output,
    )


# -- the report --------------------------------------------------------------


def medians(runs: Sequence[Latencies]) -> dict[str, float]:
    """
    Each latency, the rate and the CPU use, the median over rounds.
    """
    keys = [
        "requestsPerSecond",
        *COLUMNS,
        "monedgeCpuPercent",
        "upstreamCpuPercent",
    ]
    return {
        key: float(statistics.median(getattr(r, key) for r in runs)) for key in keys
    }


def table(results: dict[str, list[Latencies]], asked: float) -> str:
    """
    The medians over rounds, as a Markdown table aligned for a terminal.
    monedge's CPU is shown for its own runs only.
    """
    header = [
        "target",
        "requests",
        f"req/s (asked {asked:,.0f})",
        *COLUMNS.values(),
        "monedge CPU %",
        "upstream CPU %",
    ]
    rows = []
    for label, runs in results.items():
        middle = medians(runs)
        rows.append(
            [
                label,
                " / ".join(f"{r.requests:,}" for r in runs),
                f"{middle['requestsPerSecond']:,.0f}",
                *(f"{middle[key]:.2f}" for key in COLUMNS),
                f"{middle['monedgeCpuPercent']:.0f}" if label == MONEDGE else "-",
                f"{middle['upstreamCpuPercent']:.0f}",
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|".join(
        "-" * (w + 1) + ":" if i else ":" + "-" * (w + 1) for i, w in enumerate(widths)
    )
    return "\n".join([line(header), f"|{rule}|", *map(line, rows)])


# -- the measurement ---------------------------------------------------------


def measure(args: argparse.Namespace, directory: Path) -> None:
    wrkPath = ensureWrk()
    proxyPin, loadPin = pinning(not args.no_pin)
    about = machine(wrkPath, None, None)
    invocation = shlex.join([sys.executable, *sys.argv])

    upstreamPort, port, adminPort = freePort(), freePort(), freePort()
    registry = directory / "services.yaml"
    writeRegistry(registry, upstreamPort)
    accessLog = directory / "access.log"
    upstream = Server(
        "upstream",
        [
            *loadPin,
            sys.executable,
            str(BENCH / "upstream.py"),
            "--port",
            str(upstreamPort),
        ],
        upstreamPort,
        directory / "upstream.log",
    )
    monedge = Server(
        "monedge",
        monedgeCommand(proxyPin, port, adminPort, registry, str(accessLog)),
        port,
        directory / "monedge.log",
    )
    servers = [upstream, monedge]
    targets = {
        DIRECT: f"http://127.0.0.1:{upstreamPort}/",
        MONEDGE: f"http://127.0.0.1:{port}/bench/",
    }
    results: dict[str, list[Latencies]] = {label: [] for label in targets}
    outputs: dict[str, list[str]] = {label: [] for label in targets}

    try:
        for server in servers:
            server.start()
        for server in servers:
            server.waitUntilListening()
        for label, server, urlPath in (
            (DIRECT, upstream, "/"),
            (MONEDGE, monedge, "/bench/"),
        ):
            status, body = fetch(server.port, urlPath)
            if status != 200 or body != BODY:
                raise BenchError(
                    f"{label}: GET {targets[label]} answered {status} "
                    f"{body[:200]!r}, not 200 {BODY!r}"
                )

        print("monedge latency at a fixed rate")
        print(f"  command:  {invocation}")
        for key, value in about.items():
            print(f"  {key + ':':9} {value}")
        print(
            "  pinning:  "
            + (
                f"monedge on CPU {proxyPin[-1]}, upstream and wrk on CPU {loadPin[-1]}"
                if proxyPin
                else "none"
            )
        )
        for server in servers:
            print(f"  {server.name}: {shlex.join(server.command)}")

        flat = Wrk(wrkPath, loadPin, 1, CAPACITY_CONNECTIONS)
        capacity: float | None = None
        capacityOutput = ""
        capacityCpu: dict[str, float] = {}
        if args.rate is None:
            flat.run(targets[MONEDGE], CAPACITY_WARMUP)
            capacityOutput, capacityCpu, _ = flat.run(
                targets[MONEDGE],
                CAPACITY_SECONDS,
                {"monedge": processTree(monedge.pid), "upstream": [upstream.pid]},
            )
            measured = parseWrk(capacityOutput)
            if measured.errors:
                raise BenchError(
                    f"wrk saw {measured.errors} errors measuring capacity:\n"
                    f"{capacityOutput}"
                )
            capacity = measured.requestsPerSecond
            asked = capacity * args.fraction
            print(
                f"  capacity: {capacity:,.0f} req/s, monedge CPU "
                f"{capacityCpu['monedge']:.0f} % "
                f"({shlex.join(flat.command(targets[MONEDGE], CAPACITY_SECONDS))}, "
                f"after a {CAPACITY_WARMUP} s warm-up)"
            )
        else:
            asked = args.rate
            print("  capacity: not measured (--rate given)")
        meanDelayMs = args.connections * 1000.0 / asked
        scriptPath = directory / "poisson.lua"
        script = POISSON_SCRIPT.format(mean=round(meanDelayMs, 3))
        scriptPath.write_text(script)
        wrk = PacedWrk(wrkPath, loadPin, 1, args.connections, str(scriptPath))
        print(
            f"  rate:     {asked:,.0f} req/s asked "
            + (
                f"({args.fraction:g} of capacity)"
                if args.rate is None
                else f"(--rate {args.rate:g})"
            )
            + f": {args.connections} connections, each waiting an exponential "
            f"think time of mean {meanDelayMs:.2f} ms before each request"
        )
        print(
            f"  load:     {shlex.join(wrk.command('URL', args.duration))} "
            f"(after a {WARMUP} s warm-up), {args.rounds} round(s); "
            f"{scriptPath.name}:"
        )
        for line in script.splitlines():
            print(f"    {line}")
        print(flush=True)

        monedgePids = processTree(monedge.pid)
        upstreamPids = [upstream.pid]
        for number in range(1, args.rounds + 1):
            for label, url in targets.items():
                for server in servers:
                    server.checkAlive()
                latencies, output = measureRun(
                    wrk, url, args.duration, asked, monedgePids, upstreamPids
                )
                results[label].append(latencies)
                outputs[label].append(output)
                print(
                    f"round {number}/{args.rounds}  {label:8} "
                    f"{latencies.requestsPerSecond:7,.0f} req/s  "
                    f"p50 {latencies.p50ms:5.2f}  p75 {latencies.p75ms:5.2f}  "
                    f"p90 {latencies.p90ms:5.2f}  p99 {latencies.p99ms:5.2f} ms  "
                    f"monedge CPU {latencies.monedgeCpuPercent:3.0f} %",
                    flush=True,
                )
        for server in servers:
            server.checkAlive()
        accessLogLines = sum(1 for _ in accessLog.open("rb"))
    finally:
        stopAll(servers)

    direct, through = medians(results[DIRECT]), medians(results[MONEDGE])
    addedP99 = through["p99ms"] - direct["p99ms"]
    addedP50 = through["p50ms"] - direct["p50ms"]
    print()
    print(table(results, asked))
    print()
    print(f"monedge's access log: {accessLogLines:,} lines")
    print()
    print(
        f"added p99 (monedge - direct): {addedP99:.2f} ms "
        f"(target < {TARGET_P99_MS:g} ms)"
    )
    print(f"added p50 (monedge - direct): {addedP50:.2f} ms")

    if not args.no_json:
        RESULTS.mkdir(exist_ok=True)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        path = RESULTS / f"latency-{stamp}.json"
        document: dict[str, Any] = {
            "command": invocation,
            "machine": about,
            "settings": {
                "duration": args.duration,
                "warmup": WARMUP,
                "rounds": args.rounds,
                "connections": args.connections,
                "fraction": None if args.rate is not None else args.fraction,
                "rate": args.rate,
                "pinned": not args.no_pin,
                "accessLog": True,
                "minimumAchieved": MINIMUM_ACHIEVED,
            },
            "capacity": {
                "requestsPerSecond": capacity,
                "command": flat.command(targets[MONEDGE], CAPACITY_SECONDS),
                "warmup": CAPACITY_WARMUP,
                "monedgeCpuPercent": capacityCpu.get("monedge"),
                "upstreamCpuPercent": capacityCpu.get("upstream"),
                "wrkOutput": capacityOutput,
            },
            "askedRequestsPerSecond": asked,
            "meanDelayMs": meanDelayMs,
            "wrk": wrk.command("URL", args.duration),
            "warmupCommand": wrk.command("URL", WARMUP),
            "script": script,
            "servers": {server.name: server.command for server in servers},
            "targets": targets,
            "accessLogLines": accessLogLines,
            "summary": {label: medians(runs) for label, runs in results.items()},
            "addedP99ms": addedP99,
            "addedP50ms": addedP50,
            "targetAddedP99ms": TARGET_P99_MS,
            "runs": {
                label: [
                    {**asdict(latencies), "wrkOutput": output}
                    for latencies, output in zip(
                        results[label], outputs[label], strict=True
                    )
                ]
                for label in targets
            },
        }
        path.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nresults: {path.relative_to(ROOT)}")


def parseArguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure the latency monedge adds over the bare upstream "
        "at a fixed request rate (approximately Poisson arrivals from wrk) "
        "on loopback."
    )
    parser.add_argument(
        "--duration",
        type=int,
        default=10,
        help="whole seconds per measured run, after a 2 s warm-up (10)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds (2)")
    parser.add_argument(
        "--fraction",
        type=float,
        default=0.25,
        help="the rate, as a fraction of monedge's measured capacity (0.25)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="the rate in req/s (skips measuring capacity)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=50,
        help="wrk keep-alive connections sharing the rate (50)",
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin processes to CPUs"
    )
    parser.add_argument(
        "--no-json", action="store_true", help="do not write bench/results/*.json"
    )
    args = parser.parse_args(argv)
    if args.duration < 1 or args.rounds < 1 or args.connections < 1:
        parser.error("--duration, --rounds and --connections must be positive")
    if not 0 < args.fraction <= 1:
        parser.error("--fraction must be in (0, 1]")
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the benchmark; the exit status.
    """
    return runBench(measure, parseArguments(argv), "monedge-latency-", "latency")


if __name__ == "__main__":
    sys.exit(main())
