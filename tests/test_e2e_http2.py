"""
End-to-end HTTP/2 to clients: the same cases over HTTP/1.1 and HTTP/2
(curl, through a real C{twistd monedge}'s TLS listener), the stream limit
and h2load under load; and HTTP/2 with prior knowledge on the cleartext
listener, with the h2 library over real sockets: streamed uploads,
refusals, REFUSED_STREAM, floods and a zero window.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame
from twisted.internet import reactor, threads
from twisted.internet.protocol import Factory, Protocol
from twisted.web.server import Request

from monedge.testing import ProxyProcess, Received, freePort
from monedge.testing.tls import CertificateAuthority
from tests.e2e import ProxyTestCase

HOST = "api.example.com"


@dataclass
class Case:
    """
    One request, and what must come of it whichever the protocol.
    """

    name: str
    path: str
    status: int
    curl: Sequence[str] = ()
    code: str | None = None
    upstreamPath: str | None = None
    upstreamHeaders: dict[str, list[str]] = field(default_factory=dict)
    responseHeaders: dict[str, str | None] = field(default_factory=dict)


CASES = [
    Case("routed", "/svc/a/b?x=1", 200, upstreamPath="/a/b?x=1"),
    Case("unknown service", "/nope/a", 404, code="route_not_found"),
    Case("invalid name", "/Bad_Name/a", 404, code="route_not_found"),
    Case(
        "dot segment",
        "/svc/a/%2e%2e/b",
        400,
        curl=["--path-as-is"],
        code="path_dot_segment",
    ),
    Case("encoded slash", "/svc/a%2Fb", 400, code="path_encoded_separator"),
    Case(
        "forwarding headers",
        "/svc/h",
        200,
        curl=["-H", "X-Forwarded-For: 6.6.6.6", "-H", "X-Request-Id: forged"],
        upstreamPath="/h",
        upstreamHeaders={
            "x-forwarded-for": ["127.0.0.1"],
            "x-forwarded-proto": ["https"],
            "x-forwarded-prefix": ["/svc"],
        },
    ),
    Case(
        "client-controlled and identity headers",
        "/svc/h",
        200,
        curl=[
            "-H",
            "X-Real-IP: 6.6.6.6",
            "-H",
            "True-Client-IP: 6.6.6.6",
            "-H",
            "X-Original-URL: /admin",
            "-H",
            "X-HTTP-Method-Override: DELETE",
            "-H",
            "X-Envoy-Retry-On: 5xx",
            "-H",
            "X-User-Role: admin",
        ],  # fmt: skip
        upstreamPath="/h",
        upstreamHeaders={
            "x-real-ip": ["127.0.0.1"],
            "true-client-ip": [],
            "x-original-url": [],
            "x-http-method-override": [],
            "x-envoy-retry-on": [],
            "x-user-role": [],
        },
    ),
    Case(
        "underscore header names dropped",
        "/svc/h",
        200,
        curl=["-H", "X_User_Id: admin", "-H", "X_Forwarded_For: 6.6.6.6"],
        upstreamPath="/h",
        upstreamHeaders={"x_user_id": [], "x_forwarded_for": []},
    ),
    Case(
        "hop-by-hop request headers",
        "/svc/h",
        200,
        # (TE is monedge's own upstream, "trailers" for a client that
        # takes them: pinned by the corpus and the trailer tests.)
        curl=["-H", "Proxy-Authorization: Basic eDp5"],
        upstreamPath="/h",
        upstreamHeaders={"proxy-authorization": []},
    ),
    Case(
        "body forwarded",
        "/svc/post",
        200,
        curl=["--data-binary", "hello"],
        upstreamPath="/post",
        upstreamHeaders={"content-length": ["5"]},
    ),
    Case(
        "body too large",
        "/small/post",
        413,
        curl=["--data-binary", "x" * 2000],
        code="body_too_large",
    ),
    Case("blocked by a hook", "/svc/secret/x", 403, code="forbidden"),
    Case(
        "hook adds a response header",
        "/svc/h",
        200,
        upstreamPath="/h",
        responseHeaders={"x-edge": "monedge", "x-hop": None},
    ),
    Case(
        "TRACE refused", "/svc/h", 405, curl=["-X", "TRACE"], code="method_not_allowed"
    ),
]


def _responder(request: Request, seen: Received) -> bytes | None:
    # A hop-by-hop response header the client must never see.
    request.setHeader(b"x-hop", b"1")
    request.setHeader(b"connection", b"x-hop")
    return None


class HTTP2Tests(ProxyTestCase):
    """
    HTTP/2 and HTTP/1.1 clients get the same answers from monedge.
    """

    timeout = 240

    def setUp(self) -> None:
        super().setUp()
        self.ca = CertificateAuthority()
        self.caFile = os.path.join(self.directory, "ca.pem")
        with open(self.caFile, "wb") as f:
            f.write(self.ca.certificatePEM)
        self.tlsDir = os.path.join(self.directory, "tls")
        os.makedirs(self.tlsDir)
        with open(os.path.join(self.tlsDir, "default.pem"), "wb") as f:
            f.write(self.ca.issue([HOST]))
        self.tlsPort = freePort()

    async def startTLS(self, *args: str) -> tuple[ProxyProcess, Any]:
        upstream = self.startUpstream(_responder)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proxy = await self.startProxy(
            {
                "service.api.svc": {"endpoints": [upstream.address]},
                "service.api.small": {
                    "endpoints": [upstream.address],
                    "policy": {"max-body-size": "1KiB"},
                },
            },
            [
                "--tls-port",
                f"tcp:{self.tlsPort}:interface=127.0.0.1",
                "--tls-dir",
                self.tlsDir,
                "--hook",
                '{name: block-paths, options: {prefixes: ["/svc/secret"]}}',
                "--hook",
                "{name: headers, options: {response: {set: {X-Edge: monedge}}}}",
                "--identity-header",
                "X-User-Role",
                *args,
            ],
            env={"PYTHONPATH": f"{root}:{os.path.join(root, 'examples', 'hooks')}"},
        )
        return proxy, upstream

    async def fetch(self, case: Case, protocol: str) -> tuple[int, str, bytes, bytes]:
        result = await self.curl(
            protocol,
            "--cacert",
            self.caFile,
            "--resolve",
            f"{HOST}:{self.tlsPort}:127.0.0.1",
            "--dump-header",
            "-",
            "--write-out",
            "\n%{http_code} %{http_version}",
            *case.curl,
            f"https://{HOST}:{self.tlsPort}{case.path}",
        )
        self.assertEqual(
            result.returncode, 0, f"{case.name} over {protocol}: {result.stderr!r}"
        )
        output, _, tail = result.stdout.rpartition(b"\n")
        status, version = tail.decode().split()
        head, _, body = output.partition(b"\r\n\r\n")
        return int(status), version, head, body

    async def test_sameCasesOverBoth(self) -> None:
        """
        Every case gets the same status, error code, upstream request and
        response headers over HTTP/1.1 and over HTTP/2 (which curl really
        negotiated).
        """
        proxy, upstream = await self.startTLS()
        problems = []
        for case in CASES:
            for protocol, version in (("--http1.1", "1.1"), ("--http2", "2")):
                before = len(upstream.received)
                status, used, head, body = await self.fetch(case, protocol)
                label = f"{case.name} over HTTP/{version}"
                if used != version:
                    problems.append(f"{label}: curl used HTTP/{used}")
                if status != case.status:
                    problems.append(f"{label}: status {status}, body {body[:200]!r}")
                    continue
                if case.code is not None:
                    if json.loads(body).get("code") != case.code:
                        problems.append(f"{label}: body {body[:200]!r}")
                    if len(upstream.received) != before:
                        problems.append(f"{label}: reached the upstream")
                lowered = head.lower()
                for name, value in case.responseHeaders.items():
                    line = f"\r\n{name}: ".encode()
                    if value is None and line in lowered:
                        problems.append(f"{label}: response has {name}")
                    if value is not None and line + value.encode() not in lowered:
                        problems.append(f"{label}: response lacks {name}: {value}")
                if case.upstreamPath is not None:
                    seen = upstream.received[-1]
                    if seen.uri.decode() != case.upstreamPath:
                        problems.append(f"{label}: upstream got {seen.uri!r}")
                    for name, values in case.upstreamHeaders.items():
                        got = [v.decode() for v in seen.header(name.encode())]
                        if got != values:
                            problems.append(f"{label}: upstream {name} {got}")
        self.assertEqual(problems, [])

    async def test_streamLimit(self) -> None:
        """
        The server's SETTINGS allow at most 100 concurrent streams.
        """
        await self.startTLS()

        def settings() -> int | None:
            context = ssl.create_default_context(cafile=self.caFile)
            context.set_alpn_protocols(["h2"])
            with socket.create_connection(
                ("127.0.0.1", self.tlsPort), timeout=10
            ) as raw:
                with context.wrap_socket(raw, server_hostname=HOST) as tls:
                    connection = h2.connection.H2Connection()
                    connection.initiate_connection()
                    tls.sendall(connection.data_to_send())
                    for _ in range(10):
                        for event in connection.receive_data(tls.recv(65536)):
                            if isinstance(event, h2.events.RemoteSettingsChanged):
                                changed = event.changed_settings.get(
                                    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
                                )
                                return None if changed is None else changed.new_value
            return None

        self.assertEqual(await threads.deferToThread(settings), 100)

    async def test_hostBesideAuthority(self) -> None:
        """
        A request with a C{host} header beside C{:authority} naming the
        same host is answered as if it had only C{:authority} (it was
        refused 400, as if Host were repeated).
        """
        await self.startTLS()

        def exchange() -> tuple[int, bool]:
            context = ssl.create_default_context(cafile=self.caFile)
            context.set_alpn_protocols(["h2"])
            status, ended = 0, False
            with socket.create_connection(
                ("127.0.0.1", self.tlsPort), timeout=10
            ) as raw:
                with context.wrap_socket(raw, server_hostname=HOST) as tls:
                    connection = h2.connection.H2Connection()
                    connection.initiate_connection()
                    stream = connection.get_next_available_stream_id()
                    connection.send_headers(
                        stream,
                        [
                            (":method", "GET"),
                            (":path", "/svc/x"),
                            (":scheme", "https"),
                            (":authority", HOST),
                            ("host", HOST),
                        ],
                        end_stream=True,
                    )
                    tls.sendall(connection.data_to_send())
                    while not ended:
                        data = tls.recv(65536)
                        if not data:
                            break
                        for event in connection.receive_data(data):
                            if isinstance(event, h2.events.ResponseReceived):
                                status = int(dict(event.headers)[b":status"])
                            elif isinstance(event, h2.events.StreamEnded):
                                ended = True
                        tls.sendall(connection.data_to_send())
            return status, ended

        status, ended = await threads.deferToThread(exchange)
        self.assertEqual((status, ended), (200, True))

    async def test_resetFloodIsCut(self) -> None:
        """
        A client that opens and resets streams as fast as it can (the
        Rapid Reset attack) gets a GOAWAY with ENHANCE_YOUR_CALM and is
        disconnected, and monedge keeps serving others.
        """
        proxy, _ = await self.startTLS()

        def flood() -> tuple[int | None, int]:
            context = ssl.create_default_context(cafile=self.caFile)
            context.set_alpn_protocols(["h2"])
            with socket.create_connection(
                ("127.0.0.1", self.tlsPort), timeout=10
            ) as raw:
                with context.wrap_socket(raw, server_hostname=HOST) as tls:
                    connection = h2.connection.H2Connection()
                    connection.initiate_connection()
                    tls.sendall(connection.data_to_send())
                    headers = [
                        (":method", "GET"),
                        (":path", "/svc/x"),
                        (":scheme", "https"),
                        (":authority", HOST),
                    ]
                    sent = 0
                    try:
                        for _ in range(1500):
                            stream = connection.get_next_available_stream_id()
                            connection.send_headers(stream, headers)
                            connection.reset_stream(stream)
                            tls.sendall(connection.data_to_send())
                            sent += 1
                    except (OSError, h2.exceptions.ProtocolError):
                        pass
                    tls.settimeout(5)
                    try:
                        while True:
                            data = tls.recv(65536)
                            if not data:
                                break
                            for event in connection.receive_data(data):
                                if isinstance(event, h2.events.ConnectionTerminated):
                                    return event.error_code, sent
                    except (OSError, h2.exceptions.ProtocolError):
                        pass
            return None, sent

        code, sent = await threads.deferToThread(flood)
        self.assertEqual(code, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, sent)
        response, _ = await self.get(proxy.url + "/svc/after")
        self.assertEqual(response.code, 200)

    async def test_h2load(self) -> None:
        """
        h2load, 2 connections with up to 100 streams each, gets 2,000
        answers and no failure.
        """
        h2load = shutil.which("h2load")
        if h2load is None:
            self.fail(
                "h2load is missing: scripts/system-deps.sh installs nghttp2-client"
            )
        await self.startTLS("--access-log", "none")
        result = await threads.deferToThread(
            subprocess.run,
            [
                h2load,
                "-n",
                "2000",
                "-c",
                "2",
                "-m",
                "100",
                f"https://127.0.0.1:{self.tlsPort}/svc/load",
            ],
            capture_output=True,
            timeout=120,
        )
        output = result.stdout.decode()
        self.assertEqual(result.returncode, 0, output)
        self.assertIn(
            "requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed",
            output,
        )
        self.assertIn("Application protocol: h2", output)


class _RawUpstream(Protocol):
    """
    An upstream that records the bytes of its one request as they arrive,
    and answers 200 once a chunked body has ended.
    """

    def __init__(self, seen: list[bytes]) -> None:
        self.seen = seen

    def dataReceived(self, data: bytes) -> None:
        self.seen.append(data)
        if b"".join(self.seen).endswith(b"0\r\n\r\n"):
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


class _TrailingUpstream(Protocol):
    """
    An upstream that records the bytes of its one request, and once its
    chunked body has ended (after any trailers) answers with a chunked body
    and trailers of its own.
    """

    def __init__(self, seen: list[bytes]) -> None:
        self.seen = seen

    def dataReceived(self, data: bytes) -> None:
        self.seen.append(data)
        if b"".join(self.seen).endswith(b"\r\n\r\n") and b"\r\n0\r\n" in b"".join(
            self.seen
        ):
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\nok\r\n0\r\nGrpc-Status: 0\r\nConnection: x\r\n\r\n"
            )


def _h2c(port: int) -> tuple[socket.socket, h2.connection.H2Connection]:
    """
    A cleartext HTTP/2 connection with prior knowledge (no ALPN, no
    Upgrade: the preface first).  Blocking: in a thread.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection = h2.connection.H2Connection()
    connection.initiate_connection()
    sock.sendall(connection.data_to_send())
    return sock, connection


def _until(
    sock: socket.socket,
    connection: h2.connection.H2Connection,
    done: Any,
    events: list[Any],
) -> bool:
    """
    Read events into C{events} until C{done(events)}, the connection
    closes or the socket times out; whether it closed.  Blocking.
    """
    try:
        while not done(events):
            data = sock.recv(65536)
            if not data:
                return True
            try:
                events += connection.receive_data(data)
            except h2.exceptions.ProtocolError:
                pass
            pending = connection.data_to_send()
            if pending:
                sock.sendall(pending)
    except (TimeoutError, ConnectionResetError):
        pass
    return False


_REQUEST = [
    (":method", "GET"),
    (":path", "/svc/x"),
    (":scheme", "http"),
    (":authority", HOST),
]


class PriorKnowledgeTests(ProxyTestCase):
    """
    HTTP/2 on the cleartext listener (h2c with prior knowledge), through a
    real C{twistd monedge}: bodies stream, refusals come at once, and each
    attack is cut short.
    """

    timeout = 60

    async def test_uploadStreams(self) -> None:
        """
        A POST's first DATA reaches the upstream before the client has
        sent the rest of the body; the answer comes once it has.
        """
        seen: list[bytes] = []
        factory: Any = Factory.forProtocol(lambda: _RawUpstream(seen))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        proxy = await self.startProxy(
            {"service.api.svc": {"endpoints": [f"127.0.0.1:{port.getHost().port}"]}}  # type: ignore[attr-defined]
        )

        def upload() -> tuple[bool, int | None]:
            sock, connection = _h2c(proxy.port)
            with sock:
                stream = connection.get_next_available_stream_id()
                post = [(":method", "POST"), *_REQUEST[1:]]
                connection.send_headers(stream, post)
                connection.send_data(stream, b"first-chunk")
                sock.sendall(connection.data_to_send())
                deadline = time.monotonic() + 10
                while b"first-chunk" not in b"".join(seen):
                    if time.monotonic() > deadline:
                        return False, None
                    time.sleep(0.05)
                connection.send_data(stream, b"rest", end_stream=True)
                sock.sendall(connection.data_to_send())
                events: list[Any] = []
                _until(
                    sock,
                    connection,
                    lambda e: any(isinstance(x, h2.events.StreamEnded) for x in e),
                    events,
                )
                for event in events:
                    if isinstance(event, h2.events.ResponseReceived):
                        return True, int(dict(event.headers)[b":status"])
                return True, None

        early, status = await threads.deferToThread(upload)
        self.assertTrue(early, b"".join(seen))
        self.assertEqual(status, 200)
        self.assertIn(b"first-chunkrest", b"".join(seen).replace(b"\r\n4\r\n", b""))

    async def test_trailersBothWays(self) -> None:
        """
        A request's trailers go upstream after its chunked body, and the
        upstream's trailers come back as a trailing HEADERS frame to a
        client that said C{te: trailers}, both filtered (no hop-by-hop
        field crosses).
        """
        seen: list[bytes] = []
        factory: Any = Factory.forProtocol(lambda: _TrailingUpstream(seen))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        proxy = await self.startProxy(
            {"service.api.svc": {"endpoints": [f"127.0.0.1:{port.getHost().port}"]}}  # type: ignore[attr-defined]
        )

        def call() -> list[Any]:
            sock, connection = _h2c(proxy.port)
            with sock:
                stream = connection.get_next_available_stream_id()
                post = [(":method", "POST"), *_REQUEST[1:], ("te", "trailers")]
                connection.send_headers(stream, post)
                connection.send_data(stream, b"body")
                connection.send_headers(
                    stream, [("x-checksum", "abc"), ("host", "evil")], end_stream=True
                )
                sock.sendall(connection.data_to_send())
                events: list[Any] = []
                _until(
                    sock,
                    connection,
                    lambda e: any(isinstance(x, h2.events.StreamEnded) for x in e),
                    events,
                )
                return events

        events = await threads.deferToThread(call)
        upstream = b"".join(seen)
        self.assertIn(b"\r\nTE: trailers\r\n", upstream.replace(b"te:", b"TE:"))
        self.assertTrue(
            upstream.endswith(b"4\r\nbody\r\n0\r\nX-Checksum: abc\r\n\r\n"),
            upstream,
        )
        trailers = [e for e in events if isinstance(e, h2.events.TrailersReceived)]
        self.assertEqual(len(trailers), 1, events)
        self.assertEqual(list(trailers[0].headers), [(b"grpc-status", b"0")])
        data = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
        self.assertEqual(data, b"ok")

    async def test_refusalsAndLimit(self) -> None:
        """
        A body too large is refused 413 at once and stopped with
        RST_STREAM(NO_ERROR); of 101 streams opened at once, the 101st is
        refused with REFUSED_STREAM and the other 100 are answered.
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            {
                "service.api.svc": {
                    "endpoints": [upstream.address],
                    "policy": {"max-body-size": "1KiB"},
                }
            }
        )

        def exchange() -> tuple[list[Any], list[Any]]:
            sock, connection = _h2c(proxy.port)
            with sock:
                stream = connection.get_next_available_stream_id()
                post = [
                    (":method", "POST"),
                    *_REQUEST[1:],
                    # More than the client's window: it is stopped.
                    ("content-length", "500000"),
                ]
                connection.send_headers(stream, post)
                sock.sendall(connection.data_to_send())
                first: list[Any] = []
                _until(
                    sock,
                    connection,
                    lambda e: any(isinstance(x, h2.events.StreamReset) for x in e),
                    first,
                )
                # Past the limit the server advertised: the client is told
                # there is room.
                connection.remote_settings[
                    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
                ] = 1000
                connection.remote_settings.acknowledge()
                for _ in range(101):
                    connection.send_headers(
                        connection.get_next_available_stream_id(),
                        _REQUEST,
                        end_stream=True,
                    )
                sock.sendall(connection.data_to_send())
                events: list[Any] = []
                _until(
                    sock,
                    connection,
                    lambda e: (
                        len(
                            [
                                x
                                for x in e
                                if isinstance(
                                    x, (h2.events.StreamEnded, h2.events.StreamReset)
                                )
                            ]
                        )
                        >= 101
                    ),
                    events,
                )
                return first, events

        first, events = await threads.deferToThread(exchange)
        statuses = [
            dict(e.headers)[b":status"]
            for e in first
            if isinstance(e, h2.events.ResponseReceived)
        ]
        self.assertEqual(statuses, [b"413"])
        resets = [e.error_code for e in first if isinstance(e, h2.events.StreamReset)]
        self.assertEqual(resets, [h2.errors.ErrorCodes.NO_ERROR])
        answered = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        refused = [e.error_code for e in events if isinstance(e, h2.events.StreamReset)]
        self.assertEqual(len(answered), 100)
        self.assertEqual(refused, [h2.errors.ErrorCodes.REFUSED_STREAM])

    async def test_floodsCut(self) -> None:
        """
        A PING flood and a CONTINUATION flood each get
        GOAWAY(ENHANCE_YOUR_CALM) and a closed connection, within seconds;
        monedge answers others after.
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            {"service.api.svc": {"endpoints": [upstream.address]}}
        )

        def flood(frames: bytes) -> tuple[int | None, bool]:
            sock, connection = _h2c(proxy.port)
            with sock:
                try:
                    for _ in range(50):
                        sock.sendall(frames)
                except OSError:
                    pass
                events: list[Any] = []
                closed = _until(sock, connection, lambda e: False, events)
                codes = [
                    e.error_code
                    for e in events
                    if isinstance(e, h2.events.ConnectionTerminated)
                ]
                return (codes[0] if codes else None), closed

        ping = PingFrame(0, opaque_data=b"12345678").serialize() * 100
        code, closed = await threads.deferToThread(flood, ping)
        self.assertEqual((code, closed), (h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, True))
        encoder = h2.connection.H2Connection().encoder
        headers = HeadersFrame(1)
        headers.data = encoder.encode(_REQUEST)
        continuation = ContinuationFrame(1)
        continuation.data = b"\x00" * 16000
        code, closed = await threads.deferToThread(
            flood, headers.serialize() + continuation.serialize() * 20
        )
        self.assertEqual((code, closed), (h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, True))
        response, _ = await self.get(proxy.url + "/svc/after")
        self.assertEqual(response.code, 200)

    async def test_zeroWindowTimesOut(self) -> None:
        """
        A client that advertises a zero window gets its response's head,
        then, after C{--send-timeout}, RST_STREAM(CANCEL) for that stream.
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            {"service.api.svc": {"endpoints": [upstream.address]}},
            ["--send-timeout", "1s"],
        )

        def stall() -> tuple[list[Any], float]:
            sock, connection = _h2c(proxy.port)
            with sock:
                connection.update_settings(
                    {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
                )
                stream = connection.get_next_available_stream_id()
                connection.send_headers(stream, _REQUEST, end_stream=True)
                sock.sendall(connection.data_to_send())
                start = time.monotonic()
                events: list[Any] = []
                _until(
                    sock,
                    connection,
                    lambda e: any(isinstance(x, h2.events.StreamReset) for x in e),
                    events,
                )
                return events, time.monotonic() - start

        events, took = await threads.deferToThread(stall)
        kinds = [type(e) for e in events]
        self.assertIn(h2.events.ResponseReceived, kinds)
        self.assertNotIn(h2.events.DataReceived, kinds)
        resets = [e.error_code for e in events if isinstance(e, h2.events.StreamReset)]
        self.assertEqual(resets, [h2.errors.ErrorCodes.CANCEL])
        self.assertLess(took, 8)
