"""
The proxy path in memory: a real L{ProxySite} and channel over a
L{StringTransport}, a L{MemoryReactorClock}, and a L{FakeUpstreamClient}
the tests answer by hand.
"""

from __future__ import annotations

import gc
import io
import json
import random
import weakref
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.error import (
    ConnectionDone,
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface.verify import verifyObject

from monedge.edge.server import ListenerFactory
from monedge.interfaces import IServiceRegistry, IUpstreamClient, IUpstreamUpgrader
from monedge.observe.accesslog import AccessLog
from monedge.observe.metrics import Metrics
from monedge.registry import Endpoint, ServiceEntry
from monedge.rules.limits import Limits
from monedge.rules.policy import Policy
from monedge.runtime.compose import buildProxy
from monedge.runtime.config import Configuration
from monedge.testing import (
    FakeResponse,
    FakeUpstreamClient,
    MemoryRegistry,
    UpstreamCall,
    endpoint,
)
from monedge.upstream.balancer import Balancer
from monedge.upstream.client import FastUpstreamClient, UpstreamHeadersTooLarge


class Harness:
    """
    One proxy wired to fakes, with helpers to open client connections.
    """

    def __init__(
        self, entries: list[ServiceEntry], limits: Limits | None = None
    ) -> None:
        self.clock = MemoryReactorClock()
        self.registry = MemoryRegistry()
        self.registry.replaceAll(entries)
        self.client = FakeUpstreamClient()
        self.balancer = Balancer(self.clock, rng=random.Random(7))
        self.metrics = Metrics()
        self.metrics.watchRegistry(self.registry)
        self.log = io.StringIO()
        # The one wiring (monedge.runtime.compose), on fakes: no hooks,
        # WebSocket handshakes refused, each access-log line written at once.
        config = Configuration(limits=limits or Limits())
        self.proxy = buildProxy(
            config,
            self.clock,
            registry=self.registry,
            client=self.client,
            metrics=self.metrics,
            accessLog=AccessLog(self.log),
            balancer=self.balancer,
            hooks=None,
            upgrader=None,
        )
        self.root = self.proxy.root
        self.site = self.proxy.site

    def connect(self) -> tuple[Any, StringTransport]:
        """
        A new client connection.
        """
        protocol = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 30080),
            peerAddress=IPv4Address("TCP", "192.0.2.7", 40000),
        )
        protocol.makeConnection(transport)
        return protocol, transport

    def send(self, data: bytes) -> tuple[Any, StringTransport]:
        """
        Open a connection and send C{data} on it.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(data)
        return protocol, transport

    def records(self) -> list[dict[str, Any]]:
        """
        The access log so far.
        """
        return [json.loads(line) for line in self.log.getvalue().splitlines()]


def _service(
    name: str = "service.api.echo", *addresses: str, **policy: Any
) -> ServiceEntry:
    return ServiceEntry(
        name=name,
        endpoints=tuple(endpoint(a) for a in addresses or ("10.0.0.1:80",)),
        policy=Policy(**policy),
    )


def _status(transport: StringTransport) -> int:
    return int(transport.value().split(b" ", 2)[1])


def _jsonBody(transport: StringTransport) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(transport.value().partition(b"\r\n\r\n")[2])
    return document


GET = b"GET /echo/x?q=1 HTTP/1.1\r\nHost: api.example.com\r\n\r\n"


class ProxyPathTests(SynchronousTestCase):
    """
    Requests go upstream and responses come back, as the proxy leaf and
    exchange define.
    """

    def test_providers(self) -> None:
        """
        The fakes and the real client provide the interfaces they claim:
        the one upstream client sends requests and WebSocket handshakes.
        """
        verifyObject(IUpstreamClient, FakeUpstreamClient())
        client = FastUpstreamClient(MemoryReactorClock())
        verifyObject(IUpstreamClient, client)
        verifyObject(IUpstreamUpgrader, client)
        verifyObject(IServiceRegistry, MemoryRegistry())
        verifyObject(IResponse, FakeResponse())

    def test_forwardsAndStreams(self) -> None:
        """
        The request goes to the endpoint with the prefix stripped; the
        response's headers and body chunks reach the client as they arrive.
        """
        h = Harness([_service()])
        _, transport = h.send(GET)
        [call] = h.client.calls
        self.assertEqual(call.url, b"http://10.0.0.1:80/x?q=1")
        self.assertEqual(call.connectTimeout, 5.0)
        headers = Headers({b"content-type": [b"text/plain"]})
        response = FakeResponse(200, headers)
        call.result.callback(response)
        # The headers go out as soon as the upstream's arrive.
        self.assertIn(b"Transfer-Encoding: chunked", transport.value())
        response.deliver(b"first")
        self.assertTrue(transport.value().endswith(b"5\r\nfirst\r\n"))
        response.deliver(b"second")
        response.end()
        self.assertTrue(transport.value().endswith(b"0\r\n\r\n"))
        [record] = h.records()
        self.assertEqual(record["status"], 200)
        self.assertEqual(record["service"], "service.api.echo")
        self.assertEqual(record["endpoint"], "10.0.0.1:80")
        self.assertEqual(record["bytes_out"], 11)
        self.assertEqual(h.site.inFlight, 0)

    def test_protocolGivenToTheClient(self) -> None:
        """
        A service whose policy says C{protocol: h2c} has its requests sent
        with that protocol (the client dispatches on it); an C{http1}
        service's go as they always did.
        """
        h = Harness([_service(protocol="h2c")])
        h.send(GET)
        [call] = h.client.calls
        self.assertEqual(call.protocol, "h2c")
        h = Harness([_service()])
        h.send(GET)
        [call] = h.client.calls
        self.assertEqual(call.protocol, "http1")

    def test_contentLengthPassedThrough(self) -> None:
        """
        A response with a known length is sent with Content-Length, not
        chunked.
        """
        h = Harness([_service()])
        _, transport = h.send(GET)
        response = FakeResponse(200, length=4)
        h.client.calls[0].result.callback(response)
        response.deliver(b"abcd")
        response.end()
        self.assertIn(b"Content-Length: 4\r\n", transport.value())
        self.assertNotIn(b"chunked", transport.value())

    def test_headAndBodyInOneWrite(self) -> None:
        """
        A response whose body is already there when the head goes out (the
        common small response, which comes in one upstream read) reaches
        the client connection in a single write, head and body together.
        """

        class Counting(StringTransport):
            writes = 0

            def write(self, data: bytes) -> None:
                self.writes += 1
                super().write(data)

        class Immediate(FakeResponse):
            def deliverBody(self, protocol: Any) -> None:
                super().deliverBody(protocol)
                self.deliver(b"abcd")
                self.end()

        h = Harness([_service()])
        protocol = h.site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
        transport = Counting(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 30080),
            peerAddress=IPv4Address("TCP", "192.0.2.7", 40000),
        )
        protocol.makeConnection(transport)
        protocol.dataReceived(GET)
        h.client.calls[0].result.callback(Immediate(200, length=4))
        self.assertEqual(transport.writes, 1)
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertIn(b"Content-Length: 4", head)
        self.assertEqual(body, b"abcd")

    def test_wholeBodyTakenAtOnce(self) -> None:
        """
        When the upstream client offers the whole body with the head
        (monedge's own client, for a small response), it goes to the
        client with the head in one write and the request is finished and
        logged, with no relay or timer left behind.
        """

        class Whole(FakeResponse):
            def monedgeTakeBody(self) -> bytes | None:
                return b"abcd"

            def deliverBody(self, protocol: Any) -> None:
                raise AssertionError("streamed a body taken whole")

        h = Harness([_service()])
        protocol, transport = h.send(GET)
        h.client.calls[0].result.callback(Whole(200, length=4))
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertIn(b"Content-Length: 4", head)
        self.assertEqual(body, b"abcd")
        [record] = h.records()
        self.assertEqual((record["status"], record["bytes_out"]), (200, 4))
        self.assertEqual(h.site.inFlight, 0)
        # Only the connection's own timers (its one deadline timer, which
        # holds no response deadline any more, and keep-alive) are left:
        # none of the exchange's.
        channel = protocol._channel
        pending = [c for c in h.clock.getDelayedCalls() if c.active()]
        self.assertEqual(
            {getattr(getattr(c, "func", None), "__self__", None) for c in pending},
            {channel},
        )
        self.assertIsNone(channel._responseAt)

    def test_bodyNotTakenIsRelayed(self) -> None:
        """
        When the client cannot offer the whole body (it has not all come),
        the body is streamed as usual.
        """

        class Partial(FakeResponse):
            def monedgeTakeBody(self) -> bytes | None:
                return None

        h = Harness([_service()])
        _, transport = h.send(GET)
        response = Partial(200, length=4)
        h.client.calls[0].result.callback(response)
        response.deliver(b"ab")
        response.deliver(b"cd")
        response.end()
        self.assertTrue(transport.value().endswith(b"\r\n\r\nabcd"))
        self.assertEqual(h.site.inFlight, 0)

    def test_requestFreedWithoutTheCycleCollector(self) -> None:
        """
        A finished request, its exchange and its body relay are freed by
        reference counting alone: the request path leaves no reference
        cycle behind for Python's cyclic garbage collector, whose pauses
        would otherwise grow with the load and show in the tail latency.
        """
        h = Harness([_service()])
        protocol, transport = h.connect()
        wasEnabled = gc.isenabled()
        gc.disable()
        self.addCleanup(lambda: gc.enable() if wasEnabled else None)
        protocol.dataReceived(GET)
        [call] = h.client.calls
        request = weakref.ref(protocol._channel.requests[0])
        response = FakeResponse(200, length=2)
        call.result.callback(response)
        live = request()
        assert live is not None and live.exchange is not None
        exchange = weakref.ref(live.exchange)
        del live
        relay = weakref.ref(response.protocol)
        response.deliver(b"ok")
        response.end()
        self.assertTrue(transport.value().endswith(b"\r\n\r\nok"))
        del call, response
        h.client.calls.clear()
        self.assertEqual(
            [request(), exchange(), relay()], [None, None, None], "kept alive"
        )

    def test_lossReportedAfterTheFinish(self) -> None:
        """
        A finished request told of its connection's loss afterwards (as an
        HTTP/2 stream may tell it, after Twisted has let go of the
        request's channel) logs nothing and is not accounted again.
        """
        h = Harness([_service()])
        protocol, transport = h.connect()
        protocol.dataReceived(GET)
        request = protocol._channel.requests[0]
        [call] = h.client.calls
        response = FakeResponse(200, length=2)
        call.result.callback(response)
        response.deliver(b"ok")
        response.end()
        self.assertTrue(request.finished)
        self.assertFalse(hasattr(request, "channel"))
        # Trial fails the test on a logged failure, as on a raised one.
        request.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([r["status"] for r in h.records()], [200])

    def test_foldedHeaderLoggedOnce(self) -> None:
        """
        A request refused for obsolete line folding is logged once, as the
        400 it got, and not again as a 499 when its connection closes (it
        was logged twice).
        """
        h = Harness([_service()])
        protocol, transport = h.send(
            b"GET /echo/ HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n"
        )
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([r["status"] for r in h.records()], [400])
        self.assertEqual(_jsonBody(transport)["code"], "bad_request")

    def test_slowClientPausesUpstream(self) -> None:
        """
        When the client connection stops taking data, the upstream body is
        paused; when it drains, the upstream resumes.
        """
        h = Harness([_service()])
        _, transport = h.send(GET)
        response = FakeResponse()
        h.client.calls[0].result.callback(response)
        response.deliver(b"x" * 100)
        # What a TCP transport does when its send buffer fills, and drains.
        assert transport.producer is not None
        transport.producer.pauseProducing()
        self.assertTrue(response.transport.paused)
        transport.producer.resumeProducing()
        self.assertFalse(response.transport.paused)

    def test_responseHeaderTimeout(self) -> None:
        """
        No response headers within the service's timeout: the upstream
        request is cancelled and the client gets 504.
        """
        h = Harness([_service(timeout=2.0)])
        _, transport = h.send(GET)
        call = h.client.calls[0]
        h.clock.advance(1.9)
        self.assertEqual(transport.value(), b"")
        h.clock.advance(0.2)
        self.assertTrue(call.cancelled)
        self.assertEqual(_status(transport), 504)
        self.assertEqual(_jsonBody(transport)["code"], "upstream_timeout")

    def test_responseHeaderTimeoutOnAKeptConnection(self) -> None:
        """
        On a kept-alive connection, each request gets the service's whole
        timeout from its own start: a request answered in time leaves no
        deadline behind, and the next one, unanswered, gets 504 at its own
        timeout, not at the first one's.
        """
        h = Harness([_service(timeout=2.0)])
        protocol, transport = h.send(GET)
        h.clock.advance(1.5)
        response = FakeResponse(200, length=2)
        h.client.calls[0].result.callback(response)
        response.deliver(b"ok")
        response.end()
        self.assertEqual(_status(transport), 200)
        transport.clear()
        h.clock.advance(1.0)
        protocol.dataReceived(GET)
        second = h.client.calls[1]
        h.clock.advance(1.9)
        self.assertFalse(second.cancelled)
        self.assertEqual(transport.value(), b"")
        h.clock.advance(0.2)
        self.assertTrue(second.cancelled)
        self.assertEqual(_status(transport), 504)
        self.assertEqual(_jsonBody(transport)["code"], "upstream_timeout")

    def test_responseDeadlineOnTheConnectionsTimer(self) -> None:
        """
        An HTTP/1.1 exchange's response deadline is held by its connection's
        one deadline timer: a request adds no timer of its own, and a
        connection that closes leaves none of its timers scheduled.
        """
        h = Harness([_service(timeout=2.0)])
        protocol, transport = h.send(GET)
        channel = protocol._channel
        self.assertIsNotNone(channel._responseAt)
        pending = [c for c in h.clock.getDelayedCalls() if c.active()]
        self.assertEqual(
            {getattr(getattr(c, "func", None), "__self__", None) for c in pending},
            {channel},
        )
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(channel._responseAt)
        pending = [c for c in h.clock.getDelayedCalls() if c.active()]
        self.assertNotIn(
            channel,
            {getattr(getattr(c, "func", None), "__self__", None) for c in pending},
        )

    def test_responseAndBodyDeadlinesShareTheTimer(self) -> None:
        """
        While a request's body stalls, its body deadline and its exchange's
        response deadline both run on the connection's one timer, and the
        sooner fires at its own time: the response's (504) before a longer
        body timeout, the body's (408) before a longer service timeout.
        """
        post = (
            b"POST /echo/x HTTP/1.1\r\nHost: api.example.com\r\n"
            b"Content-Length: 10\r\n\r\n12345"
        )
        h = Harness([_service(timeout=1.0)], Limits(bodyTimeout=5.0))
        _, transport = h.send(post)
        h.clock.advance(0.99)
        self.assertEqual(transport.value(), b"")
        h.clock.advance(0.01)
        self.assertEqual(_status(transport), 504)
        self.assertEqual(_jsonBody(transport)["code"], "upstream_timeout")

        h = Harness([_service(timeout=10.0)], Limits(bodyTimeout=2.0))
        _, transport = h.send(post)
        h.clock.advance(1.99)
        self.assertEqual(transport.value(), b"")
        h.clock.advance(0.01)
        self.assertEqual(_status(transport), 408)
        self.assertEqual(_jsonBody(transport)["code"], "request_timeout")

    def test_bodyIdleTimeout(self) -> None:
        """
        A body that stalls for the idle timeout is cut: the upstream is
        stopped and the client connection closed without a final chunk.
        """
        h = Harness([_service(idleTimeout=3.0)])
        protocol, transport = h.send(GET)
        response = FakeResponse()
        h.client.calls[0].result.callback(response)
        for _ in range(5):
            h.clock.advance(2.0)
            response.deliver(b"tick")
        self.assertFalse(response.transport.stopped)
        h.clock.advance(3.1)
        self.assertTrue(response.transport.stopped)
        response.end(Failure(ResponseFailed([Failure(CancelledError())])))
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.value().endswith(b"0\r\n\r\n"))
        protocol.connectionLost(Failure(ConnectionDone()))
        [record] = h.records()
        self.assertEqual(record["error"], "body_idle_timeout")

    def test_connectFailureRetriesAnotherEndpoint(self) -> None:
        """
        A refused connection is retried once on another endpoint, and the
        refusing endpoint is backed off.
        """
        h = Harness([_service("service.api.echo", "10.0.0.1:80", "10.0.0.2:80")])
        _, transport = h.send(GET)
        first = h.client.calls[0]
        first.result.errback(ConnectionRefusedError())
        second = h.client.calls[1]
        self.assertNotEqual(first.url, second.url)
        response = FakeResponse(204, length=0)
        second.result.callback(response)
        response.end()
        self.assertEqual(_status(transport), 204)
        refused = [
            s
            for s in h.balancer.states(
                h.registry.services()["service.api.echo"].endpoints
            )
            if s.failures
        ]
        self.assertEqual(len(refused), 1)

    def test_connectFailureTwiceIs502(self) -> None:
        """
        Only one retry: a second refusal is a 502.
        """
        h = Harness([_service("service.api.echo", "10.0.0.1:80", "10.0.0.2:80")])
        _, transport = h.send(GET)
        h.client.calls[0].result.errback(ConnectionRefusedError())
        h.client.calls[1].result.errback(ConnectionRefusedError())
        self.assertEqual(len(h.client.calls), 2)
        self.assertEqual(_status(transport), 502)
        self.assertEqual(_jsonBody(transport)["code"], "upstream_connect_failed")

    def test_dnsFailureIsAConnectFailure(self) -> None:
        """
        An endpoint whose name does not resolve is treated like one that
        refuses connections: retried elsewhere, then 502.
        """
        h = Harness([_service("service.api.echo", "10.0.0.1:80", "10.0.0.2:80")])
        _, transport = h.send(GET)
        h.client.calls[0].result.errback(DNSLookupError("nope"))
        h.client.calls[1].result.errback(DNSLookupError("nope"))
        self.assertEqual(_status(transport), 502)
        self.assertEqual(_jsonBody(transport)["code"], "upstream_connect_failed")

    def test_refusedRouteWithBodyAnsweredAtOnce(self) -> None:
        """
        A request with a body to no route is answered 404 as soon as its
        headers arrive; the body is not read and the connection closes.
        """
        h = Harness([_service()])
        protocol, transport = h.send(
            b"POST /nothing/ HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n"
        )
        self.assertEqual(_status(transport), 404)
        self.assertEqual(_jsonBody(transport)["code"], "route_not_found")
        self.assertTrue(transport.disconnecting)
        protocol.dataReceived(b"x" * 100000)
        self.assertEqual(h.client.calls, [])

    def test_listenerCountsProtocols(self) -> None:
        """
        A listener counts each open connection under the protocol it
        speaks now: HTTP/1.1 until ALPN's h2 switches it to HTTP/2, and
        none once it has closed; the count is the listener's gauge.
        """
        h = Harness([_service()])
        listener = ListenerFactory(h.site, 0, "tcp:30443")
        protocol = listener.buildProtocol(IPv4Address("TCP", "192.0.2.7", 1))
        transport = StringTransport()
        transport.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
        protocol.makeConnection(transport)
        self.assertEqual(listener.protocols(), ["http/1.1"])
        protocol.dataReceived(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        )
        self.assertEqual(listener.protocols(), ["h2"])
        from prometheus_client import generate_latest

        text = generate_latest(h.metrics.registry).decode()
        self.assertIn(
            'monedge_client_connections{listener="tcp:30443",protocol="h2"} 1.0', text
        )
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(listener.protocols(), [])
        self.assertEqual(listener.open, 0)

    def test_refusedHeadHasNoBody(self) -> None:
        """
        A HEAD refused by the channel (malformed headers, a header limit)
        gets the refusal's status and headers, Content-Length included, and
        no body; a GET refused alike gets the JSON body.
        """
        for method, bodied in ((b"HEAD", False), (b"GET", True)):
            h = Harness([_service()], Limits(maxHeaderCount=1))
            _, transport = h.send(
                method + b" /echo/ HTTP/1.1\r\nHost: a\r\nX-Two: 2\r\n\r\n"
            )
            self.assertEqual(_status(transport), 431)
            head, _, body = transport.value().partition(b"\r\n\r\n")
            self.assertIn(b"\r\nContent-Length: ", head)
            self.assertEqual(bool(body), bodied, method)
            self.assertTrue(transport.disconnecting)

    def test_requestLineLimitExact(self) -> None:
        """
        The request-line limit applies on its own even when the header-line
        limit is larger.
        """
        h = Harness([_service()], Limits(maxRequestLine=100, maxHeaderLine=1000))
        _, transport = h.send(
            b"GET /echo/" + b"a" * 100 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        self.assertEqual(_status(transport), 414)
        _, transport = h.send(
            b"GET /echo/ HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 900 + b"\r\n\r\n"
        )
        self.assertEqual(
            h.client.calls[0].headers.getRawHeaders(b"x-big"), [b"b" * 900]
        )

    def test_connectTimeoutIs504(self) -> None:
        """
        A connection that times out on the only endpoint is a 504.
        """
        h = Harness([_service()])
        _, transport = h.send(GET)
        h.client.calls[0].result.errback(TimeoutError())
        self.assertEqual(_status(transport), 504)
        self.assertEqual(_jsonBody(transport)["code"], "upstream_connect_timeout")

    def test_resetBeforeResponseIs502(self) -> None:
        """
        An upstream that drops the connection before answering is a 502,
        and is not retried (its bytes may have been acted on).
        """
        h = Harness([_service("service.api.echo", "10.0.0.1:80", "10.0.0.2:80")])
        _, transport = h.send(
            b"POST /echo/ HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
        )
        h.client.calls[0].result.errback(ResponseFailed([Failure(ConnectionError())]))
        self.assertEqual(len(h.client.calls), 1)
        self.assertEqual(_status(transport), 502)
        self.assertEqual(_jsonBody(transport)["code"], "upstream_reset")

    def test_switchingProtocolsIsNotATunnel(self) -> None:
        """
        A 101 from the upstream to a request that asked for no upgrade is a
        502, and the upstream connection is dropped.
        """
        h = Harness([_service()])
        _, transport = h.send(GET)
        response = FakeResponse(101, Headers({b"upgrade": [b"websocket"]}))
        h.client.calls[0].result.callback(response)
        self.assertTrue(response.transport.stopped)
        self.assertEqual(_status(transport), 502)
        self.assertNotIn(b"101", transport.value().split(b"\r\n")[0])

    def test_resetMidBodyCutsClient(self) -> None:
        """
        An upstream that fails mid-body leaves the client with a response
        that is visibly incomplete: no final chunk, connection closed.
        """
        h = Harness([_service()])
        _, transport = h.send(GET)
        response = FakeResponse()
        h.client.calls[0].result.callback(response)
        response.deliver(b"partial")
        response.end(Failure(ResponseFailed([Failure(ConnectionError())])))
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.value().endswith(b"0\r\n\r\n"))

    def test_clientGoneCancelsUpstream(self) -> None:
        """
        A client that disconnects before the response cancels the upstream
        request; one that disconnects mid-body stops the upstream body.
        """
        h = Harness([_service()])
        protocol, _ = h.send(GET)
        call = h.client.calls[0]
        protocol.connectionLost(Failure(ConnectionError()))
        self.assertTrue(call.cancelled)

        protocol, _ = h.send(GET)
        response = FakeResponse()
        h.client.calls[1].result.callback(response)
        response.deliver(b"some")
        protocol.connectionLost(Failure(ConnectionError()))
        self.assertTrue(response.transport.stopped)
        self.assertEqual([r["status"] for r in h.records()], [499, 499])

    def test_noReadyEndpointIs503(self) -> None:
        """
        No ready endpoint and none serving while terminating is a 503;
        serving terminating endpoints are used when nothing is ready.
        """
        notReady = Endpoint("10.0.0.1", 80, ready=False, serving=False)
        h = Harness([ServiceEntry("service.api.echo", (notReady,))])
        _, transport = h.send(GET)
        self.assertEqual(h.client.calls, [])
        self.assertEqual(_status(transport), 503)
        self.assertEqual(_jsonBody(transport)["code"], "no_ready_endpoint")

        terminating = Endpoint(
            "10.0.0.9", 80, ready=False, serving=True, terminating=True
        )
        h.registry.put(ServiceEntry("service.api.echo", (notReady, terminating)))
        h.send(GET)
        self.assertEqual(h.client.calls[0].url, b"http://10.0.0.9:80/x?q=1")

    def test_registryChangesApplyOnNextRequest(self) -> None:
        """
        A service added to the registry is routable on the next request,
        and one removed is gone on the next request.
        """
        h = Harness([])
        _, transport = h.send(GET)
        self.assertEqual(_status(transport), 404)
        h.registry.put(_service())
        h.send(GET)
        self.assertEqual(len(h.client.calls), 1)
        h.registry.put(_service("service.api.echo", "10.0.0.5:8080"))
        h.send(GET)
        self.assertEqual(h.client.calls[1].url, b"http://10.0.0.5:8080/x?q=1")
        h.registry.remove("service.api.echo")
        _, transport = h.send(GET)
        self.assertEqual(_status(transport), 404)

    def test_departedEndpointsForgotten(self) -> None:
        """
        Once a service leaves the registry, the balancer forgets its idle
        endpoints within a second, so memory follows the registry.
        """
        h = Harness([_service("service.api.echo", "10.0.0.1:80")])
        h.send(GET)
        response = FakeResponse(204, length=0)
        h.client.calls[0].result.callback(response)
        response.end()
        self.assertEqual(len(h.balancer._states), 1)
        h.registry.remove("service.api.echo")
        self.assertEqual(len(h.balancer._states), 1)
        h.clock.advance(1.0)
        self.assertEqual(len(h.balancer._states), 0)

    def test_unexposedServiceIs404(self) -> None:
        """
        A service with expose false is unreachable.
        """
        h = Harness([_service(expose=False)])
        _, transport = h.send(GET)
        self.assertEqual(_status(transport), 404)
        self.assertEqual(h.client.calls, [])

    def test_internalErrorHidesTraceback(self) -> None:
        """
        An unexpected exception is a JSON 500 with no traceback; the
        traceback is logged.
        """
        h = Harness([_service()])

        def explode(*args: object) -> UpstreamCall:
            raise RuntimeError("secret internals")

        h.client.request = explode  # type: ignore[assignment,method-assign]
        _, transport = h.send(GET)
        self.assertEqual(_status(transport), 500)
        self.assertEqual(_jsonBody(transport)["code"], "internal_error")
        self.assertNotIn(b"secret", transport.value())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_chunkedBodyOverLimitIs413(self) -> None:
        """
        A chunked body that grows past max-body-size is refused with 413
        as soon as it does; the upstream request it was streaming to is
        given up, with no byte past the limit sent.
        """
        h = Harness([_service(maxBodySize=10)])
        _, transport = h.send(
            b"POST /echo/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"8\r\n12345678\r\n8\r\n12345678\r\n"
        )
        self.assertEqual(_status(transport), 413)
        self.assertTrue(transport.disconnecting)
        [call] = h.client.calls
        self.assertTrue(call.cancelled)
        self.assertEqual(call.bodyBytes(), b"")

    def test_expectContinueRefusedBody(self) -> None:
        """
        A request with Expect: 100-continue and a Content-Length over the
        limit gets a 413 alone: no 100 Continue after it.
        """
        h = Harness([_service(maxBodySize=10)])
        _, transport = h.send(
            b"POST /echo/ HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
            b"Content-Length: 11\r\n\r\n"
        )
        self.assertEqual(_status(transport), 413)
        self.assertNotIn(b"100 Continue", transport.value())

    def test_expectContinueAccepted(self) -> None:
        """
        Within the limit, the client is told to continue once the upstream
        takes the body (not before), and Expect is not forwarded: monedge
        answers it.
        """
        h = Harness([_service(maxBodySize=10)])
        protocol, transport = h.send(
            b"POST /echo/ HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
            b"Content-Length: 3\r\n\r\n"
        )
        [call] = h.client.calls
        self.assertEqual(transport.value(), b"")
        sink = call.takeBody()
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        protocol.dataReceived(b"abc")
        self.assertEqual(sink.data, [b"abc"])
        self.assertFalse(call.headers.hasHeader(b"expect"))

    def test_requestBodyStreamedUpstream(self) -> None:
        """
        The spooled body goes upstream through a body producer with its
        length.
        """
        h = Harness([_service()])
        h.send(b"POST /echo/ HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
        body = h.client.calls[0].body
        assert body is not None
        self.assertEqual(body.length, 5)

    def test_drainingClosesConnections(self) -> None:
        """
        While draining, responses carry Connection: close.
        """
        h = Harness([_service()])
        h.site.startDraining()
        _, transport = h.send(GET)
        response = FakeResponse(204, length=0)
        h.client.calls[0].result.callback(response)
        response.end()
        self.assertIn(b"Connection: close", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_headerDeadline(self) -> None:
        """
        Headers that do not complete within the header timeout get a 408;
        the clock starts at the connection's first byte.
        """
        h = Harness([_service()], Limits(headerTimeout=10.0))
        protocol, transport = h.connect()
        protocol.dataReceived(b"GET /echo/ HTTP/1.1\r\n")
        h.clock.advance(9.9)
        self.assertEqual(transport.value(), b"")
        h.clock.advance(0.2)
        self.assertEqual(_status(transport), 408)
        self.assertEqual(_jsonBody(transport)["code"], "request_timeout")

    def test_headerDeadlinePerRequest(self) -> None:
        """
        On a keep-alive connection each request gets the full header
        timeout from its own first byte, however the timer is shared.
        """
        h = Harness([_service()], Limits(headerTimeout=10.0))
        protocol, transport = h.connect()
        protocol.dataReceived(GET)
        response = FakeResponse(204, length=0)
        h.client.calls[0].result.callback(response)
        response.end()
        h.clock.advance(9.0)
        protocol.dataReceived(b"GET /echo/ HTTP/1.1\r\n")
        h.clock.advance(9.9)
        self.assertNotIn(b"HTTP/1.1 408 ", transport.value())
        h.clock.advance(0.2)
        self.assertIn(b"HTTP/1.1 408 ", transport.value())

    def test_headerDeadlineBehindSyncAnswer(self) -> None:
        """
        A request whose head is cut short in the same read as a request
        monedge answers at once (a 404) still gets its header deadline:
        408 after the header timeout, not a silent close at keep-alive
        (found by the fuzzer: fuzz/regressions/pipelined-partial-head-deadline).
        """
        h = Harness([_service()], Limits(headerTimeout=10.0, keepAliveTimeout=75.0))
        protocol, transport = h.connect()
        protocol.dataReceived(
            b"GET /nothing/ HTTP/1.1\r\nHost: a\r\n\r\nGET /echo/ HTTP/1.1\r\nHo"
        )
        self.assertIn(b"HTTP/1.1 404 ", transport.value())
        h.clock.advance(9.9)
        self.assertNotIn(b"HTTP/1.1 408 ", transport.value())
        h.clock.advance(0.2)
        self.assertIn(b"HTTP/1.1 408 ", transport.value())

    def test_headerDeadlinePipelined(self) -> None:
        """
        A request pipelined behind one being answered, whether its first
        bytes came with that request or while it was answered, gets the
        full header timeout from the end of that answer, and a 408 once it
        is spent.
        """
        for first, later in [
            (GET + b"GET /echo/ HTTP/1.1\r\nHo", b""),
            (GET, b"GET /e"),
        ]:
            h = Harness([_service()], Limits(headerTimeout=10.0))
            protocol, transport = h.connect()
            protocol.dataReceived(first)
            h.clock.advance(5.0)
            if later:
                protocol.dataReceived(later)
            h.clock.advance(25.0)
            response = FakeResponse(204, length=0)
            h.client.calls[0].result.callback(response)
            response.end()
            h.clock.advance(9.9)
            self.assertNotIn(b"HTTP/1.1 408 ", transport.value())
            h.clock.advance(0.2)
            self.assertIn(b"HTTP/1.1 408 ", transport.value())

    def test_keepAliveIdleFromResponseEnd(self) -> None:
        """
        A connection is closed after the keep-alive timeout of idleness,
        counted from the end of its last response; a slow response does
        not count as idle.
        """
        h = Harness([_service(timeout=600.0)], Limits(keepAliveTimeout=75.0))
        protocol, transport = h.connect()
        protocol.dataReceived(GET)
        h.clock.advance(100)
        self.assertFalse(transport.disconnecting)
        response = FakeResponse(204, length=0)
        h.client.calls[0].result.callback(response)
        response.end()
        h.clock.advance(74)
        self.assertFalse(transport.disconnecting)
        h.clock.advance(2)
        self.assertTrue(transport.disconnecting)

    def test_metrics(self) -> None:
        """
        Requests are counted by service and status class, and upstream
        errors by kind.
        """
        h = Harness([_service()])
        h.send(GET)
        response = FakeResponse(204, length=0)
        h.client.calls[0].result.callback(response)
        response.end()
        h.send(b"GET /nope/ HTTP/1.1\r\nHost: a\r\n\r\n")
        h.send(GET)
        h.client.calls[1].result.errback(ConnectionRefusedError())
        from prometheus_client import generate_latest

        text = generate_latest(h.metrics.registry).decode()
        self.assertIn(
            'monedge_requests_total{code_class="2xx",origin="upstream",'
            'service="service.api.echo"} 1.0',
            text,
        )
        self.assertIn(
            'monedge_requests_total{code_class="5xx",origin="monedge",'
            'service="service.api.echo"} 1.0',
            text,
        )
        self.assertIn(
            'monedge_requests_total{code_class="4xx",origin="monedge",service="-"} 1.0',
            text,
        )
        self.assertIn(
            'monedge_upstream_errors_total{kind="connect_refused",'
            'service="service.api.echo"} 1.0',
            text,
        )
        self.assertIn(
            'monedge_upstream_response_seconds_count{service="service.api.echo"} 1.0',
            text,
        )
        self.assertIn("monedge_registry_services 1.0", text)
        self.assertIn(
            'monedge_requests_in_flight{service="service.api.echo"} 0.0', text
        )


class ClientLeavesTests(SynchronousTestCase):
    """
    A client may leave at any moment: whatever the upstream body then does,
    nothing raises, and the request is logged once, as 499, with its
    request line.
    """

    def test_bodyEndsAfterTheClientLeft(self) -> None:
        """
        An upstream body that ends after its client left (completely, at
        the upstream's close, or cut off) is dropped without an error: the
        relay does not unregister from a channel that is gone.
        """
        for ending in [
            None,
            Failure(PotentialDataLoss()),
            Failure(ResponseFailed([Failure(ConnectionError())])),
        ]:
            h = Harness([_service()])
            protocol, transport = h.send(GET)
            response = FakeResponse()
            h.client.calls[0].result.callback(response)
            response.deliver(b"some")
            written = transport.value()
            protocol.connectionLost(Failure(ConnectionDone()))
            self.assertTrue(response.transport.stopped)
            response.deliver(b"more")
            response.end(ending)
            self.assertEqual(transport.value(), written)
            self.assertEqual(
                [(r["status"], r["method"], r["path"]) for r in h.records()],
                [(499, "GET", "/echo/x?q=1")],
            )

    def test_leavesMidRequest(self) -> None:
        """
        A client that leaves in its request head or body is logged as 499
        with the request line that came: nothing goes upstream for the
        head, and the upstream request the body was streaming to is given
        up.
        """
        h = Harness([_service()])
        protocol, _ = h.send(b"GET /echo/a HTTP/1.1\r\nHost: a\r\nX-Par")
        protocol.connectionLost(Failure(ConnectionDone()))
        protocol, _ = h.send(
            b"POST /echo/b HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\nhalf"
        )
        [call] = h.client.calls
        sink = call.takeBody()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(call.cancelled)
        self.assertEqual(sink.data, [b"half"])
        assert sink.failure is not None
        sink.failure.trap(ConnectionDone)
        self.assertEqual(
            [(r["status"], r["method"], r["path"]) for r in h.records()],
            [(499, "GET", "/echo/a"), (499, "POST", "/echo/b")],
        )


class UpstreamHeadersTooLargeTests(SynchronousTestCase):
    """
    An upstream whose response head is over the limits is a 502 with its
    own code, counted as an upstream error.
    """

    def test_502(self) -> None:
        """
        The upstream client's L{UpstreamHeadersTooLarge} is 502
        C{upstream_headers_too_large}, not retried, and counted with kind
        C{headers_too_large}.
        """
        h = Harness([_service("service.api.echo", "10.0.0.1:80", "10.0.0.2:80")])
        _, transport = h.send(GET)
        h.client.calls[0].result.errback(UpstreamHeadersTooLarge("over"))
        self.assertEqual(len(h.client.calls), 1)
        self.assertEqual(_status(transport), 502)
        self.assertEqual(_jsonBody(transport)["code"], "upstream_headers_too_large")
        self.assertEqual(h.records()[0]["error"], "upstream_headers_too_large")
        from prometheus_client import generate_latest

        text = generate_latest(h.metrics.registry).decode()
        [line] = [
            line
            for line in text.splitlines()
            if line.startswith("monedge_upstream_errors_total{")
        ]
        self.assertIn('kind="headers_too_large"', line)
        self.assertTrue(line.endswith(" 1.0"), line)


class RouteCacheTests(SynchronousTestCase):
    """
    The route cache grows with the registry: no service's route is evicted
    by the traffic of others.
    """

    def test_sizedToRegistry(self) -> None:
        """
        With a floor of 2 routes and a registry of 5 services, once the
        registry change has been taken in, all 5 routes stay cached: each
        is the same leaf on every request.
        """
        names = [f"service.api.s{i}" for i in range(5)]
        h = Harness([_service(names[0])])
        root = h.root
        root._cacheSize = root._cacheLimit = 2
        h.registry.replaceAll([_service(name) for name in names])
        h.clock.advance(1.0)
        first = [root.route(name) for name in names]
        again = [root.route(name) for name in names]
        self.assertEqual([id(leaf) for leaf in first], [id(leaf) for leaf in again])
        self.assertEqual(len(root._cache), 5)
        h.registry.replaceAll([_service(names[0])])
        h.clock.advance(1.0)
        root.route(names[0])
        self.assertEqual(root._cacheLimit, 2)

    def test_floor(self) -> None:
        """
        Below the floor, a smaller registry keeps the floor: the cache is
        bounded by the larger of the two, and evicts the least recently
        used route beyond it.
        """
        h = Harness([_service(f"service.api.s{i}") for i in range(3)])
        root = h.root
        root._cacheSize = root._cacheLimit = 2
        a = root.route("service.api.s0")
        root.route("service.api.s1")
        root.route("service.api.s2")
        self.assertEqual(len(root._cache), 2)
        self.assertIsNot(root.route("service.api.s0"), a)


class RetainTests(SynchronousTestCase):
    """
    Endpoints no service lists are forgotten by a walk over the registry
    spread over reactor turns.
    """

    def test_walkInTurns(self) -> None:
        """
        A second after a registry change, the walk runs, a reactor turn
        per thousand services; a departed endpoint is forgotten at its end,
        and a change during the walk brings another walk after it.
        """
        services = [
            _service(f"service.api.s{i}", f"10.0.{i // 250}.{i % 250}:80")
            for i in range(2500)
        ]
        h = Harness(services)
        balancer = h.balancer
        balancer.states([endpoint("10.0.0.0:80"), endpoint("10.0.0.1:80")])
        root = h.root
        steps: list[bool] = []
        step = root._retainStep

        def counted() -> None:
            # Whether the departed endpoint was still known at this turn.
            steps.append(("http", "10.0.0.0", 80) in balancer._states)
            step()
            if len(steps) == 1:
                # A change while the walk runs.
                h.registry.replaceAll(services[1:2])

        root._retainStep = counted  # type: ignore[method-assign]
        h.registry.replaceAll(services[1:])
        h.clock.advance(1.0)
        # 2,499 services, a thousand a turn, then the 2 states: 3 turns,
        # the departed endpoint forgotten in the last.
        self.assertEqual(steps, [True, True, True])
        self.assertNotIn(("http", "10.0.0.0", 80), balancer._states)
        self.assertIsNone(root._retaining)
        # Another walk, a second later, for the change made during this one.
        balancer.states([endpoint("10.0.0.2:80")])
        h.clock.advance(1.0)
        self.assertEqual(list(balancer._states), [("http", "10.0.0.1", 80)])
