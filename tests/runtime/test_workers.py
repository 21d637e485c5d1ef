"""
Tests for C{--workers}: L{monedge.runtime.workers} (the supervisor, its restart
back-off and drain, the worker-side listener adoption and orphan watch),
the group admin site in L{monedge.runtime.admin}, L{monedge.observe.metrics.mergeExpositions}
and the new options in L{monedge.tap}.

Everything runs on fake reactors: no process is spawned and no socket is
bound here (the end-to-end tests do that).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import twisted.test
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import (
    CannotListenError,
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
)
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from monedge.observe.metrics import (
    GROUP_MAX_GAUGES,
    Metrics,
    StaticCollector,
    mergeExpositions,
)
from monedge.runtime.admin import groupAdminSite
from monedge.runtime.lifecycle import Listener
from monedge.runtime.workers import (
    ADOPTABLE,
    RESTART_DELAY,
    RESTART_DELAY_MAX,
    YOUNG,
    AdoptedEndpoint,
    NoConnections,
    OrphanWatch,
    Worker,
    WorkerGroup,
    listenerKind,
    parseInherited,
    twistdCommand,
)
from monedge.tap import Options
from tests.runtime.test_tap import OptionsTestCase

#: A step small enough to land just before a scheduled call, and exactly
#: representable, so that advancing by C{delay - EPSILON} then C{EPSILON}
#: reaches the call's time exactly.
EPSILON = 1 / 128

SampleKey = tuple[str, tuple[tuple[str, str], ...]]


class FakeProcess:
    """
    What the fake L{ProcessReactor.spawnProcess} returns: a process
    transport with a C{pid} that records the signals it is sent.

    @ivar signalError: if set, L{signalProcess} records the signal, then
        raises this (as a process that is already gone would).
    """

    def __init__(
        self,
        pid: int,
        protocol: ProcessProtocol,
        executable: str,
        args: list[str],
        env: dict[str, str] | None,
        childFDs: dict[int, Any] | None,
    ) -> None:
        self.pid = pid
        self.protocol = protocol
        self.executable = executable
        self.args = args
        self.env = env
        self.childFDs = childFDs
        self.signals: list[int] = []
        self.signalError: BaseException | None = None

    def signalProcess(self, signalID: int) -> None:
        self.signals.append(signalID)
        if self.signalError is not None:
            raise self.signalError

    def end(self, exitCode: int | None = None, signalNumber: int | None = None) -> None:
        """
        Report this process's end to its protocol, as the reactor would.
        """
        self.protocol.processEnded(
            Failure(ProcessTerminated(exitCode=exitCode, signal=signalNumber))
        )


class ProcessReactor(MemoryReactorClock):
    """
    A memory reactor and clock that records spawned processes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []
        self._nextPid = 1000

    def spawnProcess(
        self,
        processProtocol: ProcessProtocol,
        executable: str,
        args: list[str],
        env: dict[str, str] | None = None,
        path: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: dict[int, Any] | None = None,
    ) -> FakeProcess:
        self._nextPid += 1
        process = FakeProcess(
            self._nextPid, processProtocol, executable, list(args), env, childFDs
        )
        self.processes.append(process)
        return process


@implementer(IListeningPort)
class FakeListeningPort:
    """
    A listening port the supervisor could have bound: a descriptor and an
    address, and a count of L{stopListening} calls.
    """

    def __init__(self, fd: int, address: IAddress) -> None:
        self._fd = fd
        self._address = address
        self.stopped = 0
        self.reading = True
        self.connected = True

    def fileno(self) -> int:
        return self._fd

    def getHost(self) -> IAddress:
        return self._address

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        self.stopped += 1

    def stopReading(self) -> None:
        self.reading = False


class RecordingService(Service):
    """
    A child service that records when it is stopped.
    """

    def __init__(self) -> None:
        self.stops = 0

    def stopService(self) -> None:
        super().stopService()
        self.stops += 1


class CommandRecorder:
    """
    A command builder that records what it is asked for.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[str], str]] = []

    def __call__(self, number: int, inherited: Sequence[str], admin: str) -> list[str]:
        self.calls.append((number, list(inherited), admin))
        return ["/opt/monedge/worker", f"--number={number}", *inherited, admin]


def runtimeDirectory(testCase: SynchronousTestCase) -> str:
    """
    A fresh directory for a group's worker admin sockets, removed after
    the test: under the system's temporary directory, as the supervisor's
    is, since the trial's own are too deep for a Unix socket's path.
    """
    directory = tempfile.mkdtemp(prefix="monedge-test-")
    testCase.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    return directory


def makeGroup(
    testCase: SynchronousTestCase,
    count: int = 2,
    drainDelay: float = 5.0,
    drainTimeout: float = 25.0,
    listeners: Sequence[Listener] = (),
) -> tuple[WorkerGroup, ProcessReactor, CommandRecorder]:
    """
    A L{WorkerGroup} of C{count} workers on a fake reactor, with
    C{listeners} (none by default) and a fresh runtime directory.
    """
    reactor = ProcessReactor()
    directory = runtimeDirectory(testCase)
    command = CommandRecorder()
    group = WorkerGroup(
        reactor,
        count,
        listeners,
        command,
        directory,
        drainDelay=drainDelay,
        drainTimeout=drainTimeout,
        environment={"MONEDGE_TEST": "1"},
    )
    return group, reactor, command


class HelperTests(SynchronousTestCase):
    """
    L{parseInherited}, L{listenerKind} and L{twistdCommand}.
    """

    def test_parseInherited(self) -> None:
        """
        C{FD:FAMILY} gives the descriptor and its address family, for each
        of INET, INET6 and UNIX.
        """
        self.assertEqual(parseInherited("3:INET"), (3, socket.AF_INET))
        self.assertEqual(parseInherited("4:INET6"), (4, socket.AF_INET6))
        self.assertEqual(parseInherited("12:UNIX"), (12, socket.AF_UNIX))

    def test_parseInheritedMalformed(self) -> None:
        """
        A value without a separator, a descriptor that is not a number, or
        an unknown (or lowercase) family is a ValueError.
        """
        malformed = ("3", "3INET", ":INET", "x:INET", "-1:INET", "3:", "3:inet")
        for value in (*malformed, "3:IPX", "3:INET:x", ""):
            with self.subTest(value=value):
                self.assertRaises(ValueError, parseInherited, value)

    def test_listenerKind(self) -> None:
        """
        The kind is the endpoint string's first field, lowercased and
        stripped.
        """
        self.assertEqual(listenerKind("tcp:8080:interface=127.0.0.1"), "tcp")
        self.assertEqual(listenerKind("tcp6:8080"), "tcp6")
        self.assertEqual(listenerKind("unix:/run/monedge.sock"), "unix")
        self.assertEqual(listenerKind(" SSL:443:privateKey=k.pem"), "ssl")
        self.assertEqual(listenerKind("systemd"), "systemd")

    def test_twistdCommand(self) -> None:
        """
        A worker runs twistd's entry point under this interpreter, without
        daemonizing or a pidfile, with the supervisor's monedge options in
        order, then its number, the supervisor's pid, its admin endpoint
        and one --worker-fd per inherited listener.
        """
        build = twistdCommand(["--port", "8080", "--registry", "static:s.yaml"])
        argv = build(1, ["3:INET", "4:UNIX"], "unix:/x")
        self.assertEqual(
            argv,
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "monedge",
                "--port",
                "8080",
                "--registry",
                "static:s.yaml",
                "--worker-id",
                "1",
                "--worker-parent",
                str(os.getpid()),
                "--worker-admin",
                "unix:/x",
                "--worker-fd",
                "3:INET",
                "--worker-fd",
                "4:UNIX",
            ],
        )

    def test_twistdCommandSingleListener(self) -> None:
        """
        With one inherited listener, the internal options close the command
        line in the documented order.
        """
        argv = twistdCommand([])(1, ["3:INET"], "unix:/x")
        self.assertEqual(
            argv[-8:],
            [
                "--worker-id",
                "1",
                "--worker-parent",
                str(os.getpid()),
                "--worker-admin",
                "unix:/x",
                "--worker-fd",
                "3:INET",
            ],
        )
        self.assertEqual(argv[argv.index("monedge") + 1], "--worker-id")


class WorkerGroupStartTests(SynchronousTestCase):
    """
    L{WorkerGroup.startService} spawns each worker with its command line,
    descriptors and environment.
    """

    def test_spawnsEveryWorker(self) -> None:
        """
        Starting spawns C{count} processes, each from the command builder
        given its number, no inherited listener (there are none) and its
        private admin endpoint, with stdin on /dev/null and stdout and stderr
        shared.
        """
        group, reactor, command = makeGroup(self, count=3)
        group.startService()
        directory = group.runtimeDirectory
        self.assertEqual(
            command.calls,
            [(n, [], f"unix:{directory}/worker-{n}.sock:mode=600") for n in range(3)],
        )
        self.assertEqual(len(reactor.processes), 3)
        for number, process in enumerate(reactor.processes):
            admin = f"unix:{directory}/worker-{number}.sock:mode=600"
            self.assertEqual(process.executable, "/opt/monedge/worker")
            self.assertEqual(
                process.args, ["/opt/monedge/worker", f"--number={number}", admin]
            )
            assert process.childFDs is not None
            stdin = process.childFDs.pop(0)
            self.assertEqual(os.readlink(f"/proc/self/fd/{stdin}"), os.devnull)
            self.assertEqual(process.childFDs, {1: 1, 2: 2})
            self.assertEqual(process.env, {"MONEDGE_TEST": "1"})
        self.assertEqual(
            [worker.pid for worker in group.workers],
            [process.pid for process in reactor.processes],
        )
        self.assertEqual(group.alive(), 3)
        self.assertTrue(all(worker.alive for worker in group.workers))
        self.assertEqual(group.adminEndpoint(group.workers[1]), command.calls[1][2])

    def test_inheritedListeners(self) -> None:
        """
        Each bound listener is passed to every worker from descriptor 3 up,
        and named on its command line as C{FD:FAMILY}.
        """
        group, reactor, command = makeGroup(self, count=2)
        group.ports = [
            FakeListeningPort(41, IPv4Address("TCP", "0.0.0.0", 8080)),
            FakeListeningPort(42, IPv6Address("TCP", "::", 8080)),
            FakeListeningPort(43, UNIXAddress(b"/run/monedge.sock")),
        ]
        group.startService()
        self.assertEqual(
            [inherited for _, inherited, _ in command.calls],
            [["3:INET", "4:INET6", "5:UNIX"]] * 2,
        )
        for process in reactor.processes:
            assert process.childFDs is not None
            del process.childFDs[0]
            self.assertEqual(process.childFDs, {1: 1, 2: 2, 3: 41, 4: 42, 5: 43})

    def test_environmentDefaultsToOwn(self) -> None:
        """
        Without an explicit environment, workers get a copy of this
        process's.
        """
        reactor = ProcessReactor()
        directory = runtimeDirectory(self)
        group = WorkerGroup(reactor, 1, [], CommandRecorder(), directory)
        group.startService()
        self.assertEqual(reactor.processes[0].env, dict(os.environ))

    def test_staleAdminSocketRemoved(self) -> None:
        """
        A file left at a worker's admin socket path (by a worker that died)
        is removed before the worker is spawned, so that it can listen.
        """
        group, reactor, command = makeGroup(self, count=1)
        stale = group.workers[0].adminSocket
        with open(stale, "w"):
            pass
        group.startService()
        self.assertFalse(os.path.exists(stale))
        self.assertEqual(len(reactor.processes), 1)

    def test_childServicesStartFirst(self) -> None:
        """
        Child services (the group's admin listener) are running once the
        group has started.
        """
        group, reactor, command = makeGroup(self, count=1)
        child = RecordingService()
        child.setServiceParent(group)
        group.startService()
        self.assertTrue(child.running)


class WorkerRestartTests(SynchronousTestCase):
    """
    A worker that exits while the group runs is restarted after a back-off
    that doubles while workers keep dying young.
    """

    def test_restartAfterDelay(self) -> None:
        """
        A worker killed by a signal is restarted after RESTART_DELAY and not
        before; meanwhile it is not alive, and afterwards it has a new pid,
        one more restart and its last exit recorded.
        """
        group, reactor, command = makeGroup(self, count=2)
        group.startService()
        first = reactor.processes[0]
        first.end(signalNumber=9)
        worker = group.workers[0]
        self.assertFalse(worker.alive)
        self.assertIsNone(worker.pid)
        self.assertEqual(group.alive(), 1)
        self.assertEqual(worker.restarts, 1)
        self.assertEqual(worker.lastExit, "signal 9")
        reactor.advance(RESTART_DELAY - EPSILON)
        self.assertEqual(len(reactor.processes), 2)
        reactor.advance(EPSILON)
        self.assertEqual(len(reactor.processes), 3)
        self.assertEqual(worker.pid, reactor.processes[2].pid)
        self.assertNotEqual(worker.pid, first.pid)
        self.assertTrue(worker.alive)
        self.assertEqual(group.alive(), 2)
        self.assertEqual(command.calls[-1][0], 0)
        self.assertEqual(worker.restarts, 1)
        self.assertEqual(group.workers[1].restarts, 0)

    def test_exitCode(self) -> None:
        """
        A worker that exits by itself is restarted too, its last exit saying
        which exit code it gave (0 included).
        """
        group, reactor, command = makeGroup(self, count=1)
        group.startService()
        reactor.processes[0].end(exitCode=3)
        self.assertEqual(group.workers[0].lastExit, "exit code 3")
        reactor.advance(RESTART_DELAY)
        self.assertEqual(len(reactor.processes), 2)
        reactor.processes[1].protocol.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(group.workers[0].lastExit, "exit code 0")
        self.assertEqual(group.workers[0].restarts, 2)

    def test_backOffDoubles(self) -> None:
        """
        Each young exit in a row doubles the delay before the restart, up to
        RESTART_DELAY_MAX.
        """
        group, reactor, command = makeGroup(self, count=1)
        group.startService()
        expected = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
        self.assertEqual(expected[0], RESTART_DELAY)
        self.assertEqual(expected[-1], RESTART_DELAY_MAX)
        for exits, delay in enumerate(expected, start=1):
            reactor.processes[-1].end(signalNumber=11)
            reactor.advance(delay - EPSILON)
            self.assertEqual(len(reactor.processes), exits, f"early for {delay}")
            reactor.advance(EPSILON)
            self.assertEqual(len(reactor.processes), exits + 1, f"late for {delay}")
        self.assertEqual(group.workers[0].restarts, len(expected))

    def test_backOffResetsAfterLongLife(self) -> None:
        """
        A worker that exits after living YOUNG seconds or more is restarted
        after RESTART_DELAY again, however many young exits came before.
        """
        group, reactor, command = makeGroup(self, count=1)
        group.startService()
        for delay in (0.5, 1.0, 2.0):
            reactor.processes[-1].end(signalNumber=9)
            reactor.advance(delay)
        reactor.advance(YOUNG + 1)
        reactor.processes[-1].end(exitCode=1)
        before = len(reactor.processes)
        reactor.advance(RESTART_DELAY - EPSILON)
        self.assertEqual(len(reactor.processes), before)
        reactor.advance(EPSILON)
        self.assertEqual(len(reactor.processes), before + 1)

    def test_backOffSharedByTheGroup(self) -> None:
        """
        Young exits count for the whole group: a second worker dying young
        right after a first one waits twice as long.
        """
        group, reactor, command = makeGroup(self, count=2)
        group.startService()
        reactor.processes[0].end(signalNumber=9)
        reactor.processes[1].end(signalNumber=9)
        reactor.advance(RESTART_DELAY)
        self.assertEqual(len(reactor.processes), 3)
        self.assertEqual(reactor.processes[2].pid, group.workers[0].pid)
        reactor.advance(RESTART_DELAY)
        self.assertEqual(len(reactor.processes), 4)
        self.assertEqual(reactor.processes[3].pid, group.workers[1].pid)

    def test_asJSON(self) -> None:
        """
        A worker's description gives its number, pid, liveness, restarts
        and last exit.
        """
        group, reactor, command = makeGroup(self, count=1)
        group.startService()
        worker = group.workers[0]
        self.assertEqual(
            worker.asJSON(),
            {
                "worker": 0,
                "pid": reactor.processes[0].pid,
                "alive": True,
                "restarts": 0,
                "last_exit": None,
            },
        )
        reactor.processes[0].end(exitCode=2)
        self.assertEqual(
            worker.asJSON(),
            {
                "worker": 0,
                "pid": None,
                "alive": False,
                "restarts": 1,
                "last_exit": "exit code 2",
            },
        )


class WorkerGroupStopTests(SynchronousTestCase):
    """
    L{WorkerGroup.stopService} drains the workers: SIGTERM, close the
    listeners after the drain delay, SIGKILL after the drain timeout, and
    finish once every worker has ended.
    """

    def test_sigtermAndWait(self) -> None:
        """
        Stopping sends SIGTERM to every live worker; its Deferred fires only
        once every worker has ended, and the workers are not restarted.
        """
        group, reactor, command = makeGroup(self, count=2)
        group.startService()
        d = group.stopService()
        self.assertTrue(group.draining)
        for process in reactor.processes:
            self.assertEqual(process.signals, [signal.SIGTERM])
        self.assertNoResult(d)
        reactor.processes[0].end(signalNumber=signal.SIGTERM)
        self.assertNoResult(d)
        self.assertEqual(group.alive(), 1)
        reactor.processes[1].end(exitCode=0)
        self.successResultOf(d)
        self.assertEqual(group.alive(), 0)
        self.assertEqual(group.workers[0].lastExit, f"signal {signal.SIGTERM}")
        self.assertEqual([worker.restarts for worker in group.workers], [0, 0])
        reactor.advance(RESTART_DELAY_MAX * 10)
        self.assertEqual(len(reactor.processes), 2)
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.assertFalse(group.running)

    def test_cancelsPendingRestart(self) -> None:
        """
        A restart scheduled before the stop never happens, and the dead
        worker is not waited for.
        """
        group, reactor, command = makeGroup(self, count=2)
        group.startService()
        reactor.processes[0].end(signalNumber=9)
        d = group.stopService()
        self.assertEqual(reactor.processes[0].signals, [])
        self.assertEqual(reactor.processes[1].signals, [signal.SIGTERM])
        reactor.processes[1].end(signalNumber=signal.SIGTERM)
        self.successResultOf(d)
        reactor.advance(RESTART_DELAY_MAX * 10)
        self.assertEqual(len(reactor.processes), 2)

    def test_sigkillAfterTimeout(self) -> None:
        """
        A worker still alive drainDelay + drainTimeout + 5 seconds after the
        stop is sent SIGKILL then, and not before; one that ended is not.
        """
        group, reactor, command = makeGroup(
            self, count=2, drainDelay=2.0, drainTimeout=10.0
        )
        group.startService()
        d = group.stopService()
        reactor.processes[0].end(signalNumber=signal.SIGTERM)
        reactor.advance(2.0 + 10.0 + 5 - EPSILON)
        self.assertEqual(reactor.processes[1].signals, [signal.SIGTERM])
        reactor.advance(EPSILON)
        self.assertEqual(reactor.processes[1].signals, [signal.SIGTERM, signal.SIGKILL])
        self.assertEqual(reactor.processes[0].signals, [signal.SIGTERM])
        self.assertNoResult(d)
        reactor.processes[1].end(signalNumber=signal.SIGKILL)
        self.successResultOf(d)

    def test_noSigkillWhenDone(self) -> None:
        """
        Once every worker has ended, the pending close and kill calls are
        cancelled.
        """
        group, reactor, command = makeGroup(self, count=1)
        group.startService()
        d = group.stopService()
        self.assertEqual(len(reactor.getDelayedCalls()), 2)
        reactor.processes[0].end(exitCode=0)
        self.successResultOf(d)
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.assertEqual(reactor.processes[0].signals, [signal.SIGTERM])

    def test_portsClosedAfterDrainDelay(self) -> None:
        """
        The supervisor's copies of the listening sockets are closed
        drainDelay seconds after the stop (when the workers stop accepting),
        not before, and only once.
        """
        group, reactor, command = makeGroup(self, count=1, drainDelay=4.0)
        ports = [
            FakeListeningPort(41, IPv4Address("TCP", "0.0.0.0", 8080)),
            FakeListeningPort(42, UNIXAddress(b"/run/monedge.sock")),
        ]
        group.ports = list(ports)
        group.startService()
        d = group.stopService()
        reactor.advance(4.0 - EPSILON)
        self.assertEqual([port.stopped for port in ports], [0, 0])
        reactor.advance(EPSILON)
        self.assertEqual([port.stopped for port in ports], [1, 1])
        self.assertEqual(group.ports, [])
        reactor.processes[0].end(exitCode=0)
        self.successResultOf(d)
        self.assertEqual([port.stopped for port in ports], [1, 1])

    def test_portsClosedWhenWorkersEndEarly(self) -> None:
        """
        If every worker ends before the drain delay, the listening sockets
        are closed then.
        """
        group, reactor, command = makeGroup(self, count=1)
        port = FakeListeningPort(41, IPv4Address("TCP", "0.0.0.0", 8080))
        group.ports = [port]
        group.startService()
        d = group.stopService()
        reactor.processes[0].end(exitCode=0)
        self.successResultOf(d)
        self.assertEqual(port.stopped, 1)

    def test_childServicesStopLast(self) -> None:
        """
        A child service (the group's admin listener) keeps running while
        workers drain, and is stopped once they have all ended.
        """
        group, reactor, command = makeGroup(self, count=2)
        child = RecordingService()
        child.setServiceParent(group)
        group.startService()
        d = group.stopService()
        reactor.processes[0].end(exitCode=0)
        reactor.advance(group.drainDelay + 1)
        self.assertTrue(child.running)
        self.assertEqual(child.stops, 0)
        reactor.processes[1].end(exitCode=0)
        self.successResultOf(d)
        self.assertFalse(child.running)
        self.assertEqual(child.stops, 1)

    def test_runtimeDirectoryRemoved(self) -> None:
        """
        The runtime directory (the workers' admin sockets) is removed once
        every worker has ended, not before.
        """
        group, reactor, command = makeGroup(self, count=1)
        group.startService()
        with open(group.workers[0].adminSocket, "w"):
            pass
        d = group.stopService()
        self.assertTrue(os.path.isdir(group.runtimeDirectory))
        reactor.processes[0].end(exitCode=0)
        self.successResultOf(d)
        self.assertFalse(os.path.exists(group.runtimeDirectory))

    def test_oserrorTolerated(self) -> None:
        """
        An OSError from signalProcess (a worker already gone) is ignored:
        the other workers are still signalled and the stop completes.
        """
        group, reactor, command = makeGroup(self, count=2)
        group.startService()
        reactor.processes[0].signalError = OSError("No such process")
        d = group.stopService()
        self.assertEqual(reactor.processes[0].signals, [signal.SIGTERM])
        self.assertEqual(reactor.processes[1].signals, [signal.SIGTERM])
        reactor.processes[1].signalError = OSError("No such process")
        reactor.advance(group.drainDelay + group.drainTimeout + 5)
        self.assertEqual(reactor.processes[0].signals, [signal.SIGTERM, signal.SIGKILL])
        self.assertEqual(reactor.processes[1].signals, [signal.SIGTERM, signal.SIGKILL])
        reactor.processes[0].end(signalNumber=signal.SIGKILL)
        reactor.processes[1].end(signalNumber=signal.SIGKILL)
        self.successResultOf(d)

    def test_processExitedAlreadyTolerated(self) -> None:
        """
        L{ProcessExitedAlready}, which Twisted's process transport raises
        from signalProcess once the child has been reaped but before
        processEnded is delivered, is tolerated like an OSError: the other
        workers are still signalled and the stop completes.

        (This exposes a bug: L{WorkerGroup._signal} only catches OSError, and
        L{ProcessExitedAlready} is not one.)
        """
        group, reactor, command = makeGroup(self, count=2)
        group.startService()
        reactor.processes[0].signalError = ProcessExitedAlready()
        d = group.stopService()
        self.assertEqual(reactor.processes[1].signals, [signal.SIGTERM])
        reactor.processes[0].end(signalNumber=9)
        reactor.processes[1].end(signalNumber=signal.SIGTERM)
        self.successResultOf(d)

    def test_stopBeforeAnyWorker(self) -> None:
        """
        Stopping a group whose workers are all dead (restarts pending)
        completes at once.
        """
        group, reactor, command = makeGroup(self, count=1)
        group.startService()
        reactor.processes[0].end(signalNumber=9)
        self.successResultOf(group.stopService())
        self.assertEqual(reactor.getDelayedCalls(), [])


class FakeAdoptingReactor:
    """
    A reactor that records adopted ports.
    """

    def __init__(self) -> None:
        self.adopted: list[tuple[int, int, object]] = []
        self.ports: list[FakeAdoptedPort] = []
        self.failure: Exception | None = None

    def adoptStreamPort(self, fd: int, family: int, factory: object) -> FakeAdoptedPort:
        if self.failure is not None:
            raise self.failure
        self.adopted.append((fd, family, factory))
        port = FakeAdoptedPort()
        self.ports.append(port)
        return port


class FakeAdoptedPort:
    """
    A port returned by L{FakeAdoptingReactor.adoptStreamPort}; its
    L{stopListening} returns a Deferred the test can fire.
    """

    def __init__(self) -> None:
        self.stopping: list[Deferred[None]] = []
        self.numberAccepts = 100
        self.reads: list[int] = []

    def doRead(self) -> None:
        self.reads.append(self.numberAccepts)
        self.numberAccepts += 20

    def stopListening(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.stopping.append(d)
        return d


class AdoptedEndpointTests(SynchronousTestCase):
    """
    L{AdoptedEndpoint}, under a L{Listener}, listens on a descriptor
    inherited from the supervisor.
    """

    def openDescriptor(self) -> int:
        """
        A real descriptor, closed at cleanup if the code under test did not.
        """
        fd = os.open(os.devnull, os.O_RDONLY)

        def close() -> None:
            try:
                os.close(fd)
            except OSError:
                pass

        self.addCleanup(close)
        return fd

    def listener(
        self, reactor: FakeAdoptingReactor, fd: int, family: int, factory: Factory
    ) -> Listener:
        """
        A C{--port} listener on C{fd}, adopted through C{reactor}.
        """
        return Listener(
            "port", "tcp:8080", AdoptedEndpoint(reactor, fd, family), factory
        )

    def test_privilegedStartAdopts(self) -> None:
        """
        privilegedStartService adopts the descriptor for the factory, then
        closes it (the reactor has its own duplicate); startService does
        not adopt it again.
        """
        reactor = FakeAdoptingReactor()
        fd = self.openDescriptor()
        factory = Factory()
        listener = self.listener(reactor, fd, socket.AF_INET6, factory)
        listener.privilegedStartService()
        self.assertEqual(reactor.adopted, [(fd, socket.AF_INET6, factory)])
        self.assertRaises(OSError, os.fstat, fd)
        self.assertTrue(listener.listening)
        listener.startService()
        self.assertTrue(listener.running)
        self.assertEqual(len(reactor.adopted), 1)

    def test_startAdopts(self) -> None:
        """
        startService alone (no privileged start) adopts and closes the
        descriptor.
        """
        reactor = FakeAdoptingReactor()
        fd = self.openDescriptor()
        factory = Factory()
        listener = self.listener(reactor, fd, socket.AF_INET, factory)
        listener.startService()
        self.assertEqual(reactor.adopted, [(fd, socket.AF_INET, factory)])
        self.assertRaises(OSError, os.fstat, fd)

    def test_acceptsOneAtATime(self) -> None:
        """
        The adopted port accepts one connection per readiness event,
        whatever its own accounting raised the batch to, so that workers
        sharing the socket take turns.
        """
        reactor = FakeAdoptingReactor()
        listener = self.listener(
            reactor, self.openDescriptor(), socket.AF_INET, Factory()
        )
        listener.startService()
        port = reactor.ports[0]
        port.doRead()
        port.doRead()
        self.assertEqual(port.reads, [1, 1])

    def test_stopStopsListening(self) -> None:
        """
        stopService stops listening on the adopted port and returns the
        port's Deferred; a second stop has nothing to do.
        """
        reactor = FakeAdoptingReactor()
        fd = self.openDescriptor()
        listener = self.listener(reactor, fd, socket.AF_UNIX, Factory())
        listener.startService()
        d = listener.stopService()
        self.assertFalse(listener.running)
        self.assertFalse(listener.listening)
        self.assertEqual(len(reactor.ports[0].stopping), 1)
        assert d is not None
        self.assertNoResult(d)
        reactor.ports[0].stopping[0].callback(None)
        self.successResultOf(d)
        self.assertIsNone(listener.stopService())
        self.assertEqual(len(reactor.ports[0].stopping), 1)

    def test_adoptedOnce(self) -> None:
        """
        The descriptor is adopted once: it is closed after, so a second
        listen fails rather than adopt whatever now has that number.
        """
        reactor = FakeAdoptingReactor()
        endpoint = AdoptedEndpoint(reactor, self.openDescriptor(), socket.AF_INET)
        self.successResultOf(endpoint.listen(Factory()))
        self.failureResultOf(endpoint.listen(Factory()), ValueError)
        self.assertEqual(len(reactor.adopted), 1)

    def test_adoptionFailure(self) -> None:
        """
        A descriptor that cannot be adopted stops the worker's startup with
        a one-line UsageError naming the option, the address and why.
        """
        reactor = FakeAdoptingReactor()
        reactor.failure = OSError(errno.EBADF, os.strerror(errno.EBADF))
        listener = self.listener(reactor, 97, socket.AF_INET, Factory())
        with self.assertRaises(UsageError) as caught:
            listener.privilegedStartService()
        self.assertEqual(
            str(caught.exception),
            "--port tcp:8080: cannot listen: bad file descriptor",
        )
        self.assertFalse(listener.listening)


@implementer(IStreamServerEndpoint)
class FakeServerEndpoint:
    """
    An endpoint whose listen answers at once: with C{port}, or C{error}.
    """

    def __init__(
        self, port: IListeningPort | None = None, error: Exception | None = None
    ) -> None:
        self.port = port
        self.error = error
        self.factories: list[IProtocolFactory] = []

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        self.factories.append(protocolFactory)
        if self.error is not None:
            return fail(self.error)
        assert self.port is not None
        return succeed(self.port)


class WorkerGroupBindTests(SynchronousTestCase):
    """
    The supervisor binds the proxy listeners before any worker starts, and
    stops at startup, naming the listener, if one cannot be bound.
    """

    def group(
        self, listeners: Sequence[Listener], directory: str | None = None
    ) -> tuple[WorkerGroup, ProcessReactor]:
        """
        A group of two workers on C{listeners}, with its runtime directory
        at C{directory} (a fresh one by default).
        """
        reactor = ProcessReactor()
        if directory is None:
            directory = runtimeDirectory(self)
        else:
            os.makedirs(directory)
        group = WorkerGroup(reactor, 2, listeners, CommandRecorder(), directory)
        return group, reactor

    def test_bindsWithoutReading(self) -> None:
        """
        privilegedStartService binds every listener, in order, with the
        factory that accepts nothing, stops reading from each (only workers
        accept) and hands their descriptors to the workers.
        """
        ports = [
            FakeListeningPort(41, IPv4Address("TCP", "0.0.0.0", 8080)),
            FakeListeningPort(42, UNIXAddress(b"/run/monedge.sock")),
        ]
        endpoints = [FakeServerEndpoint(port) for port in ports]
        listeners = [
            Listener("port", "tcp:8080", endpoints[0], NoConnections()),
            Listener("listen", "unix:/run/monedge.sock", endpoints[1], NoConnections()),
        ]
        group, reactor = self.group(listeners)
        group.privilegedStartService()
        self.assertEqual(group.ports, ports)
        self.assertEqual([port.reading for port in ports], [False, False])
        self.assertEqual(group.notListening(), [])
        group.startService()
        self.assertEqual([len(e.factories) for e in endpoints], [1, 1])
        assert reactor.processes[0].childFDs is not None
        self.assertEqual(reactor.processes[0].childFDs[3], 41)
        self.assertEqual(reactor.processes[0].childFDs[4], 42)

    def test_bindFailure(self) -> None:
        """
        A listener that cannot be bound raises a one-line UsageError naming
        its option and address and why; the listeners bound before it are
        closed, the runtime directory is removed, and no worker starts.
        """
        bound = FakeListeningPort(41, IPv4Address("TCP", "0.0.0.0", 8080))
        inUse = CannotListenError(
            "", 8443, OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
        )
        listeners = [
            Listener("port", "tcp:8080", FakeServerEndpoint(bound), NoConnections()),
            Listener(
                "tls-port",
                "tcp:8443",
                FakeServerEndpoint(error=inUse),
                NoConnections(),
            ),
        ]
        group, reactor = self.group(listeners)
        with self.assertRaises(UsageError) as caught:
            group.privilegedStartService()
        self.assertEqual(
            str(caught.exception),
            "--tls-port tcp:8443: cannot listen: address already in use",
        )
        self.assertEqual(bound.stopped, 1)
        self.assertEqual(group.ports, [])
        self.assertFalse(os.path.exists(group.runtimeDirectory))
        self.assertEqual(reactor.processes, [])

    def test_adminSocketTooLong(self) -> None:
        """
        A runtime directory whose workers' admin socket paths are too long
        for a Unix socket stops the group at startup, naming the path,
        rather than every worker again and again.
        """
        deep = os.path.abspath(self.mktemp())
        directory = os.path.join(deep, "d" * 100)
        group, reactor = self.group([], directory)
        with self.assertRaises(UsageError) as caught:
            group.privilegedStartService()
        message = str(caught.exception)
        self.assertTrue(
            message.startswith(
                f"--workers unix:{directory}/worker-0.sock: cannot listen: "
            ),
            message,
        )
        self.assertIn("too long", message)
        self.assertNotIn("\n", message)
        self.assertFalse(os.path.exists(directory))
        self.assertEqual(reactor.processes, [])

    def test_adminSocketsLeftFree(self) -> None:
        """
        Checking the workers' admin socket paths leaves nothing behind, so
        that the workers can listen there.
        """
        group, reactor = self.group([])
        group.privilegedStartService()
        self.assertEqual(os.listdir(group.runtimeDirectory), [])

    def test_notListening(self) -> None:
        """
        A bound listener whose port has since closed is reported by
        notListening, as its option and address.
        """
        port = FakeListeningPort(41, IPv4Address("TCP", "0.0.0.0", 8080))
        listener = Listener("port", "tcp:8080", FakeServerEndpoint(port), Factory())
        group, reactor = self.group([listener])
        group.privilegedStartService()
        self.assertEqual(group.notListening(), [])
        port.connected = False
        self.assertEqual(group.notListening(), ["--port tcp:8080"])


class StoppableClock(Clock):
    """
    A clock with a reactor's C{stop}, counting calls.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1


class OrphanWatchTests(SynchronousTestCase):
    """
    L{OrphanWatch} stops a worker whose supervisor is gone.
    """

    def test_parentAlive(self) -> None:
        """
        While the parent pid is the supervisor's, the reactor is never
        stopped; stopping the service stops the checks.
        """
        clock = StoppableClock()
        watch = OrphanWatch(clock, os.getppid(), interval=1.0)
        watch.startService()
        for _ in range(5):
            clock.advance(1.0)
        self.assertEqual(clock.stops, 0)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        watch.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_orphaned(self) -> None:
        """
        When the parent pid is not the supervisor's, the reactor is stopped
        once, at the first check (one interval after the start), and the
        checks stop.
        """
        clock = StoppableClock()
        parent = os.getppid() + 1
        watch = OrphanWatch(clock, parent, interval=2.0)
        watch.startService()
        clock.advance(2.0 - EPSILON)
        self.assertEqual(clock.stops, 0)
        clock.advance(EPSILON)
        self.assertEqual(clock.stops, 1)
        clock.advance(10.0)
        self.assertEqual(clock.stops, 1)
        self.assertEqual(clock.getDelayedCalls(), [])
        watch.stopService()
        self.assertEqual(clock.stops, 1)


def sampleValues(text: str) -> dict[SampleKey, float]:
    """
    Every sample of a Prometheus text exposition, by name and sorted labels.
    """
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def familyTypes(text: str) -> dict[str, str]:
    """
    The type of every metric family of an exposition, by family name.
    """
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def render(families: list[Any]) -> str:
    """
    Merged families as a group's /metrics would expose them.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StaticCollector(families))
    return generate_latest(registry).decode()


def key(name: str, **labels: str) -> SampleKey:
    """
    A sample's key in L{sampleValues}.
    """
    return (name, tuple(sorted(labels.items())))


class MergeExpositionsTests(SynchronousTestCase):
    """
    L{mergeExpositions} combines workers' expositions into the group's.
    """

    def workerExpositions(self) -> tuple[str, str]:
        """
        Two workers' real expositions, from different traffic.
        """
        one = Metrics()
        a = one.forService("service.api.a")
        a.observe(200, 0.01)
        a.observe(204, 0.2)
        one.forService("service.api.b").observe(503, 0.04)
        one.forService("service.api.a").inFlight += 1
        one.observeHook("auth", "pass", 0.002)
        two = Metrics()
        two.forService("service.api.a").observe(200, 0.03)
        two.forService("service.api.c").observe(404, 0.001)
        two.forService("service.api.a").inFlight += 2
        two.observeHook("auth", "pass", 0.004)
        two.observeHook("auth", "respond", 0.001)
        return (
            b"".join(one.exposition()).decode(),
            b"".join(two.exposition()).decode(),
        )

    def test_countersSummed(self) -> None:
        """
        Counter samples are summed per label set; label sets only one
        worker has are kept; families keep their type.
        """
        texts = self.workerExpositions()
        merged = render(mergeExpositions(texts))
        values = sampleValues(merged)
        requests = "monedge_requests_total"
        self.assertEqual(
            values[
                key(
                    requests,
                    service="service.api.a",
                    code_class="2xx",
                    origin="monedge",
                )
            ],
            3.0,
        )
        self.assertEqual(
            values[
                key(
                    requests,
                    service="service.api.b",
                    code_class="5xx",
                    origin="monedge",
                )
            ],
            1.0,
        )
        self.assertEqual(
            values[
                key(
                    requests,
                    service="service.api.c",
                    code_class="4xx",
                    origin="monedge",
                )
            ],
            1.0,
        )
        decisions = "monedge_hook_decisions_total"
        self.assertEqual(values[key(decisions, hook="auth", decision="pass")], 2.0)
        self.assertEqual(values[key(decisions, hook="auth", decision="respond")], 1.0)
        types = familyTypes(merged)
        self.assertEqual(types["monedge_requests"], "counter")
        self.assertEqual(types["monedge_request_duration_seconds"], "histogram")
        self.assertEqual(types["monedge_requests_in_flight"], "gauge")
        self.assertIn("monedge_upstream_errors", types)

    def test_histogramsSummed(self) -> None:
        """
        Histogram buckets, counts and sums are summed per label set.
        """
        values = sampleValues(render(mergeExpositions(self.workerExpositions())))
        name = "monedge_request_duration_seconds"
        a = "service.api.a"
        self.assertEqual(values[key(f"{name}_count", service=a)], 3.0)
        self.assertAlmostEqual(values[key(f"{name}_sum", service=a)], 0.24)
        buckets = {
            "0.005": 0.0,
            "0.01": 1.0,
            "0.025": 1.0,
            "0.05": 2.0,
            "0.25": 3.0,
            "+Inf": 3.0,
        }
        for le, count in buckets.items():
            self.assertEqual(values[key(f"{name}_bucket", service=a, le=le)], count, le)
        self.assertEqual(
            values[key(f"{name}_bucket", service="service.api.c", le="0.005")], 1.0
        )
        self.assertEqual(values[key(f"{name}_count", service="service.api.b")], 1.0)

    def test_everySampleSummed(self) -> None:
        """
        Apart from C{_created} timestamps and the shared-state gauges (the
        largest value), every merged sample is the sum of the workers'
        values for it, and no sample is lost or invented.
        """
        texts = self.workerExpositions()
        inputs = [sampleValues(text) for text in texts]
        merged = sampleValues(render(mergeExpositions(texts)))
        self.assertEqual(set(merged), set(inputs[0]) | set(inputs[1]))
        for sample, value in merged.items():
            if sample[0].endswith("_created"):
                continue
            if sample[0] in GROUP_MAX_GAUGES:
                expected = max(values.get(sample, 0.0) for values in inputs)
                self.assertAlmostEqual(value, expected, msg=str(sample))
                continue
            expected = sum(values.get(sample, 0.0) for values in inputs)
            self.assertAlmostEqual(value, expected, msg=str(sample))

    def test_gaugesSummed(self) -> None:
        """
        Gauges outside GROUP_MAX_GAUGES (requests in flight) are summed.
        """
        values = sampleValues(render(mergeExpositions(self.workerExpositions())))
        self.assertEqual(
            values[key("monedge_requests_in_flight", service="service.api.a")], 3.0
        )

    def test_createdTakesEarliest(self) -> None:
        """
        A C{_created} timestamp is the earliest of the workers' (monedge's
        own expositions have none, but a worker of another version might).
        """
        late = (
            "# TYPE monedge_requests_created gauge\n"
            'monedge_requests_created{service="a"} 200.0\n'
        )
        early = late.replace("200.0", "100.0")
        for pair in ([late, early], [early, late]):
            values = sampleValues(render(mergeExpositions(pair)))
            self.assertEqual(
                values[key("monedge_requests_created", service="a")], 100.0
            )

    def test_groupMaxGauges(self) -> None:
        """
        Gauges describing shared state (GROUP_MAX_GAUGES) take the largest
        worker's value, whatever the order, instead of the sum.
        """
        self.assertEqual(
            GROUP_MAX_GAUGES,
            {
                "monedge_registry_services",
                "monedge_registry_last_sync_age_seconds",
                "monedge_build_info",
                "process_start_time_seconds",
                "process_max_fds",
            },
        )
        three = (
            "# TYPE monedge_registry_services gauge\n"
            "monedge_registry_services 3.0\n"
            "# TYPE monedge_registry_last_sync_age_seconds gauge\n"
            "monedge_registry_last_sync_age_seconds 7.0\n"
            "# TYPE monedge_requests_in_flight gauge\n"
            "monedge_requests_in_flight 2.0\n"
        )
        five = (
            "# TYPE monedge_registry_services gauge\n"
            "monedge_registry_services 5.0\n"
            "# TYPE monedge_registry_last_sync_age_seconds gauge\n"
            "monedge_registry_last_sync_age_seconds -1.0\n"
            "# TYPE monedge_requests_in_flight gauge\n"
            "monedge_requests_in_flight 4.0\n"
        )
        for texts in ([three, five], [five, three]):
            values = sampleValues(render(mergeExpositions(texts)))
            self.assertEqual(values[key("monedge_registry_services")], 5.0)
            self.assertEqual(values[key("monedge_registry_last_sync_age_seconds")], 7.0)
            self.assertEqual(values[key("monedge_requests_in_flight")], 6.0)

    def test_empty(self) -> None:
        """
        No exposition gives no family.
        """
        self.assertEqual(mergeExpositions([]), [])
        self.assertEqual(render(mergeExpositions([])), "")

    def test_single(self) -> None:
        """
        One exposition merges to the same samples.
        """
        text = self.workerExpositions()[0]
        self.assertEqual(
            sampleValues(render(mergeExpositions([text]))), sampleValues(text)
        )


class _Request(DummyRequest):
    """
    A DummyRequest with the disconnection flag a real request has.
    """

    _disconnected = False


class FakeFetch:
    """
    The group pages' C{fetch}: records each request and returns a
    Deferred the test fires.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[int, str, Deferred[tuple[int, bytes]]]] = []

    def __call__(self, worker: Worker, path: str) -> Deferred[tuple[int, bytes]]:
        d: Deferred[tuple[int, bytes]] = Deferred()
        self.calls.append((worker.number, path, d))
        return d

    def asked(self) -> list[tuple[int, str]]:
        """
        The (worker number, path) of every request, in order.
        """
        return [(number, path) for number, path, _ in self.calls]

    def answer(self, number: int, status: int, body: bytes) -> None:
        """
        Answer the pending request to worker C{number}.
        """
        for asked, _, d in self.calls:
            if asked == number and not d.called:
                d.callback((status, body))
                return
        raise AssertionError(f"no pending request to worker {number}")

    def fail(self, number: int) -> None:
        """
        Fail the pending request to worker C{number}.
        """
        for asked, _, d in self.calls:
            if asked == number and not d.called:
                d.errback(ConnectionRefusedError("no admin socket"))
                return
        raise AssertionError(f"no pending request to worker {number}")


def readyBody(ready: bool, reason: str) -> bytes:
    """
    A worker's /readyz body.
    """
    return json.dumps({"ready": ready, "reason": reason}).encode()


class GroupAdminTests(SynchronousTestCase):
    """
    The group admin site answers for every worker from their own admin
    sites.
    """

    def setUp(self) -> None:
        self.group, self.reactor, _ = makeGroup(self, count=2)
        self.group.startService()
        self.fetch = FakeFetch()
        self.site: Site = groupAdminSite(self.group, self.fetch, self.reactor)

    def get(self, name: bytes) -> _Request:
        """
        GET /C{name} from the group admin site.
        """
        request = _Request([name])
        request.render(self.site.getResourceFor(request))
        return request

    def document(self, request: _Request) -> Any:
        """
        The JSON body of a finished request.
        """
        self.assertEqual(request.finished, 1)
        return json.loads(b"".join(request.written))

    def test_children(self) -> None:
        """
        The group site serves the same four pages as a single proxy's.
        """
        self.assertEqual(
            set(self.site.resource.children),
            {b"healthz", b"readyz", b"metrics", b"routes"},
        )

    def test_readyWhenAllReady(self) -> None:
        """
        /readyz asks every worker's /readyz and, only once every one has
        answered 200, answers 200 ready.
        """
        request = self.get(b"readyz")
        self.assertEqual(self.fetch.asked(), [(0, "/readyz"), (1, "/readyz")])
        self.fetch.answer(0, 200, readyBody(True, "serving"))
        self.assertEqual(request.finished, 0)
        self.assertEqual(request.written, [])
        self.fetch.answer(1, 200, readyBody(True, "serving"))
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(
            self.document(request), {"ready": True, "reason": "serving", "workers": 2}
        )
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"),
            [b"application/json"],
        )

    def test_notReadyWorker(self) -> None:
        """
        A worker answering 503 makes the group not ready, with that worker's
        reason, naming it.
        """
        request = self.get(b"readyz")
        self.fetch.answer(0, 200, readyBody(True, "serving"))
        self.fetch.answer(1, 503, readyBody(False, "waiting for the first sync"))
        self.assertEqual(request.responseCode, 503)
        document = self.document(request)
        self.assertFalse(document["ready"])
        self.assertEqual(document["reason"], "worker 1: waiting for the first sync")

    def test_notReadyWithoutReason(self) -> None:
        """
        A worker answering an error without a JSON reason is reported with
        its status.
        """
        request = self.get(b"readyz")
        self.fetch.answer(0, 500, b"oops")
        self.fetch.answer(1, 200, readyBody(True, "serving"))
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(self.document(request)["reason"], "worker 0: status 500")

    def test_notReadyWorkerDead(self) -> None:
        """
        A worker that is not running makes the group not ready; it is not
        asked.
        """
        self.reactor.processes[0].end(signalNumber=9)
        request = self.get(b"readyz")
        self.assertEqual(self.fetch.asked(), [(1, "/readyz")])
        self.fetch.answer(1, 200, readyBody(True, "serving"))
        self.assertEqual(request.responseCode, 503)
        document = self.document(request)
        self.assertFalse(document["ready"])
        self.assertEqual(document["reason"], "worker 0: not running")

    def test_notReadyFetchFailed(self) -> None:
        """
        A worker whose admin site does not answer makes the group not ready.
        """
        request = self.get(b"readyz")
        self.fetch.answer(0, 200, readyBody(True, "serving"))
        self.fetch.fail(1)
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(
            self.document(request)["reason"], "worker 1: admin did not answer"
        )

    def test_notReadyNotListening(self) -> None:
        """
        A proxy listener of the supervisor's that is not listening makes
        the group not ready, naming it, even though every worker answers
        ready.
        """
        port = FakeListeningPort(41, IPv4Address("TCP", "0.0.0.0", 8080))
        listener = Listener("port", "tcp:8080", FakeServerEndpoint(port), Factory())
        group, reactor, _ = makeGroup(self, count=1, listeners=[listener])
        group.startService()
        site = groupAdminSite(group, self.fetch, reactor)
        port.connected = False
        request = _Request([b"readyz"])
        request.render(site.getResourceFor(request))
        self.fetch.answer(0, 200, readyBody(True, "serving"))
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(
            self.document(request)["reason"], "not listening: --port tcp:8080"
        )

    def test_notReadyDraining(self) -> None:
        """
        Once the group is stopping, it is not ready, even though its workers
        (still draining) answer ready.
        """
        self.group.stopService()
        request = self.get(b"readyz")
        self.fetch.answer(0, 200, readyBody(True, "serving"))
        self.fetch.answer(1, 200, readyBody(True, "serving"))
        self.assertEqual(request.responseCode, 503)
        document = self.document(request)
        self.assertFalse(document["ready"])
        self.assertIn("draining", document["reason"])

    def test_reasonsCombined(self) -> None:
        """
        Every reason is reported, draining first, then by worker.
        """
        group, reactor, _ = makeGroup(self, count=3)
        group.startService()
        fetch = FakeFetch()
        self.site = groupAdminSite(group, fetch, reactor)
        reactor.processes[2].end(exitCode=1)
        group.stopService()
        request = self.get(b"readyz")
        fetch.answer(0, 503, readyBody(False, "draining"))
        fetch.fail(1)
        self.assertEqual(
            self.document(request)["reason"],
            "draining; worker 2: not running; worker 0: draining;"
            " worker 1: admin did not answer",
        )

    def test_disconnected(self) -> None:
        """
        A page whose client went away while the workers were asked is not
        written, and nothing fails.
        """
        request = self.get(b"readyz")
        request._disconnected = True
        self.fetch.answer(0, 200, readyBody(True, "serving"))
        self.fetch.answer(1, 200, readyBody(True, "serving"))
        self.assertEqual(request.written, [])
        self.assertEqual(request.finished, 0)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_buildFailure(self) -> None:
        """
        A page that cannot be built from the answers is a 500 with a JSON
        error, and the failure is logged.
        """
        request = self.get(b"routes")
        self.fetch.answer(0, 200, b"not json")
        self.fetch.answer(1, 200, b"{}")
        self.assertEqual(request.responseCode, 500)
        self.assertEqual(self.document(request), {"error": "internal"})
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def workerMetrics(self, service: str, count: int) -> bytes:
        """
        A worker's /metrics body after C{count} requests to C{service}.
        """
        metrics = Metrics()
        for _ in range(count):
            metrics.forService(service).observe(200, 0.01)
        metrics.forService(service).inFlight += count
        return b"".join(metrics.exposition())

    def test_metrics(self) -> None:
        """
        /metrics merges the workers' expositions and adds the group's own
        metrics: workers configured and alive, restarts per worker and
        workers whose metrics could not be read.
        """
        self.reactor.processes[1].end(signalNumber=9)
        self.reactor.advance(RESTART_DELAY)
        request = self.get(b"metrics")
        self.assertEqual(self.fetch.asked(), [(0, "/metrics"), (1, "/metrics")])
        self.fetch.answer(0, 200, self.workerMetrics("service.api.a", 2))
        self.assertEqual(request.finished, 0)
        self.fetch.answer(1, 200, self.workerMetrics("service.api.a", 3))
        self.assertEqual(request.finished, 1)
        self.assertEqual(request.responseCode, None)  # 200, the default
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"),
            [CONTENT_TYPE_LATEST.encode("ascii")],
        )
        values = sampleValues(b"".join(request.written).decode())
        self.assertEqual(
            values[
                key(
                    "monedge_requests_total",
                    service="service.api.a",
                    code_class="2xx",
                    origin="monedge",
                )
            ],
            5.0,
        )
        self.assertEqual(
            values[key("monedge_requests_in_flight", service="service.api.a")], 5.0
        )
        self.assertEqual(values[key("monedge_workers")], 2.0)
        self.assertEqual(values[key("monedge_workers_alive")], 2.0)
        self.assertEqual(values[key("monedge_worker_restarts_total", worker="0")], 0.0)
        self.assertEqual(values[key("monedge_worker_restarts_total", worker="1")], 1.0)
        self.assertEqual(values[key("monedge_worker_scrape_failures")], 0.0)

    def test_metricsScrapeFailures(self) -> None:
        """
        Workers that fail or answer an error are counted as scrape failures,
        and the others' metrics are still served; a dead worker is counted
        as not alive, not as a failure.
        """
        group, reactor, _ = makeGroup(self, count=3)
        group.startService()
        fetch = FakeFetch()
        self.site = groupAdminSite(group, fetch, reactor)
        reactor.processes[2].end(exitCode=1)
        request = self.get(b"metrics")
        fetch.fail(0)
        fetch.answer(1, 200, self.workerMetrics("service.api.b", 1))
        values = sampleValues(b"".join(request.written).decode())
        self.assertEqual(values[key("monedge_workers")], 3.0)
        self.assertEqual(values[key("monedge_workers_alive")], 2.0)
        self.assertEqual(values[key("monedge_worker_scrape_failures")], 1.0)
        self.assertEqual(
            values[
                key(
                    "monedge_requests_total",
                    service="service.api.b",
                    code_class="2xx",
                    origin="monedge",
                )
            ],
            1.0,
        )
        self.assertEqual(values[key("monedge_worker_restarts_total", worker="2")], 1.0)

        request = self.get(b"metrics")
        fetch.answer(0, 500, b"broken")
        fetch.answer(1, 200, self.workerMetrics("service.api.b", 1))
        values = sampleValues(b"".join(request.written).decode())
        self.assertEqual(values[key("monedge_worker_scrape_failures")], 1.0)

    def test_routesFirstAnswer(self) -> None:
        """
        /routes is the first answering worker's table, with every worker's
        state and which worker answered added.
        """
        request = self.get(b"routes")
        self.assertEqual(self.fetch.asked(), [(0, "/routes"), (1, "/routes")])
        self.fetch.fail(0)
        table = {"services": [{"name": "service.api.a"}], "tiers": ["api"]}
        self.fetch.answer(1, 200, json.dumps(table).encode())
        self.assertEqual(request.responseCode, 200)
        document = self.document(request)
        self.assertEqual(document["answered_by"], 1)
        self.assertEqual(document["services"], table["services"])
        self.assertEqual(document["tiers"], ["api"])
        self.assertEqual(
            document["workers"], [worker.asJSON() for worker in self.group.workers]
        )

    def test_routesQueryForwarded(self) -> None:
        """
        The group's /routes asks the workers for the same page (the query
        as given, re-encoded), refuses a bad query itself with a 400 and
        asks no worker, and passes on a worker's 400.
        """
        request = _Request([b"routes"])
        request.args = {b"q": [b"pay ments"], b"limit": [b"5"]}
        request.render(self.site.getResourceFor(request))
        self.assertEqual(
            self.fetch.asked(),
            [(0, "/routes?limit=5&q=pay+ments"), (1, "/routes?limit=5&q=pay+ments")],
        )
        self.fetch.answer(0, 200, b'{"services": [], "next": null}')
        self.fetch.answer(1, 200, b"{}")
        self.assertEqual(self.document(request)["next"], None)
        calls = len(self.fetch.calls)
        request = _Request([b"routes"])
        request.args = {b"limit": [b"0"]}
        request.render(self.site.getResourceFor(request))
        self.assertEqual(request.responseCode, 400)
        self.assertEqual(self.document(request)["code"], "bad_request")
        self.assertEqual(len(self.fetch.calls), calls)
        request = self.get(b"routes")
        refusal = {"status": 400, "code": "bad_request", "message": "no"}
        self.fetch.answer(0, 400, json.dumps(refusal).encode())
        self.fetch.answer(1, 200, b"{}")
        self.assertEqual(request.responseCode, 400)
        self.assertEqual(self.document(request), refusal)

    def test_routesPrefersFirstWorker(self) -> None:
        """
        When several workers answer, worker order decides, not answer order;
        a worker answering an error is skipped.
        """
        request = self.get(b"routes")
        self.fetch.answer(1, 200, b'{"from": 1}')
        self.fetch.answer(0, 200, b'{"from": 0}')
        self.assertEqual(self.document(request)["answered_by"], 0)
        request = self.get(b"routes")
        self.fetch.answer(0, 503, b'{"from": 0}')
        self.fetch.answer(1, 200, b'{"from": 1}')
        document = self.document(request)
        self.assertEqual((document["from"], document["answered_by"]), (1, 1))

    def test_routesNoAnswer(self) -> None:
        """
        When no worker answers, /routes is a 503 with every worker's state.
        """
        self.reactor.processes[0].end(signalNumber=9)
        request = self.get(b"routes")
        self.fetch.fail(1)
        self.assertEqual(request.responseCode, 503)
        document = self.document(request)
        self.assertEqual(document["error"], "no worker answered")
        self.assertEqual(
            document["workers"], [worker.asJSON() for worker in self.group.workers]
        )
        self.assertEqual(document["workers"][0]["last_exit"], "signal 9")

    def test_health(self) -> None:
        """
        /healthz answers 200 at once, without asking workers, with the
        configured and running worker counts.
        """
        self.reactor.processes[0].end(signalNumber=9)
        request = self.get(b"healthz")
        self.assertEqual(self.fetch.calls, [])
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(
            self.document(request),
            {"status": "ok", "workers": 2, "workers_alive": 1},
        )


class WorkerOptionsTests(OptionsTestCase):
    """
    The --workers options of C{twistd monedge}.
    """

    def test_default(self) -> None:
        """
        By default there is one process and no worker settings.
        """
        options = self.parse()
        self.assertEqual(options["workers"], 1)
        self.assertIsNone(options["worker-id"])
        self.assertEqual(options["worker-fd"], [])

    def test_workersCount(self) -> None:
        """
        --workers N is an integer.
        """
        self.assertEqual(self.parse("--workers", "4")["workers"], 4)

    def test_workersInvalid(self) -> None:
        """
        Zero, a negative number and a word other than auto are UsageErrors
        naming --workers.
        """
        self.assertUsageError(["--workers", "0"], "--workers", "at least 1")
        self.assertUsageError(["--workers", "x"], "--workers", "'x'")
        self.assertUsageError(["--workers", "-2"], "--workers")
        self.assertUsageError(["--workers", "1.5"], "--workers")

    def test_workersAuto(self) -> None:
        """
        --workers auto is one worker per CPU this process may run on.
        """
        self.assertEqual(
            self.parse("--workers", "auto")["workers"], len(os.sched_getaffinity(0))
        )

    def sslDescription(self) -> str:
        """
        An ssl: endpoint string that parses (Twisted's test certificate).
        """
        pem = os.path.join(os.path.dirname(twisted.test.__file__), "server.pem")
        return f"ssl:0:privateKey={pem}"

    def test_sslRefused(self) -> None:
        """
        With --workers above 1, an ssl: listener (--port or --listen) is a
        UsageError naming it and the kinds that can be shared.
        """
        ssl = self.sslDescription()
        kinds = ", ".join(ADOPTABLE)
        self.assertEqual(kinds, "tcp, tcp6, unix")
        self.assertUsageError(
            ["--workers", "2", "--port", ssl], "--workers", ssl, kinds
        )
        self.assertUsageError(
            ["--workers", "2", "--listen", "tcp:8081", "--listen", ssl], ssl, kinds
        )

    def test_sslSingleProcess(self) -> None:
        """
        One process may still listen with ssl:.
        """
        ssl = self.sslDescription()
        self.assertEqual(self.parse("--port", ssl)["port"], ssl)
        self.assertEqual(self.parse("--workers", "1", "--port", ssl)["workers"], 1)

    def test_adoptableListeners(self) -> None:
        """
        tcp, tcp6 and unix listeners are accepted with --workers.
        """
        options = self.parse(
            "--workers",
            "3",
            "--port",
            "8080",
            "--listen",
            "tcp6:8081",
            "--listen",
            "unix:/tmp/monedge-test.sock",
        )
        self.assertEqual(options["workers"], 3)

    def test_workerNeedsDescriptorsAdminAndParent(self) -> None:
        """
        --worker-id without any one of --worker-fd, --worker-admin and
        --worker-parent is a UsageError.
        """
        message = (
            "--worker-id: also needs --worker-fd, --worker-admin and --worker-parent"
        )
        parts = {
            "fd": ["--worker-fd", "3:INET"],
            "admin": ["--worker-admin", "unix:/tmp/w.sock"],
            "parent": ["--worker-parent", "1"],
        }
        self.assertUsageError(["--worker-id", "0"], message)
        for missing in parts:
            given = [
                arg for name, args in parts.items() if name != missing for arg in args
            ]
            self.assertUsageError(["--worker-id", "0", *given], message)

    def test_worker(self) -> None:
        """
        A worker's options: one process, whatever --workers says, its number
        and parent as integers, its inherited descriptors parsed.
        """
        options = self.parse(
            "--workers",
            "4",
            "--worker-id",
            "0",
            "--worker-parent",
            "1234",
            "--worker-admin",
            "unix:/tmp/w.sock:mode=600",
            "--worker-fd",
            "3:INET",
            "--worker-fd",
            "4:UNIX",
        )
        self.assertEqual(options["workers"], 1)
        self.assertEqual(options["worker-id"], 0)
        self.assertEqual(options["worker-parent"], 1234)
        self.assertEqual(options["worker-admin"], "unix:/tmp/w.sock:mode=600")
        self.assertEqual(
            options["worker-fd"], [(3, socket.AF_INET), (4, socket.AF_UNIX)]
        )

    def test_workerBadValues(self) -> None:
        """
        A malformed --worker-fd or --worker-id is a UsageError naming it.
        """
        admin = ["--worker-admin", "unix:/tmp/w.sock", "--worker-parent", "1"]
        self.assertUsageError(
            ["--worker-id", "0", *admin, "--worker-fd", "three:INET"], "--worker-fd"
        )
        self.assertUsageError(
            ["--worker-id", "x", *admin, "--worker-fd", "3:INET"], "--worker-id"
        )

    def test_rawArgs(self) -> None:
        """
        rawArgs keeps the arguments exactly as given, to pass to workers.
        """
        args = [
            "--registry",
            f"static:{self.registry}",
            "--workers",
            "3",
            "--port",
            "8080",
            "--listen",
            "tcp:8081",
        ]
        options = Options()
        options.parseOptions(args)
        self.assertEqual(options.rawArgs, args)
        self.assertIsNot(options.rawArgs, args)
        self.assertEqual(Options().rawArgs, [])

    def test_workerCommandParses(self) -> None:
        """
        The command line the supervisor builds for a worker from its own
        options parses as a worker's: one process, adopting its descriptors,
        with the supervisor's other options.
        """
        args = [
            "--registry",
            f"static:{self.registry}",
            "--workers",
            "3",
            "--port",
            "8080",
        ]
        supervisor = Options()
        supervisor.parseOptions(args)
        argv = twistdCommand(supervisor.rawArgs)(2, ["3:INET"], "unix:/tmp/w.sock")
        worker = Options()
        worker.parseOptions(argv[argv.index("monedge") + 1 :])
        self.assertEqual(worker["workers"], 1)
        self.assertEqual(worker["worker-id"], 2)
        self.assertEqual(worker["worker-parent"], os.getpid())
        self.assertEqual(worker["worker-admin"], "unix:/tmp/w.sock")
        self.assertEqual(worker["worker-fd"], [(3, socket.AF_INET)])
        self.assertEqual(worker["port"], supervisor["port"])
