"""
End-to-end WebSockets: a real client (the C{websockets} package) through a
real C{twistd monedge} to a real WebSocket server, and raw sockets for the
handshakes that must never become tunnels.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet import protocol, reactor, threads
from twisted.internet.defer import Deferred
from twisted.web.server import Request
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.sync.server import Server, ServerConnection, serve

from monedge.testing import ProxyProcess, Received
from tests.e2e import ProxyTestCase, deferRaw, readUntilClosed

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = base64.b64encode(hashlib.sha1(KEY + GUID).digest())

#: Echo round trips per message type in the volume test.
ECHOES = 10_000


def handshake(path: bytes, *extra: bytes, version: bytes = b"13") -> bytes:
    """
    A raw WebSocket opening handshake for C{path}.
    """
    lines = [
        b"GET " + path + b" HTTP/1.1",
        b"Host: a",
        b"Connection: Upgrade",
        b"Upgrade: websocket",
        b"Sec-WebSocket-Key: " + KEY,
        b"Sec-WebSocket-Version: " + version,
        *extra,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


class EchoServer:
    """
    A real WebSocket server (websockets' threaded server) on 127.0.0.1:
    C{/echo} echoes, C{/push} sends C{ECHOES} messages first, C{/close}
    closes with 4001 "bye". It records how clients closed.
    """

    def __init__(self) -> None:
        self.closes: list[tuple[int | None, str | None]] = []
        self.paths: list[str] = []
        self.server: Server = serve(
            self.handle,
            "127.0.0.1",
            0,
            max_size=None,
            ping_interval=None,
            compression=None,
        )
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def handle(self, ws: ServerConnection) -> None:
        path = ws.request.path if ws.request is not None else ""
        self.paths.append(path)
        try:
            if path == "/close":
                ws.close(4001, "bye")
                return
            if path == "/push":
                for i in range(ECHOES):
                    ws.send(f"push {i}")
            for message in ws:
                ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            self.closes.append((ws.close_code, ws.close_reason))

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(10)


def _client(url: str) -> ClientConnection:
    return connect(
        url,
        max_size=None,
        ping_interval=None,
        compression=None,
        open_timeout=10,
        close_timeout=5,
    )


class _RawWebSocketUpstream(protocol.Protocol):
    """
    A hand-written upstream: answers the handshake with the 101 given, then
    says "bye" and closes once the client half-closes.
    """

    def __init__(self, answer: Callable[[bytes], bytes]) -> None:
        self.answer = answer
        self.buffer = b""
        self.switched = False

    def dataReceived(self, data: bytes) -> None:
        if self.switched:
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            self.switched = True
            assert self.transport is not None
            self.transport.write(self.answer(self.buffer))

    def readConnectionLost(self) -> None:
        assert self.transport is not None
        self.transport.write(b"bye")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


def _accepting(request: bytes) -> bytes:
    key = b""
    for line in request.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            key = value.strip()
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


def _wrongAccept(request: bytes) -> bytes:
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: d3Jvbmc=\r\n\r\n"
    )


def _rawUpstream(test: ProxyTestCase, answer: Callable[[bytes], bytes]) -> str:
    from twisted.internet.interfaces import IHalfCloseableProtocol
    from zope.interface import directlyProvides

    def build() -> protocol.Protocol:
        p = _RawWebSocketUpstream(answer)
        directlyProvides(p, IHalfCloseableProtocol)
        return p

    factory: Any = protocol.Factory.forProtocol(build)
    port: Any = reactor.listenTCP(0, factory, interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    return f"127.0.0.1:{port.getHost().port}"


def _exchange(port: int, data: bytes, then: Callable[[socket.socket], bytes]) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        return then(s)


def _samples(text: str, name: str) -> Iterator[tuple[dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                yield sample.labels, sample.value


class WebSocketTests(ProxyTestCase):
    """
    WebSockets through monedge: the handshake is checked and carried, and
    only a valid 101 turns the connection into a tunnel.
    """

    timeout = 180

    def setUp(self) -> None:
        super().setUp()
        self.ws = EchoServer()
        self.addCleanup(self.ws.stop)

    async def proxyFor(self, *args: str, **policy: Any) -> ProxyProcess:
        return await self.startProxy(
            {"service.api.ws": {"endpoints": [self.ws.address], "policy": policy}},
            args,
        )

    def inThread(self, f: Callable[[], Any]) -> Deferred[Any]:
        return threads.deferToThread(f)

    async def test_echoesBothWays(self) -> None:
        """
        Ten thousand text and ten thousand binary messages echo through one
        tunnel, in order and intact; then the server pushes ten thousand
        of its own. The upstream saw the path with the prefix stripped.
        """
        proxy = await self.proxyFor()
        url = f"ws://127.0.0.1:{proxy.port}/ws/"

        def run() -> list[str]:
            problems = []
            with _client(url + "echo") as ws:
                for i in range(ECHOES):
                    ws.send(f"text {i}")
                    if ws.recv(timeout=10) != f"text {i}":
                        problems.append(f"text {i}")
                    payload = i.to_bytes(4, "big") * 8
                    ws.send(payload)
                    if ws.recv(timeout=10) != payload:
                        problems.append(f"binary {i}")
            with _client(url + "push") as ws:
                for i in range(ECHOES):
                    if ws.recv(timeout=10) != f"push {i}":
                        problems.append(f"push {i}")
            return problems

        self.assertEqual(await self.inThread(run), [])
        self.assertEqual(self.ws.paths, ["/echo", "/push"])

    async def test_largeMessagesAndPings(self) -> None:
        """
        Messages of 16 MiB each way arrive intact, and pings from the
        client are answered through the tunnel.
        """
        proxy = await self.proxyFor()

        def run() -> tuple[bool, bool, float]:
            big = os.urandom(16 << 20)
            with _client(f"ws://127.0.0.1:{proxy.port}/ws/echo") as ws:
                ws.send(big)
                echoed = ws.recv(timeout=60) == big
                ws.send(big.hex()[: 4 << 20])
                text = ws.recv(timeout=60) == big.hex()[: 4 << 20]
                started = time.monotonic()
                ws.ping(b"are you there").wait(10)
                return echoed, text, time.monotonic() - started

        echoed, text, rtt = await self.inThread(run)
        self.assertTrue(echoed)
        self.assertTrue(text)
        self.assertLess(rtt, 10)

    async def test_closeCodesAndReasons(self) -> None:
        """
        A close code and reason from either end reach the other intact.
        """
        proxy = await self.proxyFor()
        url = f"ws://127.0.0.1:{proxy.port}/ws/"

        def run() -> tuple[int | None, str | None]:
            with _client(url + "close") as ws:
                try:
                    ws.recv(timeout=10)
                except ConnectionClosed:
                    pass
                fromServer = (ws.close_code, ws.close_reason)
            with _client(url + "echo") as ws:
                ws.close(4002, "done here")
            return fromServer

        self.assertEqual(await self.inThread(run), (4001, "bye"))
        deadline = time.monotonic() + 5
        while len(self.ws.closes) < 2 and time.monotonic() < deadline:
            await threads.deferToThread(time.sleep, 0.05)
        self.assertIn((4002, "done here"), self.ws.closes)

    async def test_idleTunnelOutlivesTheHTTPTimeouts(self) -> None:
        """
        A WebSocket idle for 61 s (past the 60 s many proxies cut at, and
        past a keep-alive timeout of 2 s) still carries a message.
        """
        proxy = await self.proxyFor("--keepalive-timeout", "2s")

        def run() -> str | bytes:
            with _client(f"ws://127.0.0.1:{proxy.port}/ws/echo") as ws:
                time.sleep(61)
                ws.send("still here")
                return ws.recv(timeout=10)

        self.assertEqual(await self.inThread(run), "still here")

    async def test_tunnelIdleTimeout(self) -> None:
        """
        Past the service's tunnel-idle-timeout both connections are closed;
        the access log records the tunnel as a 101 with its bytes and the
        timeout; the metrics counted it open and then closed.
        """
        proxy = await self.proxyFor(**{"tunnel-idle-timeout": "1s"})

        def run() -> tuple[float, float]:
            with _client(f"ws://127.0.0.1:{proxy.port}/ws/echo") as ws:
                ws.send("x")
                ws.recv(timeout=10)
                started = time.monotonic()
                try:
                    ws.recv(timeout=10)
                except ConnectionClosed:
                    pass
                return started, time.monotonic()

        started, ended = await self.inThread(run)
        self.assertLess(ended - started, 5)
        await proxy.waitFor(
            lambda: any(r.get("status") == 101 for r in proxy.accessLog()),
            5,
            "the tunnel's access-log line",
        )
        [line] = [r for r in proxy.accessLog() if r["status"] == 101]
        self.assertEqual(line["error"], "tunnel_idle_timeout")
        self.assertEqual(line["service"], "service.api.ws")
        self.assertGreater(line["bytes_in"], 0)
        self.assertGreater(line["bytes_out"], 0)
        _, metrics = await self.get(proxy.adminURL + "/metrics")
        text = metrics.decode()
        self.assertEqual([v for _, v in _samples(text, "monedge_tunnels_open")], [0.0])
        self.assertEqual(
            [
                (labels["service"], v)
                for labels, v in _samples(text, "monedge_tunnels_opened_total")
            ],
            [("service.api.ws", 1.0)],
        )

    async def test_upstreamRefusalStaysHTTP(self) -> None:
        """
        An upstream answering a handshake with 403, 426 or 200 is relayed as
        an ordinary response, and the client connection goes on parsing
        HTTP: bytes sent after it are a new request, routed and checked,
        never tunnelled to the upstream.
        """
        for status in (403, 426, 200):

            def refuse(request: Request, seen: Received, status: int = status) -> bytes:
                request.setResponseCode(status)
                return b"no tunnel"

            upstream = self.startUpstream(refuse)
            proxy = await self.startProxy(
                {"service.api.ws": {"endpoints": [upstream.address]}}
            )
            smuggled = b"GET /ws/after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            raw = await deferRaw(proxy.port, handshake(b"/ws/chat") + smuggled)
            first, _, rest = raw.partition(b"no tunnel")
            self.assertTrue(first.startswith(b"HTTP/1.1 %d" % status), raw)
            self.assertTrue(rest.startswith(b"HTTP/1.1 "), raw)
            self.assertIn(b"no tunnel", rest)
            self.assertEqual(
                [r.uri for r in upstream.received], [b"/chat", b"/after"], status
            )
            # The upstream got the handshake as a handshake, and the second
            # request as an ordinary one.
            self.assertEqual(upstream.received[0].header(b"upgrade"), [b"websocket"])
            self.assertEqual(upstream.received[1].header(b"upgrade"), [])
            await proxy.stop()

    async def test_h2cIsNotTunnelled(self) -> None:
        """
        Upgrade: h2c is dropped with the hop-by-hop headers: the request is
        proxied as an ordinary one.
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            {"service.api.ws": {"endpoints": [upstream.address]}}
        )
        raw = await deferRaw(
            proxy.port,
            b"GET /ws/x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
            b"Connection: close\r\n\r\n",
        )
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 "), raw)
        [seen] = upstream.received
        self.assertEqual(seen.header(b"upgrade"), [])
        self.assertEqual(seen.header(b"http2-settings"), [])

    async def test_malformedHandshakes(self) -> None:
        """
        A handshake without a valid key, or not a GET, is 400 bad_upgrade;
        a version other than 13 is 426 websocket_version with
        Sec-WebSocket-Version: 13; none reaches the upstream.
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            {"service.api.ws": {"endpoints": [upstream.address]}}
        )
        noKey = handshake(b"/ws/x").replace(b"Sec-WebSocket-Key: " + KEY + b"\r\n", b"")
        shortKey = handshake(b"/ws/x").replace(KEY, b"c2hvcnQ=")
        post = handshake(b"/ws/x").replace(b"GET ", b"POST ", 1)
        for request, status, code in [
            (noKey, 400, "bad_upgrade"),
            (shortKey, 400, "bad_upgrade"),
            (post, 400, "bad_upgrade"),
            (handshake(b"/ws/x", version=b"8"), 426, "websocket_version"),
        ]:
            raw = await deferRaw(proxy.port, request, timeout=3)
            head, _, body = raw.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 %d" % status), raw)
            self.assertEqual(json.loads(body)["code"], code)
            if status == 426:
                self.assertIn(b"\r\nsec-websocket-version: 13", head.lower())
        self.assertEqual(upstream.received, [])

    async def test_invalidAcceptIsBadGateway(self) -> None:
        """
        A 101 whose Sec-WebSocket-Accept does not answer the key is a 502,
        never a tunnel.
        """
        address = _rawUpstream(self, _wrongAccept)
        proxy = await self.startProxy({"service.api.ws": {"endpoints": [address]}})
        raw = await deferRaw(proxy.port, handshake(b"/ws/x") + b"hello", timeout=3)
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 502"), raw)
        self.assertEqual(json.loads(body)["code"], "upstream_reset")

    async def test_halfCloseIsCarried(self) -> None:
        """
        A client that half-closes its side of a tunnel still receives what
        the upstream sends after seeing that half-close.
        """
        address = _rawUpstream(self, _accepting)
        proxy = await self.startProxy({"service.api.ws": {"endpoints": [address]}})

        def then(s: socket.socket) -> bytes:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    break
                head += chunk
            s.shutdown(socket.SHUT_WR)
            return head + readUntilClosed(s)

        raw = await threads.deferToThread(
            _exchange, proxy.port, handshake(b"/ws/x"), then
        )
        self.assertTrue(raw.startswith(b"HTTP/1.1 101 Switching Protocols"), raw)
        # Header names are case-insensitive; Twisted writes Sec-Websocket-*.
        self.assertIn(b"\r\nsec-websocket-accept: " + ACCEPT.lower(), raw.lower())
        self.assertTrue(raw.endswith(b"\r\n\r\nbye"), raw)

    async def test_hooksCanRefuseAHandshake(self) -> None:
        """
        Request hooks run on a handshake before it goes upstream: a hook
        that refuses it answers as for any request, and no tunnel opens.
        """
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proxy = await self.startProxy(
            {"service.api.ws": {"endpoints": [self.ws.address]}},
            ["--hook", '{name: block-paths, options: {prefixes: ["/ws/secret"]}}'],
            env={"PYTHONPATH": f"{root}:{os.path.join(root, 'examples', 'hooks')}"},
        )

        def run() -> int:
            try:
                with _client(f"ws://127.0.0.1:{proxy.port}/ws/secret"):
                    return 101
            except InvalidStatus as e:
                return e.response.status_code

        self.assertEqual(await self.inThread(run), 403)
        self.assertEqual(self.ws.paths, [])

    async def test_sigtermClosesTunnelsAfterTheDrain(self) -> None:
        """
        On SIGTERM an open WebSocket keeps working through the drain, is
        closed once the drain timeout has passed, and monedge exits.
        """
        proxy = await self.proxyFor("--drain-delay", "1s", "--drain-timeout", "2s")
        ready = threading.Event()
        result: dict[str, Any] = {}

        def run() -> None:
            with _client(f"ws://127.0.0.1:{proxy.port}/ws/echo") as ws:
                ready.set()
                time.sleep(1.5)
                ws.send("during the drain")
                result["echo"] = ws.recv(timeout=10)
                started = time.monotonic()
                try:
                    ws.recv(timeout=20)
                except ConnectionClosed:
                    pass
                result["closedAfter"] = time.monotonic() - started

        running = self.inThread(run)
        await threads.deferToThread(ready.wait, 10)
        proxy.signal(signal.SIGTERM)
        await running
        self.assertEqual(result["echo"], "during the drain")
        self.assertLess(result["closedAfter"], 10)
        await proxy.waitFor(proxy.exited, 15, "monedge to exit")
