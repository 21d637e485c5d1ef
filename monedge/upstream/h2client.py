"""
An HTTP/2 upstream client (issue 16, item 2), on the C{h2} library, for
services whose endpoints speak h2c: cleartext HTTP/2 with prior knowledge.

Its contract, beside L{monedge.upstream.client.FastUpstreamClient}'s:

- a few multiplexed connections per endpoint (pooled by scheme, host, port
  and TLS settings, as the HTTP/1.1 client's): a request goes on an open
  connection with room, and another connection opens once the peer's
  SETTINGS_MAX_CONCURRENT_STREAMS streams are open on each;
- a request's head becomes one HEADERS frame (C{Host} becomes
  C{:authority}; names lower-cased; hop-by-hop fields dropped, C{te:
  trailers} kept); its body is written as DATA within the peer's flow
  control windows, the body producer paused while they are exhausted and
  resumed on WINDOW_UPDATE; its C{trailers} end the stream as a trailing
  HEADERS frame;
- a response is an L{IResponse} like the HTTP/1.1 client's (C{code},
  C{headers}, C{length}, C{monedgeTrailers} filled before the body ends,
  C{monedgeTakeBody}); its reader pausing withholds the stream's window,
  so the upstream stops sending; interim (1xx) heads are skipped;
- cancelling the request, or the reader's C{stopProducing}, resets the
  stream with CANCEL;
- a GOAWAY: streams above its last stream id were not processed and are
  sent again on a new connection (whatever their method, if the body can
  be produced again: L{monedge.upstream.replay.bodyAgain}; else they fail
  with L{ResponseNeverReceived}), streams at or below it finish, and no new
  stream goes on that connection; a REFUSED_STREAM reset is a stream not
  processed too; a request goes out L{MAX_ATTEMPTS} times at most;
- a header block h2 would refuse fails its request before any connection
  is touched;
- failures are those the HTTP/1.1 client has: the connect's own errors,
  L{ResponseNeverReceived} before the response's head, L{ResponseFailed}
  after it;
- a connection with no stream for the pool's idle timeout is closed;
- PING keepalive: while a connection has streams open, once nothing has
  been received on it for the ping interval a PING is sent, and if nothing
  at all (its ACK or any other frame) arrives within the ping timeout the
  connection is taken for dead: it is aborted, its streams fail
  (L{UpstreamPingTimeout}: L{ResponseNeverReceived} before a response's
  head, never sent again, since the upstream may have processed them;
  L{ResponseFailed} after it), and no stream goes on it any more.  A
  connection with no stream is not pinged (as gRPC clients by default:
  C{keepalive_permit_without_calls} is off; the pool's idle timeout closes
  it instead).  Once a PING has gone with no HEADERS or DATA from the
  upstream since, the next waits L{QUIET_PING_INTERVAL} (5 minutes), so
  that gRPC servers' ping policing never closes a quiet call's connection.
  One timer per connection, re-armed lazily: each read only records the
  time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.exceptions import H2Error, TooManyStreamsError
from h2.utilities import (
    HeaderValidationFlags,
    validate_headers,
    validate_outbound_headers,
)
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from monedge.interfaces import IUpstreamClient
from monedge.rules.hpack import (
    KEPT_BLOCK_SIZE,
    KEPT_BLOCKS,
    REQUEST_PSEUDO,
    KeptDecoder,
    LeanEncoder,
)
from monedge.upstream.client import DEFAULT_POOL_IDLE, Key, parseURL
from monedge.upstream.endpoints import EndpointCache, UpstreamTLS, UpstreamTLSError
from monedge.upstream.replay import NotReplayable, bodyAgain

__all__ = ["H2UpstreamClient", "StreamNotProcessed", "UpstreamPingTimeout"]

_RESPONSE_DONE = Failure(ResponseDone())

#: Request fields that belong to one HTTP/1.1 connection, never sent in
#: HTTP/2 (RFC 9113, 8.2.2); C{te} is kept when it is C{trailers}.
_HOP_BY_HOP = frozenset(
    [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"http2-settings",
    ]
)

#: Response fields kept out of C{response.headers}, as the HTTP/1.1
#: client keeps its connection-control fields out.
_RESPONSE_CONTROL = frozenset([b"content-length", b"connection", b"transfer-encoding"])

#: Streams a connection takes before the peer's SETTINGS say how many it
#: allows (RFC 9113, 6.5.2 leaves it unlimited; 100 is what it recommends
#: as the least a peer should allow).
DEFAULT_STREAMS = 100

#: Each stream's receive window: the most of a response body held in
#: monedge while its reader is paused.
STREAM_WINDOW = 262144

#: The connection's receive window, shared by its streams.
CONNECTION_WINDOW = 16 * 1024 * 1024


#: How a request's header block is checked (L{validate_outbound_headers}).
_REQUEST_FLAGS = HeaderValidationFlags(
    is_client=True, is_trailer=False, is_response_header=False, is_push_promise=False
)

#: How a response's head, and its trailer section, are checked
#: (L{validate_headers}, in L{_Connection._checkHeads}).
_RESPONSE_FLAGS = HeaderValidationFlags(
    is_client=True, is_trailer=False, is_response_header=True, is_push_promise=False
)
_TRAILER_FLAGS = HeaderValidationFlags(
    is_client=True, is_trailer=True, is_response_header=False, is_push_promise=False
)
_HEAD_EVENTS = (h2.events.ResponseReceived, h2.events.InformationalResponseReceived)

#: Seconds of silence on a connection with streams open before a PING.
DEFAULT_PING_INTERVAL = 30.0

#: Seconds a PING may go unanswered (no frame at all) before the
#: connection is taken for dead.
DEFAULT_PING_TIMEOUT = 10.0

#: The fewest seconds between PINGs once one has gone since the upstream
#: last sent a HEADERS or DATA frame: gRPC servers' default
#: C{grpc.http2.min_ping_interval_without_data_ms} (grpc-core) and
#: C{EnforcementPolicy.MinTime} (grpc-go), 5 minutes.  Such a server counts
#: a PING closer to the last than that as a strike, unless it has sent data
#: or headers since, and at the third strike closes the connection with
#: GOAWAY C{too_many_pings}, failing every call on it: PINGs every 30 s on
#: a call that is quiet for two minutes would kill it.
QUIET_PING_INTERVAL = 300.0

#: How many times a request goes out at most, when the upstream leaves it
#: unprocessed (GOAWAY, REFUSED_STREAM) each time.
MAX_ATTEMPTS = 3


class UpstreamPingTimeout(Exception):
    """
    The upstream connection answered no PING, nor sent anything else, within
    the ping timeout: it was taken for dead and dropped.
    """


class StreamNotProcessed(Exception):
    """
    The upstream did not process the stream (a GOAWAY's last stream id was
    below it, or it was refused): it may be sent again.
    """


@implementer(IPushProducer)
class _ReadControl:
    """
    What a response body's reader sees as its transport: pausing withholds
    the stream's flow-control window; stopping resets the stream.
    """

    def __init__(self, stream: _Stream) -> None:
        self._stream = stream

    def pauseProducing(self) -> None:
        self._stream.readerPaused = True

    def resumeProducing(self) -> None:
        stream = self._stream
        stream.readerPaused = False
        stream.drain()

    def stopProducing(self) -> None:
        self._stream.cancel()


@implementer(IConsumer)
class _BodyConsumer:
    """
    What a request body writes to: DATA frames on its stream.
    """

    def __init__(self, stream: _Stream) -> None:
        self._stream = stream

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self._stream.writeBody(data)


@implementer(IResponse)
class _Response:
    """
    An upstream HTTP/2 response, its body delivered by L{deliverBody}.
    """

    version = (b"HTTP", 2, 0)
    phrase = b""
    request = None
    previousResponse = None
    monedgeConnection = None

    def __init__(
        self, stream: _Stream, code: int, headers: Headers, length: int | object
    ) -> None:
        self._stream = stream
        self.code = code
        self.headers = headers
        self.length = length
        #: The response's trailing fields, complete once its body has ended.
        self.monedgeTrailers: list[tuple[bytes, bytes]] = []

    def deliverBody(self, protocol: Any) -> None:
        self._stream.deliver(protocol)

    def monedgeTakeBody(self) -> bytes | None:
        """
        The whole body at once if it has already arrived and nobody reads
        it yet; else L{None}.
        """
        return self._stream.takeBody()

    def setPreviousResponse(self, response: IResponse) -> None:
        pass


class _Stream:
    """
    One request and its response: queued, then on a connection's stream.
    """

    def __init__(
        self,
        client: H2UpstreamClient,
        key: Key,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: IBodyProducer | None,
        connectTimeout: float,
    ) -> None:
        self.client = client
        self.key = key
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        self.connectTimeout = connectTimeout
        self.result: Deferred[IResponse] | None = Deferred(self._cancelled)
        self.connection: _H2Connection | None = None
        self.streamId: int | None = None
        self.response: _Response | None = None
        self.protocol: Any = None
        self.readerPaused = False
        self._buffered: list[bytes] = []
        #: Flow-controlled bytes received and not yet acknowledged.
        self._unacked = 0
        self.complete = False
        self._failure: Failure | None = None
        #: Body bytes waiting for window.
        self._outbound: list[bytes] = []
        self._bodyPaused = False
        self._bodyWriting: Deferred[None] | None = None
        self._bodyDone = False
        self._bodyStarted = False
        self.localEnded = False
        self.finished = False
        #: How many times the request was sent, or queued to be.
        self.attempts = 1

    # The request

    def _cancelled(self, d: Deferred[IResponse]) -> None:
        self.result = None
        self.cancel()

    def cancel(self) -> None:
        """
        The request is not wanted any more: reset its stream with CANCEL.
        """
        if self.finished:
            return
        self._stopBody()
        connection = self.connection
        if connection is not None:
            connection.resetStream(self, ErrorCodes.CANCEL)
        # What it held goes, and its share of the connection's window
        # comes back.
        self._buffered = []
        self._ack()
        self._finish()
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            # As the HTTP/1.1 client's reader learns of its aborted body.
            protocol.connectionLost(
                Failure(ResponseFailed([Failure(CancelledError())]))
            )

    def start(self, connection: _H2Connection, streamId: int) -> None:
        """
        Send the request's head, then its body, on stream C{streamId}.
        """
        self.connection = connection
        self.streamId = streamId
        endStream = self.body is None
        connection.sendHeaders(streamId, self.headers, endStream)
        if endStream:
            self.localEnded = True
            return
        body = self.body
        assert body is not None
        self._bodyStarted = True
        writing = body.startProducing(_BodyConsumer(self))
        self._bodyWriting = writing
        writing.addBoth(self._bodyWritten)

    def _bodyWritten(self, result: object) -> None:
        self._bodyWriting = None
        if isinstance(result, Failure):
            if not result.check(CancelledError) and not self.finished:
                self._fail(ResponseNeverReceived([result]))
                self.cancel()
            return
        self._bodyDone = True
        self.flush()

    def writeBody(self, data: bytes) -> None:
        if self.finished or self.localEnded or not data:
            return
        self._outbound.append(data)
        connection = self.connection
        if connection is not None:
            # Framed at the end of the reactor turn: if the body ends in
            # the same turn (a body held whole, or its last bytes and its
            # end in one read), its last DATA frame carries END_STREAM.
            connection.flushSoon(self)

    def flush(self) -> None:
        """
        Send what of the body the windows allow; pause the body while they
        are exhausted, resume it once what waited has gone.
        """
        connection = self.connection
        if connection is None or self.finished or self.localEnded:
            return
        outbound = self._outbound
        # The last DATA frame carries END_STREAM when no trailers follow.
        endsWithData = self._bodyDone and not getattr(self.body, "trailers", ())
        while outbound:
            last = endsWithData and len(outbound) == 1
            chunk = outbound[0]
            sent = connection.sendData(self, chunk, last)
            if sent < len(chunk):
                outbound[0] = chunk[sent:]
                break
            outbound.pop(0)
            if last:
                self.localEnded = True
                return
        body = self.body
        if outbound:
            if not self._bodyPaused and body is not None:
                self._bodyPaused = True
                body.pauseProducing()
            return
        if self._bodyPaused and body is not None:
            self._bodyPaused = False
            body.resumeProducing()
        if self._bodyDone and not self._outbound and not self.localEnded:
            self.localEnded = True
            trailers = [
                (name.lower(), value) for name, value in getattr(body, "trailers", ())
            ]
            connection.endStream(self, trailers)

    def _stopBody(self) -> None:
        writing, self._bodyWriting = self._bodyWriting, None
        self._outbound = []
        if writing is not None and not writing.called:
            writing.cancel()

    # The response

    def gotResponse(
        self, code: int, headers: Headers, length: int | object, ended: bool = False
    ) -> None:
        response = self.response = _Response(self, code, headers, length)
        if ended:
            self.ended()
        result, self.result = self.result, None
        if result is not None:
            result.callback(response)

    def gotData(self, data: bytes, flowLength: int) -> None:
        self._unacked += flowLength
        if self.protocol is not None and not self.readerPaused and not self._buffered:
            self._ack()
            self.protocol.dataReceived(data)
            return
        self._buffered.append(data)

    def gotTrailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        response = self.response
        if response is not None:
            response.monedgeTrailers.extend(
                (name, value) for name, value in trailers if not name.startswith(b":")
            )

    def ended(self) -> None:
        """
        The upstream ended the stream.
        """
        self.complete = True
        if not self.localEnded:
            # An answer before the whole request: send no more of it.
            self._stopBody()
            self.localEnded = True
            connection = self.connection
            if connection is not None:
                connection.resetStream(self, ErrorCodes.NO_ERROR)
        self.drain()

    def deliver(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(_ReadControl(self))
        self.drain()

    def drain(self) -> None:
        """
        Hand the reader what waited while it was paused or absent, give
        the window back, and end the body if it has ended.
        """
        while self._buffered and self.protocol is not None and not self.readerPaused:
            self.protocol.dataReceived(self._buffered.pop(0))
        if self._buffered or self.readerPaused:
            return
        self._ack()
        protocol = self.protocol
        if protocol is None:
            return
        if self._failure is not None:
            self.protocol = None
            protocol.connectionLost(self._failure)
            return
        if self.complete:
            self.protocol = None
            self._finish()
            protocol.connectionLost(_RESPONSE_DONE)

    def takeBody(self) -> bytes | None:
        if not self.complete or self.protocol is not None or self._failure is not None:
            return None
        body = b"".join(self._buffered)
        self._buffered = []
        self._ack()
        self._finish()
        return body

    def _ack(self) -> None:
        unacked, self._unacked = self._unacked, 0
        connection = self.connection
        if unacked and connection is not None:
            # Given back to the connection's window even once the stream
            # has closed.
            connection.acknowledge(self, unacked)

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            connection = self.connection
            if connection is not None:
                connection.streamDone(self)

    def _fail(self, error: Exception) -> None:
        result, self.result = self.result, None
        if result is not None:
            result.errback(Failure(error))
            return
        failure = Failure(error)
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.connectionLost(failure)
        elif self.response is not None and not self.complete:
            self._failure = failure

    def lost(self, error: Exception) -> None:
        """
        The stream was reset or its connection went: fail the request, or
        its body.
        """
        if self.finished:
            return
        self._stopBody()
        self.finished = True
        if self.result is not None:
            self._fail(ResponseNeverReceived([Failure(error)]))
        elif not self.complete:
            self._fail(ResponseFailed([Failure(error)]))

    def notProcessed(self) -> None:
        """
        The upstream did not process the stream: send it again on another
        connection, if its body can be produced again.
        """
        if self.finished:
            return
        self.attempts += 1
        if self.result is None or self.attempts > MAX_ATTEMPTS:
            # A response came after all, or the upstream refuses it again
            # and again: it fails.
            self.lost(StreamNotProcessed())
            return
        body = self.body
        if self._bodyStarted:
            try:
                body = bodyAgain(body)
            except NotReplayable:
                self.lost(StreamNotProcessed())
                return
        self._stopBody()
        self.body = body
        self.connection = None
        self.streamId = None
        self.localEnded = False
        self._bodyDone = False
        self._bodyPaused = False
        self._bodyStarted = False
        self.client._submit(self)


#: What an upstream sends that resets gRPC servers' PING strikes.
_DATA_OR_HEADERS = (
    h2.events.ResponseReceived,
    h2.events.InformationalResponseReceived,
    h2.events.DataReceived,
    h2.events.TrailersReceived,
)


class _ClientConnection(h2.connection.H2Connection):
    """
    h2's connection, which closes itself on a GOAWAY it receives: the
    streams at or below the GOAWAY's last stream id must still finish
    (RFC 9113, 6.8), so it stays open (no new stream is started on it:
    L{_H2Connection.goingAway}).
    """

    def _receive_goaway_frame(self, frame: Any) -> Any:
        state = self.state_machine.state
        result = super()._receive_goaway_frame(frame)
        if state != ConnectionState.CLOSED:
            self.state_machine.state = state
        return result


class _H2Connection(Protocol):
    """
    One HTTP/2 connection to an upstream endpoint, carrying many streams.
    """

    _log = Logger()

    def __init__(self, client: H2UpstreamClient, key: Key) -> None:
        self.client = client
        self.key = key
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            # Checked as they are encoded (LeanEncoder).
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            # Checked here (_checkHeads), the last few remembered.
            validate_inbound_headers=False,
        )
        self.h2 = _ClientConnection(config=config)
        self.h2.encoder = LeanEncoder(REQUEST_PSEUDO)
        decoder = KeptDecoder()
        decoder.max_header_list_size = self.h2.decoder.max_header_list_size
        self.h2.decoder = decoder
        #: The last few response heads and trailer sections checked, by
        #: their kind and fields.
        self._checked: set[tuple[bool, tuple[Any, ...]]] = set()
        self.streams: dict[int, _Stream] = {}
        self.queued: list[_Stream] = []
        self.connected = False
        self.goingAway = False
        self.settingsReceived = False
        self._idleCall: IDelayedCall | None = None
        #: Streams with body bytes written since the last flush, and the
        #: call that flushes them at the end of the reactor turn.
        self._dirty: dict[int, _Stream] = {}
        self._turnCall: IDelayedCall | None = None
        #: The keepalive timer: at most one, running while streams are open.
        self._pingCall: IDelayedCall | None = None
        #: When the keepalive's silence is counted from: the last read, or
        #: when the timer started.
        self._heardAt = 0.0
        #: When the PING in flight went, if one is.
        self._pingSentAt: float | None = None
        #: When the last PING went, and whether one has gone since the
        #: upstream last sent HEADERS or DATA (L{QUIET_PING_INTERVAL}).
        self._lastPingAt = 0.0
        self._pingedSinceData = False

    # Room

    def limit(self) -> int:
        if not self.settingsReceived:
            return DEFAULT_STREAMS
        return int(self.h2.remote_settings.max_concurrent_streams)

    def hasRoom(self) -> bool:
        return (
            not self.goingAway and len(self.streams) + len(self.queued) < self.limit()
        )

    def submit(self, stream: _Stream) -> None:
        self.queued.append(stream)
        self._cancelIdle()
        if self.connected:
            self._startQueued()

    def _startQueued(self) -> None:
        while self.queued and len(self.streams) < self.limit() and not self.goingAway:
            stream = self.queued.pop(0)
            if stream.finished or stream.result is None:
                continue
            streamId = self.h2.get_next_available_stream_id()
            self.streams[streamId] = stream
            try:
                stream.start(self, streamId)
            except TooManyStreamsError:
                # The peer's limit fell below what was open: wait for room.
                del self.streams[streamId]
                stream.connection = stream.streamId = None
                self.queued.insert(0, stream)
                break
            except (H2Error, ValueError) as e:
                # Checked before (H2UpstreamClient.request), so never
                # expected: h2 may have changed its HPACK state for a block
                # it did not send, so the connection cannot go on.
                self.streams.pop(streamId, None)
                stream.lost(e)
                self.abort()
                return
        self._write()
        if self.streams:
            self._armKeepalive()
        if self.goingAway and self.queued:
            queued, self.queued = self.queued, []
            for stream in queued:
                if not stream.finished:
                    stream.notProcessed()

    # Frames out

    def _write(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def sendHeaders(
        self, streamId: int, headers: list[tuple[bytes, bytes]], endStream: bool
    ) -> None:
        self.h2.send_headers(streamId, headers, end_stream=endStream)
        self._write()

    def sendData(self, stream: _Stream, data: bytes, end: bool = False) -> int:
        """
        Send as much of C{data} as the windows allow; how much that was.
        With C{end}, the frame that sends the last of it ends the stream.
        """
        streamId = stream.streamId
        assert streamId is not None
        sent = 0
        try:
            while sent < len(data):
                room = min(
                    self.h2.local_flow_control_window(streamId),
                    self.h2.max_outbound_frame_size,
                )
                if room <= 0:
                    break
                piece = data[sent : sent + room]
                sent += len(piece)
                self.h2.send_data(streamId, piece, end_stream=end and sent == len(data))
        except H2Error:
            # The stream closed under the body: what is left goes nowhere.
            return len(data)
        self._write()
        return sent

    def endStream(self, stream: _Stream, trailers: list[tuple[bytes, bytes]]) -> None:
        streamId = stream.streamId
        assert streamId is not None
        try:
            if trailers:
                self.h2.send_headers(streamId, trailers, end_stream=True)
            else:
                self.h2.end_stream(streamId)
        except H2Error:
            return
        self._write()

    def resetStream(self, stream: _Stream, code: ErrorCodes) -> None:
        streamId = stream.streamId
        if streamId is None:
            if stream in self.queued:
                self.queued.remove(stream)
            return
        try:
            self.h2.reset_stream(streamId, error_code=code)
        except H2Error:
            pass
        self._write()

    def acknowledge(self, stream: _Stream, count: int) -> None:
        streamId = stream.streamId
        if streamId is None:
            return
        try:
            self.h2.acknowledge_received_data(count, streamId)
        except H2Error:
            return
        self._write()

    def streamDone(self, stream: _Stream) -> None:
        if stream.streamId is not None and self.streams.get(stream.streamId) is stream:
            del self.streams[stream.streamId]
        self._startQueued()
        self._checkIdle()

    # The connection

    def connectionMade(self) -> None:
        self.connected = True
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            },
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._startQueued()
        self._checkIdle()

    def dataReceived(self, data: bytes) -> None:
        self._heardAt = self.client.reactor.seconds()
        try:
            events = self.h2.receive_data(data)
            self._checkHeads(events)
        except H2Error as e:
            self._log.warn(
                "upstream {endpoint} broke HTTP/2: {error}; connection dropped",
                endpoint=self.client.describe(self.key),
                error=str(e),
            )
            self._write()
            self.abort()
            return
        for event in events:
            if self._pingedSinceData and isinstance(event, _DATA_OR_HEADERS):
                self._dataAfterPing()
            self._event(event)
            if self.transport is None:
                return
        self._write()

    def _checkHeads(self, events: list[Any]) -> None:
        """
        Check the response heads and trailer sections among C{events} as
        h2's inbound validation would (RFC 9113, 8.2 and 8.3), before any
        event is acted on; a section like one of the last few checked (a
        server answering alike, as gRPC servers do) is not checked again.

        @raise ProtocolError: for a malformed one, which breaks the
            connection as h2's own check would have.
        """
        for event in events:
            if isinstance(event, _HEAD_EVENTS):
                trailer = False
            elif isinstance(event, h2.events.TrailersReceived):
                trailer = True
            else:
                continue
            key = (trailer, tuple(event.headers or ()))
            if key in self._checked:
                continue
            flags = _TRAILER_FLAGS if trailer else _RESPONSE_FLAGS
            size = 0
            for name, value in validate_headers(key[1], flags):
                size += len(name) + len(value)
            if size <= KEPT_BLOCK_SIZE:
                if len(self._checked) >= KEPT_BLOCKS:
                    self._checked.clear()
                self._checked.add(key)

    def _dataAfterPing(self) -> None:
        """
        HEADERS or DATA came after a PING: the next may go after the
        interval again, so a timer waiting out L{QUIET_PING_INTERVAL} is
        brought forward (once per PING at most).
        """
        self._pingedSinceData = False
        call = self._pingCall
        if call is not None and self._pingSentAt is None and call.active():
            call.reset(self.client.pingInterval)

    def _event(self, event: Any) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            self._gotHead(event)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.finished:
                stream.gotData(event.data, event.flow_controlled_length)
            else:
                self.h2.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id
                )
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.gotTrailers(list(event.headers))
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                if stream.response is None:
                    self.streams.pop(event.stream_id, None)
                    stream.lost(ResponseNeverReceived([Failure(ResponseDone())]))
                elif not stream.complete:
                    stream.ended()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                if event.error_code == ErrorCodes.REFUSED_STREAM:
                    stream.notProcessed()
                else:
                    stream.lost(ConnectionAbortedByUpstream(event.error_code))
                self._startQueued()
                self._checkIdle()
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                for stream in list(self.streams.values()):
                    stream.flush()
            else:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.flush()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self.settingsReceived = True
            self._startQueued()
            for stream in list(self.streams.values()):
                stream.flush()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._goAway(event.last_stream_id or 0)

    def _gotHead(self, event: Any) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        code = 0
        headers = Headers()
        length: int | object = UNKNOWN_LENGTH
        for name, value in event.headers:
            if name == b":status":
                code = int(value)
            elif name.startswith(b":"):
                continue
            elif name == b"content-length":
                length = int(value)
                if stream.method == b"HEAD":
                    headers.addRawHeader(name, value)
            elif name not in _RESPONSE_CONTROL:
                headers.addRawHeader(name, value)
        if stream.method == b"HEAD" or code in (204, 304):
            length = 0
        # A head that ends the stream (a trailers-only gRPC answer, a
        # bodiless one) gives a response complete as it is given, so that
        # it goes on as one piece too.
        stream.gotResponse(code, headers, length, event.stream_ended is not None)

    def _goAway(self, lastStreamId: int) -> None:
        self.goingAway = True
        self.client._forget(self)
        for streamId, stream in sorted(self.streams.items()):
            if streamId > lastStreamId:
                del self.streams[streamId]
                stream.notProcessed()
        queued, self.queued = self.queued, []
        for stream in queued:
            stream.notProcessed()
        self._checkIdle()

    def _checkIdle(self) -> None:
        if self.streams or self.queued or self.transport is None:
            self._cancelIdle()
            return
        if self.goingAway:
            self.transport.loseConnection()
            return
        if self._idleCall is None:
            self._idleCall = self.client.reactor.callLater(
                self.client.poolIdle, self.close
            )

    # Keepalive

    def _armKeepalive(self) -> None:
        """
        Start the keepalive timer, unless it runs, is off, or the
        connection is closing.
        """
        interval = self.client.pingInterval
        if interval <= 0 or self._pingCall is not None or self.transport is None:
            return
        now = self.client.reactor.seconds()
        # Silence while no stream was open does not count.
        self._heardAt = max(self._heardAt, now)
        self._pingSentAt = None
        self._pingCall = self.client.reactor.callLater(interval, self._keepalive)

    def _keepalive(self) -> None:
        """
        The keepalive timer: send a PING after the interval's silence, drop
        the connection when one goes unanswered for the timeout, or wait
        for whichever comes next.
        """
        self._pingCall = None
        if self.transport is None or not self.streams:
            # Started again by the next stream.
            return
        client = self.client
        now = client.reactor.seconds()
        sentAt = self._pingSentAt
        if sentAt is not None:
            if self._heardAt < sentAt:
                due = sentAt + client.pingTimeout
                if now >= due:
                    self._dead()
                    return
                self._pingCall = client.reactor.callLater(due - now, self._keepalive)
                return
            # Something came: the connection is alive.
            self._pingSentAt = None
        due = self._heardAt + client.pingInterval
        if self._pingedSinceData:
            due = max(due, self._lastPingAt + QUIET_PING_INTERVAL)
        if now < due:
            self._pingCall = client.reactor.callLater(due - now, self._keepalive)
            return
        try:
            self.h2.ping(b"monedge\0")
        except H2Error:
            return
        self._write()
        self._pingSentAt = self._lastPingAt = now
        self._pingedSinceData = True
        self._pingCall = client.reactor.callLater(client.pingTimeout, self._keepalive)

    def _cancelKeepalive(self) -> None:
        call, self._pingCall = self._pingCall, None
        if call is not None and call.active():
            call.cancel()

    def _dead(self) -> None:
        """
        A PING went unanswered: drop the connection and fail its streams
        (never sent again: the upstream may have processed them); those
        still queued, never sent, go to another connection.
        """
        self._log.warn(
            "upstream {endpoint} answered no PING within {timeout:g}s;"
            " connection dropped",
            endpoint=self.client.describe(self.key),
            timeout=self.client.pingTimeout,
        )
        self.abort()
        streams, self.streams = self.streams, {}
        queued, self.queued = self.queued, []
        for stream in streams.values():
            stream.lost(UpstreamPingTimeout())
        for stream in queued:
            stream.notProcessed()

    def _cancelIdle(self) -> None:
        call, self._idleCall = self._idleCall, None
        if call is not None and call.active():
            call.cancel()

    def close(self) -> None:
        """
        Close the connection: GOAWAY, then the close.
        """
        self._idleCall = None
        self.goingAway = True
        self.client._forget(self)
        if self.transport is not None:
            try:
                self.h2.close_connection()
            except H2Error:
                pass
            self._write()
            self.transport.loseConnection()

    def abort(self) -> None:
        self._cancelKeepalive()
        self.goingAway = True
        self.client._forget(self)
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectFailed(self, reason: Failure) -> None:
        """
        The connection was never made: the queued requests fail with why.
        """
        self.client._forget(self)
        queued, self.queued = self.queued, []
        for stream in queued:
            result, stream.result = stream.result, None
            stream.finished = True
            if result is not None:
                result.errback(reason)

    def flushSoon(self, stream: _Stream) -> None:
        """
        Send what C{stream}'s body wrote at the end of this reactor turn.
        """
        streamId = stream.streamId
        if streamId is None:
            return
        self._dirty[streamId] = stream
        if self._turnCall is None:
            self._turnCall = self.client.reactor.callLater(0, self._endOfTurn)

    def _endOfTurn(self) -> None:
        self._turnCall = None
        dirty, self._dirty = self._dirty, {}
        for stream in dirty.values():
            stream.flush()

    def connectionLost(self, reason: Failure = _RESPONSE_DONE) -> None:
        call, self._turnCall = self._turnCall, None
        if call is not None and call.active():
            call.cancel()
        self._dirty = {}
        self._cancelIdle()
        self._cancelKeepalive()
        self.goingAway = True
        self.connected = False
        self.client._forget(self)
        self.transport = None
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.lost(reason.value)  # type: ignore[arg-type]
        queued, self.queued = self.queued, []
        for stream in queued:
            stream.notProcessed()


class ConnectionAbortedByUpstream(Exception):
    """
    The upstream reset the stream with an error code.
    """


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, connection: _H2Connection) -> None:
        self._connection = connection

    def buildProtocol(self, addr: Any) -> _H2Connection:
        return self._connection


def requestHeaders(
    method: bytes, scheme: bytes, target: bytes, headers: Headers, body: Any
) -> list[tuple[bytes, bytes]]:
    """
    The HTTP/2 header block of a request: pseudo-headers first, then the
    fields lower-cased, hop-by-hop ones dropped (C{te: trailers} kept).
    """
    authority = (headers.getRawHeaders(b"host") or [b""])[0]
    block = [
        (b":method", method),
        (b":scheme", scheme),
        (b":authority", authority),
        (b":path", target),
    ]
    if method == b"CONNECT":
        block = block[:1] + block[2:3]
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if lower in _HOP_BY_HOP:
            continue
        if lower == b"te":
            if any(b"trailers" in value.lower() for value in values):
                block.append((b"te", b"trailers"))
            continue
        for value in values:
            block.append((lower, value))
    length = getattr(body, "length", None) if body is not None else None
    if isinstance(length, int):
        block.append((b"content-length", b"%d" % length))
    return block


EndpointFor = Callable[[bytes, bytes, int, float, "UpstreamTLS | None"], Any]


@implementer(IUpstreamClient)
class H2UpstreamClient:
    """
    Sends requests upstream over HTTP/2 (h2c with prior knowledge).

    @param endpointFor: the endpoint for C{(scheme, host, port, timeout,
        tls)}; by default an L{EndpointCache}'s.
    @param poolIdle: seconds a connection with no stream is kept.
    @param pingInterval: seconds of silence on a connection with streams
        open before a PING is sent; 0 for no keepalive.
    @param pingTimeout: seconds a PING may go unanswered (nothing at all
        received) before the connection is dropped.
    """

    def __init__(
        self,
        reactor: Any,
        poolIdle: float = DEFAULT_POOL_IDLE,
        endpointFor: EndpointFor | None = None,
        pingInterval: float = DEFAULT_PING_INTERVAL,
        pingTimeout: float = DEFAULT_PING_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.poolIdle = poolIdle
        self.pingInterval = pingInterval
        self.pingTimeout = pingTimeout
        if endpointFor is None:
            cache = EndpointCache(reactor)

            def endpointFor(
                scheme: bytes,
                host: bytes,
                port: int,
                timeout: float,
                tls: UpstreamTLS | None,
            ) -> Any:
                return cache.get(scheme, host, port, timeout, tls, alpn=(b"h2",))

        self._endpointFor = endpointFor
        #: Each endpoint's connections, open or opening.
        self._pool: dict[Key, list[_H2Connection]] = {}

    @staticmethod
    def describe(key: Key) -> str:
        host = key[1].decode("ascii", "replace")
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{key[2]}"

    def request(
        self,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: IBodyProducer | None,
        connectTimeout: float,
        tls: UpstreamTLS | None = None,
    ) -> Deferred[IResponse]:
        try:
            scheme, host, port, target = parseURL(url)
        except ValueError as e:
            return fail(e)
        if not headers.hasHeader(b"host"):
            headers.setRawHeaders(b"host", [url.split(b"/")[2]])
        key: Key = (scheme, host, port, tls if scheme == b"https" else None)
        block = requestHeaders(method, scheme, target, headers, body)
        try:
            # As h2 checks it when it sends it, but before any connection's
            # state (HPACK's) is touched.
            for _ in validate_outbound_headers(block, _REQUEST_FLAGS):
                pass
        except (H2Error, ValueError) as e:
            return fail(ResponseNeverReceived([Failure(e)]))
        stream = _Stream(self, key, method, target, block, body, connectTimeout)
        result = stream.result
        assert result is not None
        self._submit(stream)
        return result

    def _submit(self, stream: _Stream) -> None:
        key = stream.key
        for connection in self._pool.get(key, ()):
            if connection.hasRoom():
                connection.submit(stream)
                return
        scheme, host, port, tls = key
        try:
            endpoint = self._endpointFor(scheme, host, port, stream.connectTimeout, tls)
        except UpstreamTLSError as e:
            result, stream.result = stream.result, None
            if result is not None:
                result.errback(Failure(e))
            return
        connection = _H2Connection(self, key)
        self._pool.setdefault(key, []).append(connection)
        connection.submit(stream)
        connecting = endpoint.connect(_ConnectionFactory(connection))
        connecting.addErrback(connection.connectFailed)

    def _forget(self, connection: _H2Connection) -> None:
        connections = self._pool.get(connection.key)
        if connections and connection in connections:
            connections.remove(connection)
            if not connections:
                del self._pool[connection.key]

    def close(self) -> Deferred[None]:
        """
        Close every connection with no stream in flight.
        """
        for connections in list(self._pool.values()):
            for connection in list(connections):
                if not connection.streams and not connection.queued:
                    connection.close()
        return succeed(None)
