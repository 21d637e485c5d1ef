"""
Two-way byte tunnels, for upgraded connections (WebSocket): once the
upstream has switched protocols, every byte from either side is written to
the other, with backpressure both ways, half-closes carried across, and an
idle timeout of its own.

A tunnel knows nothing of HTTP. The client side is fed by
L{monedge.edge.http1.HTTP1Channel} once it stops parsing; the upstream side by
the upstream client's upgraded connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(IPushProducer)
class TunnelSide:
    """
    One side of a tunnel: the connection bytes come in on, and the producer
    that the other side's connection pauses when it cannot write more.

    The connection calls L{received}, L{readClosed} and L{lost}.
    """

    def __init__(self, tunnel: Tunnel, name: str) -> None:
        self.tunnel = tunnel
        self.name = name
        self.transport: Any = None
        self.peer: TunnelSide
        self.bytes = 0
        self.reading = True
        self.connected = False

    def received(self, data: bytes) -> None:
        """
        Bytes arrived on this side: send them to the other.
        """
        self.bytes += len(data)
        self.tunnel.touch()
        peer = self.peer
        if peer.connected:
            peer.transport.write(data)

    def readClosed(self) -> None:
        """
        This side sent its last byte (a FIN): pass the half-close on.
        """
        self.reading = False
        peer = self.peer
        if peer.connected:
            if peer.reading and not ISSLTransport.providedBy(peer.transport):
                peer.transport.loseWriteConnection()
            else:
                # Both directions are finished (or the other side is TLS,
                # where a half-close would end the session before what is
                # buffered is sent): close both.
                peer.transport.loseConnection()
                self.transport.loseConnection()

    def lost(self, reason: Failure | None = None) -> None:
        """
        This side's connection is gone.
        """
        if not self.connected:
            return
        self.connected = False
        self.reading = False
        self.tunnel.sideLost(self)

    # IPushProducer: reading from this side, paused while the other side's
    # connection has more to write than it can send.

    def pauseProducing(self) -> None:
        if self.connected:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.connected:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        if self.connected:
            self.transport.loseConnection()


class Tunnel:
    """
    A tunnel between a client connection and an upstream connection.

    @param clock: for the idle timeout.
    @param idleTimeout: seconds with no byte in either direction after
        which both connections are dropped.
    @param closed: called once, when both connections are gone.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        idleTimeout: float,
        closed: Callable[[Tunnel], None],
    ) -> None:
        self.clock = clock
        self.idleTimeout = idleTimeout
        self._closed = closed
        self.client = TunnelSide(self, "client")
        self.upstream = TunnelSide(self, "upstream")
        self.client.peer = self.upstream
        self.upstream.peer = self.client
        self.timedOut = False
        self.finished = False
        self._last = 0.0
        self._idleCall: IDelayedCall | None = None

    def start(
        self,
        clientTransport: Any,
        upstreamTransport: Any,
        fromClient: bytes = b"",
        fromUpstream: bytes = b"",
    ) -> None:
        """
        Join the two connections. C{fromClient} and C{fromUpstream} are
        bytes that arrived before the switch (after the request, after the
        101's head): they go across first.
        """
        for side, transport in (
            (self.client, clientTransport),
            (self.upstream, upstreamTransport),
        ):
            side.transport = transport
            side.connected = True
        # Each connection pauses the other side's reading when it falls
        # behind.
        clientTransport.registerProducer(self.upstream, True)
        upstreamTransport.registerProducer(self.client, True)
        clientTransport.resumeProducing()
        upstreamTransport.resumeProducing()
        self.touch()
        self._idleCall = self.clock.callLater(self.idleTimeout, self._checkIdle)
        if fromClient:
            self.client.received(fromClient)
        if fromUpstream:
            self.upstream.received(fromUpstream)

    def touch(self) -> None:
        """
        Something moved: the tunnel is not idle.
        """
        self._last = self.clock.seconds()

    def _checkIdle(self) -> None:
        self._idleCall = None
        idle = self.clock.seconds() - self._last
        if idle < self.idleTimeout:
            self._idleCall = self.clock.callLater(
                self.idleTimeout - idle, self._checkIdle
            )
            return
        self.timedOut = True
        self.abort()

    def abort(self) -> None:
        """
        Drop both connections now (idle timeout, shutdown).
        """
        for side in (self.client, self.upstream):
            if side.connected:
                side.transport.abortConnection()

    def close(self) -> None:
        """
        Close both connections once what is written has been sent.
        """
        for side in (self.client, self.upstream):
            if side.connected:
                side.transport.loseConnection()

    def sideLost(self, side: TunnelSide) -> None:
        """
        One connection is gone: close the other once it has sent what it
        holds; when both are gone, the tunnel is finished.
        """
        peer = side.peer
        if peer.connected:
            peer.transport.loseConnection()
            return
        if self.finished:
            return
        self.finished = True
        if self._idleCall is not None and self._idleCall.active():
            self._idleCall.cancel()
        self._idleCall = None
        self._closed(self)


class TunnelSet:
    """
    The open tunnels: counted for the metrics, closed at shutdown.
    """

    def __init__(self) -> None:
        self.open: set[Tunnel] = set()
        self.opened = 0

    def add(self, tunnel: Tunnel) -> None:
        """
        Count a tunnel that has started.
        """
        self.open.add(tunnel)
        self.opened += 1

    def remove(self, tunnel: Tunnel) -> None:
        """
        Forget a tunnel that has finished.
        """
        self.open.discard(tunnel)

    def closeAll(self) -> int:
        """
        Drop every open tunnel (at shutdown, after the drain timeout).

        @return: how many there were.
        """
        tunnels = list(self.open)
        for tunnel in tunnels:
            tunnel.abort()
        return len(tunnels)
