"""
Startup in L{monedge.runtime.lifecycle}: listeners that listen at once or stop
monedge with one line naming the option and address, readiness that
depends on every proxy listener listening, and the one line an uncaught
startup error ends the process with.
"""

from __future__ import annotations

import errno
import io
import os
import socket
import sys
import tempfile
from typing import cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from monedge.edge.server import ProxySite
from monedge.runtime.lifecycle import (
    Listener,
    ProxyService,
    describeError,
    exitAtStartup,
    startupErrorHook,
    startupLine,
)
from monedge.testing import FakeUpstreamClient, MemoryRegistry


@implementer(IListeningPort)
class FakePort:
    """
    A listening port: C{connected} while listening, as Twisted's are.
    """

    def __init__(self) -> None:
        self.connected = True
        self.stops = 0

    def startListening(self) -> None:
        pass

    def stopListening(self) -> Deferred[None]:
        self.stops += 1
        self.connected = False
        return succeed(None)

    def getHost(self) -> IAddress:
        return IPv4Address("TCP", "127.0.0.1", 8080)


@implementer(IStreamServerEndpoint)
class FakeEndpoint:
    """
    An endpoint whose listen answers with C{port}, fails with C{error}, or
    (with neither) never answers.
    """

    def __init__(
        self, port: IListeningPort | None = None, error: Exception | None = None
    ) -> None:
        self.port = port
        self.error = error
        self.cancelled = 0

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        if self.error is not None:
            return fail(self.error)
        if self.port is not None:
            return succeed(self.port)

        def cancel(d: Deferred[IListeningPort]) -> None:
            self.cancelled += 1

        return Deferred(cancel)


def _osError(number: int) -> OSError:
    return OSError(number, os.strerror(number))


class ListenerTests(SynchronousTestCase):
    """
    L{Listener} listens when started, or raises a one-line L{UsageError}
    naming its option and address and why.
    """

    def assertCannotListen(self, listener: Listener, message: str) -> None:
        """
        Starting C{listener} raises a UsageError whose message is
        C{message}, and leaves it not listening.
        """
        with self.assertRaises(UsageError) as caught:
            listener.privilegedStartService()
        self.assertEqual(str(caught.exception), message)
        self.assertFalse(listener.listening)

    def test_listensAtPrivilegedStart(self) -> None:
        """
        privilegedStartService listens (before twistd drops privileges);
        startService then keeps that port; stopService closes it.
        """
        port = FakePort()
        listener = Listener("port", "tcp:8080", FakeEndpoint(port), Factory())
        self.assertFalse(listener.listening)
        self.assertEqual(listener.label, "--port tcp:8080")
        listener.privilegedStartService()
        self.assertIs(listener.port, port)
        self.assertTrue(listener.listening)
        listener.startService()
        self.assertIs(listener.port, port)
        self.successResultOf(cast(Deferred[None], listener.stopService()))
        self.assertEqual(port.stops, 1)
        self.assertFalse(listener.listening)

    def test_notListeningOnceClosed(self) -> None:
        """
        A port that closed by itself no longer counts as listening.
        """
        port = FakePort()
        listener = Listener("listen", "tcp:8081", FakeEndpoint(port), Factory())
        listener.startService()
        port.connected = False
        self.assertFalse(listener.listening)

    def test_failures(self) -> None:
        """
        Each way a listener cannot listen is a one-line message: the
        option, the address, C{cannot listen:} and the system's reason,
        lowercase, with a hint for an address that is not this machine's.
        """
        cases = [
            (
                CannotListenError("", 80, _osError(errno.EADDRINUSE)),
                "address already in use",
            ),
            (
                CannotListenError("", 80, _osError(errno.EACCES)),
                "permission denied",
            ),
            (
                CannotListenError("192.0.2.1", 80, _osError(errno.EADDRNOTAVAIL)),
                "cannot assign requested address (not an address of this machine)",
            ),
            (_osError(errno.ENOENT), "no such file or directory"),
            (
                CannotListenError(None, "/run/x.sock", "Cannot acquire lock"),
                "Cannot acquire lock",
            ),
            (
                CannotListenError(None, "/x", OSError("AF_UNIX path too long")),
                "AF_UNIX path too long",
            ),
        ]
        for error, reason in cases:
            listener = Listener(
                "admin-port", "tcp:80", FakeEndpoint(error=error), Factory()
            )
            self.assertCannotListen(
                listener, f"--admin-port tcp:80: cannot listen: {reason}"
            )

    def test_mustListenAtOnce(self) -> None:
        """
        An endpoint that does not answer at once is a startup error too
        (monedge's must be listening when startup ends), and the attempt is
        cancelled.
        """
        endpoint = FakeEndpoint()
        listener = Listener("listen", "slow:1", endpoint, Factory())
        self.assertCannotListen(
            listener,
            "--listen slow:1: cannot listen: the endpoint did not listen at once",
        )
        self.assertEqual(endpoint.cancelled, 1)

    def test_addressInUse(self) -> None:
        """
        On a real reactor and socket: a TCP port already taken.
        """
        from twisted.internet import reactor

        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        number = taken.getsockname()[1]
        description = f"tcp:{number}:interface=127.0.0.1"
        listener = Listener(
            "port", description, serverFromString(reactor, description), Factory()
        )
        self.assertCannotListen(
            listener, f"--port {description}: cannot listen: address already in use"
        )

    def test_unixDirectoryMissing(self) -> None:
        """
        On a real reactor: a Unix socket in a directory that does not
        exist.
        """
        from twisted.internet import reactor

        directory = tempfile.mkdtemp(prefix="monedge-test-")
        self.addCleanup(os.rmdir, directory)
        description = f"unix:{directory}/missing/monedge.sock"
        listener = Listener(
            "listen", description, serverFromString(reactor, description), Factory()
        )
        self.assertCannotListen(
            listener,
            f"--listen {description}: cannot listen: no such file or directory",
        )

    def test_describeError(self) -> None:
        """
        An error without a system reason is described by its message, or
        its type when it has none.
        """
        self.assertEqual(describeError(ValueError("bad")), "bad")
        self.assertEqual(describeError(ValueError()), "ValueError")


class ReadinessTests(SynchronousTestCase):
    """
    L{ProxyService.readiness} is false while any proxy listener is not
    listening.
    """

    def service(self, ready: bool = True) -> ProxyService:
        """
        A proxy service on an in-memory registry, C{ready} or not.
        """
        return ProxyService(
            cast(ProxySite, object()),
            MemoryRegistry(ready=ready),
            FakeUpstreamClient(),
            Clock(),
        )

    def test_notReadyWhileNotListening(self) -> None:
        """
        Running, with the registry ready, monedge is ready only while every
        proxy listener listens: one that stopped makes /readyz 503, naming
        it.
        """
        service = self.service()
        ports = [FakePort(), FakePort()]
        service.addListener(
            Listener("port", "tcp:8080", FakeEndpoint(ports[0]), Factory())
        )
        service.addListener(
            Listener("listen", "unix:/run/m.sock", FakeEndpoint(ports[1]), Factory())
        )
        service.privilegedStartService()
        service.startService()
        self.assertEqual(service.readiness(), (True, "serving"))
        ports[1].connected = False
        self.assertEqual(
            service.readiness(), (False, "not listening: --listen unix:/run/m.sock")
        )
        ports[0].connected = False
        self.assertEqual(
            service.notListening(), ["--port tcp:8080", "--listen unix:/run/m.sock"]
        )

    def test_notListeningBeforeRegistry(self) -> None:
        """
        Not listening is reported before waiting for the registry: it is
        the more urgent reason.
        """
        service = self.service(ready=False)
        port = FakePort()
        service.addListener(Listener("port", "tcp:8080", FakeEndpoint(port), Factory()))
        service.startService()
        port.connected = False
        self.assertEqual(service.readiness(), (False, "not listening: --port tcp:8080"))

    def test_otherServicesCountWhileRunning(self) -> None:
        """
        A listener that is some other service counts as listening while it
        runs.
        """
        from twisted.application.service import Service

        service = self.service()
        other = Service()
        other.setName("custom")
        service.addListener(other)
        service.startService()
        self.assertEqual(service.readiness(), (True, "serving"))
        other.running = False
        self.assertEqual(service.readiness(), (False, "not listening: custom"))


class StartupLineTests(SynchronousTestCase):
    """
    An uncaught startup error ends the process with one line on standard
    error and no traceback.
    """

    def test_startupLine(self) -> None:
        """
        The line is prefixed with C{monedge: }, and line breaks in the
        message are folded, so that it stays one line.
        """
        self.assertEqual(
            startupLine("--hooks h.yaml: not YAML: while parsing\n  in line 2"),
            "monedge: --hooks h.yaml: not YAML: while parsing in line 2\n",
        )

    def test_exitAtStartup(self) -> None:
        """
        exitAtStartup writes the line and exits with status 1.
        """
        out = io.StringIO()
        with self.assertRaises(SystemExit) as caught:
            exitAtStartup("--drain-delay: expected a duration", out)
        self.assertEqual(caught.exception.code, 1)
        self.assertEqual(
            out.getvalue(), "monedge: --drain-delay: expected a duration\n"
        )

    def test_hookWritesUsageErrors(self) -> None:
        """
        The hook writes an uncaught UsageError as its one line, logs it
        once (critical, without a traceback), and does not pass it on.
        """
        out = io.StringIO()
        passed: list[BaseException] = []
        hook = startupErrorHook(
            lambda kind, value, traceback: passed.append(value), lambda: out
        )
        error = UsageError("--port tcp:80: cannot listen: permission denied")
        with capturedLogs() as events:
            hook(UsageError, error, None)
        self.assertEqual(
            out.getvalue(), "monedge: --port tcp:80: cannot listen: permission denied\n"
        )
        self.assertEqual(passed, [])
        critical = [e for e in events if e.get("log_level") == LogLevel.critical]
        self.assertEqual(len(critical), 1)
        self.assertNotIn("log_failure", critical[0])
        self.assertEqual(
            critical[0]["reason"], "--port tcp:80: cannot listen: permission denied"
        )

    def test_hookPassesOthersOn(self) -> None:
        """
        Any other exception (a bug) goes to the previous hook, traceback
        and all.
        """
        out = io.StringIO()
        passed: list[BaseException] = []
        hook = startupErrorHook(
            lambda kind, value, traceback: passed.append(value), lambda: out
        )
        error = RuntimeError("bug")
        hook(RuntimeError, error, None)
        self.assertEqual(passed, [error])
        self.assertEqual(out.getvalue(), "")

    def test_hookWithoutStderr(self) -> None:
        """
        With no standard error (a daemon's, closed), the hook writes
        nothing and does not fail.
        """
        hook = startupErrorHook(sys.__excepthook__, lambda: None)
        with capturedLogs() as events:
            hook(UsageError, UsageError("x"), None)
        self.assertEqual(len(events), 1)
