"""
monedge's own HTTP/2 server, on the C{h2} library (issue 15, items 8 and
9): L{H2Channel} serves one connection, L{H2Request} one stream, through
the API the exchange and the resource tree use of a request
(L{monedge.proxy.exchange.ClientRequest}), as L{monedge.edge.http1}'s
request does.

A connection comes here from the protocol switch (L{monedge.edge.switch})
when TLS's ALPN chose C{h2}, or when a cleartext connection starts with
the HTTP/2 client preface (h2c with prior knowledge).

How a stream is read:

  - The whole header block is decoded by h2 (HPACK's state is the
    connection's), then checked here, whatever the order of its fields:
    malformed (h2's own validation, run on the one stream) is a stream
    error (RST_STREAM PROTOCOL_ERROR); then the rules HTTP/1.1 applies to a
    request line and headers: the method and target (Twisted's request-line
    rules), C{--underscore-headers}, the header count and bytes (431), the
    target's length (414), C{:authority} as C{Host} (a C{host} beside it
    that names it again is the same one host; a different one is 400), and
    routing.  An error known from the head is answered at once; a body
    still to come is then stopped with RST_STREAM(NO_ERROR) (RFC 9113,
    8.1).
  - A body streams to the upstream (L{StreamingBody}): each DATA frame is
    acknowledged (its flow-control window given back) only while the
    upstream takes the bytes, so a slow upstream closes the client's
    window, and memory per stream stays at a few buffers.
  - Request trailers are kept (L{H2Request.requestTrailers}); response
    trailers (L{H2Request.setTrailers}) end the stream.

What a connection bounds (docs/security.md): concurrent streams (100,
advertised; more are refused with REFUSED_STREAM), a header block's bytes
(HEADERS and CONTINUATION, counted as the frames arrive), control frames
that cost an answer or nothing (PING, SETTINGS, PRIORITY, empty DATA),
streams the client resets (Rapid Reset), the time to the first HEADERS, a
body's idle time, the time a response waits on a closed window, and the
idle time without a stream.  Connection errors send GOAWAY with their code
and close; stream errors reset the one stream.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Sequence
from typing import IO, Any

import h2.config
import h2.connection
import h2.events
import h2.settings
from h2.errors import ErrorCodes
from h2.exceptions import H2Error, ProtocolError, StreamClosedError
from h2.stream import StreamClosedBy
from h2.utilities import HeaderValidationFlags, validate_headers
from hpack.exceptions import HPACKError, OversizedHeaderListError
from hyperframe.frame import DataFrame, GoAwayFrame, RstStreamFrame
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IPushProducer, ISSLTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES, RESPONSES
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from monedge.edge.base import CLIENT_CLOSED, UNDERSCORE_REFUSED, SharedRequest
from monedge.proxy.exchange import ClientRequest, ProxyExchange
from monedge.record import RequestRecord
from monedge.rules.errors import ProxyError, renderError
from monedge.rules.headers import trailerFields
from monedge.rules.hpack import KEPT_BLOCK_SIZE, KEPT_BLOCKS, KeptDecoder, LeanEncoder
from monedge.rules.limits import Limits
from monedge.twistedseam import (
    HeaderTable,
    canonicalHeaderName,
    parseRequestLine,
    rawHeaderTable,
    sendAtOnce,
)
from monedge.upstream.streaming import StreamingBody

__all__ = [
    "MAX_CONCURRENT_STREAMS",
    "PREFACE",
    "H2Channel",
    "H2Request",
]

_log = Logger()

#: The client preface that starts every HTTP/2 connection (RFC 9113, 3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#: The streams a client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS);
#: more are refused with RST_STREAM(REFUSED_STREAM).
MAX_CONCURRENT_STREAMS = 100

#: The connection's receive window (a stream's stays 65,535 bytes): one
#: stream whose upstream reads slowly leaves room for the others.
CONNECTION_WINDOW = 1 << 20

#: Response bytes held for a stream before its producer is paused.
STREAM_BUFFER = 64 * 1024

#: Bytes a header block (HEADERS and its CONTINUATIONs, as sent, HPACK
#: encoded) may take beyond the header limits before the connection is cut.
HEADER_BLOCK_SLACK = 16 * 1024

#: The window, in seconds, in which control frames and resets are counted.
FLOOD_WINDOW = 10.0

#: Control frames (PING, SETTINGS, PRIORITY, empty DATA) a client may send
#: in L{FLOOD_WINDOW} seconds.
MAX_CONTROL_FRAMES = 1000

#: Streams a client may reset (or have refused) in L{FLOOD_WINDOW}
#: seconds: Rapid Reset (CVE-2023-44487).
MAX_RESETS = 200

#: The flow-control window a stream starts with (the protocol's default,
#: which monedge advertises).
INITIAL_STREAM_WINDOW = 65535

#: Seconds a connection being closed has to go before it is aborted.
CLOSE_TIMEOUT = 5.0

#: The same after a connection error, while nothing more is read: time for
#: the GOAWAY to be sent, not for a client to keep a connection open.
ERROR_CLOSE_TIMEOUT = 1.0

#: Response headers that are HTTP/1.1's connection management, never sent
#: over HTTP/2 (RFC 9113, 8.2.2).
HOP_BY_HOP = frozenset(
    [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
    ]
)

_REQUEST_FLAGS = HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)
_TRAILER_FLAGS = HeaderValidationFlags(
    is_client=False, is_trailer=True, is_response_header=False, is_push_promise=False
)

# Frame types and flags read by the frame scanner (RFC 9113, 6).
_DATA, _HEADERS, _PRIORITY, _SETTINGS, _PING, _CONTINUATION = 0, 1, 2, 4, 6, 9
_END_STREAM, _ACK, _END_HEADERS = 0x1, 0x1, 0x4


class _CompressionError(ProtocolError):
    """
    A header block HPACK cannot decode: COMPRESSION_ERROR (RFC 9113,
    4.3), where h2 says PROTOCOL_ERROR.
    """

    error_code = ErrorCodes.COMPRESSION_ERROR


class _Decoder(KeptDecoder):
    """
    The connection's HPACK decoder (which keeps repeated blocks decoded),
    whose decoding errors are compression errors.
    """

    def decode(self, data: bytes, raw: bool = False) -> Any:
        try:
            return super().decode(data, raw)
        except OversizedHeaderListError:
            # h2 turns it into ENHANCE_YOUR_CALM.
            raise
        except (HPACKError, IndexError, TypeError, UnicodeDecodeError) as e:
            raise _CompressionError(f"cannot decode a header block: {e}") from e


class _ServerConnection(h2.connection.H2Connection):
    """
    h2's connection, which leaves refusing streams past
    SETTINGS_MAX_CONCURRENT_STREAMS to L{H2Channel}: h2 ends the whole
    connection for one (TooManyStreamsError), where RFC 9113 (5.1.2) has the
    one stream refused.
    """

    @property
    def open_inbound_streams(self) -> int:
        # h2 compares this count (and forgets closed streams while counting)
        # before it opens a stream: it never reaches the limit.
        count: int = super().open_inbound_streams
        return min(count, self.local_settings.max_concurrent_streams - 1)

    #: The stream a frame is being read for, if monedge reset it.
    _ignoring: int | None = None

    def _receive_frame(self, frame: Any) -> list[Any]:
        # A frame the client sent before it read a RST_STREAM monedge sent
        # (a body or trailers after an early answer) is ignored (RFC 9113,
        # 5.1), not reset a second time.  h2 still reads it (HPACK state,
        # the connection's window), and the RST_STREAM it would send for it
        # is dropped (_prepare_for_sending).
        streamId = frame.stream_id
        if (
            isinstance(frame, DataFrame)
            and streamId
            and streamId not in self.streams
            and self._stream_closed_by(streamId) is None
        ):
            # DATA on a stream never opened (closed implicitly by a later
            # one): a connection error (RFC 9113, 5.1), rather than a
            # RST_STREAM answered for every such frame.
            raise StreamClosedError(streamId)
        if streamId and self._stream_closed_by(streamId) == (
            StreamClosedBy.SEND_RST_STREAM
        ):
            self._ignoring = streamId
            try:
                events: list[Any] = super()._receive_frame(frame)
            finally:
                self._ignoring = None
            return events
        received: list[Any] = super()._receive_frame(frame)
        return received

    def _prepare_for_sending(self, frames: list[Any]) -> None:
        ignoring = self._ignoring
        if ignoring is not None:
            frames = [
                f
                for f in frames
                if not (isinstance(f, RstStreamFrame) and f.stream_id == ignoring)
            ]
        super()._prepare_for_sending(frames)


class _Refused(Exception):
    """
    A stream's request is refused with an error response.
    """

    def __init__(self, code: str, message: str | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.message = message


@implementer(IPushProducer)
class _BodySource:
    """
    The client side of one stream's request body, paused by its
    L{StreamingBody}: paused, the stream's DATA is no longer acknowledged,
    so the client's window closes; resumed, what was held is acknowledged.
    """

    def __init__(self, request: H2Request) -> None:
        self._request = request

    def pauseProducing(self) -> None:
        self._request._bodyPaused = True

    def resumeProducing(self) -> None:
        request = self._request
        request._bodyPaused = False
        request._acknowledgeHeld()

    def stopProducing(self) -> None:
        self.resumeProducing()


class _StreamTransport:
    """
    What the exchange reaches through C{request.channel.transport}: ending
    it (a client that reads none of a response for C{--send-timeout})
    resets the one stream.
    """

    def __init__(self, request: H2Request) -> None:
        self._request = request

    def abortConnection(self) -> None:
        self._request._reset(ErrorCodes.CANCEL)

    def loseConnection(self) -> None:
        self._request._reset(ErrorCodes.CANCEL)


class _StreamHandle:
    """
    A stream, as C{request.channel}.
    """

    def __init__(self, request: H2Request) -> None:
        self.transport = _StreamTransport(request)


class H2Request(SharedRequest):
    """
    One stream's request on an L{H2Channel}: decided on its header block,
    its body streamed to the upstream, answered through Twisted's request
    API, and accounted for exactly once, however it ends.
    """

    site: Any
    channel: Any
    exchange: ProxyExchange | None = None
    clientproto = b"HTTP/2"

    hasBody = False
    sendsTrailers = True
    content: IO[bytes] | None = None
    code = 200
    code_message = b"OK"
    startedWriting = 0
    finished = 0
    disconnected = False
    sentLength = 0
    producer: Any = None
    _noBody = False
    _accounted = False
    _inFlight = False
    _bodyPaused = False
    #: The body is a stream another timer governs (a gRPC call's).
    _bodyUnwatched = False
    _held = 0
    _trailers: list[tuple[bytes, bytes]] | None = None
    #: The response's END_STREAM (or trailers) is queued.
    _ending = False
    #: Its stream is over for this side: ended, reset, or its connection
    #: gone.
    _closed = False
    #: Reset the stream with NO_ERROR once the response has gone (a body
    #: refused before it was read).
    _resetWhenSent = False
    #: The body's declared length (its content-length), once read.
    _declared: int | None = None

    def __init__(
        self, connection: H2Channel, streamId: int, method: bytes, path: bytes
    ) -> None:
        self._connection = connection
        self.streamId = streamId
        site = self.site = connection.site
        self.channel = _StreamHandle(self)
        self.method = method
        self.uri = path
        self.path = path.partition(b"?")[0]
        self.record = RequestRecord(site.reactor.seconds())
        self.requestHeaders = Headers()
        self.responseHeaders = Headers()
        self.headerTable: HeaderTable = rawHeaderTable(self.requestHeaders)
        #: The request's trailers, if it had any (as L{trailerFields} keeps
        #: them), for the upstream.
        self.requestTrailers: list[tuple[bytes, bytes]] = []
        self.client = connection.getPeer()
        self.host = connection.getHost()
        self._metrics: Any = None
        self._source = _BodySource(self)
        #: Response bytes waiting for the flow-control window.
        self._out: list[bytes] = []
        self._outBytes = 0
        #: When the stream's response last waited on a closed window.
        self._blockedSince: float | None = None
        #: When the body last moved (while it is read), for the body timeout.
        self._bodyAt: float | None = None

    @property
    def isHTTP2(self) -> bool:
        """
        Always: this request came on an HTTP/2 stream.
        """
        return True

    def isSecure(self) -> bool:
        return self._connection.isSecure()

    # Receiving

    def headersReceived(
        self,
        fields: Sequence[tuple[bytes, bytes]],
        authority: bytes | None,
        ended: bool,
    ) -> None:
        """
        The stream's header block is in (its pseudo-header fields taken
        out): apply HTTP/1.1's rules to all of it, route, and answer or
        start the exchange.
        """
        try:
            length = self._readHeaders(fields, authority, ended)
        except _Refused as e:
            self._refuse(e.code, e.message, bodyComing=not ended)
            return
        if not ended:
            self.hasBody = True
            self.bodyStream = StreamingBody(
                UNKNOWN_LENGTH if length is None else length, self._source
            )
            self._bodyAt = self.site.reactor.seconds()
            self._connection._timeBody(self)
        self.process()

    def _readHeaders(
        self,
        fields: Sequence[tuple[bytes, bytes]],
        authority: bytes | None,
        ended: bool,
    ) -> int | None:
        """
        Check and keep the header fields; the body's declared length.

        @raise _Refused: for a request refused on its head.
        """
        limits: Limits = self.site.limits
        method, path = self.method, self.uri
        if len(method) + len(path) + 10 > limits.maxRequestLine:
            raise _Refused("uri_too_long")
        try:
            parseRequestLine(method + b" " + path + b" HTTP/1.1")
        except ValueError:
            raise _Refused("bad_request") from None
        table = self.headerTable
        count = 0
        size = 0
        underscore = limits.underscoreHeaders
        cookies: list[bytes] = []
        hosts: list[bytes] = []
        if authority is not None:
            hosts.append(authority)
            count += 1
            size += len(authority) + 6
        for name, value in fields:
            if name == b"cookie":
                # Crumbs of one Cookie (RFC 9113, 8.2.3), one line upstream.
                if not cookies:
                    count += 1
                    size += 8
                cookies.append(value)
                size += len(value) + 2
                continue
            count += 1
            size += len(name) + len(value) + 2
            if name == b"host":
                if authority is None or value != authority:
                    hosts.append(value)
                continue
            if b"_" in name and underscore != "allow":
                if underscore == "reject":
                    raise _Refused("bad_request", UNDERSCORE_REFUSED)
                continue
            try:
                canonical = canonicalHeaderName(name)
            except ValueError:
                raise _Refused("bad_request") from None
            if canonical == b"Te":
                # "trailers", the one value h2 lets through: hop-by-hop.
                continue
            table.setdefault(canonical, []).append(value)
        if count > limits.maxHeaderCount or size > limits.maxHeadersSize:
            raise _Refused("headers_too_large")
        if hosts:
            table[b"Host"] = hosts
        if cookies:
            table[b"Cookie"] = [b"; ".join(cookies)]
        length: int | None = None
        lengths = table.get(b"Content-Length")
        if lengths is not None:
            # h2 checked that they are digits and agree.
            length = int(lengths[0])
            self._declared = length
            table[b"Content-Length"] = [lengths[0]]
            if ended and length:
                raise _Malformed("a content-length without a body")
        decision = self.site.resource.decide(
            method, path, self.clientproto, table, self.record
        )
        error = getattr(decision, "error", None)
        if error is not None and not ended:
            raise _Refused(error.code, error.message)
        policy = getattr(decision, "policy", None)
        if policy is not None:
            limit = policy.maxBodySize
            if length is not None and length > limit:
                raise _Refused("body_too_large")
            self._bodyLimit = limit
        return length

    def _refuse(
        self, code: str, message: str | None = None, bodyComing: bool = True
    ) -> None:
        """
        Answer with an error at once, on this stream only (the exchange, if
        one started, is dropped); stop a body still to come with
        RST_STREAM(NO_ERROR) once the answer has gone.
        """
        if self._closed or self.finished:
            return
        self._bodyAt = None
        reason = Failure(ConnectionLost("the request was refused"))
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.clientLost(reason)
        stream = self.bodyStream
        if stream is not None:
            stream.fail(reason)
        if self.startedWriting:
            self.record.failed(code)
            self._reset(ErrorCodes.CANCEL)
            return
        self.responseHeaders = Headers()
        body = renderError(self, ProxyError(code, message), self.requestId)
        # A body still to come is stopped with RST_STREAM(NO_ERROR) once
        # the answer has gone, unless what is left of it fits in the
        # window the client already has: then it is let finish, and
        # dropped (clients such as curl may report the reset as an error
        # while they are still sending).
        declared = self._declared
        self._resetWhenSent = bodyComing and (
            declared is None or declared - self.record.bytesIn > INITIAL_STREAM_WINDOW
        )
        if body:
            self.write(body)
        self.finish()

    def dataReceived(self, data: bytes, flowControlled: int) -> None:
        """
        A DATA frame's bytes: on to the upstream, and acknowledged unless
        the upstream is behind.
        """
        stream = self.bodyStream
        if self._closed or stream is None:
            self._connection._acknowledge(flowControlled, self.streamId)
            return
        record = self.record
        record.bytesIn += len(data)
        if self._bodyLimit is not None and record.bytesIn > self._bodyLimit:
            self._connection._acknowledge(flowControlled, self.streamId)
            self._refuse("body_too_large")
            return
        self._bodyAt = self.site.reactor.seconds()
        stream.write(data)
        if self._bodyPaused:
            self._held += flowControlled
        else:
            self._connection._acknowledge(flowControlled, self.streamId)

    def _acknowledgeHeld(self) -> None:
        held, self._held = self._held, 0
        if held and not self._closed:
            self._connection._acknowledge(held, self.streamId)
            self._connection._flush()

    def trailersReceived(self, fields: list[tuple[bytes, bytes]]) -> None:
        """
        The request's trailers: kept for the upstream under HTTP/1.1's
        rules (L{trailerFields}: no field that may not be a trailer,
        C{--underscore-headers}, C{--max-header-count}).
        """
        limits: Limits = self.site.limits
        if len(fields) > limits.maxHeaderCount:
            self._refuse("headers_too_large")
            return
        checked = trailerFields(fields, limits.underscoreHeaders)
        if checked is None:
            self._refuse("bad_request", UNDERSCORE_REFUSED)
            return
        self.requestTrailers = checked

    def bodyEnded(self) -> None:
        """
        The client sent END_STREAM: the body, and its trailers, are whole.
        """
        self._bodyAt = None
        stream = self.bodyStream
        if stream is not None and not self._closed and not self.finished:
            stream.finish(self.requestTrailers)

    def process(self) -> None:
        site = self.site
        self._inFlight = True
        site.inFlight += 1
        self._metrics = metrics = (
            getattr(self.record.decision, "metrics", None) or site._unrouted
        )
        metrics.inFlight += 1
        try:
            resource = site.resource.getChildWithDefault(b"", self)
            self.render(resource)
        except BaseException:
            self.processingFailed(Failure())

    def render(self, resource: Any) -> None:
        body = resource.render(self)
        if body is NOT_DONE_YET:
            return
        if body or self.record.grpcStatus is None:
            # (A gRPC refusal is trailers-only: no Content-Length.)
            self.responseHeaders.setRawHeaders(
                b"Content-Length", [b"%d" % (len(body),)]
            )
        if body and self.method != b"HEAD":
            self.write(body)
        self.finish()

    def processingFailed(self, reason: Failure) -> None:
        """
        An internal error: log the traceback, never show it.
        """
        _log.failure(
            "internal error handling {method} {uri}",
            failure=reason,
            method=self.method,
            uri=self.uri,
        )
        self.record.failed("internal_error")
        if self.disconnected or self.finished:
            return
        if self.startedWriting:
            self.loseConnection()
            return
        self.responseHeaders = Headers()
        body = renderError(self, ProxyError("internal_error"), self.requestId)
        if body:
            self.write(body)
        self.finish()

    # Answering

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code
        self.code_message = (
            message if message is not None else RESPONSES.get(code, b"Unknown Status")
        )

    def _head(self) -> list[tuple[bytes, bytes]]:
        head = [(b":status", b"%d" % (self.code,))]
        for name, values in self.responseHeaders.getAllRawHeaders():
            lowered = name.lower()
            if lowered in HOP_BY_HOP:
                continue
            for value in values:
                head.append((lowered, value))
        return head

    def write(self, data: bytes) -> None:
        if self.finished:
            raise RuntimeError(
                "Request.write called on a request after Request.finish was called."
            )
        if self.disconnected or self._closed:
            return
        if not self.startedWriting:
            self.startedWriting = 1
            self._noBody = self.method == b"HEAD" or self.code in NO_BODY_CODES
            self._connection._sendHead(self, self._head())
        if self._noBody or not data:
            return
        self.sentLength += len(data)
        self._connection._queue(self, data)

    def stopBodyTimeout(self) -> None:
        """
        This request's body is a stream that another timer governs (a
        gRPC call's stream idle timeout): C{--body-timeout} does not apply.
        """
        self._bodyUnwatched = True

    def setTrailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """
        Send C{trailers} (names and values) after the body, in a HEADERS
        frame that ends the stream; hop-by-hop fields are dropped.
        """
        self._trailers = [
            (name.lower(), value)
            for name, value in trailers
            if name.lower() not in HOP_BY_HOP
        ]

    def finish(self) -> None:
        if self.finished or self.disconnected:
            return
        if not self.startedWriting:
            # Nothing written: the head goes when the stream ends, in the
            # same HEADERS frame as END_STREAM (with no trailers), as a
            # gRPC trailers-only response must.
            self.startedWriting = 1
            self._headOnly = not (self.disconnected or self._closed)
        self.finished = 1
        if self.producer is not None:
            self.unregisterProducer()
        self._account(self.code)
        if not self._closed:
            self._ending = True
            self._connection._soon(self)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.producer is not None:
            raise ValueError(
                f"registering producer {producer} before previous one"
                f" ({self.producer}) was unregistered"
            )
        if not streaming:
            raise RuntimeError("only streaming producers are supported")
        self.producer = producer
        self._producerPaused = False
        self._checkProducer()

    def unregisterProducer(self) -> None:
        self.producer = None

    def _checkProducer(self) -> None:
        """
        Pause the response's producer while this stream holds more than
        L{STREAM_BUFFER} bytes or the connection's transport is full;
        resume it when both have room.
        """
        producer = self.producer
        if producer is None:
            return
        full = self._outBytes > STREAM_BUFFER or self._connection._transportPaused
        if full and not self._producerPaused:
            self._producerPaused = True
            producer.pauseProducing()
        elif not full and self._producerPaused:
            self._producerPaused = False
            producer.resumeProducing()

    _producerPaused = False
    #: The response ends with no body written: its head goes with its end.
    _headOnly = False

    def loseConnection(self) -> None:
        """
        A response cut off mid-body: reset this stream (INTERNAL_ERROR),
        never the connection.
        """
        self._reset(ErrorCodes.INTERNAL_ERROR)

    def flushHead(self) -> None:
        if not self._closed:
            self._connection._soon(self)

    def _reset(self, code: ErrorCodes) -> None:
        """
        End the stream from this side with RST_STREAM(C{code}).
        """
        if self._closed:
            return
        self._connection._resetStream(self.streamId, code)
        self._connection._flush()
        self.streamLost(Failure(ConnectionLost("the stream was reset")))

    # Ending

    def streamLost(self, reason: Failure) -> None:
        """
        The stream is gone before its response was finished: the client
        reset it, the connection was lost, or it was reset here.
        """
        if self._closed:
            return
        self._closed = True
        self._out = []
        self._outBytes = 0
        self._bodyAt = None
        self._blockedSince = None
        self._connection._requestDone(self)
        self.producer = None
        stream = self.bodyStream
        if stream is not None:
            stream.fail(reason)
        if self.finished:
            return
        self.disconnected = True
        exchange = self.exchange
        if exchange is not None:
            exchange.clientLost(reason)
        self._account(CLIENT_CLOSED if not self.record.errorCode else self.code)


class _Malformed(Exception):
    """
    A stream's header block is malformed (RFC 9113, 8.1.1): a stream error.
    """


class _ConnectionError(Exception):
    """
    The client broke a rule of the connection's (a flood, a header block
    too large): GOAWAY with C{code}, then close.
    """

    def __init__(self, code: ErrorCodes, message: str) -> None:
        super().__init__(message)
        self.code = code


@implementer(IPushProducer)
class H2Channel(Protocol):
    """
    An HTTP/2 connection from a client (server side, on h2), with
    monedge's limits.

    It is the transport's producer: paused when the transport's buffer is
    full, it stops reading the client (so a client that does not read
    cannot make it buffer answers) and pauses the responses' producers.
    """

    def __init__(self, site: Any) -> None:
        self.site = site
        self.limits: Limits = site.limits
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            # Checked per stream here: a malformed request is a stream
            # error, not the connection's.
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
            # Checked as they are encoded (LeanEncoder).
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        conn = self.conn = _ServerConnection(config=config)
        conn.encoder = LeanEncoder()
        limits = self.limits
        #: The header list size past which a header block is a connection
        #: error (HPACK's limit, and SETTINGS_MAX_HEADER_LIST_SIZE): twice
        #: what HTTP/1.1 allows, each field counted with RFC 9113's 32 bytes.
        self.maxHeaderListSize = (
            2 * (limits.maxHeadersSize + limits.maxRequestLine)
            + 64 * limits.maxHeaderCount
        )
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.maxHeaderListSize,
            },
        )
        decoder = _Decoder()
        decoder.max_header_list_size = self.maxHeaderListSize
        conn.decoder = decoder
        #: The largest header block accepted as sent (HPACK encoded).
        self.maxHeaderBlock = (
            limits.maxHeadersSize + limits.maxRequestLine + HEADER_BLOCK_SLACK
        )
        self.requests: dict[int, H2Request] = {}
        #: The last few requests' fields, checked (L{_checkFields}).
        self._checked: dict[
            tuple[Any, ...],
            tuple[dict[bytes, bytes], tuple[tuple[bytes, bytes], ...]],
        ] = {}
        #: Streams with a response written to since the last send, framed
        #: and sent together at the end of the reactor turn (L{_soon}).
        self._dirty: dict[int, H2Request] = {}
        self._turn: IDelayedCall | None = None
        self._closing = False
        self._goneAway = False
        self._lastStreamId = 0
        self._transportPaused = False
        self._readPaused = False
        self._pausedAt = 0.0
        self._anyHeaders = False
        self._lastActive = 0.0
        self._startedAt = 0.0
        self._timer: IDelayedCall | None = None
        self._aborting: IDelayedCall | None = None
        # The frame scanner: the preface's bytes still to skip, a frame
        # header read in part, the payload bytes of the current frame still
        # to skip, and the header block being read.
        self._prefaceLeft = len(PREFACE)
        self._frameHead = b""
        self._skip = 0
        self._blockBytes = 0
        self._blockStartedAt: float | None = None
        # Flood counters, per FLOOD_WINDOW.
        self._windowStart = 0.0
        self._controlFrames = 0
        self._resets = 0
        self._host: Any = None
        self._peer: Any = None
        self._secure: bool | None = None

    # The connection

    def getHost(self) -> Any:
        if self._host is None:
            assert self.transport is not None
            self._host = self.transport.getHost()
        return self._host

    def getPeer(self) -> Any:
        if self._peer is None:
            assert self.transport is not None
            self._peer = self.transport.getPeer()
        return self._peer

    def isSecure(self) -> bool:
        if self._secure is None:
            self._secure = ISSLTransport.providedBy(self.transport)
        return self._secure

    def connectionMade(self) -> None:
        transport: Any = self.transport
        sendAtOnce(transport)
        setNoDelay = getattr(transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            try:
                setNoDelay(True)
            except OSError:
                pass
        transport.registerProducer(self, True)
        site = self.site
        site.channels.add(self)
        now = site.reactor.seconds()
        self._startedAt = self._lastActive = self._windowStart = now
        conn = self.conn
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._flush()
        self._armAt(now + min(self.limits.headerTimeout, self.limits.keepAliveTimeout))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closing = True
        self._dirty = {}
        for call in (self._timer, self._aborting, self._turn):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._aborting = self._turn = None
        requests = list(self.requests.values())
        self.requests = {}
        for request in requests:
            request.streamLost(reason)
        self.site.channels.discard(self)
        self.site.checkDrained()

    def isIdle(self) -> bool:
        """
        No stream is open.
        """
        return not self.requests

    def loseConnection(self) -> None:
        """
        Close: GOAWAY(NO_ERROR), then the connection once its open streams
        (none, when the site closes idle connections) are done.
        """
        self.drain()

    def drain(self) -> None:
        """
        Send GOAWAY(NO_ERROR) naming the last stream taken, answer the
        streams open, then close.
        """
        self._goAway()
        if not self.requests:
            self._close()

    def _goAway(self) -> None:
        if self._goneAway or self._closing:
            return
        self._goneAway = True
        self._lastStreamId = self.conn.highest_inbound_stream_id
        # Written here rather than by h2's close_connection, after which h2
        # would send nothing more: the open streams are still answered.
        self._flush()
        frame = GoAwayFrame(
            stream_id=0, last_stream_id=self._lastStreamId, error_code=0
        )
        transport: Any = self.transport
        transport.write(frame.serialize())

    def _close(self, error: bool = False) -> None:
        """
        Close the connection (once what is written has gone), aborting it if
        it has not closed in L{CLOSE_TIMEOUT} seconds.

        @param error: the close follows a connection error's GOAWAY: nothing
            more is read from the client (RFC 9113, 5.4.1), even while a
            TLS close waits for the client's own, and the connection is
            aborted after L{ERROR_CLOSE_TIMEOUT}.
        """
        if self._closing:
            return
        self._closing = True
        self._flush()
        transport: Any = self.transport
        if transport is None:
            return
        if error:
            if not self._readPaused:
                self._readPaused = True
                transport.pauseProducing()
        elif self._readPaused:
            self._readPaused = False
            transport.resumeProducing()
        # A TLS transport closes only once no producer is registered.
        transport.unregisterProducer()
        transport.loseConnection()
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            self._aborting = self.site.reactor.callLater(
                ERROR_CLOSE_TIMEOUT if error else CLOSE_TIMEOUT, abort
            )

    def _connectionError(self, code: ErrorCodes, message: str) -> None:
        """
        A connection error: GOAWAY with C{code}, then close.  Closed with
        C{NO_ERROR} (a deadline passed), the streams still open are reset
        (CANCEL) first: the GOAWAY does not promise to answer them.
        """
        if self._closing:
            return
        if code == ErrorCodes.NO_ERROR:
            for request in list(self.requests.values()):
                if not request._closed:
                    self._resetStream(request.streamId, ErrorCodes.CANCEL)
                    request.streamLost(
                        Failure(ConnectionLost("the connection timed out"))
                    )
        _log.debug(
            "HTTP/2 connection error from {peer}: {code!r}, {message}",
            peer=getattr(self.getPeer(), "host", "?"),
            code=code,
            message=message,
        )
        try:
            self.conn.close_connection(error_code=code)
        except H2Error:
            # Already closed in h2 (its own GOAWAY went first).
            pass
        self._close(error=code != ErrorCodes.NO_ERROR)

    # Reading

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        now = self.site.reactor.seconds()
        self._lastActive = now
        try:
            self._scan(data, now)
        except _ConnectionError as e:
            self._connectionError(e.code, str(e))
            return
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as e:
            # h2 has queued its GOAWAY, with the error's code.
            _log.debug(
                "HTTP/2 protocol error from {peer}: {error}",
                peer=getattr(self.getPeer(), "host", "?"),
                error=e,
            )
            self._close(error=True)
            return
        try:
            for event in events:
                self._event(event, now)
                if self._closing:
                    return
        except _ConnectionError as e:
            self._connectionError(e.code, str(e))
            return
        self._flush()

    def _scan(self, data: bytes, now: float) -> None:
        """
        Read the frames' headers in C{data} before h2 reads the frames:
        count what the connection bounds.

        @raise _ConnectionError: for a bound passed.
        """
        pos = 0
        size = len(data)
        if self._prefaceLeft:
            take = min(self._prefaceLeft, size)
            self._prefaceLeft -= take
            pos = take
        if now - self._windowStart > FLOOD_WINDOW:
            self._windowStart = now
            self._controlFrames = 0
            self._resets = 0
        while pos < size:
            if self._skip:
                take = min(self._skip, size - pos)
                self._skip -= take
                pos += take
                continue
            need = 9 - len(self._frameHead)
            head = self._frameHead + data[pos : pos + need]
            pos += min(need, size - pos)
            if len(head) < 9:
                self._frameHead = head
                return
            self._frameHead = b""
            length = int.from_bytes(head[:3], "big")
            kind = head[3]
            flags = head[4]
            self._skip = length
            if kind == _HEADERS or kind == _CONTINUATION:
                if self._blockStartedAt is None:
                    self._blockStartedAt = now
                self._blockBytes += length
                if self._blockBytes > self.maxHeaderBlock:
                    raise _ConnectionError(
                        ErrorCodes.ENHANCE_YOUR_CALM, "a header block is too large"
                    )
                if flags & _END_HEADERS:
                    self._blockBytes = 0
                    self._blockStartedAt = None
                continue
            if kind == _SETTINGS:
                if flags & _ACK:
                    if length:
                        raise _ConnectionError(
                            ErrorCodes.FRAME_SIZE_ERROR, "a SETTINGS ACK with a payload"
                        )
                    continue
            elif kind == _DATA:
                if length or flags & _END_STREAM:
                    continue
            elif kind == _PING:
                if flags & _ACK:
                    continue
            elif kind != _PRIORITY:
                continue
            self._controlFrames += 1
            if self._controlFrames > MAX_CONTROL_FRAMES:
                raise _ConnectionError(
                    ErrorCodes.ENHANCE_YOUR_CALM, "too many control frames"
                )

    def _event(self, event: h2.events.Event, now: float) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._requestReceived(event, now)
        elif isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None
            request = self.requests.get(event.stream_id)
            length = event.flow_controlled_length or 0
            if request is None:
                self._acknowledge(length, event.stream_id)
            else:
                request.dataReceived(event.data or b"", length)
        elif isinstance(event, h2.events.StreamEnded):
            assert event.stream_id is not None
            request = self.requests.get(event.stream_id)
            if request is not None:
                request.bodyEnded()
        elif isinstance(event, h2.events.TrailersReceived):
            assert event.stream_id is not None
            self._trailersReceived(event.stream_id, list(event.headers or []))
        elif isinstance(event, h2.events.StreamReset):
            assert event.stream_id is not None
            request = self.requests.get(event.stream_id)
            if request is not None:
                premature = not request.finished
                request.streamLost(
                    Failure(ConnectionLost("the client reset the stream"))
                )
                if premature:
                    self._countReset()
        elif isinstance(
            event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)
        ):
            # A window opened (or SETTINGS_INITIAL_WINDOW_SIZE moved every
            # stream's, perhaps below zero): send what waits.
            self._sendWaiting()
        elif isinstance(event, h2.events.ConnectionTerminated):
            # The client's GOAWAY: h2 sends nothing after it, so the
            # connection closes, and its streams with it.
            self._close()

    def _countReset(self) -> None:
        self._resets += 1
        if self._resets > MAX_RESETS:
            raise _ConnectionError(
                ErrorCodes.ENHANCE_YOUR_CALM, "too many streams reset"
            )

    def _requestReceived(self, event: h2.events.RequestReceived, now: float) -> None:
        streamId = event.stream_id
        assert streamId is not None
        self._anyHeaders = True
        ended = event.stream_ended is not None
        if self._goneAway and streamId > self._lastStreamId:
            self._resetStream(streamId, ErrorCodes.REFUSED_STREAM)
            return
        if len(self.requests) >= MAX_CONCURRENT_STREAMS:
            self._resetStream(streamId, ErrorCodes.REFUSED_STREAM)
            self._countReset()
            return
        try:
            pseudo, fields = self._checkFields(event.headers or [])
        except ProtocolError:
            self._malformed(streamId)
            return
        method = pseudo.get(b":method", b"")
        path = pseudo.get(b":path")
        if path is None:
            # CONNECT (h2 requires :path of every other method): refused as
            # HTTP/1.1 refuses it, with the target it names.
            path = pseudo.get(b":authority", b"")
        request = H2Request(self, streamId, method, path)
        self.requests[streamId] = request
        try:
            request.headersReceived(fields, pseudo.get(b":authority"), ended)
        except _Malformed:
            request._closed = True
            self.requests.pop(streamId, None)
            self._malformed(streamId)

    def _checkFields(
        self, headers: Iterable[Any]
    ) -> tuple[dict[bytes, bytes], tuple[tuple[bytes, bytes], ...]]:
        """
        A request's header fields checked: its pseudo-header fields, and
        the others, in order.  The same fields as one of the last few
        requests' (a repeated request) are not checked again.

        @raise ProtocolError: for a malformed request.
        """
        key = tuple(headers)
        known = self._checked.get(key)
        if known is not None:
            return known
        pseudo: dict[bytes, bytes] = {}
        fields: list[tuple[bytes, bytes]] = []
        # h2's checks of a request's fields (RFC 9113, 8.2 and 8.3), with
        # host set apart: a host that differs from :authority is HTTP/1.1's
        # 400, not a malformed request.
        checked = [
            (b"x-host", value) if name == b"host" else (name, value)
            for name, value in key
        ]
        size = 0
        for name, value in validate_headers(checked, _REQUEST_FLAGS):
            name = bytes(name)
            value = bytes(value)
            size += len(name) + len(value)
            if name.startswith(b":"):
                pseudo[name] = value
            else:
                fields.append((b"host" if name == b"x-host" else name, value))
        result = (pseudo, tuple(fields))
        if size <= KEPT_BLOCK_SIZE:
            if len(self._checked) >= KEPT_BLOCKS:
                self._checked.clear()
            self._checked[key] = result
        return result

    def _malformed(self, streamId: int) -> None:
        self._resetStream(streamId, ErrorCodes.PROTOCOL_ERROR)
        self._countReset()

    def _trailersReceived(
        self, streamId: int, headers: Iterable[tuple[bytes, bytes]]
    ) -> None:
        try:
            fields = [
                (bytes(name), bytes(value))
                for name, value in validate_headers(list(headers), _TRAILER_FLAGS)
            ]
        except ProtocolError:
            request = self.requests.get(streamId)
            self._malformed(streamId)
            if request is not None:
                request.streamLost(Failure(ConnectionLost("malformed trailers")))
            return
        request = self.requests.get(streamId)
        if request is not None:
            request.trailersReceived(fields)

    def _acknowledge(self, size: int, streamId: int) -> None:
        if size and not self._closing:
            try:
                self.conn.acknowledge_received_data(size, streamId)
            except H2Error:
                pass

    def _resetStream(self, streamId: int, code: ErrorCodes) -> None:
        try:
            self.conn.reset_stream(streamId, code)
        except H2Error:
            # Already closed in h2.
            pass

    # Timers: one, at the nearest deadline.

    def _armAt(self, deadline: float) -> None:
        timer = self._timer
        if timer is not None and timer.active():
            if timer.getTime() <= deadline:
                return
            timer.cancel()
        delay = max(0.0, deadline - self.site.reactor.seconds())
        self._timer = self.site.reactor.callLater(delay, self._deadlines)

    def _timeBody(self, request: H2Request) -> None:
        self._armAt(self.site.reactor.seconds() + self.limits.bodyTimeout)

    def _deadlines(self) -> None:
        """
        Act on every deadline passed; arm the timer for the next one.
        """
        self._timer = None
        if self._closing:
            return
        limits = self.limits
        now = self.site.reactor.seconds()
        nearest: list[float] = []
        if self._blockStartedAt is not None:
            at = self._blockStartedAt + limits.headerTimeout
            if at <= now:
                self._connectionError(ErrorCodes.NO_ERROR, "a header block stalled")
                return
            nearest.append(at)
        if not self._anyHeaders:
            at = self._startedAt + limits.headerTimeout
            if at <= now:
                self._connectionError(ErrorCodes.NO_ERROR, "no request in time")
                return
            nearest.append(at)
        if self._transportPaused:
            at = self._pausedAt + limits.sendTimeout
            if at <= now:
                self._abort()
                return
            nearest.append(at)
        if not self.requests:
            at = self._lastActive + limits.keepAliveTimeout
            if at <= now:
                self.drain()
                return
            nearest.append(at)
        for request in list(self.requests.values()):
            if (
                request._bodyAt is not None
                and not request._bodyPaused
                and not request._bodyUnwatched
            ):
                at = request._bodyAt + limits.bodyTimeout
                if at <= now:
                    request._bodyAt = None
                    request._refuse(
                        "request_timeout",
                        f"the request body stalled for {limits.bodyTimeout:g} s",
                    )
                    continue
                nearest.append(at)
            if request._blockedSince is not None:
                at = request._blockedSince + limits.sendTimeout
                if at <= now:
                    request.record.failed("client_send_timeout")
                    request._reset(ErrorCodes.CANCEL)
                    continue
                nearest.append(at)
        self._flush()
        if self._closing:
            return
        if nearest:
            self._armAt(min(nearest))
        elif self.requests:
            self._armAt(now + min(limits.bodyTimeout, limits.sendTimeout))

    def _abort(self) -> None:
        self._closing = True
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    # Sending

    def _soon(self, request: H2Request) -> None:
        """
        C{request} wrote to its response (or ended it): frame and send it
        at the end of this reactor turn, with whatever else the connection
        has to send by then.  Responses that arrive together (a turn's
        upstream reads) leave in one send, and a response written and
        finished in one turn ends with END_STREAM on its last DATA frame.
        """
        self._dirty[request.streamId] = request
        if self._turn is None and not self._closing:
            self._turn = self.site.reactor.callLater(0, self._endOfTurn)

    def _endOfTurn(self) -> None:
        self._turn = None
        self._flush()

    def _flush(self) -> None:
        """
        Frame what the streams have written (within the flow-control
        windows), and send everything the connection has to send.
        """
        while self._dirty:
            dirty, self._dirty = self._dirty, {}
            for request in dirty.values():
                self._drain(request)
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def _sendHead(self, request: H2Request, head: list[tuple[bytes, bytes]]) -> None:
        try:
            self.conn.send_headers(request.streamId, head)
        except H2Error:
            # The stream closed under the response (the client reset it as
            # it was being answered).
            request.streamLost(Failure(ConnectionLost("the stream closed")))

    def _queue(self, request: H2Request, data: bytes) -> None:
        request._out.append(data)
        request._outBytes += len(data)
        request._checkProducer()
        self._soon(request)

    def _drain(self, request: H2Request) -> None:
        """
        Send what C{request} has waiting, within the flow-control windows;
        then its end, once all of its body has gone.
        """
        if request._closed:
            return
        conn = self.conn
        streamId = request.streamId
        out = request._out
        sent = False
        # The last DATA frame carries END_STREAM when nothing follows it.
        endsWithData = request._ending and not request._trailers
        try:
            while out:
                window = conn.local_flow_control_window(streamId)
                if window <= 0:
                    break
                chunk = out[0]
                take = min(window, conn.max_outbound_frame_size, len(chunk))
                if take < len(chunk):
                    out[0] = chunk[take:]
                    chunk = chunk[:take]
                else:
                    out.pop(0)
                request._outBytes -= take
                last = endsWithData and not out
                conn.send_data(streamId, chunk, end_stream=last)
                sent = True
            if not out and request._ending:
                request._closed = True
                trailers = request._trailers
                if request._headOnly:
                    conn.send_headers(
                        streamId, request._head(), end_stream=not trailers
                    )
                    if trailers:
                        conn.send_headers(streamId, trailers, end_stream=True)
                elif trailers:
                    conn.send_headers(streamId, trailers, end_stream=True)
                elif not sent:
                    # (Sent, the last DATA frame ended the stream.)
                    conn.end_stream(streamId)
                stream = conn.streams.get(streamId)
                if request._resetWhenSent and stream is not None and not stream.closed:
                    # A body still to come is stopped (the client may have
                    # ended its side already: then there is nothing to stop).
                    conn.reset_stream(streamId, ErrorCodes.NO_ERROR)
        except H2Error:
            request.streamLost(Failure(ConnectionLost("the stream closed")))
            self._requestDone(request)
            return
        if request._closed:
            request._blockedSince = None
            self._requestDone(request)
            return
        if out:
            # Waiting on a window: since now, or since the last bytes went.
            if request._blockedSince is None or sent:
                request._blockedSince = self.site.reactor.seconds()
                self._armAt(request._blockedSince + self.limits.sendTimeout)
        else:
            request._blockedSince = None
        request._checkProducer()

    def _sendWaiting(self) -> None:
        for request in list(self.requests.values()):
            if request._out:
                self._drain(request)

    def _requestDone(self, request: H2Request) -> None:
        """
        C{request}'s stream is over on this side: its response all sent,
        or the stream gone.
        """
        if self.requests.get(request.streamId) is not request:
            return
        del self.requests[request.streamId]
        if self._closing:
            return
        now = self.site.reactor.seconds()
        self._lastActive = now
        if self.site.draining:
            self._goAway()
        if not self.requests:
            if self._goneAway:
                self._close()
            else:
                self._armAt(now + self.limits.keepAliveTimeout)

    # The transport's producer

    def pauseProducing(self) -> None:
        if self._transportPaused:
            return
        self._transportPaused = True
        self._pausedAt = self.site.reactor.seconds()
        self._armAt(self._pausedAt + self.limits.sendTimeout)
        transport: Any = self.transport
        if not self._closing and not self._readPaused:
            self._readPaused = True
            transport.pauseProducing()
        for request in list(self.requests.values()):
            request._checkProducer()

    def resumeProducing(self) -> None:
        if not self._transportPaused:
            return
        self._transportPaused = False
        if self._readPaused:
            self._readPaused = False
            transport: Any = self.transport
            transport.resumeProducing()
        for request in list(self.requests.values()):
            request._checkProducer()

    def stopProducing(self) -> None:
        pass


if typing.TYPE_CHECKING:
    # For mypy: the request is what the exchange and the resource tree use
    # of one.
    _requestType: type[ClientRequest] = H2Request
