"""
monedge over HTTP/2 and TLS, beside nginx, loaded with h2load on loopback.

    .venv/bin/python bench/h2load.py [--requests N] [--rounds R] [--no-nginx]

It starts bench/upstream.py (HTTP/1.1, C{hello\\n} to every request), then
in front of it:

  - monedge, every default feature on and its access log written to a file,
    with a TLS listener (C{--tls-port}, C{--tls-dir} holding a throwaway
    certificate made here) and its plain listener, which takes HTTP/2 with
    prior knowledge (h2c) beside HTTP/1.1;
  - nginx (unless C{--no-nginx}), one worker, on the same upstream with a
    keep-alive upstream pool as bench/run.py configures it, listening with
    C{ssl http2}, with C{http2} alone (h2c) on a second port, and for plain
    HTTP/1.1 on a third.

Each is loaded, in turn within each round, with:

  - C{h2load -c50 -m10 -n N https://...}: HTTP/2 over TLS, ALPN C{h2};
  - C{h2load --h1 -c50 -n N https://...}: HTTP/1.1 over TLS;
  - C{h2load -c50 -m10 -n N http://...}: h2c with prior knowledge;
  - C{h2load --h1 -c50 -n N http://...}: plain HTTP/1.1, beside which the
    other rows show what TLS and HTTP/2 cost.

The servers run pinned to one CPU, the upstream and h2load to another (as
bench/run.py pins).  Each run is preceded by an untimed warm-up.  Reported
per target: req/s (h2load's, median over rounds), the server's CPU time per
request (its whole process tree, from /proc), request-time percentiles
(from h2load's C{--log-file}), failed requests, peak RSS, and monedge's CPU
per request as a multiple of nginx's on the same protocol.  See
docs/performance.md, "HTTP/2".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import re
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

from run import (  # noqa: E402
    RESULTS,
    BenchError,
    Server,
    ensureCommand,
    ensureNginx,
    machine,
    monedgeCommand,
    nginxCommand,
    pinning,
    processTree,
    run,
    runBench,
    runWatching,
    stopAll,
    writeNginxConfig,
    writeRegistry,
)

from monedge.testing import freePort  # noqa: E402

MONEDGE = "monedge"
NGINX = "nginx"

H2 = "h2 (TLS)"
H1_TLS = "HTTP/1.1 (TLS)"
H2C = "h2c"
H1 = "HTTP/1.1"
PROTOCOLS = (H2, H1_TLS, H2C, H1)
# What h2load must report as the protocol it spoke, for each.
APPLICATION_PROTOCOL = {H2: "h2", H1_TLS: "http/1.1", H2C: "h2c", H1: "http/1.1"}
SCHEME = {H2: "https", H1_TLS: "https", H2C: "http", H1: "http"}

# Seconds an h2load run may take, besides a generous floor rate.
RUN_SLACK = 60.0
FLOOR_RATE = 200.0


# -- h2load ------------------------------------------------------------------


_FINISHED = re.compile(r"^finished in [\d.]+\w+, ([\d.]+) req/s", re.M)
_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
    r"(\d+) failed, (\d+) errored, (\d+) timeout",
    re.M,
)
_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.M)
_PROTOCOL = re.compile(r"^Application protocol: (\S+)", re.M)
_TLS = re.compile(r"^TLS Protocol: (\S+)\s*\nCipher: (\S+)", re.M)


@dataclass
class H2loadResult:
    """
    What one h2load run reported.
    """

    requestsPerSecond: float
    total: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status: dict[str, int]
    protocol: str
    tls: str

    @property
    def errors(self) -> int:
        """
        Requests that did not end in a 2xx answer.
        """
        return self.total - min(self.succeeded, self.status["2xx"])


def parseH2load(output: str) -> H2loadResult:
    """
    Parse h2load's report.
    """
    rate = _FINISHED.search(output)
    requests = _REQUESTS.search(output)
    status = _STATUS.search(output)
    protocol = _PROTOCOL.search(output)
    if rate is None or requests is None or status is None or protocol is None:
        raise BenchError(f"could not parse h2load's output:\n{output}")
    total, _, _, succeeded, failed, errored, timeout = map(int, requests.groups())
    tls = _TLS.search(output)
    return H2loadResult(
        requestsPerSecond=float(rate.group(1)),
        total=total,
        succeeded=succeeded,
        failed=failed,
        errored=errored,
        timeout=timeout,
        status=dict(
            zip(("2xx", "3xx", "4xx", "5xx"), map(int, status.groups()), strict=True)
        ),
        protocol=protocol.group(1),
        tls=f"{tls.group(1)} {tls.group(2)}" if tls else "",
    )


def requestTimes(logFile: Path) -> tuple[list[float], dict[str, int]]:
    """
    The request times in h2load's C{--log-file} (start in µs since the
    epoch, status, µs to the end of the response; one request a line), in
    ms and sorted; and how many requests ended with each status (C{-1} for
    a failed stream).
    """
    times: list[float] = []
    statuses: dict[str, int] = {}
    with open(logFile) as f:
        for line in f:
            columns = line.split("\t")
            if len(columns) < 3:
                continue
            statuses[columns[1]] = statuses.get(columns[1], 0) + 1
            times.append(int(columns[2]) / 1000.0)
    times.sort()
    return times, statuses


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """
    The nearest-rank percentile of C{ordered} (sorted), or 0 when empty.
    """
    if not ordered:
        return 0.0
    rank = math.ceil(fraction * len(ordered))
    return ordered[min(max(rank, 1), len(ordered)) - 1]


@dataclass
class H2load:
    """
    How to run h2load.
    """

    path: str
    prefix: list[str]
    connections: int
    streams: int

    def command(
        self,
        protocol: str,
        url: str,
        requests: int,
        logFile: Path | None = None,
        connections: int | None = None,
    ) -> list[str]:
        """
        The command line for C{requests} requests to C{url} over
        C{protocol} on L{connections} connections (or C{connections}),
        logging each request to C{logFile} if given.
        """
        options = (["--h1"] if protocol in (H1_TLS, H1) else [f"-m{self.streams}"]) + [
            f"-c{connections or self.connections}",
            f"-n{requests}",
        ]
        if logFile is not None:
            options.append(f"--log-file={logFile}")
        return [*self.prefix, self.path, *options, url]

    def shown(self, protocols: Sequence[str], requests: int) -> str:
        """
        The command lines for C{requests} requests over each of
        C{protocols}, without the pinning prefix, for a port named C{PORT}.
        """
        return "; ".join(
            shlex.join(
                self.command(p, f"{SCHEME[p]}://127.0.0.1:PORT/bench/", requests)[
                    len(self.prefix) :
                ]
            )
            for p in protocols
        )

    def run(
        self,
        protocol: str,
        url: str,
        requests: int,
        watch: dict[str, list[int]],
        logFile: Path | None = None,
        connections: int | None = None,
    ) -> tuple[str, float, dict[str, float], dict[str, int]]:
        """
        Run h2load to its end; as L{runWatching}.
        """
        return runWatching(
            "h2load",
            self.command(protocol, url, requests, logFile, connections),
            RUN_SLACK + requests / FLOOR_RATE,
            watch,
        )


# -- the targets -------------------------------------------------------------


@dataclass
class Target:
    """
    One server over one protocol.
    """

    server: Server
    protocol: str
    url: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        """
        The server's name and the protocol.
        """
        return f"{self.server.name} {self.protocol}"


@dataclass
class Summary:
    """
    One target over every round.
    """

    target: str
    server: str
    protocol: str
    url: str
    requestsPerSecond: float
    rounds: list[float]
    p50ms: float
    p99ms: float
    requests: int
    errors: int
    cpuMicrosecondsPerRequest: float
    cpuPerRequestRounds: list[float]
    cpuPercent: float
    upstreamCpuPercent: float
    rssMiB: float
    tls: str

    @classmethod
    def of(cls, target: Target) -> Summary:
        """
        The summary of C{target}'s runs.
        """

        def median(key: str) -> float:
            return float(statistics.median(run[key] for run in target.runs))

        return cls(
            target=target.label,
            server=target.server.name,
            protocol=target.protocol,
            url=target.url,
            requestsPerSecond=median("requestsPerSecond"),
            rounds=[run["requestsPerSecond"] for run in target.runs],
            p50ms=median("p50ms"),
            p99ms=median("p99ms"),
            requests=sum(run["total"] for run in target.runs),
            errors=sum(run["errors"] for run in target.runs),
            cpuMicrosecondsPerRequest=median("cpuMicrosecondsPerRequest"),
            cpuPerRequestRounds=[
                run["cpuMicrosecondsPerRequest"] for run in target.runs
            ],
            cpuPercent=median("cpuPercent"),
            upstreamCpuPercent=median("upstreamCpuPercent"),
            rssMiB=max(run["rssBytes"] for run in target.runs) / 2**20,
            tls=target.runs[-1]["tls"],
        )


def againstNginx(summaries: Sequence[Summary]) -> dict[str, float]:
    """
    For each protocol measured on both, monedge's CPU per request as a
    multiple of nginx's.
    """
    cpu = {(s.server, s.protocol): s.cpuMicrosecondsPerRequest for s in summaries}
    return {
        protocol: cpu[MONEDGE, protocol] / cpu[NGINX, protocol]
        for protocol in PROTOCOLS
        if (MONEDGE, protocol) in cpu and cpu.get((NGINX, protocol))
    }


def table(summaries: Sequence[Summary]) -> str:
    """
    The results, as a Markdown table aligned for a terminal.
    """
    ratios = againstNginx(summaries)
    header = [
        "server",
        "protocol",
        "req/s (median)",
        "req/s per round",
        "p50 ms",
        "p99 ms",
        "failed",
        "server CPU %",
        "CPU µs/request",
        "upstream CPU %",
        "RSS MiB",
        "CPU/request ÷ nginx's",
    ]
    rows = [
        [
            s.server,
            s.protocol,
            f"{s.requestsPerSecond:,.0f}",
            " / ".join(f"{r:,.0f}" for r in s.rounds),
            f"{s.p50ms:.2f}",
            f"{s.p99ms:.2f}",
            f"{s.errors} of {s.requests:,}",
            f"{s.cpuPercent:.0f}",
            f"{s.cpuMicrosecondsPerRequest:.0f}",
            f"{s.upstreamCpuPercent:.0f}",
            f"{s.rssMiB:.1f}",
            f"{ratios[s.protocol]:.2f}x"
            if s.server == MONEDGE and s.protocol in ratios
            else "",
        ]
        for s in summaries
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|".join(
        ":" + "-" * (w + 1) if i < 2 else "-" * (w + 1) + ":"
        for i, w in enumerate(widths)
    )
    return "\n".join([line(header), f"|{rule}|", *map(line, rows)])


# -- the servers -------------------------------------------------------------


def writeCertificate(directory: Path) -> Path:
    """
    A throwaway certificate for C{localhost} and C{127.0.0.1}'s clients:
    C{directory/default.pem}, its private key then the certificate (the
    form C{--tls-dir} reads, and nginx reads as both its certificate and
    its key).
    """
    from monedge.testing.tls import CertificateAuthority

    directory.mkdir()
    path = directory / "default.pem"
    path.write_bytes(CertificateAuthority().issue(["localhost"]))
    return path


_TROUBLE = re.compile(
    r"Traceback|Unhandled|\b(?:error|crit|alert|emerg)\b", re.IGNORECASE
)


def troubleIn(path: Path, limit: int = 40) -> list[str]:
    """
    The lines of a server's log that look like errors (a traceback, an
    unhandled error, nginx's C{[error]} and worse), at most C{limit}.
    """
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if _TROUBLE.search(line)][:limit]


def waitForPort(server: Server, port: int) -> None:
    """
    Return once C{server} accepts connections on C{port}, besides its own.
    """
    dataclasses.replace(server, port=port).waitUntilListening()


def tlsListen(tlsPort: int) -> str:
    """
    The arguments of nginx's C{listen} directive for h2 and HTTP/1.1 over
    TLS on C{tlsPort} (ALPN chooses).
    """
    return f"127.0.0.1:{tlsPort} ssl http2 backlog=1024"


def monedgeTls(tlsPort: int, certificate: Path) -> list[str]:
    """
    monedge's options for a TLS listener on C{tlsPort} serving
    C{certificate} (see L{writeCertificate}): h2 and HTTP/1.1 by ALPN.
    """
    return [
        "--tls-port",
        f"tcp:{tlsPort}:interface=127.0.0.1:backlog=1024",
        "--tls-dir",
        str(certificate.parent),
    ]


def checkTarget(h2load: H2load, target: Target) -> None:
    """
    Fail unless one request to C{target} gets a 2xx answer over the
    protocol meant.
    """
    output = h2load.run(target.protocol, target.url, 1, {}, None, 1)[0]
    check = parseH2load(output)
    spoken = APPLICATION_PROTOCOL[target.protocol]
    if check.status["2xx"] != 1 or check.protocol != spoken:
        raise BenchError(
            f"{target.label}: one request to {target.url} did not get a "
            f"2xx answer over {spoken}:\n"
            f"{output}\n{target.server.logTail()}"
        )


def measure(
    h2load: H2load,
    target: Target,
    requests: int,
    warmup: int,
    upstream: Server,
    logFile: Path,
) -> dict[str, Any]:
    """
    Load C{target} with C{warmup} untimed requests (none if 0), then with
    C{requests} measured ones, logging each to C{logFile} (removed after);
    add the run to C{target.runs} and return it.
    """
    if warmup:
        h2load.run(target.protocol, target.url, warmup, {})
    watch = {
        "server": processTree(target.server.pid),
        "upstream": [upstream.pid],
    }
    output, elapsed, cpu, peak = h2load.run(
        target.protocol, target.url, requests, watch, logFile
    )
    result = parseH2load(output)
    times, statuses = requestTimes(logFile)
    logFile.unlink()
    if result.protocol != APPLICATION_PROTOCOL[target.protocol]:
        raise BenchError(f"{target.label}: h2load spoke {result.protocol}:\n{output}")
    target.runs.append(
        {
            **asdict(result),
            "errors": result.errors,
            "loggedStatuses": statuses,
            "p50ms": percentile(times, 0.50),
            "p99ms": percentile(times, 0.99),
            "elapsedSeconds": elapsed,
            "cpuSeconds": cpu["server"],
            "cpuMicrosecondsPerRequest": 1e6 * cpu["server"] / max(result.total, 1),
            "cpuPercent": 100.0 * cpu["server"] / elapsed,
            "upstreamCpuPercent": 100.0 * cpu["upstream"] / elapsed,
            "rssBytes": peak["server"],
            "serverPids": watch["server"],
            "h2loadOutput": output,
        }
    )
    return target.runs[-1]


def progress(number: int, rounds: int, target: Target) -> str:
    """
    The line saying how C{target}'s latest run went, in round C{number}
    of C{rounds}; with h2load's report and the server's log after it if
    any request failed.
    """
    latest = target.runs[-1]
    line = (
        f"round {number}/{rounds}  {target.label:22} "
        f"{latest['requestsPerSecond']:10,.0f} req/s  "
        f"{latest['cpuMicrosecondsPerRequest']:6.0f} µs CPU/request  "
        f"p99 {latest['p99ms']:6.2f} ms  failed {latest['errors']}"
    )
    if not latest["errors"]:
        return line
    return (
        f"{line}\n  {target.label}: {latest['errors']} of {latest['total']} "
        f"requests failed; statuses {latest['loggedStatuses']}; h2load said:\n"
        f"{latest['h2loadOutput']}\n  {target.server.name}'s log ends:\n"
        f"{target.server.logTail()}"
    )


def measureRound(
    h2load: H2load,
    targets: Sequence[Target],
    servers: Sequence[Server],
    upstream: Server,
    requests: int,
    warmup: int,
    directory: Path,
    number: int,
    rounds: int,
) -> None:
    """
    Round C{number} of C{rounds}: L{measure} each of C{targets} in turn,
    checking first that every one of C{servers} still runs, and print how
    each went.
    """
    for target in targets:
        for server in servers:
            server.checkAlive()
        measure(h2load, target, requests, warmup, upstream, directory / "requests.log")
        print(progress(number, rounds, target), flush=True)


def ratioLines(summaries: Sequence[Summary]) -> list[str]:
    """
    For each protocol measured on both, monedge's CPU per request as a
    multiple of nginx's, overall and within each round; then the TLS
    versions and ciphers negotiated.
    """
    lines = []
    byKey = {(s.server, s.protocol): s for s in summaries}
    for protocol, ratio in againstNginx(summaries).items():
        each = [
            m / n
            for m, n in zip(
                byKey[MONEDGE, protocol].cpuPerRequestRounds,
                byKey[NGINX, protocol].cpuPerRequestRounds,
                strict=True,
            )
            if n
        ]
        lines.append(
            f"monedge / nginx, {protocol:14} = {ratio:5.2f}x CPU per request; "
            "per round " + " / ".join(f"{r:.2f}" for r in each)
        )
    tls = sorted({f"{s.tls} ({s.server})" for s in summaries if s.tls})
    if tls:
        lines.append(f"TLS negotiated: {', '.join(tls)}")
    return lines


def parseArguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """
    The command line's options, checked.
    """
    parser = argparse.ArgumentParser(
        description="Load monedge and nginx with h2load over HTTP/2 (TLS and "
        "h2c) and HTTP/1.1 over TLS, on loopback, and compare them."
    )
    parser.add_argument(
        "--requests", type=int, default=20000, help="requests per measured run (20000)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="requests of the untimed run before each measured one "
        "(a fifth of --requests)",
    )
    parser.add_argument(
        "--connections", type=int, default=50, help="h2load clients, -c (50)"
    )
    parser.add_argument(
        "--streams",
        type=int,
        default=10,
        help="concurrent streams per HTTP/2 connection, -m (10)",
    )
    parser.add_argument(
        "--no-nginx", action="store_true", help="leave nginx out of the comparison"
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin processes to CPUs"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write the results (bench/results/h2load-<time>.json)",
    )
    parser.add_argument(
        "--no-json", action="store_true", help="do not write the results as JSON"
    )
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = max(args.connections, args.requests // 5)
    if args.rounds < 1 or args.connections < 1 or args.streams < 1:
        parser.error("--rounds, --connections and --streams must be positive")
    if args.requests < args.connections or (
        args.warmup and args.warmup < args.connections
    ):
        parser.error(
            "--requests and --warmup (unless 0) must be at least --connections"
        )
    return args


def benchmark(args: argparse.Namespace, directory: Path) -> None:
    """
    Start the upstream and the servers, with their files in C{directory},
    load every target for every round, stop them, then print the table and
    write the JSON.
    """
    h2loadPath = ensureCommand("h2load", ["nghttp2-client"])
    nginxPath = None if args.no_nginx else ensureNginx()
    serverPin, loadPin = pinning(not args.no_pin)
    about = machine(
        None,
        nginxPath,
        None,
        {"h2load": run([h2loadPath, "--version"]) or "unknown"},
    )
    invocation = shlex.join([sys.executable, *sys.argv])
    certificate = writeCertificate(directory / "tls")

    upstreamPort = freePort()
    registry = directory / "services.yaml"
    writeRegistry(registry, upstreamPort)
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
    servers = [upstream]
    targets: list[Target] = []
    # The port of each server for each protocol.
    ports: dict[tuple[str, str], int] = {}

    # monedge as deployed, its access log to a file, with a TLS listener.
    port, tlsPort = freePort(), freePort()
    monedge = Server(
        MONEDGE,
        [
            *monedgeCommand(
                serverPin, port, freePort(), registry, str(directory / "access.log")
            ),
            *monedgeTls(tlsPort, certificate),
        ],
        port,
        directory / "monedge.log",
    )
    servers.append(monedge)
    ports.update(
        {
            (MONEDGE, H2): tlsPort,
            (MONEDGE, H1_TLS): tlsPort,
            (MONEDGE, H2C): port,
            (MONEDGE, H1): port,
        }
    )
    configs: list[Path] = []
    if nginxPath is not None:
        # nginx takes h2c (with prior knowledge) only on a port of its own.
        port, tlsPort, h2cPort = freePort(), freePort(), freePort()
        config = writeNginxConfig(
            nginxPath,
            directory / "nginx",
            port,
            upstreamPort,
            listen=[
                tlsListen(tlsPort),
                f"127.0.0.1:{h2cPort} http2 backlog=1024",
                f"127.0.0.1:{port} backlog=1024",
            ],
            certificate=certificate,
        )
        nginx = Server(
            NGINX,
            nginxCommand(serverPin, nginxPath, config),
            port,
            directory / "nginx.log",
        )
        servers.append(nginx)
        configs.append(config)
        ports.update(
            {
                (NGINX, H2): tlsPort,
                (NGINX, H1_TLS): tlsPort,
                (NGINX, H2C): h2cPort,
                (NGINX, H1): port,
            }
        )
    # Interleaved: each protocol on monedge, then on nginx.
    for protocol in PROTOCOLS:
        for server in servers[1:]:
            port = ports[server.name, protocol]
            url = f"{SCHEME[protocol]}://127.0.0.1:{port}/bench/"
            targets.append(Target(server, protocol, url))
    h2load = H2load(h2loadPath, loadPin, args.connections, args.streams)

    try:
        for server in servers:
            server.start()
        for server in servers:
            server.waitUntilListening()
            for (name, _), port in ports.items():
                if name == server.name:
                    waitForPort(server, port)
        for target in targets:
            checkTarget(h2load, target)

        print("monedge HTTP/2 benchmark")
        print(f"  command:  {invocation}")
        for key, value in about.items():
            print(f"  {key + ':':9} {value}")
        print(
            f"  load:     {h2load.shown(PROTOCOLS, args.requests)} (each after "
            f"{args.warmup:,} requests of warm-up), {args.rounds} round(s)"
        )
        print(
            "  pinning:  "
            + (
                f"servers on CPU {serverPin[-1]}, upstream and h2load on CPU "
                f"{loadPin[-1]}"
                if serverPin
                else "none"
            )
        )
        for server in servers:
            print(f"  {server.name}: {shlex.join(server.command)}")
        for config in configs:
            print(f"\n  {config.name}:")
            for line in config.read_text().splitlines():
                print(f"    {line}".rstrip())
        print(flush=True)

        for number in range(1, args.rounds + 1):
            measureRound(
                h2load,
                targets,
                servers,
                upstream,
                args.requests,
                args.warmup,
                directory,
                number,
                args.rounds,
            )
        for server in servers:
            server.checkAlive()
    finally:
        stopAll(servers)

    logs = {monedge.name: monedge.logPath}
    for config in configs:
        logs[NGINX] = config.parent / "error.log"
    trouble = {name: troubleIn(path) for name, path in logs.items()}
    summaries = [Summary.of(target) for target in targets]
    ratios = againstNginx(summaries)
    print()
    print(table(summaries))
    print()
    for line in ratioLines(summaries):
        print(line)
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
            path = RESULTS / f"h2load-{stamp}.json"
        document = {
            "command": invocation,
            "machine": about,
            "settings": {
                "requests": args.requests,
                "warmup": args.warmup,
                "rounds": args.rounds,
                "connections": args.connections,
                "streams": args.streams,
                "pinned": not args.no_pin,
            },
            "configs": {config.name: config.read_text() for config in configs},
            "servers": {server.name: server.command for server in servers},
            "summary": [asdict(s) for s in summaries],
            "cpuPerRequestAgainstNginx": ratios,
            "errorsLogged": trouble,
            "runs": {target.label: target.runs for target in targets},
        }
        path.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nresults: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the benchmark; the exit status.
    """
    return runBench(benchmark, parseArguments(argv), "monedge-h2load-")


if __name__ == "__main__":
    sys.exit(main())
