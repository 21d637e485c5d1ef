"""
End-to-end: a client may leave at any moment, and monedge never logs a
traceback or a critical line for it.

Each test runs a matrix against a real C{twistd monedge}: response framings
(a C{Content-Length} body, a chunked one, one delimited by the upstream's
close, a large one held back by backpressure, a slow stream, and a
WebSocket tunnel) crossed with the moments a client can leave (in the
request head, in the request body, after the request and before the
response head, during the response body, before the 101 and in the tunnel)
and the two ways it can (a FIN, or an RST with C{SO_LINGER} 0).  For each
cell: monedge's log has no traceback, unhandled error, critical line or
C{AttributeError}; the access log records the request (499 when the client
left before the response was over, 101 for a tunnel); the upstream
connection the request used is closed, not leaked; and the next request,
on a new connection, is answered.
"""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall

from monedge.testing import ProxyProcess
from tests.e2e import ProxyTestCase
from tests.test_e2e_faults import (
    ScriptedConnection,
    ScriptedRequest,
    ScriptedUpstream,
    deferRequest,
)

#: What must never appear in monedge's log because a client left.
BAD_LOG = re.compile(r"Traceback|Unhandled|critical|AttributeError", re.IGNORECASE)

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="

#: A body the upstream sends at once, far larger than the socket buffers
#: between it and a client that stops reading.
BIG = 8 * 1024 * 1024


def _accept(head: bytes) -> bytes:
    """
    The 101 that completes the WebSocket handshake in C{head}.
    """
    key = b""
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            key = value.strip()
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


def script(connection: ScriptedConnection, request: ScriptedRequest) -> None:
    """
    The upstream: what it answers depends on the first segment of the
    target it receives (monedge strips the service's prefix).
    """
    kind = request.target.split(b"/")[1]
    if kind == b"ok":
        connection.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    elif kind == b"hold":
        # Never answers: the client leaves before the response head.
        pass
    elif kind == b"length":
        connection.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"l" * 1000
        )
    elif kind == b"chunked":
        connection.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n"
            + b"c" * 1000
            + b"\r\n"
        )
    elif kind == b"close":
        # No length: the body ends when the upstream closes.
        connection.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"n" * 1000)
    elif kind == b"big":
        connection.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (BIG,) + b"b" * BIG
        )
    elif kind == b"slow":
        connection.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        _trickle(connection)
    elif kind == b"ws-hold":
        pass
    elif kind == b"ws":
        connection.write(_accept(request.head))
    else:
        connection.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")


def _trickle(connection: ScriptedConnection) -> None:
    """
    Send a 100-byte chunk every 20 ms, for as long as the connection lasts.
    """
    timer: list[IDelayedCall] = []

    def send() -> None:
        connection.write(b"64\r\n" + b"s" * 100 + b"\r\n")
        timer[:] = [connection.later(0.02, send)]

    send()


@dataclass
class Cell:
    """
    One cell of the matrix: what the client sends, when it leaves, how.

    @ivar name: the cell, in a failure message.
    @ivar path: the request's path (unique to the cell).
    @ivar data: what the client sends first.
    @ivar until: read from monedge until this holds of what was read
        (C{None}: wait for the upstream to have the request instead).
    @ivar reset: leave with an RST rather than a FIN.
    @ivar then: what the client sends after that, before it leaves.
    @ivar reachesUpstream: whether the request gets to the upstream.
    @ivar status: the status the access log records.
    @ivar method: the method the access log records (with the path).
    """

    name: str
    path: str
    data: bytes
    until: Callable[[bytes], bool] | None
    reset: bool
    then: bytes = b""
    reachesUpstream: bool = True
    status: int = 499
    method: str = "GET"


def _bodyStarted(minimum: int) -> Callable[[bytes], bool]:
    """
    The response head and at least C{minimum} bytes after it were read.
    """

    def started(data: bytes) -> bool:
        head, found, body = data.partition(b"\r\n\r\n")
        return bool(found) and len(body) >= minimum

    return started


def _headRead(data: bytes) -> bool:
    return b"\r\n\r\n" in data


def _get(path: str, *extra: bytes) -> bytes:
    return b"\r\n".join(
        [b"GET " + path.encode() + b" HTTP/1.1", b"Host: a", *extra, b"", b""]
    )


def _leave(s: socket.socket, reset: bool) -> None:
    """
    Go: a FIN, or with C{reset} an RST.
    """
    if reset:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def _readUntil(s: socket.socket, done: Callable[[bytes], bool]) -> bytes:
    """
    Read until C{done} holds of what was read (blocking, with the socket's
    timeout).
    """
    data = b""
    while not done(data):
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError(f"closed after {len(data)} bytes: {data[:300]!r}")
        data += chunk
    return data


class ClientLeavesTests(ProxyTestCase):
    """
    The matrix, on monedge's default upstream client.
    """

    async def startLeaving(self) -> tuple[ScriptedUpstream, ProxyProcess]:
        upstream = ScriptedUpstream(script)
        upstream.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(upstream.stop()))
        proxy = await self.startProxy(
            {"service.api.leave": {"endpoints": [upstream.address]}},
            # Short waits: a cell must never wait on a timeout to pass.
            ["--send-timeout", "5s", "--header-timeout", "5s"],
        )
        return upstream, proxy

    async def runCell(
        self, upstream: ScriptedUpstream, proxy: ProxyProcess, cell: Cell
    ) -> list[str]:
        """
        Run one cell; return what went wrong, if anything.
        """
        problems: list[str] = []
        logStart = len(proxy.log())
        accessStart = len(proxy.accessLog())
        requestsBefore = len(upstream.requests)
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        try:
            s.sendall(cell.data)
            if cell.until is not None:
                await threads.deferToThread(_readUntil, s, cell.until)
            if cell.reachesUpstream:
                await proxy.waitFor(
                    lambda: len(upstream.requests) > requestsBefore,
                    5,
                    f"{cell.name}: the upstream to have the request",
                )
            s.sendall(cell.then)
            used = None
            if cell.reachesUpstream:
                number = upstream.requests[-1].connection
                [used] = [c for c in upstream.open if c.number == number]
        finally:
            _leave(s, cell.reset)

        def recorded() -> bool:
            return len(proxy.accessLog()) > accessStart

        await proxy.waitFor(recorded, 5, f"{cell.name}: the access log record")
        records = proxy.accessLog()[accessStart:]
        expected = [(cell.status, cell.method, cell.path)]
        actual = [(r["status"], r["method"], r["path"]) for r in records]
        if actual != expected:
            problems.append(f"logged {actual}, expected {expected}")
        if cell.reachesUpstream:
            assert used is not None
            if used.transport is not None and used.transport.connected:  # type: ignore[attr-defined]
                await _within(used.lost, 5)
        elif len(upstream.requests) != requestsBefore:
            problems.append("the upstream got a request")
        after = await deferRequest(
            proxy.port, _get("/leave/ok/after", b"Connection: close"), 5
        )
        if (after.status, after.body) != (200, b"ok"):
            problems.append(f"the next request got {after.data[:200]!r}")
        for line in proxy.log()[logStart:].splitlines():
            if BAD_LOG.search(line):
                problems.append(f"logged: {line}")
        return [f"{cell.name}: {problem}" for problem in problems]

    async def runMatrix(self, cells: list[Cell]) -> None:
        upstream, proxy = await self.startLeaving()
        started = time.monotonic()
        problems: list[str] = []
        for cell in cells:
            problems += await self.runCell(upstream, proxy, cell)
        self.assertEqual(problems, [], "\n".join(problems))
        self.assertLess(time.monotonic() - started, 20)

    async def test_duringTheRequest(self) -> None:
        """
        A client that leaves in the middle of its request head is logged as
        499 with the request line that came, and no request reaches the
        upstream.  One that leaves in the middle of its request body
        (after monedge's 100 Continue, sent once the upstream takes the
        body) is logged as 499 too, and the upstream request, which the
        body was streaming to, is cut off: its connection closed.
        """
        cells = []
        for reset in (False, True):
            how = "rst" if reset else "fin"
            cells.append(
                Cell(
                    f"mid head ({how})",
                    f"/leave/ok/head-{how}",
                    b"GET /leave/ok/head-"
                    + how.encode()
                    + b" HTTP/1.1\r\nHost: a\r\nX-Par",
                    None,
                    reset,
                    reachesUpstream=False,
                )
            )
            path = f"/leave/ok/body-{how}"
            cells.append(
                Cell(
                    f"mid body ({how})",
                    path,
                    b"POST " + path.encode() + b" HTTP/1.1\r\nHost: a\r\n"
                    b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n",
                    _headRead,
                    reset,
                    then=b"x" * 10,
                    reachesUpstream=True,
                    method="POST",
                )
            )
        await self.runMatrix(cells)

    async def test_duringTheResponse(self) -> None:
        """
        A client that leaves after its request and before the response head,
        or during a Content-Length, chunked, close-delimited, large
        (backpressured) or slowly streamed response body, is logged as 499;
        the upstream connection is closed.
        """
        cells = []
        for reset in (False, True):
            how = "rst" if reset else "fin"
            path = f"/leave/hold/{how}"
            cells.append(
                Cell(f"before the head ({how})", path, _get(path), None, reset)
            )
            for kind, minimum in [
                ("length", 1000),
                ("chunked", 1000),
                ("close", 1000),
                ("big", 100_000),
                ("slow", 200),
            ]:
                path = f"/leave/{kind}/{how}"
                cells.append(
                    Cell(
                        f"{kind} body ({how})",
                        path,
                        _get(path),
                        _bodyStarted(minimum),
                        reset,
                    )
                )
        await self.runMatrix(cells)

    async def test_duringAWebSocket(self) -> None:
        """
        A client that leaves a WebSocket handshake before the 101 is logged
        as 499, and one that leaves the open tunnel as 101; either way the
        upstream connection is closed.
        """
        cells = []
        for reset in (False, True):
            how = "rst" if reset else "fin"
            extra = (
                b"Connection: Upgrade",
                b"Upgrade: websocket",
                b"Sec-WebSocket-Key: " + KEY,
                b"Sec-WebSocket-Version: 13",
            )
            path = f"/leave/ws-hold/{how}"
            cells.append(
                Cell(f"before the 101 ({how})", path, _get(path, *extra), None, reset)
            )
            path = f"/leave/ws/{how}"
            cells.append(
                Cell(
                    f"in the tunnel ({how})",
                    path,
                    _get(path, *extra),
                    _headRead,
                    reset,
                    status=101,
                )
            )
        await self.runMatrix(cells)


async def _within(d: Deferred[Any], seconds: float) -> None:
    """
    Wait for C{d}, failing after C{seconds}.
    """
    d.addTimeout(seconds, reactor)
    await d
