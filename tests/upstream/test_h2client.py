"""
Tests for L{monedge.upstream.h2client}: the HTTP/2 upstream client, against
an C{h2} server-side connection as the upstream, over memory transports.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import h2.utilities
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer
from zope.interface.verify import verifyObject

from monedge.interfaces import IUpstreamClient
from monedge.upstream import h2client
from monedge.upstream.h2client import H2UpstreamClient
from monedge.upstream.streaming import HeldBody, StreamingBody


def goAway(lastStreamId: int) -> bytes:
    """
    A GOAWAY frame (written raw: h2's own connection closes itself once it
    sends one, and could then finish no stream).
    """
    return GoAwayFrame(0, last_stream_id=lastStreamId).serialize()


class _Peer:
    """
    The upstream: an h2 server-side connection on one client connection's
    memory transport.
    """

    def __init__(self, protocol: Any, transport: StringTransport) -> None:
        self.protocol = protocol
        self.transport = transport
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=config)
        self.events: list[Any] = []

    def start(self, **settings: int) -> None:
        self.h2.initiate_connection()
        if settings:
            self.h2.update_settings(
                {getattr(h2.settings.SettingCodes, k): v for k, v in settings.items()}
            )
        self.flush()

    def read(self) -> list[Any]:
        """
        Take what the client wrote; the events it makes.
        """
        data = self.transport.value()
        self.transport.clear()
        events = self.h2.receive_data(data)
        self.events.extend(events)
        self.flush()
        return events

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.protocol.dataReceived(data)

    def of(self, kind: type) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]

    def respond(
        self,
        streamId: int,
        body: bytes = b"",
        trailers: list[tuple[bytes, bytes]] | None = None,
        end: bool = True,
    ) -> None:
        self.h2.send_headers(streamId, [(b":status", b"200"), (b"x-up", b"1")])
        if body:
            self.h2.send_data(streamId, body)
        if trailers:
            self.h2.send_headers(streamId, trailers, end_stream=True)
        elif end:
            self.h2.end_stream(streamId)
        self.flush()


class _Endpoint:
    """
    Connects each protocol to a new memory transport.
    """

    def __init__(self) -> None:
        self.peers: list[_Peer] = []
        self.refuse = False

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.refuse:
            return fail(ConnectionRefusedError())
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.peers.append(_Peer(protocol, transport))
        return succeed(protocol)


class _Reader(Protocol):
    """
    A body reader that keeps what it gets.
    """

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.reason: Failure | None = None
        self.trailersAtEnd: list[tuple[bytes, bytes]] | None = None
        self.response: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self.reason = reason
        if self.response is not None:
            self.trailersAtEnd = list(self.response.monedgeTrailers)


@implementer(IPushProducer)
class _Source:
    """
    A client connection a streamed body reads from.
    """

    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class H2UpstreamClientTests(SynchronousTestCase):
    """
    L{H2UpstreamClient} against an h2 upstream on memory transports.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.endpoint = _Endpoint()
        self.client = H2UpstreamClient(
            self.reactor, endpointFor=lambda *args: self.endpoint
        )

    def request(
        self, method: bytes = b"GET", body: Any = None, headers: Headers | None = None
    ) -> Deferred[IResponse]:
        return self.client.request(
            method,
            b"http://10.0.0.1:8080/path?q=1",
            headers if headers is not None else Headers({b"Host": [b"example.com"]}),
            body,
            5.0,
        )

    def test_interface(self) -> None:
        """
        The client provides L{IUpstreamClient}.
        """
        self.assertTrue(verifyObject(IUpstreamClient, self.client))

    def test_requestHead(self) -> None:
        """
        The request's head is one HEADERS frame: the method, target and
        C{Host} as pseudo-headers, names lower-cased, hop-by-hop fields
        dropped and C{te: trailers} kept.  It is encoded without HPACK's
        dynamic table (monedge.rules.hpack): the upstream's stays empty.
        """
        headers = Headers(
            {
                b"Host": [b"example.com"],
                b"X-Thing": [b"a"],
                b"Connection": [b"keep-alive"],
                b"Keep-Alive": [b"5"],
                b"TE": [b"trailers"],
            }
        )
        self.request(headers=headers)
        peer = self.endpoint.peers[0]
        peer.start()
        peer.read()
        [received] = peer.of(h2.events.RequestReceived)
        self.assertEqual(
            received.headers,
            [
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":authority", b"example.com"),
                (b":path", b"/path?q=1"),
                (b"x-thing", b"a"),
                (b"te", b"trailers"),
            ],
        )
        self.assertTrue(received.stream_ended)
        self.assertEqual(len(peer.h2.decoder.header_table.dynamic_entries), 0)

    def test_responseAndTrailers(self) -> None:
        """
        The response's status, headers and body reach the reader, and its
        trailing HEADERS are in C{monedgeTrailers} before the body ends
        with L{ResponseDone}.
        """
        d = self.request()
        peer = self.endpoint.peers[0]
        peer.start()
        peer.read()
        peer.respond(1, b"hello", trailers=[(b"grpc-status", b"0")])
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"x-up"), [b"1"])
        reader = _Reader()
        reader.response = response
        response.deliverBody(reader)
        self.assertEqual(b"".join(reader.data), b"hello")
        assert reader.reason is not None
        self.assertTrue(reader.reason.check(ResponseDone))
        self.assertEqual(reader.trailersAtEnd, [(b"grpc-status", b"0")])

    def test_interimSkipped(self) -> None:
        """
        An interim (1xx) head is skipped: the result is the final response.
        """
        d = self.request()
        peer = self.endpoint.peers[0]
        peer.start()
        peer.read()
        peer.h2.send_headers(1, [(b":status", b"103"), (b"link", b"</a>")])
        peer.flush()
        self.assertNoResult(d)
        peer.respond(1, b"x")
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_multiplexed(self) -> None:
        """
        Concurrent requests to one endpoint share one connection, each on
        its own stream.
        """
        first = self.request()
        second = self.request()
        self.assertEqual(len(self.endpoint.peers), 1)
        peer = self.endpoint.peers[0]
        peer.start()
        peer.read()
        ids = [event.stream_id for event in peer.of(h2.events.RequestReceived)]
        self.assertEqual(ids, [1, 3])
        peer.respond(3, b"b")
        peer.respond(1, b"a")
        self.assertEqual(self.successResultOf(first).code, 200)
        self.assertEqual(self.successResultOf(second).code, 200)

    def test_secondConnectionAtLimit(self) -> None:
        """
        Once a connection has the peer's SETTINGS_MAX_CONCURRENT_STREAMS
        streams open, another request opens another connection.
        """
        self.request()
        peer = self.endpoint.peers[0]
        peer.start(MAX_CONCURRENT_STREAMS=1)
        peer.read()
        self.request()
        self.assertEqual(len(self.endpoint.peers), 2)
        self.assertEqual(len(peer.of(h2.events.RequestReceived)), 1)

    def test_requestBodyFlowControl(self) -> None:
        """
        A request body is written within the peer's window: the body is
        paused when the window is exhausted and resumed on WINDOW_UPDATE;
        its trailers end the stream as a trailing HEADERS frame.
        """
        source = _Source()
        body = StreamingBody(30, source, highWater=5)
        d = self.request(b"POST", body)
        peer = self.endpoint.peers[0]
        peer.start(INITIAL_WINDOW_SIZE=10)
        peer.read()
        for _ in range(3):
            body.write(b"a" * 10)
            # What the body wrote is framed at the end of the reactor turn.
            self.reactor.advance(0)
        peer.read()
        self.assertEqual(
            b"".join(e.data for e in peer.of(h2.events.DataReceived)), b"a" * 10
        )
        self.assertTrue(source.paused)
        body.finish([(b"X-Checksum", b"abc")])
        peer.h2.increment_flow_control_window(30, stream_id=1)
        peer.flush()
        peer.read()
        self.assertEqual(
            b"".join(e.data for e in peer.of(h2.events.DataReceived)), b"a" * 30
        )
        [trailers] = peer.of(h2.events.TrailersReceived)
        self.assertEqual(trailers.headers, [(b"x-checksum", b"abc")])
        self.assertEqual(len(peer.of(h2.events.StreamEnded)), 1)
        [received] = peer.of(h2.events.RequestReceived)
        self.assertIn((b"content-length", b"30"), received.headers)
        peer.respond(1)
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_wholeBodyEndsWithItsData(self) -> None:
        """
        A body already whole when its stream starts goes in one DATA frame
        that carries END_STREAM: no empty DATA frame follows it.
        """
        body = StreamingBody(3, _Source())
        body.write(b"abc")
        body.finish([])
        d = self.request(b"POST", body)
        peer = self.endpoint.peers[0]
        peer.start()
        peer.read()
        [data] = peer.of(h2.events.DataReceived)
        self.assertEqual(data.data, b"abc")
        self.assertIsNotNone(data.stream_ended)
        self.assertEqual(len(peer.of(h2.events.StreamEnded)), 1)
        peer.respond(1)
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_responseBackpressure(self) -> None:
        """
        While the reader is paused, the stream's window is withheld (no
        WINDOW_UPDATE for it) and its data held; on resume the data is
        delivered and the window given back.
        """
        d = self.request()
        peer = self.endpoint.peers[0]
        peer.start()
        peer.read()
        peer.respond(1, end=False)
        response = self.successResultOf(d)
        reader = _Reader()
        response.deliverBody(reader)
        control: Any = reader.transport
        control.pauseProducing()
        for _ in range(12):
            peer.h2.send_data(1, b"z" * 16384)
        peer.flush()
        peer.read()
        self.assertEqual(reader.data, [])
        self.assertFalse(
            [e for e in peer.of(h2.events.WindowUpdated) if e.stream_id == 1]
        )
        control.resumeProducing()
        peer.read()
        self.assertEqual(len(b"".join(reader.data)), 12 * 16384)
        self.assertTrue(
            [e for e in peer.of(h2.events.WindowUpdated) if e.stream_id == 1]
        )

    def test_cancelResets(self) -> None:
        """
        Cancelling the request resets its stream with CANCEL.
        """
        d = self.request()
        peer = self.endpoint.peers[0]
        peer.start()
        peer.read()
        d.cancel()
        self.failureResultOf(d)
        peer.read()
        [reset] = peer.of(h2.events.StreamReset)
        self.assertEqual(reset.error_code, ErrorCodes.CANCEL)

    def test_stopProducingResets(self) -> None:
        """
        The reader's C{stopProducing} resets the stream with CANCEL.
        """
        d = self.request()
        peer = self.endpoint.peers[0]
        peer.start()
        peer.read()
        peer.respond(1, b"x", end=False)
        reader = _Reader()
        self.successResultOf(d).deliverBody(reader)
        control: Any = reader.transport
        control.stopProducing()
        peer.read()
        [reset] = peer.of(h2.events.StreamReset)
        self.assertEqual(reset.error_code, ErrorCodes.CANCEL)

    def test_goAwayRetriesUnprocessed(self) -> None:
        """
        After a GOAWAY, streams above its last stream id are sent again on
        a new connection (even a POST, whose held body can be), and those
        at or below it finish on the old one.
        """
        first = self.request()
        second = self.request(b"POST", HeldBody([b"body"]))
        peer = self.endpoint.peers[0]
        peer.start()
        peer.read()
        peer.protocol.dataReceived(goAway(1))
        self.assertEqual(len(self.endpoint.peers), 2)
        other = self.endpoint.peers[1]
        other.start()
        other.read()
        [again] = other.of(h2.events.RequestReceived)
        self.assertIn((b":method", b"POST"), again.headers)
        self.assertEqual(
            b"".join(e.data for e in other.of(h2.events.DataReceived)), b"body"
        )
        other.respond(1, b"2")
        peer.respond(1, b"1")
        self.assertEqual(self.successResultOf(first).code, 200)
        self.assertEqual(self.successResultOf(second).code, 200)
        self.request()
        self.assertEqual(len(self.endpoint.peers), 2)

    def test_goAwayBodyNotReplayable(self) -> None:
        """
        A stream the upstream did not process, whose streamed body cannot
        be produced again, fails with L{ResponseNeverReceived}.
        """
        body = StreamingBody(100, _Source(), replayLimit=0)
        d = self.request(b"POST", body)
        peer = self.endpoint.peers[0]
        peer.start()
        peer.read()
        body.write(b"x" * 10)
        peer.protocol.dataReceived(goAway(0))
        self.failureResultOf(d, ResponseNeverReceived)

    def test_connectRefused(self) -> None:
        """
        A refused connect fails the request with the connect's own error,
        which the exchange maps to 502.
        """
        self.endpoint.refuse = True
        self.failureResultOf(self.request(), ConnectionRefusedError)

    def test_lostBeforeResponse(self) -> None:
        """
        A connection lost before the response's head fails the request
        with L{ResponseNeverReceived}.
        """
        d = self.request()
        peer = self.endpoint.peers[0]
        peer.start()
        peer.read()
        peer.protocol.connectionLost(Failure(ConnectionRefusedError()))
        self.failureResultOf(d, ResponseNeverReceived)

    def test_idleClosed(self) -> None:
        """
        A connection with no stream for the pool's idle timeout is closed
        with a GOAWAY.
        """
        d = self.request()
        peer = self.endpoint.peers[0]
        peer.start()
        peer.read()
        peer.respond(1, b"x")
        response: Any = self.successResultOf(d)
        self.assertEqual(response.monedgeTakeBody(), b"x")
        self.reactor.advance(self.client.poolIdle + 0.1)
        peer.read()
        self.assertTrue(peer.of(h2.events.ConnectionTerminated))
        self.assertTrue(peer.transport.disconnecting)

    def test_malformedHeadBreaksTheConnection(self) -> None:
        """
        A response head h2 would refuse (here, a connection-specific field)
        drops the connection and fails the request, as h2's own check did.
        """
        d = self.request()
        peer = self.endpoint.peers[0]
        peer.h2.config.validate_outbound_headers = False
        peer.h2.config.normalize_outbound_headers = False
        peer.start()
        peer.read()
        peer.h2.send_headers(1, [(b":status", b"200"), (b"connection", b"close")])
        peer.flush()
        self.assertTrue(peer.transport.disconnecting)
        self.assertNoResult(d)
        peer.protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, ResponseNeverReceived)

    def test_repeatedHeadsCheckedOnce(self) -> None:
        """
        Response heads and trailer sections like one of the last few are
        not checked again; each kind is checked once.
        """
        checks: list[Any] = []
        validate = h2.utilities.validate_headers

        def counting(headers: Any, flags: Any) -> Any:
            checks.append(flags.is_trailer)
            return validate(headers, flags)

        self.patch(h2client, "validate_headers", counting)
        calls = [self.request() for _ in range(3)]
        peer = self.endpoint.peers[0]
        peer.start()
        peer.read()
        for stream in (1, 3, 5):
            peer.respond(stream, b"x", trailers=[(b"grpc-status", b"0")])
        for d in calls:
            response: Any = self.successResultOf(d)
            self.assertEqual(response.monedgeTrailers, [(b"grpc-status", b"0")])
        self.assertEqual(sorted(checks), [False, True])

    def test_goAwayRetriesBounded(self) -> None:
        """
        A request the upstream leaves unprocessed again and again goes out
        three times at most, then fails with L{ResponseNeverReceived}.
        """
        d = self.request()
        for attempt in range(3):
            peer = self.endpoint.peers[attempt]
            peer.start()
            peer.read()
            peer.protocol.dataReceived(goAway(0))
        self.assertEqual(len(self.endpoint.peers), 3)
        self.failureResultOf(d, ResponseNeverReceived)

    def test_refusedStreamRetried(self) -> None:
        """
        A stream reset with REFUSED_STREAM was not processed: it is sent
        again (on the same connection, which still has room).
        """
        d = self.request()
        peer = self.endpoint.peers[0]
        peer.start()
        peer.read()
        peer.h2.reset_stream(1, ErrorCodes.REFUSED_STREAM)
        peer.flush()
        peer.read()
        ids = [event.stream_id for event in peer.of(h2.events.RequestReceived)]
        self.assertEqual(ids, [1, 3])
        peer.respond(3, b"ok")
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_forbiddenHeaderFailsTheRequest(self) -> None:
        """
        A request h2 will not send (here, a header block with an unknown
        pseudo-header, as no request the edge passes has) fails on its own
        with L{ResponseNeverReceived}, before any connection is touched;
        the next request goes as usual.
        """
        real = h2client.requestHeaders
        self.patch(
            h2client,
            "requestHeaders",
            lambda *args: [*real(*args), (b":foo", b"x")],
        )
        self.failureResultOf(self.request(), ResponseNeverReceived)
        self.assertEqual(self.endpoint.peers, [])
        self.patch(h2client, "requestHeaders", real)
        good = self.request()
        peer = self.endpoint.peers[0]
        peer.start()
        peer.read()
        peer.respond(1)
        self.assertEqual(self.successResultOf(good).code, 200)


class KeepaliveTests(SynchronousTestCase):
    """
    The PING keepalive of L{H2UpstreamClient}'s connections, on a memory
    reactor's clock.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.endpoint = _Endpoint()
        self.client = H2UpstreamClient(
            self.reactor,
            endpointFor=lambda *args: self.endpoint,
            pingInterval=30.0,
            pingTimeout=10.0,
        )

    def request(self) -> Deferred[IResponse]:
        return self.client.request(
            b"GET",
            b"http://10.0.0.1:8080/path",
            Headers({b"Host": [b"example.com"]}),
            None,
            5.0,
        )

    def started(self) -> tuple[Deferred[IResponse], _Peer]:
        """
        A request whose stream is open on its connection, its answer
        awaited.
        """
        d = self.request()
        peer = self.endpoint.peers[0]
        peer.start()
        peer.read()
        return d, peer

    def pings(self, peer: _Peer) -> list[Any]:
        peer.read()
        return peer.of(h2.events.PingReceived)

    def test_pingAfterSilence(self) -> None:
        """
        A connection with a stream open, from which nothing has come for
        the ping interval, is sent a PING then, not before.
        """
        d, peer = self.started()
        self.reactor.advance(29.9)
        self.assertEqual(self.pings(peer), [])
        self.reactor.advance(0.2)
        self.assertEqual(len(self.pings(peer)), 1)
        self.assertNoResult(d)

    def test_noPingWhileFramesArrive(self) -> None:
        """
        Frames that keep arriving (here, response body DATA every 20
        seconds) put the PING off: none is sent.
        """
        d, peer = self.started()
        peer.respond(1, end=False)
        reader = _Reader()
        self.successResultOf(d).deliverBody(reader)
        for _ in range(6):
            self.reactor.advance(20)
            peer.h2.send_data(1, b"tick")
            peer.flush()
        self.assertEqual(self.pings(peer), [])
        self.assertEqual(b"".join(reader.data), b"tick" * 6)

    def test_ackKeepsTheConnection(self) -> None:
        """
        A PING answered within the timeout keeps the connection and its
        stream, and the answer, when it comes, is delivered.
        """
        d, peer = self.started()
        self.reactor.advance(30)
        self.assertEqual(len(self.pings(peer)), 1)  # h2 sends the ACK
        self.reactor.advance(10.5)
        self.assertFalse(peer.transport.disconnecting)
        peer.respond(1, b"late")
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_quietPingsSpaced(self) -> None:
        """
        Once a PING has gone with no HEADERS or DATA from the upstream
        since, the next waits five minutes (gRPC servers' default ping
        policing), however short the interval; HEADERS or DATA from the
        upstream make the interval the rule again.
        """
        d, peer = self.started()
        self.reactor.advance(30)
        self.assertEqual(len(self.pings(peer)), 1)
        self.reactor.advance(299.9)
        self.assertEqual(len(self.pings(peer)), 1)
        self.reactor.advance(0.2)
        self.assertEqual(len(self.pings(peer)), 2)
        self.reactor.advance(10)
        self.assertFalse(peer.transport.disconnecting)
        peer.respond(1, end=False)
        self.reactor.advance(30.5)
        self.assertEqual(len(self.pings(peer)), 3)
        self.successResultOf(d)

    def test_noAckDropsTheConnection(self) -> None:
        """
        A PING that nothing answers within the timeout: the connection is
        aborted, the request waiting on it fails with
        L{ResponseNeverReceived} (it is not sent again: it may have been
        processed), and the next request opens a new connection.
        """
        d = self.request()
        peer = self.endpoint.peers[0]
        peer.start()
        peer.read()
        silent = peer.transport
        self.reactor.advance(30)
        self.assertIn(b"monedge\0", silent.value())
        self.reactor.advance(9.9)
        self.assertNoResult(d)
        self.reactor.advance(0.2)
        failure = self.failureResultOf(d, ResponseNeverReceived)
        self.assertTrue(failure.value.reasons[0].check(h2client.UpstreamPingTimeout))
        self.assertTrue(silent.disconnecting)
        self.assertEqual(len(self.endpoint.peers), 1)
        again = self.request()
        self.assertEqual(len(self.endpoint.peers), 2)
        other = self.endpoint.peers[1]
        other.start()
        other.read()
        other.respond(1, b"ok")
        self.assertEqual(self.successResultOf(again).code, 200)
        self.flushLoggedErrors()

    def test_noAckFailsStartedBody(self) -> None:
        """
        A response whose head came but whose body then stalls with the
        connection dead ends with L{ResponseFailed} once the PING goes
        unanswered.
        """
        d, peer = self.started()
        peer.respond(1, b"part", end=False)
        reader = _Reader()
        self.successResultOf(d).deliverBody(reader)
        self.reactor.advance(30)
        self.reactor.advance(10)
        assert reader.reason is not None
        self.assertTrue(reader.reason.check(ResponseFailed))
        self.assertEqual(reader.data, [b"part"])

    def test_idleConnectionNotPinged(self) -> None:
        """
        A connection with no stream open is not pinged (the pool's idle
        timeout closes it), and the silence before a new stream does not
        count towards the next PING.
        """
        self.client.poolIdle = 1000.0
        d, peer = self.started()
        peer.respond(1, b"x")
        response: Any = self.successResultOf(d)
        self.assertEqual(response.monedgeTakeBody(), b"x")
        self.reactor.advance(100)
        self.assertEqual(self.pings(peer), [])
        self.request()
        peer.read()
        self.reactor.advance(29)
        self.assertEqual(self.pings(peer), [])
        self.reactor.advance(1.5)
        self.assertEqual(len(self.pings(peer)), 1)

    def test_disabled(self) -> None:
        """
        With a ping interval of 0, no PING is ever sent and no timer runs.
        """
        self.client.pingInterval = 0
        d, peer = self.started()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.advance(1000)
        self.assertEqual(self.pings(peer), [])
        self.assertNoResult(d)

    def test_oneTimer(self) -> None:
        """
        One keepalive timer per connection, however many streams and
        frames: reads only record the time.
        """
        first, peer = self.started()
        self.request()
        self.request()
        peer.read()
        for _ in range(5):
            peer.h2.ping(b"12345678")
            peer.flush()
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
