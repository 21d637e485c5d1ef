"""
monedge's HTTP/1.1 front end, on httptools (llhttp).

L{HTTP1Channel} reads client connections and L{HTTP1Request} answers
through the API of twisted.web's request that the exchange and the
resource tree use (L{ClientRequest}).  The site state (routing, limits,
metrics, the access log, draining) stays L{monedge.edge.server.ProxySite}'s.

Every connection starts on Twisted's protocol switch, so that a TLS
connection whose ALPN chose C{h2} goes on to HTTP/2; only HTTP/1.1
connections use this channel.

How a request is read:

  - The head is framed here, line by line on CRLF, so that the limits
    apply to raw lines as they come: the request line (414), each header
    line, their count and bytes (431), obsolete line folding (400), the
    underscore policy, the transfer-coding rules.  The request line and
    header names are read with Twisted's own rules (from
    L{monedge.twistedseam}), which accept any token as a method.
  - The header block is then given to llhttp, which refuses what it finds
    malformed (control bytes in a value, a bad Content-Length, both
    framings) with 400.  llhttp knows only the methods it lists, and reads
    an C{Upgrade} as the end of HTTP: it is given a neutral request line
    and no C{Upgrade} header, so the body is framed by Content-Length or
    chunked, and a WebSocket handshake waits for the upstream's 101 like
    any other request.
  - The request is decided on its head: routed, and answered (hooks, the
    exchange) at once, while its body streams upstream through a
    L{StreamingBody} as it is read.  The body's source is the connection:
    it is paused while the upstream takes the body slowly.
  - A Content-Length body is counted here and taken as it comes; a chunked
    body is decoded by llhttp (its trailers too), while a small scanner
    (L{_ChunkFraming}) finds where it ends, so that a pipelined request
    after it is held until the response is sent, and refuses a chunk that
    declares more than the body may hold as soon as its size line is read
    (413).
  - A response that ends before the body was all read (a refusal, a
    hook's answer, an upstream's early one) closes the connection,
    lingering; a body refused while it streams gives up its exchange.
"""

from __future__ import annotations

import typing
from typing import IO, Any

import httptools
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES, RESPONSES
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from monedge.edge.base import (
    CLIENT_CLOSED,
    LINGER,
    UNDERSCORE_REFUSED,
    SharedChannel,
    SharedRequest,
)
from monedge.proxy.exchange import ClientRequest, ProxyExchange, TunnelChannel
from monedge.record import RequestRecord
from monedge.rules.errors import (
    CATALOGUE,
    ProxyError,
    grpcRefusalType,
    isGrpcRequest,
    rawErrorResponse,
    renderError,
)
from monedge.rules.grpc import grpcStatus
from monedge.rules.headers import connectionTokens, newRequestId, trailerFields
from monedge.twistedseam import (
    HeaderTable,
    canonicalHeaderName,
    chunkSize,
    parseRequestLine,
    rawHeaderTable,
    sendAtOnce,
)
from monedge.upstream.streaming import BufferFull, StreamingBody
from monedge.upstream.tunnel import TunnelSide

if typing.TYPE_CHECKING:
    from monedge.edge.server import ProxySite

_log = Logger()

#: Bytes read ahead, while a request is answered, before the connection is
#: paused (Twisted's channel reads as far).
_EAGER_READ = 0x4000

#: The most bytes read from a client connection at once (Twisted's default
#: is 64 KiB): fewer reads, and fewer writes upstream, for a large body.
_READ_SIZE = 256 * 1024

#: Seconds a timed-out connection has to close before it is aborted
#: (Twisted's channel waits as long).
_ABORT_TIMEOUT = 15.0

#: The longest chunk-size line, and the most bytes of trailers, that a
#: chunked body may have (Twisted's limits).
_MAX_CHUNK_LINE = 1024
_MAX_TRAILERS = 1 << 16


class _Malformed(Exception):
    """
    A chunked body's framing is malformed.
    """


class _TooLarge(Exception):
    """
    A chunk declares more than the body may hold.
    """


class _TrailersTooLarge(Exception):
    """
    A chunked body's trailer section is longer than a header block may be.
    """


#: Why an abandoned request's exchange and body stop.
_REFUSED = Failure(ConnectionDone("the request was refused"))

#: Reasons to stop reading the client besides a body's source: input held
#: while a request is answered, and a transport that takes no more writes.
_FOR_HELD = "held"
_FOR_WRITES = "writes"


@implementer(IPushProducer)
class _BodySource:
    """
    A request body's source, for its L{StreamingBody}: pausing it stops
    reading the client connection (until every reason to is gone).
    """

    def __init__(self, channel: HTTP1Channel) -> None:
        self._channel = channel

    def pauseProducing(self) -> None:
        self._channel._pauseReading(self)

    def resumeProducing(self) -> None:
        self._channel._resumeReading(self)

    def stopProducing(self) -> None:
        pass


_SIZE, _DATA, _CRLF, _TRAILER = range(4)


class _ChunkFraming:
    """
    Where a chunked body ends, read alongside llhttp (which decodes it and
    checks what this does not: chunk extensions, trailer syntax).  The
    body's bytes are never copied here.

    @ivar total: the chunk sizes declared so far.
    """

    def __init__(self, maxTrailers: int = _MAX_TRAILERS) -> None:
        self.state = _SIZE
        self.remaining = 0
        self.total = 0
        self.line = b""
        self.trailerBytes = 0
        self.maxTrailers = maxTrailers

    def scan(self, data: bytes, limit: int | None) -> int:
        """
        Read C{data}, the body's next bytes.

        @param limit: the most bytes the body may hold, if any.
        @return: the offset just past the body's end in C{data}, or -1 if
            it does not end in it.
        @raise _Malformed: for framing Twisted's decoder would refuse.
        @raise _TooLarge: for a chunk that takes the body past C{limit}.
        @raise _TrailersTooLarge: for trailers longer than C{maxTrailers}.
        """
        pos = 0
        size = len(data)
        while pos < size:
            state = self.state
            if state == _DATA:
                take = min(self.remaining, size - pos)
                self.remaining -= take
                pos += take
                if not self.remaining:
                    self.state = _CRLF
            elif state == _CRLF:
                piece = data[pos : pos + 2 - len(self.line)]
                pos += len(piece)
                line = self.line = self.line + piece
                if len(line) == 2:
                    if line != b"\r\n":
                        raise _Malformed("a chunk did not end with CRLF")
                    self.line = b""
                    self.state = _SIZE
            else:
                eol = data.find(b"\n", pos)
                if eol < 0:
                    self.line += data[pos:]
                    if state == _SIZE and len(self.line) > _MAX_CHUNK_LINE:
                        raise _Malformed("a chunk-size line is too long")
                    if self.trailerBytes + len(self.line) > self.maxTrailers:
                        raise _TrailersTooLarge()
                    return -1
                line = self.line + data[pos : eol + 1]
                self.line = b""
                pos = eol + 1
                if line[-2:-1] != b"\r":
                    raise _Malformed("a bare LF in chunked framing")
                line = line[:-2]
                if state == _SIZE:
                    if len(line) >= _MAX_CHUNK_LINE:
                        raise _Malformed("a chunk-size line is too long")
                    try:
                        length = chunkSize(line.partition(b";")[0])
                    except ValueError:
                        raise _Malformed("a chunk-size is not hex") from None
                    if limit is not None and self.total + length > limit:
                        raise _TooLarge()
                    self.total += length
                    if length:
                        self.remaining = length
                        self.state = _DATA
                    else:
                        self.state = _TRAILER
                else:
                    self.trailerBytes += len(line) + 2
                    if self.trailerBytes > self.maxTrailers:
                        raise _TrailersTooLarge()
                    if not line:
                        return pos
        return -1

    def partialSize(self) -> int | None:
        """
        The size declared so far by a chunk-size line still being read, if
        its digits so far are hex.
        """
        if self.state != _SIZE or not self.line:
            return None
        try:
            return chunkSize(self.line.partition(b";")[0].rstrip(b"\r"))
        except ValueError:
            return None


class HTTP1Request(SharedRequest):
    """
    One request on an L{HTTP1Channel}: it routes itself as soon as its
    headers are in, holds its body in memory, answers through Twisted's
    request API, and accounts for itself (access log, metrics, in-flight
    count) exactly once, however it ends.
    """

    site: ProxySite
    channel: Any
    #: The exchange proxying this request, once it has started.
    exchange: ProxyExchange | None = None

    # Per-request state, its defaults on the class.
    hasBody = False
    sendsTrailers = True
    content: IO[bytes] | None = None
    code = 200
    code_message = b"OK"
    startedWriting = 0
    finished = 0
    disconnected = False
    sentLength = 0
    chunked = False
    producer: Any = None
    _noBody = False
    _trailers: list[tuple[bytes, bytes]] | None = None
    _bodyLimit: int | None = None
    _refused = False
    _accounted = False
    _inFlight = False
    _requestId: bytes | None = None
    _peerAddress: bytes | None = None

    def __init__(
        self, channel: HTTP1Channel, method: bytes, uri: bytes, version: bytes
    ) -> None:
        self.channel = channel
        site = self.site = channel.site
        self.method = method
        self.uri = uri
        self.clientproto = version
        self.path = uri.partition(b"?")[0]
        #: What this request did (L{monedge.record}): this request owns it.
        self.record = RequestRecord(site.reactor.seconds())
        self.requestHeaders = Headers()
        self.responseHeaders = Headers()
        self.headerTable: HeaderTable = rawHeaderTable(self.requestHeaders)
        self.client = channel.getPeer()
        self.host = channel.getHost()
        self._metrics: Any = None

    # Its identity, its body and its tunnel's end: monedge.edge.base.

    @property
    def isHTTP2(self) -> bool:
        """
        Never: this front end speaks HTTP/1.1.
        """
        return False

    def isSecure(self) -> bool:
        channel = getattr(self, "channel", None)
        return bool(channel is not None and channel.isSecure())

    # Receiving

    def gotLength(self, length: int | None) -> None:
        """
        The headers are in: route, refuse a body that will not be read or
        may not be held, and make the stream a body will go upstream on.
        C{length} is the body's declared length, or L{None} for a chunked
        body.
        """
        self.hasBody = length is None or length > 0
        decision = self.site.resource.decide(
            self.method, self.uri, self.clientproto, self.headerTable, self.record
        )
        error = getattr(decision, "error", None)
        if error is not None and self.hasBody:
            self._refuse(error.code, error.message)
            return
        policy = getattr(decision, "policy", None)
        if policy is not None:
            limit = policy.maxBodySize
            if length is not None and length > limit:
                self._refuse("body_too_large")
                return
            self._bodyLimit = limit
        if self.hasBody:
            self.bodyStream = StreamingBody(
                UNKNOWN_LENGTH if length is None else length,
                _BodySource(self.channel),
                replayLimit=self.site.limits.replayBodySize,
            )

    def _refuse(self, code: str, message: str | None = None) -> None:
        self._refused = True
        self.channel.refuse(code, self.requestId, message, request=self)

    def handleContentChunk(self, data: bytes) -> None:
        """
        The body's next bytes: on to the upstream, within the service's
        max-body-size (and, buffered, the process's budget).
        """
        if self._refused:
            return
        record = self.record
        record.bytesIn += len(data)
        limit = self._bodyLimit
        if limit is not None and record.bytesIn > limit:
            self._refuse("body_too_large")
            return
        stream = self.bodyStream
        if stream is not None:
            try:
                stream.write(data)
            except BufferFull:
                self._refuse("request_buffer_full")

    def bodyEnded(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """
        The whole body is in, then C{trailers} (checked and filtered).
        """
        stream = self.bodyStream
        if stream is not None:
            stream.finish(trailers)

    def abandon(self) -> None:
        """
        The channel refused this request after it started: nothing more is
        written for it, its exchange stops, and its body fails.
        """
        self._refused = True
        self.disconnected = True
        exchange = self.exchange
        if exchange is not None:
            exchange.clientLost(_REFUSED)
        stream = self.bodyStream
        if stream is not None:
            stream.fail(_REFUSED)

    def process(self) -> None:
        site = self.site
        self._inFlight = True
        site.inFlight += 1
        self._metrics = metrics = (
            getattr(self.record.decision, "metrics", None) or site._unrouted
        )
        metrics.inFlight += 1
        if site.draining:
            self._closeAfterResponse()
        try:
            resource = site.resource.getChildWithDefault(b"", self)
            self.render(resource)
        except BaseException:
            self.processingFailed(Failure())

    def render(self, resource: Any) -> None:
        """
        Ask C{resource} to answer (Twisted's C{Request.render}, for the
        leaves monedge has, which answer every method).
        """
        body = resource.render(self)
        if body is NOT_DONE_YET:
            return
        self.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % (len(body),)])
        self.write(b"" if self.method == b"HEAD" else body)
        self.finish()

    def _closeAfterResponse(self) -> None:
        self.responseHeaders.setRawHeaders(b"connection", [b"close"])
        self.channel.persistent = False

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
        self.write(body)
        self.finish()

    # Answering (Twisted's request API)

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code
        if message is not None:
            self.code_message = message
        else:
            self.code_message = RESPONSES.get(code, b"Unknown Status")

    def write(self, data: bytes) -> None:
        if self.finished:
            raise RuntimeError(
                "Request.write called on a request after Request.finish was called."
            )
        if self.disconnected:
            return
        channel = self.channel
        if not self.startedWriting:
            if self.site.draining:
                self._closeAfterResponse()
            self.startedWriting = 1
            version = self.clientproto
            headers = self.responseHeaders
            noBody = self.method == b"HEAD" or self.code in NO_BODY_CODES
            if (
                version == b"HTTP/1.1"
                and b"Content-Length" not in rawHeaderTable(headers)
                and not noBody
            ):
                headers.setRawHeaders(b"Transfer-Encoding", [b"chunked"])
                self.chunked = True
            channel.writeHeaders(
                version, b"%d" % (self.code,), self.code_message, headers
            )
            if noBody:
                self._noBody = True
                return
        if self._noBody:
            return
        self.sentLength += len(data)
        if data:
            if self.chunked:
                channel.writeSequence([b"%x\r\n" % (len(data),), data, b"\r\n"])
            else:
                channel.write(data)

    def stopBodyTimeout(self) -> None:
        """
        This request's body is a stream that another timer governs (a
        gRPC call's stream idle timeout): C{--body-timeout} does not apply.
        """
        channel = self.channel
        channel._bodyUnwatched = True
        if channel._inBody:
            channel._stopDeadline()

    def setTrailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """
        Fields to send after the response body, already checked: sent only
        in a chunked response to a client that said C{TE: trailers}.
        """
        if (
            trailers
            and self.chunked
            and b"trailers" in connectionTokens(self.headerTable.get(b"TE"))
        ):
            self._trailers = trailers

    def finish(self) -> None:
        if self.disconnected:
            raise RuntimeError(
                "Request.finish called on a request after its connection was lost"
            )
        if self.finished:
            return
        if not self.startedWriting:
            self.write(b"")
        if self.chunked:
            trailers = self._trailers
            if trailers is None:
                self.channel.write(b"0\r\n\r\n")
            else:
                lines = [b"0\r\n"]
                for name, value in trailers:
                    lines += (name, b": ", value, b"\r\n")
                lines.append(b"\r\n")
                self.channel.write(b"".join(lines))
        self.finished = 1
        if self.producer is not None:
            _log.failure(
                "",
                Failure(
                    RuntimeError(f"Producer was not unregistered for {self.uri!r}")
                ),
            )
            self.unregisterProducer()
        channel = self.channel
        del self.channel
        channel.requestDone(self)
        self._account(self.code)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.producer is not None:
            raise ValueError(
                f"registering producer {producer} before previous one"
                f" ({self.producer}) was unregistered"
            )
        self.producer = producer
        self.channel.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        channel = getattr(self, "channel", None)
        if channel is not None:
            channel.unregisterProducer()
        self.producer = None

    def loseConnection(self) -> None:
        channel = getattr(self, "channel", None)
        if channel is not None:
            channel.loseConnection()

    def flushHead(self) -> None:
        """
        Send the response head now if it is still held for the body's
        first bytes.
        """
        if self.finished or self.disconnected:
            return
        self.channel.flushHead()

    # Ending

    def connectionLost(self, reason: Failure) -> None:
        self.disconnected = True
        if self.finished:
            return
        self.channel = None
        exchange = self.exchange
        if exchange is not None:
            exchange.clientLost(reason)
        stream = self.bodyStream
        if stream is not None:
            stream.fail(reason)
        if self.record.tunnelled:
            # Accounted for when the tunnel, both its connections, ends.
            return
        self._account(CLIENT_CLOSED if not self.record.errorCode else self.code)


_HEAD, _BODY = range(2)


class _HeadCheck:
    """
    What llhttp reads a head for when it only checks it: nothing to call
    back (no C{on_*} method).
    """


_HEAD_CHECK = _HeadCheck()


@implementer(IPushProducer)
class HTTP1Channel(SharedChannel, Protocol):
    """
    An HTTP/1.1 connection from a client, read with llhttp, with monedge's
    limits; it answers one request at a time, holding what a client
    pipelines behind it.

    The attributes C{site}, C{factory}, C{requestFactory}, C{timeOut} and
    C{callLater} are set by the site and by Twisted's protocol switch, as
    on Twisted's channel; C{_networkProducer} and L{setTimeout} are what
    the switch uses when ALPN chooses HTTP/2 instead.
    """

    site: ProxySite
    #: The class of this channel's requests.
    requestClass: type[HTTP1Request] = HTTP1Request
    factory: Any = None
    requestFactory: Any = None
    timeOut: float | None = None
    callLater: Any = None
    persistent = True

    def __init__(self) -> None:
        self.requests: list[HTTP1Request] = []
        #: Once the connection is a tunnel: where its bytes go.
        self.tunnelSide: TunnelSide | None = None
        self._state = _HEAD
        # The head being read: its bytes so far (from the start of the line
        # being read), and what its complete lines said.
        self._buffer = b""
        self._inRequestLine = True
        self._blankSkipped = False
        self._headerBytes = 0
        self._headerCount = 0
        self._pendingHeader: bytes | None = None
        self._headerLines: list[bytes] = []
        self._length: int | None = 0
        self._framing: str | None = None
        self._version = b""
        # The body being read.
        self._remaining = 0
        self._chunks: _ChunkFraming | None = None
        self._parser: Any = None
        self._messageDone = False
        #: llhttp refused a chunk-size line not all read yet.
        self._parserFailed = False
        # Answering.
        self._answering = False
        self._held: list[bytes] = []
        self._heldBytes = 0
        self._dispatching = False
        self._heldHead: bytes | None = None
        self._requestProducer: Any = None
        self._waitingForTransport = False
        #: Why reading is paused, if it is: held input, a full transport,
        #: or a body the upstream takes slowly (its source).
        self._pauses: set[object] = set()
        #: A chunked body's trailer fields, as llhttp reads them.
        self._trailers: list[tuple[bytes, bytes]] = []
        # Timers: the header and body deadline, keep-alive idleness, the
        # lingering close and the abort after a time-out.
        self._deadline: IDelayedCall | None = None
        self._deadlineAt: float | None = None
        self._idle: IDelayedCall | None = None
        self._lastActive = 0.0
        self._lingering: IDelayedCall | None = None
        self._aborting: IDelayedCall | None = None
        self._refused = False
        #: The last response closes the connection.
        self._closing = False
        self._inBody = False
        #: The request's body is a stream the exchange times (a gRPC
        #: call's): the body timeout does not apply to it.
        self._bodyUnwatched = False
        self._host: Any = None
        self._peer: Any = None
        self._secure: bool | None = None
        self._networkProducer: Any = None

    def _later(self, delay: float, f: Any) -> IDelayedCall:
        call: IDelayedCall = self.site.reactor.callLater(delay, f)
        return call

    # The connection

    def getHost(self) -> Any:
        host = self._host
        if host is None:
            assert self.transport is not None
            host = self._host = self.transport.getHost()
        return host

    def getPeer(self) -> Any:
        peer = self._peer
        if peer is None:
            assert self.transport is not None
            peer = self._peer = self.transport.getPeer()
        return peer

    def isSecure(self) -> bool:
        secure = self._secure
        if secure is None:
            secure = self._secure = ISSLTransport.providedBy(self.transport)
        return secure

    def connectionMade(self) -> None:
        transport: Any = self.transport
        sendAtOnce(transport)
        setNoDelay = getattr(transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            try:
                setNoDelay(True)
            except OSError:
                pass
        if hasattr(transport, "bufferSize"):
            transport.bufferSize = _READ_SIZE
        self._networkProducer = transport
        transport.registerProducer(self, True)
        self.site.channels.add(self)
        self._lastActive = self.site.reactor.seconds()
        self._idle = self._later(self._idleTimeout(), self._idleFired)
        self._startDeadline()

    def _release(self) -> None:
        """
        Stop being the producer the transport pauses (once: a test's
        transport refuses a second time).
        """
        if self._networkProducer is not None:
            self._networkProducer = None
            transport: Any = self.transport
            transport.unregisterProducer()

    def _idleTimeout(self) -> float:
        timeout = self.timeOut
        if timeout is None:
            timeout = self.limits.keepAliveTimeout
        return timeout

    def setTimeout(self, timeout: float | None) -> None:
        """
        Only to stop idleness timing out the connection (L{None}), as
        Twisted's protocol switch does when HTTP/2 takes it over.
        """
        if timeout is None and self._idle is not None:
            if self._idle.active():
                self._idle.cancel()
            self._idle = None

    def startTunnel(self, side: TunnelSide) -> bytes:
        """
        Stop speaking HTTP: every byte from now on goes to C{side}.

        @return: the bytes that arrived after the request and were held.
        """
        self.tunnelSide = side
        self.setTimeout(None)
        self._cancelDeadline()
        held = b"".join(self._held)
        self._held = []
        self._heldBytes = 0
        transport: Any = self.transport
        self._release()
        if self._pauses:
            self._pauses.clear()
            transport.resumeProducing()
        return held

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        side = self.tunnelSide
        if side is not None:
            side.lost(reason)
        self._cancelDeadline()
        self.setTimeout(None)
        for call in (self._lingering, self._aborting):
            if call is not None and call.active():
                call.cancel()
        self._lingering = self._aborting = None
        self.site.channels.discard(self)
        for request in list(self.requests):
            request.connectionLost(reason)
        self.requests = []
        self.site.checkDrained()

    def isIdle(self) -> bool:
        """
        Is the connection between requests, with nothing in progress?
        """
        return not self._answering and not self.requests and not self._buffer

    def loseConnection(self) -> None:
        self.flushHead()
        transport: Any = self.transport
        if transport is None:
            return
        self._release()
        transport.loseConnection()

    # Idleness: one timer, which re-arms itself for a later deadline.

    def _idleFired(self) -> None:
        self._idle = None
        timeout = self._idleTimeout()
        if self._answering:
            # Answering a request is not idleness.
            self._idle = self._later(timeout, self._idleFired)
            return
        remaining = self._lastActive + timeout - self.site.reactor.seconds()
        if remaining > 0:
            self._idle = self._later(remaining, self._idleFired)
            return
        self.loseConnection()
        transport: Any = self.transport
        if transport is not None:
            self._aborting = self._later(_ABORT_TIMEOUT, transport.abortConnection)

    # Reading

    def dataReceived(self, data: bytes) -> None:
        side = self.tunnelSide
        if side is not None:
            side.received(data)
            return
        if self._refused or self._closing:
            return
        now = self.site.reactor.seconds()
        self._lastActive = now
        if self._inBody and not self._bodyUnwatched:
            # The body moved: its idle deadline starts again (or starts: a
            # client asked to wait for 100 Continue may send it anyway).
            if self._deadlineAt is None:
                self._startDeadline(self.limits.bodyTimeout)
            else:
                self._deadlineAt = now + self.limits.bodyTimeout
        self._dispatch(data)

    def _dispatch(self, data: bytes) -> None:
        self._dispatching = True
        try:
            while (
                data
                and not self._refused
                and not self._closing
                and self.tunnelSide is None
            ):
                if self._answering and self._state == _HEAD:
                    self._hold(data)
                    return
                if self._state == _HEAD:
                    data = self._readHead(data)
                else:
                    data = self._readBody(data)
        finally:
            self._dispatching = False

    def _hold(self, data: bytes) -> None:
        """
        Keep bytes that came while a request is answered, for after it;
        stop reading past a small amount.
        """
        self._held.append(data)
        self._heldBytes += len(data)
        if self._heldBytes > _EAGER_READ:
            self._pauseReading(_FOR_HELD)

    def _pauseReading(self, reason: object) -> None:
        """
        Stop reading the client, for C{reason} (until it is resumed).
        """
        pauses = self._pauses
        if reason in pauses:
            return
        if not pauses:
            transport: Any = self.transport
            if transport is not None:
                transport.pauseProducing()
        pauses.add(reason)
        if isinstance(reason, _BodySource) and self._inBody:
            # monedge stopped reading the body: it is not the client's stall.
            self._stopDeadline()

    def _resumeReading(self, reason: object) -> None:
        """
        C{reason} to stop reading the client is gone.
        """
        pauses = self._pauses
        if reason not in pauses:
            return
        pauses.discard(reason)
        if isinstance(reason, _BodySource) and self._inBody and not self._bodyUnwatched:
            self._startDeadline(self.limits.bodyTimeout)
        if not pauses:
            transport: Any = self.transport
            if transport is not None:
                transport.resumeProducing()

    def _readHead(self, data: bytes) -> bytes:
        """
        Read head lines from C{data}; return what follows the head, if it
        ended in C{data}.
        """
        if self._inRequestLine:
            self._startDeadline()
        buf = self._buffer + data if self._buffer else data
        pos = 0
        while True:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            line = buf[pos:end]
            pos = end + 2
            done = self._lineReceived(line)
            if self._refused:
                self._buffer = b""
                return b""
            if done:
                self._buffer = b""
                rest = buf[pos:]
                self._headReceived()
                return b"" if self._refused else rest
        partial = buf[pos:] if pos else buf
        self._buffer = partial
        limits = self.limits
        if len(partial) > max(limits.maxRequestLine, limits.maxHeaderLine):
            self._buffer = b""
            if self._inRequestLine:
                self.refuse("uri_too_long")
            else:
                self._refuseForRequest("headers_too_large")
        return b""

    def _lineReceived(self, line: bytes) -> bool:
        """
        One line of the head; whether it was the head's last.
        """
        limits = self.limits
        if self._inRequestLine:
            if len(line) > limits.maxRequestLine:
                self.refuse("uri_too_long")
                return False
            if not line and not self._blankSkipped:
                # An empty line before a request line is skipped, once per
                # request (Twisted's channel does).
                self._blankSkipped = True
                return False
            self._inRequestLine = False
            try:
                method, target, version = parseRequestLine(line)
            except ValueError:
                self.refuse("bad_request")
                return False
            self._version = version
            self.requests.append(self.requestClass(self, method, target, version))
            return False
        if not line:
            pending = self._pendingHeader
            if pending is not None:
                self._pendingHeader = None
                self._headerReceived(pending)
            return not self._refused
        if len(line) > limits.maxHeaderLine:
            self._refuseForRequest("headers_too_large")
            return False
        if line[0] in b" \t":
            self.refuse("bad_request", message="obsolete line folding is refused")
            return False
        self._headerCount += 1
        self._headerBytes += len(line)
        if (
            self._headerCount > limits.maxHeaderCount
            or self._headerBytes > limits.maxHeadersSize
        ):
            self._refuseForRequest("headers_too_large")
            return False
        pending = self._pendingHeader
        self._pendingHeader = line
        if pending is not None:
            self._headerReceived(pending)
        return False

    def _headerReceived(self, line: bytes) -> None:
        """
        One header line, checked as today's channel checks it, and kept.
        """
        name, sep, value = line.partition(b":")
        underscore = name.find(b"_") >= 0 and self.limits.underscoreHeaders != "allow"
        if (
            not underscore
            and sep
            and name.strip(b" \t").lower() == b"transfer-encoding"
        ):
            if self._version != b"HTTP/1.1":
                self._refuseForRequest("bad_request")
                return
            if value.strip(b" \t").lower() != b"chunked":
                self._refuseForRequest("bad_request")
                return
        if not sep:
            self._refuseForRequest("bad_request")
            return
        try:
            canonical = canonicalHeaderName(name)
        except ValueError:
            self._refuseForRequest("bad_request")
            return
        value = value.strip(b" \t")
        if len(value.translate(None, b"\x00\r\n")) != len(value):
            self._refuseForRequest("bad_request")
            return
        if canonical == b"Content-Length":
            if not value.isdigit() or self._framing is not None:
                self._refuseForRequest("bad_request")
                return
            self._framing = "length"
            self._length = int(value)
        elif canonical == b"Transfer-Encoding":
            lowered = value.lower()
            if lowered == b"chunked":
                if self._framing is not None:
                    self._refuseForRequest("bad_request")
                    return
                self._framing = "chunked"
                self._length = None
            elif lowered != b"identity":
                self._refuseForRequest("bad_request")
                return
        request = self.requests[-1]
        request.headerTable.setdefault(canonical, []).append(value)
        if canonical != b"Upgrade" and canonical != b"Content-Length":
            # llhttp reads an Upgrade as the end of HTTP (see the module's
            # docstring), and a Content-Length over 64 bits as malformed
            # (Twisted's channel as too large, 413), and never reads a
            # Content-Length body here: it checks every other header, as
            # Twisted read it (its value without the whitespace around it,
            # which llhttp reads differently in some headers: "chunked\t").
            self._headerLines.append(canonical + b": " + value)
        if underscore:
            if self.limits.underscoreHeaders == "reject":
                self._refuseForRequest("bad_request", UNDERSCORE_REFUSED)
                return
            request.requestHeaders.removeHeader(canonical)

    def _headReceived(self) -> None:
        """
        The head is in: llhttp checks it, the request routes itself, and
        the body, if any, is read next.
        """
        self._stopDeadline()
        request = self.requests[-1]
        version = self._version
        # Only a chunked body is read through the parser (its callbacks);
        # any other head is only checked, with no callback into Python.
        parser = httptools.HttpRequestParser(
            self if self._framing == "chunked" else _HEAD_CHECK
        )
        self._messageDone = False
        head = b"\r\n".join([b"PUT / " + version, *self._headerLines, b"", b""])
        self._headerLines = []
        try:
            parser.feed_data(head)
        except httptools.HttpParserError:
            self._refuseForRequest("bad_request")
            return
        self.persistent = self._checkPersistence(request, version)
        length = self._length
        request.gotLength(length)
        if self._refused:
            return
        self._answering = True
        stream = request.bodyStream
        if stream is None:
            self._bodyEnded()
        else:
            self._state = _BODY
            self._inBody = True
            expect = request.headerTable.get(b"Expect")
            if (
                expect
                and expect[0].lower() == b"100-continue"
                and version == b"HTTP/1.1"
            ):
                # 100 only once the body is wanted: when the upstream starts
                # taking it (or it starts to be buffered), never when a hook
                # or a refusal answers first.  The body deadline starts then,
                # or with the body's first bytes.
                stream.started = self._sendContinue
            else:
                self._startDeadline(self.limits.bodyTimeout)
            if length is None:
                self._parser = parser
                self._chunks = _ChunkFraming(self.limits.maxHeadersSize)
                self._trailers = []
            else:
                self._remaining = length
        # Decided on the headers: the request is answered while its body,
        # if any, streams.
        request.process()

    def _sendContinue(self) -> None:
        """
        The upstream takes the body now: tell a client waiting for it.
        """
        if self._refused or self._closing or not self._inBody or not self.requests:
            return
        request = self.requests[-1]
        if request.startedWriting or request.finished:
            return
        transport: Any = self.transport
        transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not self._bodyUnwatched:
            self._startDeadline(self.limits.bodyTimeout)

    def _readBody(self, data: bytes) -> bytes:
        """
        Read body bytes from C{data}; return what follows the body, if it
        ended in C{data}.
        """
        request = self.requests[-1]
        chunks = self._chunks
        if chunks is None:
            remaining = self._remaining
            if len(data) <= remaining:
                body, rest = data, b""
            else:
                body, rest = data[:remaining], data[remaining:]
            self._remaining = remaining - len(body)
            request.handleContentChunk(body)
            if self._refused or self._closing:
                return b""
            if not self._remaining:
                self._bodyEnded()
                return rest
            return b""
        failed = self._parserFailed
        try:
            end = chunks.scan(data, request._bodyLimit)
        except _TooLarge:
            request._refuse("body_too_large")
            return b""
        except _TrailersTooLarge:
            self._refuseForRequest("headers_too_large")
            return b""
        except _Malformed:
            self._refuseForRequest("bad_request")
            return b""
        if failed:
            if chunks.partialSize() is None:
                # The line llhttp refused is all in, and no worse than
                # malformed.
                self._refuseForRequest("bad_request")
            return b""
        body = data if end < 0 else data[:end]
        try:
            self._parser.feed_data(body)
        except httptools.HttpParserError:
            if chunks.partialSize() is not None:
                # llhttp refuses a chunk-size over 64 bits as soon as it
                # reads its digits; Twisted's channel read the whole line
                # first, and found it malformed (400) or too large (413):
                # so does this one, by the framing.
                self._parserFailed = True
                return b""
            self._refuseForRequest("bad_request")
            return b""
        if self._refused or self._closing:
            return b""
        if self._messageDone != (end >= 0):
            # llhttp and the framing disagree on where the body ends.
            self._refuseForRequest("bad_request")
            return b""
        if end < 0:
            return b""
        trailers = self._trailers
        if len(trailers) > self.limits.maxHeaderCount:
            self._refuseForRequest("headers_too_large")
            return b""
        checked = trailerFields(trailers, self.limits.underscoreHeaders)
        if checked is None:
            self._refuseForRequest("bad_request", UNDERSCORE_REFUSED)
            return b""
        self._bodyEnded(checked)
        return data[end:]

    # llhttp's callbacks

    def on_body(self, body: bytes) -> None:
        self.requests[-1].handleContentChunk(body)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._state == _BODY:
            # A trailer field (the head's fields are read line by line).
            self._trailers.append((name, value))

    def on_message_complete(self) -> None:
        self._messageDone = True

    def _checkPersistence(self, request: HTTP1Request, version: bytes) -> bool:
        """
        Whether the connection stays open after this request: HTTP/1.1
        unless a C{Connection} header's token list says C{close}.
        """
        tokens = connectionTokens(request.headerTable.get(b"Connection"))
        if version == b"HTTP/1.1" and b"close" not in tokens:
            return True
        if version == b"HTTP/1.1":
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        return False

    def _bodyEnded(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        """
        The request's body is all in (or it had none): the next bytes are
        the next request's, held until this one is answered.
        """
        self._inBody = False
        self._bodyUnwatched = False
        self._stopDeadline()
        self._state = _HEAD
        self._inRequestLine = True
        self._blankSkipped = False
        self._headerBytes = 0
        self._headerCount = 0
        self._length = 0
        self._framing = None
        self._parser = None
        self._chunks = None
        self._trailers = []
        self._parserFailed = False
        request = self.requests[-1]
        if trailers is not None or request.bodyStream is not None:
            request.bodyEnded(trailers or [])

    # Answering

    def requestDone(self, request: HTTP1Request) -> None:
        """
        C{request}'s response is all written.
        """
        self.flushHead()
        if self.site.draining:
            self.persistent = False
        if request in self.requests:
            self.requests.remove(request)
        if self._state == _BODY:
            # Answered before its body was all read (a refusal, a hook's
            # answer, an upstream's early one): the rest is not read as a
            # request; the connection closes, lingering so that the client
            # reads the answer.
            self._inBody = False
            self._cancelDeadline()
            self._refused = True
            self._lingeringClose()
            return
        if not self._waitingForTransport:
            self._resumeReading(_FOR_HELD)
        if not self.persistent:
            # Nothing more is read as a request (Twisted's channel drops it).
            self._closing = True
            self._held = []
            self._heldBytes = 0
            self.loseConnection()
            return
        self._answering = False
        # Idleness is measured from the end of the response.
        self._lastActive = self.site.reactor.seconds()
        if self._dispatching:
            # Answered while its own read is parsed: the rest of that read
            # is parsed next, by _dispatch.
            return
        held = b"".join(self._held)
        self._held = []
        self._heldBytes = 0
        if held:
            self._dispatch(held)

    # The request's producer, and this channel as the transport's

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self._requestProducer is not None:
            raise RuntimeError(
                f"Cannot register producer {producer}, because producer"
                f" {self._requestProducer} was never unregistered."
            )
        if not streaming:
            raise RuntimeError("only streaming producers are supported")
        self._requestProducer = producer
        if self._waitingForTransport:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self._requestProducer = None

    def pauseProducing(self) -> None:
        self._waitingForTransport = True
        if self._requestProducer is not None:
            self._requestProducer.pauseProducing()
        if not self._answering:
            self._pauseReading(_FOR_WRITES)

    def resumeProducing(self) -> None:
        self._waitingForTransport = False
        if self._requestProducer is not None:
            self._requestProducer.resumeProducing()
        self._resumeReading(_FOR_WRITES)
        if self._heldBytes <= _EAGER_READ:
            self._resumeReading(_FOR_HELD)

    def stopProducing(self) -> None:
        if self._requestProducer is not None:
            self._requestProducer.stopProducing()

    # Refusals

    def refuse(
        self,
        code: str,
        requestId: bytes | None = None,
        message: str | None = None,
        request: HTTP1Request | None = None,
    ) -> None:
        """
        Answer with an error and close the connection, parsing nothing
        more from it; the close lingers (L{LINGER}), as today's channel's.
        """
        if self._refused:
            return
        self._refused = True
        self._cancelDeadline()
        self.setTimeout(None)
        if request is not None and request._inFlight:
            self._refuseInFlight(request, code, message)
            return
        rid = requestId or newRequestId()
        current = self.requests[-1] if self.requests else None
        if request is not None:
            request._accounted = True
            record = request.record
        else:
            record = RequestRecord(None)
            if current is not None:
                # The request line was read: the request is refused here.
                current._accounted = True
        transport: Any = self.transport
        method = current.method if current is not None else None
        path = current.uri if current is not None else None
        head = method == b"HEAD"
        grpc = request is not None and isGrpcRequest(request)
        grpcType = (
            grpcRefusalType(request)
            if grpc and request is not None
            else b"application/grpc"
        )
        transport.write(rawErrorResponse(code, rid, message, head, grpc, grpcType))
        if grpc:
            record.grpcStatus = grpcStatus(code, CATALOGUE[code][0])
        record.requestId = rid
        host = getattr(self.getPeer(), "host", None)
        record.client = b"unknown" if host is None else str(host).encode("ascii")
        record.method, record.path = method, path
        record.failed(code)
        record.finished(
            200 if grpc else CATALOGUE[code][0], self.site.reactor.seconds()
        )
        self.site.refusalLogged(record)
        self._lingeringClose()

    def _refuseInFlight(
        self, request: HTTP1Request, code: str, message: str | None
    ) -> None:
        """
        Refuse a request whose body was still being read when it was
        already being answered (too large, malformed, stalled): its
        exchange stops, and the client gets the refusal if no response has
        started, else a cut-off connection.
        """
        request.abandon()
        request.record.failed(code)
        status = CATALOGUE[code][0]
        transport: Any = self.transport
        if request.startedWriting or request.finished:
            request._account(status)
            self._release()
            transport.abortConnection()
            return
        grpc = isGrpcRequest(request)
        if grpc:
            request.record.grpcStatus = grpcStatus(code, status)
            status = 200
        request.code = status
        transport.write(
            rawErrorResponse(
                code,
                request.requestId,
                message,
                request.method == b"HEAD",
                grpc,
                grpcRefusalType(request),
            )
        )
        request._account(status)
        self._lingeringClose()

    def _lingeringClose(self) -> None:
        """
        Close after an answer the client may still be sending a request
        behind: half-close, discard what comes, and abort after L{LINGER}
        (a TLS connection closes whole, its answer first).
        """
        self._closing = True
        transport: Any = self.transport
        self._release()
        if self._pauses:
            # Drain what comes while lingering, a body too.
            self._pauses.clear()
            transport.resumeProducing()
        halfClose = getattr(transport, "loseWriteConnection", None)
        if halfClose is None or self.isSecure():
            transport.loseConnection()
            return
        halfClose()
        abort = getattr(transport, "abortConnection", transport.loseConnection)
        self._lingering = self._later(LINGER, abort)


if typing.TYPE_CHECKING:
    # For mypy: the request is what the exchange and the resource tree use
    # of one, and the channel what a WebSocket handshake's exchange uses.
    _requestType: type[ClientRequest] = HTTP1Request
    _channelType: type[TunnelChannel] = HTTP1Channel
