"""
End-to-end gRPC at the edge: the real C{grpcio} client, over cleartext
HTTP/2 with prior knowledge, against a real C{twistd monedge}; generic
calls with raw bytes, no generated code.  monedge's own refusals reach the
client as gRPC statuses, with monedge's code as the message; and a raw
HTTP/2 client sees a refusal as one HEADERS frame that ends the stream.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import grpc
from twisted.internet import threads

from monedge.testing import ProxyProcess
from tests.e2e import ProxyTestCase
from tests.h2peer import H2Peer, StreamResult

SERVICES: dict[str, dict[str, Any]] = {
    # No endpoint: every call is UNAVAILABLE.
    "service.api.payments": {"endpoints": []},
}


async def lastRecord(proxy: ProxyProcess) -> dict[str, Any]:
    """
    The last access-log record, once one is written.
    """
    records: list[dict[str, Any]] = []

    def logged() -> bool:
        records[:] = proxy.accessLog()
        return bool(records)

    await proxy.waitFor(logged, 5, "the access log")
    return records[-1]


def call(port: int, method: str, timeout: float = 10.0) -> tuple[Any, str]:
    """
    Make a unary call of C{method} with an empty message; return its status
    code and details.  Blocking: call it in a thread.
    """
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = channel.unary_unary(
            method, request_serializer=None, response_deserializer=None
        )
        try:
            stub(b"", timeout=timeout)
        except grpc.RpcError as e:
            return e.code(), e.details()
    return grpc.StatusCode.OK, ""


class GrpcRefusalTests(ProxyTestCase):
    """
    A gRPC call monedge refuses gets the gRPC status of docs/errors.md's
    table, and grpc-message carries monedge's code.
    """

    async def proxy(self, *args: str) -> ProxyProcess:
        return await self.startProxy(SERVICES, args)

    async def test_unknownService(self) -> None:
        """
        A call whose package names no service is UNIMPLEMENTED,
        route_not_found; the access log has its grpc_status.
        """
        proxy = await self.proxy()
        code, details = await threads.deferToThread(
            call, proxy.port, "/nothing.v1.Nothing/Get"
        )
        self.assertEqual(code, grpc.StatusCode.UNIMPLEMENTED)
        self.assertEqual(details, "route_not_found")
        record = await lastRecord(proxy)
        self.assertEqual(record["grpc_status"], 12)
        self.assertEqual(record["status"], 200)
        self.assertEqual(record["error"], "route_not_found")

    async def test_notTheShape(self) -> None:
        """
        A call whose path has no package is UNIMPLEMENTED too.
        """
        proxy = await self.proxy()
        code, details = await threads.deferToThread(
            call, proxy.port, "/Payments/Create"
        )
        self.assertEqual(code, grpc.StatusCode.UNIMPLEMENTED)
        self.assertEqual(details, "route_not_found")

    async def test_noEndpoint(self) -> None:
        """
        A call routed by the convention (/payments.v1.Payments/Create to
        service.api.payments) to a service with no endpoint is
        UNAVAILABLE, no_ready_endpoint; the refusal is counted by status
        name.
        """
        proxy = await self.proxy()
        code, details = await threads.deferToThread(
            call, proxy.port, "/payments.v1.Payments/Create"
        )
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(details, "no_ready_endpoint")
        record = await lastRecord(proxy)
        self.assertEqual(record["service"], "service.api.payments")
        _, body = await self.get(proxy.adminURL + "/metrics")
        metrics = body.decode("utf-8")
        self.assertIn(
            'monedge_grpc_refusals_total{grpc_status="UNAVAILABLE",'
            'service="service.api.payments"} 1.0',
            metrics,
        )

    async def test_packagePrefix(self) -> None:
        """
        With --grpc-package-prefix com.example,
        /com.example.payments.v1.Payments/Create reaches service.api.payments
        (UNAVAILABLE: no endpoint); without it, the package names
        service.api.com, which does not exist (UNIMPLEMENTED).
        """
        method = "/com.example.payments.v1.Payments/Create"
        proxy = await self.proxy("--grpc-package-prefix", "com.example")
        code, details = await threads.deferToThread(call, proxy.port, method)
        self.assertEqual(
            (code, details), (grpc.StatusCode.UNAVAILABLE, "no_ready_endpoint")
        )
        await proxy.stop()
        proxy = await self.proxy()
        code, details = await threads.deferToThread(call, proxy.port, method)
        self.assertEqual(
            (code, details), (grpc.StatusCode.UNIMPLEMENTED, "route_not_found")
        )

    async def test_hookRefusal(self) -> None:
        """
        The auth hook's refusal of a call with no credential is
        UNAUTHENTICATED, unauthorized.
        """
        keys = os.path.join(self.directory, "keys")
        with open(keys, "w") as f:
            f.write(hashlib.sha256(b"secret").hexdigest() + "\n")
        hook = json.dumps(
            {"name": "auth", "options": {"mode": "api-key", "keys-file": keys}}
        )
        proxy = await self.proxy("--hook", hook)
        code, details = await threads.deferToThread(
            call, proxy.port, "/payments.v1.Payments/Create"
        )
        self.assertEqual(code, grpc.StatusCode.UNAUTHENTICATED)
        self.assertEqual(details, "unauthorized")


class TrailersOnlyTests(ProxyTestCase):
    """
    Over HTTP/2 a gRPC refusal is trailers-only: one HEADERS frame with
    END_STREAM holding :status 200, content-type, grpc-status and
    grpc-message, and no DATA frame.
    """

    async def test_oneHeadersFrame(self) -> None:
        """
        The unknown-service refusal, read frame by frame.
        """
        proxy = await self.startProxy(SERVICES)

        def exchange() -> StreamResult:
            peer = H2Peer(proxy.port, None, "api.example.com")
            try:
                peer.write(
                    peer.request(
                        1,
                        b"/nothing.v1.Nothing/Get",
                        b"POST",
                        [(b"content-type", b"application/grpc"), (b"te", b"trailers")],
                    )
                )
                peer.readUntil(lambda: peer.answered(1), 5.0)
                return peer.stream(1)
            finally:
                peer.close()

        stream = await threads.deferToThread(exchange)
        self.assertEqual(stream.frames, ["HEADERS+END_STREAM"])
        headers = dict(stream.headers or [])
        self.assertEqual(headers[b":status"], b"200")
        self.assertEqual(headers[b"content-type"], b"application/grpc")
        self.assertEqual(headers[b"grpc-status"], b"12")
        self.assertEqual(headers[b"grpc-message"], b"route_not_found")
        self.assertNotIn(b"content-length", headers)
