"""
What request bodies cost monedge: memory, temporary files and time.

    .venv/bin/python bench/upload.py one [--mib 1024] [--chunked]
    .venv/bin/python bench/upload.py many [--count 100] [--mib 10] [--rate 1]

Starts, on 127.0.0.1, an upstream that reads each request's body (by its
Content-Length, or chunked), counts it, and answers 200 with the count, and
monedge in front of it (C{--access-log none}, its TMPDIR a directory of
the bench's own).  While the uploads run, monedge's RSS is sampled every
0.1 s, and so are the sizes of the files it holds open in that TMPDIR
(temporary files are unlinked at once: they are found through
C{/proc/PID/fd}), and the upstream says when it saw each body's first
byte.

  - C{one}: one upload of N MiB (1 GiB by default) sent as fast as the
    client can, through monedge and then straight to the upstream: the
    throughput of each, monedge's RSS growth and temporary-file peak, and
    when the upstream saw the request against when the client had sent
    the whole body (before it when the body streams; after it when monedge
    holds the body whole first).
  - C{many}: C{--count} concurrent uploads of N MiB each to an upstream
    that reads each body at C{--rate} MiB/s: monedge's RSS growth and
    temporary-file peak.

Every body is checked: the upstream's count must be the size sent.
Loopback only; bounded in time; every process it starts is stopped on exit.
It exits 1 if an upload fails.
"""

from __future__ import annotations

import argparse
import os
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

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from large_response import readHead, rssBytes  # noqa: E402
from run import BenchError, Server, monedgeCommand, stopAll  # noqa: E402

from monedge.testing import freePort  # noqa: E402

MIB = 1 << 20
SERVICE = "service.api.bench"
BLOCK = bytes(range(256)) * 256  # 64 KiB
SAMPLE_INTERVAL = 0.1


# -- the upstream (run as a child: upload.py --serve-upstream PORT) ----------


def _readBody(conn: socket.socket, head: bytes, rest: bytes, rate: float) -> int:
    """
    Read a request body (Content-Length or chunked) after C{head}, at most
    C{rate} bytes a second if C{rate}; return its size.
    """
    lines = head.split(b"\r\n")[1:]
    fields = {}
    for line in lines:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    started = time.monotonic()
    received = 0
    buffer = rest

    def pace() -> None:
        if rate:
            ahead = received / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)

    def more() -> bytes:
        data = conn.recv(65536)
        if not data:
            raise BenchError("the connection closed inside the body")
        return data

    if b"content-length" in fields:
        total = int(fields[b"content-length"])
        received = len(buffer)
        while received < total:
            pace()
            received += len(more())
        return total
    if fields.get(b"transfer-encoding", b"").lower() != b"chunked":
        return 0
    size = 0
    while True:
        while b"\r\n" not in buffer:
            buffer += more()
        line, _, buffer = buffer.partition(b"\r\n")
        length = int(line.split(b";")[0], 16)
        if length == 0:
            while b"\r\n\r\n" not in b"\r\n" + buffer:
                buffer += more()
            return size
        while len(buffer) < length + 2:
            pace()
            data = more()
            buffer += data
            received += len(data)
        buffer = buffer[length + 2 :]
        size += length


def serveUpstream(port: int, rate: float, log: Path) -> None:
    """
    Answer each request on 127.0.0.1:C{port} with its body's size, on a
    thread per connection, and close it; append to C{log} when each body's first byte
    came (C{first} lines, monotonic seconds).
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(512)
    lock = threading.Lock()

    def handle(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(300)
            try:
                # One request a connection: it answers with Connection: close.
                while True:
                    try:
                        head, rest = readHead(conn)
                    except BenchError:
                        return
                    if rest or head.startswith(b"POST"):
                        with lock, open(log, "a") as f:
                            f.write(f"first {time.monotonic()}\n")
                    size = _readBody(conn, head, rest, rate)
                    body = b"%d" % size
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n"
                        b"Connection: close\r\n\r\n%b" % (len(body), body)
                    )
                    return
            except (OSError, BenchError):
                return

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


# -- measuring monedge -------------------------------------------------------


def spooled(pid: int, directory: str) -> int:
    """
    The bytes of the files under C{directory} that C{pid} holds open
    (deleted or not).
    """
    total = 0
    fds = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fds)
    except OSError:
        return 0
    for name in names:
        try:
            target = os.readlink(f"{fds}/{name}")
            if target.startswith(directory):
                total += os.stat(f"{fds}/{name}").st_size
        except OSError:
            continue
    return total


@dataclass
class Sampler:
    """
    Samples monedge's RSS and temporary-file bytes every
    L{SAMPLE_INTERVAL}, keeping the peaks.
    """

    pid: int
    spool: str
    rss: int = 0
    files: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.rss = max(self.rss, rssBytes(self.pid))
            except BenchError:
                return
            self.files = max(self.files, spooled(self.pid, self.spool))
            self._stop.wait(SAMPLE_INTERVAL)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@dataclass
class Upload:
    status: bytes
    answered: int
    seconds: float
    started: float
    #: Seconds from the start until the client had sent the whole body.
    sent: float


def upload(port: int, total: int, chunked: bool, path: bytes = b"/bench/up") -> Upload:
    """
    POST C{total} bytes to 127.0.0.1:C{port} as fast as the socket takes
    them; the status and the size the upstream counted.
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=600)
    try:
        framing = (
            b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % total
        )
        started = time.monotonic()
        s.sendall(
            b"POST %b HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n%b\r\n\r\n"
            % (path, framing)
        )
        sent = 0
        while sent < total:
            block = BLOCK[: min(len(BLOCK), total - sent)]
            s.sendall(b"%x\r\n%b\r\n" % (len(block), block) if chunked else block)
            sent += len(block)
        if chunked:
            s.sendall(b"0\r\n\r\n")
        sentAt = time.monotonic() - started
        head, body = readHead(s)
        while True:
            data = s.recv(65536)
            if not data:
                break
            body += data
        seconds = time.monotonic() - started
        status = head.split(b"\r\n", 1)[0]
        answered = int(body) if body.isdigit() else -1
        return Upload(status, answered, seconds, started, sentAt)
    finally:
        s.close()


def firstBytes(log: Path) -> list[float]:
    if not log.exists():
        return []
    return [float(line.split()[1]) for line in log.read_text().splitlines()]


def measure(args: argparse.Namespace, directory: Path) -> bool:
    spool = directory / "tmp"
    spool.mkdir()
    upstreamPort, port, adminPort = freePort(), freePort(), freePort()
    registry = directory / "services.yaml"
    registry.write_text(
        f'services:\n  {SERVICE}:\n    endpoints: ["127.0.0.1:{upstreamPort}"]\n'
        f"    policy:\n      max-body-size: {args.mib * MIB + 1}\n"
        "      timeout: 600s\n"
    )
    firstLog = directory / "first.log"
    upstream = Server(
        "upstream",
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve-upstream",
            str(upstreamPort),
            "--rate",
            str(args.rate if args.mode == "many" else 0),
            "--first-log",
            str(firstLog),
        ],
        upstreamPort,
        directory / "upstream.log",
    )
    monedge = Server(
        "monedge",
        monedgeCommand(["env", f"TMPDIR={spool}"], port, adminPort, registry, "none"),
        port,
        directory / "monedge.log",
    )
    children = [upstream, monedge]
    total = args.mib * MIB
    ok = True
    try:
        for child in children:
            child.start()
        for child in children:
            child.waitUntilListening()
        warm = upload(port, 1024, False)
        if not warm.status.startswith(b"HTTP/1.1 200") or warm.answered != 1024:
            raise BenchError(f"the warm-up answered {warm}")
        firstLog.unlink(missing_ok=True)
        time.sleep(0.5)
        before = rssBytes(monedge.pid)
        sampler = Sampler(monedge.pid, str(spool))
        sampler.start()
        results: list[Upload] = []
        errors: list[BaseException] = []
        try:
            if args.mode == "one":
                results.append(upload(port, total, args.chunked))
            else:

                def one() -> None:
                    try:
                        results.append(upload(port, total, args.chunked))
                    except BaseException as e:
                        errors.append(e)

                threads = [threading.Thread(target=one) for _ in range(args.count)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
        finally:
            sampler.stop()
        for child in children:
            child.checkAlive()
        firsts = firstBytes(firstLog)
        direct: Upload | None = None
        if args.mode == "one":
            direct = upload(upstreamPort, total, args.chunked)
    finally:
        stopAll(children)
    for e in errors:
        print(f"an upload failed: {e!r}", file=sys.stderr)
        ok = False
    for result in results:
        if not result.status.startswith(b"HTTP/1.1 200") or result.answered != total:
            print(f"an upload was answered {result}", file=sys.stderr)
            ok = False
    print(f"command:        {shlex.join([sys.executable, *sys.argv])}")
    framing = "chunked" if args.chunked else "Content-Length"
    if args.mode == "one" and results:
        through = results[0]
        print(
            f"upload:         {args.mib} MiB ({framing}), answered "
            f"{through.status.decode(errors='replace')}, {through.answered:,} bytes counted"
        )
        print(
            f"through monedge: {through.seconds:.2f} s, "
            f"{args.mib / through.seconds:.1f} MiB/s"
        )
        if direct is not None:
            print(
                f"direct:         {direct.seconds:.2f} s, {args.mib / direct.seconds:.1f} MiB/s"
                f" (monedge / direct = {direct.seconds / through.seconds:.2f}x)"
            )
        if firsts:
            first = firsts[0] - through.started
            print(
                f"first byte:     the upstream saw the request {first:.2f} s in; the "
                f"client had sent the whole body {through.sent:.2f} s in"
                + (" (monedge held it first)" if first >= through.sent else "")
            )
    else:
        print(
            f"uploads:        {args.count} concurrent x {args.mib} MiB ({framing}) to an "
            f"upstream reading {args.rate:g} MiB/s each; {len(results)} answered"
        )
        if results:
            print(f"slowest:        {max(r.seconds for r in results):.1f} s")
    growth = sampler.rss - before
    print(
        f"monedge RSS:    {before / MIB:.1f} MiB before, {sampler.rss / MIB:.1f} MiB peak, "
        f"growth {growth / MIB:.1f} MiB"
    )
    print(f"temp files:     {sampler.files / MIB:.1f} MiB at peak in monedge's TMPDIR")
    return ok


def parseArguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Upload through monedge and report its memory, temporary"
        " files and throughput."
    )
    parser.add_argument("mode", nargs="?", choices=["one", "many"], default="one")
    parser.add_argument(
        "--mib", type=int, help="body size in MiB (one: 1024, many: 10)"
    )
    parser.add_argument("--count", type=int, default=100, help="many: uploads (100)")
    parser.add_argument(
        "--rate", type=float, default=1.0, help="many: upstream read MiB/s (1)"
    )
    parser.add_argument("--chunked", action="store_true", help="send bodies chunked")
    parser.add_argument(
        "--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS
    )
    parser.add_argument("--first-log", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mib is None:
        args.mib = 1024 if args.mode == "one" else 10
    if args.mib < 1 or args.count < 1 or args.rate < 0:
        parser.error("--mib and --count must be positive, --rate not negative")
    return args


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parseArguments(argv)
    if args.serve_upstream is not None:
        serveUpstream(args.serve_upstream, args.rate * MIB, args.first_log)
        return 0
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with tempfile.TemporaryDirectory(prefix="monedge-upload-") as directory:
            ok = measure(args, Path(directory))
    except BenchError as e:
        print(f"upload: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("upload: interrupted", file=sys.stderr)
        return 130
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
