"""
End-to-end HTTP/2 upstream connection lifecycle (issue 16, items 2 and 8):
an upstream GOAWAY during traffic loses no request, whether from a real
grpcio server that ages its connections out or from a raw C{h2} upstream
whose GOAWAY leaves streams in flight unprocessed; and the PING keepalive
fails a request waiting on a connection that went silent within the ping
interval and timeout, not the response timeout.
"""

from __future__ import annotations

import time
from concurrent import futures
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
from hyperframe.frame import GoAwayFrame
from twisted.internet import reactor, threads
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.portforward import ProxyFactory
from twisted.python.failure import Failure

from monedge.testing import ProxyProcess
from tests.e2e import ProxyTestCase
from tests.test_e2e_http2 import HOST

#: How many streams the GOAWAY upstream waits for on its first connection.
_IN_FLIGHT = 4

#: The last stream id its GOAWAY gives: streams 1 and 3 are processed, 5
#: and 7 are not.
_LAST_PROCESSED = 3


class _GoAwayUpstream(Protocol):
    """
    An h2c upstream: on its first connection, once C{_IN_FLIGHT} requests
    have ended, it sends a GOAWAY whose last stream id is
    C{_LAST_PROCESSED}, answers the streams at or below it, never the
    others, and closes; later connections answer every request.  Each
    answer is C{<connection>:<path>}.
    """

    def __init__(self, seen: list[tuple[int, str]], number: int) -> None:
        self.seen = seen
        self.number = number
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=config)
        self.paths: dict[int, bytes] = {}
        self.ended: list[int] = []

    def connectionMade(self) -> None:
        self.h2.initiate_connection()
        self._flush()

    def _flush(self) -> None:
        assert self.transport is not None
        self.transport.write(self.h2.data_to_send())

    def _answer(self, streamId: int) -> None:
        path = self.paths[streamId]
        self.seen.append((self.number, path.decode()))
        self.h2.send_headers(streamId, [(b":status", b"200")])
        self.h2.send_data(streamId, b"%d:%s" % (self.number, path), end_stream=True)

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            assert self.transport is not None
            self.transport.loseConnection()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.paths[event.stream_id] = dict(event.headers)[b":path"]
            elif isinstance(event, h2.events.StreamEnded):
                if self.number > 1:
                    self._answer(event.stream_id)
                    continue
                self.ended.append(event.stream_id)
                if len(self.ended) == _IN_FLIGHT:
                    self._goAway()
                    return
        self._flush()

    def _goAway(self) -> None:
        assert self.transport is not None
        self._flush()
        # Raw: h2's own close_connection would end the processed streams too.
        self.transport.write(GoAwayFrame(0, last_stream_id=_LAST_PROCESSED).serialize())
        for streamId in sorted(self.ended):
            if streamId <= _LAST_PROCESSED:
                self._answer(streamId)
        self._flush()
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        pass


class _SilentUpstream(Protocol):
    """
    An h2c upstream that sends its preface and SETTINGS, then, once a
    request has begun, nothing at all: not a response, not a PING's ACK.
    """

    def __init__(self, requests: list[bytes]) -> None:
        self.requests = requests
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=config)
        self.silent = False

    def connectionMade(self) -> None:
        self.h2.initiate_connection()
        assert self.transport is not None
        self.transport.write(self.h2.data_to_send())

    def dataReceived(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.requests.append(dict(event.headers)[b":path"])
                self.silent = True
        if not self.silent:
            assert self.transport is not None
            self.transport.write(self.h2.data_to_send())

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        pass


class _CountingForwarder(ProxyFactory):
    """
    A TCP forwarder to one address that counts the connections it takes.
    """

    noisy = False
    connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.connections += 1
        return super().buildProtocol(addr)


class UpstreamGoAwayTests(ProxyTestCase):
    """
    Upstream GOAWAYs during traffic, through a real C{twistd monedge}.
    """

    timeout = 60

    async def _noServerErrors(self, proxy: ProxyProcess, count: int) -> None:
        """
        The access log has C{count} records (waiting for them a little)
        and none with a 5xx status.
        """
        deadline = time.monotonic() + 5
        records = proxy.accessLog()
        while len(records) < count and time.monotonic() < deadline:
            await threads.deferToThread(time.sleep, 0.05)
            records = proxy.accessLog()
        self.assertEqual(len(records), count)
        self.assertEqual([r for r in records if r["status"] >= 500], [])

    async def test_grpcServerAgesConnections(self) -> None:
        """
        A grpcio server whose connections live 300 ms (it sends GOAWAY
        again and again under traffic, with a 10 s grace for the calls in
        flight), behind an h2c service: 300 unary calls from a grpcio
        client, 8 at a time, all succeed with their own answer, and no
        request in the access log is a 5xx.
        """

        def echo(request: bytes, context: Any) -> bytes:
            # Slow enough that the calls span several connection ages.
            time.sleep(0.05)
            return b"echo:" + request

        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8),
            options=[
                ("grpc.max_connection_age_ms", 300),
                ("grpc.max_connection_age_grace_ms", 10000),
            ],
        )
        handler = grpc.method_handlers_generic_handler(
            "payments.v1.Payments",
            {"Echo": grpc.unary_unary_rpc_method_handler(echo)},
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.addCleanup(server.stop, None)
        # Between monedge and the server, to count monedge's connections.
        forwarder: Any = _CountingForwarder("127.0.0.1", port)
        listening = reactor.listenTCP(0, forwarder, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        proxy = await self.startProxy(
            {
                "service.api.payments": {
                    "endpoints": [f"127.0.0.1:{listening.getHost().port}"],  # type: ignore[attr-defined]
                    "policy": {"protocol": "h2c"},
                }
            }
        )

        def calls() -> tuple[list[bytes], float]:
            started = time.monotonic()
            with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
                stub = channel.unary_unary("/payments.v1.Payments/Echo")

                def one(n: int) -> bytes:
                    answer: bytes = stub(b"%d" % n, timeout=10)
                    return answer

                with futures.ThreadPoolExecutor(max_workers=8) as pool:
                    answers = list(pool.map(one, range(300)))
            return answers, time.monotonic() - started

        answers, elapsed = await threads.deferToThread(calls)
        self.assertEqual(answers, [b"echo:%d" % n for n in range(300)])
        # Connections aged out again and again under the traffic.
        self.assertGreater(elapsed, 1.5)
        self.assertGreaterEqual(forwarder.connections, 4)
        await self._noServerErrors(proxy, 300)

    async def test_unprocessedStreamsRetried(self) -> None:
        """
        An h2c upstream whose GOAWAY says only streams 1 and 3 of the four
        in flight were processed: those two are answered on the first
        connection, the other two are sent again on a new connection, and
        every request succeeds.
        """
        seen: list[tuple[int, str]] = []
        connections: list[int] = []

        def build() -> _GoAwayUpstream:
            connections.append(1)
            return _GoAwayUpstream(seen, len(connections))

        factory: Any = Factory.forProtocol(build)
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        address = f"127.0.0.1:{listening.getHost().port}"  # type: ignore[attr-defined]
        proxy = await self.startProxy(
            {"service.api.svc": {"endpoints": [address], "policy": {"protocol": "h2c"}}}
        )
        paths = [f"/r{n}" for n in range(_IN_FLIGHT)]
        answers = await gatherResults(
            [
                ensureDeferred(
                    self.get(
                        f"http://127.0.0.1:{proxy.port}/svc{path}",
                        headers={"Host": HOST},
                    )
                )
                for path in paths
            ]
        )
        bodies = sorted(body.decode() for _, body in answers)
        self.assertEqual([response.code for response, _ in answers], [200] * 4)
        # Two answered on the first connection, two on the second.
        self.assertEqual(sorted(b.split(":")[0] for b in bodies), ["1", "1", "2", "2"])
        self.assertEqual(sorted(b.split(":")[1] for b in bodies), paths)
        self.assertEqual(sorted(path for _, path in seen), paths)
        await self._noServerErrors(proxy, _IN_FLIGHT)


class KeepaliveTests(ProxyTestCase):
    """
    The HTTP/2 upstream PING keepalive, through a real C{twistd monedge}.
    """

    timeout = 60

    async def test_silentUpstreamFailsFast(self) -> None:
        """
        With C{--upstream-ping-interval 1s --upstream-ping-timeout 1s}, a
        request waiting on an h2c upstream that went silent (it answers
        neither the request nor the PING) gets 502 C{upstream_reset} within
        a few seconds, not after the service's 60 s response timeout; the
        request is not sent again.
        """
        requests: list[bytes] = []
        factory: Any = Factory.forProtocol(lambda: _SilentUpstream(requests))
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        address = f"127.0.0.1:{listening.getHost().port}"  # type: ignore[attr-defined]
        proxy = await self.startProxy(
            {
                "service.api.svc": {
                    "endpoints": [address],
                    "policy": {"protocol": "h2c"},
                }
            },
            ["--upstream-ping-interval", "1s", "--upstream-ping-timeout", "1s"],
        )
        started = time.monotonic()
        response, _ = await self.get(
            f"http://127.0.0.1:{proxy.port}/svc/wait", headers={"Host": HOST}
        )
        elapsed = time.monotonic() - started
        self.assertEqual(response.code, 502)
        self.assertLess(elapsed, 5)
        self.assertGreater(elapsed, 1.5)
        self.assertEqual(requests, [b"/wait"])
        records: list[dict[str, Any]] = []

        def logged() -> bool:
            records[:] = proxy.accessLog()
            return bool(records)

        # (The access log is written a moment after the answer.)
        await proxy.waitFor(logged, 5, "the access log")
        [record] = records
        self.assertEqual(record["error"], "upstream_reset")
        self.assertIn("answered no PING within 1s", proxy.log())
