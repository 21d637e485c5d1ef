"""
The client side of the wire: monedge's L{Site}, its listeners, the
protocol switch on each connection, and the request class of Twisted's
HTTP/2 streams.

HTTP/1.1 connections are served by L{monedge.edge.http1}; a TLS
connection whose ALPN chose C{h2} goes on to Twisted's HTTP/2, whose
streams answer through L{ProxyRequest}.  What these classes need of
Twisted's that is not public they get from L{monedge.twistedseam}.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from io import BytesIO
from typing import IO, TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IProtocolNegotiationFactory,
)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import H2_ENABLED
from twisted.web.http import Request as HTTPRequest
from zope.interface import implementer

from monedge.edge.base import (
    CLIENT_CLOSED,
    UNDERSCORE_REFUSED,
    SharedRequest,
)
from monedge.observe.accesslog import AccessLog
from monedge.observe.metrics import NO_SERVICE, Metrics, ServiceMetrics
from monedge.record import RequestRecord
from monedge.rules.errors import ProxyError, rawErrorResponse, renderError
from monedge.rules.headers import (
    DEFAULT_RULES,
    ForwardingRules,
    newRequestId,
)
from monedge.rules.limits import DEFAULT_LIMITS, Limits
from monedge.twistedseam import (
    HTTPConnectionProtocol,
    channelOf,
    rawHeaderTable,
)

if TYPE_CHECKING:
    from monedge.proxy.exchange import ProxyExchange


_log = Logger()

#: Twisted's HTTP write, under twisted.web.server's (see ProxyRequest.write).
#: Bound at import: attribute lookups on twisted.web.http go through its
#: deprecation proxy, which costs more than the layer skipped.
_httpWrite = HTTPRequest.write


class ProxyRequest(SharedRequest, server.Request):
    """
    A request on one of Twisted's HTTP/2 streams (HTTP/1.1 is served by
    L{monedge.edge.http1}).  It routes itself as soon as its headers
    arrive, and accounts for itself (access log, metrics, in-flight count)
    exactly once, however it ends.  Twisted reads its body whole before
    it is answered.
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
    #: Twisted's HTTP/2 stream sends no trailers.
    sendsTrailers = False
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
    #: An HTTP/2 refusal waiting for the request to be received.
    _deferredRefusal: ProxyError | None = None

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
        Always: this request comes on an HTTP/2 stream.
        """
        return True

    def gotLength(self, length: int | None) -> None:
        self.hasBody = length is None or length > 0
        channel: Any = self.channel
        # An H2Stream: its pseudo-headers (method, path, authority) come
        # before any other header, so they are known here.
        command, path, version = channel.command, channel.path, b"HTTP/2"
        if self._underscoreNames():
            return
        self._hostBesideAuthority()
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

    def _hostBesideAuthority(self) -> None:
        """
        Over HTTP/2, a C{host} header beside C{:authority} (which Twisted
        turns into a first C{Host}) that names it again is the same one
        host (RFC 9113, 8.3.1), not a repeated Host.  (The C{h2} package
        refuses a C{host} that differs, as a connection error.)
        """
        hosts = self.headerTable.get(b"Host")
        if hosts is not None and len(hosts) == 2 and hosts[0] == hosts[1]:
            del hosts[1]

    def _underscoreNames(self) -> bool:
        """
        Over HTTP/2, apply C{--underscore-headers} to the request's header
        names at once (HTTP/1.1 does as each line is read); whether the
        request was refused.
        """
        action = self.site.limits.underscoreHeaders
        if action == "allow":
            return False
        headers = self.requestHeaders
        names = [name for name, _ in headers.getAllRawHeaders() if b"_" in name]
        if not names:
            return False
        if action == "reject":
            self._refuse("bad_request", UNDERSCORE_REFUSED)
            return True
        for name in names:
            headers.removeHeader(name)
        return False

    def _refuse(self, code: str, message: str | None = None) -> None:
        # Only this stream is refused, and the connection carries on.
        # Twisted's HTTP/2 stream cannot answer before the request has been
        # received: the rest of the body is read, dropped, and the refusal
        # sent then (see requestReceived).
        self._refused = True
        self._deferredRefusal = ProxyError(code, message)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        The whole request is in.  Unlike Twisted's, this does not parse the
        query string or form bodies: a proxy forwards them untouched.
        """
        if self._refused:
            refusal, self._deferredRefusal = self._deferredRefusal, None
            if refusal is not None:
                self.write(renderError(self, refusal, self.requestId))
                self.finish()
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
        """
        Nothing: HTTP/2 has no Connection header; the connection is closed
        when the drain stops the listener's connections.
        """

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
            # Twisted lets go of a finished request's channel; its HTTP/2
            # stream may still report the connection's loss to it after.
            # The request was accounted for when it finished.
            return
        super().connectionLost(reason)
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
        Nothing: an HTTP/2 stream holds no response head.
        """


@implementer(IHalfCloseableProtocol)
class _ProxyChannelProtocol(HTTPConnectionProtocol):
    """
    The protocol on a client connection (Twisted's switch between HTTP/1.1
    and HTTP/2), told of half-closes so that a tunnel can pass them on.
    """

    def channelReplaced(self, previous: Any) -> None:
        abandon = getattr(previous, "abandon", None)
        if abandon is not None:
            # ALPN chose HTTP/2: the HTTP/1.1 channel made for the
            # connection is replaced, and must not time it out.
            abandon()

    def readConnectionLost(self) -> None:
        channel = channelOf(self)
        side = getattr(channel, "tunnelSide", None)
        if side is not None:
            side.readClosed()
            return
        # An HTTP client that stops sending has gone, as before half-closes
        # were reported.
        transport = channel.transport
        if transport is not None:
            transport.abortConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        listener = getattr(self, "listener", None)
        if listener is not None:
            self.listener = None
            listener.connectionClosed(self)


class ProxySite(server.Site):
    """
    The proxy's site: its resource is a L{monedge.proxy.resource.RootResource}.

    @ivar draining: set on SIGTERM; responses then close their connection.
    @ivar inFlight: requests received and not yet answered.
    @ivar channels: open client connections.
    """

    requestFactory = ProxyRequest  # type: ignore[assignment]
    displayTracebacks = False
    #: Makes the HTTP/1.1 channel of each connection: the composition root
    #: sets it (L{monedge.edge.http1.HTTP1Channel}, which depends on this
    #: module, not this module on it).
    channelFactory: Callable[[], Any]

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
        #: Open HTTP/1.1 connections (L{monedge.edge.http1.HTTP1Channel}s).
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

    def protocol(self) -> HTTPConnectionProtocol:
        return _ProxyChannelProtocol(self.channelFactory())

    def acceptableProtocols(self) -> list[bytes]:
        """
        What ALPN offers on a TLS listener: HTTP/2 (when the C{h2} package
        is installed) and HTTP/1.1.
        """
        return [b"h2", b"http/1.1"] if H2_ENABLED else [b"http/1.1"]

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
        From now on, every response closes its connection.
        """
        self.draining = True

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
            # An HTTP/1.1 channel has a tunnelSide, which Twisted's HTTP/2
            # connection has not.
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
