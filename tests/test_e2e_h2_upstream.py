"""
End-to-end HTTP/2 to upstreams: a real C{twistd monedge} with a service
whose policy says C{protocol: h2c}, and an upstream that speaks only
cleartext HTTP/2 (an C{h2} server protocol here), reached by curl over
HTTP/1.1 and by an C{h2} client over h2c: a streamed body and trailers
both ways; C{protocol: h2}, HTTP/2 over TLS with ALPN, verified against a
test CA; and the real grpcio client and server with monedge between them.
"""

from __future__ import annotations

import os
from concurrent import futures
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
from OpenSSL import crypto
from twisted.internet import reactor, threads
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.python.failure import Failure

from monedge.testing.tls import CertificateAuthority
from tests.e2e import ProxyTestCase
from tests.test_e2e_http2 import _REQUEST, HOST, _h2c, _until


class _Seen:
    """
    What the upstream saw: each request's header block, body and trailers.
    """

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[dict[str, Any]] = []
        #: The protocol ALPN chose on each TLS connection.
        self.negotiated: list[bytes | None] = []


class _H2Upstream(Protocol):
    """
    An upstream that speaks only h2c: it answers each request, once the
    request has ended, with 200, its body echoed after C{echo:} (its length
    for a body over 1,000 bytes), and the trailers C{grpc-status: 0} and
    C{x-up: done}.
    """

    def __init__(self, seen: _Seen) -> None:
        self.seen = seen
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=config)
        self.streams: dict[int, dict[str, Any]] = {}

    def connectionMade(self) -> None:
        self.seen.connections += 1
        self.h2.initiate_connection()
        self._flush()

    def _flush(self) -> None:
        assert self.transport is not None
        self.transport.write(self.h2.data_to_send())

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            assert self.transport is not None
            self.transport.loseConnection()
            return
        for event in events:
            if isinstance(event, h2.events.RemoteSettingsChanged):
                negotiated = getattr(self.transport, "negotiatedProtocol", b"-")
                if negotiated != b"-":
                    self.seen.negotiated.append(negotiated)
            if isinstance(event, h2.events.RequestReceived):
                request = {"headers": list(event.headers), "body": b"", "trailers": []}
                self.streams[event.stream_id] = request
                self.seen.requests.append(request)
            elif isinstance(event, h2.events.DataReceived):
                self.streams[event.stream_id]["body"] += event.data
                self.h2.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id
                )
            elif isinstance(event, h2.events.TrailersReceived):
                self.streams[event.stream_id]["trailers"] = list(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                body = self.streams[event.stream_id]["body"]
                self.h2.send_headers(
                    event.stream_id, [(b":status", b"200"), (b"x-upstream", b"h2c")]
                )
                echo = body if len(body) <= 1000 else b"%d" % len(body)
                self.h2.send_data(event.stream_id, b"echo:" + echo)
                self.h2.send_headers(
                    event.stream_id,
                    [(b"grpc-status", b"0"), (b"x-up", b"done")],
                    end_stream=True,
                )
        self._flush()

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        pass


class H2UpstreamTests(ProxyTestCase):
    """
    A service with C{protocol: h2c}, through a real C{twistd monedge}.
    """

    timeout = 60

    async def startProxy(self, *args: Any, **kwargs: Any) -> Any:
        proxy = await super().startProxy(*args, **kwargs)

        async def clean() -> None:
            # Stopped first (stopping again is a no-op), so that what it
            # logs as it stops is checked too.
            await proxy.stop()
            for bad in ("Traceback", "Unhandled", "CRITICAL"):
                self.assertNotIn(bad, proxy.log())

        self.addCleanup(clean)
        return proxy

    async def _start(self) -> tuple[_Seen, Any]:
        seen = _Seen()
        factory: Any = Factory.forProtocol(lambda: _H2Upstream(seen))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        address = f"127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        proxy = await self.startProxy(
            {
                "service.api.svc": {
                    "endpoints": [address],
                    "policy": {"protocol": "h2c"},
                }
            }
        )
        return seen, proxy

    async def test_curlOverHTTP1(self) -> None:
        """
        curl over HTTP/1.1 reaches the h2c upstream: a streamed (chunked)
        upload arrives whole, the answer comes back with the upstream's
        headers, and its trailers reach a client that said C{TE: trailers}.
        """
        seen, proxy = await self._start()
        upload = os.path.join(self.directory, "upload")
        with open(upload, "wb") as f:
            f.write(b"x" * 300000)
        result = await self.curl(
            "--raw",
            "-i",
            "-H",
            f"Host: {HOST}",
            "-H",
            "TE: trailers",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            f"@{upload}",
            f"http://127.0.0.1:{proxy.port}/svc/up?x=1",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        out = result.stdout
        self.assertTrue(out.startswith(b"HTTP/1.1 200"), out[:200])
        self.assertIn(b"x-upstream: h2c", out.lower())
        self.assertIn(b"echo:300000", out)
        self.assertIn(b"grpc-status: 0\r\n", out.lower())
        [request] = seen.requests
        headers = dict(request["headers"])
        self.assertEqual(headers[b":method"], b"POST")
        self.assertEqual(headers[b":path"], b"/up?x=1")
        self.assertEqual(headers[b":authority"], HOST.encode())
        self.assertNotIn(b"transfer-encoding", headers)
        self.assertEqual(request["body"], b"x" * 300000)

    async def test_h2cClientTrailersBothWays(self) -> None:
        """
        An HTTP/2 client's streamed body and trailers reach the h2c
        upstream, and the upstream's trailers come back as a trailing
        HEADERS frame; two requests share one upstream connection.
        """
        seen, proxy = await self._start()

        def call() -> list[Any]:
            sock, connection = _h2c(proxy.port)
            events: list[Any] = []
            with sock:
                for _ in range(2):
                    stream = connection.get_next_available_stream_id()
                    post = [(":method", "POST"), *_REQUEST[1:], ("te", "trailers")]
                    connection.send_headers(stream, post)
                    connection.send_data(stream, b"part1-")
                    sock.sendall(connection.data_to_send())
                    connection.send_data(stream, b"part2")
                    connection.send_headers(
                        stream, [("x-checksum", "abc")], end_stream=True
                    )
                    sock.sendall(connection.data_to_send())
                    _until(
                        sock,
                        connection,
                        lambda e, s=stream: any(
                            isinstance(x, h2.events.StreamEnded) and x.stream_id == s
                            for x in e
                        ),
                        events,
                    )
            return events

        events = await threads.deferToThread(call)
        self.assertEqual(len(seen.requests), 2)
        for request in seen.requests:
            self.assertEqual(request["body"], b"part1-part2")
            self.assertEqual(request["trailers"], [(b"x-checksum", b"abc")])
            self.assertIn((b"te", b"trailers"), request["headers"])
        self.assertEqual(seen.connections, 1)
        trailers = [e for e in events if isinstance(e, h2.events.TrailersReceived)]
        self.assertEqual(len(trailers), 2, events)
        self.assertIn((b"grpc-status", b"0"), list(trailers[0].headers))
        data = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
        self.assertEqual(data, b"echo:part1-part2" * 2)

    async def test_h2OverTLS(self) -> None:
        """
        A service with C{protocol: h2} is spoken to in HTTP/2 over TLS, ALPN
        choosing C{h2}, its certificate verified with the service's
        C{upstream-ca} and C{upstream-server-name}; curl over HTTP/1.1 gets
        the answer and its trailers.
        """
        ca = CertificateAuthority()
        caFile = os.path.join(self.directory, "ca.pem")
        with open(caFile, "wb") as f:
            f.write(ca.certificatePEM)
        pem = ca.issue(["upstream.internal"])
        options = CertificateOptions(
            privateKey=crypto.load_privatekey(crypto.FILETYPE_PEM, pem),
            certificate=crypto.load_certificate(crypto.FILETYPE_PEM, pem),
            acceptableProtocols=[b"h2"],
        )
        seen = _Seen()
        factory: Any = Factory.forProtocol(lambda: _H2Upstream(seen))
        port: Any = reactor.listenSSL(0, factory, options, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        proxy = await self.startProxy(
            {
                "service.api.svc": {
                    "endpoints": [f"https://127.0.0.1:{port.getHost().port}"],
                    "policy": {
                        "protocol": "h2",
                        "upstream-ca": caFile,
                        "upstream-server-name": "upstream.internal",
                    },
                }
            }
        )
        result = await self.curl(
            "--raw",
            "-i",
            "-H",
            f"Host: {HOST}",
            "-H",
            "TE: trailers",
            f"http://127.0.0.1:{proxy.port}/svc/secure",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.startswith(b"HTTP/1.1 200"), result.stdout)
        self.assertIn(b"grpc-status: 0\r\n", result.stdout.lower())
        self.assertEqual(seen.negotiated, [b"h2"])
        [request] = seen.requests
        self.assertEqual(dict(request["headers"])[b":scheme"], b"https")


class GrpcUpstreamTests(ProxyTestCase):
    """
    The real C{grpcio} client and server, with monedge between them: the
    gRPC convention routes the call to an C{h2c} service.
    """

    timeout = 60

    async def test_unaryCallWithTrailingMetadata(self) -> None:
        """
        Unary calls reach a grpcio server through monedge over h2c: the
        message both ways, the client's metadata upstream, and the status,
        message and trailing metadata back.
        """

        def create(request: bytes, context: Any) -> bytes:
            metadata = dict(context.invocation_metadata())
            context.set_trailing_metadata([("x-trailing", "yes")])
            context.set_code(grpc.StatusCode.ALREADY_EXISTS)
            context.set_details("exists: " + metadata.get("x-caller", "?"))
            return b"echo:" + request

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.method_handlers_generic_handler(
            "payments.v1.Payments",
            {
                "Create": grpc.unary_unary_rpc_method_handler(create),
                "Echo": grpc.unary_unary_rpc_method_handler(
                    lambda request, context: b"echo:" + request
                ),
            },
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.addCleanup(server.stop, None)
        proxy = await self.startProxy(
            {
                "service.api.payments": {
                    "endpoints": [f"127.0.0.1:{port}"],
                    "policy": {"protocol": "h2c"},
                }
            }
        )

        def echo() -> bytes:
            with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
                stub = channel.unary_unary("/payments.v1.Payments/Echo")
                answer: bytes = stub(b"x" * 100000, timeout=10)
                return answer

        self.assertEqual(await threads.deferToThread(echo), b"echo:" + b"x" * 100000)

        def call() -> tuple[Any, str, list[Any]]:
            with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
                stub = channel.unary_unary("/payments.v1.Payments/Create")
                try:
                    stub(b"hi", timeout=10, metadata=[("x-caller", "me")])
                except grpc.RpcError as e:
                    trailing = list(e.trailing_metadata())
                    return e.code(), e.details(), trailing
            return grpc.StatusCode.OK, "", []

        code, details, trailing = await threads.deferToThread(call)
        self.assertEqual(code, grpc.StatusCode.ALREADY_EXISTS)
        self.assertEqual(details, "exists: me")
        self.assertIn(("x-trailing", "yes"), [(m.key, m.value) for m in trailing])
