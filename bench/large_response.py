"""
How much memory a large response to a slow client costs monedge.

    .venv/bin/python bench/large_response.py [--mib 1024] [--rate 64]

Starts, on 127.0.0.1, an upstream that answers C{GET /} with a body of N MiB
(streamed by a Twisted pull producer, one 64 KiB chunk each time its socket
drains, so the upstream itself stays small) and monedge in front of it
(C{--access-log none}).  A client then GETs C{/bench/} through monedge with a
small receive buffer and reads the body at a bounded rate (64 MiB/s by
default), sleeping to hold it, while monedge's RSS is sampled every 0.1 s.
It prints the bytes received (which must be N MiB, every byte checked
against the upstream's pattern), the time, monedge's RSS before and at its
peak, and the growth.  Loopback only; bounded in time (it gives up past
twice the expected transfer time plus a minute); every process it starts
is stopped on exit.  It exits 1 if the body is short or wrong.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from run import BenchError, Server, monedgeCommand, stopAll  # noqa: E402

from monedge.testing import freePort  # noqa: E402

MIB = 1 << 20
SERVICE = "service.api.bench"
# The upstream's body repeats bytes 0..255; it writes it 64 KiB at a time.
PATTERN = bytes(range(256))
CHUNK = PATTERN * 256
SMALL = b"hello\n"
SAMPLE_INTERVAL = 0.1


# -- the upstream (run as a child: large_response.py --serve-upstream) -------


def serveUpstream(port: int, total: int) -> None:
    """
    Listen on 127.0.0.1:C{port}: C{GET /small} answers C{hello\\n} (the
    warm-up), anything else C{total} bytes of L{PATTERN}, written by a pull
    producer one L{CHUNK} per C{resumeProducing}.
    """
    from twisted.internet import reactor as globalReactor
    from twisted.internet.interfaces import IPullProducer
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Request, Site
    from zope.interface import implementer

    @implementer(IPullProducer)
    class PatternProducer:
        """
        Writes C{total} bytes, one chunk each time the transport asks.
        """

        def __init__(self, request: Request, total: int) -> None:
            self.request = request
            self.remaining = total
            self.stopped = False

        def resumeProducing(self) -> None:
            if self.stopped:
                return
            if self.remaining <= 0:
                self.stopped = True
                self.request.unregisterProducer()
                self.request.finish()
                return
            data = CHUNK[: min(len(CHUNK), self.remaining)]
            self.remaining -= len(data)
            self.request.write(data)

        def stopProducing(self) -> None:
            self.stopped = True

    class Large(Resource):
        isLeaf = True

        def render_GET(self, request: Request) -> bytes | int:
            if request.path == b"/small":
                return SMALL
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"content-length", b"%d" % (total,))
            request.registerProducer(PatternProducer(request, total), False)
            return NOT_DONE_YET

    site = Site(Large())
    site.log = lambda request: None  # type: ignore[method-assign]
    reactor: Any = globalReactor
    reactor.listenTCP(port, site, backlog=128, interface="127.0.0.1")
    reactor.run()


# -- processes ---------------------------------------------------------------


def rssBytes(pid: int) -> int:
    """
    The resident set size of C{pid}.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for process {pid}")


# -- sampling and the client -------------------------------------------------


@dataclass
class Sampler:
    """
    Samples the RSS of some processes every L{SAMPLE_INTERVAL} in a thread,
    keeping each one's peak.
    """

    pids: dict[str, int]
    peak: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _error: BaseException | None = None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for name, pid in self.pids.items():
                    self.peak[name] = max(self.peak.get(name, 0), rssBytes(pid))
                self.samples += 1
                self._stop.wait(SAMPLE_INTERVAL)
        except BaseException as e:  # a process went away: reported by stop()
            self._error = e

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise BenchError(f"sampling RSS failed: {self._error!r}")


def readHead(s: socket.socket) -> tuple[bytes, bytes]:
    """
    Read a response's head; the head and whatever body bytes came with it.
    """
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = s.recv(65536)
        if not data:
            raise BenchError(f"the connection closed inside the head: {buffer!r}")
        buffer += data
        if len(buffer) > 65536:
            raise BenchError(f"no end of head in {buffer[:200]!r}...")
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest


def contentLength(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    raise BenchError(f"no Content-Length in {head!r}")


def get(port: int, path: bytes, rcvbuf: int = 0) -> socket.socket:
    """
    A connection to 127.0.0.1:C{port} that has sent C{GET path}.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        # Before connecting, so that the window is small from the start.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
    return s


@dataclass
class Transfer:
    status: bytes
    expected: int
    received: int
    seconds: float
    mismatch: int | None


def slowRead(
    port: int, rate: float, rcvbuf: int, readSize: int, deadline: float
) -> Transfer:
    """
    GET C{/bench/} and read the body at about C{rate} bytes a second,
    checking every byte against L{PATTERN}.
    """
    # Any body offset's expected bytes are a slice of this.
    # (The first bytes come with the head, from a recv of 65536.)
    expected = PATTERN * (max(readSize, 65536) // len(PATTERN) + 2)
    s = get(port, b"/bench/", rcvbuf)
    try:
        head, body = readHead(s)
        status = head.split(b"\r\n", 1)[0]
        total = contentLength(head)
        received = 0
        mismatch: int | None = None
        started = time.monotonic()
        data = body
        while True:
            if data:
                offset = received % len(PATTERN)
                want = expected[offset : offset + len(data)]
                if mismatch is None and data != want:
                    mismatch = received + next(
                        i
                        for i, (a, b) in enumerate(zip(data, want, strict=True))
                        if a != b
                    )
                received += len(data)
                ahead = received / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
            if received >= total:
                break
            if time.monotonic() > deadline:
                raise BenchError(
                    f"gave up after {received:,} of {total:,} bytes: past the deadline"
                )
            data = s.recv(readSize)
            if not data:
                break
        return Transfer(status, total, received, time.monotonic() - started, mismatch)
    finally:
        s.close()


# -- the measurement ---------------------------------------------------------


def measure(args: argparse.Namespace, directory: Path) -> bool:
    total = args.mib * MIB
    rate = args.rate * MIB
    upstreamPort, port, adminPort = freePort(), freePort(), freePort()
    registry = directory / "services.yaml"
    registry.write_text(
        f'services:\n  {SERVICE}:\n    endpoints: ["127.0.0.1:{upstreamPort}"]\n'
    )
    upstream = Server(
        "upstream",
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve-upstream",
            str(upstreamPort),
            "--mib",
            str(args.mib),
        ],
        upstreamPort,
        directory / "upstream.log",
    )
    monedge = Server(
        "monedge",
        monedgeCommand([], port, adminPort, registry, "none"),
        port,
        directory / "monedge.log",
    )
    children = [upstream, monedge]
    try:
        for child in children:
            child.start()
        for child in children:
            child.waitUntilListening()

        # A warm-up through monedge, so its upstream client and pool are in
        # place before "before" is read.
        warm = get(port, b"/bench/small")
        try:
            head, body = readHead(warm)
            while len(body) < len(SMALL):
                data = warm.recv(65536)
                if not data:
                    break
                body += data
        finally:
            warm.close()
        if not head.startswith(b"HTTP/1.1 200") or body != SMALL:
            raise BenchError(f"the warm-up answered {head!r} {body!r}")
        time.sleep(0.5)

        before = {"monedge": rssBytes(monedge.pid), "upstream": rssBytes(upstream.pid)}
        sampler = Sampler({"monedge": monedge.pid, "upstream": upstream.pid})
        sampler.start()
        deadline = time.monotonic() + 2 * args.mib / args.rate + 60
        try:
            transfer = slowRead(port, rate, args.rcvbuf, args.read_size, deadline)
        finally:
            sampler.stop()
        time.sleep(1.0)
        after = rssBytes(monedge.pid)
        for child in children:
            child.checkAlive()
    finally:
        stopAll(children)

    peak = sampler.peak["monedge"]
    grown = peak - before["monedge"]
    intact = (
        transfer.status.startswith(b"HTTP/1.1 200")
        and transfer.expected == total
        and transfer.received == total
        and transfer.mismatch is None
    )
    print(f"command:       {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"response:      {transfer.status.decode(errors='replace')}, "
        f"Content-Length {transfer.expected:,}"
    )
    print(
        f"received:      {transfer.received:,} bytes of {total:,} ({args.mib} MiB), "
        + (
            "every byte as sent"
            if transfer.mismatch is None
            else f"WRONG from byte {transfer.mismatch:,}"
        )
    )
    print(
        f"time:          {transfer.seconds:.1f} s, "
        f"{transfer.received / MIB / transfer.seconds:.1f} MiB/s "
        f"(client reading at most {args.rate:g} MiB/s, SO_RCVBUF {args.rcvbuf:,}, "
        f"recv {args.read_size:,})"
    )
    print(
        f"monedge RSS:   {before['monedge'] / MIB:.1f} MiB before, "
        f"{peak / MIB:.1f} MiB peak ({sampler.samples} samples every "
        f"{SAMPLE_INTERVAL:g} s), {after / MIB:.1f} MiB 1 s after"
    )
    print(
        f"growth:        {grown / MIB:.1f} MiB ({grown // 1024:,} KiB) at peak, "
        f"{100 * grown / total:.2f} % of the body"
    )
    print(
        f"upstream RSS:  {before['upstream'] / MIB:.1f} MiB before, "
        f"{sampler.peak['upstream'] / MIB:.1f} MiB peak"
    )
    return intact


def parseArguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Stream a large response through monedge to a slow reader "
        "and report monedge's RSS growth."
    )
    parser.add_argument(
        "--mib", type=int, default=1024, help="response body in MiB (1024)"
    )
    parser.add_argument(
        "--rate", type=float, default=64, help="client read rate in MiB/s (64)"
    )
    parser.add_argument(
        "--rcvbuf",
        type=int,
        default=64 * 1024,
        help="client SO_RCVBUF in bytes (65536)",
    )
    parser.add_argument(
        "--read-size", type=int, default=65536, help="bytes per recv (65536)"
    )
    parser.add_argument(
        "--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.mib < 1 or args.rate <= 0 or args.rcvbuf < 0 or args.read_size < 1:
        parser.error("--mib, --rate and --read-size must be positive")
    return args


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parseArguments(argv)
    if args.serve_upstream is not None:
        serveUpstream(args.serve_upstream, args.mib * MIB)
        return 0
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with tempfile.TemporaryDirectory(prefix="monedge-large-") as directory:
            intact = measure(args, Path(directory))
    except BenchError as e:
        print(f"large_response: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("large_response: interrupted", file=sys.stderr)
        return 130
    if not intact:
        print("large_response: the body did not arrive intact", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
