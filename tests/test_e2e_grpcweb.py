"""
End-to-end gRPC-Web: a real C{twistd monedge} with a gRPC service (policy
C{protocol: h2c}) served by the real grpcio server, and gRPC-Web calls
made from raw bytes, over HTTP/1.1 (a plain socket) and over HTTP/2 with
prior knowledge (an C{h2} client), binary and C{-text}: monedge
translates them to gRPC and the answers back, the trailers framed in the
body.  With the C{cors} hook, a browser's preflight and cross-origin call.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import grpc
import h2.events
from twisted.internet import threads

from monedge.testing import ProxyProcess
from tests.e2e import ProxyTestCase, deferRaw
from tests.test_e2e_http2 import HOST, _h2c, _until


def frame(message: bytes) -> bytes:
    """
    A gRPC message frame: flag 0, the length, the message.
    """
    return struct.pack(">BI", 0, len(message)) + message


class WebAnswer:
    """
    A gRPC-Web answer, read: its head, messages and trailer frame.
    """

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.contentType = headers.get("content-type", "")
        if self.contentType.startswith("application/grpc-web-text"):
            body = base64.b64decode(body, validate=True)
        self.messages: list[bytes] = []
        self.trailers: dict[str, str] = {}
        #: How many trailer frames came (one, last, for a gRPC answer).
        self.trailerFrames = 0
        while body:
            flag, length = struct.unpack(">BI", body[:5])
            payload, body = body[5 : 5 + length], body[5 + length :]
            if flag & 0x80:
                self.trailerFrames += 1
                assert not body, "the trailer frame is the last"
                for line in payload.decode("ascii").split("\r\n"):
                    if line:
                        name, value = line.split(":", 1)
                        self.trailers[name] = value
            else:
                self.messages.append(payload)


def dechunk(body: bytes) -> bytes:
    """
    A chunked HTTP/1.1 body, decoded.
    """
    out: list[bytes] = []
    while True:
        line, body = body.split(b"\r\n", 1)
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[:size])
        body = body[size + 2 :]


async def http1Call(
    port: int, path: str, contentType: str, body: bytes, extra: str = ""
) -> WebAnswer:
    """
    A gRPC-Web call over HTTP/1.1 from raw bytes, on its own connection.
    """
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {contentType}\r\n"
        f"X-Grpc-Web: 1\r\nX-User-Agent: grpc-web-javascript/0.1\r\n{extra}"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii") + body
    raw = await deferRaw(port, request, timeout=10)
    head, rest = raw.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, value = line.split(":", 1)
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        rest = dechunk(rest)
    return WebAnswer(int(lines[0].split()[1]), headers, rest)


def http2Call(port: int, path: str, contentType: str, body: bytes) -> WebAnswer:
    """
    A gRPC-Web call over HTTP/2 with prior knowledge; checks no HTTP
    trailers came.  Blocking: in a thread.
    """
    sock, connection = _h2c(port)
    with sock:
        connection.send_headers(
            1,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", HOST),
                (":path", path),
                ("content-type", contentType),
                ("x-grpc-web", "1"),
            ],
        )
        connection.send_data(1, body, end_stream=True)
        sock.sendall(connection.data_to_send())
        events: list[Any] = []
        _until(
            sock,
            connection,
            lambda events: any(
                isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset))
                for e in events
            ),
            events,
        )
    headers: dict[str, str] = {}
    data = b""
    for event in events:
        if isinstance(event, h2.events.ResponseReceived):
            headers = {n.decode(): v.decode() for n, v in event.headers}
        elif isinstance(event, h2.events.DataReceived):
            data += event.data
        assert not isinstance(event, h2.events.TrailersReceived), "HTTP trailers"
        assert not isinstance(event, h2.events.StreamReset), "stream reset"
    return WebAnswer(int(headers.pop(":status")), headers, data)


def text(*messages: bytes) -> bytes:
    """
    A C{-text} body: each message frame base64-encoded on its own, as
    clients may (padding then appears mid-body).
    """
    return b"".join(base64.b64encode(frame(message)) for message in messages)


async def http1Raw(port: int, request: str) -> tuple[int, dict[str, str], bytes]:
    """
    One raw HTTP/1.1 exchange on its own connection: the status, the
    headers (lowercase names) and the body.
    """
    raw = await deferRaw(port, request.encode("ascii"), timeout=10)
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, value = line.split(":", 1)
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


#: The page's origin in the CORS tests.
APP = "https://app.example.com"


class GrpcWebTests(ProxyTestCase):
    """
    gRPC-Web calls through monedge to a grpcio server behind an h2c
    service.
    """

    timeout = 60

    async def startGrpc(self, args: Sequence[str] = ()) -> ProxyProcess:
        """
        A grpcio server with C{payments.v1.Payments}: C{Create} (unary: echo,
        ALREADY_EXISTS with a message and trailing metadata) and C{List}
        (server streaming: three messages), and a proxy whose
        C{service.api.payments} is it over h2c (with C{args}).
        """

        def create(request: bytes, context: Any) -> bytes:
            metadata = dict(context.invocation_metadata())
            context.set_trailing_metadata([("x-trailing", "yes")])
            context.set_code(grpc.StatusCode.ALREADY_EXISTS)
            context.set_details("exists: " + metadata.get("x-caller", "?"))
            return b"echo:" + request

        def listing(request: bytes, context: Any) -> Any:
            for i in range(3):
                yield b"item%d:" % (i,) + request

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.method_handlers_generic_handler(
            "payments.v1.Payments",
            {
                "Create": grpc.unary_unary_rpc_method_handler(create),
                "List": grpc.unary_stream_rpc_method_handler(listing),
            },
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.addCleanup(server.stop, None)
        self.legacy = self.startUpstream()
        return await self.startProxy(
            {
                "service.api.payments": {
                    "endpoints": [f"127.0.0.1:{port}"],
                    "policy": {"protocol": "h2c"},
                },
                "service.api.legacy": {
                    "endpoints": [f"127.0.0.1:{self.legacy.portNumber}"],
                },
                # No endpoint: every call is refused, UNAVAILABLE.
                "service.api.empty": {"endpoints": [], "policy": {"protocol": "h2c"}},
            },
            args,
        )

    def assertCreated(self, answer: WebAnswer, contentType: str) -> None:
        """
        C{answer} is C{Create}'s: the echo, then ALREADY_EXISTS, its
        message and trailing metadata in the trailer frame; the gRPC-Web
        content-type, no length.
        """
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.contentType, contentType)
        self.assertNotIn("content-length", answer.headers)
        self.assertNotIn("grpc-status", answer.headers)
        self.assertEqual(answer.messages, [b"echo:hi"])
        self.assertEqual(answer.trailerFrames, 1)
        self.assertEqual(answer.trailers["grpc-status"], "6")
        self.assertEqual(answer.trailers["grpc-message"], "exists: me")
        self.assertEqual(answer.trailers["x-trailing"], "yes")

    async def test_http1(self) -> None:
        """
        Over HTTP/1.1: binary and C{-text} unary calls reach the grpcio
        server as gRPC (its metadata too) and come back with the message
        and the trailers framed in the body; a server-streaming C{-text}
        call brings every message; a call to an unknown service is refused
        in gRPC form (grpc-status 12 in the head) with the gRPC-Web
        content-type.
        """
        proxy = await self.startGrpc()
        path = "/payments.v1.Payments/Create"
        answer = await http1Call(
            proxy.port,
            path,
            "application/grpc-web+proto",
            frame(b"hi"),
            "X-Caller: me\r\n",
        )
        self.assertCreated(answer, "application/grpc-web+proto")
        answer = await http1Call(
            proxy.port,
            path,
            "application/grpc-web-text",
            text(b"hi"),
            "X-Caller: me\r\n",
        )
        self.assertCreated(answer, "application/grpc-web-text+proto")
        answer = await http1Call(
            proxy.port,
            "/payments.v1.Payments/List",
            "application/grpc-web-text+proto",
            text(b"a"),
        )
        self.assertEqual(answer.messages, [b"item0:a", b"item1:a", b"item2:a"])
        self.assertEqual(answer.trailers["grpc-status"], "0")
        answer = await http1Call(
            proxy.port, "/nosuch.v1.Nope/Get", "application/grpc-web-text", text(b"")
        )
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.contentType, "application/grpc-web-text+proto")
        self.assertEqual(answer.headers["grpc-status"], "12")
        self.assertEqual(answer.headers["grpc-message"], "route_not_found")
        self.assertEqual(answer.messages, [])

    async def test_http2(self) -> None:
        """
        Over HTTP/2: a binary unary call and a C{-text} server-streaming
        call come back with their messages and trailer frame in DATA,
        never as HTTP trailers; an unknown service is refused in gRPC form
        with the gRPC-Web content-type.
        """
        proxy = await self.startGrpc()
        answer = await threads.deferToThread(
            http2Call,
            proxy.port,
            "/payments.v1.Payments/Create",
            "application/grpc-web",
            frame(b"hi"),
        )
        self.assertEqual(answer.contentType, "application/grpc-web+proto")
        self.assertEqual(answer.messages, [b"echo:hi"])
        self.assertEqual(answer.trailers["grpc-status"], "6")
        self.assertEqual(answer.trailers["grpc-message"], "exists: ?")
        self.assertEqual(answer.trailers["x-trailing"], "yes")
        answer = await threads.deferToThread(
            http2Call,
            proxy.port,
            "/payments.v1.Payments/List",
            "application/grpc-web-text",
            text(b"b"),
        )
        self.assertEqual(answer.contentType, "application/grpc-web-text+proto")
        self.assertEqual(answer.messages, [b"item0:b", b"item1:b", b"item2:b"])
        self.assertEqual(answer.trailers["grpc-status"], "0")
        answer = await threads.deferToThread(
            http2Call,
            proxy.port,
            "/nosuch.v1.Nope/Get",
            "application/grpc-web+proto",
            frame(b""),
        )
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.contentType, "application/grpc-web+proto")
        self.assertEqual(answer.headers["grpc-status"], "12")

    async def test_badBase64AndHttp1Services(self) -> None:
        """
        A C{-text} body that is not base64 is refused in gRPC form
        (C{grpc_web_bad_base64}, INTERNAL) and the grpcio server never
        answers it; a gRPC-Web call to a C{protocol: http1} service goes
        untouched: its content-type and base64 body as the client sent
        them.
        """
        proxy = await self.startGrpc()
        answer = await http1Call(
            proxy.port,
            "/payments.v1.Payments/Create",
            "application/grpc-web-text",
            b"AAAA*AAA",
        )
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.contentType, "application/grpc-web-text+proto")
        self.assertEqual(answer.headers["grpc-status"], "13")
        self.assertEqual(answer.headers["grpc-message"], "grpc_web_bad_base64")
        body = text(b"hi")
        raw = await deferRaw(
            proxy.port,
            b"POST /legacy/x HTTP/1.1\r\nHost: api.example.com\r\n"
            b"Content-Type: application/grpc-web-text\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
            timeout=10,
        )
        self.assertTrue(raw.startswith(b"HTTP/1.1 200"), raw)
        seen = self.legacy.received[-1]
        self.assertEqual(seen.header(b"content-type"), [b"application/grpc-web-text"])
        self.assertEqual(seen.body, body)

    async def test_corsPreflightAndCall(self) -> None:
        """
        With --hook cors allowing https://app.example.com: the preflight of
        a gRPC-Web call (OPTIONS, no content-type) routes to the gRPC
        service and is answered 204 by the hook with the CORS headers and
        no Content-Length, never reaching the upstream; the call itself
        reaches grpcio and its answer exposes grpc-status and grpc-message
        to the page.  monedge's own refusal of a call after the hook ran
        (no endpoint) is readable by the page too.  A preflight for an
        unknown gRPC service is refused in the HTTP form (JSON); a call to
        one is refused in gRPC form before any hook runs, so without CORS
        headers.
        """
        hook = {"name": "cors", "options": {"allow-origins": [APP]}}
        proxy = await self.startGrpc(["--hook", json.dumps(hook)])
        path = "/payments.v1.Payments/Create"
        preflight = (
            f"OPTIONS {path} HTTP/1.1\r\nHost: {HOST}\r\nOrigin: {APP}\r\n"
            "Access-Control-Request-Method: POST\r\n"
            "Access-Control-Request-Headers:"
            " content-type,x-grpc-web,x-user-agent,grpc-timeout\r\n"
            "Connection: close\r\n\r\n"
        )
        status, headers, body = await http1Raw(proxy.port, preflight)
        self.assertEqual((status, body), (204, b""))
        self.assertEqual(headers["access-control-allow-origin"], APP)
        self.assertIn("POST", headers["access-control-allow-methods"].split(", "))
        self.assertEqual(
            headers["access-control-allow-headers"],
            "content-type, x-grpc-web, x-user-agent, grpc-timeout, authorization",
        )
        self.assertEqual(headers["access-control-max-age"], "600")
        self.assertIn("Origin", headers["vary"])
        self.assertNotIn("content-length", headers)
        self.assertNotIn("transfer-encoding", headers)
        records: list[dict[str, Any]] = []

        def logged() -> bool:
            records[:] = proxy.accessLog()
            return bool(records)

        await proxy.waitFor(logged, 5, "the access log")
        [record] = records
        self.assertEqual(record["method"], "OPTIONS")
        self.assertEqual(record["service"], "service.api.payments")
        self.assertEqual(record["status"], 204)
        # Answered by the hook: no endpoint was ever asked.
        self.assertIsNone(record["endpoint"])
        answer = await http1Call(
            proxy.port,
            path,
            "application/grpc-web+proto",
            frame(b"hi"),
            f"X-Caller: me\r\nOrigin: {APP}\r\n",
        )
        self.assertCreated(answer, "application/grpc-web+proto")
        self.assertEqual(answer.headers["access-control-allow-origin"], APP)
        exposed = answer.headers["access-control-expose-headers"].split(", ")
        self.assertIn("grpc-status", exposed)
        self.assertIn("grpc-message", exposed)
        self.assertEqual(answer.headers["vary"], "Origin")
        answer = await http1Call(
            proxy.port,
            "/empty.v1.Empty/Get",
            "application/grpc-web+proto",
            frame(b""),
            f"Origin: {APP}\r\n",
        )
        self.assertEqual(answer.headers["grpc-status"], "14")
        self.assertEqual(answer.headers["grpc-message"], "no_ready_endpoint")
        self.assertEqual(answer.headers["access-control-allow-origin"], APP)
        self.assertIn(
            "grpc-status", answer.headers["access-control-expose-headers"].split(", ")
        )
        status, headers, body = await http1Raw(
            proxy.port, preflight.replace(path, "/nosuch.v1.Nope/Get")
        )
        self.assertEqual(status, 404)
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(json.loads(body)["code"], "route_not_found")
        answer = await http1Call(
            proxy.port,
            "/nosuch.v1.Nope/Get",
            "application/grpc-web+proto",
            frame(b""),
            f"Origin: {APP}\r\n",
        )
        self.assertEqual(answer.headers["grpc-status"], "12")
        self.assertNotIn("access-control-allow-origin", answer.headers)
