"""
The client side of the wire: monedge's L{Site}, its HTTP/1.1 channel and
its request class.

The channel enforces the limits that must be checked before there is a
request to answer through: the request line and header sizes (414, 431),
the header deadline (408) and malformed framing (400), each answered with
the JSON error body and a closed connection.  The request routes itself as
soon as its headers are in, so that an oversized body is refused (413)
before it is read.

What these classes need of Twisted's that is not public (the table
inside L{Headers}, the request line as it is read, the channel's private
steps and its state between requests) they get from
L{monedge.twistedseam}.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from io import BytesIO
from typing import IO, TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocolNegotiationFactory,
)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import Request as HTTPRequest
from zope.interface import implementer

from monedge.edge.base import CLIENT_CLOSED as CLIENT_CLOSED
from monedge.edge.base import UNDERSCORE_REFUSED as UNDERSCORE_REFUSED
from monedge.edge.base import SharedChannel, SharedRequest
from monedge.edge.switch import ProtocolSwitch
from monedge.observe.accesslog import AccessLog
from monedge.observe.metrics import NO_SERVICE, Metrics, ServiceMetrics
from monedge.record import RequestRecord
from monedge.rules.errors import CATALOGUE, ProxyError, rawErrorResponse, renderError
from monedge.rules.headers import (
    DEFAULT_RULES,
    ForwardingRules,
    connectionTokens,
    newRequestId,
)
from monedge.rules.limits import DEFAULT_LIMITS, Limits
from monedge.twistedseam import (
    HTTPChannelBase,
    channelOf,
    chunkRemaining,
    rawHeaderTable,
    releaseTransport,
    requestLine,
    requestLineSoFar,
    sendAtOnce,
    takeHeldInput,
    unparsedInput,
)
from monedge.upstream.tunnel import TunnelSide

if TYPE_CHECKING:
    from monedge.proxy.exchange import ProxyExchange

_log = Logger()

#: Twisted's HTTP write, under twisted.web.server's (see ProxyRequest.write).
#: Bound at import: attribute lookups on twisted.web.http go through its
#: deprecation proxy, which costs more than the layer skipped.
_httpWrite = HTTPRequest.write

#: Seconds a refused connection is kept half-open, discarding input, so the
#: client reads the refusal instead of a reset.
LINGER = 2.0


class ProxyRequest(SharedRequest, server.Request):
    """
    A request to the proxy.  It routes itself as soon as its headers
    arrive, and accounts for itself (access log, metrics, in-flight count)
    exactly once, however it ends.
    """

    defaultContentType = None
    site: ProxySite
    #: The exchange proxying this request, once it has started; told if
    #: the client goes before the response is finished.
    exchange: ProxyExchange | None = None

    # Per-request state, its defaults on the class: a request sets only
    # what it changes (this runs per request).  What the request did, for
    # the access log and the metrics, is in its record.
    hasBody = False
    _bodyLimit: int | None = None
    _refused = False
    _accounted = False
    _inFlight = False
    #: The metrics of the service the request is in flight for.
    _metrics: ServiceMetrics
    _requestId: bytes | None = None
    _peerAddress: bytes | None = None
    #: Whether the connection the request came on was lost (set by
    #: connectionLost, which Twisted calls when it is).
    disconnected = False

    def __init__(self, channel: Any, queued: object = None) -> None:
        if queued is None:
            super().__init__(channel)
        else:
            super().__init__(channel, queued)
        site: ProxySite = channel.site
        self.site = site
        #: What this request did (L{monedge.record}): this request owns it.
        self.record = RequestRecord(site.reactor.seconds())
        #: The request headers' table (L{rawHeaderTable}), looked up once.
        self.headerTable = rawHeaderTable(self.requestHeaders)

    # Receiving

    @property
    def isHTTP2(self) -> bool:
        """
        Never: HTTP/2 is served by L{monedge.edge.http2}.
        """
        return False

    def gotLength(self, length: int | None) -> None:
        self.hasBody = length is None or length > 0
        command, path, version = requestLine(self.channel)
        decision = self.site.resource.decide(
            command, path, version, self.headerTable, self.record
        )
        error = getattr(decision, "error", None)
        if error is not None and self.hasBody:
            # The answer is already known: give it now rather than read a
            # body nobody will use, and close, since the body is not read.
            self._refuse(error.code, error.message)
            return
        policy = getattr(decision, "policy", None)
        if policy is not None:
            limit = policy.maxBodySize
            if length is not None and length > limit:
                self._refuse("body_too_large")
                return
            if length is None:
                self._bodyLimit = limit
        super().gotLength(length)

    def _refuse(self, code: str, message: str | None = None) -> None:
        self._refused = True
        self._accounted = True
        channel = cast(ProxyChannel, self.channel)
        channel.refuse(code, self.requestId, message, request=self)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        The whole request is in.  Unlike Twisted's, this does not parse the
        query string or form bodies: a proxy forwards them untouched.
        """
        if self._refused:
            return
        content = self.content
        assert content is not None
        content.seek(0, 0)
        self.args = {}
        self.method, self.uri = command, path
        self.clientproto = version
        self.path = path.partition(b"?")[0]
        self.process()

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
        # Twisted's traversal (Site.getResourceFor), done directly: the
        # root resolves the whole target as its one child (RootResource.
        # getChild), and the traversal ends there.
        self.sitepath: list[bytes] = []
        self.prepath = [b""]
        self.postpath = []
        try:
            resource = site.resource.getChildWithDefault(b"", self)
            self.render(resource)
        except BaseException:
            self.processingFailed(Failure())

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
        self.responseHeaders = type(self.responseHeaders)()
        body = renderError(self, ProxyError("internal_error"), self.requestId)
        self.write(body)
        self.finish()

    # Ending

    def finish(self) -> None:
        super().finish()
        self._account(self.code)

    def connectionLost(self, reason: Failure) -> None:
        self.disconnected = True
        channel = getattr(self, "channel", None)
        if channel is None and self.finished:
            # Twisted lets go of a finished request's channel: the request
            # was accounted for when it finished.
            return
        super().connectionLost(reason)
        if self.method is HTTPRequest.method and isinstance(channel, ProxyChannel):
            # The client left before its request was all in: log the request
            # line that came (this request is the one the channel parsed).
            command, path, _ = requestLineSoFar(channel)
            if command is not None:
                self.method = command
            if path is not None:
                self.uri = path
        exchange = self.exchange
        if exchange is not None and not self.finished:
            exchange.clientLost(reason)
        if self.record.tunnelled:
            # Accounted for when the tunnel, both its connections, ends.
            return
        if not self.finished:
            self._account(CLIENT_CLOSED if not self.record.errorCode else self.code)

    def _account(self, status: int) -> None:
        if self._accounted:
            return
        self._accounted = True
        # The request is over: let go of its exchange, which refers back to
        # it, so that both are freed at once rather than by the cyclic
        # garbage collector.
        self.exchange = None
        site = self.site
        if self._inFlight:
            self._inFlight = False
            site.inFlight -= 1
            self._metrics.inFlight -= 1
        record = self.record
        record.requestId = self.requestId
        record.client = self.peerAddress
        # A request line that arrived (not Twisted's "(no method yet)"
        # placeholders).
        method, uri = self.method, self.uri
        if not method.startswith(b"(no "):
            record.method = method
        if not uri.startswith(b"(no "):
            record.path = uri
        if not record.tunnelled:
            record.bytesOut = self.sentLength
        record.finished(status, site.reactor.seconds(), self.code)
        site.requestDone(record)

    def parseCookies(self) -> None:
        """
        Cookies are forwarded untouched, never read: Twisted's parsing of
        them into C{received_cookies} is skipped (this runs per request).
        """

    def write(self, data: bytes) -> None:
        """
        Twisted's HTTP write, without twisted.web.server's layer above it
        (this runs per write).  That layer adds a default Content-Type,
        which a proxy never sets (defaultContentType is None), encodes the
        body for a resource with an encoder, which only its own process
        looks for (this request's does not), and drops the body of a HEAD
        it answers with a GET for a resource that cannot answer HEAD,
        which no resource of monedge's is (each renders every method).
        """
        if not self.startedWriting and self.site.draining:
            self._closeAfterResponse()
        _httpWrite(self, data)

    def setTrailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """
        Twisted's request sends no trailers: they are dropped.
        """

    def flushHead(self) -> None:
        """
        Send the response head now if it is still held for the body's
        first bytes (HTTP/1.1 only; see L{ProxyChannel.writeHeaders}).  A
        finished request has nothing held: its channel sent it all.
        """
        if self.finished or self.disconnected:
            return
        cast(ProxyChannel, self.channel).flushHead()


class ProxyChannel(SharedChannel, HTTPChannelBase):
    """
    An HTTP/1.1 connection from a client, with monedge's limits.

    Twisted's own limits are set above monedge's, so that monedge's checks
    answer first, with the right status and a JSON body.
    """

    site: ProxySite
    maxHeaders = 10_000
    totalHeadersSize = 1 << 20

    def __init__(self) -> None:
        super().__init__()
        self._inRequestLine = True
        self._headerBytes = 0
        self._headerCount = 0
        self._deadline: IDelayedCall | None = None
        self._deadlineAt: float | None = None
        self._lingering: IDelayedCall | None = None
        self._refused = False
        self._inBody = False
        self._host: Any = None
        self._peer: Any = None
        self._secure: bool | None = None
        self._heldHead: bytes | None = None
        #: Answering a request: from its being all in until its response
        #: is done (Twisted holds what arrives meanwhile).
        self._answering = False
        #: Once the connection is a tunnel: where its bytes go.
        self.tunnelSide: TunnelSide | None = None

    # A connection's addresses and security do not change: each request
    # asked the transport again (a getsockname system call, a new address
    # object, an interface adaptation).

    def getHost(self) -> Any:
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    def getPeer(self) -> Any:
        peer = self._peer
        if peer is None:
            peer = self._peer = super().getPeer()
        return peer

    def isSecure(self) -> bool:
        secure = self._secure
        if secure is None:
            secure = self._secure = super().isSecure()
        return secure

    def connectionMade(self) -> None:
        self.MAX_LENGTH = max(self.limits.maxRequestLine, self.limits.maxHeaderLine)
        sendAtOnce(self.transport)
        super().connectionMade()
        self.site.channels.add(self)
        self._startDeadline()

    def startTunnel(self, side: TunnelSide) -> bytes:
        """
        Stop speaking HTTP: every byte from now on goes to C{side}, and
        nothing here times the connection out any more (the tunnel has its
        own idle timeout).

        @return: the bytes that arrived after the request and were held.
        """
        self.tunnelSide = side
        self.setTimeout(None)
        self._cancelDeadline()
        held = takeHeldInput(self)
        transport = self.transport
        assert transport is not None
        # The channel stops being the producer the connection pauses; the
        # tunnel's other side becomes it.
        transport.unregisterProducer()
        return held

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        side = self.tunnelSide
        if side is not None:
            side.lost(reason)
        self._cancelDeadline()
        if self._lingering is not None and self._lingering.active():
            self._lingering.cancel()
        self.site.channels.discard(self)
        super().connectionLost(reason)
        self.site.checkDrained()

    def _later(self, delay: float, f: Any) -> IDelayedCall:
        """
        Schedule C{f} on the channel's clock (L{SharedChannel}'s timer).
        """
        call: IDelayedCall = self.callLater(delay, f)
        return call

    def dataReceived(self, data: bytes) -> None:
        side = self.tunnelSide
        if side is not None:
            side.received(data)
            return
        if self._refused:
            # Refused: nothing more is parsed (see refuse).
            return
        if self._inBody:
            # The body moved: its idle deadline starts again.
            self._deadlineAt = self.site.reactor.seconds() + self.limits.bodyTimeout
        elif self._inRequestLine and not self._answering:
            self._startDeadline()
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._stopDeadline()
        super().allHeadersReceived()
        # Until the body is in (at once, for a request without one), the
        # same timer is the body's idle deadline, pushed back by each read.
        self._inBody = True
        self._startDeadline(self.limits.bodyTimeout)

    def loseConnection(self) -> None:
        self.flushHead()
        super().loseConnection()

    def continueAllowed(self) -> bool:
        # A request refused on its headers (413) gets its refusal, not an
        # invitation to send the body after it.
        return not self._refused

    def allContentReceived(self) -> None:
        self._inBody = False
        self._stopDeadline()
        self._inRequestLine = True
        self._headerBytes = 0
        self._headerCount = 0
        # Twisted cancels the idle timer here and makes a new one when the
        # response is done: a timer per request.  Instead the timer stays,
        # and timeoutConnection ignores it while a request is answered.
        idle, self.timeOut = self.timeOut, None
        self._answering = True
        try:
            super().allContentReceived()
        finally:
            self.timeOut = idle

    def timeoutConnection(self) -> None:
        if self._answering:
            # Answering a request is not idleness: look again later (the
            # fired timer is spent, so arm a new one).
            self.setTimeout(self.timeOut)
            return
        super().timeoutConnection()

    def requestDone(self, request: Any) -> None:
        self.flushHead()
        if self.site.draining:
            self.persistent = False
        if self.persistent:
            # Before Twisted's: it hands on at once what arrived meanwhile.
            self._answering = False
        # What arrived meanwhile, a pipelined request, is handed to
        # dataReceived, which starts its header deadline.
        super().requestDone(request)
        # Idleness is measured from the end of the response.
        self.resetTimeout()
        if self.persistent and unparsedInput(self):
            # A pipelined request is partly here already, parsed in the
            # same read as the last (so dataReceived will not see it
            # again): its header deadline runs now.
            self._startDeadline()

    # Limits

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if self._inRequestLine:
            if len(line) > self.limits.maxRequestLine:
                self.refuse("uri_too_long")
                return
            if line:
                self._inRequestLine = False
        elif line:
            if len(line) > self.limits.maxHeaderLine:
                self._refuseForRequest("headers_too_large")
                return
            if line[0] in b" \t":
                self._refuseForRequest(
                    "bad_request", "obsolete line folding is refused"
                )
                return
            self._headerCount += 1
            self._headerBytes += len(line)
            limits = self.limits
            if (
                self._headerCount > limits.maxHeaderCount
                or self._headerBytes > limits.maxHeadersSize
            ):
                self._refuseForRequest("headers_too_large")
                return
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        """
        Refuse framing Twisted would accept but other hops may read
        differently: any transfer coding but C{chunked} (C{identity}
        included), and any transfer coding on an HTTP/1.0 request.
        """
        name, sep, value = line.partition(b":")
        # find, not "in" (see monedge.rules.paths.normalise): per header line.
        if name.find(b"_") >= 0 and self.limits.underscoreHeaders != "allow":
            return self._underscoreHeader(line, name)
        if sep and name.strip(b" \t").lower() == b"transfer-encoding":
            if requestLineSoFar(self)[2] != b"HTTP/1.1":
                self._refuseForRequest("bad_request")
                return False
            if value.strip(b" \t").lower() != b"chunked":
                self._refuseForRequest("bad_request")
                return False
        ok: bool = super().headerReceived(line)
        return ok

    def _underscoreHeader(self, line: bytes, name: bytes) -> bool:
        """
        A header whose name has an underscore: checked like any other, then
        dropped, or, with C{--underscore-headers reject}, refused.  An
        upstream that reads C{-} and C{_} as one (CGI, WSGI) cannot then
        take it for a header monedge sets or strips.
        """
        ok: bool = super().headerReceived(line)
        if not ok:
            return False
        if self.limits.underscoreHeaders == "reject":
            self._refuseForRequest("bad_request", UNDERSCORE_REFUSED)
            return False
        self.requests[-1].requestHeaders.removeHeader(name)
        return True

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """
        Like Twisted's, but reads every C{Connection} header as the
        comma-separated token list it is (C{Connection: close, X-Foo}
        closes).
        """
        tokens = connectionTokens(request.headerTable.get(b"Connection"))
        if version == b"HTTP/1.1" and b"close" not in tokens:
            return True
        if version == b"HTTP/1.1":
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        return False

    def rawDataReceived(self, data: bytes) -> None:
        super().rawDataReceived(data)
        # A chunk that declares more than the body may hold is refused as
        # soon as its size line is read (as nginx does), not once the
        # bytes have come: a client cannot hold the connection on a size
        # it will never send.
        remaining = chunkRemaining(self)
        if remaining is not None:
            request = self.requests[-1] if self.requests else None
            if request is not None and not request._refused:
                limit = request._bodyLimit
                if limit is not None and request.record.bytesIn + remaining > limit:
                    request._refuse("body_too_large")

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._inRequestLine:
            self.refuse("uri_too_long")
        else:
            self._refuseForRequest("headers_too_large")

    def badRequest(self) -> None:
        self._refuseForRequest("bad_request")

    def refuse(
        self,
        code: str,
        requestId: bytes | None = None,
        message: str | None = None,
        request: ProxyRequest | None = None,
    ) -> None:
        """
        Answer with an error and close the connection, parsing nothing
        more from it.

        The close lingers: monedge half-closes after the response and
        discards what the client still sends for up to L{LINGER} seconds.
        Closing at once with unread data would make the kernel reset the
        connection, and a client still uploading would see the reset
        instead of the answer.
        """
        if self._refused:
            return
        self._refused = True
        self._cancelDeadline()
        self.setTimeout(None)
        rid = requestId or newRequestId()
        if request is not None:
            request._accounted = True
            record = request.record
        else:
            record = RequestRecord(None)
        transport = self.transport
        assert transport is not None
        # A request line already read says whether this answers a HEAD
        # (Twisted deletes it once a request is all in).
        command, path, _ = requestLineSoFar(self)
        head = command == b"HEAD"
        transport.write(rawErrorResponse(code, rid, message, head))
        record.requestId = rid
        host = getattr(transport.getPeer(), "host", None)
        record.client = b"unknown" if host is None else str(host).encode("ascii")
        record.method, record.path = command, path
        record.failed(code)
        record.finished(CATALOGUE[code][0], self.site.reactor.seconds())
        self.site.refusalLogged(record)
        releaseTransport(self)
        halfClose = getattr(transport, "loseWriteConnection", None)
        if halfClose is None or self.isSecure():
            # Over TLS a half-close would end the session before Twisted's
            # TLS layer has sent the answer: close it whole, answer first.
            transport.loseConnection()
            return
        halfClose()
        abort = getattr(transport, "abortConnection", transport.loseConnection)
        self._lingering = self.callLater(LINGER, abort)

    def isIdle(self) -> bool:
        """
        Is the connection between requests, with nothing in progress?
        """
        return not self._answering and not self.requests and not unparsedInput(self)


class ProxySite(server.Site):
    """
    The proxy's site: its resource is a L{monedge.proxy.resource.RootResource}.

    @ivar draining: set on SIGTERM; responses then close their connection.
    @ivar inFlight: requests received and not yet answered.
    @ivar channels: open client connections.
    """

    requestFactory = ProxyRequest  # type: ignore[assignment]
    displayTracebacks = False
    #: Makes the HTTP/1.1 channel of each connection: L{ProxyChannel}, or
    #: monedge's own (L{monedge.edge.http1}) when the composition root
    #: chooses it.
    channelFactory: Callable[[], Any] = ProxyChannel

    def __init__(
        self,
        resource: Any,
        *,
        reactor: Any,
        metrics: Metrics,
        accessLog: AccessLog,
        forwarding: ForwardingRules = DEFAULT_RULES,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(resource, timeout=limits.keepAliveTimeout, reactor=reactor)
        self.reactor = reactor
        self.metrics = metrics
        self.accessLog = accessLog
        self.forwarding = forwarding
        self.limits = limits
        self.draining = False
        self.inFlight = 0
        #: Open client connections: HTTP/1.1 (L{ProxyChannel}s, or
        #: monedge's own) and HTTP/2 (L{monedge.edge.http2.H2Channel}s).
        self.channels: set[Any] = set()
        self._drainWaiters: list[Deferred[None]] = []
        self._unrouted = metrics.forService(NO_SERVICE)

    def getContentFile(self, length: int | None) -> IO[bytes]:
        """
        Where a request's body is held: in memory when it declares under
        100,000 bytes, else in a temporary file (Twisted's own rule).
        Twisted's request looks this method up on every request and, if the
        site has none, pays for an AttributeError.
        """
        if length is not None and length < 100_000:
            return BytesIO()
        return tempfile.TemporaryFile()

    def buildProtocol(self, addr: Any) -> ProtocolSwitch:  # type: ignore[override]
        """
        A client connection: monedge's protocol switch, speaking through a
        new HTTP/1.1 channel (L{channelFactory}) until the connection turns
        out to speak HTTP/2 (L{monedge.edge.switch}).
        """
        channel = self.channelFactory()
        channel.factory = self
        channel.site = self
        channel.requestFactory = self.requestFactory
        channel.callLater = self.reactor.callLater
        channel.timeOut = self.timeOut
        return ProtocolSwitch(self, channel)

    def acceptableProtocols(self) -> list[bytes]:
        """
        What ALPN offers on a TLS listener: HTTP/2 and HTTP/1.1.
        """
        return [b"h2", b"http/1.1"]

    def log(self, request: Any) -> None:
        """
        Twisted's access log is replaced by L{requestDone}.
        """

    def requestDone(self, record: RequestRecord) -> None:
        """
        Account for a finished request, from its record: metrics and the
        access log.
        """
        serviceMetrics = getattr(record.decision, "metrics", None) or self._unrouted
        serviceMetrics.count(record)
        self.accessLog.log(record)
        self.checkDrained()

    def refusalLogged(self, record: RequestRecord) -> None:
        """
        Account for a request refused by the channel, from its record.
        """
        self._unrouted.count(record)
        self.accessLog.log(record)

    def whenDrained(self) -> Deferred[None]:
        """
        A L{Deferred} that fires when no request is in flight and every
        client connection is closed: every response has left the process,
        not merely been handed to a transport.
        """
        d: Deferred[None] = Deferred()
        self._drainWaiters.append(d)
        self.checkDrained()
        return d

    def checkDrained(self) -> None:
        """
        Fire the L{whenDrained} waiters if there is nothing left.
        """
        if self._drainWaiters and self.inFlight == 0 and not self.channels:
            waiters, self._drainWaiters = self._drainWaiters, []
            for d in waiters:
                if not d.called:
                    d.callback(None)

    def startDraining(self) -> None:
        """
        From now on, every response closes its connection, and each HTTP/2
        connection says GOAWAY: it answers the streams it has, then closes.
        """
        self.draining = True
        for channel in list(self.channels):
            drain = getattr(channel, "drain", None)
            if drain is not None:
                drain()

    def closeIdleConnections(self) -> int:
        """
        Close every connection that is between requests.

        @return: how many were closed.
        """
        idle = [channel for channel in self.channels if channel.isIdle()]
        for channel in idle:
            channel.loseConnection()
        return len(idle)


class _TooManyConnections(Protocol):
    """
    What a connection past a listener's limit gets: a 503 JSON answer at
    once, then the connection closes (its request is never read).
    """

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(rawErrorResponse("too_many_connections", newRequestId()))
        transport.loseConnection()


@implementer(IProtocolNegotiationFactory)
class ListenerFactory(ServerFactory):
    """
    One listener's connections to a L{ProxySite}, at most C{limit} at a
    time (0: no limit); the ones past it are refused with a 503.
    """

    noisy = False

    def __init__(self, site: ProxySite, limit: int, name: str = "proxy") -> None:
        self.site = site
        self.limit = limit
        #: The listener's name in metrics (its option's value).
        self.name = name
        #: The open connections' protocols.
        self.connections: set[Any] = set()
        site.metrics.watchListener(self)

    @property
    def open(self) -> int:
        """
        How many of this listener's connections are open.
        """
        return len(self.connections)

    def protocols(self) -> list[str]:
        """
        The protocol each open connection speaks now: C{http/1.1}, C{h2},
        or C{websocket} once it is a tunnel.
        """
        found = []
        for protocol in list(self.connections):
            channel = channelOf(protocol)
            # A ProxyChannel, or monedge's own HTTP/1.1 channel: each has a
            # tunnelSide, which an H2Channel has not.
            if hasattr(channel, "tunnelSide"):
                found.append("http/1.1" if channel.tunnelSide is None else "websocket")
            else:
                found.append("h2")
        return found

    def acceptableProtocols(self) -> list[bytes]:
        """
        What ALPN offers: the site's protocols.
        """
        return self.site.acceptableProtocols()

    def startFactory(self) -> None:
        self.site.doStart()

    def stopFactory(self) -> None:
        self.site.doStop()

    def buildProtocol(self, addr: Any) -> Any:
        if self.limit and self.open >= self.limit:
            self.site.metrics.connectionsRefused.inc()
            return _TooManyConnections()
        protocol: Any = self.site.buildProtocol(addr)
        if protocol is not None:
            self.connections.add(protocol)
            protocol.listener = self
        return protocol

    def connectionClosed(self, protocol: Any) -> None:
        """
        One of this listener's connections has closed.
        """
        self.connections.discard(protocol)
