"""
The protocol on every client connection of monedge's listeners: it speaks
through the site's HTTP/1.1 channel until it learns that the connection
speaks HTTP/2, and then hands it to an L{H2Channel}.

A connection speaks HTTP/2 when TLS's ALPN chose C{h2}, or, on a
connection without ALPN (cleartext, h2c with prior knowledge: RFC 9113,
3.3), when its first 24 bytes are the HTTP/2 client preface.  The bytes
read so far go to the new channel.  Nothing else changes protocol here: a
WebSocket handshake's tunnel is the HTTP/1.1 channel's.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from monedge.edge.http2 import PREFACE, H2Channel

__all__ = ["ProtocolSwitch"]


@implementer(IHalfCloseableProtocol)
class ProtocolSwitch(Protocol):
    """
    One client connection: its HTTP/1.1 channel, or the L{H2Channel} that
    replaced it.  Told of half-closes, so that a tunnel can pass them on.

    @ivar listener: the L{monedge.edge.server.ListenerFactory} that counts
        the connection, told when it closes (set by the listener).
    """

    listener: Any = None

    def __init__(self, site: Any, channel: Any) -> None:
        self.site = site
        self._channel = channel
        self._decided = False
        self._held = b""

    @property
    def channel(self) -> Any:
        """
        The channel the connection speaks through now.
        """
        return self._channel

    def connectionMade(self) -> None:
        self._channel.makeConnection(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._decided:
            self._channel.dataReceived(data)
            return
        negotiated = getattr(self.transport, "negotiatedProtocol", None)
        if negotiated == b"h2":
            self._toHTTP2(data)
            return
        if negotiated is None:
            held = self._held + data
            if held[:24] == PREFACE[: len(held)]:
                if len(held) < len(PREFACE):
                    # Perhaps the preface: wait for the rest of it.
                    self._held = held
                    return
                self._toHTTP2(held)
                return
            self._held = b""
            data = held
        self._decided = True
        self._channel.dataReceived(data)

    def _toHTTP2(self, data: bytes) -> None:
        """
        The connection speaks HTTP/2: the HTTP/1.1 channel made for it stops
        timing and counting it, and an L{H2Channel} reads C{data} and what
        follows.
        """
        self._decided = True
        self._held = b""
        previous = self._channel
        previous.abandon()
        transport: Any = self.transport
        # The HTTP/1.1 channel was the transport's producer.
        transport.unregisterProducer()
        channel = self._channel = H2Channel(self.site)
        channel.makeConnection(transport)
        if data:
            channel.dataReceived(data)

    def readConnectionLost(self) -> None:
        side = getattr(self._channel, "tunnelSide", None)
        if side is not None:
            side.readClosed()
            return
        # A client that stops sending has gone (HTTP/1.1 and HTTP/2 alike).
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._channel.connectionLost(reason)
        listener = self.listener
        if listener is not None:
            self.listener = None
            listener.connectionClosed(self)
