"""
End-to-end unbuffered streams through a real C{twistd monedge}: server-sent
events arrive as the upstream writes them, idle timeouts measure
inactivity, C{Expect: 100-continue} is answered before the body is sent,
and upstream trailers are dropped from a complete response.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from twisted.internet import protocol, reactor, task, threads
from twisted.web.server import NOT_DONE_YET, Request

from monedge.testing import Received, Responder
from tests.e2e import ProxyTestCase


def _eventStream(interval: float, count: int) -> Responder:
    """
    A responder writing C{count} server-sent events, one every C{interval}
    seconds, then ending the response.
    """

    def respond(request: Request, seen: Received) -> int:
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        sent = [0]

        def tick() -> None:
            if request._disconnected:
                loop.stop()
                return
            if sent[0] == count:
                loop.stop()
                request.finish()
                return
            request.write(b"data: event %d\n\n" % sent[0])
            sent[0] += 1

        loop = task.LoopingCall(tick)
        loop.start(interval, now=False)
        return NOT_DONE_YET

    return respond


def _readEvents(
    port: int, path: bytes
) -> tuple[bytes, list[tuple[float, bytes]], float]:
    """
    GET C{path}; return the head, each chunk of the body with the time it
    arrived (seconds after the request), and when the response ended.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        started = time.monotonic()
        s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n")
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            buffer += s.recv(65536)
        head, _, rest = buffer.partition(b"\r\n\r\n")
        chunks: list[tuple[float, bytes]] = []
        if rest:
            chunks.append((time.monotonic() - started, rest))
        while not b"".join(c for _, c in chunks).endswith(b"0\r\n\r\n"):
            data = s.recv(65536)
            if not data:
                break
            chunks.append((time.monotonic() - started, data))
        return head, chunks, time.monotonic() - started


class _TrailerUpstream(protocol.Protocol):
    """
    Answers every request with a chunked body followed by a trailer.
    """

    buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                b"Trailer: X-Checksum\r\n\r\n"
                b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n"
            )


class EventStreamTests(ProxyTestCase):
    """
    Streams reach the client as the upstream writes them.
    """

    async def test_eventsArriveAsWritten(self) -> None:
        """
        An upstream writing one server-sent event a second: the head and
        each event reach the client about when they are written, the first
        while the upstream's stream is still open, not at its end.
        """
        upstream = self.startUpstream(_eventStream(1.0, 3))
        proxy = await self.startProxy(
            {"service.api.sse": {"endpoints": [upstream.address]}}
        )
        head, chunks, ended = await threads.deferToThread(
            _readEvents, proxy.port, b"/sse/stream"
        )
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
        self.assertIn(b"\r\nContent-Type: text/event-stream", head)
        events = [(at, data) for at, data in chunks if b"data: event" in data]
        self.assertEqual(len(events), 3, chunks)
        for index, (at, data) in enumerate(events):
            self.assertIn(b"data: event %d\n\n" % index, data)
            # Written at about index + 1 seconds; seen within half a second.
            self.assertLess(abs(at - (index + 1)), 0.5, chunks)
        self.assertLess(events[0][0], ended - 1.5)

    async def test_idleTimeoutMeasuresInactivity(self) -> None:
        """
        With a 1 s idle-timeout, a stream that sends an event every 0.3 s
        for 3 s (three times the timeout in all) arrives whole.
        """
        upstream = self.startUpstream(_eventStream(0.3, 10))
        proxy = await self.startProxy(
            {
                "service.api.sse": {
                    "endpoints": [upstream.address],
                    "policy": {"idle-timeout": "1s"},
                }
            }
        )
        head, chunks, ended = await threads.deferToThread(
            _readEvents, proxy.port, b"/sse/stream"
        )
        body = b"".join(data for _, data in chunks)
        for index in range(10):
            self.assertIn(b"data: event %d\n\n" % index, body)
        self.assertTrue(body.endswith(b"0\r\n\r\n"), body)
        self.assertGreater(ended, 3.0)

    async def test_expectContinue(self) -> None:
        """
        A client that sends Expect: 100-continue and waits gets
        "100 Continue" from monedge before sending its body, then the
        upstream's answer; the upstream sees the body and no Expect.
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            {"service.api.up": {"endpoints": [upstream.address]}}
        )

        def run() -> tuple[bytes, bytes]:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
                s.sendall(
                    b"POST /up/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                    b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
                )
                interim = s.recv(65536)
                s.sendall(b"hello")
                rest = b""
                while True:
                    data = s.recv(65536)
                    if not data:
                        break
                    rest += data
                return interim, rest

        interim, rest = await threads.deferToThread(run)
        self.assertEqual(interim, b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertTrue(rest.startswith(b"HTTP/1.1 200"), rest)
        [seen] = upstream.received
        self.assertEqual(seen.body, b"hello")
        self.assertEqual(seen.header(b"expect"), [])

    async def test_upstreamTrailersDropped(self) -> None:
        """
        A chunked upstream response with a trailer reaches the client as a
        complete chunked response without the trailer (and without its
        Trailer announcement), and the connection serves a second request.
        """
        factory: Any = protocol.Factory.forProtocol(_TrailerUpstream)
        port: Any = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        proxy = await self.startProxy(
            {"service.api.tr": {"endpoints": [f"127.0.0.1:{port.getHost().port}"]}}
        )

        def run() -> bytes:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
                request = b"GET /tr/x HTTP/1.1\r\nHost: a\r\n\r\n"
                s.sendall(
                    request
                    + request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
                )
                data = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                return data

        raw = await threads.deferToThread(run)
        responses = raw.split(b"HTTP/1.1 200 OK\r\n")[1:]
        self.assertEqual(len(responses), 2, raw)
        for response in responses:
            head, _, body = response.partition(b"\r\n\r\n")
            self.assertIn(b"Transfer-Encoding: chunked", head)
            self.assertNotIn(b"Trailer", head)
            self.assertEqual(body, b"5\r\nhello\r\n0\r\n\r\n")
