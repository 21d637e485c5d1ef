"""
L{monedge.twistedseam.leanDispatch}: an epoll reactor dispatches its events
without the legacy log context, and still logs what escapes.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.testing import MemoryReactorClock
from twisted.python import context, log
from twisted.trial.unittest import SynchronousTestCase

from monedge.twistedseam import leanDispatch


class _Reader(FileDescriptor):
    """
    One end of a socket pair, recording each read and the legacy log
    context's system at that time.
    """

    def __init__(self, sock: socket.socket, reactor: Any) -> None:
        super().__init__(reactor)
        self.sock = sock
        self.reads: list[bytes] = []
        self.systems: list[str] = []
        self.fail = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "ReaderPrefix"

    def doRead(self) -> None:
        self.systems.append(context.get(log.ILogContext)["system"])
        self.reads.append(self.sock.recv(100))
        if self.fail:
            raise RuntimeError("boom")

    def connectionLost(self, reason: Any) -> None:
        self.reactor.removeReader(self)


class LeanDispatchTests(SynchronousTestCase):
    """
    A real epoll reactor (not the one running the tests) over a socket
    pair.
    """

    def setUp(self) -> None:
        self.reactor = EPollReactor()
        self.addCleanup(self.reactor._poller.close)
        self.near, self.far = socket.socketpair()
        self.addCleanup(self.near.close)
        self.addCleanup(self.far.close)
        self.reader = _Reader(self.near, self.reactor)

    def test_onlyEpoll(self) -> None:
        """
        Only an epoll reactor is changed.
        """
        self.assertTrue(leanDispatch(self.reactor))
        self.assertFalse(leanDispatch(MemoryReactorClock()))

    def test_readsDispatchedWithoutContext(self) -> None:
        """
        A readable descriptor is read, as with Twisted's own dispatch, but
        without its log prefix pushed as the legacy context.
        """
        self.reactor.addReader(self.reader)
        self.far.send(b"one")
        self.reactor.doIteration(0)
        self.assertEqual(self.reader.systems, ["ReaderPrefix"])
        leanDispatch(self.reactor)
        self.far.send(b"two")
        self.reactor.doIteration(0)
        self.assertEqual(self.reader.reads, [b"one", b"two"])
        self.assertEqual(self.reader.systems, ["ReaderPrefix", "-"])

    def test_nothingReady(self) -> None:
        """
        With no event, an iteration returns without reading.
        """
        leanDispatch(self.reactor)
        self.reactor.addReader(self.reader)
        self.reactor.doIteration(0)
        self.assertEqual(self.reader.reads, [])

    def test_errorsStillHandled(self) -> None:
        """
        An exception from a read is handled as Twisted handles it: logged,
        and the descriptor's connection lost, and the reactor goes on.
        """
        leanDispatch(self.reactor)
        self.reactor.addReader(self.reader)
        self.reader.fail = True
        self.far.send(b"x")
        self.reactor.doIteration(0)
        self.assertNotIn(self.reader, self.reactor.getReaders())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_escapedErrorLogged(self) -> None:
        """
        An exception escaping the reactor's own handling of an event is
        logged, as Twisted's C{callWithLogger} would, and the iteration
        goes on.
        """

        def broken(selectable: Any, fd: int, event: int) -> None:
            raise ValueError("escaped")

        self.reactor._doReadOrWrite = broken  # type: ignore[method-assign]
        leanDispatch(self.reactor)
        self.reactor.addReader(self.reader)
        self.far.send(b"x")
        self.reactor.doIteration(0)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
