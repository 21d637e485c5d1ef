"""
L{monedge.upstream.streaming}: request bodies that stream from the client
to the upstream with backpressure both ways, on their own and through the
real upstream client over memory transports.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer
from zope.interface.verify import verifyObject

from monedge.upstream.client import FastUpstreamClient, StaleConnection
from monedge.upstream.streaming import (
    BufferBudget,
    BufferFull,
    HeldBody,
    StreamingBody,
)


@implementer(IPushProducer)
class Source:
    """
    A client connection as a body's source: records pauses and resumes.
    """

    def __init__(self) -> None:
        self.paused = False
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.paused = True
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.paused = False
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


class Consumer(StringTransport):
    """
    An upstream connection's transport.
    """


class StreamingBodyTests(SynchronousTestCase):
    """
    The body between its source and its consumer.
    """

    def test_interfaces(self) -> None:
        """
        A streaming body is the upstream client's body producer and a push
        producer; a held body is a body producer.
        """
        body = StreamingBody(10, Source())
        verifyObject(IBodyProducer, body)
        verifyObject(IPushProducer, body)
        verifyObject(IBodyProducer, HeldBody([b"x"]))
        verifyObject(IPushProducer, HeldBody([b"x"]))

    def test_heldUntilStartedThenStreamed(self) -> None:
        """
        What comes before the upstream connection is open is held and
        written first; what comes after is written as it comes; the result
        fires when the body is whole.
        """
        body = StreamingBody(UNKNOWN_LENGTH, Source())
        body.write(b"ab")
        consumer = Consumer()
        done = body.startProducing(consumer)
        self.assertEqual(consumer.value(), b"ab")
        body.write(b"cd")
        self.assertEqual(consumer.value(), b"abcd")
        self.assertNoResult(done)
        body.finish()
        self.successResultOf(done)
        self.assertEqual((body.received, body.sent), (4, 4))

    def test_clientPausedWhileTooMuchWaits(self) -> None:
        """
        The client is paused once more than the high-water mark waits for
        the upstream, and resumed when it has gone.
        """
        source = Source()
        body = StreamingBody(UNKNOWN_LENGTH, source, highWater=4)
        body.write(b"abcd")
        self.assertFalse(source.paused)
        body.write(b"e")
        self.assertTrue(source.paused)
        consumer = Consumer()
        body.startProducing(consumer)
        self.assertEqual(consumer.value(), b"abcde")
        self.assertEqual(source.events, ["pause", "resume"])

    def test_slowUpstreamPausesTheClient(self) -> None:
        """
        When the upstream stops reading, the body holds what comes and
        pauses the client past the high-water mark; when the upstream reads
        again, the body writes what it held and resumes the client.
        """
        source = Source()
        body = StreamingBody(UNKNOWN_LENGTH, source, highWater=4)
        consumer = Consumer()
        body.startProducing(consumer)
        body.pauseProducing()
        body.write(b"abc")
        self.assertEqual((consumer.value(), source.paused), (b"", False))
        body.write(b"def")
        self.assertTrue(source.paused)
        body.resumeProducing()
        self.assertEqual(consumer.value(), b"abcdef")
        self.assertFalse(source.paused)

    def test_finishWaitsForWhatIsHeld(self) -> None:
        """
        A body finished while the upstream is not reading completes only
        once what it held is written.
        """
        body = StreamingBody(3, Source())
        consumer = Consumer()
        done = body.startProducing(consumer)
        body.pauseProducing()
        body.write(b"abc")
        body.finish()
        self.assertNoResult(done)
        body.resumeProducing()
        self.successResultOf(done)
        self.assertEqual(consumer.value(), b"abc")

    def test_clientFails(self) -> None:
        """
        A body the client fails (it left mid-body) fails the upstream
        request's writing, started or not.
        """
        body = StreamingBody(10, Source())
        consumer = Consumer()
        done = body.startProducing(consumer)
        body.write(b"abc")
        body.fail(Failure(ConnectionDone()))
        self.failureResultOf(done, ConnectionDone)
        early = StreamingBody(10, Source())
        early.fail(Failure(ConnectionDone()))
        self.failureResultOf(early.startProducing(Consumer()), ConnectionDone)

    def test_stoppedByTheUpstream(self) -> None:
        """
        An upstream request that ends before the body is written (an early
        answer, a failure, a cancel) stops the body: what comes later is
        dropped, and a paused client is resumed so that it can be read
        (and its connection answered) rather than left hanging.
        """
        source = Source()
        body = StreamingBody(UNKNOWN_LENGTH, source, highWater=2)
        consumer = Consumer()
        done = body.startProducing(consumer)
        body.pauseProducing()
        body.write(b"abc")
        self.assertTrue(source.paused)
        done.cancel()
        self.failureResultOf(done, CancelledError)
        self.assertFalse(source.paused)
        body.write(b"more")
        body.finish()
        self.assertEqual(consumer.value(), b"")

    def test_replayOnlyWhenKeptWhole(self) -> None:
        """
        A body can be produced again only once the client has sent all of
        it, and only if it fits in the bytes kept for a replay.
        """
        small = StreamingBody(UNKNOWN_LENGTH, Source(), replayLimit=5)
        small.write(b"ab")
        self.assertFalse(small.replayable())
        with self.assertRaises(ValueError):
            small.again()
        small.write(b"cde")
        small.finish()
        self.assertTrue(small.replayable())
        again = small.again()
        self.assertEqual(again.length, 5)
        consumer = Consumer()
        self.successResultOf(again.startProducing(consumer))
        self.assertEqual(consumer.value(), b"abcde")
        large = StreamingBody(UNKNOWN_LENGTH, Source(), replayLimit=5)
        large.write(b"abcdef")
        large.finish()
        self.assertFalse(large.replayable())


class BufferingTests(SynchronousTestCase):
    """
    A body held whole before it is sent (a service's request-buffering),
    within a budget shared by the process.
    """

    def test_heldWithinTheBudget(self) -> None:
        """
        Buffering counts what has come and what comes against the budget,
        never pauses the source, and the body is then held whole with its
        length; the budget is given back once it is sent.
        """
        source = Source()
        budget = BufferBudget(100)
        body = StreamingBody(UNKNOWN_LENGTH, source, highWater=4)
        body.write(b"abcdef")
        self.assertTrue(source.paused)
        body.buffer(budget)
        self.assertFalse(source.paused)
        self.assertEqual(budget.held, 6)
        done = body.whenComplete()
        self.assertNoResult(done)
        body.write(b"gh")
        body.finish()
        self.successResultOf(done)
        held = body.held()
        assert held is not None
        self.assertEqual(held.length, 8)
        consumer = Consumer()
        self.successResultOf(held.startProducing(consumer))
        self.assertEqual(consumer.value(), b"abcdefgh")
        body.startProducing(Consumer())
        self.assertEqual(budget.held, 0)

    def test_heldBodyFollowsItsConsumer(self) -> None:
        """
        A held body is written piece by piece, stops while its consumer
        has paused it, goes on when resumed, and can be written again.
        """
        consumer = Consumer()
        held = HeldBody([b"ab", b"cd", b"ef"])
        self.assertEqual(held.length, 6)

        def write(data: bytes) -> None:
            Consumer.write(consumer, data)
            held.pauseProducing()

        consumer.write = write  # type: ignore[method-assign]
        done = held.startProducing(consumer)
        self.assertEqual(consumer.value(), b"ab")
        self.assertNoResult(done)
        held.resumeProducing()
        self.assertEqual(consumer.value(), b"abcd")
        held.resumeProducing()
        self.assertEqual(consumer.value(), b"abcdef")
        self.successResultOf(done)
        again = Consumer()
        self.successResultOf(held.again().startProducing(again))
        self.assertEqual(again.value(), b"abcdef")

    def test_overTheBudget(self) -> None:
        """
        A write that would take the budget past its size fails with
        L{BufferFull}; failing the body gives back what it held.
        """
        budget = BufferBudget(5)
        body = StreamingBody(10, Source())
        body.buffer(budget)
        body.write(b"abc")
        self.assertRaises(BufferFull, body.write, b"def")
        body.fail(Failure(ConnectionDone()))
        self.assertEqual(budget.held, 0)

    def test_startedOnce(self) -> None:
        """
        C{started} is called once, when the upstream starts taking the body
        or when buffering starts, whichever is first.
        """
        calls: list[int] = []
        body = StreamingBody(3, Source())
        body.started = lambda: calls.append(1)
        body.buffer(BufferBudget(10))
        body.startProducing(Consumer())
        self.assertEqual(calls, [1])

    def test_heldOnlyWithoutTrailers(self) -> None:
        """
        A body with trailers is not turned into one with a length: its
        trailers need it chunked.
        """
        body = StreamingBody(UNKNOWN_LENGTH, Source())
        body.write(b"abc")
        body.finish([(b"X-Checksum", b"1")])
        self.assertIsNone(body.held())
        self.assertEqual(list(body.trailers), [(b"X-Checksum", b"1")])


class StreamedRequestTests(SynchronousTestCase):
    """
    Streamed bodies through the real upstream client.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.client = FastUpstreamClient(self.reactor, poolIdle=4.0)

    def connect(self) -> tuple[Any, StringTransport]:
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def send(self, method: bytes, body: StreamingBody | None) -> Any:
        return self.client.request(
            method,
            b"http://10.0.0.1:8080/up",
            Headers({b"host": [b"api.example.com"]}),
            body,
            5.0,
        )

    def test_unknownLengthSentChunked(self) -> None:
        """
        A body whose length is not known (the client sent it chunked) goes
        upstream chunked, each piece as it comes, and ends with the last
        chunk; the response is read as usual.
        """
        body = StreamingBody(UNKNOWN_LENGTH, Source())
        d = self.send(b"POST", body)
        body.write(b"hello ")
        protocol, transport = self.connect()
        self.assertEqual(
            transport.value(),
            b"POST /up HTTP/1.1\r\nHost: api.example.com\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n6\r\nhello \r\n",
        )
        body.write(b"world")
        body.finish()
        self.assertTrue(
            transport.value().endswith(b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n")
        )
        protocol.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d).code, 201)

    def test_bodyIsTheConnectionsProducer(self) -> None:
        """
        While a body is written, it is the upstream connection's producer
        (so the connection pauses it when the upstream stops reading), and
        it stops being so once written; the same holds for a chunked one.
        """
        for length in (3, UNKNOWN_LENGTH):
            body = StreamingBody(length, Source())
            self.send(b"POST", body)
            protocol, transport = self.connect()
            self.assertIs(transport.producer, body)
            self.assertTrue(transport.streaming)
            body.write(b"abc")
            body.finish()
            self.assertIsNone(transport.producer)
            protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")

    def test_knownLengthSentAsIs(self) -> None:
        """
        A body of declared length goes upstream with its Content-Length,
        unframed.
        """
        body = StreamingBody(5, Source())
        self.send(b"PUT", body)
        _, transport = self.connect()
        body.write(b"ab")
        body.write(b"cde")
        body.finish()
        sent = transport.value()
        self.assertIn(b"\r\nContent-Length: 5\r\n", sent)
        self.assertTrue(sent.endswith(b"\r\n\r\nabcde"), sent)

    def stalePut(self, body: StreamingBody) -> tuple[Any, Any]:
        """
        Send a PUT with C{body} on a pooled connection, then close that
        connection before any response: the connection was stale.
        """
        first = self.send(b"GET", None)
        protocol, _ = self.connect()
        protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.successResultOf(first).deliverBody(_Discard())
        put = self.send(b"PUT", body)
        return protocol, put

    def test_smallWholeBodyReplayed(self) -> None:
        """
        An idempotent request whose streamed body the client sent whole,
        within the bytes kept, is sent again on a new connection when its
        pooled connection turns out stale.
        """
        body = StreamingBody(UNKNOWN_LENGTH, Source())
        protocol, put = self.stalePut(body)
        body.write(b"payload")
        body.finish()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.reactor.tcpClients), 2)
        fresh, transport = self.connect()
        sent = transport.value()
        self.assertIn(b"\r\nContent-Length: 7\r\n", sent)
        self.assertTrue(sent.endswith(b"\r\n\r\npayload"), sent)
        fresh.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(put).code, 200)

    def test_unfinishedBodyNotReplayed(self) -> None:
        """
        A body still streaming when the connection turns out stale cannot
        be sent again: the request fails, and no second connection is
        made.
        """
        body = StreamingBody(UNKNOWN_LENGTH, Source())
        protocol, put = self.stalePut(body)
        body.write(b"part")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(put, StaleConnection)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_largeBodyNotReplayed(self) -> None:
        """
        A body larger than the bytes kept for a replay is never sent
        twice, even once whole.
        """
        body = StreamingBody(UNKNOWN_LENGTH, Source(), replayLimit=4)
        protocol, put = self.stalePut(body)
        body.write(b"too large")
        body.finish()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(put, StaleConnection)
        self.assertEqual(len(self.reactor.tcpClients), 1)


class _Discard:
    """
    A body protocol that drops what it is given.
    """

    def makeConnection(self, transport: Any) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        pass


class TrailersUpTests(SynchronousTestCase):
    """
    A chunked body's trailers, through the real upstream client.
    """

    def test_trailersAfterTheLastChunk(self) -> None:
        """
        The trailers a streamed body ends with follow its last chunk.
        """
        reactor = MemoryReactorClock()
        client = FastUpstreamClient(reactor, poolIdle=4.0)
        body = StreamingBody(UNKNOWN_LENGTH, Source())
        client.request(
            b"POST",
            b"http://10.0.0.1:8080/up",
            Headers({b"host": [b"a"]}),
            body,
            5.0,
        )
        host, port, factory, _, _ = reactor.tcpClients[-1]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        body.write(b"abc")
        body.finish([(b"X-Checksum", b"9")])
        self.assertTrue(
            transport.value().endswith(b"3\r\nabc\r\n0\r\nX-Checksum: 9\r\n\r\n")
        )
