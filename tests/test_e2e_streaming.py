"""
End-to-end streaming: large bodies flow with backpressure in bounded
memory, and a client that goes away takes its upstream request with it.
"""

from __future__ import annotations

import hashlib
import socket
import time
from typing import Any

from twisted.internet import reactor, task, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from monedge.testing import Received
from tests.e2e import ProxyTestCase

MIB = 1 << 20
CHUNK = bytes(range(256)) * 256  # 64 KiB


@implementer(IPullProducer)
class _PatternProducer:
    """
    Writes C{total} bytes of a repeating pattern, one chunk per
    C{resumeProducing}: it only writes as fast as the proxy reads.
    """

    def __init__(self, request: Request, total: int) -> None:
        self.request = request
        self.remaining = total
        self.stopped = False

    def resumeProducing(self) -> None:
        if self.stopped:
            return
        if self.remaining <= 0:
            self.request.unregisterProducer()
            self.request.finish()
            return
        data = CHUNK[: min(len(CHUNK), self.remaining)]
        self.remaining -= len(data)
        self.request.write(data)

    def stopProducing(self) -> None:
        self.stopped = True


def _expectedDigest(total: int) -> str:
    digest = hashlib.sha256()
    remaining = total
    while remaining:
        data = CHUNK[: min(len(CHUNK), remaining)]
        digest.update(data)
        remaining -= len(data)
    return digest.hexdigest()


def _slowRead(port: int, path: bytes, rate: int) -> tuple[bytes, int, str]:
    """
    GET C{path} and read the response at about C{rate} bytes a second with
    a small receive buffer.  Returns the head, the body length and the
    body's SHA-256.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    try:
        s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            data = s.recv(65536)
            if not data:
                break
            buffer += data
        head, _, body = buffer.partition(b"\r\n\r\n")
        digest = hashlib.sha256(body)
        received = len(body)
        started = time.monotonic()
        while True:
            data = s.recv(65536)
            if not data:
                break
            digest.update(data)
            received += len(data)
            ahead = received / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        return head, received, digest.hexdigest()
    finally:
        s.close()


class StreamingTests(ProxyTestCase):
    """
    Bodies are streamed, not buffered.
    """

    async def test_largeResponseToSlowReaderInBoundedMemory(self) -> None:
        """
        A 200 MiB response reaches a client that reads at about 40 MiB/s
        intact, while the proxy's RSS grows by far less than the body: the
        slow client pauses the upstream instead of filling memory.
        """
        total = 200 * MIB

        def big(request: Request, seen: Received) -> int:
            request.setHeader(b"content-length", b"%d" % (total,))
            request.registerProducer(_PatternProducer(request, total), False)
            return NOT_DONE_YET

        upstream = self.startUpstream(big)
        proxy = await self.startProxy(
            {"service.api.big": {"endpoints": [upstream.address]}}
        )
        await self.get(proxy.url + "/big/warmup-not-found-is-fine", timeout=5)
        baseline = proxy.rss()
        peak = [baseline]

        def sample() -> None:
            peak[0] = max(peak[0], proxy.rss())

        sampler = task.LoopingCall(sample)
        sampler.start(0.1)
        try:
            head, received, digest = await threads.deferToThread(
                _slowRead, proxy.port, b"/big/file", 40 * MIB
            )
        finally:
            sampler.stop()
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
        self.assertIn(b"Content-Length: %d" % (total,), head)
        self.assertEqual(received, total)
        self.assertEqual(digest, _expectedDigest(total))
        growth = peak[0] - baseline
        self.assertLess(growth, 48 * MIB, f"RSS grew by {growth / MIB:.1f} MiB")


class DisconnectTests(ProxyTestCase):
    """
    A client that goes away cancels its upstream request.
    """

    async def _upstreamSeesDisconnect(self, streaming: bool) -> None:
        lost: Deferred[None] = Deferred()
        requests: list[Request] = []

        def hold(request: Request, seen: Received) -> int:
            requests.append(request)
            request.notifyFinish().addErrback(lambda failure: lost.callback(None))
            if streaming:
                request.write(b"x" * 1024)
            return NOT_DONE_YET

        upstream = self.startUpstream(hold)
        proxy = await self.startProxy(
            {"service.api.hold": {"endpoints": [upstream.address]}}
        )
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        client.sendall(b"GET /hold/ HTTP/1.1\r\nHost: a\r\n\r\n")
        await proxy.waitFor(lambda: bool(requests), 5, "the upstream request")
        if streaming:
            first = await threads.deferToThread(client.recv, 65536)
            self.assertTrue(first.startswith(b"HTTP/1.1 200"), first)
        client.close()
        timeout = reactor.callLater(5, lost.cancel)
        await lost
        timeout.cancel()
        records: list[dict[str, Any]] = []

        def logged() -> bool:
            records[:] = proxy.accessLog()
            return bool(records)

        await proxy.waitFor(logged, 5, "the access log record")
        self.assertEqual(records[-1]["status"], 499)

    async def test_disconnectBeforeResponseCancelsUpstream(self) -> None:
        """
        A client that leaves while the upstream has not answered makes the
        proxy drop the upstream connection; the access log says 499.
        """
        await self._upstreamSeesDisconnect(streaming=False)

    async def test_disconnectMidBodyCancelsUpstream(self) -> None:
        """
        A client that leaves in the middle of a streamed body makes the
        proxy drop the upstream connection.
        """
        await self._upstreamSeesDisconnect(streaming=True)
