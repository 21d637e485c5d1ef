"""
Two-way tunnels over in-memory transports: bytes across, backpressure,
half-closes, closes and the idle timeout.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from monedge.upstream.tunnel import Tunnel, TunnelSet


class Transport(StringTransport):
    """
    A string transport that records half-closes and aborts.
    """

    def __init__(self) -> None:
        super().__init__()
        self.writeClosed = False
        self.aborted = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().loseConnection()


class TunnelTests(SynchronousTestCase):
    """
    A tunnel joins a client and an upstream connection.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.closed: list[Tunnel] = []
        self.tunnel = Tunnel(self.clock, 10.0, self.closed.append)
        self.client = Transport()
        self.upstream = Transport()

    def start(self, **kwargs: Any) -> None:
        self.tunnel.start(self.client, self.upstream, **kwargs)

    def test_sidesAreProducers(self) -> None:
        """
        Each side is a push producer, registered (streaming) with the other
        side's connection.
        """
        self.start()
        for side in (self.tunnel.client, self.tunnel.upstream):
            self.assertTrue(verifyObject(IPushProducer, side))
        self.assertIs(self.client.producer, self.tunnel.upstream)
        self.assertIs(self.upstream.producer, self.tunnel.client)
        self.assertTrue(self.client.streaming)

    def test_heldBytesGoFirst(self) -> None:
        """
        Bytes that arrived before the switch cross first, then live ones.
        """
        self.start(fromClient=b"c0", fromUpstream=b"u0")
        self.tunnel.client.received(b"c1")
        self.tunnel.upstream.received(b"u1")
        self.assertEqual(self.upstream.value(), b"c0c1")
        self.assertEqual(self.client.value(), b"u0u1")
        self.assertEqual((self.tunnel.client.bytes, self.tunnel.upstream.bytes), (4, 4))

    def test_backpressure(self) -> None:
        """
        When one connection cannot write more, it pauses reading on the
        other; when it drains, reading resumes.
        """
        self.start()
        self.tunnel.upstream.pauseProducing()
        self.assertEqual(self.upstream.producerState, "paused")
        self.tunnel.upstream.resumeProducing()
        self.assertEqual(self.upstream.producerState, "producing")

    def test_halfClose(self) -> None:
        """
        A side that stops sending half-closes the other's writing; when
        both have, both connections close.
        """
        self.start()
        self.tunnel.client.readClosed()
        self.assertTrue(self.upstream.writeClosed)
        self.assertFalse(self.upstream.disconnecting)
        self.tunnel.upstream.received(b"still")
        self.assertEqual(self.client.value(), b"still")
        self.tunnel.upstream.readClosed()
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(self.upstream.disconnecting)

    def test_oneSideLost(self) -> None:
        """
        When one connection is lost the other is closed once it has sent
        what it holds; the tunnel finishes when both are gone, once.
        """
        self.start()
        self.tunnel.upstream.lost()
        self.assertTrue(self.client.disconnecting)
        self.assertEqual(self.closed, [])
        self.tunnel.client.lost()
        self.tunnel.client.lost()
        self.assertEqual(self.closed, [self.tunnel])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idleTimeout(self) -> None:
        """
        Traffic in either direction keeps the tunnel open; idle for the
        timeout, both connections are aborted.
        """
        self.start()
        self.clock.advance(9)
        self.tunnel.client.received(b"x")
        self.clock.advance(9)
        self.tunnel.upstream.received(b"y")
        self.clock.advance(9)
        self.assertFalse(self.client.aborted)
        self.clock.advance(1)
        self.assertTrue(self.tunnel.timedOut)
        self.assertTrue(self.client.aborted)
        self.assertTrue(self.upstream.aborted)

    def test_tunnelSet(self) -> None:
        """
        The set counts tunnels opened and open, and closeAll aborts those
        still open.
        """
        tunnels = TunnelSet()
        self.start()
        tunnels.add(self.tunnel)
        self.assertEqual((len(tunnels.open), tunnels.opened), (1, 1))
        self.assertEqual(tunnels.closeAll(), 1)
        self.assertTrue(self.client.aborted)
        tunnels.remove(self.tunnel)
        self.assertEqual((len(tunnels.open), tunnels.opened), (0, 1))
