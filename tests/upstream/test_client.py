"""
The lean upstream client, over in-memory transports: what it writes, how
it parses, pools, retries and fails.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError, ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import FileBodyProducer, ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface.verify import verifyObject

from monedge.interfaces import IUpstreamClient
from monedge.upstream.client import (
    FastUpstreamClient,
    StaleConnection,
    UpstreamHeadersTooLarge,
    UpstreamProtocolError,
    _Connection,
    parseURL,
)
from monedge.upstream.replay import BufferedBody


class Body(Protocol):
    """
    Collects a response body and how it ended.
    """

    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.reason = reason


class ClientTests(SynchronousTestCase):
    """
    Requests and responses on the wire.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.client = FastUpstreamClient(self.reactor, poolIdle=4.0)

    def connect(self, index: int = -1) -> tuple[Any, StringTransport]:
        """
        Complete the pending connection attempt C{index}.
        """
        host, port, factory, timeout, bind = self.reactor.tcpClients[index]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def request(self, method: bytes = b"GET", body: bytes | None = None) -> Any:
        producer = None
        if body is not None:
            from io import BytesIO

            producer = FileBodyProducer(BytesIO(body))
        return self.client.request(
            method,
            b"http://10.0.0.1:8080/a/b?c=1",
            Headers({b"host": [b"api.example.com"], b"x-multi": [b"1", b"2"]}),
            producer,
            5.0,
        )

    def test_provides(self) -> None:
        """
        The client provides IUpstreamClient.
        """
        verifyObject(IUpstreamClient, self.client)

    def test_parseURL(self) -> None:
        """
        URLs split into scheme, host, port and target, IPv6 included.
        """
        self.assertEqual(
            parseURL(b"http://10.0.0.1:80/x?y"), (b"http", b"10.0.0.1", 80, b"/x?y")
        )
        self.assertEqual(
            parseURL(b"https://[::1]:8443/"), (b"https", b"::1", 8443, b"/")
        )
        self.assertEqual(parseURL(b"http://h"), (b"http", b"h", 80, b"/"))
        with self.assertRaises(ValueError):
            parseURL(b"ftp://h/")

    def test_writesRequestAndParsesResponse(self) -> None:
        """
        The request goes out in one piece with repeated headers kept; the
        response's head becomes an IResponse without connection-control
        headers; the body streams; the connection returns to the pool.
        """
        d = self.request()
        self.assertEqual(self.reactor.tcpClients[0][:2], ("10.0.0.1", 8080))
        protocol, transport = self.connect()
        self.assertEqual(
            transport.value(),
            b"GET /a/b?c=1 HTTP/1.1\r\nHost: api.example.com\r\nX-Multi: 1\r\nX-Multi: 2\r\n\r\n",
        )
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, X-Secret\r\n"
            b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nhel"
        )
        response: IResponse = self.successResultOf(d)
        verifyObject(IResponse, response)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.length, 5)
        self.assertIsNone(response.headers.getRawHeaders(b"content-length"))
        self.assertIsNone(response.headers.getRawHeaders(b"connection"))
        self.assertEqual(
            response.headers.getRawHeaders(b"set-cookie"), [b"a=1", b"b=2"]
        )
        self.assertEqual(response.monedgeConnection, [b"keep-alive, X-Secret"])  # type: ignore[attr-defined]
        body = Body()
        response.deliverBody(body)
        protocol.dataReceived(b"lo")
        self.assertEqual(body.data, b"hello")
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))
        # Reused for the next request: no new connection.
        self.request()
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_headHandedOverAfterTheRead(self) -> None:
        """
        The response head is handed over once the parser has taken the
        whole read it came in: a body that came with it is delivered, and
        ended, as soon as a reader is given, and the socket is never
        paused for it.
        """
        d = self.request()
        protocol, transport = self.connect()
        seen: list[tuple[bytes, bool]] = []

        def gotResponse(response: IResponse) -> None:
            body = Body()
            response.deliverBody(body)
            seen.append((body.data, body.reason is not None))

        d.addCallback(gotResponse)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        self.assertEqual(seen, [(b"hello", True)])
        self.assertEqual(transport.producerState, "producing")

    def test_completeBodyTakenWhole(self) -> None:
        """
        A response whose whole body came with its head can be taken whole:
        the body is returned at once, and the connection goes back to the
        pool for the next request.
        """
        d = self.request()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        response = self.successResultOf(d)
        self.assertEqual(response.monedgeTakeBody(), b"hello")
        self.assertFalse(transport.disconnecting)
        self.request()
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertTrue(transport.value().endswith(b"\r\n\r\n"))
        self.assertEqual(transport.value().count(b"GET /a/b?c=1 HTTP/1.1"), 2)

    def test_partialBodyNotTaken(self) -> None:
        """
        A response whose body is still arriving is not taken: taking gives
        None, and the body streams to a reader as usual.
        """
        d = self.request()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
        response = self.successResultOf(d)
        self.assertIsNone(response.monedgeTakeBody())
        body = Body()
        response.deliverBody(body)
        protocol.dataReceived(b"llo")
        self.assertEqual(body.data, b"hello")
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))

    def test_takenBodyOnAClosingConnection(self) -> None:
        """
        A complete response that said C{Connection: close} is taken whole,
        and its connection is closed rather than pooled.
        """
        d = self.request()
        protocol, transport = self.connect()
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        )
        response = self.successResultOf(d)
        self.assertEqual(response.monedgeTakeBody(), b"ok")
        self.assertTrue(transport.disconnecting)
        self.assertFalse(any(self.client._idle.values()))

    def test_bodyHeldForALateReader(self) -> None:
        """
        A body that came with the head, when nobody reads it yet (a
        response hook is running), is held and the socket paused until a
        reader comes; the reader then gets it all.
        """
        d = self.request()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        response = self.successResultOf(d)
        self.assertEqual(transport.producerState, "paused")
        body = Body()
        response.deliverBody(body)
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(b"cd")
        self.assertEqual(body.data, b"abcd")
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))

    def test_headThenMalformedBodyInOneRead(self) -> None:
        """
        A head followed in the same read by a malformed chunked body is
        handed over first, and the reader then sees the body fail: the
        client gets a visibly cut-off response, as if the two had come in
        separate reads.
        """
        d = self.request()
        protocol, transport = self.connect()
        body = Body()
        d.addCallback(lambda response: response.deliverBody(body))
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        )
        self.successResultOf(d)
        assert body.reason is not None
        self.assertFalse(body.reason.check(ResponseDone))
        self.assertTrue(transport.disconnecting)

    def test_chunkedAndBodyUpstream(self) -> None:
        """
        A request body goes with its Content-Length; a chunked response is
        decoded and has no known length.
        """
        d = self.request(b"POST", b"payload")
        protocol, transport = self.connect()
        self.assertIn(b"Content-Length: 7\r\n", transport.value())
        self.reactor.advance(0)
        protocol.dataReceived(
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        response = self.successResultOf(d)
        self.assertIs(response.length, UNKNOWN_LENGTH)
        body = Body()
        response.deliverBody(body)
        self.assertEqual(body.data, b"abc")
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))

    def test_earlyAnswerDoesNotReuseConnection(self) -> None:
        """
        A response that completes before the request body has been sent is
        relayed, but its connection is closed, not pooled: it is still in
        the middle of a request.
        """
        from twisted.web.iweb import IBodyProducer
        from zope.interface import implementer

        @implementer(IBodyProducer)
        class Slow:
            length = 10

            def startProducing(self, consumer: object) -> Deferred[None]:
                self.done: Deferred[None] = Deferred()
                return self.done

            def pauseProducing(self) -> None:
                pass

            def resumeProducing(self) -> None:
                pass

            def stopProducing(self) -> None:
                pass

        d = self.client.request(
            b"POST", b"http://10.0.0.1:8080/up", Headers({b"host": [b"h"]}), Slow(), 5.0
        )
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        response = self.successResultOf(d)
        self.assertEqual(response.code, 413)
        response.deliverBody(Body())
        self.assertTrue(transport.disconnecting or transport.disconnected)
        self.request()
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_headKeepsContentLength(self) -> None:
        """
        The answer to HEAD has no body, keeps its Content-Length header,
        and the connection is reusable.
        """
        d = self.request(b"HEAD")
        protocol, _ = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        response = self.successResultOf(d)
        self.assertEqual(response.length, 0)
        self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"1000"])
        body = Body()
        response.deliverBody(body)
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))
        self.request()
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_interimResponsesSkipped(self) -> None:
        """
        A 1xx interim response is skipped; the final one is returned.
        """
        d = self.request()
        protocol, _ = self.connect()
        protocol.dataReceived(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
        self.assertNoResult(d)
        protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(self.successResultOf(d).code, 204)

    def test_malformedResponseFails(self) -> None:
        """
        A response llhttp refuses (two different Content-Lengths) fails
        the request and drops the connection.
        """
        d = self.request()
        protocol, transport = self.connect()
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
        )
        self.failureResultOf(d, ResponseFailed)
        self.assertTrue(transport.disconnecting or transport.disconnected)

    def test_closeDelimitedBody(self) -> None:
        """
        A body with no length ends when the connection closes, reported as
        possible data loss, not as a failure.
        """
        d = self.request()
        protocol, _ = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nsome")
        body = Body()
        self.successResultOf(d).deliverBody(body)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(body.data, b"some")
        assert body.reason is not None
        self.assertTrue(body.reason.check(PotentialDataLoss))

    def test_truncatedBodyFails(self) -> None:
        """
        A connection lost before a Content-Length body is complete fails
        the body.
        """
        d = self.request()
        protocol, _ = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        body = Body()
        self.successResultOf(d).deliverBody(body)
        protocol.connectionLost(Failure(ConnectionDone()))
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseFailed))

    def test_staleConnectionRetriedOnce(self) -> None:
        """
        A bodiless GET on a pooled connection that turns out closed is sent
        again, once, on a new connection.
        """
        d = self.request()
        protocol, _ = self.connect()
        protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        body = Body()
        self.successResultOf(d).deliverBody(body)
        d = self.request()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.reactor.tcpClients), 2)
        fresh, _ = self.connect()
        fresh.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_staleErrorForUnsafeRequest(self) -> None:
        """
        A POST on a pooled connection that turns out closed fails with
        StaleConnection rather than being sent twice.
        """
        d = self.request()
        protocol, _ = self.connect()
        protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.successResultOf(d).deliverBody(Body())
        post = self.request(b"POST", b"x")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(post, StaleConnection)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_staleIdempotentBodyResent(self) -> None:
        """
        A PUT whose body monedge holds in full (a L{BufferedBody}) on a
        pooled connection that turns out closed is sent again, body and
        all, on a new connection: PUT is idempotent.
        """
        from io import BytesIO

        d = self.request()
        protocol, _ = self.connect()
        protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.successResultOf(d).deliverBody(Body())
        now = task.Cooperator(scheduler=lambda f: f(), started=True)  # type: ignore[arg-type,return-value]
        body = BufferedBody(BytesIO(b"payload"), now)
        put = self.client.request(
            b"PUT",
            b"http://10.0.0.1:8080/a",
            Headers({b"host": [b"api.example.com"]}),
            body,
            5.0,
        )
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.reactor.tcpClients), 2)
        fresh, transport = self.connect()
        sent = transport.value()
        self.assertTrue(sent.startswith(b"PUT /a HTTP/1.1\r\n"), sent)
        self.assertIn(b"\r\nContent-Length: 7\r\n", sent)
        self.assertTrue(sent.endswith(b"\r\n\r\npayload"), sent)
        fresh.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(put).code, 200)

    def test_bodyPausedWithTheConnection(self) -> None:
        """
        A held body is the connection's producer while it is written: when
        the upstream connection stops taking bytes, the body stops being
        read out, so that no more than a socket buffer of it waits in
        monedge (a 1 GiB upload once grew monedge by as much); it goes on
        when the connection drains, and stops being the producer once
        written.
        """
        from io import BytesIO

        steps: list[Any] = []
        # One read of the body a step.
        cooperator = task.Cooperator(
            terminationPredicateFactory=lambda: lambda: True,
            scheduler=steps.append,  # type: ignore[arg-type]
            started=True,
        )

        def run(count: int) -> None:
            for _ in range(count):
                if steps:
                    steps.pop(0)()

        body = BufferedBody(BytesIO(b"x" * (1 << 20)), cooperator)
        self.client.request(
            b"PUT",
            b"http://10.0.0.1:8080/a",
            Headers({b"host": [b"api.example.com"]}),
            body,
            5.0,
        )
        _, transport = self.connect()
        self.assertIs(transport.producer, body)
        run(2)
        written = len(transport.value())
        self.assertLess(written, 1 << 20)
        producer = transport.producer
        assert producer is not None
        producer.pauseProducing()
        run(10)
        self.assertEqual(len(transport.value()), written)
        producer.resumeProducing()
        while steps:
            run(1)
        self.assertEqual(transport.value().partition(b"\r\n\r\n")[2], b"x" * (1 << 20))
        self.assertIsNone(transport.producer)

    def test_idleConnectionsExpire(self) -> None:
        """
        An idle pooled connection is closed after the pool idle time.
        """
        d = self.request()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.successResultOf(d).deliverBody(Body())
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(4.1)
        self.assertTrue(transport.disconnecting or transport.disconnected)

    def test_cancelAborts(self) -> None:
        """
        Cancelling while waiting for the response aborts the connection;
        cancelling while connecting cancels the connection attempt.
        """
        d = self.request()
        protocol, transport = self.connect()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(transport.disconnecting or transport.disconnected)

        d = self.request()
        d.cancel()
        self.failureResultOf(d, CancelledError, ConnectingCancelledError)

    def test_slowReaderPausesThenPoolResumes(self) -> None:
        """
        A reader that pauses the body pauses the socket; the connection is
        reading again when it serves the next request.
        """
        d = self.request()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\na")
        response = self.successResultOf(d)

        class Pausing(Body):
            def connectionMade(self) -> None:
                assert self.transport is not None
                self.transport.pauseProducing()  # type: ignore[attr-defined]

        body = Pausing()
        response.deliverBody(body)
        self.assertEqual(transport.producerState, "paused")
        protocol.dataReceived(b"b")
        self.request()
        self.assertEqual(transport.producerState, "producing")


def connectPending(
    reactor: MemoryReactorClock, index: int = -1
) -> tuple[Any, StringTransport]:
    """
    Complete C{reactor}'s pending connection attempt C{index}.
    """
    host, port, factory, timeout, bind = reactor.tcpClients[index]
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def requestFrom(client: FastUpstreamClient, method: bytes = b"GET") -> Any:
    """
    A bodiless request to 10.0.0.1:8080 through C{client}.
    """
    return client.request(
        method, b"http://10.0.0.1:8080/a", Headers({b"host": [b"h"]}), None, 5.0
    )


def recordingLogger(events: list[dict[str, Any]]) -> Logger:
    """
    A L{Logger} whose events are appended to C{events}.
    """
    return Logger(observer=cast(ILogObserver, events.append))


class FramingTests(SynchronousTestCase):
    """
    Strict framing: a response carries exactly the body it declares (none
    for HEAD, 1xx, 204 and 304), and a byte after its end is never parsed,
    relayed or handed to the next request: the connection is discarded,
    and a warning names the endpoint.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.client = FastUpstreamClient(self.reactor, poolIdle=4.0)
        self.events: list[dict[str, Any]] = []
        self.patch(_Connection, "_log", recordingLogger(self.events))

    def connect(self) -> tuple[Any, StringTransport]:
        return connectPending(self.reactor)

    def request(self, method: bytes = b"GET") -> Any:
        return requestFrom(self.client, method)

    def warnings(self) -> list[str]:
        """
        The warnings logged, formatted.
        """
        return [
            formatEvent(event)
            for event in self.events
            if event["log_level"] is LogLevel.warn
        ]

    def assertDiscarded(self, transport: StringTransport) -> None:
        """
        The connection was dropped, with one warning naming the endpoint,
        and the next request goes out on a new connection.
        """
        self.assertTrue(transport.disconnecting or transport.disconnected)
        self.assertEqual(
            self.warnings(),
            [
                "upstream 10.0.0.1:8080 sent bytes after the end of a response;"
                " connection discarded"
            ],
        )
        self.assertFalse(any(self.client._idle.values()))
        before = len(self.reactor.tcpClients)
        self.request()
        self.assertEqual(len(self.reactor.tcpClients), before + 1)

    def assertKept(self, transport: StringTransport) -> None:
        """
        The connection went back to the pool, and nothing was logged.
        """
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.warnings(), [])
        self.assertEqual(len(self.client._idle[(b"http", b"10.0.0.1", 8080, None)]), 1)

    def answer(
        self, *reads: bytes, method: bytes = b"GET"
    ) -> tuple[IResponse, Body, StringTransport]:
        """
        Send a request, feed the response in C{reads}, and read its body as
        a reader given the head at once would.
        """
        d = self.request(method)
        protocol, transport = self.connect()
        body = Body()
        d.addCallback(lambda response: response.deliverBody(body) or response)
        for data in reads:
            protocol.dataReceived(data)
        return self.successResultOf(d), body, transport

    def test_exactContentLengthKept(self) -> None:
        """
        A Content-Length body with nothing after it (its head's end split
        across reads) is delivered whole, and the connection pooled.
        """
        response, body, transport = self.answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r", b"\nab", b"\r\n"
        )
        self.assertEqual((response.length, body.data), (4, b"ab\r\n"))
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertKept(transport)

    def test_bytesAfterContentLengthBody(self) -> None:
        """
        Bytes after a Content-Length body in the same read are not relayed:
        the body is exactly as long as declared, and the connection is
        discarded.
        """
        response, body, transport = self.answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA"
        )
        self.assertEqual((response.length, body.data), (2, b"ok"))
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertDiscarded(transport)

    def test_emptyLineAfterContentLengthBody(self) -> None:
        """
        Even a CRLF after a Content-Length body (which llhttp would skip as
        an empty line) discards the connection.
        """
        response, body, transport = self.answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"\r\n"
        )
        self.assertEqual(body.data, b"ok")
        self.assertDiscarded(transport)

    def test_secondResponseInTheSameRead(self) -> None:
        """
        Two responses in one read are never merged: the first is delivered
        with its own length and body, the second never surfaces, and the
        connection is discarded.
        """
        d = self.request()
        protocol, transport = self.connect()
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"
            b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nX-Second: 1\r\n\r\n"
            b"second answer"
        )
        response = self.successResultOf(d)
        self.assertEqual(response.length, 5)
        self.assertIsNone(response.headers.getRawHeaders(b"x-second"))
        self.assertEqual(response.monedgeTakeBody(), b"first")
        self.assertDiscarded(transport)

    def test_secondResponseAfterAChunkedBody(self) -> None:
        """
        A response after a chunked body, in the same read, is not parsed
        into the first: the chunked body ends at its last chunk and the
        connection is discarded.
        """
        response, body, transport = self.answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno"
        )
        self.assertEqual(body.data, b"ok")
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertDiscarded(transport)

    def test_chunkedEndsExactly(self) -> None:
        """
        A chunked body's end split across reads, with a trailer, and
        nothing after it: delivered, and the connection pooled.
        """
        response, body, transport = self.answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n",
            b"0\r\nX-Trailer: 1\r\n\r",
            b"\n",
        )
        self.assertEqual(body.data, b"ok")
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertKept(transport)

    def test_emptyLinesAfterAChunkedBody(self) -> None:
        """
        CR or LF bytes after a chunked body's end, in the same read as its
        end or split from it, discard the connection.
        """
        for reads in [
            (b"0\r\n\r\n\r\n",),
            (b"0\r\n\r", b"\n\n"),
            (b"0\r\nX: 1\r\n\r\n\r",),
        ]:
            self.events.clear()
            response, body, transport = self.answer(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n",
                *reads,
            )
            self.assertEqual(body.data, b"ok")
            self.assertDiscarded(transport)

    def test_bodyOnNoContent(self) -> None:
        """
        204 and 304 responses carry no body, whatever their head says:
        bytes after the head are discarded with the connection.
        """
        for head in [
            b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
        ]:
            self.events.clear()
            d = self.request()
            protocol, transport = self.connect()
            protocol.dataReceived(head + b"hello")
            response = self.successResultOf(d)
            self.assertEqual(response.length, 0)
            self.assertEqual(response.monedgeTakeBody(), b"")
            self.assertDiscarded(transport)

    def test_bodyOnHeadAnswer(self) -> None:
        """
        The answer to HEAD ends with its head: a body sent after it (which
        llhttp, not knowing the method, would read as one) is discarded
        with the connection.
        """
        for head in [
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        ]:
            self.events.clear()
            d = self.request(b"HEAD")
            protocol, transport = self.connect()
            protocol.dataReceived(head + b"5\r\nhello\r\n0\r\n\r\n")
            response = self.successResultOf(d)
            self.assertEqual(response.length, 0)
            self.assertEqual(response.monedgeTakeBody(), b"")
            self.assertDiscarded(transport)

    def test_headAnswerBodyLater(self) -> None:
        """
        A body that follows the answer to HEAD in a later read finds the
        connection idle in the pool: it is discarded, never parsed as the
        next request's response.
        """
        response, body, transport = self.answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", method=b"HEAD"
        )
        self.assertKept(transport)
        protocol = self.client._idle[(b"http", b"10.0.0.1", 8080, None)][0]
        protocol.dataReceived(b"hello")
        self.assertDiscarded(transport)

    def test_bytesWhileIdle(self) -> None:
        """
        Bytes that arrive while a connection sits idle in the pool (even a
        whole response) are never handed to the next request: the
        connection leaves the pool and the next request gets a new one.
        """
        response, body, transport = self.answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )
        self.assertKept(transport)
        protocol = self.client._idle[(b"http", b"10.0.0.1", 8080, None)][0]
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")
        protocol.connectionLost(Failure(ConnectionDone()))
        d = self.request()
        fresh, _ = self.connect()
        fresh.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
        self.assertEqual(self.successResultOf(d).monedgeTakeBody(), b"fresh")
        self.assertEqual(len(self.warnings()), 1)

    def test_bytesWhileTheBodyIsHeld(self) -> None:
        """
        Bytes after a complete response whose body nobody reads yet (a
        response hook is running) discard the connection; the body, when
        read, is the response's own.
        """
        d = self.request()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        response = self.successResultOf(d)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad")
        body = Body()
        response.deliverBody(body)
        self.assertEqual(body.data, b"ok")
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertDiscarded(transport)

    def test_interimThenGarbage(self) -> None:
        """
        An interim response followed by something that is not a response
        fails the request, as a malformed response does.
        """
        d = self.request()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 103 Early Hints\r\n\r\ngarbage\r\n\r\n")
        failure = self.failureResultOf(d, ResponseFailed)
        reasons = cast(ResponseFailed, failure.value).reasons
        self.assertTrue(reasons[0].check(UpstreamProtocolError))
        self.assertTrue(transport.disconnecting)

    def test_interimCarriesNoBody(self) -> None:
        """
        An interim response's Content-Length frames nothing: what follows
        its head is the next response.
        """
        response, body, transport = self.answer(
            b"HTTP/1.1 100 Continue\r\nContent-Length: 3\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )
        self.assertEqual((response.code, body.data), (200, b"ok"))
        self.assertKept(transport)

    def test_emptyLineBeforeStatusLine(self) -> None:
        """
        An empty line before a status line (llhttp would skip it) fails
        the request.
        """
        d = self.request()
        protocol, transport = self.connect()
        protocol.dataReceived(b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        failure = self.failureResultOf(d, ResponseFailed)
        reasons = cast(ResponseFailed, failure.value).reasons
        self.assertTrue(reasons[0].check(UpstreamProtocolError))

    def test_otherCodingIsCloseDelimited(self) -> None:
        """
        A Transfer-Encoding whose last coding is not chunked frames the body
        by the connection's close, as llhttp reads it: the close ends it.
        """
        d = self.request()
        protocol, transport = self.connect()
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"
        )
        response = self.successResultOf(d)
        self.assertIs(response.length, UNKNOWN_LENGTH)
        body = Body()
        response.deliverBody(body)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(body.data, b"0\r\n\r\n")
        assert body.reason is not None
        self.assertTrue(body.reason.check(PotentialDataLoss))

    def test_failureBeforeTheReaderComes(self) -> None:
        """
        A body that fails while nobody reads it yet (a response hook is
        running) fails its reader when it comes, after what had arrived.
        """
        d = self.request()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
        response = self.successResultOf(d)
        protocol.connectionLost(Failure(ConnectionDone()))
        body = Body()
        response.deliverBody(body)
        self.assertEqual(body.data, b"ab")
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseFailed))


#: Responses, each with the method it answers, that every way of cutting
#: them into reads must give the same outcome.
WIRE: list[tuple[bytes, bytes]] = [
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab\r\n"),
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA"),
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\r\n"),
    (
        b"GET",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    ),
    (
        b"GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\nX-T: 1\r\n\r\n",
    ),
    (
        b"GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n\r\n",
    ),
    (
        b"GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
    ),
    (b"GET", b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the close"),
    (b"GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\nabc"),
    (b"GET", b"HTTP/1.1 304 Not Modified\r\n\r\n"),
    (b"GET", b"HTTP/1.1 304 Not Modified\r\n\r\n\r\n"),
    (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
    (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
    (b"HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    # Interim heads: 91 bytes of heads in all, then 110 (over the limit).
    (
        b"GET",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ),
    (
        b"GET",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ),
    (b"GET", b"HTTP/1.1 103 Early Hints\r\n\r\ngarbage\r\n\r\n"),
    (b"GET", b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    (b"GET", b"HTTP/1.1 101 Switching Protocols\r\n\r\nframes"),
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"),
    (
        b"GET",
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"X-%d: v\r\n" % (i,) for i in range(5))
        + b"Content-Length: 0\r\n\r\n",
    ),
    (b"GET", b"HTTP/1.1 200 OK\r\nX: " + b"v" * 120 + b"\r\n\r\n"),
]


class ReadsTests(SynchronousTestCase):
    """
    However an upstream's bytes are cut into reads, the outcome is the
    same: monedge's client parses a read that holds a whole head at once,
    and other reads head by head (see L{_Connection._readWhole}).
    """

    def outcome(self, method: bytes, reads: list[bytes]) -> tuple[object, ...]:
        """
        Send a C{method} request to a client with small head limits, feed
        C{reads} (as a transport would: none after an abort), and describe
        what came of it.
        """
        reactor = MemoryReactorClock()
        client = FastUpstreamClient(reactor, maxHeadersSize=100, maxHeaderCount=5)
        events: list[dict[str, Any]] = []
        self.patch(_Connection, "_log", recordingLogger(events))
        d = requestFrom(client, method)
        protocol, transport = connectPending(reactor)
        connection = protocol._wrappedProtocol
        body = Body()
        seen: list[object] = []

        def arrived(response: IResponse) -> None:
            seen.append((response.code, response.length))
            seen.append(sorted(response.headers.getAllRawHeaders()))
            response.deliverBody(body)

        def failed(reason: Failure) -> None:
            inner = getattr(reason.value, "reasons", None)
            seen.append(type(inner[0].value if inner else reason.value))

        d.addCallbacks(arrived, failed)
        for data in reads:
            if connection.aborted:
                break
            protocol.dataReceived(data)
        if not connection.aborted:
            protocol.connectionLost(Failure(ConnectionDone()))
        reason = body.reason
        return (
            *seen,
            body.data,
            type(reason.value) if reason is not None else None,
            connection.aborted,
            [formatEvent(event) for event in events],
        )

    def test_sameWhateverTheReads(self) -> None:
        """
        Every response in L{WIRE}, in one read, cut in two at every place,
        and byte by byte, has the same outcome.
        """
        for method, wire in WIRE:
            whole = self.outcome(method, [wire])
            cuts = [[wire[:i], wire[i:]] for i in range(1, len(wire))]
            for reads in [*cuts, [wire[i : i + 1] for i in range(len(wire))]]:
                self.assertEqual(self.outcome(method, reads), whole, (wire, reads))


class HeaderLimitTests(SynchronousTestCase):
    """
    Upstream response heads are bounded in bytes and fields, counted as
    they arrive: past either, nothing more is read and the request fails
    with L{UpstreamHeadersTooLarge}.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.client = FastUpstreamClient(
            self.reactor, maxHeadersSize=100, maxHeaderCount=3
        )
        self.events: list[dict[str, Any]] = []
        self.patch(_Connection, "_log", recordingLogger(self.events))

    def connect(self) -> tuple[Any, StringTransport]:
        return connectPending(self.reactor)

    def request(self) -> Any:
        return requestFrom(self.client)

    def test_defaults(self) -> None:
        """
        By default, heads may have 64 KiB and 100 fields.
        """
        client = FastUpstreamClient(self.reactor)
        self.assertEqual((client.maxHeadersSize, client.maxHeaderCount), (65536, 100))

    def test_exactlyAtTheLimit(self) -> None:
        """
        A head of exactly maxHeadersSize bytes (its empty line included)
        and maxHeaderCount fields is read.
        """
        head = b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\nContent-Length: 0\r\nX: "
        head += b"x" * (100 - len(head) - 4) + b"\r\n\r\n"
        self.assertEqual(len(head), 100)
        d = self.request()
        protocol, transport = self.connect()
        protocol.dataReceived(head[:50])
        protocol.dataReceived(head[50:])
        # Four fields: one over the count.
        self.failureResultOf(d, UpstreamHeadersTooLarge)
        head = b"HTTP/1.1 200 OK\r\nA: 1\r\nContent-Length: 0\r\nX: "
        head += b"x" * (100 - len(head) - 4) + b"\r\n\r\n"
        d = self.request()
        protocol, transport = self.connect()
        protocol.dataReceived(head[:50])
        protocol.dataReceived(head[50:])
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_oneByteOver(self) -> None:
        """
        One byte over the limit fails the request and drops the connection,
        with a warning naming the endpoint.
        """
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX: "
        head += b"x" * (101 - len(head) - 4) + b"\r\n\r\n"
        d = self.request()
        protocol, transport = self.connect()
        protocol.dataReceived(head)
        self.failureResultOf(d, UpstreamHeadersTooLarge)
        self.assertTrue(transport.disconnecting)
        [warning] = [formatEvent(e) for e in self.events]
        self.assertEqual(
            warning,
            "upstream 10.0.0.1:8080 sent response heads over 100 bytes;"
            " connection dropped",
        )

    def test_hugeValueStopsReading(self) -> None:
        """
        A single header value that never ends stops the reading as soon as
        the limit is passed: the parser is never given the read that passes
        it, nor anything after.
        """
        d = self.request()
        protocol, transport = self.connect()
        fed: list[int] = []
        connection = protocol._wrappedProtocol
        connection._parser = _Spy(connection._parser.feed_data, fed)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nX-Big: ")
        protocol.dataReceived(b"v" * 60)
        self.assertNoResult(d)
        protocol.dataReceived(b"v" * 60)
        self.failureResultOf(d, UpstreamHeadersTooLarge)
        self.assertEqual(sum(fed), len(b"HTTP/1.1 200 OK\r\nX-Big: ") + 60)
        self.assertTrue(transport.disconnecting)
        protocol.dataReceived(b"v" * 60)
        self.assertEqual(sum(fed), len(b"HTTP/1.1 200 OK\r\nX-Big: ") + 60)

    def test_endlessStatusLine(self) -> None:
        """
        A status line with no end is bounded the same way.
        """
        d = self.request()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 " + b"O" * 200)
        self.failureResultOf(d, UpstreamHeadersTooLarge)
        self.assertTrue(transport.disconnecting)

    def test_interimHeadsCount(self) -> None:
        """
        Interim heads count towards the bytes (an endless stream of 103s
        is bounded), not towards the final head's fields.
        """
        d = self.request()
        protocol, transport = self.connect()
        for _ in range(2):
            protocol.dataReceived(b"HTTP/1.1 103 Early Hints\r\nA: 1\r\nB: 2\r\n\r\n")
        self.assertNoResult(d)
        protocol.dataReceived(b"HTTP/1.1 103 Early Hints\r\n\r\n")
        self.failureResultOf(d, UpstreamHeadersTooLarge)

    def test_trailersKept(self) -> None:
        """
        A chunked body's trailer fields are kept on the response, in order,
        by the time the body has ended (gRPC's status comes there); a body
        without trailers has none.
        """
        d = self.request()
        protocol, _ = self.connect()
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n"
        )
        response = self.successResultOf(d)
        body = Body()
        response.deliverBody(body)
        protocol.dataReceived(
            b"0\r\nGrpc-Status: 0\r\nX-Trace: a\r\nX-Trace: b\r\n\r\n"
        )
        self.assertEqual(body.data, b"ok")
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertEqual(
            response.monedgeTrailers,
            [(b"Grpc-Status", b"0"), (b"X-Trace", b"a"), (b"X-Trace", b"b")],
        )
        d = self.request()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(self.successResultOf(d).monedgeTrailers, [])

    def test_trailersBounded(self) -> None:
        """
        A chunked body's trailer section is bounded like a head: too many
        fields, or too many bytes, cut the body off.
        """
        for trailer in [
            b"A: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n",
            b"A: " + b"a" * 150,
        ]:
            d = self.request()
            protocol, transport = self.connect()
            protocol.dataReceived(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n"
            )
            body = Body()
            self.successResultOf(d).deliverBody(body)
            protocol.dataReceived(b"0\r\n")
            for start in range(0, len(trailer), 60):
                protocol.dataReceived(trailer[start : start + 60])
            self.assertEqual(body.data, b"ok")
            assert body.reason is not None
            self.assertTrue(body.reason.check(ResponseFailed))
            reasons = cast(ResponseFailed, body.reason.value).reasons
            self.assertTrue(reasons[0].check(UpstreamHeadersTooLarge))
            self.assertTrue(transport.disconnecting)


class _Spy:
    """
    A parser stand-in that records how many bytes it was fed.
    """

    def __init__(self, feed: Any, fed: list[int]) -> None:
        self._feed = feed
        self._fed = fed

    def feed_data(self, data: Any) -> None:
        self._fed.append(len(data))
        self._feed(data)


class Side:
    """
    A stand-in tunnel side that records what the upgraded connection
    hands it.
    """

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.readClosedCalls = 0
        self.lostReasons: list[Failure | None] = []

    def received(self, data: bytes) -> None:
        self.data.append(data)

    def readClosed(self) -> None:
        self.readClosedCalls += 1

    def lost(self, reason: Failure | None = None) -> None:
        self.lostReasons.append(reason)


class UpgradeTests(SynchronousTestCase):
    """
    Requests that ask to switch protocols: a connection of their own, and a
    101 handed to a tunnel with every byte that follows it.
    """

    SWITCH = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: abc=\r\n\r\n"
    )

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.client = FastUpstreamClient(self.reactor)

    def upgrade(self) -> tuple[Deferred[IResponse], Any, StringTransport]:
        d = self.client.upgrade(
            b"http://10.0.0.1:8080/chat",
            Headers({b"connection": [b"Upgrade"], b"upgrade": [b"websocket"]}),
            5.0,
        )
        host, port, factory, timeout, bind = self.reactor.tcpClients[-1]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        return d, protocol, transport

    def test_providesUpgrader(self) -> None:
        """
        The client provides IUpstreamUpgrader.
        """
        from monedge.interfaces import IUpstreamUpgrader

        self.assertTrue(verifyObject(IUpstreamUpgrader, self.client))

    def test_sendsOnANewConnection(self) -> None:
        """
        The handshake is a GET with the headers given, on a connection of
        its own even when an idle pooled one exists.
        """
        d, protocol, transport = self.upgrade()
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertTrue(transport.value().startswith(b"GET /chat HTTP/1.1\r\n"))
        self.assertIn(b"\r\nUpgrade: websocket\r\n", transport.value())
        self.assertNoResult(d)

    def test_bytesInTheSameReadAsThe101(self) -> None:
        """
        A tunnel that takes over while the 101 is parsed (as the proxy does,
        synchronously) gets the bytes that came in the same read, and then
        everything after, in order.
        """
        d, protocol, transport = self.upgrade()
        side = Side()
        taken: list[tuple[Any, bytes]] = []

        def takeOver(response: Any) -> None:
            self.assertEqual(response.code, 101)
            self.assertEqual(
                response.monedgeHandshake.getRawHeaders(b"upgrade"), [b"websocket"]
            )
            taken.append(response.monedgeTakeOver(side))

        d.addCallback(takeOver)
        protocol.dataReceived(self.SWITCH + b"frame 1")
        protocol.dataReceived(b"frame 2")
        self.assertEqual(taken, [(transport, b"")])
        self.assertEqual(side.data, [b"frame 1", b"frame 2"])

    def test_bytesBeforeTheTakeOver(self) -> None:
        """
        Bytes that follow the 101 before anyone takes the connection over
        are returned by the take-over, not lost.
        """
        d, protocol, transport = self.upgrade()
        protocol.dataReceived(self.SWITCH + b"early")
        protocol.dataReceived(b" and later")
        response: Any = self.successResultOf(d)
        side = Side()
        self.assertEqual(
            response.monedgeTakeOver(side), (transport, b"early and later")
        )
        protocol.dataReceived(b"then")
        self.assertEqual(side.data, [b"then"])

    def test_closesGoToTheSide(self) -> None:
        """
        After the take-over, a half-close and the connection's loss are the
        tunnel side's.
        """
        d, protocol, transport = self.upgrade()
        protocol.dataReceived(self.SWITCH)
        side = Side()
        response: Any = self.successResultOf(d)
        response.monedgeTakeOver(side)
        protocol.readConnectionLost()
        self.assertEqual(side.readClosedCalls, 1)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(side.lostReasons), 1)

    def test_otherAnswersAreOrdinary(self) -> None:
        """
        A 403 to a handshake is an ordinary response, with no take-over, and
        its connection is closed rather than pooled.
        """
        d, protocol, transport = self.upgrade()
        protocol.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
        response = self.successResultOf(d)
        self.assertEqual(response.code, 403)
        self.assertFalse(hasattr(response, "monedgeTakeOver"))
        body = Body()
        response.deliverBody(body)
        self.assertEqual(body.data, b"no")
        self.assertTrue(transport.disconnecting or transport.disconnected)
