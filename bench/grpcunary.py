"""
Unary gRPC calls through monedge, against a direct connection to the same
gRPC server, loaded with h2load on loopback.

    .venv/bin/python bench/grpcunary.py [--calls N] [--rounds R] [--connections C]
                                   [--streams M]

It starts bench/grpcupstream.py, a grpcio server (C{--upstream-kind sync}:
a thread pool; or C{aio}) whose C{/payments.v1.Payments/Echo} answers a
message with the same bytes through a generic handler with no serializers,
and in front of it monedge (C{twistd monedge}, every default feature on,
its access log written to a file) with a static registry holding one
service, C{service.api.payments}, whose endpoint is that server and whose
policy is C{protocol: h2c}: the gRPC convention routes the method's
package, C{payments}, to it.

Each round loads, in turn, the server directly and monedge with

    h2load -cC -mM -nN -d BODY -H 'content-type: application/grpc' \\
        -H 'te: trailers' http://127.0.0.1:PORT/payments.v1.Payments/Echo

(by default C{-c5 -m10 -n20000}: 50 calls in flight over 5 HTTP/2
connections with prior knowledge), BODY being one gRPC length-prefixed
message: a zero byte, the payload's length in 4 bytes big-endian, then
C{--payload} bytes.  Each run follows an untimed warm-up on the same
target.

h2load counts HTTP statuses only, so every run is checked besides:
h2load's 2xx count and its per-call log must both account for every call;
the server counts the Echo calls it served, read before and after each run
through the same target with grpcio's own client (C{Count}, a call whose
grpc-status must be OK), and the difference must be the run's calls; one
Echo call with grpcio, checking status and message, precedes each run; and
at the end monedge's access log is tallied by HTTP status and grpc_status
(the upstream's grpc-status): every Echo call should be logged 200 with
grpc_status 0.

monedge runs pinned to one CPU, the gRPC server and h2load to the other
(as bench/run.py pins): so the direct rows measure the server and h2load
sharing a CPU, and the monedge rows the same plus monedge on its own CPU.
Reported per target: calls/s (h2load's, median over rounds, and each
round's), call times p50 and p99 from h2load's C{--log-file} (median over
rounds), failed calls, monedge's CPU time per call (its process tree, from
/proc), the gRPC server's CPU per call, h2load's CPU in percent of the
run, monedge's peak RSS; and monedge's calls/s as a fraction of the
direct connection's.  Results go to bench/results/grpc-<time>.json.  See
docs/performance.md, "gRPC".
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import shlex
import statistics
import struct
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

from h2load import (  # type: ignore[import-not-found]  # noqa: E402
    parseH2load,
    percentile,
    requestTimes,
    troubleIn,
)
from run import (  # type: ignore[import-not-found]  # noqa: E402
    RESULTS,
    BenchError,
    Server,
    ensureCommand,
    machine,
    monedgeCommand,
    pinning,
    processTree,
    run,
    runBench,
    runWatching,
    stopAll,
)

from monedge.testing import freePort  # noqa: E402

SERVICE = "service.api.payments"
METHOD = "/payments.v1.Payments/Echo"
COUNT = "/payments.v1.Payments/Count"
DIRECT = "direct"
MONEDGE = "monedge"

# Seconds an h2load run may take, besides a generous floor rate.
RUN_SLACK = 60.0
FLOOR_RATE = 100.0
CALL_TIMEOUT = 10.0


def grpcMessage(payload: bytes) -> bytes:
    """
    C{payload} framed as one gRPC message: uncompressed, then its length in
    4 bytes big-endian.
    """
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def unary(port: int, method: str, request: bytes) -> tuple[Any, bytes]:
    """
    One unary call of C{method} to 127.0.0.1:C{port} with grpcio's client,
    raw bytes both ways; its status code and answer (empty unless OK).
    """
    with grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)]
    ) as channel:
        stub = channel.unary_unary(method)
        try:
            answer: bytes = stub(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            return e.code(), b""
    return grpc.StatusCode.OK, answer


def served(port: int, label: str) -> int:
    """
    The Echo calls the server has served, asked through 127.0.0.1:C{port}
    (C{label}'s); the call must succeed.
    """
    code, answer = unary(port, COUNT, b"")
    if code != grpc.StatusCode.OK or not answer.isdigit():
        raise BenchError(f"{label}: Count answered {code} {answer!r}")
    return int(answer)


def checkEcho(port: int, label: str, payload: bytes) -> None:
    """
    Make one Echo call with grpcio through 127.0.0.1:C{port}; it must end
    with grpc-status OK and the message sent.
    """
    code, answer = unary(port, METHOD, payload)
    if code != grpc.StatusCode.OK or answer != payload:
        raise BenchError(
            f"{label}: an Echo call with grpcio ended {code}, "
            f"answer {answer[:40]!r} (sent {payload[:40]!r})"
        )


def childCpuSeconds() -> float:
    """
    User plus system CPU time of this process's waited-for children.
    """
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def accessLogTally(path: Path) -> dict[str, int]:
    """
    monedge's access-log records, counted by C{"STATUS grpc_status"}.
    """
    tally: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return tally
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or record.get("path") != METHOD:
            continue
        key = f"{record.get('status')} {record.get('grpc_status')}"
        tally[key] = tally.get(key, 0) + 1
    return tally


def badRecords(tally: dict[str, int]) -> int:
    """
    The records of an L{accessLogTally} that are not a 200 with the
    upstream's grpc-status OK.
    """
    return sum(n for key, n in tally.items() if key != "200 0")


@dataclass
class Load:
    """
    How to run h2load for gRPC calls.
    """

    path: str
    prefix: list[str]
    connections: int
    streams: int
    body: Path

    def command(
        self,
        url: str,
        calls: int,
        logFile: Path | None = None,
        connections: int | None = None,
    ) -> list[str]:
        """
        The command line for C{calls} Echo calls to C{url} on
        L{connections} connections (or C{connections}), logging each to
        C{logFile} if given.
        """
        options = [
            f"-c{connections or self.connections}",
            f"-m{self.streams}",
            f"-n{calls}",
            "-d",
            str(self.body),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
        ]
        if logFile is not None:
            options.append(f"--log-file={logFile}")
        return [*self.prefix, self.path, *options, url]

    def run(
        self,
        url: str,
        calls: int,
        watch: dict[str, list[int]],
        logFile: Path | None = None,
        connections: int | None = None,
    ) -> tuple[str, float, dict[str, float], dict[str, int], float]:
        """
        Run h2load to its end; as L{runWatching}, and h2load's own CPU
        seconds.
        """
        before = childCpuSeconds()
        output, elapsed, cpu, peak = runWatching(
            "h2load",
            self.command(url, calls, logFile, connections),
            RUN_SLACK + calls / FLOOR_RATE,
            watch,
        )
        return output, elapsed, cpu, peak, childCpuSeconds() - before


@dataclass
class Target:
    """
    One way to reach the gRPC server.
    """

    label: str
    port: int
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """
        The Echo method's URL.
        """
        return f"http://127.0.0.1:{self.port}{METHOD}"


@dataclass
class Summary:
    """
    One target over every round.
    """

    target: str
    url: str
    callsPerSecond: float
    rounds: list[float]
    p50ms: float
    p99ms: float
    calls: int
    errors: int
    monedgeCpuMicrosecondsPerCall: float
    monedgeCpuPerCallRounds: list[float]
    monedgeCpuPercent: float
    upstreamCpuMicrosecondsPerCall: float
    upstreamCpuPercent: float
    h2loadCpuPercent: float
    monedgeRssMiB: float

    @classmethod
    def of(cls, target: Target) -> Summary:
        """
        The summary of C{target}'s runs.
        """

        def median(key: str) -> float:
            return float(statistics.median(run[key] for run in target.runs))

        return cls(
            target=target.label,
            url=target.url,
            callsPerSecond=median("callsPerSecond"),
            rounds=[run["callsPerSecond"] for run in target.runs],
            p50ms=median("p50ms"),
            p99ms=median("p99ms"),
            calls=sum(run["total"] for run in target.runs),
            errors=sum(run["errors"] for run in target.runs),
            monedgeCpuMicrosecondsPerCall=median("monedgeCpuMicrosecondsPerCall"),
            monedgeCpuPerCallRounds=[
                run["monedgeCpuMicrosecondsPerCall"] for run in target.runs
            ],
            monedgeCpuPercent=median("monedgeCpuPercent"),
            upstreamCpuMicrosecondsPerCall=median("upstreamCpuMicrosecondsPerCall"),
            upstreamCpuPercent=median("upstreamCpuPercent"),
            h2loadCpuPercent=median("h2loadCpuPercent"),
            monedgeRssMiB=max(run["monedgeRssBytes"] for run in target.runs) / 2**20,
        )


def ratios(summaries: Sequence[Summary]) -> tuple[float, list[float]]:
    """
    monedge's calls/s as a fraction of the direct connection's: of the
    medians, and round by round.
    """
    byTarget = {s.target: s for s in summaries}
    through, direct = byTarget[MONEDGE], byTarget[DIRECT]
    return through.callsPerSecond / direct.callsPerSecond, [
        m / d for m, d in zip(through.rounds, direct.rounds, strict=True)
    ]


def table(summaries: Sequence[Summary]) -> str:
    """
    The results, as a Markdown table aligned for a terminal.
    """
    header = [
        "target",
        "calls/s (median)",
        "calls/s per round",
        "p50 ms",
        "p99 ms",
        "failed",
        "monedge CPU %",
        "monedge CPU µs/call",
        "server CPU %",
        "server CPU µs/call",
        "h2load CPU %",
    ]
    rows = [
        [
            s.target,
            f"{s.callsPerSecond:,.0f}",
            " / ".join(f"{r:,.0f}" for r in s.rounds),
            f"{s.p50ms:.2f}",
            f"{s.p99ms:.2f}",
            f"{s.errors} of {s.calls:,}",
            f"{s.monedgeCpuPercent:.0f}" if s.target == MONEDGE else "",
            f"{s.monedgeCpuMicrosecondsPerCall:.0f}" if s.target == MONEDGE else "",
            f"{s.upstreamCpuPercent:.0f}",
            f"{s.upstreamCpuMicrosecondsPerCall:.0f}",
            f"{s.h2loadCpuPercent:.0f}",
        ]
        for s in summaries
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|".join(
        ":" + "-" * (w + 1) if i == 0 else "-" * (w + 1) + ":"
        for i, w in enumerate(widths)
    )
    return "\n".join([line(header), f"|{rule}|", *map(line, rows)])


def writeRegistry(path: Path, upstreamPort: int) -> None:
    """
    A static registry: C{service.api.payments} on the gRPC server, over h2c.
    """
    import yaml

    document = {
        "services": {
            SERVICE: {
                "endpoints": [f"127.0.0.1:{upstreamPort}"],
                "policy": {"protocol": "h2c"},
            }
        }
    }
    path.write_text(yaml.safe_dump(document))


def parseArguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """
    The command line's options, checked.
    """
    parser = argparse.ArgumentParser(
        description="Load a gRPC server with unary calls from h2load, through "
        "monedge and directly, on loopback, and compare them."
    )
    parser.add_argument(
        "--calls", type=int, default=20000, help="calls per measured run (20000)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="calls of the untimed run before each measured one (a fifth of --calls)",
    )
    parser.add_argument(
        "--connections", type=int, default=5, help="HTTP/2 connections, -c (5)"
    )
    parser.add_argument(
        "--streams",
        type=int,
        default=10,
        help="concurrent calls per connection, -m (10)",
    )
    parser.add_argument(
        "--payload", type=int, default=64, help="bytes of each message (64)"
    )
    parser.add_argument(
        "--upstream-kind",
        choices=("sync", "aio"),
        default="sync",
        help="the gRPC server: grpcio's thread pool (sync) or grpc.aio",
    )
    parser.add_argument(
        "--upstream-workers",
        type=int,
        default=4,
        help="threads of the sync gRPC server (4)",
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin processes to CPUs"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write the results (bench/results/grpc-<time>.json)",
    )
    parser.add_argument(
        "--no-json", action="store_true", help="do not write the results as JSON"
    )
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = max(args.connections, args.calls // 5)
    if args.rounds < 1 or args.connections < 1 or args.streams < 1:
        parser.error("--rounds, --connections and --streams must be positive")
    if args.payload < 0:
        parser.error("--payload cannot be negative")
    if args.calls < args.connections or (
        args.warmup and args.warmup < args.connections
    ):
        parser.error("--calls and --warmup (unless 0) must be at least --connections")
    return args


def benchmark(args: argparse.Namespace, directory: Path) -> None:
    """
    Start the gRPC server and monedge, with their files in C{directory},
    load both targets for every round, stop them, then print the table and
    write the JSON.
    """
    h2loadPath = ensureCommand("h2load", ["nghttp2-client"])
    serverPin, loadPin = pinning(not args.no_pin)
    about = machine(
        None,
        None,
        None,
        {
            "h2load": run([h2loadPath, "--version"]).removeprefix("h2load ")
            or "unknown",
            "grpcio": grpc.__version__,
        },
    )
    invocation = shlex.join([sys.executable, *sys.argv])
    payload = bytes(i % 251 for i in range(args.payload))
    body = directory / "call.bin"
    body.write_bytes(grpcMessage(payload))

    upstreamPort = freePort()
    registry = directory / "services.yaml"
    writeRegistry(registry, upstreamPort)
    upstream = Server(
        "gRPC server",
        [
            *loadPin,
            sys.executable,
            str(BENCH / "grpcupstream.py"),
            "--port",
            str(upstreamPort),
            "--kind",
            args.upstream_kind,
            "--workers",
            str(args.upstream_workers),
        ],
        upstreamPort,
        directory / "upstream.log",
    )
    port = freePort()
    accessLog = directory / "access.log"
    monedge = Server(
        MONEDGE,
        monedgeCommand(serverPin, port, freePort(), registry, str(accessLog)),
        port,
        directory / "monedge.log",
    )
    servers = [upstream, monedge]
    targets = [Target(DIRECT, upstreamPort), Target(MONEDGE, port)]
    load = Load(h2loadPath, loadPin, args.connections, args.streams, body)

    try:
        for server in servers:
            server.start()
        for server in servers:
            server.waitUntilListening()
        for target in targets:
            checkEcho(target.port, target.label, payload)
            output = load.run(target.url, 1, {}, None, 1)[0]
            check = parseH2load(output)
            if check.status["2xx"] != 1 or check.protocol != "h2c":
                raise BenchError(
                    f"{target.label}: one call to {target.url} with h2load did "
                    f"not get a 2xx answer over h2c:\n{output}"
                )

        print("monedge gRPC benchmark")
        print(f"  command:  {invocation}")
        for key, value in about.items():
            print(f"  {key + ':':9} {value}")
        print(
            f"  load:     {shlex.join(load.command(f'http://127.0.0.1:PORT{METHOD}', args.calls)[len(loadPin) :])}"
            f" (BODY: one {len(payload) + 5}-byte gRPC message; each run after "
            f"{args.warmup:,} calls of warm-up), {args.rounds} round(s)"
        )
        print(
            f"  upstream: {shlex.join(upstream.command[len(loadPin) :])} "
            f"(grpcio {grpc.__version__})"
        )
        print(f"  monedge:  {shlex.join(monedge.command)}")
        print(
            "  pinning:  "
            + (
                f"monedge on CPU {serverPin[-1]}, the gRPC server and h2load on "
                f"CPU {loadPin[-1]}"
                if serverPin
                else "none"
            )
        )
        print(flush=True)

        for number in range(1, args.rounds + 1):
            for target in targets:
                for server in servers:
                    server.checkAlive()
                if args.warmup:
                    load.run(target.url, args.warmup, {})
                checkEcho(target.port, target.label, payload)
                before = served(target.port, target.label)
                watch = {
                    "monedge": processTree(monedge.pid),
                    "upstream": [upstream.pid],
                }
                logFile = directory / "calls.log"
                output, elapsed, cpu, peak, h2loadCpu = load.run(
                    target.url, args.calls, watch, logFile
                )
                counted = served(target.port, target.label) - before
                result = parseH2load(output)
                times, statuses = requestTimes(logFile)
                logFile.unlink()
                if result.protocol != "h2c":
                    raise BenchError(
                        f"{target.label}: h2load spoke {result.protocol}:\n{output}"
                    )
                errors = max(
                    result.errors,
                    result.total - statuses.get("200", 0),
                    result.total - counted,
                )
                total = max(result.total, 1)
                target.runs.append(
                    {
                        **asdict(result),
                        "callsPerSecond": result.requestsPerSecond,
                        "errors": errors,
                        "loggedStatuses": statuses,
                        "servedByUpstream": counted,
                        "p50ms": percentile(times, 0.50),
                        "p99ms": percentile(times, 0.99),
                        "elapsedSeconds": elapsed,
                        "monedgeCpuSeconds": cpu["monedge"],
                        "monedgeCpuMicrosecondsPerCall": 1e6 * cpu["monedge"] / total,
                        "monedgeCpuPercent": 100.0 * cpu["monedge"] / elapsed,
                        "upstreamCpuMicrosecondsPerCall": 1e6 * cpu["upstream"] / total,
                        "upstreamCpuPercent": 100.0 * cpu["upstream"] / elapsed,
                        "h2loadCpuPercent": 100.0 * h2loadCpu / elapsed,
                        "monedgeRssBytes": peak["monedge"],
                        "h2loadOutput": output,
                    }
                )
                latest = target.runs[-1]
                print(
                    f"round {number}/{args.rounds}  {target.label:8} "
                    f"{result.requestsPerSecond:9,.0f} calls/s  "
                    f"p99 {latest['p99ms']:7.2f} ms  "
                    + (
                        f"monedge {latest['monedgeCpuMicrosecondsPerCall']:4.0f} µs "
                        "CPU/call  "
                        if target.label == MONEDGE
                        else ""
                    )
                    + f"server {latest['upstreamCpuMicrosecondsPerCall']:4.0f}"
                    f" µs CPU/call  served {counted:,}  failed {errors}",
                    flush=True,
                )
                if errors:
                    print(
                        f"  {target.label}: {errors} of {result.total} calls "
                        f"failed; statuses {statuses}; the server served "
                        f"{counted}; h2load said:\n{output}\n  monedge's log "
                        f"ends:\n{monedge.logTail()}",
                        flush=True,
                    )
        for server in servers:
            server.checkAlive()
    finally:
        stopAll(servers)

    tally = accessLogTally(accessLog)
    trouble = {
        MONEDGE: troubleIn(monedge.logPath),
        "gRPC server": troubleIn(upstream.logPath),
    }
    summaries = [Summary.of(target) for target in targets]
    ratio, each = ratios(summaries)
    through = next(s for s in summaries if s.target == MONEDGE)
    print()
    print(table(summaries))
    print()
    print(
        f"monedge / direct = {ratio:.2f}x the calls/s; per round "
        + " / ".join(f"{r:.2f}" for r in each)
    )
    print(
        f"monedge CPU per call: {through.monedgeCpuMicrosecondsPerCall:.0f} µs "
        "(median); per round "
        + " / ".join(f"{r:.0f}" for r in through.monedgeCpuPerCallRounds)
        + f"; peak RSS {through.monedgeRssMiB:.1f} MiB"
    )
    print(
        "monedge's access log, Echo calls by status and grpc_status: "
        + ", ".join(f"{key}: {n:,}" for key, n in sorted(tally.items()))
        + f" ({badRecords(tally)} not a 200 with grpc_status 0)"
    )
    for name, lines in trouble.items():
        if lines:
            print(f"{name}'s log has lines that look like errors:")
            for line in lines:
                print(f"  {line}")
        else:
            print(f"{name}'s log: no error logged")

    if not args.no_json:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        path = args.json
        if path is None:
            RESULTS.mkdir(exist_ok=True)
            path = RESULTS / f"grpc-{stamp}.json"
        document = {
            "command": invocation,
            "machine": about,
            "settings": {
                "calls": args.calls,
                "warmup": args.warmup,
                "rounds": args.rounds,
                "connections": args.connections,
                "streams": args.streams,
                "payload": args.payload,
                "upstreamKind": args.upstream_kind,
                "upstreamWorkers": args.upstream_workers,
                "pinned": not args.no_pin,
            },
            "servers": {server.name: server.command for server in servers},
            "load": load.command(f"http://127.0.0.1:PORT{METHOD}", args.calls),
            "summary": [asdict(s) for s in summaries],
            "monedgeAgainstDirect": ratio,
            "monedgeAgainstDirectRounds": each,
            "accessLog": tally,
            "accessLogBad": badRecords(tally),
            "errorsLogged": trouble,
            "runs": {target.label: target.runs for target in targets},
        }
        path.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nresults: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the benchmark; the exit status.
    """
    return runBench(benchmark, parseArguments(argv), "monedge-grpc-")


if __name__ == "__main__":
    sys.exit(main())
