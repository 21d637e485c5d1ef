"""
End-to-end gRPC streams through a real C{twistd monedge}: the real grpcio
client, over TLS with ALPN C{h2} and over cleartext HTTP/2 with prior
knowledge, to a real grpcio server behind an C{h2c} service; generic
handlers with raw bytes, no generated code.

Unary, server-, client- and bidirectional streaming calls with 1,000
messages each way; metadata both ways, trailing metadata, status and
message; a deadline exceeded; a call the client cancels, seen cancelled
by the server; and the upstream's own grpc-status in the access log.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
from twisted.internet import threads

from monedge.testing import ProxyProcess, freePort
from monedge.testing.tls import CertificateAuthority
from tests.e2e import ProxyTestCase

HOST = "api.example.com"
SERVICE = "payments.v1.Payments"
MESSAGES = 1000


class _Upstream:
    """
    A grpcio server with a generic handler for each kind of call, and what
    it saw.
    """

    def __init__(self) -> None:
        #: Set when the server sees a call cancelled by its client.
        self.cancelled = threading.Event()
        #: Set when a slow call has started, so the client may cancel it.
        self.started = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
            "List": grpc.unary_stream_rpc_method_handler(self.list),
            "Sum": grpc.stream_unary_rpc_method_handler(self.sum),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(None)

    def unary(self, request: bytes, context: Any) -> bytes:
        metadata = dict(context.invocation_metadata())
        context.send_initial_metadata([("x-initial", "hello")])
        context.set_trailing_metadata([("x-trailing", metadata.get("x-caller", "?"))])
        return b"unary:" + request

    def fail(self, request: bytes, context: Any) -> bytes:
        context.set_trailing_metadata([("x-why", "because")])
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not now: " + "é")
        raise AssertionError("abort returned")

    def slow(self, request: bytes, context: Any) -> bytes:
        self.started.set()

        def cancelled() -> None:
            self.cancelled.set()

        context.add_callback(cancelled)
        # Waits until the client goes (or a bound, should it not).
        self.cancelled.wait(20)
        return b"late"

    def list(self, request: bytes, context: Any) -> Iterator[bytes]:
        count = int(request)
        for i in range(count):
            yield b"item %d" % (i,)

    def sum(self, requests: Iterator[bytes], context: Any) -> bytes:
        count = total = 0
        for message in requests:
            count += 1
            total += len(message)
        return b"%d %d" % (count, total)

    def chat(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for message in requests:
            yield b"re:" + message


class _GrpcStreamingBase(ProxyTestCase):
    """
    Each kind of call through monedge; subclasses say how the client
    connects.
    """

    timeout = 120

    async def startBoth(
        self, *args: str, policy: dict[str, str] | None = None
    ) -> ProxyProcess:
        self.upstream = _Upstream()
        self.addCleanup(self.upstream.stop)
        return await self.startProxy(
            {
                "service.api.payments": {
                    "endpoints": [f"127.0.0.1:{self.upstream.port}"],
                    "policy": {"protocol": "h2c", **(policy or {})},
                }
            },
            self.proxyArgs(*args),
        )

    def proxyArgs(self, *args: str) -> list[str]:
        return list(args)

    def channel(self, proxy: ProxyProcess) -> grpc.Channel:
        raise NotImplementedError()

    def onChannel(self, proxy: ProxyProcess, work: Any) -> Any:
        """
        Run C{work(channel)} in a thread with a channel to monedge.
        """

        def inThread() -> Any:
            with self.channel(proxy) as channel:
                return work(channel)

        return threads.deferToThread(inThread)

    async def test_unaryWithMetadata(self) -> None:
        """
        A unary call: the message both ways, the client's metadata reaches
        the server, and the server's initial and trailing metadata reach
        the client.
        """
        proxy = await self.startBoth()

        def work(channel: grpc.Channel) -> tuple[bytes, Any, Any]:
            stub = channel.unary_unary(f"/{SERVICE}/Unary")
            answer, call = stub.with_call(
                b"hi" * 5000, timeout=10, metadata=[("x-caller", "me")]
            )
            return answer, call.initial_metadata(), call.trailing_metadata()

        answer, initial, trailing = await self.onChannel(proxy, work)
        self.assertEqual(answer, b"unary:" + b"hi" * 5000)
        self.assertIn(("x-initial", "hello"), [(m.key, m.value) for m in initial])
        self.assertIn(("x-trailing", "me"), [(m.key, m.value) for m in trailing])

    async def test_statusMessageAndTrailers(self) -> None:
        """
        A call the server fails: its status, its message (UTF-8) and its
        trailing metadata reach the client; the access log has the
        upstream's grpc-status.
        """
        proxy = await self.startBoth()

        def work(channel: grpc.Channel) -> tuple[Any, str, Any]:
            stub = channel.unary_unary(f"/{SERVICE}/Fail")
            try:
                stub(b"", timeout=10)
            except grpc.RpcError as e:
                return e.code(), e.details(), e.trailing_metadata()
            raise AssertionError("the call succeeded")

        code, details, trailing = await self.onChannel(proxy, work)
        self.assertEqual(code, grpc.StatusCode.FAILED_PRECONDITION)
        self.assertEqual(details, "not now: é")
        self.assertIn(("x-why", "because"), [(m.key, m.value) for m in trailing])
        records: list[dict[str, Any]] = []

        def logged() -> bool:
            records[:] = proxy.accessLog()
            return bool(records)

        await proxy.waitFor(logged, 5, "the access log")
        self.assertEqual(records[-1]["grpc_status"], 9)
        self.assertEqual(records[-1]["status"], 200)

    async def test_serverStreaming(self) -> None:
        """
        A server-streaming call: 1,000 messages reach the client, in order.
        """
        proxy = await self.startBoth()

        def work(channel: grpc.Channel) -> list[bytes]:
            stub = channel.unary_stream(f"/{SERVICE}/List")
            return list(stub(b"%d" % (MESSAGES,), timeout=30))

        messages = await self.onChannel(proxy, work)
        self.assertEqual(messages, [b"item %d" % (i,) for i in range(MESSAGES)])

    async def test_clientStreaming(self) -> None:
        """
        A client-streaming call: 1,000 messages reach the server.
        """
        proxy = await self.startBoth()

        def work(channel: grpc.Channel) -> bytes:
            stub = channel.stream_unary(f"/{SERVICE}/Sum")
            answer: bytes = stub(
                (b"m" * (i % 100) for i in range(MESSAGES)), timeout=30
            )
            return answer

        answer = await self.onChannel(proxy, work)
        total = sum(i % 100 for i in range(MESSAGES))
        self.assertEqual(answer, b"%d %d" % (MESSAGES, total))

    async def test_bidirectionalStreaming(self) -> None:
        """
        A bidirectional call: 1,000 messages each way, each answer after
        its message (the client sends the next only once it has the
        answer, so the stream is truly interleaved).
        """
        proxy = await self.startBoth()

        def work(channel: grpc.Channel) -> list[bytes]:
            stub = channel.stream_stream(f"/{SERVICE}/Chat")
            answers: list[bytes] = []
            ready = threading.Semaphore(1)

            def requests() -> Iterator[bytes]:
                for i in range(MESSAGES):
                    if not ready.acquire(timeout=10):
                        return
                    yield b"%d" % (i,)

            for answer in stub(requests(), timeout=60):
                answers.append(answer)
                ready.release()
            return answers

        answers = await self.onChannel(proxy, work)
        self.assertEqual(answers, [b"re:%d" % (i,) for i in range(MESSAGES)])

    async def test_quietStreamOutlivesHTTPTimeouts(self) -> None:
        """
        A bidirectional call with 1.5 s pauses both ways lives on past a
        1 s timeout, idle-timeout and --body-timeout, which are HTTP's:
        the stream idle timeout governs it.
        """
        proxy = await self.startBoth(
            "--body-timeout",
            "1s",
            policy={"timeout": "1s", "idle-timeout": "1s"},
        )

        def work(channel: grpc.Channel) -> list[bytes]:
            stub = channel.stream_stream(f"/{SERVICE}/Chat")

            def requests() -> Iterator[bytes]:
                for i in range(3):
                    time.sleep(1.5)
                    yield b"%d" % (i,)

            return list(stub(requests(), timeout=30))

        answers = await self.onChannel(proxy, work)
        self.assertEqual(answers, [b"re:0", b"re:1", b"re:2"])

    async def test_streamIdleTimeout(self) -> None:
        """
        A call that carries nothing either way for the service's
        stream-idle-timeout (1 s here) ends UNAVAILABLE, with monedge's
        code as its message, and the server sees it end.
        """
        proxy = await self.startBoth(policy={"stream-idle-timeout": "1s"})

        def work(channel: grpc.Channel) -> tuple[Any, str, float]:
            stub = channel.unary_unary(f"/{SERVICE}/Slow")
            started = time.monotonic()
            try:
                stub(b"", timeout=30)
            except grpc.RpcError as e:
                return e.code(), e.details(), time.monotonic() - started
            raise AssertionError("the call succeeded")

        code, details, elapsed = await self.onChannel(proxy, work)
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(details, "stream_idle_timeout")
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertLess(elapsed, 5)
        cancelled = await threads.deferToThread(self.upstream.cancelled.wait, 10)
        self.assertTrue(cancelled, "the server did not see the call end")

    async def test_deadlineExceeded(self) -> None:
        """
        A call whose deadline passes while the server works is
        DEADLINE_EXCEEDED for the client, and the server sees it end.
        """
        proxy = await self.startBoth()

        def work(channel: grpc.Channel) -> Any:
            stub = channel.unary_unary(f"/{SERVICE}/Slow")
            try:
                stub(b"", timeout=0.5)
            except grpc.RpcError as e:
                return e.code()
            return grpc.StatusCode.OK

        code = await self.onChannel(proxy, work)
        self.assertEqual(code, grpc.StatusCode.DEADLINE_EXCEEDED)
        cancelled = await threads.deferToThread(self.upstream.cancelled.wait, 10)
        self.assertTrue(cancelled, "the server did not see the call end")

    async def test_cancellationReachesUpstream(self) -> None:
        """
        A call the client cancels is cancelled at the server: monedge
        resets the upstream stream.
        """
        proxy = await self.startBoth()

        def work(channel: grpc.Channel) -> bool:
            stub = channel.unary_unary(f"/{SERVICE}/Slow")
            future = stub.future(b"", timeout=30)
            if not self.upstream.started.wait(10):
                return False
            future.cancel()
            return self.upstream.cancelled.wait(10)

        self.assertTrue(await self.onChannel(proxy, work))


class GrpcStreamingH2CTests(_GrpcStreamingBase):
    """
    gRPC calls over cleartext HTTP/2 with prior knowledge.
    """

    def channel(self, proxy: ProxyProcess) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{proxy.port}")


class GrpcStreamingTLSTests(_GrpcStreamingBase):
    """
    gRPC calls over TLS, HTTP/2 by ALPN, with the server's certificate
    checked against a test CA.
    """

    def setUp(self) -> None:
        super().setUp()
        self.ca = CertificateAuthority()
        self.tlsDir = os.path.join(self.directory, "tls")
        os.makedirs(self.tlsDir)
        with open(os.path.join(self.tlsDir, "default.pem"), "wb") as f:
            f.write(self.ca.issue([HOST]))
        self.tlsPort = freePort()

    def proxyArgs(self, *args: str) -> list[str]:
        return [
            "--tls-port",
            f"tcp:{self.tlsPort}:interface=127.0.0.1",
            "--tls-dir",
            self.tlsDir,
            *args,
        ]

    def channel(self, proxy: ProxyProcess) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca.certificatePEM
        )
        return grpc.secure_channel(
            f"127.0.0.1:{self.tlsPort}",
            credentials,
            options=[("grpc.ssl_target_name_override", HOST)],
        )


del _GrpcStreamingBase
