"""
gRPC calls on the proxy path in memory (HTTP/1.1 front end, fake
upstream): routing by package, the forwarded path, C{grpc-timeout} as the
call's deadline, the stream idle timeout, the upstream's grpc-status, and
refusals in gRPC's form with their headers.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers

from monedge.rules.limits import Limits
from monedge.testing import FakeResponse
from tests.proxy.test_proxy import Harness, _service, _status


def call(path: bytes, *extra: bytes) -> bytes:
    """
    A gRPC call's request over HTTP/1.1, with an empty message.
    """
    lines = [
        b"POST " + path + b" HTTP/1.1",
        b"Host: api.example.com",
        b"Content-Type: application/grpc",
        b"TE: trailers",
        b"Content-Length: 5",
        *extra,
        b"",
        b"\0\0\0\0\0",
    ]
    return b"\r\n".join(lines)


def head(transport: StringTransport) -> dict[bytes, bytes]:
    """
    The response's headers, by lowercased name.
    """
    block = transport.value().partition(b"\r\n\r\n")[0]
    fields = {}
    for line in block.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    return fields


class GrpcRoutingTests(SynchronousTestCase):
    """
    A gRPC call routes by its package and is forwarded whole.
    """

    def test_routedByPackage(self) -> None:
        """
        /payments.v1.Payments/Create reaches service.api.payments, with
        its path unchanged although the service strips its prefix.
        """
        h = Harness([_service("service.api.payments")])
        h.send(call(b"/payments.v1.Payments/Create"))
        self.assertEqual(
            h.client.calls[0].url, b"http://10.0.0.1:80/payments.v1.Payments/Create"
        )

    def test_noStripPrefix(self) -> None:
        """
        A gRPC call routed by the HTTP rule (/payments/Create) is
        forwarded whole too; an HTTP request on the same path is not.
        """
        h = Harness([_service("service.api.payments")])
        h.send(call(b"/payments/Create"))
        self.assertEqual(h.client.calls[0].url, b"http://10.0.0.1:80/payments/Create")
        h.send(b"GET /payments/Create HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        self.assertEqual(h.client.calls[1].url, b"http://10.0.0.1:80/Create")

    def test_unknownService(self) -> None:
        """
        A package that names no service: 200, grpc-status 12
        (UNIMPLEMENTED), grpc-message route_not_found, no body, and
        grpc_status in the access log.
        """
        h = Harness([_service("service.api.payments")])
        _, transport = h.send(call(b"/nothing.v1.Nothing/Get"))
        self.assertEqual(_status(transport), 200)
        fields = head(transport)
        self.assertEqual(fields[b"content-type"], b"application/grpc")
        self.assertEqual(fields[b"grpc-status"], b"12")
        self.assertEqual(fields[b"grpc-message"], b"route_not_found")
        self.assertEqual(transport.value().partition(b"\r\n\r\n")[2], b"")
        record = h.records()[-1]
        self.assertEqual(
            (record["grpc_status"], record["error"]), (12, "route_not_found")
        )

    def test_httpRefusalUnchanged(self) -> None:
        """
        The same path without a gRPC content-type is an HTTP 404 with the
        JSON body, and no grpc_status is logged.
        """
        h = Harness([_service("service.api.payments")])
        _, transport = h.send(
            b"POST /nothing.v1.Nothing/Get HTTP/1.1\r\nHost: api.example.com\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        self.assertEqual(_status(transport), 404)
        self.assertIsNone(h.records()[-1]["grpc_status"])

    def test_corsPreflight(self) -> None:
        """
        A CORS preflight (OPTIONS, Origin, Access-Control-Request-Method,
        no content-type) on a gRPC method's path routes to the call's
        service, its path whole although the service strips its prefix;
        one for an unknown service is refused in the HTTP form (404, JSON),
        not in gRPC's.
        """
        preflight = (
            b"OPTIONS %s HTTP/1.1\r\nHost: api.example.com\r\n"
            b"Origin: https://app.example.com\r\n"
            b"Access-Control-Request-Method: POST\r\n\r\n"
        )
        h = Harness([_service("service.api.payments")])
        h.send(preflight % (b"/payments.v1.Payments/Create",))
        [sent] = h.client.calls
        self.assertEqual(sent.method, b"OPTIONS")
        self.assertEqual(sent.url, b"http://10.0.0.1:80/payments.v1.Payments/Create")
        _, transport = h.send(preflight % (b"/nothing.v1.Nothing/Get",))
        self.assertEqual(_status(transport), 404)
        fields = head(transport)
        self.assertEqual(fields[b"content-type"], b"application/json")
        self.assertNotIn(b"grpc-status", fields)


class GrpcTimeoutTests(SynchronousTestCase):
    """
    A gRPC call is a stream: its grpc-timeout is its deadline, counted from
    its arrival, and the policy's stream-idle-timeout, not its HTTP
    timeouts, ends it when nothing moves.
    """

    def test_deadlineBeforeAnswer(self) -> None:
        """
        grpc-timeout 500m: the upstream is given up after 0.5 s, and the
        call gets DEADLINE_EXCEEDED (4), grpc_deadline_exceeded; the
        upstream was told the time left.
        """
        h = Harness([_service("service.api.payments", timeout=2.0)])
        _, transport = h.send(
            call(b"/payments.v1.Payments/Create", b"grpc-timeout: 500m")
        )
        upstream = h.client.calls[0]
        self.assertEqual(upstream.headers.getRawHeaders(b"grpc-timeout"), [b"500m"])
        h.clock.advance(0.49)
        self.assertEqual(transport.value(), b"")
        h.clock.advance(0.02)
        self.assertTrue(upstream.cancelled)
        fields = head(transport)
        self.assertEqual(fields[b"grpc-status"], b"4")
        self.assertEqual(fields[b"grpc-message"], b"grpc_deadline_exceeded")
        self.assertEqual(h.records()[-1]["error"], "grpc_deadline_exceeded")

    def test_deadlineLongerThanTimeout(self) -> None:
        """
        grpc-timeout 10S over a 2 s timeout: the HTTP timeout does not cut
        the call; its deadline does.
        """
        h = Harness([_service("service.api.payments", timeout=2.0)])
        _, transport = h.send(
            call(b"/payments.v1.Payments/Create", b"grpc-timeout: 10S")
        )
        upstream = h.client.calls[0]
        h.clock.pump([0.1] * 99)
        self.assertFalse(upstream.cancelled)
        h.clock.pump([0.1] * 2)
        self.assertTrue(upstream.cancelled)
        self.assertEqual(head(transport)[b"grpc-status"], b"4")

    def test_deadlineDuringAnswer(self) -> None:
        """
        A deadline that passes while the answer streams resets the call:
        the upstream's body is stopped and the client's response is cut
        off, never made to look complete.
        """
        h = Harness([_service("service.api.payments")])
        protocol, transport = h.send(
            call(b"/payments.v1.Payments/Create", b"grpc-timeout: 1S")
        )
        response = FakeResponse(200, Headers({b"content-type": [b"application/grpc"]}))
        h.client.calls[0].result.callback(response)
        response.deliver(b"\0\0\0\0\1x")
        h.clock.advance(1.01)
        self.assertTrue(response.transport.stopped)
        response.end(Failure(ResponseFailed([Failure(CancelledError())])))
        self.assertTrue(transport.disconnecting)
        self.assertNotIn(b"0\r\n\r\n", transport.value())
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(h.records()[-1]["error"], "grpc_deadline_exceeded")

    def test_noTimeoutWhileWaiting(self) -> None:
        """
        With no grpc-timeout, neither the policy's timeout nor its
        idle-timeout cuts a call: after stream-idle-timeout with nothing
        from either side, it ends, UNAVAILABLE (14), stream_idle_timeout.
        """
        h = Harness(
            [
                _service(
                    "service.api.payments",
                    timeout=2.0,
                    idleTimeout=2.0,
                    streamIdleTimeout=30.0,
                )
            ]
        )
        _, transport = h.send(call(b"/payments.v1.Payments/Create"))
        upstream = h.client.calls[0]
        h.clock.pump([0.1] * 299)
        self.assertFalse(upstream.cancelled)
        # (Checked each quarter of the timeout: 30 to 37.5 s of silence.)
        h.clock.pump([0.1] * 77)
        self.assertTrue(upstream.cancelled)
        fields = head(transport)
        self.assertEqual(fields[b"grpc-status"], b"14")
        self.assertEqual(fields[b"grpc-message"], b"stream_idle_timeout")

    def test_clientStreamKeepsCallAlive(self) -> None:
        """
        A client that streams its messages, one each 20 s, keeps a call
        with a 30 s stream idle timeout alive for minutes, and the body
        timeout does not apply to it; once it stops, the call ends after
        30 to 37.5 s of silence.
        """
        h = Harness([_service("service.api.payments", streamIdleTimeout=30.0)])
        protocol, transport = h.send(
            b"POST /payments.v1.Payments/Chat HTTP/1.1\r\n"
            b"Host: api.example.com\r\nContent-Type: application/grpc\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        upstream = h.client.calls[0]
        for _ in range(10):
            h.clock.pump([0.1] * 200)
            protocol.dataReceived(b"5\r\n\0\0\0\0\0\r\n")
        self.assertFalse(upstream.cancelled)
        self.assertFalse(transport.disconnecting)
        h.clock.pump([0.1] * 299)
        self.assertFalse(upstream.cancelled)
        h.clock.pump([0.1] * 302)
        self.assertTrue(upstream.cancelled)
        self.assertEqual(head(transport)[b"grpc-message"], b"stream_idle_timeout")

    def test_quietAnswerIsNotIdle(self) -> None:
        """
        An answer that streams one message a minute is not cut by the
        policy's idle-timeout (10 s) but by stream-idle-timeout (2 min)
        once it stops.
        """
        h = Harness(
            [
                _service(
                    "service.api.payments", idleTimeout=10.0, streamIdleTimeout=120.0
                )
            ]
        )
        _, transport = h.send(call(b"/payments.v1.Payments/List"))
        response = FakeResponse(200, Headers({b"content-type": [b"application/grpc"]}))
        h.client.calls[0].result.callback(response)
        for _ in range(5):
            h.clock.pump([0.1] * 600)
            response.deliver(b"\0\0\0\0\1x")
        self.assertFalse(response.transport.stopped)
        h.clock.pump([0.1] * 1190)
        self.assertFalse(response.transport.stopped)
        h.clock.pump([0.1] * 20)
        self.assertTrue(response.transport.stopped)

    def test_malformed(self) -> None:
        """
        A malformed grpc-timeout is refused, INVALID_ARGUMENT (3),
        grpc_timeout_invalid, and nothing goes upstream.
        """
        h = Harness([_service("service.api.payments")])
        _, transport = h.send(
            call(b"/payments.v1.Payments/Create", b"grpc-timeout: 1.5S")
        )
        self.assertEqual(h.client.calls, [])
        fields = head(transport)
        self.assertEqual(fields[b"grpc-status"], b"3")
        self.assertEqual(fields[b"grpc-message"], b"grpc_timeout_invalid")

    def test_notGrpc(self) -> None:
        """
        grpc-timeout on a request that is no gRPC call is ignored, and the
        HTTP timeout governs it.
        """
        h = Harness([_service("service.api.payments", timeout=2.0)])
        h.send(
            b"GET /payments/x HTTP/1.1\r\nHost: api.example.com\r\n"
            b"grpc-timeout: nonsense\r\n\r\n"
        )
        upstream = h.client.calls[0]
        h.clock.pump([0.1] * 19)
        self.assertFalse(upstream.cancelled)
        h.clock.pump([0.1] * 2)
        self.assertTrue(upstream.cancelled)


class GrpcStatusTests(SynchronousTestCase):
    """
    The upstream's own grpc-status is recorded: in the access log and the
    gRPC call metrics.
    """

    def metric(self, h: Harness, name: str) -> list[str]:
        from prometheus_client import generate_latest

        text = generate_latest(h.metrics.registry).decode()
        return [line for line in text.splitlines() if line.startswith(name + "{")]

    def test_fromTrailers(self) -> None:
        """
        A call answered with a body and trailers holding grpc-status 5 is
        logged with grpc_status 5 and counted as NOT_FOUND from upstream.
        """
        h = Harness([_service("service.api.payments")])
        _, transport = h.send(call(b"/payments.v1.Payments/Get"))
        response = FakeResponse(200, Headers({b"content-type": [b"application/grpc"]}))
        h.client.calls[0].result.callback(response)
        response.deliver(b"\0\0\0\0\0")
        response.monedgeTrailers = [(b"grpc-status", b"5")]  # type: ignore[attr-defined]
        response.end()
        self.assertEqual(h.records()[-1]["grpc_status"], 5)
        self.assertEqual(
            self.metric(h, "monedge_grpc_calls_total"),
            [
                'monedge_grpc_calls_total{grpc_status="NOT_FOUND",'
                'origin="upstream",service="service.api.payments"} 1.0'
            ],
        )
        self.assertEqual(self.metric(h, "monedge_grpc_refusals_total"), [])

    def test_trailersOnly(self) -> None:
        """
        A trailers-only answer (grpc-status in the head, no body) is
        logged with its status; a status out of range is UNKNOWN (2).
        """
        for value, logged in [(b"7", 7), (b"99", 2), (b"x", 2)]:
            h = Harness([_service("service.api.payments")])
            h.send(call(b"/payments.v1.Payments/Get"))
            response = FakeResponse(
                200,
                Headers(
                    {b"content-type": [b"application/grpc"], b"grpc-status": [value]}
                ),
            )
            h.client.calls[0].result.callback(response)
            response.end()
            self.assertEqual(h.records()[-1]["grpc_status"], logged)

    def test_notGrpc(self) -> None:
        """
        A grpc-status trailer on an HTTP request is not a call's status.
        """
        h = Harness([_service("service.api.payments")])
        h.send(b"GET /payments/x HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        response = FakeResponse(200)
        h.client.calls[0].result.callback(response)
        response.monedgeTrailers = [(b"grpc-status", b"5")]  # type: ignore[attr-defined]
        response.end()
        self.assertIsNone(h.records()[-1]["grpc_status"])


class GrpcLimitRefusalTests(SynchronousTestCase):
    """
    A refusal made by a limit before routing takes gRPC's form too.
    """

    def test_bodyTooLarge(self) -> None:
        """
        A call whose body is over the service's max-body-size is
        RESOURCE_EXHAUSTED (8), body_too_large.
        """
        h = Harness([_service("service.api.payments", maxBodySize=2)], limits=Limits())
        _, transport = h.send(call(b"/payments.v1.Payments/Create"))
        fields = head(transport)
        self.assertEqual(fields.get(b"grpc-status"), b"8", transport.value())
        self.assertEqual(fields[b"grpc-message"], b"body_too_large")
