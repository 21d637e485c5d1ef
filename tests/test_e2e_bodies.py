"""
End-to-end corpus for request bodies that stream (issue 15, items 1-6 and
10): raw clients on real sockets, a real C{twistd monedge}, and a raw
upstream that records every byte it receives, so that what crosses (a
cut-off request, a chunked body's framing, its trailers) is visible
exactly as it went over the wire.

Each case checks both ends: what the client got (its status, JSON error,
interim responses, whether the connection closed, how long its sends
blocked) and what the upstream received (whether the request was ever
complete, its framing, its body and trailers, when its first byte came).
Everything runs on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.python.failure import Failure

from monedge.testing import ProxyProcess, freePort
from tests.e2e import ProxyTestCase

KIB = 1 << 10
MIB = 1 << 20

#: A 64 KiB block of every byte value: bodies are made of it.
BLOCK = bytes(range(256)) * 256


def socketBufferMaxima() -> int:
    """
    The most a receive buffer and a send buffer may grow to together, in
    bytes: the maxima of C{net.ipv4.tcp_rmem} and C{tcp_wmem}.
    """
    total = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            total += int(f.read().split()[2])
    return total


def pattern(size: int) -> bytes:
    """
    C{size} bytes of L{BLOCK}, repeated.
    """
    whole, part = divmod(size, len(BLOCK))
    return BLOCK * whole + BLOCK[:part]


# The upstream: raw bytes in, recorded; what it does depends on the target.

#: Body bytes after which the "cut" and "reset" upstreams drop the request.
CUT_AFTER = 64 * KIB

#: The answer of the "early" upstream, sent as soon as the head is in.
EARLY = (
    b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 14\r\nConnection: close\r\n\r\nupstream: 413\n"
)

#: The answer of the "trailers" upstream: a chunked body, then trailer
#: fields, of which only X-Sig, X_Under and X-Count may reach a client.
TRAILERS = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sig\r\n"
    b"Connection: close\r\n\r\n"
    b"5\r\nhello\r\n0\r\n"
    b"X-Sig: s1\r\nSet-Cookie: a=b\r\nContent-Type: text/plain\r\n"
    b"Connection: x\r\nTransfer-Encoding: chunked\r\nX_Under: u\r\n"
    b"X-Count: 1\r\n\r\n"
)

#: The answer of the "trailer-length" upstream: a trailer section with a
#: Content-Length, which llhttp reads as conflicting framing.
TRAILER_LENGTH = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    b"5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n"
)


class UpstreamConnection(Protocol):
    """
    One connection to a L{BodyUpstream}: records every byte, parses one
    request (its head, then a C{Content-Length} or chunked body and any
    trailer section), and does what its target's first segment says:

      - C{ok}: answer 200 once the body is all in, with its length and
        SHA-256 as JSON, and close;
      - C{slow}: the same, reading at most the upstream's C{rate} bytes a
        second (the transport is paused between reads);
      - C{cut}, C{reset}: close (a FIN), or reset (an RST), once
        L{CUT_AFTER} body bytes are in, answering nothing;
      - C{early}: answer L{EARLY} as soon as the head is in, half-close,
        and discard the body;
      - C{trailers}, C{trailer-length}: answer L{TRAILERS} (or
        L{TRAILER_LENGTH}) once the body is all in, and close.

    @ivar raw: every byte received.
    @ivar head: the request head (up to its blank line), once in.
    @ivar body: the decoded body so far.
    @ivar trailerSection: the raw trailer section of a chunked body (its
        field lines, without the blank line), once in.
    @ivar complete: the whole request came, framing and all.
    @ivar headAt: when the head came (C{time.monotonic()}).
    @ivar firstBodyAt: when the first body byte came.
    @ivar lost: fires when the connection is gone.
    """

    def __init__(self, upstream: BodyUpstream) -> None:
        self.upstream = upstream
        self.raw = bytearray()
        self.head: bytes | None = None
        self.body = bytearray()
        self.trailerSection: bytes | None = None
        self.complete = False
        self.headAt: float | None = None
        self.firstBodyAt: float | None = None
        self.lost: Deferred[None] = Deferred()
        self.gone = False
        self._buffer = bytearray()
        self._state = "head"
        self._remaining = 0
        self._calls: list[IDelayedCall] = []
        self._answered = False

    # What was received

    @property
    def kind(self) -> bytes:
        """
        The first segment of the target: what this connection does.
        """
        if self.head is None:
            return b""
        target = self.head.split(b" ", 2)[1]
        return target.split(b"/")[1]

    @property
    def target(self) -> bytes | None:
        """
        The request's target, once the head is in.
        """
        if self.head is None:
            return None
        return self.head.split(b" ", 2)[1]

    def header(self, name: bytes) -> list[bytes]:
        """
        Every value of header C{name} (any case) in the head, in order.
        """
        values = []
        assert self.head is not None
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower():
                values.append(value.strip())
        return values

    def trailers(self) -> list[bytes]:
        """
        The trailer section's field lines, as received.
        """
        if not self.trailerSection:
            return []
        return self.trailerSection.split(b"\r\n")

    # Parsing

    def connectionMade(self) -> None:
        self.upstream.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        if self.head is not None and self.firstBodyAt is None:
            self.firstBodyAt = time.monotonic()
        self._buffer += data
        self._parse()
        if self.gone or self.transport is None:
            return
        if self.kind == b"slow" and not self.complete:
            # Read no faster than the rate: pause for as long as what just
            # came takes at that rate.
            transport: Any = self.transport
            transport.pauseProducing()
            self._later(len(data) / self.upstream.rate, transport.resumeProducing)

    def _parse(self) -> None:
        while not self.gone:
            if self._state == "head":
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                self.head = bytes(self._buffer[:end])
                self.headAt = time.monotonic()
                del self._buffer[: end + 4]
                if self._buffer:
                    self.firstBodyAt = self.headAt
                lengths = self.header(b"content-length")
                if self.header(b"transfer-encoding") == [b"chunked"]:
                    self._state = "size"
                elif lengths:
                    self._remaining = int(lengths[0])
                    self._state = "length" if self._remaining else "done"
                else:
                    self._state = "done"
                self._headIn()
            elif self._state == "length":
                taken = self._buffer[: self._remaining]
                self._takeBody(bytes(taken))
                del self._buffer[: len(taken)]
                if self._remaining:
                    return
                self._state = "done"
            elif self._state == "size":
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(self._buffer[:end]).split(b";")[0], 16)
                del self._buffer[: end + 2]
                self._remaining = size
                self._state = "data" if size else "trailers"
            elif self._state == "data":
                taken = self._buffer[: self._remaining]
                self._takeBody(bytes(taken))
                del self._buffer[: len(taken)]
                if self._remaining:
                    return
                self._state = "data end"
            elif self._state == "data end":
                if len(self._buffer) < 2:
                    return
                assert self._buffer[:2] == b"\r\n", bytes(self._buffer[:20])
                del self._buffer[:2]
                self._state = "size"
            elif self._state == "trailers":
                if self._buffer[:2] == b"\r\n":
                    self.trailerSection = b""
                    del self._buffer[:2]
                else:
                    end = self._buffer.find(b"\r\n\r\n")
                    if end < 0:
                        return
                    self.trailerSection = bytes(self._buffer[:end])
                    del self._buffer[: end + 4]
                self._state = "done"
            else:
                if not self.complete:
                    self.complete = True
                    self._bodyIn()
                return

    def _takeBody(self, data: bytes) -> None:
        self.body += data
        self._remaining -= len(data)
        if self.kind in (b"cut", b"reset") and len(self.body) >= CUT_AFTER:
            if self.kind == b"cut":
                self.close()
            else:
                self.reset()

    # Answering

    def _headIn(self) -> None:
        if self.kind == b"early":
            self.write(EARLY)
            transport: Any = self.transport
            transport.loseWriteConnection()

    def _bodyIn(self) -> None:
        if self._answered or self.kind not in (
            b"ok",
            b"slow",
            b"trailers",
            b"trailer-length",
        ):
            return
        self._answered = True
        if self.kind == b"trailers":
            self.write(TRAILERS)
        elif self.kind == b"trailer-length":
            self.write(TRAILER_LENGTH)
        else:
            answer = json.dumps(
                {
                    "length": len(self.body),
                    "sha256": hashlib.sha256(self.body).hexdigest(),
                }
            ).encode()
            self.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n"
                % (len(answer),)
                + answer
            )
        self.close()

    def write(self, data: bytes) -> None:
        """
        Send C{data} to monedge.
        """
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        """
        Close the connection (a FIN, once what was written has gone).
        """
        if self.transport is not None:
            self.transport.loseConnection()

    def reset(self) -> None:
        """
        Reset the connection: SO_LINGER 0 and close, an RST.
        """
        transport: Any = self.transport
        if transport is None or self.gone:
            return
        transport.getHandle().setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        transport.abortConnection()

    def _later(self, delay: float, f: Callable[[], object]) -> None:
        self._calls = [call for call in self._calls if call.active()]
        self._calls.append(reactor.callLater(delay, f))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []
        self.lost.callback(None)


class BodyUpstream(ServerFactory):
    """
    A raw HTTP/1.1 upstream on 127.0.0.1 that records every byte each
    connection receives (see L{UpstreamConnection}).

    @ivar rate: the bytes a second a C{slow} connection reads.
    @ivar receiveBuffer: if given, the listening socket's C{SO_RCVBUF},
        so that the kernel holds little of what the upstream has not read.
    """

    noisy = False

    def __init__(self, rate: float = 1 << 30, receiveBuffer: int | None = None) -> None:
        self.rate = rate
        self.receiveBuffer = receiveBuffer
        self.connections: list[UpstreamConnection] = []
        self._port: IListeningPort | None = None

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self)

    def start(self) -> None:
        """
        Listen on a free port.
        """
        port: Any = reactor.listenTCP(0, self, interface="127.0.0.1")
        if self.receiveBuffer is not None:
            # Accepted connections inherit it.
            port.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, self.receiveBuffer
            )
        self._port = port

    @property
    def address(self) -> str:
        """
        C{127.0.0.1:port}.
        """
        assert self._port is not None
        return f"127.0.0.1:{getattr(self._port.getHost(), 'port')}"  # noqa: B009

    def withKind(self, kind: bytes) -> list[UpstreamConnection]:
        """
        The connections whose request's target starts with C{/kind/}.
        """
        return [c for c in self.connections if c.kind == kind]

    def forPath(self, path: bytes) -> list[UpstreamConnection]:
        """
        The connections that carry a client's request for C{path} (on
        C{service.api.bodies}: the upstream gets it without C{/bodies}).
        """
        target = path.removeprefix(b"/bodies")
        return [c for c in self.connections if c.target == target]

    async def stop(self) -> None:
        """
        Stop listening and drop every connection still open.
        """
        assert self._port is not None
        stopping = self._port.stopListening()
        if stopping is not None:
            await stopping
        still = [c for c in self.connections if not c.gone]
        for connection in still:
            if connection.transport is not None:
                connection.transport.abortConnection()  # type: ignore[attr-defined]
        await defer.gatherResults([c.lost for c in still])


# The client: blocking sockets, run in threads.


@dataclass
class Answer:
    """
    What a raw client read: the bytes, and how the connection ended
    (C{"closed"}, C{"reset"}, or C{"open"} when the wait ran out).
    """

    data: bytes
    ending: str

    def responses(self) -> list[tuple[int, bytes, bytes]]:
        """
        The responses in C{data} as (status, head, body); a body is framed
        by C{Content-Length} or chunked, or runs to the close (the body of
        a chunked one is its raw chunked bytes).
        """
        found = []
        rest = self.data
        while rest:
            head, sep, rest = rest.partition(b"\r\n\r\n")
            if not sep:
                break
            status = int(head.split(b" ", 2)[1])
            body = b""
            if status >= 200:
                length = _field(head, b"content-length")
                if length is not None:
                    body, rest = rest[: int(length)], rest[int(length) :]
                else:
                    body, rest = rest, b""
            found.append((status, head, body))
        return found

    def final(self) -> tuple[int, bytes, bytes]:
        """
        The final (non-1xx) response; fails if there is not exactly one.
        """
        finals = [r for r in self.responses() if r[0] >= 200]
        if len(finals) != 1:
            raise AssertionError(f"{len(finals)} final responses: {self.data[:500]!r}")
        return finals[0]

    def interim(self) -> list[int]:
        """
        The statuses of the interim (1xx) responses, in order.
        """
        return [r[0] for r in self.responses() if r[0] < 200]


def _field(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def connect(port: int, sendBuffer: int | None = None) -> socket.socket:
    """
    A connection to monedge, with a small C{SO_SNDBUF} if asked.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if sendBuffer is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sendBuffer)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def readAll(s: socket.socket, timeout: float = 5.0) -> Answer:
    """
    Read until the server closes or resets the connection, or C{timeout}
    passes with nothing more.  Blocking.
    """
    s.settimeout(timeout)
    chunks = []
    ending = "open"
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                ending = "closed"
                break
            chunks.append(chunk)
    except TimeoutError:
        pass
    except ConnectionResetError:
        ending = "reset"
    return Answer(b"".join(chunks), ending)


def readHead(s: socket.socket, timeout: float = 5.0) -> bytes:
    """
    Read one response head (up to its blank line) and return it, with
    anything read after it.  Blocking.
    """
    s.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def sendQuietly(s: socket.socket, data: bytes) -> bool:
    """
    Send C{data}; whether all of it went (monedge may close first).
    """
    try:
        s.sendall(data)
    except OSError:
        return False
    return True


def leave(s: socket.socket, reset: bool) -> None:
    """
    Go: a FIN, or with C{reset} an RST.
    """
    if reset:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def post(
    path: bytes,
    length: int | None,
    *headers: bytes,
    close: bool = True,
) -> bytes:
    """
    A POST head for C{path}: with C{Content-Length: length}, or chunked if
    C{length} is L{None}.
    """
    framing = (
        b"Transfer-Encoding: chunked"
        if length is None
        else b"Content-Length: %d" % (length,)
    )
    lines = [b"POST " + path + b" HTTP/1.1", b"Host: a", framing, *headers]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def chunk(data: bytes) -> bytes:
    """
    C{data} as one chunk.
    """
    return b"%x\r\n%b\r\n" % (len(data), data)


def within(d: Deferred[Any], seconds: float) -> Deferred[Any]:
    """
    C{d}, failing after C{seconds}.
    """
    return d.addTimeout(seconds, reactor)


def errorBody(test: ProxyTestCase, answer: tuple[int, bytes, bytes], code: str) -> None:
    """
    Check that C{answer} is monedge's JSON error C{code}, carrying the
    response's request id.
    """
    status, head, body = answer
    document = json.loads(body)
    test.assertEqual(document["code"], code, body)
    test.assertEqual(document["status"], status)
    requestId = _field(head, b"x-request-id")
    test.assertIsNotNone(requestId, head)
    assert requestId is not None
    test.assertEqual(document["request_id"], requestId.decode())
    test.assertEqual(_field(head, b"content-type"), b"application/json")


class BodiesTestCase(ProxyTestCase):
    """
    A raw upstream behind monedge's C{service.api.bodies}.
    """

    async def startBodies(
        self,
        args: Sequence[str] = (),
        policy: Mapping[str, Any] | None = None,
        upstream: BodyUpstream | None = None,
        env: Mapping[str, str] | None = None,
    ) -> tuple[BodyUpstream, ProxyProcess]:
        """
        Start C{upstream} (a fresh L{BodyUpstream} by default) and monedge
        in front of it, with C{policy} as the service's policy.
        """
        if upstream is None:
            upstream = BodyUpstream()
        upstream.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(upstream.stop()))
        service: dict[str, Any] = {"endpoints": [upstream.address]}
        if policy is not None:
            service["policy"] = dict(policy)
        proxy = await self.startProxy({"service.api.bodies": service}, args, env)
        return upstream, proxy

    async def waitForRequest(
        self,
        proxy: ProxyProcess,
        upstream: BodyUpstream,
        path: bytes,
        bodyBytes: int = 0,
    ) -> UpstreamConnection:
        """
        Wait (5 s at most) for the upstream connection that carries the
        request a client sent for C{path}, once at least C{bodyBytes} of
        its body are in.
        """
        found: list[UpstreamConnection] = []

        def check() -> bool:
            found[:] = [c for c in upstream.forPath(path) if len(c.body) >= bodyBytes]
            return bool(found)

        await proxy.waitFor(check, 5, f"the upstream request for {path!r}")
        [connection] = found
        return connection

    async def logged(self, proxy: ProxyProcess, path: str) -> dict[str, Any]:
        """
        Wait for the access-log record of C{path}, and return it.
        """
        records: list[dict[str, Any]] = []

        def check() -> bool:
            records[:] = [r for r in proxy.accessLog() if r["path"] == path]
            return bool(records)

        await proxy.waitFor(check, 5, f"the access log record of {path}")
        [record] = records
        return record

    def assertCleanLog(self, proxy: ProxyProcess) -> None:
        """
        monedge logged no traceback and nothing critical.
        """
        for bad in ("Traceback", "Unhandled", "CRITICAL"):
            self.assertNotIn(bad, proxy.log())


class StreamedBodyCorpusTests(BodiesTestCase):
    """
    The corpus cases for streamed bodies (issue 15, item 10): the client
    stops mid-body, the upstream fails mid-body, reads slowly or answers
    early, and trailers cross both ways.
    """

    async def test_clientStopsMidBody(self) -> None:
        """
        A client that stops in the middle of its body, with a FIN or an
        RST, a C{Content-Length} body or a chunked one, once part of the
        body has reached the upstream: the upstream connection is closed
        and never carried a complete request (fewer body bytes than
        declared, or no last chunk), and the access log says 499.
        """
        upstream, proxy = await self.startBodies()
        sent = 256 * KIB
        for chunked in (False, True):
            for reset in (False, True):
                name = ("chunked" if chunked else "length") + (
                    "-rst" if reset else "-fin"
                )
                path = b"/bodies/ok/" + name.encode()
                s = connect(proxy.port)
                try:
                    if chunked:
                        data = post(path, None) + chunk(pattern(sent))
                    else:
                        data = post(path, MIB) + pattern(sent)
                    await threads.deferToThread(s.sendall, data)
                    connection = await self.waitForRequest(proxy, upstream, path, sent)
                finally:
                    leave(s, reset)
                await within(connection.lost, 5)
                self.assertFalse(connection.complete, name)
                self.assertEqual(len(connection.body), sent, name)
                if chunked:
                    self.assertNotIn(b"\r\n0\r\n", bytes(connection.raw), name)
                record = await self.logged(proxy, path.decode())
                self.assertEqual(record["status"], 499, (name, record))
        self.assertCleanLog(proxy)

    async def test_upstreamFailsMidBody(self) -> None:
        """
        An upstream that closes its connection (a FIN, or an RST) while
        the body streams to it, before any response: the client gets 502
        C{upstream_reset}, monedge's JSON error with its request id, and
        the connection is closed.
        """
        upstream, proxy = await self.startBodies()
        for kind in (b"cut", b"reset"):
            path = b"/bodies/" + kind + b"/x"
            s = connect(proxy.port)
            try:
                # The client goes on sending, as a real one would, while
                # monedge answers.
                sending = threads.deferToThread(
                    sendQuietly, s, post(path, 4 * MIB) + pattern(4 * MIB)
                )
                answer = await threads.deferToThread(readAll, s)
                await sending
            finally:
                s.close()
            [connection] = upstream.withKind(kind)
            await within(connection.lost, 5)
            self.assertFalse(connection.complete)
            self.assertEqual(answer.ending, "closed", answer)
            self.assertEqual(answer.interim(), [])
            final = answer.final()
            self.assertEqual(final[0], 502, answer.data[:500])
            errorBody(self, final, "upstream_reset")
            self.assertEqual(_field(final[1], b"connection"), b"close")
            record = await self.logged(proxy, path.decode())
            self.assertEqual(record["status"], 502)
        self.assertCleanLog(proxy)

    async def test_upstreamReadsSlowly(self) -> None:
        """
        An upstream that reads a body slowly (16 MiB/s) gets it whole and
        intact, and the client is paused meanwhile rather than monedge
        buffering: its sends block (sending takes at least 0.8 of the time
        the upstream takes to read what it has read by the end, not a few
        milliseconds); what the upstream has not read when the client is
        done is no more than the kernel's socket buffers on the way may
        hold (monedge's receive buffer from the client and its send buffer
        to the upstream grow to C{tcp_rmem}'s and C{tcp_wmem}'s maxima;
        the 64 KiB buffers at both ends, monedge's own high water and one
        read add up to under 2 MiB more); and monedge's RSS grows by less
        than 16 MiB.  The body is 16 MiB more than those buffers, so that
        neither the kernel nor monedge could take it all.
        """
        rate = 16 * MIB
        kernel = socketBufferMaxima()
        total = kernel + 16 * MIB
        upstream, proxy = await self.startBodies(
            policy={"max-body-size": 2 * total},
            upstream=BodyUpstream(rate=rate, receiveBuffer=64 * KIB),
        )
        baseline = proxy.rss()
        peak = [baseline]
        unread: list[int] = []
        s = connect(proxy.port, sendBuffer=64 * KIB)

        def send() -> float:
            s.sendall(post(b"/bodies/slow/x", total))
            started = time.monotonic()
            for _ in range(0, total, len(BLOCK)):
                s.sendall(BLOCK)
                peak[0] = max(peak[0], proxy.rss())
            elapsed = time.monotonic() - started
            [connection] = upstream.withKind(b"slow")
            unread.append(total - len(connection.body))
            return elapsed

        try:
            sending = await threads.deferToThread(send)
            answer = await threads.deferToThread(readAll, s, 10)
        finally:
            s.close()
        [connection] = upstream.withKind(b"slow")
        self.assertTrue(connection.complete)
        self.assertEqual(bytes(connection.body), pattern(total))
        status, _, body = answer.final()
        self.assertEqual(status, 200)
        self.assertEqual(
            json.loads(body),
            {"length": total, "sha256": hashlib.sha256(pattern(total)).hexdigest()},
        )
        self.assertLess(
            unread[0],
            kernel + 2 * MIB,
            f"the client sent it all in {sending:.2f} s",
        )
        # The client's sends took about as long as the upstream took to
        # read what it had read by then: it was held back, not buffered.
        read = total - unread[0]
        self.assertGreater(sending, 0.8 * read / rate, f"{read} bytes read")
        growth = peak[0] - baseline
        self.assertLess(growth, 16 * MIB, f"RSS grew by {growth / MIB:.1f} MiB")

    async def test_upstreamAnswersEarly(self) -> None:
        """
        An upstream that answers 413 as soon as it has the head, while
        the client is still sending its body: the client gets that answer
        (the upstream's, not one of monedge's), and the connection is
        closed; the upstream never got the whole body.
        """
        upstream, proxy = await self.startBodies()
        for chunked in (False, True):
            path = b"/bodies/early/" + (b"chunked" if chunked else b"length")
            s = connect(proxy.port)
            try:
                if chunked:
                    data = post(path, None) + chunk(pattern(4 * MIB)) + b"0\r\n\r\n"
                else:
                    data = post(path, 4 * MIB) + pattern(4 * MIB)
                sending = threads.deferToThread(sendQuietly, s, data)
                answer = await threads.deferToThread(readAll, s)
                await sending
            finally:
                s.close()
            self.assertEqual(answer.ending, "closed", answer)
            status, head, body = answer.final()
            self.assertEqual((status, body), (413, b"upstream: 413\n"), answer.data)
            self.assertEqual(_field(head, b"connection"), b"close")
            [connection] = upstream.forPath(path)
            self.assertFalse(connection.complete)
            record = await self.logged(proxy, path.decode())
            self.assertEqual(record["status"], 413)
        self.assertCleanLog(proxy)

    async def test_chunkedTrailersGoUpstream(self) -> None:
        """
        A chunked body goes upstream chunked (no C{Content-Length}) and its
        trailer fields follow its last chunk as trailers, never as headers;
        fields that may not be trailers (hop-by-hop, framing, routing,
        credentials, forwarding fields monedge sets, names with an
        underscore) are dropped from the trailer section.
        """
        upstream, proxy = await self.startBodies()
        s = connect(proxy.port)
        try:
            s.sendall(
                post(b"/bodies/ok/trailers", None)
                + chunk(b"hello")
                + chunk(b" world")
                + b"0\r\n"
                + b"X-Checksum: abc\r\n"
                + b"Host: evil.example\r\n"
                + b"Content-Type: text/evil\r\n"
                + b"Authorization: Bearer x\r\n"
                + b"Cookie: c=1\r\n"
                + b"Connection: keep-alive\r\n"
                + b"Keep-Alive: timeout=5\r\n"
                + b"TE: trailers\r\n"
                + b"Trailer: X-Checksum\r\n"
                + b"X-Forwarded-For: 6.6.6.6\r\n"
                + b"X-Request-Id: forged\r\n"
                + b"X_Under: u\r\n"
                + b"x-other: o\r\n"
                + b"\r\n"
            )
            answer = await threads.deferToThread(readAll, s)
        finally:
            s.close()
        self.assertEqual(answer.final()[0], 200, answer.data)
        [connection] = upstream.withKind(b"ok")
        self.assertTrue(connection.complete)
        self.assertEqual(bytes(connection.body), b"hello world")
        self.assertEqual(connection.header(b"transfer-encoding"), [b"chunked"])
        self.assertEqual(connection.header(b"content-length"), [])
        self.assertEqual(connection.header(b"x-checksum"), [])
        self.assertEqual(connection.header(b"host"), [b"a"])
        self.assertEqual(connection.trailers(), [b"X-Checksum: abc", b"X-Other: o"])
        self.assertTrue(
            bytes(connection.raw).endswith(
                b"0\r\nX-Checksum: abc\r\nX-Other: o\r\n\r\n"
            ),
            bytes(connection.raw[-300:]),
        )
        self.assertCleanLog(proxy)

    async def test_framingTrailersRefused(self) -> None:
        """
        A client's trailer section with a C{Content-Length} or a
        C{Transfer-Encoding} is framing in doubt: 400 C{bad_request} (llhttp
        reads it as conflicting with the chunked coding), the connection
        closed, and the upstream request the body was streaming to is cut
        off, never complete.
        """
        upstream, proxy = await self.startBodies()
        for name, trailer in [
            ("length", b"Content-Length: 5"),
            ("coding", b"Transfer-Encoding: chunked"),
        ]:
            path = b"/bodies/ok/" + name.encode()
            s = connect(proxy.port)
            try:
                s.sendall(post(path, None) + chunk(b"hello"))
                connection = await self.waitForRequest(proxy, upstream, path, 5)
                s.sendall(b"0\r\n" + trailer + b"\r\n\r\n")
                answer = await threads.deferToThread(readAll, s)
            finally:
                s.close()
            final = answer.final()
            self.assertEqual(final[0], 400, (name, answer.data))
            errorBody(self, final, "bad_request")
            self.assertEqual(answer.ending, "closed")
            await within(connection.lost, 5)
            self.assertFalse(connection.complete, name)
        self.assertCleanLog(proxy)

    async def test_upstreamTrailerWithLength(self) -> None:
        """
        An upstream response whose trailer section carries a
        C{Content-Length} is framing in doubt: the client (asking for
        trailers or not) gets the body cut off, without its last chunk,
        never a response that looks complete.
        """
        upstream, proxy = await self.startBodies()
        for asks in (True, False):
            path = b"/bodies/trailer-length/" + (b"asks" if asks else b"not")
            s = connect(proxy.port)
            try:
                extra = [b"TE: trailers"] if asks else []
                s.sendall(post(path, 2, *extra) + b"hi")
                answer = await threads.deferToThread(readAll, s)
            finally:
                s.close()
            head, _, body = answer.data.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
            self.assertNotEqual(answer.ending, "open")
            self.assertNotIn(b"0\r\n", body.removeprefix(b"5\r\nhello\r\n"), asks)
            record = await self.logged(proxy, path.decode())
            self.assertEqual(record.get("error"), "reset_mid_body")
        self.assertCleanLog(proxy)

    async def test_responseTrailersToClientsThatAsk(self) -> None:
        """
        A chunked upstream response's trailer fields reach a client that
        sent C{TE: trailers} after the last chunk (fields that may not be
        trailers dropped), and monedge sent C{TE: trailers} upstream for
        it; a client that did not ask gets the same body without them,
        and no C{TE} went upstream.
        """
        upstream, proxy = await self.startBodies()
        answers = {}
        for asks in (True, False):
            path = b"/bodies/trailers/" + (b"asks" if asks else b"not")
            s = connect(proxy.port)
            try:
                extra = [b"TE: trailers"] if asks else []
                s.sendall(post(path, 2, *extra) + b"hi")
                answers[asks] = await threads.deferToThread(readAll, s)
            finally:
                s.close()
        first, second = upstream.withKind(b"trailers")
        self.assertEqual(first.header(b"te"), [b"trailers"], first.head)
        self.assertEqual(second.header(b"te"), [])
        for asks, expected in [
            # Names with an underscore pass, as in a response's head.
            (True, b"0\r\nX-Sig: s1\r\nX_under: u\r\nX-Count: 1\r\n\r\n"),
            (False, b"0\r\n\r\n"),
        ]:
            answer = answers[asks]
            self.assertEqual(answer.ending, "closed")
            head, _, body = answer.data.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
            self.assertEqual(_field(head, b"transfer-encoding"), b"chunked")
            self.assertIsNone(_field(head, b"x-sig"))
            self.assertEqual(body, b"5\r\nhello\r\n" + expected, asks)
        self.assertCleanLog(proxy)


class StreamingUploadTests(BodiesTestCase):
    """
    Uploads stream: the upstream sees a body as it is sent, and monedge
    writes no temporary file.
    """

    async def test_uploadReachesUpstreamBeforeItEnds(self) -> None:
        """
        A 5 MiB upload sent over about 2 s reaches the upstream long before
        the client has finished: its first body byte is there within half
        a second of the head, and the whole body arrives intact.
        """
        total = 5 * MIB
        upstream, proxy = await self.startBodies()
        s = connect(proxy.port)
        pieces = total // len(BLOCK)

        def send() -> tuple[float, float]:
            s.sendall(post(b"/bodies/ok/upload", total))
            started = time.monotonic()
            for index in range(pieces):
                s.sendall(BLOCK)
                # Paced, not synchronising: the upload takes about 2 s.
                time.sleep(
                    max(0.0, started + 2.0 * (index + 1) / pieces - time.monotonic())
                )
            return started, time.monotonic()

        try:
            started, finished = await threads.deferToThread(send)
            answer = await threads.deferToThread(readAll, s)
        finally:
            s.close()
        [connection] = upstream.withKind(b"ok")
        self.assertTrue(connection.complete)
        self.assertEqual(bytes(connection.body), pattern(total))
        self.assertEqual(answer.final()[0], 200)
        self.assertEqual(connection.header(b"content-length"), [b"%d" % (total,)])
        assert connection.firstBodyAt is not None
        self.assertGreater(finished - started, 1.5)
        self.assertLess(connection.firstBodyAt - started, 0.5)
        self.assertLess(connection.firstBodyAt, finished - 1.0)

    async def test_noTemporaryFiles(self) -> None:
        """
        While a 32 MiB chunked upload streams to an upstream that reads it
        at 8 MiB/s, monedge holds no file open in its TMPDIR, nor any
        deleted file (looked at through /proc/PID/fd every 50 ms), and
        the body arrives whole.
        """
        temporary = os.path.join(self.directory, "tmp")
        os.makedirs(temporary)
        total = 32 * MIB
        upstream, proxy = await self.startBodies(
            policy={"max-body-size": 2 * total},
            upstream=BodyUpstream(rate=8 * MIB),
            env={"TMPDIR": temporary},
        )
        assert proxy.process is not None
        fds = f"/proc/{proxy.process.pid}/fd"
        seen: set[str] = set()
        s = connect(proxy.port)

        def send() -> None:
            s.sendall(post(b"/bodies/slow/chunked", None))
            big = chunk(BLOCK * 16)
            for _ in range(total // (len(BLOCK) * 16)):
                s.sendall(big)
            s.sendall(b"0\r\n\r\n")

        sending = threads.deferToThread(send)
        looks = 0
        while not sending.called:
            for name in os.listdir(fds):
                try:
                    target = os.readlink(f"{fds}/{name}")
                except OSError:
                    continue
                if target.startswith(temporary) or target.endswith("(deleted)"):
                    seen.add(target)
            looks += 1
            await _sleep(0.05)
        await sending
        try:
            answer = await threads.deferToThread(readAll, s, 10)
        finally:
            s.close()
        self.assertEqual(seen, set())
        self.assertGreater(looks, 20)
        self.assertEqual(os.listdir(temporary), [])
        status, _, body = answer.final()
        self.assertEqual(status, 200, answer.data)
        self.assertEqual(json.loads(body)["length"], total)


def _sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class ExpectContinueTests(BodiesTestCase):
    """
    C{Expect: 100-continue} is honest: C{100 Continue} only when the
    upstream starts taking the body.
    """

    async def test_hookRefuses(self) -> None:
        """
        A request the C{auth} hook refuses (no API key) gets 401 and
        never a C{100 Continue}; nothing reaches the upstream, and the
        connection closes without the body being read.
        """
        keys = os.path.join(self.directory, "keys")
        with open(keys, "w") as f:
            f.write(hashlib.sha256(b"secret").hexdigest() + "\n")
        hook = json.dumps(
            {"name": "auth", "options": {"mode": "api-key", "keys-file": keys}}
        )
        upstream, proxy = await self.startBodies(["--hook", hook])
        s = connect(proxy.port)
        try:
            s.sendall(post(b"/bodies/ok/x", MIB, b"Expect: 100-continue"))
            answer = await threads.deferToThread(readAll, s)
        finally:
            s.close()
        self.assertEqual(answer.interim(), [])
        final = answer.final()
        self.assertEqual(final[0], 401, answer.data)
        errorBody(self, final, "unauthorized")
        self.assertEqual(answer.ending, "closed")
        self.assertEqual(upstream.connections, [])

    async def test_upstreamReachable(self) -> None:
        """
        With a reachable upstream the client waiting for it gets C{100
        Continue} once the head has gone upstream, and then, after sending
        its body, the final response; C{Expect} is not forwarded.  curl,
        told to wait up to 10 s for the 100, does the same.
        """
        upstream, proxy = await self.startBodies()
        s = connect(proxy.port)
        try:
            s.sendall(post(b"/bodies/ok/raw", 5, b"Expect: 100-continue"))
            interim = await threads.deferToThread(readHead, s)
            # The head went upstream (before the body, which is not sent).
            connection = await self.waitForRequest(proxy, upstream, b"/bodies/ok/raw")
            self.assertEqual(bytes(connection.body), b"")
            s.sendall(b"hello")
            answer = await threads.deferToThread(readAll, s)
        finally:
            s.close()
        self.assertEqual(interim, b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(answer.final()[0], 200, answer.data)
        self.assertEqual(bytes(connection.body), b"hello")
        self.assertEqual(connection.header(b"expect"), [])

        body = os.path.join(self.directory, "body")
        with open(body, "wb") as f:
            f.write(pattern(300 * KIB))
        done = await self.curl(
            "-v",
            "--expect100-timeout",
            "10",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            "@" + body,
            proxy.url + "/bodies/ok/curl",
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(b"< HTTP/1.1 100 Continue", done.stderr)
        self.assertIn(b"< HTTP/1.1 200", done.stderr)
        self.assertEqual(json.loads(done.stdout)["length"], 300 * KIB)

    async def test_upstreamDown(self) -> None:
        """
        With the upstream down (nothing listens on its port) the client
        waiting for C{100 Continue} gets 502 or 503 instead, never a 100,
        and the connection closes.
        """
        down = f"127.0.0.1:{freePort()}"
        proxy = await self.startProxy({"service.api.bodies": {"endpoints": [down]}})
        s = connect(proxy.port)
        try:
            s.sendall(post(b"/bodies/ok/x", MIB, b"Expect: 100-continue"))
            answer = await threads.deferToThread(readAll, s)
        finally:
            s.close()
        self.assertEqual(answer.interim(), [])
        status, head, body = answer.final()
        self.assertIn(status, (502, 503), answer.data)
        self.assertEqual(json.loads(body)["status"], status)
        self.assertEqual(answer.ending, "closed")


class RequestBufferingTests(BodiesTestCase):
    """
    A service with C{request-buffering: true} gets each body whole, with
    its length, after the client has sent it.
    """

    async def test_wholeBodyFirst(self) -> None:
        """
        A 1 MiB chunked body sent slowly (over about 1.5 s) to a service
        with C{request-buffering: true}: the upstream gets the head only
        once the client has sent the last chunk, with a C{Content-Length}
        and no C{Transfer-Encoding}, and the body intact.
        """
        total = MIB
        upstream, proxy = await self.startBodies(policy={"request-buffering": True})
        s = connect(proxy.port)
        pieces = total // len(BLOCK)

        def send() -> float:
            s.sendall(post(b"/bodies/ok/buffered", None))
            started = time.monotonic()
            for index in range(pieces):
                s.sendall(chunk(BLOCK))
                time.sleep(
                    max(0.0, started + 1.5 * (index + 1) / pieces - time.monotonic())
                )
            last = time.monotonic()
            s.sendall(b"0\r\n\r\n")
            return last

        try:
            last = await threads.deferToThread(send)
            answer = await threads.deferToThread(readAll, s)
        finally:
            s.close()
        self.assertEqual(answer.final()[0], 200, answer.data)
        [connection] = upstream.withKind(b"ok")
        assert connection.headAt is not None
        self.assertGreaterEqual(connection.headAt, last)
        self.assertEqual(connection.header(b"content-length"), [b"%d" % (total,)])
        self.assertEqual(connection.header(b"transfer-encoding"), [])
        self.assertEqual(bytes(connection.body), pattern(total))

    async def test_budgetFull(self) -> None:
        """
        With C{--request-buffer-budget 1MiB}, a 2 MiB body to a buffering
        service is refused with 503 C{request_buffer_full} (monedge's JSON
        error, the connection closed) and nothing reaches the upstream; a
        body within the budget still goes through.
        """
        upstream, proxy = await self.startBodies(
            ["--request-buffer-budget", "1MiB"], policy={"request-buffering": True}
        )
        for chunked in (False, True):
            path = b"/bodies/ok/" + (b"chunked" if chunked else b"length")
            s = connect(proxy.port)
            try:
                if chunked:
                    data = post(path, None) + chunk(pattern(2 * MIB)) + b"0\r\n\r\n"
                else:
                    data = post(path, 2 * MIB) + pattern(2 * MIB)
                sending = threads.deferToThread(sendQuietly, s, data)
                answer = await threads.deferToThread(readAll, s)
                await sending
            finally:
                s.close()
            final = answer.final()
            self.assertEqual(final[0], 503, answer.data[:500])
            errorBody(self, final, "request_buffer_full")
            self.assertEqual(answer.ending, "closed")
        self.assertEqual(upstream.connections, [])
        s = connect(proxy.port)
        try:
            s.sendall(post(b"/bodies/ok/small", 512 * KIB) + pattern(512 * KIB))
            answer = await threads.deferToThread(readAll, s)
        finally:
            s.close()
        self.assertEqual(answer.final()[0], 200, answer.data[:500])
