"""
L{monedge.twistedseam.sendAtOnce}: writes go to the kernel at once when the
transport's buffer is empty, and fall back to Twisted's buffered path for
everything else.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase

from monedge.twistedseam import sendAtOnce


class _FDSet:
    """
    The part of L{IReactorFDSet} a L{tcp.Connection} uses, recording which
    descriptors asked to be watched for writing.
    """

    def __init__(self) -> None:
        self.writers: set[Any] = set()

    def addWriter(self, writer: Any) -> None:
        self.writers.add(writer)

    def removeWriter(self, writer: Any) -> None:
        self.writers.discard(writer)

    def addReader(self, reader: Any) -> None:
        pass

    def removeReader(self, reader: Any) -> None:
        pass


class SendAtOnceTests(SynchronousTestCase):
    """
    A real connected socket pair under a L{tcp.Connection}.
    """

    def setUp(self) -> None:
        self.near, self.far = socket.socketpair()
        self.addCleanup(self.near.close)
        self.addCleanup(self.far.close)
        self.far.setblocking(False)
        self.reactor = _FDSet()
        self.connection = tcp.Connection(self.near, Protocol(), self.reactor)  # type: ignore[arg-type]
        self.connection.connected = True
        sendAtOnce(self.connection)

    def received(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self.far.recv(1 << 20)
            except BlockingIOError:
                return b"".join(chunks)
            chunks.append(chunk)

    def test_sentWithoutReactor(self) -> None:
        """
        With nothing buffered, a write is in the peer's socket before any
        reactor iteration, and the reactor is not asked to watch the
        socket.
        """
        self.connection.write(b"hello")
        self.connection.writeSequence([b" ", b"world"])
        self.assertEqual(self.received(), b"hello world")
        self.assertEqual(self.reactor.writers, set())
        self.assertEqual(self.connection.dataBuffer, b"")

    def test_partialSendBuffersTheRest(self) -> None:
        """
        What the kernel does not take is buffered, in order, for Twisted's
        own write loop, and a later write queues behind it rather than
        jumping ahead.
        """
        self.near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = bytes(range(256)) * 8192
        self.connection.write(big)
        self.assertIn(self.connection, self.reactor.writers)
        self.connection.write(b"after")
        got = self.received()
        self.assertLess(len(got), len(big))
        # Drain the rest the way the reactor would.
        while self.connection in self.reactor.writers:
            self.connection.doWrite()
            got += self.received()
        got += self.received()
        self.assertEqual(got, big + b"after")

    def test_disconnectingBuffers(self) -> None:
        """
        Once the transport is losing its connection, a write is left to
        Twisted's path (which drops it) and nothing more reaches the peer.
        """
        self.connection.write(b"before")
        self.connection.disconnecting = True
        self.connection.write(b"late")
        self.assertEqual(self.received(), b"before")

    def test_otherTransportsUntouched(self) -> None:
        """
        A transport that is not a plain TCP connection keeps its own
        C{write}.
        """
        transport = StringTransport()
        sendAtOnce(transport)
        self.assertNotIn("write", vars(transport))
        transport.write(b"x")
        self.assertEqual(transport.value(), b"x")

    def test_underTLS(self) -> None:
        """
        Given a TLS transport, the TCP connection beneath it is the one
        that sends at once (the TLS records); the TLS transport keeps its
        own C{write}, and a second call changes nothing more.
        """
        near, far = socket.socketpair()
        self.addCleanup(near.close)
        self.addCleanup(far.close)
        far.setblocking(False)
        connection = tcp.Connection(near, Protocol(), self.reactor)  # type: ignore[arg-type]
        connection.connected = True
        tls = TLSMemoryBIOProtocol(None, Protocol())
        tls.transport = connection
        sendAtOnce(tls)
        self.assertNotIn("write", vars(tls))
        write = vars(connection)["write"]
        sendAtOnce(tls)
        self.assertIs(vars(connection)["write"], write)
        connection.write(b"record")
        self.assertEqual(far.recv(100), b"record")
        self.assertEqual(self.reactor.writers, set())
