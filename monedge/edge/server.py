"""
The client side of the wire: monedge's L{Site} and its listeners.

Every connection starts on monedge's protocol switch
(L{monedge.edge.switch}): HTTP/1.1 (L{monedge.edge.http1}) until ALPN
chose C{h2} or a cleartext connection starts with the HTTP/2 preface,
then HTTP/2 (L{monedge.edge.http2}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.web import server
from zope.interface import implementer

from monedge.edge.switch import ProtocolSwitch
from monedge.observe.accesslog import AccessLog
from monedge.observe.metrics import NO_SERVICE, Metrics
from monedge.record import RequestRecord
from monedge.rules.errors import rawErrorResponse
from monedge.rules.headers import DEFAULT_RULES, ForwardingRules, newRequestId
from monedge.rules.limits import DEFAULT_LIMITS, Limits


class ProxySite(server.Site):
    """
    The proxy's site: its resource is a L{monedge.proxy.resource.RootResource}.

    @ivar draining: set on SIGTERM; responses then close their connection.
    @ivar inFlight: requests received and not yet answered.
    @ivar channels: open client connections.
    """

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
        #: Open client connections: HTTP/1.1
        #: (L{monedge.edge.http1.HTTP1Channel}s) and HTTP/2
        #: (L{monedge.edge.http2.H2Channel}s).
        self.channels: set[Any] = set()
        self._drainWaiters: list[Deferred[None]] = []
        self._unrouted = metrics.forService(NO_SERVICE)

    def buildProtocol(self, addr: Any) -> ProtocolSwitch:  # type: ignore[override]
        """
        A client connection: monedge's protocol switch, speaking through a
        new HTTP/1.1 channel (L{channelFactory}) until the connection turns
        out to speak HTTP/2 (L{monedge.edge.switch}).
        """
        channel = self.channelFactory()
        channel.factory = self
        channel.site = self
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
            channel: Any = getattr(protocol, "channel", None)
            # An HTTP/1.1 channel has a tunnelSide, which an H2Channel has
            # not.
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
