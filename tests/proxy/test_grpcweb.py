"""
gRPC-Web calls on the proxy path in memory (HTTP/1.1 front end, fake
upstream): what goes upstream to an h2c service and what comes back to
the client, the C{-text} codec as the body streams, refusals, and the
pass-through to an C{http1} service.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers

from monedge.proxy.grpcweb import DecodingBody, GrpcWebCall, GrpcWebResponse
from monedge.rules.grpcweb import grpcWebType
from monedge.testing import BodySink, FakeResponse
from monedge.upstream.streaming import HeldBody
from tests.proxy.test_grpc import head
from tests.proxy.test_proxy import Harness, _service

PATH = b"/payments.v1.Payments/Create"


def frame(message: bytes) -> bytes:
    """
    A gRPC message frame.
    """
    return struct.pack(">BI", 0, len(message)) + message


def webCall(contentType: bytes, body: bytes, *extra: bytes) -> bytes:
    """
    A gRPC-Web call's head over HTTP/1.1 (its body sent after it), with
    C{Content-Length: len(body)}.
    """
    lines = [
        b"POST " + PATH + b" HTTP/1.1",
        b"Host: api.example.com",
        b"Content-Type: " + contentType,
        b"X-Grpc-Web: 1",
        b"X-User-Agent: grpc-web-javascript/0.1",
        b"Content-Length: %d" % (len(body),),
        *extra,
        b"",
        b"",
    ]
    return b"\r\n".join(lines)


def grpcResponse(**extra: bytes) -> FakeResponse:
    """
    A gRPC server's response head: 200, C{application/grpc}.
    """
    headers = Headers({b"content-type": [b"application/grpc"]})
    for name, value in extra.items():
        headers.setRawHeaders(name.replace("_", "-"), [value])
    return FakeResponse(200, headers)


def body(transport: StringTransport) -> bytes:
    """
    The response's chunked body, decoded; its trailer section must be
    empty.
    """
    rest = transport.value().partition(b"\r\n\r\n")[2]
    out: list[bytes] = []
    while True:
        line, rest = rest.split(b"\r\n", 1)
        size = int(line, 16)
        if size == 0:
            assert rest == b"\r\n", rest
            return b"".join(out)
        out.append(rest[:size])
        rest = rest[size + 2 :]


class RequestTests(SynchronousTestCase):
    """
    What an h2c service receives for a gRPC-Web call.
    """

    def test_binaryHead(self) -> None:
        """
        A binary call goes as gRPC: C{application/grpc} with its codec,
        C{te: trailers}, gRPC-Web's own headers kept, its body as sent.
        """
        h = Harness([_service("service.api.payments", protocol="h2c")])
        h.send(webCall(b"application/grpc-web+proto", frame(b"hi")) + frame(b"hi"))
        [call] = h.client.calls
        headers = call.headers
        self.assertEqual(
            headers.getRawHeaders(b"content-type"), [b"application/grpc+proto"]
        )
        self.assertEqual(headers.getRawHeaders(b"te"), [b"trailers"])
        self.assertEqual(headers.getRawHeaders(b"x-grpc-web"), [b"1"])
        self.assertEqual(
            headers.getRawHeaders(b"x-user-agent"), [b"grpc-web-javascript/0.1"]
        )
        self.assertEqual(call.url, b"http://10.0.0.1:80" + PATH)
        self.assertEqual(call.bodyBytes(), frame(b"hi"))

    def test_textDecodedAsItStreams(self) -> None:
        """
        A C{-text} body is decoded as it comes, frames encoded one by one
        (padding mid-body) and cut anywhere; its length is then unknown.
        """
        text = base64.b64encode(frame(b"hi")) + base64.b64encode(frame(b"there"))
        h = Harness([_service("service.api.payments", protocol="h2c")])
        protocol, _ = h.send(webCall(b"application/grpc-web-text", text))
        [call] = h.client.calls
        self.assertEqual(
            call.headers.getRawHeaders(b"content-type"), [b"application/grpc"]
        )
        self.assertFalse(call.headers.hasHeader(b"content-length"))
        self.assertNotIsInstance(getattr(call.body, "length", None), int)
        sink = call.takeBody()
        for i in range(0, len(text), 5):
            protocol.dataReceived(text[i : i + 5])
        self.assertEqual(b"".join(sink.data), frame(b"hi") + frame(b"there"))
        self.assertTrue(sink.complete)

    def test_http1ServicePassedThrough(self) -> None:
        """
        An C{http1} service gets the gRPC-Web call as it came: its
        content-type, base64 body and length.
        """
        text = base64.b64encode(frame(b"hi"))
        h = Harness([_service("service.api.payments")])
        h.send(webCall(b"application/grpc-web-text", text) + text)
        [call] = h.client.calls
        self.assertEqual(
            call.headers.getRawHeaders(b"content-type"), [b"application/grpc-web-text"]
        )
        self.assertEqual(call.bodyBytes(), text)


class ResponseTests(SynchronousTestCase):
    """
    What a gRPC-Web client receives for an h2c service's gRPC answer.
    """

    def answer(
        self, contentType: bytes, response: FakeResponse, *pieces: bytes
    ) -> StringTransport:
        """
        Send a call with C{contentType} (and C{TE: trailers}), answer it
        with C{response} and its body C{pieces}, then the trailers
        C{grpc-status: 6}, C{grpc-message: exists}, C{x-trailing: yes}.
        """
        h = Harness([_service("service.api.payments", protocol="h2c")])
        request = frame(b"hi")
        if b"text" in contentType:
            request = base64.b64encode(request)
        _, transport = h.send(webCall(contentType, request, b"TE: trailers") + request)
        h.client.calls[0].result.callback(response)
        for piece in pieces:
            response.deliver(piece)
        response.monedgeTrailers = [  # type: ignore[attr-defined]
            (b"grpc-status", b"6"),
            (b"grpc-message", b"exists"),
            (b"x-trailing", b"yes"),
        ]
        response.end()
        return transport

    def test_binary(self) -> None:
        """
        The head says C{application/grpc-web+proto}, with no length; the
        DATA go as they came, then the trailers as a frame: never as HTTP
        trailers, even to a client that takes them.
        """
        transport = self.answer(
            b"application/grpc-web",
            grpcResponse(),
            frame(b"echo")[:3],
            frame(b"echo")[3:],
        )
        fields = head(transport)
        self.assertEqual(fields[b"content-type"], b"application/grpc-web+proto")
        self.assertNotIn(b"content-length", fields)
        self.assertNotIn(b"trailer", fields)
        block = b"grpc-status:6\r\ngrpc-message:exists\r\nx-trailing:yes\r\n"
        self.assertEqual(
            body(transport),
            frame(b"echo") + b"\x80" + struct.pack(">I", len(block)) + block,
        )

    def test_upstreamTrailersKeptForTheRecord(self) -> None:
        """
        The translated response has no HTTP trailers, but still tells what
        records the call the upstream's own (C{grpc-status} among them).
        """
        kind = grpcWebType(b"application/grpc-web")
        assert kind is not None
        upstream = grpcResponse()
        upstream.monedgeTrailers = [(b"grpc-status", b"6")]  # type: ignore[attr-defined]
        response = GrpcWebResponse(upstream, GrpcWebCall(kind))
        self.assertIsNone(response.monedgeTrailers)
        self.assertEqual(response.monedgeUpstreamTrailers, [(b"grpc-status", b"6")])

    def test_text(self) -> None:
        """
        A C{-text} call's answer is C{application/grpc-web-text+proto}, its
        body (messages and trailer frame) one base64 text, padded only at
        its end, however the DATA were cut.
        """
        transport = self.answer(
            b"application/grpc-web-text",
            grpcResponse(),
            frame(b"echo")[:4],
            frame(b"echo")[4:],
            frame(b"more"),
        )
        fields = head(transport)
        self.assertEqual(fields[b"content-type"], b"application/grpc-web-text+proto")
        text = body(transport)
        self.assertNotIn(b"=", text.rstrip(b"="))
        decoded = base64.b64decode(text, validate=True)
        self.assertEqual(decoded[:18], frame(b"echo") + frame(b"more"))
        self.assertEqual(decoded[18:19], b"\x80")
        self.assertIn(b"grpc-status:6\r\n", decoded)

    def test_trailersOnly(self) -> None:
        """
        A trailers-only answer (grpc-status in the head) keeps its status
        in the head and gets no trailer frame.
        """
        h = Harness([_service("service.api.payments", protocol="h2c")])
        request = frame(b"hi")
        _, transport = h.send(webCall(b"application/grpc-web", request) + request)
        response = grpcResponse(grpc_status=b"5", grpc_message=b"missing")
        h.client.calls[0].result.callback(response)
        response.end()
        fields = head(transport)
        self.assertEqual(fields[b"content-type"], b"application/grpc-web+proto")
        self.assertEqual(fields[b"grpc-status"], b"5")
        self.assertEqual(fields[b"grpc-message"], b"missing")
        self.assertEqual(body(transport), b"")

    def test_notGrpcPassedOn(self) -> None:
        """
        An answer that is not gRPC's (an HTTP error page) keeps its status,
        type and body, and loses its HTTP trailers.
        """
        response = FakeResponse(503, Headers({b"content-type": [b"text/plain"]}))
        transport = self.answer(b"application/grpc-web", response, b"down")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 503 "))
        self.assertEqual(head(transport)[b"content-type"], b"text/plain")
        self.assertEqual(body(transport), b"down")

    def test_wholeBodyWithTheHead(self) -> None:
        """
        A body that came whole with the head is translated too, its
        trailer frame after it.
        """

        class Whole(FakeResponse):
            monedgeTrailers = [(b"grpc-status", b"0")]

            def monedgeTakeBody(self) -> bytes:
                return frame(b"ok")

        h = Harness([_service("service.api.payments", protocol="h2c")])
        request = frame(b"hi")
        _, transport = h.send(webCall(b"application/grpc-web", request) + request)
        h.client.calls[0].result.callback(
            Whole(200, Headers({b"content-type": [b"application/grpc"]}))
        )
        self.assertEqual(
            body(transport), frame(b"ok") + b"\x80\0\0\0\x0fgrpc-status:0\r\n"
        )


class RefusalTests(SynchronousTestCase):
    """
    monedge's refusals of gRPC-Web calls, and bodies that are not base64.
    """

    def test_unknownServiceInGrpcWebForm(self) -> None:
        """
        An unknown service is refused as gRPC (200, grpc-status 12 in the
        head), with the call's gRPC-Web content-type.
        """
        h = Harness([])
        _, transport = h.send(webCall(b"application/grpc-web-text", b""))
        fields = head(transport)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertEqual(fields[b"content-type"], b"application/grpc-web-text+proto")
        self.assertEqual(fields[b"grpc-status"], b"12")
        self.assertEqual(fields[b"grpc-message"], b"route_not_found")

    def test_badBase64BeforeTheAnswer(self) -> None:
        """
        A C{-text} body that is not base64, before the upstream answered:
        the upstream request stops, and the client gets
        C{grpc_web_bad_base64} in gRPC form (INTERNAL).
        """
        h = Harness([_service("service.api.payments", protocol="h2c")])
        protocol, transport = h.send(webCall(b"application/grpc-web-text", b"AAAA*AAA"))
        [call] = h.client.calls
        sink = call.takeBody()
        protocol.dataReceived(b"AAAA*AAA")
        self.assertIsNotNone(sink.failure)
        # The upstream client fails the request for its failed body.
        assert sink.failure is not None
        call.result.errback(Failure(ResponseNeverReceived([sink.failure])))
        fields = head(transport)
        self.assertEqual(fields[b"content-type"], b"application/grpc-web-text+proto")
        self.assertEqual(fields[b"grpc-status"], b"13")
        self.assertEqual(fields[b"grpc-message"], b"grpc_web_bad_base64")
        self.assertIn(b"grpc_web_bad_base64", h.log.getvalue().encode())

    def test_badBase64AfterTheAnswer(self) -> None:
        """
        Once the answer has started, a body that is not base64 can only
        cut the response off: the client connection closes.
        """
        h = Harness([_service("service.api.payments", protocol="h2c")])
        protocol, transport = h.send(webCall(b"application/grpc-web-text", b"AA=A"))
        [call] = h.client.calls
        sink = call.takeBody()
        response = grpcResponse()
        call.result.callback(response)
        protocol.dataReceived(b"AA=A")
        self.assertIsNotNone(sink.failure)
        response.end(Failure(ResponseFailed([Failure(CancelledError())])))
        self.assertTrue(transport.disconnecting)


class DecodingBodyTests(SynchronousTestCase):
    """
    L{DecodingBody}, the C{-text} request body, on its own.
    """

    def test_again(self) -> None:
        """
        A body the upstream did not process can be sent again, decoded
        again from its first byte, when the client's body can be.
        """
        kind = grpcWebType(b"application/grpc-web-text")
        assert kind is not None
        decoding = DecodingBody(HeldBody([b"aGk="]), GrpcWebCall(kind))
        self.assertTrue(decoding.replayable())
        sinks: list[BodySink] = []
        for producer in [decoding, decoding.again()]:
            sink = BodySink()
            producer.startProducing(sink).addCallbacks(sink.finished, sink.failed)
            sinks.append(sink)
        self.assertEqual([b"".join(sink.data) for sink in sinks], [b"hi", b"hi"])
        self.assertTrue(all(sink.complete for sink in sinks))

    def test_cancelStopsTheClientBody(self) -> None:
        """
        Cancelling the sending stops the client's body, and fails with
        L{CancelledError}.
        """

        class Source(HeldBody):
            """
            A client body still coming.
            """

            stopped = False

            def startProducing(self, consumer: Any) -> Deferred[None]:
                return Deferred()

            def stopProducing(self) -> None:
                self.stopped = True

        source = Source([])
        kind = grpcWebType(b"application/grpc-web-text")
        assert kind is not None
        d = DecodingBody(source, GrpcWebCall(kind)).startProducing(BodySink())
        failures: list[Any] = []
        d.addErrback(failures.append)
        d.cancel()
        self.assertTrue(source.stopped)
        self.assertTrue(failures and failures[0].check(CancelledError))
