"""
monedge's throughput benchmark: one command, loopback only, a few minutes.

    .venv/bin/python bench/run.py          (or: make bench)

It starts a tiny Twisted upstream (bench/upstream.py) that answers every
request with C{hello\\n}, then loads it with wrk through:

  - monedge with every default feature on, its access log written to a
    file; and with C{--access-log none}, to show what the log costs;
  - monedge as deployed with issue 18's three built-in hooks on
    (C{--hooks}: C{auth} in jwt mode, C{ratelimit} in memory at a rate it
    never refuses, C{headers} with two request and two response rules, as
    docs/performance.md's "Hooks" shows them), every request carrying
    C{Authorization: Bearer TOKEN} (wrk's C{-H}): an RS256 token signed by
    an RSA key made for the run, whose JWK set a thread of the bench serves
    on loopback.  Before loading, a request with the token must answer 200
    and one without it 401.  C{--no-hooks} leaves it out;
  - a minimal ~100-line Agent proxy (bench/minimal.py), and the same on
    monedge's own upstream client (C{--client fast}): the floor of a
    C{twisted.web} resource-tree proxy with none of monedge's features;
  - Twisted's own C{ReverseProxyResource} (bench/rpr.py);
  - nginx, one worker, with a keep-alive upstream pool (installed with
    apt-get if missing; C{--no-nginx} leaves it out);
  - HAProxy, one thread, with C{http-reuse always} (installed with apt-get
    if missing; C{--no-haproxy} leaves it out);
  - nothing at all ("direct": wrk at the upstream itself).

Then, unless C{--no-h2}, monedge (the first row's process, which also
listens for TLS) and nginx (which also listens with C{ssl http2}) are
loaded with h2load over TLS, with bench/h2load.py's functions and a
throwaway certificate: C{h2load -c50 -m10} (HTTP/2, ALPN h2) and
C{h2load --h1 -c50} (HTTP/1.1), C{--h2-requests} requests a run (h2load
is installed with apt-get, Debian's C{nghttp2-client}, if missing).

nginx and HAProxy run as the bench's own foreground instances, with
configurations written to its temporary directory; their system services
are neither enabled nor started.

The proxy under test runs pinned to one CPU, the upstream and the load
generator to another.  Every target is run once per round, after a short
warm-up; the table shows the median over rounds, the server's CPU (all its
processes: nginx's master and worker) and peak RSS, its req/s per CPU
second, and monedge's req/s as a multiple of each target's.  The h2load
table shows req/s, the server's CPU time per request, p50 and p99, failed
requests, and monedge's CPU per request as a multiple of nginx's.  Last,
each of issue 18's targets that the run's rows measure, as a ratio, and
whether the run met it: monedge's req/s against ReverseProxyResource's
(at least 3x), its requests per CPU second against nginx's (at least
0.6x), its p99 against nginx's (at most 2x), the hooks row's req/s against
ReverseProxyResource's (at least 2x), and over TLS monedge's CPU per
request against nginx's (at most 2x, for HTTP/2 and HTTP/1.1).  The JSON in
bench/results holds all of it.  See docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# The tree's monedge, as for the servers it starts (PYTHONPATH=ROOT).
sys.path.insert(0, str(ROOT))
# Run as a script, this module is __main__, and bench/h2load.py, which it
# imports for the HTTP/2 and TLS rows, imports it as run: make that this
# very module, so that both share its classes (a BenchError above all).
sys.modules.setdefault("run", sys.modules[__name__])

from monedge.testing import freePort  # noqa: E402

if TYPE_CHECKING:
    import h2load

RESULTS = BENCH / "results"
SERVICE = "service.api.bench"
BODY = b"hello\n"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE_INTERVAL = 0.25
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

MONEDGE = "monedge"
MONEDGE_QUIET = "monedge (access log off)"
HOOKED = "monedge (auth, ratelimit, headers)"
RPR = "ReverseProxyResource"
MINIMAL = "minimal Agent proxy"
FLOOR = "minimal proxy, monedge's client"
NGINX = "nginx"
HAPROXY = "HAProxy"
DIRECT = "direct"

# h2load's clients and streams per HTTP/2 connection for the TLS rows, as
# issue 18 states its HTTP/2 target.
H2_CONNECTIONS = 50
H2_STREAMS = 10
# The key id of the JWK set the hooks row's auth hook fetches.
KID = "bench"


class BenchError(Exception):
    """
    The benchmark cannot run; the message says why.
    """


# -- the machine -------------------------------------------------------------


def run(command: Sequence[str]) -> str:
    """
    Run a short command; its stdout and stderr, or an empty string.
    """
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


class _Apt:
    """
    Installs Debian packages, running C{apt-get update} at most once.
    """

    updated = False

    @classmethod
    def install(cls, packages: Sequence[str]) -> str | None:
        """
        Install C{packages} non-interactively; C{None}, or why it failed.
        """
        apt = shutil.which("apt-get")
        if apt is None or os.geteuid() != 0:
            return "installing needs apt-get, as root"
        environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        commands = [] if cls.updated else [[apt, "update", "-qq"]]
        commands.append([apt, "install", "-y", "-qq", *packages])
        for command in commands:
            done = subprocess.run(
                command,
                env=environment,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                return (
                    f"`{shlex.join(command)}` exited {done.returncode}:\n"
                    f"{(done.stdout + done.stderr).strip()[-2000:]}"
                )
            if command[1] == "update":
                cls.updated = True
        return None


def which(command: str) -> str | None:
    """
    The path of C{command}, looking in the sbin directories too (Debian
    installs nginx and haproxy there, off an ordinary user's PATH).
    """
    path = os.pathsep.join(
        [os.environ.get("PATH", os.defpath), "/usr/local/sbin", "/usr/sbin", "/sbin"]
    )
    return shutil.which(command, path=path)


def ensureCommand(command: str, choices: Sequence[str], skip: str = "") -> str:
    """
    The path of C{command}, installing the first of the Debian packages
    C{choices} that installs if it is missing.  C{skip} names the option
    that leaves it out, for the message when it cannot be installed.
    """
    found = which(command)
    if found:
        return found
    otherwise = f" (or run with {skip} to leave it out)" if skip else ""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise BenchError(
            f"{command} is not installed, and it cannot be installed from here "
            "(installing needs apt-get, as root): install it with "
            f"`sudo apt-get install {choices[0]}`, then run this again{otherwise}."
        )
    failures = []
    for package in choices:
        print(
            f"{command} is not installed: installing {package} with apt-get ...",
            flush=True,
        )
        failure = _Apt.install([package])
        found = which(command)
        if failure is None and found:
            return found
        failures.append(
            f"{package}: {failure or f'installed, but {command} is not on PATH'}"
        )
    raise BenchError(f"could not install {command}{otherwise}:\n" + "\n".join(failures))


def ensureWrk() -> str:
    """
    The path of wrk, installing Debian's package first if it is missing.
    """
    return ensureCommand("wrk", ["wrk"])


def ensureNginx() -> str:
    """
    The path of nginx, installing Debian's C{nginx-light} (or C{nginx})
    first if it is missing.  The bench runs its own instance: it neither
    enables nor starts the system service.
    """
    return ensureCommand("nginx", ["nginx-light", "nginx"], "--no-nginx")


def ensureHaproxy() -> str:
    """
    The path of haproxy, installing Debian's package first if it is
    missing.  The bench runs its own instance: it neither enables nor
    starts the system service.
    """
    return ensureCommand("haproxy", ["haproxy"], "--no-haproxy")


def pinning(enabled: bool) -> tuple[list[str], list[str]]:
    """
    Command prefixes that pin the proxy under test to one CPU, and the
    upstream and wrk to another.
    """
    if not enabled:
        return [], []
    taskset = shutil.which("taskset")
    if taskset is None:
        raise BenchError(
            "taskset is missing (Debian: apt-get install util-linux); "
            "or run with --no-pin"
        )
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise BenchError(
            f"pinning needs two CPUs and only {cpus} are available; run with --no-pin"
        )
    return [taskset, "-c", str(cpus[0])], [taskset, "-c", str(cpus[1])]


def cpuModel() -> str:
    """
    The CPU's model name, from /proc/cpuinfo.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() in ("model name", "Model", "Hardware"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def treeState() -> str:
    """
    The commit of the tree measured, and how many tracked files differ from
    it (read-only: no index refresh is written).
    """
    commit = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    if not commit or " " in commit:
        return "unknown"
    changed = run(
        [
            "git",
            "--no-optional-locks",
            "-C",
            str(ROOT),
            "status",
            "--porcelain",
            "--untracked-files=no",
        ]
    ).splitlines()
    if changed:
        return f"{commit} with uncommitted changes to {len(changed)} tracked file(s)"
    return commit


def machine(
    wrk: str | None,
    nginx: str | None,
    haproxy: str | None,
    tools: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """
    What the figures were measured on: the machine, and the versions of
    wrk, nginx and HAProxy (each left out when C{None}) and of C{tools}
    (a name and its version each, as given).
    """
    import twisted

    memory = "unknown"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    others = {}
    if wrk is not None:
        version = run([wrk, "-v"])
        others["wrk"] = version.splitlines()[0] if version else "unknown"
    if nginx is not None:
        others["nginx"] = run([nginx, "-v"]).removeprefix("nginx version: ")
    if haproxy is not None:
        others["haproxy"] = (run([haproxy, "-v"]).splitlines() or ["unknown"])[0]
    others.update(tools or {})
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": run(["nproc"]) or str(len(os.sched_getaffinity(0))),
        "cpu": cpuModel(),
        "memory": memory,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        **others,
        "commit": treeState(),
    }


# -- processes ---------------------------------------------------------------


def cpuSeconds(pid: int) -> float:
    """
    User plus system CPU time used so far by process C{pid}.
    """
    with open(f"/proc/{pid}/stat") as f:
        # Fields after the command name (which may hold spaces) start at
        # field 3, state; utime and stime are fields 14 and 15.
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rssBytes(pid: int) -> int:
    """
    The resident set size of process C{pid}.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def processTree(pid: int) -> list[int]:
    """
    C{pid} and its descendants (nginx's master and its worker, say).
    """
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                parent = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(children.get(current, []))
    return sorted(tree)


@dataclass
class Server:
    """
    A server child process listening on 127.0.0.1.
    """

    name: str
    command: list[str]
    port: int
    logPath: Path
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        """
        Start the process in its own session (so a Ctrl-C reaches only the
        benchmark, which then stops it).
        """
        self._log = open(self.logPath, "wb")
        self.process = subprocess.Popen(
            self.command,
            cwd=self.logPath.parent,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def waitUntilListening(self) -> None:
        """
        Return once the port accepts connections.
        """
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                pass
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.name} exited ({self.process.returncode}) before "
                    f"listening:\n{self.logTail()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.name} did not listen on port {self.port} within "
                    f"{START_TIMEOUT:g} s:\n{self.logTail()}"
                )
            time.sleep(0.05)

    def checkAlive(self) -> None:
        """
        Fail if the process has exited.
        """
        assert self.process is not None
        if self.process.poll() is not None:
            raise BenchError(
                f"{self.name} exited ({self.process.returncode}) during the "
                f"benchmark:\n{self.logTail()}"
            )

    def logTail(self, size: int = 3000) -> str:
        """
        The end of the process's output.
        """
        try:
            return self.logPath.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def stopAll(servers: Sequence[Server]) -> None:
    """
    SIGTERM every server still running, then SIGKILL any that outlive
    L{STOP_TIMEOUT}.
    """
    running = [s for s in servers if s.process and s.process.poll() is None]
    for server in running:
        assert server.process is not None
        server.process.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT
    for server in running:
        assert server.process is not None
        try:
            server.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
        # Each server leads its own session and process group: kill what
        # may be left of it (an nginx worker whose master was killed).
        try:
            os.killpg(server.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for server in servers:
        server.close()


def fetch(
    port: int, path: str, headers: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    """
    One GET to 127.0.0.1:C{port}, with C{headers} if given; its status and
    body.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers=dict(headers or {}))
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# -- wrk ---------------------------------------------------------------------

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_NUMBER = r"([\d.]+)"
_PERCENTILE = re.compile(
    r"^\s*(50|99)(?:\.0+)?%\s+" + _NUMBER + r"(us|ms|s|m|h)\s*$", re.M
)
_RATE = re.compile(r"^Requests/sec:\s+" + _NUMBER, re.M)
_TOTAL = re.compile(r"^\s*(\d+) requests in", re.M)
_SOCKET = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


@dataclass
class WrkResult:
    """
    What one wrk run reported.
    """

    requestsPerSecond: float
    requests: int
    p50ms: float
    p99ms: float
    non2xx: int
    socketErrors: dict[str, int]

    @property
    def errors(self) -> int:
        return self.non2xx + sum(self.socketErrors.values())


def parseWrk(output: str) -> WrkResult:
    """
    Parse wrk's report (run with C{--latency}).
    """
    rate = _RATE.search(output)
    total = _TOTAL.search(output)
    percentiles = {
        int(m.group(1)): float(m.group(2)) * _UNITS_MS[m.group(3)]
        for m in _PERCENTILE.finditer(output)
    }
    if rate is None or total is None or set(percentiles) != {50, 99}:
        raise BenchError(f"could not parse wrk's output:\n{output}")
    socketErrors = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    found = _SOCKET.search(output)
    if found is not None:
        socketErrors = dict(zip(socketErrors, map(int, found.groups()), strict=True))
    non2xx = _NON_2XX.search(output)
    return WrkResult(
        requestsPerSecond=float(rate.group(1)),
        requests=int(total.group(1)),
        p50ms=percentiles[50],
        p99ms=percentiles[99],
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socketErrors=socketErrors,
    )


@dataclass
class Wrk:
    """
    How to run wrk.
    """

    path: str
    prefix: list[str]
    threads: int
    connections: int

    def command(
        self, url: str, seconds: float, headers: Mapping[str, str] | None = None
    ) -> list[str]:
        """
        The command line loading C{url} for C{seconds}, every request
        carrying C{headers} (C{-H}) if given.
        """
        return [
            *self.prefix,
            self.path,
            f"-t{self.threads}",
            f"-c{self.connections}",
            f"-d{seconds:g}s",
            "--latency",
            *(f"-H{name}: {value}" for name, value in (headers or {}).items()),
            url,
        ]

    def run(
        self,
        url: str,
        seconds: float,
        watch: Mapping[str, Sequence[int]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[str, dict[str, float], dict[str, int]]:
        """
        Run wrk against C{url}, sending C{headers} if given; its output,
        and for each named group of processes in C{watch} their CPU use in
        percent of one CPU and the peak of their summed RSS.
        """
        output, elapsed, used, peak = runWatching(
            "wrk", self.command(url, seconds, headers), seconds + 30, watch or {}
        )
        percent = {name: 100.0 * spent / elapsed for name, spent in used.items()}
        return output, percent, peak


def runWatching(
    name: str,
    command: Sequence[str],
    timeout: float,
    watch: Mapping[str, Sequence[int]],
) -> tuple[str, float, dict[str, float], dict[str, int]]:
    """
    Run a load generator to its end, watching processes meanwhile.

    @param name: the generator's name, for messages.
    @param command: its command line.
    @param timeout: the seconds after which it is killed, and the run fails.
    @param watch: named groups of processes to watch.

    @return: its output (stdout and stderr), the wall-clock seconds it ran,
        and for each group in C{watch} the CPU seconds its processes used
        meanwhile and the peak of their summed RSS, sampled every
        L{SAMPLE_INTERVAL}.
    """

    def cpu(pids: Sequence[int]) -> float:
        return sum(cpuSeconds(pid) for pid in pids)

    def rss(pids: Sequence[int]) -> int:
        return sum(rssBytes(pid) for pid in pids)

    before = {group: cpu(pids) for group, pids in watch.items()}
    peak = {group: rss(pids) for group, pids in watch.items()}
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = started + timeout
        while process.poll() is None:
            for group, pids in watch.items():
                peak[group] = max(peak[group], rss(pids))
            if time.monotonic() > deadline:
                raise BenchError(f"{shlex.join(command)} ran past {timeout:g} s")
            time.sleep(SAMPLE_INTERVAL)
        elapsed = time.monotonic() - started
        assert process.stdout is not None
        output = process.stdout.read().decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
    if process.returncode != 0:
        raise BenchError(
            f"{name} exited {process.returncode}: {shlex.join(command)}\n{output}"
        )
    used = {group: cpu(pids) - before[group] for group, pids in watch.items()}
    return output, elapsed, used, peak


# -- the hooks row -----------------------------------------------------------


def jwtCredentials(lifetime: float = 86400.0) -> tuple[dict[str, Any], str]:
    """
    A fresh RSA key's JWK set (one RS256 signing key, key id L{KID}), and a
    token that key signs, RS256, for subject C{bench}, expiring in
    C{lifetime} seconds.
    """
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = dict(RSAAlgorithm.to_jwk(key.public_key(), as_dict=True))
    jwk.update(kid=KID, alg="RS256", use="sig")
    token = jwt.encode(
        {"sub": "bench", "exp": int(time.time() + lifetime)},
        key,
        algorithm="RS256",
        headers={"kid": KID},
    )
    return {"keys": [jwk]}, token


def hooksDocument(jwksUrl: str) -> dict[str, Any]:
    """
    The C{--hooks} file of the hooks row, as docs/performance.md's "Hooks"
    shows it: C{auth} in jwt mode against the JWK set at C{jwksUrl},
    C{ratelimit} in memory at a rate it never refuses, and C{headers}, two
    rules on the request and two on the response.
    """
    return {
        "hooks": [
            {
                "name": "auth",
                "options": {
                    "mode": "jwt",
                    "jwks-url": jwksUrl,
                    "identity-headers": ["X-User-Id"],
                    "claims-to-headers": {"sub": "X-User-Id"},
                },
            },
            {"name": "ratelimit", "options": {"rate": "1000000/s"}},
            {
                "name": "headers",
                "options": {
                    "request": {
                        "set": {"X-Env": "prod", "X-Client": "{client_address}"}
                    },
                    "response": {"set": {"X-A": "a"}, "add": {"X-B": "b"}},
                },
            },
        ]
    }


class JwksServer:
    """
    Serves one JSON document at C{/jwks.json} on 127.0.0.1, from a thread
    of the bench's own process; everything else is 404.  It listens as soon
    as it is made, and answers once started.
    """

    def __init__(self, document: Mapping[str, Any]) -> None:
        body = json.dumps(document).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                found = self.path == "/jwks.json"
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) if found else 0))
                self.end_headers()
                if found:
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """
        The document's URL.
        """
        return f"http://127.0.0.1:{self._server.server_address[1]}/jwks.json"

    def start(self) -> None:
        """
        Answer requests, in a daemon thread.
        """
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="jwks", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """
        Stop answering, and close the listening socket.
        """
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()


# -- the benchmark -----------------------------------------------------------


@dataclass
class Target:
    """
    One thing to load: a URL and the server process that answers it, and
    the headers every request to it carries.
    """

    label: str
    server: Server
    path: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}{self.path}"


@dataclass
class Summary:
    """
    One target over every round.
    """

    target: str
    url: str
    requestsPerSecond: float
    rounds: list[float]
    p50ms: float
    p99ms: float
    errors: int
    cpuPercent: float
    requestsPerCpuSecond: float
    upstreamCpuPercent: float
    rssMiB: float

    @classmethod
    def of(cls, target: Target) -> Summary:
        def median(key: str) -> float:
            return float(statistics.median(run[key] for run in target.runs))

        return cls(
            target=target.label,
            url=target.url,
            requestsPerSecond=median("requestsPerSecond"),
            rounds=[run["requestsPerSecond"] for run in target.runs],
            p50ms=median("p50ms"),
            p99ms=median("p99ms"),
            errors=sum(run["errors"] for run in target.runs),
            cpuPercent=median("cpuPercent"),
            requestsPerCpuSecond=median("requestsPerCpuSecond"),
            upstreamCpuPercent=median("upstreamCpuPercent"),
            rssMiB=max(run["rssBytes"] for run in target.runs) / 2**20,
        )


def table(summaries: Sequence[Summary]) -> str:
    """
    The results, as a Markdown table aligned for a terminal.
    """
    base = next(s for s in summaries if s.target == MONEDGE)
    header = [
        "target",
        "req/s (median)",
        "req/s per round",
        "p50 ms",
        "p99 ms",
        "errors",
        "server CPU %",
        "req per server CPU s",
        "upstream CPU %",
        "server RSS MiB",
        "monedge ÷ target",
    ]
    rows = [
        [
            s.target,
            f"{s.requestsPerSecond:,.0f}",
            " / ".join(f"{r:,.0f}" for r in s.rounds),
            f"{s.p50ms:.2f}",
            f"{s.p99ms:.2f}",
            str(s.errors),
            f"{s.cpuPercent:.0f}",
            f"{s.requestsPerCpuSecond:,.0f}",
            f"{s.upstreamCpuPercent:.0f}",
            f"{s.rssMiB:.1f}",
            f"{base.requestsPerSecond / s.requestsPerSecond:.2f}x",
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
        "-" * (w + 1) + ":" if i else ":" + "-" * (w + 1) for i, w in enumerate(widths)
    )
    return "\n".join([line(header), f"|{rule}|", *map(line, rows)])


def ratios(summaries: Sequence[Summary]) -> list[str]:
    """
    monedge's req/s as a multiple of every other target's, and its requests
    per server CPU second as a multiple of theirs (which still compares the
    proxies when a fast one is held back by the upstream or wrk, not by its
    own CPU).
    """
    base = next(s for s in summaries if s.target == MONEDGE)
    width = max(len(s.target) for s in summaries)
    return [
        f"monedge / {s.target:{width}} = "
        f"{base.requestsPerSecond / s.requestsPerSecond:5.2f}x req/s, "
        f"{base.requestsPerCpuSecond / s.requestsPerCpuSecond:5.2f}x "
        "requests per server CPU second" + _perRound(base, s)
        for s in summaries
        if s is not base
    ]


def _perRound(base: Summary, other: Summary) -> str:
    """
    The req/s ratio within each round (the two targets ran minutes apart,
    not the whole run apart), and their median: on a noisy machine a slow
    stretch then weighs on both sides of a ratio instead of one.
    """
    if len(base.rounds) < 2 or len(base.rounds) != len(other.rounds):
        return ""
    each = [a / b for a, b in zip(base.rounds, other.rounds, strict=True) if b]
    if not each:
        return ""
    shown = " / ".join(f"{r:.2f}" for r in each)
    return f"; per round {shown} (median {statistics.median(each):.2f}x)"


@dataclass
class Goal:
    """
    One of issue 18's targets, and what a run measured for it: a ratio that
    must be at least (C{atLeast}) or at most C{bound}.
    """

    name: str
    measured: float
    bound: float
    atLeast: bool
    detail: str
    met: bool = field(init=False)

    def __post_init__(self) -> None:
        self.met = (
            self.measured >= self.bound if self.atLeast else self.measured <= self.bound
        )

    def line(self) -> str:
        """
        The goal, the ratio measured and what it compares, and whether the
        run met it.
        """
        return (
            f"{self.name} ({'≥' if self.atLeast else '≤'} {self.bound:g}x): "
            f"{self.measured:.2f}x, {self.detail}: "
            + ("met" if self.met else "NOT met")
        )


def issue18Goals(
    summaries: Sequence[Summary],
    tls: Sequence[h2load.Summary] = (),
    connections: int = 50,
) -> list[Goal]:
    """
    Issue 18's targets that this run's rows measure (any whose rows are
    missing are left out): from the wrk rows C{summaries}, at C{connections}
    connections, and the h2load rows C{tls}.
    """
    from h2load import H1_TLS, H2

    wrk = {s.target: s for s in summaries}
    goals = []
    monedge, rpr = wrk.get(MONEDGE), wrk.get(RPR)
    nginx, hooked = wrk.get(NGINX), wrk.get(HOOKED)
    if monedge and rpr:
        goals.append(
            Goal(
                "monedge, every default feature on: req/s ÷ ReverseProxyResource's",
                monedge.requestsPerSecond / rpr.requestsPerSecond,
                3.0,
                True,
                f"{monedge.requestsPerSecond:,.0f} against "
                f"{rpr.requestsPerSecond:,.0f} req/s",
            )
        )
    if monedge and nginx:
        goals.append(
            Goal(
                "monedge, every default feature on: req per CPU second ÷ nginx's",
                monedge.requestsPerCpuSecond / nginx.requestsPerCpuSecond,
                0.6,
                True,
                f"{monedge.requestsPerCpuSecond:,.0f} against "
                f"{nginx.requestsPerCpuSecond:,.0f}",
            )
        )
        goals.append(
            Goal(
                f"monedge, every default feature on: p99 at c={connections} ÷ nginx's",
                monedge.p99ms / nginx.p99ms,
                2.0,
                False,
                f"{monedge.p99ms:.2f} against {nginx.p99ms:.2f} ms",
            )
        )
    if hooked and rpr:
        goals.append(
            Goal(
                "auth (jwt), ratelimit (memory) and headers on: req/s "
                "÷ ReverseProxyResource's bare req/s",
                hooked.requestsPerSecond / rpr.requestsPerSecond,
                2.0,
                True,
                f"{hooked.requestsPerSecond:,.0f} against "
                f"{rpr.requestsPerSecond:,.0f} req/s",
            )
        )
    rows = {(s.server, s.protocol): s for s in tls}
    for protocol, load in (
        (H2, f"HTTP/2 over TLS (h2load -c{H2_CONNECTIONS} -m{H2_STREAMS})"),
        (H1_TLS, f"HTTP/1.1 over TLS (h2load --h1 -c{H2_CONNECTIONS})"),
    ):
        mine, theirs = rows.get((MONEDGE, protocol)), rows.get((NGINX, protocol))
        if mine and theirs and theirs.cpuMicrosecondsPerRequest:
            goals.append(
                Goal(
                    f"{load}: CPU per request ÷ nginx's",
                    mine.cpuMicrosecondsPerRequest / theirs.cpuMicrosecondsPerRequest,
                    2.0,
                    False,
                    f"{mine.cpuMicrosecondsPerRequest:.0f} against "
                    f"{theirs.cpuMicrosecondsPerRequest:.0f} µs",
                )
            )
    return goals


def parseArguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """
    The command line's options, checked.
    """
    parser = argparse.ArgumentParser(
        description="Load monedge (bare, and with the auth, ratelimit and headers "
        "hooks), ReverseProxyResource, nginx, HAProxy and the bare upstream with "
        "wrk on loopback, then monedge and nginx with h2load over HTTP/2 and "
        "HTTP/1.1 over TLS, and compare them."
    )
    parser.add_argument(
        "--duration", type=float, default=10, help="seconds per measured run (10)"
    )
    parser.add_argument(
        "--connections", type=int, default=50, help="wrk connections (50)"
    )
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (2)")
    parser.add_argument(
        "--warmup", type=float, default=2, help="warm-up seconds before each run (2)"
    )
    parser.add_argument(
        "--no-nginx", action="store_true", help="leave nginx out of the comparison"
    )
    parser.add_argument(
        "--no-haproxy",
        action="store_true",
        help="leave HAProxy out of the comparison",
    )
    parser.add_argument(
        "--no-hooks",
        action="store_true",
        help=f"leave out the {HOOKED} row",
    )
    parser.add_argument(
        "--no-h2",
        action="store_true",
        help="leave out the h2load rows: HTTP/2 and HTTP/1.1 over TLS",
    )
    parser.add_argument(
        "--h2-requests",
        type=int,
        default=20000,
        help="requests per measured h2load run (20000)",
    )
    parser.add_argument(
        "--h2-warmup",
        type=int,
        default=None,
        help="requests of the untimed h2load run before each measured one "
        "(a fifth of --h2-requests; 0: none)",
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin processes to CPUs"
    )
    parser.add_argument(
        "--no-json", action="store_true", help="do not write bench/results/*.json"
    )
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.rounds < 1:
        parser.error("--duration and --rounds must be positive, --warmup not negative")
    if args.connections < args.threads or args.threads < 1:
        parser.error("--connections must be at least --threads, which must be >= 1")
    if args.h2_warmup is None:
        args.h2_warmup = max(H2_CONNECTIONS, args.h2_requests // 5)
    if args.h2_requests < H2_CONNECTIONS or (
        args.h2_warmup and args.h2_warmup < H2_CONNECTIONS
    ):
        parser.error(
            f"--h2-requests and --h2-warmup (unless 0) must be at least "
            f"{H2_CONNECTIONS}, h2load's clients"
        )
    return args


def writeRegistry(path: Path, upstreamPort: int) -> None:
    import yaml

    document = {"services": {SERVICE: {"endpoints": [f"127.0.0.1:{upstreamPort}"]}}}
    path.write_text(yaml.safe_dump(document))


def writeHooks(path: Path, jwksUrl: str) -> None:
    """
    Write the hooks row's C{--hooks} file (L{hooksDocument}) to C{path}.
    """
    import yaml

    path.write_text(yaml.safe_dump(hooksDocument(jwksUrl), sort_keys=False))


_NGINX_TEMP_PATHS = {
    # directive: the module without which nginx does not know it
    "client_body_temp_path": None,
    "proxy_temp_path": "proxy",
    "fastcgi_temp_path": "fastcgi",
    "uwsgi_temp_path": "uwsgi",
    "scgi_temp_path": "scgi",
}


def writeNginxConfig(
    nginx: str,
    directory: Path,
    port: int,
    upstreamPort: int,
    listen: Sequence[str] | None = None,
    certificate: Path | None = None,
) -> Path:
    """
    An nginx configuration for one worker proxying C{/bench/} to the
    upstream's C{/} over pooled keep-alive connections, with every path it
    writes (pid, error log, temporary files) inside C{directory}.

    @param port: the port it listens on, for plain HTTP/1.1 (unless
        C{listen} is given).
    @param listen: the arguments of each C{listen} directive instead, such
        as C{127.0.0.1:8443 ssl http2}.
    @param certificate: a PEM file holding the private key and the
        certificate, for listeners with C{ssl}; TLS 1.2 and 1.3 are
        enabled, as monedge enables them (nginx 1.22's default leaves 1.3
        out).
    """
    directory.mkdir()
    built = run([nginx, "-V"])
    temp = "\n".join(
        f"    {directive} {directory / directive.removesuffix('_temp_path')};"
        for directive, module in _NGINX_TEMP_PATHS.items()
        if module is None or f"--without-http_{module}_module" not in built
    )
    # As root, the worker would otherwise run as nobody, which cannot
    # reach the temporary directory.
    user = "user root;\n" if os.geteuid() == 0 else ""
    listens = "\n".join(
        f"        listen {arguments};"
        for arguments in (listen or [f"127.0.0.1:{port} backlog=1024"])
    )
    if certificate is not None:
        listens += (
            f"\n        ssl_certificate {certificate};"
            f"\n        ssl_certificate_key {certificate};"
            "\n        ssl_protocols TLSv1.2 TLSv1.3;"
        )
    path = directory / "nginx.conf"
    path.write_text(
        f"""\
# Written by bench/run.py.
{user}worker_processes 1;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
{temp}

    upstream upstream {{
        server 127.0.0.1:{upstreamPort};
        keepalive 64;
    }}

    server {{
{listens}

        location /bench/ {{
            proxy_pass http://upstream/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
    )
    return path


def nginxCommand(prefix: list[str], nginx: str, config: Path) -> list[str]:
    return [
        *prefix,
        nginx,
        "-p",
        str(config.parent),
        "-e",
        str(config.parent / "error.log"),
        "-c",
        str(config),
        "-g",
        "daemon off;",
    ]


def writeHaproxyConfig(directory: Path, port: int, upstreamPort: int) -> Path:
    """
    An HAProxy configuration for one thread proxying C{/bench/} to the
    upstream's C{/}, reusing idle upstream connections across clients
    (C{http-reuse always}), with no logging.
    """
    directory.mkdir()
    path = directory / "haproxy.cfg"
    path.write_text(
        f"""\
# Written by bench/run.py.
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    timeout connect 10s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 75s

frontend bench
    bind 127.0.0.1:{port}
    http-request set-path %[path,regsub(^/bench/,/)]
    default_backend upstream

backend upstream
    http-reuse always
    server upstream 127.0.0.1:{upstreamPort}
"""
    )
    return path


def haproxyCommand(prefix: list[str], haproxy: str, config: Path) -> list[str]:
    return [*prefix, haproxy, "-f", str(config), "-db"]


def monedgeCommand(
    prefix: list[str], port: int, adminPort: int, registry: Path, accessLog: str
) -> list[str]:
    twistd = str(Path(sys.executable).parent / "twistd")
    return [
        *prefix,
        "env",
        f"PYTHONPATH={ROOT}",
        twistd,
        "-n",
        "--pidfile=",
        "monedge",
        "--port",
        f"tcp:{port}:interface=127.0.0.1:backlog=1024",
        "--admin-port",
        f"tcp:{adminPort}:interface=127.0.0.1",
        "--registry",
        f"static:{registry}",
        "--access-log",
        accessLog,
        # Nothing is in flight when the bench stops it: no drain delay.
        "--drain-delay",
        "0s",
    ]


def benchmark(args: argparse.Namespace, directory: Path) -> None:
    """
    Start the upstream and every target, with their files in C{directory},
    check that each answers, load each in every round, stop them, then
    print the tables, the ratios and issue 18's targets, and write the JSON.
    """
    import h2load

    wrkPath = ensureWrk()
    nginxPath = None if args.no_nginx else ensureNginx()
    haproxyPath = None if args.no_haproxy else ensureHaproxy()
    h2loadPath = (
        None if args.no_h2 else ensureCommand("h2load", ["nghttp2-client"], "--no-h2")
    )
    proxyPin, loadPin = pinning(not args.no_pin)
    about = machine(
        wrkPath,
        nginxPath,
        haproxyPath,
        None
        if h2loadPath is None
        else {"h2load": run([h2loadPath, "--version"]) or "unknown"},
    )
    invocation = shlex.join([sys.executable, *sys.argv])
    # For the h2load rows: monedge's and nginx's TLS listeners, by name.
    certificate = (
        None if h2loadPath is None else h2load.writeCertificate(directory / "tls")
    )
    tlsPorts: dict[str, int] = {}

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
    configs: list[Path] = []
    for label, accessLog in (
        # monedge as deployed: every default feature on, the access log
        # written to a file (stdout would measure the terminal or the pipe).
        (MONEDGE, str(directory / "access.log")),
        (MONEDGE_QUIET, "none"),
    ):
        port = freePort()
        command = monedgeCommand(proxyPin, port, freePort(), registry, accessLog)
        if label == MONEDGE and certificate is not None:
            # The same process serves the TLS rows, on a listener of its own.
            tlsPorts[label] = freePort()
            command += h2load.monedgeTls(tlsPorts[label], certificate)
        server = Server(label, command, port, directory / f"monedge-{port}.log")
        servers.append(server)
        targets.append(Target(label, server, "/bench/"))
    jwks = None
    if not args.no_hooks:
        # As deployed, and the three built-in hooks of issue 18 on every
        # request, each of which carries the token the auth hook checks.
        document, token = jwtCredentials()
        jwks = JwksServer(document)
        hooks = directory / "hooks.yaml"
        writeHooks(hooks, jwks.url)
        port = freePort()
        server = Server(
            HOOKED,
            [
                *monedgeCommand(
                    proxyPin,
                    port,
                    freePort(),
                    registry,
                    str(directory / "access-hooks.log"),
                ),
                "--hooks",
                str(hooks),
            ],
            port,
            directory / f"monedge-{port}.log",
        )
        servers.append(server)
        configs.append(hooks)
        targets.append(
            Target(
                HOOKED,
                server,
                "/bench/",
                headers={"Authorization": f"Bearer {token}"},
            )
        )
    # The two Twisted baselines: a script each, taking the same options.
    for label, script, more in (
        (RPR, "rpr.py", []),
        (MINIMAL, "minimal.py", []),
        (FLOOR, "minimal.py", ["--client", "fast"]),
    ):
        port = freePort()
        server = Server(
            label,
            [
                *proxyPin,
                sys.executable,
                str(BENCH / script),
                "--port",
                str(port),
                "--upstream-port",
                str(upstreamPort),
                *more,
            ],
            port,
            directory / f"{script.removesuffix('.py')}-{port}.log",
        )
        servers.append(server)
        targets.append(Target(label, server, "/bench/"))
    if nginxPath is not None:
        nginxPort = freePort()
        listen = None
        if certificate is not None:
            tlsPorts[NGINX] = freePort()
            listen = [
                f"127.0.0.1:{nginxPort} backlog=1024",
                h2load.tlsListen(tlsPorts[NGINX]),
            ]
        config = writeNginxConfig(
            nginxPath,
            directory / "nginx",
            nginxPort,
            upstreamPort,
            listen=listen,
            certificate=certificate,
        )
        nginx = Server(
            NGINX,
            nginxCommand(proxyPin, nginxPath, config),
            nginxPort,
            directory / "nginx.log",
        )
        servers.append(nginx)
        configs.append(config)
        targets.append(Target(NGINX, nginx, "/bench/"))
    if haproxyPath is not None:
        haproxyPort = freePort()
        config = writeHaproxyConfig(directory / "haproxy", haproxyPort, upstreamPort)
        haproxy = Server(
            HAPROXY,
            haproxyCommand(proxyPin, haproxyPath, config),
            haproxyPort,
            directory / "haproxy.log",
        )
        servers.append(haproxy)
        configs.append(config)
        targets.append(Target(HAPROXY, haproxy, "/bench/"))
    targets.append(Target(DIRECT, upstream, "/"))
    wrk = Wrk(wrkPath, loadPin, args.threads, args.connections)
    # Interleaved: each protocol on monedge, then on nginx.
    named = {server.name: server for server in servers}
    tlsTargets = [
        h2load.Target(named[name], protocol, f"https://127.0.0.1:{port}/bench/")
        for protocol in (h2load.H2, h2load.H1_TLS)
        for name, port in tlsPorts.items()
    ]
    loader = (
        None
        if h2loadPath is None
        else h2load.H2load(h2loadPath, loadPin, H2_CONNECTIONS, H2_STREAMS)
    )
    width = max(len(target.label) for target in targets)

    try:
        if jwks is not None:
            jwks.start()
        for server in servers:
            server.start()
        for server in servers:
            server.waitUntilListening()
            if server.name in tlsPorts:
                h2load.waitForPort(server, tlsPorts[server.name])
        for target in targets:
            status, body = fetch(target.server.port, target.path, target.headers)
            if status != 200 or body != BODY:
                raise BenchError(
                    f"{target.label}: GET {target.url} answered {status} "
                    f"{body[:200]!r}, not 200 {BODY!r}"
                )
            if target.label == HOOKED:
                # Without the token, the auth hook refuses: the hooks are on.
                status, body = fetch(target.server.port, target.path)
                if status != 401:
                    raise BenchError(
                        f"{target.label}: GET {target.url} without a token "
                        f"answered {status} {body[:200]!r}, not 401"
                    )
        if loader is not None:
            for tlsTarget in tlsTargets:
                h2load.checkTarget(loader, tlsTarget)

        print("monedge benchmark")
        print(f"  command:  {invocation}")
        for key, value in about.items():
            print(f"  {key + ':':9} {value}")
        print(
            f"  load:     {shlex.join(wrk.command('URL', args.duration))} "
            f"(after a {args.warmup:g} s warm-up), {args.rounds} round(s)"
        )
        if jwks is not None:
            print(
                f"            {HOOKED}: every request with "
                "-H 'Authorization: Bearer TOKEN', an RS256 token made for "
                f"this run, its JWK set served at {jwks.url}"
            )
        if loader is not None:
            print(
                f"  h2load:   {loader.shown((h2load.H2, h2load.H1_TLS), args.h2_requests)}"
                f" (each after {args.h2_warmup:,} requests of warm-up)"
            )
        print(
            "  pinning:  "
            + (
                f"proxy on CPU {proxyPin[-1]}, upstream and load on CPU {loadPin[-1]}"
                if proxyPin
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
            for target in targets:
                for server in servers:
                    server.checkAlive()
                if args.warmup:
                    wrk.run(target.url, args.warmup, headers=target.headers)
                watch = {
                    "server": processTree(target.server.pid),
                    "upstream": [upstream.pid],
                }
                output, cpu, peak = wrk.run(
                    target.url, args.duration, watch, target.headers
                )
                result = parseWrk(output)
                target.runs.append(
                    {
                        **asdict(result),
                        "errors": result.errors,
                        "cpuPercent": cpu["server"],
                        "requestsPerCpuSecond": result.requestsPerSecond
                        / max(cpu["server"] / 100.0, 1e-9),
                        "upstreamCpuPercent": cpu["upstream"],
                        "rssBytes": peak["server"],
                        "serverPids": watch["server"],
                        "wrkOutput": output,
                    }
                )
                print(
                    f"round {number}/{args.rounds}  {target.label:{width}} "
                    f"{result.requestsPerSecond:10,.0f} req/s  "
                    f"p50 {result.p50ms:6.2f} ms  p99 {result.p99ms:6.2f} ms  "
                    f"errors {result.errors}",
                    flush=True,
                )
            if loader is not None:
                h2load.measureRound(
                    loader,
                    tlsTargets,
                    servers,
                    upstream,
                    args.h2_requests,
                    args.h2_warmup,
                    directory,
                    number,
                    args.rounds,
                )
        for server in servers:
            server.checkAlive()
    finally:
        stopAll(servers)
        if jwks is not None:
            jwks.stop()

    summaries = [Summary.of(target) for target in targets]
    tlsSummaries = [h2load.Summary.of(target) for target in tlsTargets]
    goals = issue18Goals(summaries, tlsSummaries, args.connections)
    print()
    print(table(summaries))
    print()
    for line in ratios(summaries):
        print(line)
    if tlsSummaries:
        print()
        print(h2load.table(tlsSummaries))
        print()
        for line in h2load.ratioLines(tlsSummaries):
            print(line)
    if goals:
        print()
        print("issue 18's targets, in this run:")
        for goal in goals:
            print(f"  {goal.line()}")

    if not args.no_json:
        RESULTS.mkdir(exist_ok=True)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        path = RESULTS / f"{stamp}.json"
        document = {
            "command": invocation,
            "machine": about,
            "settings": {
                "duration": args.duration,
                "warmup": args.warmup,
                "rounds": args.rounds,
                "connections": args.connections,
                "threads": args.threads,
                "pinned": not args.no_pin,
                "hooks": not args.no_hooks,
                "h2": loader is not None,
                "h2Requests": args.h2_requests,
                "h2Warmup": args.h2_warmup,
                "h2Connections": H2_CONNECTIONS,
                "h2Streams": H2_STREAMS,
            },
            "configs": {config.name: config.read_text() for config in configs},
            "servers": {server.name: server.command for server in servers},
            "summary": [asdict(s) for s in summaries],
            "runs": {target.label: target.runs for target in targets},
            "h2load": {
                "summary": [asdict(s) for s in tlsSummaries],
                "cpuPerRequestAgainstNginx": h2load.againstNginx(tlsSummaries),
                "runs": {target.label: target.runs for target in tlsTargets},
            },
            "issue18": [asdict(goal) for goal in goals],
        }
        path.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nresults: {path.relative_to(ROOT)}")


def _terminated(signum: int, frame: FrameType | None) -> None:
    """
    On SIGTERM, exit through the C{finally} that stops the servers.
    """
    raise SystemExit(128 + signum)


def runBench(
    benchmark: Callable[[Any, Path], None],
    args: Any,
    prefix: str,
    name: str = "bench",
) -> int:
    """
    Run C{benchmark(args, directory)} in a temporary directory named with
    C{prefix}, as every script in bench/ does: SIGTERM and SIGINT end it
    through its own clean-up; a L{BenchError} or an interrupt is one line
    on stderr, starting with C{name}.  Returns the exit status.
    """
    signal.signal(signal.SIGTERM, _terminated)
    # Even when started in the background with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as directory:
            benchmark(args, Path(directory))
    except BenchError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return runBench(benchmark, parseArguments(argv), "monedge-bench-")


if __name__ == "__main__":
    sys.exit(main())
