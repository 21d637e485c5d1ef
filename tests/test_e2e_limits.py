"""
End-to-end limits on slow bodies and on connections per listener, through
a real C{twistd monedge} and raw sockets on 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater
from twisted.web.server import NOT_DONE_YET

from tests.e2e import ProxyTestCase, readUntilClosed


class BodyTimeoutTests(ProxyTestCase):
    """
    A request body that stalls is refused; one that trickles steadily is
    not.
    """

    async def test_stalledBody(self) -> None:
        """
        Three bytes of a declared ten, then nothing: 408 request_timeout,
        saying the body stalled, about --body-timeout later; the upstream
        never sees the request.
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            {"service.api.svc": {"endpoints": [upstream.address]}},
            ["--body-timeout", "1s"],
        )

        def run() -> tuple[float, bytes]:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
                s.sendall(
                    b"POST /svc/x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc"
                )
                started = time.monotonic()
                data = readUntilClosed(s)
                return time.monotonic() - started, data

        waited, raw = await threads.deferToThread(run)
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 408"), raw)
        error = json.loads(body)
        self.assertEqual(error["code"], "request_timeout")
        self.assertIn("body stalled", error["message"])
        self.assertGreater(waited, 0.8)
        self.assertLess(waited, 4)
        self.assertEqual(upstream.received, [])

    async def test_steadyBody(self) -> None:
        """
        A body sent a byte every 0.4 s, four seconds in all, is never idle
        for the 1 s --body-timeout, and reaches the upstream whole.
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            {"service.api.svc": {"endpoints": [upstream.address]}},
            ["--body-timeout", "1s"],
        )

        def run() -> bytes:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
                s.sendall(
                    b"POST /svc/x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n"
                    b"Connection: close\r\n\r\n"
                )
                for byte in b"0123456789":
                    time.sleep(0.4)
                    s.sendall(bytes([byte]))
                return readUntilClosed(s)

        raw = await threads.deferToThread(run)
        self.assertTrue(raw.startswith(b"HTTP/1.1 200"), raw)
        [seen] = upstream.received
        self.assertEqual(seen.body, b"0123456789")


class ConnectionLimitTests(ProxyTestCase):
    """
    A listener holds at most --max-connections client connections.
    """

    async def test_limit(self) -> None:
        """
        With a limit of 3 and three connections open, a fourth gets 503
        too_many_connections at once and is closed, and is counted; once
        one of the three closes, a new connection is served.
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            {"service.api.svc": {"endpoints": [upstream.address]}},
            ["--max-connections", "3"],
        )

        async def openConnections() -> float:
            _, metrics = await self.get(proxy.adminURL + "/metrics")
            return sum(
                sample.value
                for family in text_string_to_metric_families(metrics.decode())
                for sample in family.samples
                if sample.name == "monedge_client_connections"
            )

        # The start's readiness probe connected and closed at once: wait
        # until monedge has seen it close, or it would count as a fourth.
        for _ in range(250):
            if await openConnections() == 0:
                break
            await deferLater(reactor, 0.02)

        def run() -> tuple[bytes, bytes]:
            held = [
                socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
                for _ in range(3)
            ]
            try:
                # Each is served: the three are open and counted.
                for s in held:
                    s.sendall(b"GET /svc/x HTTP/1.1\r\nHost: a\r\n\r\n")
                    assert s.recv(65536).startswith(b"HTTP/1.1 200")
                with socket.create_connection(
                    ("127.0.0.1", proxy.port), timeout=10
                ) as extra:
                    refused = readUntilClosed(extra)
                held.pop().close()
                time.sleep(0.3)
                with socket.create_connection(
                    ("127.0.0.1", proxy.port), timeout=10
                ) as later:
                    later.sendall(
                        b"GET /svc/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                    )
                    served = readUntilClosed(later)
                return refused, served
            finally:
                for s in held:
                    s.close()

        refused, served = await threads.deferToThread(run)
        head, _, body = refused.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 503"), refused)
        self.assertEqual(json.loads(body)["code"], "too_many_connections")
        self.assertTrue(served.startswith(b"HTTP/1.1 200"), served)
        _, metrics = await self.get(proxy.adminURL + "/metrics")
        values = [
            sample.value
            for family in text_string_to_metric_families(metrics.decode())
            for sample in family.samples
            if sample.name == "monedge_connections_refused_total"
        ]
        self.assertEqual(values, [1.0])


class SlowReadTests(ProxyTestCase):
    """
    A client that stops reading a response is dropped after
    --send-timeout, while other clients are served.
    """

    async def test_slowReaderDropped(self) -> None:
        """
        A client that reads only the head of a 64 MiB response, with a
        small receive buffer, is cut off within a few seconds of a 1 s
        --send-timeout (logged with client_send_timeout); meanwhile other
        requests succeed.
        """
        from tests.test_e2e_streaming import _PatternProducer

        def big(request: Any, seen: Any) -> int:
            request.setHeader(b"content-length", b"%d" % (64 << 20))
            request.registerProducer(_PatternProducer(request, 64 << 20), False)
            return NOT_DONE_YET

        bulk = self.startUpstream(big)
        small = self.startUpstream()
        proxy = await self.startProxy(
            {
                "service.api.big": {"endpoints": [bulk.address]},
                "service.api.svc": {"endpoints": [small.address]},
            },
            ["--send-timeout", "1s"],
        )

        def stall() -> float:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(20)
            s.connect(("127.0.0.1", proxy.port))
            try:
                s.sendall(b"GET /big/ HTTP/1.1\r\nHost: a\r\n\r\n")
                s.recv(1024)
                started = time.monotonic()
                time.sleep(4)
                # Whatever is buffered drains, then the connection is gone.
                try:
                    while s.recv(1 << 20):
                        pass
                except (ConnectionResetError, TimeoutError):
                    pass
                return time.monotonic() - started
            finally:
                s.close()

        stalled = threads.deferToThread(stall)
        codes = []
        for _ in range(10):
            response, _ = await self.get(proxy.url + "/svc/x")
            codes.append(response.code)
        self.assertEqual(codes, [200] * 10)
        elapsed = await stalled
        self.assertLess(elapsed, 15)
        await proxy.waitFor(
            lambda: any(
                r.get("error") == "client_send_timeout" for r in proxy.accessLog()
            ),
            10,
            "the slow reader's access-log line",
        )
