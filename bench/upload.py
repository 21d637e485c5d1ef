"""
What request bodies cost monedge: memory, temporary files and time.

    .venv/bin/python bench/upload.py one [--mib 1024] [--chunked]
    .venv/bin/python bench/upload.py many [--count 100] [--mib 10] [--rate 1]

Either mode also takes C{--request-buffering} (the service holds each body
whole before sending it) and C{--profile FILE} (monedge runs under
C{twistd --profile}, cProfile, and leaves its stats in FILE).

Starts, on 127.0.0.1, an upstream that reads each request's body (by its
Content-Length, or chunked), counts it, and answers 200 with the count, and
monedge in front of it (C{--access-log none}, its TMPDIR a directory of
the bench's own).  While the uploads run, monedge's RSS is sampled every
0.1 s, and so are the sizes of the files it holds open in that TMPDIR (a
temporary file unlinked at once is still found through C{/proc/PID/fd});
monedge streams bodies and should hold none.  The upstream notes when each
request's head and its body's first byte reached it, and monedge's CPU
time (user and system) over the uploads is read from C{/proc/PID/stat}.

  - C{one}: one upload of N MiB (1 GiB by default) sent as fast as the
    client can, through monedge and then straight to the upstream: the
    throughput of each, monedge's RSS growth, temporary-file peak and CPU
    time, and when the upstream saw the request and its first body byte
    against when the client had sent the whole body (long before it when
    the body streams; after it when monedge holds the body whole first).
  - C{many}: C{--count} concurrent uploads of N MiB each to an upstream
    that reads each body at C{--rate} MiB/s: monedge's RSS growth,
    temporary-file peak and CPU time, and how many requests reached the
    upstream (head and first body byte) before their client had sent the
    whole body.

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
    thread per connection, and close it; append to C{log} when each
    request's head came and when its body's first byte did (C{head PATH
    SECONDS} and C{body PATH SECONDS} lines, monotonic seconds).
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(512)
    lock = threading.Lock()

    def note(line: str) -> None:
        with lock, open(log, "a") as f:
            f.write(line + "\n")

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
                    path = head.split(b" ", 2)[1].decode()
                    note(f"head {path} {time.monotonic()}")
                    if not rest:
                        # The body's first bytes: peeked, left for _readBody.
                        conn.recv(1, socket.MSG_PEEK)
                    note(f"body {path} {time.monotonic()}")
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
    path: str
    status: bytes
    answered: int
    seconds: float
    started: float
    #: Seconds from the start until the client had sent the whole body.
    sent: float


def upload(port: int, total: int, chunked: bool, path: bytes = b"/bench/up") -> Upload:
    """
    POST C{total} bytes to 127.0.0.1:C{port} as fast as the socket takes
    them; the status and the size the upstream counted.  The path is
    monedge's: the upstream sees it without C{/bench}.
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
        upstreamPath = path.decode().removeprefix("/bench")
        return Upload(upstreamPath, status, answered, seconds, started, sentAt)
    finally:
        s.close()


def arrivals(log: Path) -> dict[tuple[str, str], float]:
    """
    When the upstream saw each request's head and its body's first byte:
    (C{"head"} or C{"body"}, path) -> monotonic seconds.
    """
    if not log.exists():
        return {}
    seen = {}
    for line in log.read_text().splitlines():
        what, path, when = line.split()
        seen[(what, path)] = float(when)
    return seen


def cpuSeconds(pid: int) -> tuple[float, float]:
    """
    The user and system CPU seconds C{pid} has used so far.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def measure(args: argparse.Namespace, directory: Path) -> bool:
    spool = directory / "tmp"
    spool.mkdir()
    upstreamPort, port, adminPort = freePort(), freePort(), freePort()
    registry = directory / "services.yaml"
    registry.write_text(
        f'services:\n  {SERVICE}:\n    endpoints: ["127.0.0.1:{upstreamPort}"]\n'
        f"    policy:\n      max-body-size: {args.mib * MIB + 1}\n"
        "      timeout: 600s\n"
        + ("      request-buffering: true\n" if args.request_buffering else "")
    )
    arrivalLog = directory / "arrivals.log"
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
            str(arrivalLog),
        ],
        upstreamPort,
        directory / "upstream.log",
    )
    command = monedgeCommand(
        ["env", f"TMPDIR={spool}"], port, adminPort, registry, "none"
    )
    if args.request_buffering:
        # Room for every body at once.
        command += ["--request-buffer-budget", str(args.count * (args.mib * MIB + 1))]
    if args.profile is not None:
        at = command.index("-n") + 1
        command[at:at] = [
            f"--profile={args.profile.resolve()}",
            "--profiler=cprofile",
            "--savestats",
        ]
    monedge = Server("monedge", command, port, directory / "monedge.log")
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
        arrivalLog.unlink(missing_ok=True)
        time.sleep(0.5)
        before = rssBytes(monedge.pid)
        cpuBefore = cpuSeconds(monedge.pid)
        sampler = Sampler(monedge.pid, str(spool))
        sampler.start()
        results: list[Upload] = []
        errors: list[BaseException] = []
        try:
            if args.mode == "one":
                results.append(upload(port, total, args.chunked))
            else:

                def one(n: int) -> None:
                    try:
                        path = b"/bench/up/%d" % (n,)
                        results.append(upload(port, total, args.chunked, path))
                    except BaseException as e:
                        errors.append(e)

                threads = [
                    threading.Thread(target=one, args=(n,)) for n in range(args.count)
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
        finally:
            sampler.stop()
        cpuAfter = cpuSeconds(monedge.pid)
        for child in children:
            child.checkAlive()
        seen = arrivals(arrivalLog)
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
    if args.request_buffering:
        framing += ", request-buffering"
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
        head = seen.get(("head", through.path))
        body = seen.get(("body", through.path))
        if head is not None and body is not None:
            print(
                f"first byte:     the upstream saw the request {head - through.started:.2f} s"
                f" in and its body {body - through.started:.2f} s in; the client had sent"
                f" the whole body {through.sent:.2f} s in"
                + (
                    " (monedge held it first)"
                    if head >= through.started + through.sent
                    else ""
                )
            )
    else:
        print(
            f"uploads:        {args.count} concurrent x {args.mib} MiB ({framing}) to an "
            f"upstream reading {args.rate:g} MiB/s each; {len(results)} answered"
        )
        if results:
            print(f"slowest:        {max(r.seconds for r in results):.1f} s")
            early = [
                r
                for r in results
                if seen.get(("body", r.path), float("inf")) < r.started + r.sent
            ]
            latest = max(
                seen.get(("head", r.path), float("inf")) - r.started for r in results
            )
            print(
                f"first byte:     {len(early)} of {len(results)} bodies reached the upstream"
                f" before their client had sent them whole; the latest head came"
                f" {latest:.2f} s after its upload started"
            )
    growth = sampler.rss - before
    print(
        f"monedge RSS:    {before / MIB:.1f} MiB before, {sampler.rss / MIB:.1f} MiB peak, "
        f"growth {growth / MIB:.1f} MiB"
    )
    print(f"temp files:     {sampler.files / MIB:.1f} MiB at peak in monedge's TMPDIR")
    user, system = (
        after - start for after, start in zip(cpuAfter, cpuBefore, strict=True)
    )
    print(f"monedge CPU:    {user:.2f} s user, {system:.2f} s system")
    if args.profile is not None:
        print(f"profile:        {args.profile} (cProfile stats: python -m pstats)")
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
        "--request-buffering",
        action="store_true",
        help="the service holds each body whole first (request-buffering: true)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="run monedge under cProfile (twistd --profile), stats to FILE",
    )
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
