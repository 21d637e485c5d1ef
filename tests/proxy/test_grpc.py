"""
gRPC calls on the proxy path in memory (HTTP/1.1 front end, fake
upstream): routing by package, the forwarded path, C{grpc-timeout} as the
upstream deadline, and refusals in gRPC's form with their headers.
"""

from __future__ import annotations

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from monedge.rules.limits import Limits
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


class GrpcTimeoutTests(SynchronousTestCase):
    """
    grpc-timeout is the upstream deadline, capped by the service's timeout.
    """

    def test_shorterThanPolicy(self) -> None:
        """
        grpc-timeout 500m under a 2 s timeout: the upstream is given up
        after 0.5 s, and the call gets DEADLINE_EXCEEDED (4).
        """
        h = Harness([_service("service.api.payments", timeout=2.0)])
        _, transport = h.send(
            call(b"/payments.v1.Payments/Create", b"grpc-timeout: 500m")
        )
        upstream = h.client.calls[0]
        h.clock.advance(0.49)
        self.assertEqual(transport.value(), b"")
        h.clock.advance(0.02)
        self.assertTrue(upstream.cancelled)
        fields = head(transport)
        self.assertEqual(fields[b"grpc-status"], b"4")
        self.assertEqual(fields[b"grpc-message"], b"upstream_timeout")

    def test_cappedByPolicy(self) -> None:
        """
        grpc-timeout 10S over a 2 s timeout: the policy's 2 s holds.
        """
        h = Harness([_service("service.api.payments", timeout=2.0)])
        _, transport = h.send(
            call(b"/payments.v1.Payments/Create", b"grpc-timeout: 10S")
        )
        upstream = h.client.calls[0]
        h.clock.advance(1.9)
        self.assertFalse(upstream.cancelled)
        h.clock.advance(0.2)
        self.assertTrue(upstream.cancelled)
        self.assertEqual(head(transport)[b"grpc-status"], b"4")

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
        grpc-timeout on a request that is no gRPC call is ignored.
        """
        h = Harness([_service("service.api.payments", timeout=2.0)])
        h.send(
            b"GET /payments/x HTTP/1.1\r\nHost: api.example.com\r\n"
            b"grpc-timeout: nonsense\r\n\r\n"
        )
        upstream = h.client.calls[0]
        h.clock.advance(1.9)
        self.assertFalse(upstream.cancelled)


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
