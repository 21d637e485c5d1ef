"""
monedge with thousands of Kubernetes Services (issue 17): how long it takes
to be ready, its memory, its latency at saturation and at a steady rate,
and what admin scrapes, a relist and EndpointSlice churn do to traffic.

    .venv/bin/python bench/scale.py                       (N = 100, 1000, 5000, 10000)
    .venv/bin/python bench/scale.py --sizes 100,10000 --duration 10
    .venv/bin/python bench/scale.py --quick               (N = 50, short phases)

For each N it starts, with the venv's python:

  - bench/scalefake.py C{upstream}: the upstreams, answering every request
    with their port number, on 127.0.0.1, .2 and .3;
  - bench/scalefake.py C{fake}: a L{monedge.testing.kubernetes.FakeKubernetes}
    in its own process, holding N routable Services (C{service-api-s<i>}
    in namespace C{shop}, so C{/s<i>/} on any host) and N that are not
    (C{service-internal-s<i>}, a tier no host serves, and C{worker-s<i>}),
    each shaped like a real API object (labels, annotations with kubectl's
    last-applied configuration, C{managedFields}, a C{uid}, a spec and a
    status; about 7 KB of JSON), and one EndpointSlice each (about 2.4 KB:
    three endpoints with conditions, C{targetRef}, node and zone), the
    routable ones' pointing at the upstreams;
  - C{twistd -n monedge --registry kubernetes --initial-sync-timeout 0s},
    with the fake's kubeconfig and its access log written to a file;

then measures, phase by phase, each bounded in time:

  1. ready: seconds from starting twistd to C{/readyz} answering 200 (with
     C{--initial-sync-timeout 0s}, that is once the first full sync is
     done);
  2. RSS: monedge's VmRSS (/proc) once synced, after a short settle;
  3. saturation: wrk, 1 thread and 50 connections, for C{--duration}
     seconds after a 2-second warm-up, cycling over the N paths
     C{/s<i>/} in order (a Lua script) with C{Host: api.example.com};
     req/s and p99 (wrk C{--latency});
  4. paced: bench/scalefake.py C{paced}, an open-loop client sending 1,000
     requests a second over the N routes (latency counted from when each
     request was due), for C{--duration} seconds: quiet; while
     C{/metrics} is read every 2 s; while C{/routes} is read every
     2 s; p50, p99, max and failures for each, and the size and time of
     the scrapes;
  5. relist: paced traffic, and 2 s in, the fake compacts its history and
     ends both watches with 410 Gone; monedge lists again and watches
     again; the traffic goes on until 2 s after both watches are open
     again (at most 60 s).  The largest latency and the failures among the
     requests due from the 410 until 1 s after both watches are open
     again (an upper bound of the reactor's stall, which also counts the
     upstreams and the paced client, which share a CPU with the fake while
     it serves the lists); and the reactor's own stalls, from monedge's
     C{monedge_reactor_lag_seconds} read before and after the phase: how
     many timers ran over 40 ms late (with timers 10 ms apart, each a
     possible stall over 50 ms), and the smallest bucket bound that holds
     every lag;
  6. churn: paced traffic, and 1 s in, C{--churn-rate} (1,000)
     EndpointSlice updates a second for C{--churn-seconds} (10), cycling
     over all 2N slices, each flipping one of its three endpoints'
     C{ready}; traffic p99 during the churn against the quiet p99.
     Change-to-routing lag meanwhile: one routable Service at a time has
     its slice moved to a second upstream port, whose answer names it, and
     this script polls that route through monedge every 2 ms until the
     new port answers; the lag is from the fake applying the change
     (C{time.monotonic()}, the same clock in every process) to the first
     answer from the new port, then the same back.  Resolution: the 2 ms
     poll plus one request's latency.  And monedge's reactor lag over the
     phase, as for the relist: the bounds holding 99% of the lags and all.

monedge runs pinned to one CPU; the fake, the upstreams, wrk, the paced
client and this script (which reads the admin pages) to the other (as bench/run.py pins).  The
load average is recorded before and after each N.  Results go to
bench/results/scale-<time>.json (or C{--json PATH}); see
docs/performance.md, "Scale (issue 17)".
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import queue
import random
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

from run import (  # noqa: E402
    RESULTS,
    BenchError,
    WrkResult,
    cpuSeconds,
    ensureWrk,
    machine,
    parseWrk,
    pinning,
    rssBytes,
    runBench,
    runWatching,
)

from monedge.testing import freePort  # noqa: E402

HOST = "api.example.com"
SIZES = (100, 1000, 5000, 10000)
START_TIMEOUT = 300.0
SCRAPE_EVERY = 2.0
LAG_POLL = 0.002
LAG_TIMEOUT = 5.0
RELIST_LIMIT = 60.0


class Helper:
    """
    A helper process: a server (the upstreams, monedge) or the fake, whose
    stdout carries JSON lines answering the commands written to its stdin.
    """

    def __init__(
        self,
        name: str,
        command: list[str],
        logPath: Path,
        commands: bool = False,
    ) -> None:
        self.name = name
        self.command = command
        self.logPath = logPath
        self._log: IO[bytes] = open(logPath, "wb")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE if commands else subprocess.DEVNULL,
            stdout=subprocess.PIPE if commands else self._log,
            stderr=self._log,
            start_new_session=True,
            env={
                **os.environ,
                "PYTHONPATH": os.environ.get("BENCH_PYTHONPATH", "") + str(ROOT),
            },
        )
        self._answers: dict[Any, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._ids = 0
        if commands:
            threading.Thread(target=self._read, daemon=True).start()

    def _queue(self, id: Any) -> queue.Queue[dict[str, Any]]:
        with self._lock:
            return self._answers.setdefault(id, queue.Queue())

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                answer = json.loads(line)
            except ValueError:
                continue
            self._queue(answer.get("id")).put(answer)

    def answer(self, id: Any, timeout: float) -> dict[str, Any]:
        """
        The next answer to the command C{id} (L{None}: the unsolicited
        lines).
        """
        try:
            return self._queue(id).get(timeout=timeout)
        except queue.Empty:
            self.checkAlive()
            raise BenchError(
                f"{self.name} did not answer within {timeout:g} s:\n{self.logTail()}"
            ) from None

    def send(self, do: str, **arguments: Any) -> Any:
        """
        Send a command; its id, for L{answer}.
        """
        with self._lock:
            self._ids += 1
            id = self._ids
        assert self.process.stdin is not None
        self.process.stdin.write(
            json.dumps({"id": id, "do": do, **arguments}).encode() + b"\n"
        )
        self.process.stdin.flush()
        return id

    def checkAlive(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(
                f"{self.name} exited ({self.process.returncode}):\n{self.logTail()}"
            )

    def logTail(self, size: int = 3000) -> str:
        try:
            return self.logPath.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
        self._log.close()


def getStatus(url: str, timeout: float = 2.0) -> int:
    """
    The status of a GET of C{url}, or 0 if it failed.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read()
            status: int = response.status
            return status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def cpuTimes() -> dict[str, tuple[int, int]]:
    """
    Each CPU's busy and total jiffies so far, from /proc/stat.
    """
    times = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu":
                ticks = [int(x) for x in fields[:8]]
                idle = ticks[3] + ticks[4]
                times[name] = (sum(ticks) - idle, sum(ticks))
    return times


class Usage:
    """
    CPU use from now until L{done}: monedge's, in percent of one CPU, and
    how busy each CPU was (everything on it, other work on the machine
    included).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.started = time.monotonic()
        self.monedge = cpuSeconds(pid)
        self.cpus = cpuTimes()

    def done(self) -> dict[str, float]:
        elapsed = time.monotonic() - self.started
        usage = {
            "monedgeCpuPercent": round(
                100 * (cpuSeconds(self.pid) - self.monedge) / elapsed, 1
            )
        }
        for name, (busy, total) in cpuTimes().items():
            before = self.cpus.get(name, (0, 0))
            usage[f"{name}BusyPercent"] = round(
                100 * (busy - before[0]) / max(1, total - before[1]), 1
            )
        return usage


# -- figures -------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """
    The C{fraction} quantile of C{values} (nearest rank), 0 for none.
    """
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(fraction * len(ordered) + 0.5)) - 1))
    return ordered[rank]


@dataclass
class Paced:
    """
    What a paced run saw, over all of it or a window of it.
    """

    requests: int
    failed: int
    p50ms: float
    p99ms: float
    maxms: float

    @classmethod
    def of(
        cls, run: dict[str, Any], since: float = 0.0, until: float = float("inf")
    ) -> Paced:
        latencies, failed = [], 0
        for due, latency, status in zip(
            run["due"], run["latencyMs"], run["status"], strict=True
        ):
            if since <= due <= until:
                latencies.append(latency)
                failed += status != 200
        return cls(
            requests=len(latencies),
            failed=failed,
            p50ms=percentile(latencies, 0.5),
            p99ms=percentile(latencies, 0.99),
            maxms=max(latencies, default=0.0),
        )


@dataclass
class Size:
    """
    Every figure for one N.
    """

    services: int
    loadBefore: tuple[float, float, float]
    readySeconds: float = 0.0
    rssMiB: float = 0.0
    rssAfterMiB: float = 0.0
    saturation: dict[str, Any] = field(default_factory=dict)
    paced: dict[str, dict[str, Any]] = field(default_factory=dict)
    scrapes: dict[str, dict[str, Any]] = field(default_factory=dict)
    relist: dict[str, Any] = field(default_factory=dict)
    churn: dict[str, Any] = field(default_factory=dict)
    loadAfter: tuple[float, float, float] = (0.0, 0.0, 0.0)
    fake: dict[str, Any] = field(default_factory=dict)


# -- phases --------------------------------------------------------------------


class Bench:
    def __init__(
        self, args: argparse.Namespace, directory: Path, proxyPin: list[str]
    ) -> None:
        self.args = args
        self.directory = directory
        self.proxyPin = proxyPin
        self.wrk = ensureWrk()
        self.monedgePid = 0

    def paced(
        self,
        port: int,
        routes: int,
        seconds: float,
        during: Callable[[float], dict[str, Any]] | None = None,
        stopAfterDuring: bool = False,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """
        Run the paced client for C{seconds}; meanwhile, C{during(started)}
        in this thread, after which, if C{stopAfterDuring}, the client is
        stopped.  The client's record, and what C{during} returned.
        """
        out = self.directory / f"paced-{time.monotonic_ns()}.json"
        command = [
            sys.executable,
            str(BENCH / "scalefake.py"),
            "paced",
            "--port",
            str(port),
            "--rate",
            str(self.args.rate),
            "--duration",
            str(seconds),
            "--routes",
            str(routes),
            "--out",
            str(out),
        ]
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={
                **os.environ,
                "PYTHONPATH": os.environ.get("BENCH_PYTHONPATH", "") + str(ROOT),
            },
        )
        started = time.monotonic()
        usage = Usage(self.monedgePid)
        extra: dict[str, Any] = {}
        try:
            if during is not None:
                extra = during(started)
                if stopAfterDuring and process.poll() is None:
                    process.send_signal(signal.SIGUSR1)
            _, errors = process.communicate(timeout=seconds + 60)
            extra["cpu"] = usage.done()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if process.returncode != 0:
            raise BenchError(
                f"the paced client exited {process.returncode}: "
                f"{shlex.join(command)}\n{errors.decode(errors='replace')}"
            )
        record: dict[str, Any] = json.loads(out.read_text())
        out.unlink()
        return record, extra

    def scraping(self, url: str, seconds: float) -> Callable[[float], dict[str, Any]]:
        """
        A C{during} for L{paced}: GET C{url} every L{SCRAPE_EVERY} seconds
        for C{seconds}, one at a time.
        """

        def during(started: float) -> dict[str, Any]:
            times, sizes, statuses = [], [], []
            next = started + 0.25
            while next < started + seconds - 0.1:
                time.sleep(max(0.0, next - time.monotonic()))
                began = time.monotonic()
                code, size = 0, 0
                try:
                    with urllib.request.urlopen(url, timeout=30) as response:
                        code = response.status
                        while chunk := response.read(1 << 16):
                            size += len(chunk)
                except urllib.error.HTTPError as e:
                    code = e.code
                except OSError:
                    pass
                statuses.append(code)
                sizes.append(size)
                times.append(time.monotonic() - began)
                next += SCRAPE_EVERY
            return {
                "scrapes": len(times),
                "statuses": sorted(set(statuses)),
                "bytes": max(sizes, default=0),
                "secondsMax": max(times, default=0.0),
                "secondsMedian": statistics.median(times) if times else 0.0,
            }

        return during

    def one(self, n: int, upstreamPort: int, markerPort: int) -> Size:
        args = self.args
        size = Size(n, os.getloadavg())
        log = self.directory / f"n{n}"
        log.mkdir()
        kubeconfig = log / "kubeconfig"
        fake = Helper(
            "fake API server",
            [
                sys.executable,
                str(BENCH / "scalefake.py"),
                "fake",
                "--count",
                str(n),
                "--upstream-port",
                str(upstreamPort),
                "--kubeconfig",
                str(kubeconfig),
            ],
            log / "fake.log",
            commands=True,
        )
        monedge: Helper | None = None
        try:
            size.fake = fake.answer(None, START_TIMEOUT)
            print(
                f"N={n:,}: the fake holds {size.fake['services']:,} Services "
                f"(built in {size.fake['seconds']:.1f} s)",
                flush=True,
            )
            port, adminPort = freePort(), freePort()
            admin = f"http://127.0.0.1:{adminPort}"
            twistd = str(Path(sys.executable).parent / "twistd")
            accessLog = log / "access.log"
            monedge = Helper(
                "monedge",
                [
                    *self.proxyPin,
                    twistd,
                    "-n",
                    "--pidfile=",
                    "monedge",
                    "--port",
                    f"tcp:{port}:interface=127.0.0.1:backlog=1024",
                    "--admin-port",
                    f"tcp:{adminPort}:interface=127.0.0.1",
                    "--registry",
                    "kubernetes",
                    "--kubeconfig",
                    str(kubeconfig),
                    "--initial-sync-timeout",
                    "0s",
                    "--access-log",
                    str(accessLog),
                    "--drain-delay",
                    "0s",
                ],
                log / "monedge.log",
            )
            self.monedgePid = monedge.process.pid
            # 1. ready
            deadline = monedge.started + START_TIMEOUT
            while getStatus(admin + "/readyz", 1.0) != 200:
                monedge.checkAlive()
                if time.monotonic() > deadline:
                    raise BenchError(f"monedge not ready within {START_TIMEOUT:g} s")
                time.sleep(0.02)
            size.readySeconds = time.monotonic() - monedge.started
            # 2. RSS, once synced and settled
            time.sleep(args.settle)
            size.rssMiB = rssBytes(monedge.process.pid) / 2**20
            for index in {0, n - 1}:
                status, body = get(port, index)
                if (status, body) != (200, f"{upstreamPort}\n".encode()):
                    raise BenchError(
                        f"/s{index}/ answered {status} {body[:200]!r}, not the upstream"
                    )
            print(
                f"  ready after {size.readySeconds:.2f} s, RSS {size.rssMiB:.0f} MiB",
                flush=True,
            )
            # 3. saturation
            size.saturation = self.saturate(port, n, monedge.process.pid)
            print(
                f"  saturation: {size.saturation['requestsPerSecond']:,.0f} req/s, "
                f"p99 {size.saturation['p99ms']:.1f} ms, "
                f"{size.saturation['errors']} errors "
                + cpuText(size.saturation["cpu"]),
                flush=True,
            )
            # 4. paced: quiet, /metrics, /routes
            for label, path in (
                ("quiet", None),
                ("metrics", "/metrics"),
                ("routes", "/routes"),
            ):
                during = (
                    None if path is None else self.scraping(admin + path, args.duration)
                )
                logged = accessLog.stat().st_size
                record, scrapes = self.paced(port, n, args.duration, during)
                size.paced[label] = asdict(Paced.of(record))
                size.paced[label]["cpu"] = scrapes.pop("cpu")
                size.paced[label]["monedge"] = ownLatency(
                    accessLog, logged, 0.0, float("inf")
                )
                if path is not None:
                    size.scrapes[label] = scrapes
                described = describe(size.paced[label])
                if path is not None:
                    described += (
                        f"; {scrapes['scrapes']} scrapes of "
                        f"{scrapes['bytes'] / 1e6:.2f} MB, up to "
                        f"{scrapes['secondsMax']:.2f} s"
                    )
                print(
                    f"  paced, {label}: {described} "
                    + cpuText(size.paced[label]["cpu"]),
                    flush=True,
                )
            monedge.checkAlive()
            # 5. relist
            size.relist = self.relist(fake, port, n, admin)
            print(
                f"  relist: watching again {size.relist['watchingAfterSeconds']:.2f} s "
                f"after the 410; reactor stalls over 50 ms: "
                f"{size.relist['stallsOver50ms']:.0f} (every lag at most "
                f"{size.relist['worstStallBucket']} s); "
                f"in that window max {size.relist['window']['maxms']:.0f} ms, "
                f"p99 {size.relist['window']['p99ms']:.1f} ms, "
                f"{size.relist['window']['failed']} failed; whole run "
                f"{size.relist['whole']['failed']} failed "
                + cpuText(size.relist["cpu"]),
                flush=True,
            )
            # 6. churn
            size.churn = self.churn(
                fake, port, n, upstreamPort, markerPort, admin, accessLog
            )
            print(
                f"  churn: {size.churn['updatesPerSecond']:,.0f} updates/s; traffic "
                f"p99 {size.churn['during']['p99ms']:.1f} ms (quiet "
                f"{size.paced['quiet']['p99ms']:.1f} ms), max "
                f"{size.churn['during']['maxms']:.0f} ms, "
                f"{size.churn['during']['failed']} failed; lag p99 "
                f"{size.churn['lagP99ms']:.0f} ms over "
                f"{len(size.churn['lagsMs'])} changes; monedge's own p99 "
                f"{size.churn['monedgeDuring']['p99ms']:.1f} ms (quiet "
                f"{size.paced['quiet']['monedge']['p99ms']:.1f} ms); "
                "reactor lag p99 at most "
                f"{size.churn['lagP99Bucket']} s, every lag at most "
                f"{size.churn['worstStallBucket']} s " + cpuText(size.churn["cpu"]),
                flush=True,
            )
            size.rssAfterMiB = rssBytes(monedge.process.pid) / 2**20
            monedge.checkAlive()
        finally:
            if monedge is not None:
                monedge.stop()
            try:
                fake.send("quit")
            except OSError:
                pass
            fake.stop()
        size.loadAfter = os.getloadavg()
        return size

    def saturate(self, port: int, n: int, pid: int) -> dict[str, Any]:
        script = self.directory / f"routes-{n}.lua"
        script.write_text(
            f"""\
-- Written by bench/scale.py: GET /s0/ .. /s{n - 1}/ in turn.
local n = {n}
local i = 0
local headers = {{["Host"] = "{HOST}"}}
request = function()
  local path = "/s" .. i .. "/"
  i = (i + 1) % n
  return wrk.format("GET", path, headers)
end
"""
        )

        def wrk(seconds: int) -> tuple[WrkResult, str]:
            command = [
                self.wrk,
                "-t1",
                "-c50",
                f"-d{seconds}s",
                "--latency",
                "-s",
                str(script),
                f"http://127.0.0.1:{port}/",
            ]
            output, _, _, _ = runWatching("wrk", command, seconds + 30, {})
            return parseWrk(output), output

        # wrk takes whole seconds.
        wrk(max(1, round(self.args.warmup)))
        seconds = max(1, round(self.args.duration))
        usage = Usage(pid)
        result, output = wrk(seconds)
        return {
            "requestsPerSecond": result.requestsPerSecond,
            "requests": result.requests,
            "p50ms": result.p50ms,
            "p99ms": result.p99ms,
            "errors": result.errors,
            "seconds": seconds,
            "cpu": usage.done(),
            "wrk": output,
        }

    def relist(self, fake: Helper, port: int, n: int, admin: str) -> dict[str, Any]:
        # Until both watches are open again and 2 s more, or RELIST_LIMIT.
        seconds = RELIST_LIMIT
        lagsBefore = reactorLags(admin)

        def during(started: float) -> dict[str, Any]:
            time.sleep(max(0.0, started + 2.0 - time.monotonic()))
            id = fake.send("relist")
            at = fake.answer(id, 30)["at"]
            watching = fake.answer(id, seconds)
            time.sleep(max(0.0, watching["at"] + 2.0 - time.monotonic()))
            return {"at": at, "watching": watching}

        record, extra = self.paced(port, n, seconds, during, stopAfterDuring=True)
        at, watching = extra["at"], extra["watching"]
        if watching["watches"] < 2:
            raise BenchError(f"monedge did not watch again after the 410: {watching}")
        return {
            **lagSummary(lagsBefore, reactorLags(admin)),
            "watchingAfterSeconds": watching["at"] - at,
            "listPages": watching["listPages"],
            "window": asdict(Paced.of(record, at, watching["at"] + 1.0)),
            "whole": asdict(Paced.of(record)),
            "cpu": extra["cpu"],
        }

    def churn(
        self,
        fake: Helper,
        port: int,
        n: int,
        upstreamPort: int,
        markerPort: int,
        admin: str,
        accessLog: Path,
    ) -> dict[str, Any]:
        args = self.args
        seconds = args.churn_seconds + 2.0

        def during(started: float) -> dict[str, Any]:
            time.sleep(max(0.0, started + 1.0 - time.monotonic()))
            id = fake.send("churn", rate=args.churn_rate, seconds=args.churn_seconds)
            churnStarted = time.monotonic()
            lags: list[float] = []
            timeouts = 0
            chooser = random.Random(2)
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                while time.monotonic() < churnStarted + args.churn_seconds - 0.5:
                    index = chooser.randrange(n)
                    for target in (markerPort, upstreamPort):
                        moved = fake.send("move", index=index, port=target)
                        applied = fake.answer(moved, 10)["at"]
                        wanted = f"{target}\n".encode()
                        while True:
                            status, body = get(port, index, connection)
                            seen = time.monotonic()
                            if body == wanted:
                                lags.append((seen - applied) * 1000)
                                break
                            if seen - applied > LAG_TIMEOUT:
                                timeouts += 1
                                break
                            time.sleep(LAG_POLL)
                    time.sleep(0.02)
            finally:
                connection.close()
            done = fake.answer(id, args.churn_seconds + 60)
            return {
                "started": churnStarted,
                "lags": lags,
                "timeouts": timeouts,
                "done": done,
            }

        lagsBefore = reactorLags(admin)
        logged = accessLog.stat().st_size
        record, extra = self.paced(port, n, seconds, during)
        done = extra["done"]
        lags = extra["lags"]
        return {
            **lagSummary(lagsBefore, reactorLags(admin)),
            "monedgeDuring": ownLatency(
                accessLog,
                logged,
                extra["started"],
                extra["started"] + args.churn_seconds,
            ),
            "updates": done["updates"],
            "updatesPerSecond": done["updates"] / done["seconds"],
            "during": asdict(
                Paced.of(
                    record, extra["started"], extra["started"] + args.churn_seconds
                )
            ),
            "whole": asdict(Paced.of(record)),
            "lagsMs": [round(lag, 2) for lag in lags],
            "lagP50ms": percentile(lags, 0.5),
            "lagP99ms": percentile(lags, 0.99),
            "lagMaxms": max(lags, default=0.0),
            "lagTimeouts": extra["timeouts"],
            "cpu": extra["cpu"],
        }


def get(
    port: int, index: int, connection: http.client.HTTPConnection | None = None
) -> tuple[int, bytes]:
    """
    GET C{/s<index>/} through monedge; its status and body (0 and the error
    if it failed).
    """
    own = connection is None
    if connection is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", f"/s{index}/", headers={"Host": HOST})
        response = connection.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException) as e:
        connection.close()
        return 0, str(e).encode()
    finally:
        if own:
            connection.close()


def reactorLags(admin: str) -> dict[str, float]:
    """
    monedge's C{monedge_reactor_lag_seconds} histogram from its C{/metrics}:
    the cumulative count at each bucket's bound (C{"0.05"}, ..., C{"+Inf"}).
    """
    counts: dict[str, float] = {}
    with urllib.request.urlopen(admin + "/metrics", timeout=30) as response:
        for line in response:
            if line.startswith(b"monedge_reactor_lag_seconds_bucket{"):
                bound = line.split(b'le="', 1)[1].split(b'"', 1)[0].decode()
                counts[bound] = float(line.rsplit(b" ", 1)[1])
    return counts


def ownLatency(
    accessLog: Path, offset: int, since: float, until: float
) -> dict[str, float]:
    """
    monedge's own share of the requests in its access log from byte
    C{offset} on that ended between C{since} and C{until}
    (C{time.monotonic()}) with a 200: each one's C{total_latency} less its
    C{upstream_latency}, so neither the upstreams nor the paced client (on
    the other CPU) count.  Its p50, p99 and largest, in milliseconds.
    """
    wall = time.time() - time.monotonic()
    own = []
    with open(accessLog, "rb") as f:
        f.seek(offset)
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("status") != 200 or entry.get("total_latency") is None:
                continue
            ended = datetime.datetime.fromisoformat(entry["time"]).timestamp() - wall
            if since <= ended <= until:
                upstream = entry.get("upstream_latency") or 0.0
                own.append((entry["total_latency"] - upstream) * 1000)
    return {
        "requests": len(own),
        "p50ms": percentile(own, 0.5),
        "p99ms": percentile(own, 0.99),
        "maxms": max(own, default=0.0),
    }


def lagSummary(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """
    What L{reactorLags} read C{before} and C{after} a phase say of it: the
    histogram of the phase's lags, how many may be stalls over 50 ms (with
    timers 10 ms apart, the lags over 40 ms), the smallest bound holding
    every lag and the smallest holding 99% of them.
    """
    lags = {bound: count - before.get(bound, 0) for bound, count in after.items()}
    total = lags.get("+Inf", 0)
    return {
        "reactorLags": lags,
        "stallsOver50ms": total - lags.get("0.04", 0),
        "worstStallBucket": next((b for b, c in lags.items() if c == total), "+Inf"),
        "lagP99Bucket": next((b for b, c in lags.items() if c >= 0.99 * total), "+Inf"),
    }


def cpuText(cpu: dict[str, float]) -> str:
    """
    monedge's CPU use and each CPU's, for the progress lines.
    """
    cpus = ", ".join(
        f"{name.removesuffix('BusyPercent')} {value:.0f}%"
        for name, value in cpu.items()
        if name.endswith("BusyPercent")
    )
    return f"[monedge {cpu['monedgeCpuPercent']:.0f}% CPU; busy: {cpus}]"


def describe(paced: dict[str, Any]) -> str:
    return (
        f"p50 {paced['p50ms']:.1f} ms, p99 {paced['p99ms']:.1f} ms, max "
        f"{paced['maxms']:.0f} ms, {paced['failed']} of {paced['requests']:,} failed"
    )


# -- output ----------------------------------------------------------------------


def tables(sizes: Sequence[Size]) -> str:
    def rows(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
        widths = [
            max(len(row[i]) for row in [header, *body]) for i in range(len(header))
        ]

        def line(cells: Sequence[str]) -> str:
            return (
                "| "
                + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
                + " |"
            )

        return [
            line(header),
            "|" + "|".join("-" * (w + 2) for w in widths) + "|",
            *(line(row) for row in body),
        ]

    first = rows(
        [
            "N",
            "ready after start",
            "RSS",
            "req/s (wrk, 50 conns)",
            "p99 at saturation",
            "load before/after",
        ],
        [
            [
                f"{s.services:,}",
                f"{s.readySeconds:.1f} s",
                f"{s.rssMiB:.0f} MiB",
                f"{s.saturation['requestsPerSecond']:,.0f}",
                f"{s.saturation['p99ms']:.1f} ms",
                f"{s.loadBefore[0]:.2f} / {s.loadAfter[0]:.2f}",
            ]
            for s in sizes
        ],
    )

    def cell(p: dict[str, Any]) -> str:
        failed = f", {p['failed']} failed" if p["failed"] else ""
        return f"{p['p99ms']:.1f} / {p['maxms']:.0f} ms{failed}"

    second = rows(
        [
            "N",
            "paced 1,000/s p99 / max: quiet",
            "/metrics every 2 s",
            "/routes every 2 s",
            "relist: reactor stalls > 50 ms, max latency, failed",
            "churn: p99 / max",
            "churn lag p99",
        ],
        [
            [
                f"{s.services:,}",
                cell(s.paced["quiet"]),
                cell(s.paced["metrics"])
                + f" ({s.scrapes['metrics']['bytes'] / 1e6:.1f} MB, "
                f"{s.scrapes['metrics']['secondsMax']:.2f} s)",
                cell(s.paced["routes"])
                + f" ({s.scrapes['routes']['bytes'] / 1e6:.1f} MB, "
                f"{s.scrapes['routes']['secondsMax']:.2f} s)",
                f"{s.relist['stallsOver50ms']:.0f}, {s.relist['window']['maxms']:.0f} ms, {s.relist['whole']['failed']}",
                cell(s.churn["during"])
                + f" ({s.churn['updatesPerSecond']:,.0f} updates/s)",
                f"{s.churn['lagP99ms']:.0f} ms",
            ]
            for s in sizes
        ],
    )
    return "\n".join(first) + "\n\n" + "\n".join(second)


def parseArguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="monedge on the Kubernetes registry with N Services: "
        "ready time, memory, saturation, paced latency under admin scrapes, "
        "a relist and EndpointSlice churn."
    )
    parser.add_argument(
        "--sizes",
        default=",".join(map(str, SIZES)),
        help="the numbers of routable Services, comma-separated "
        f"({','.join(map(str, SIZES))})",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=10,
        help="seconds of each saturation and paced run (10)",
    )
    parser.add_argument(
        "--warmup", type=float, default=2, help="wrk warm-up seconds (2)"
    )
    parser.add_argument(
        "--settle", type=float, default=2, help="seconds after ready before RSS (2)"
    )
    parser.add_argument(
        "--rate", type=float, default=1000, help="paced requests a second (1000)"
    )
    parser.add_argument(
        "--churn-rate",
        type=float,
        default=1000,
        help="EndpointSlice updates a second (1000)",
    )
    parser.add_argument(
        "--churn-seconds", type=float, default=10, help="seconds of churn (10)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run: N = 50, 2-second phases, 3 s of churn",
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin processes to CPUs"
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="where to write the results (bench/results/scale-<time>.json)",
    )
    parser.add_argument(
        "--no-json", action="store_true", help="do not write the results as JSON"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = "50"
        args.duration = 2.0
        args.warmup = 1.0
        args.settle = 0.5
        args.churn_seconds = 3.0
    try:
        args.sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error("--sizes: comma-separated integers")
    if min(args.sizes) < 1 or args.duration <= 0 or args.churn_seconds <= 1:
        parser.error("--sizes, --duration must be positive, --churn-seconds above 1")
    return args


def benchmark(args: argparse.Namespace, directory: Path) -> None:
    proxyPin, loadPin = pinning(not args.no_pin)
    about = machine(ensureWrk(), None, None)
    if loadPin:
        # This script, and everything it starts but monedge, on the other CPU.
        os.sched_setaffinity(0, {int(loadPin[-1])})
    invocation = shlex.join([sys.executable, *sys.argv])
    # monedge runs from this tree: its modules compiled first, as an install
    # compiles them, so that ready time does not count compiling them
    # (PYTHONDONTWRITEBYTECODE would make every start compile them again).
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "monedge", "twisted"],
        cwd=ROOT,
        check=True,
    )
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    upstreamPort, markerPort = freePort(), freePort()
    upstream = Helper(
        "upstreams",
        [
            sys.executable,
            str(BENCH / "scalefake.py"),
            "upstream",
            "--port",
            str(upstreamPort),
            "--port",
            str(markerPort),
        ],
        directory / "upstream.log",
    )
    bench = Bench(args, directory, proxyPin)
    sizes: list[Size] = []
    try:
        deadline = time.monotonic() + 30
        while get(upstreamPort, 0)[0] != 200:
            upstream.checkAlive()
            if time.monotonic() > deadline:
                raise BenchError("the upstreams did not answer within 30 s")
            time.sleep(0.05)
        for n in args.sizes:
            sizes.append(bench.one(n, upstreamPort, markerPort))
    finally:
        upstream.stop()
    print()
    print(tables(sizes))
    if not args.no_json:
        path = args.json
        if path is None:
            stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
            RESULTS.mkdir(exist_ok=True)
            path = RESULTS / f"scale-{stamp}.json"
        document = {
            "command": invocation,
            "machine": about,
            "settings": {
                key: value
                for key, value in vars(args).items()
                if key not in ("json", "no_json")
            },
            "sizes": [asdict(s) for s in sizes],
        }
        path.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nresults: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the benchmark; the exit status.
    """
    return runBench(benchmark, parseArguments(argv), "monedge-scale-")


if __name__ == "__main__":
    sys.exit(main())
