"""
C{--workers N}: one supervisor process and N proxy processes sharing its
listening sockets, so that one pod can use N cores.

The supervisor binds every proxy listener itself (before twistd drops
privileges) and never accepts on them. Each worker is a child
C{twistd -n monedge} given the same options plus three internal ones: its
number, the inherited descriptors to adopt (L{AdoptedEndpoint}) and a
private admin socket. The kernel hands each new connection to whichever
worker accepts it first.

The supervisor:

- stops at startup, with the one line of L{monedge.runtime.lifecycle.Listener},
  if a listener cannot be bound, and likewise if a worker's admin socket
  could not be (C{$TMPDIR} too long a path, say), before any worker starts;
- restarts a worker that exits, after a back-off that grows while workers
  keep dying young;
- on SIGTERM, turns not ready, passes SIGTERM to every worker (each drains
  as a single process would), closes its own copy of the listening sockets
  when the workers stop accepting, and kills what is left after the drain
  timeout;
- serves the admin port for the whole group (see L{monedge.runtime.admin.groupAdminSite}).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer, protocol
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.web.client import Agent, readBody
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from monedge.twistedseam import acceptOneAtATime, quietConnectionPool

if TYPE_CHECKING:
    from monedge.runtime.lifecycle import Listener

#: Listener kinds a worker can adopt. TLS would need the worker to wrap the
#: adopted socket itself, so C{ssl:} listeners are refused with --workers.
ADOPTABLE = ("tcp", "tcp6", "unix")

_FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}

#: The first descriptor number inherited listeners take in a worker.
FIRST_FD = 3

#: Restart back-off: the first delay, the cap, and how long a worker must
#: have lived for its exit not to count as dying young.
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0
YOUNG = 10.0


def listenerKind(description: str) -> str:
    """
    The endpoint type of a server endpoint string (C{tcp}, C{ssl}, ...).
    """
    return description.split(":", 1)[0].strip().lower()


def familyName(port: IListeningPort) -> str:
    """
    The address family of a listening port, as a worker option spells it.
    """
    from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

    host = port.getHost()
    if isinstance(host, IPv4Address):
        return "INET"
    if isinstance(host, IPv6Address):
        return "INET6"
    if isinstance(host, UNIXAddress):
        return "UNIX"
    raise ValueError(f"cannot share a listener on {host!r}")


def parseInherited(value: str) -> tuple[int, int]:
    """
    Parse a worker's C{--worker-fd FD:FAMILY}.

    @raise ValueError: if it is malformed.
    """
    fd, sep, family = value.partition(":")
    if not sep or not fd.isdigit() or family not in _FAMILIES:
        raise ValueError(f"expected FD:INET|INET6|UNIX, got {value!r}")
    return int(fd), _FAMILIES[family]


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """
    An inherited listening socket (in a worker), listened on once: the
    port accepts one connection at a time
    (L{monedge.twistedseam.acceptOneAtATime}), and the inherited
    descriptor is closed (the reactor works on its own duplicate).
    """

    def __init__(self, reactor: Any, fd: int, family: int) -> None:
        self._reactor = reactor
        self._fd = fd
        self._family = family
        self._used = False

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        if self._used:
            return defer.fail(ValueError(f"descriptor {self._fd} already adopted"))
        self._used = True
        try:
            port = self._reactor.adoptStreamPort(
                self._fd, self._family, protocolFactory
            )
        except Exception:
            return defer.fail()
        acceptOneAtATime(port)
        os.close(self._fd)
        return defer.succeed(port)


class OrphanWatch(Service):
    """
    Stops a worker's reactor if its supervisor dies (it is then re-parented),
    so that no worker outlives its group.
    """

    def __init__(self, reactor: Any, parent: int, interval: float = 1.0) -> None:
        self._reactor = reactor
        self._parent = parent
        self._call = LoopingCall(self._check)
        self._call.clock = reactor
        self._interval = interval

    def _check(self) -> None:
        if os.getppid() != self._parent:
            Logger().critical("supervisor {pid} is gone; stopping", pid=self._parent)
            self._call.stop()
            self._reactor.stop()

    def startService(self) -> None:
        super().startService()
        self._call.start(self._interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._call.running:
            self._call.stop()


class NoConnections(protocol.Factory):
    """
    The supervisor's listening ports never read, so nothing reaches this.
    """

    noisy = False

    def buildProtocol(self, addr: Any) -> None:
        return None


@dataclass
class Worker:
    """
    One worker's state, as the supervisor sees it.
    """

    number: int
    adminSocket: str
    pid: int | None = None
    startedAt: float | None = None
    restarts: int = 0
    lastExit: str | None = None
    transport: Any = field(default=None, repr=False)
    ended: Deferred[None] | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        """
        Whether the process is running.
        """
        return self.pid is not None

    def asJSON(self) -> dict[str, Any]:
        """
        A description for C{/routes} and logs.
        """
        return {
            "worker": self.number,
            "pid": self.pid,
            "alive": self.alive,
            "restarts": self.restarts,
            "last_exit": self.lastExit,
        }


class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, group: WorkerGroup, worker: Worker) -> None:
        self._group = group
        self._worker = worker

    def processEnded(self, reason: Failure) -> None:
        self._group._ended(self._worker, reason)


#: Builds a worker's command line: (number, inherited "FD:FAMILY" values,
#: admin endpoint) to argv.
CommandBuilder = Callable[[int, Sequence[str], str], list[str]]


def twistdCommand(options: Sequence[str]) -> CommandBuilder:
    """
    Workers run C{twistd -n monedge} with the supervisor's own monedge
    options, followed by the internal worker options (which win).
    """

    def build(number: int, inherited: Sequence[str], admin: str) -> list[str]:
        command = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "monedge",
            *options,
            "--worker-id",
            str(number),
            "--worker-parent",
            str(os.getpid()),
            "--worker-admin",
            admin,
        ]
        for value in inherited:
            command += ["--worker-fd", value]
        return command

    return build


class WorkerGroup(MultiService):
    """
    Binds the proxy listeners, runs C{count} workers on them and keeps them
    running. Child services (the group's admin listener) start first and
    stop only after every worker has stopped.

    @param reactor: provides C{IReactorProcess}, C{IReactorTime} and
        the endpoint reactor interfaces.
    @param listeners: the proxy listeners (on L{ADOPTABLE} kinds of
        endpoint, with L{NoConnections}), bound in
        C{privilegedStartService} and handed to every worker.
    @param command: builds a worker's argv.
    @param runtimeDirectory: where the workers' admin sockets live.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        count: int,
        listeners: Sequence[Listener],
        command: CommandBuilder,
        runtimeDirectory: str,
        drainDelay: float = 5.0,
        drainTimeout: float = 25.0,
        environment: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._listeners = list(listeners)
        self._command = command
        self.runtimeDirectory = runtimeDirectory
        self.drainDelay = drainDelay
        self.drainTimeout = drainTimeout
        self._environment = environment
        self.workers = [
            Worker(n, os.path.join(runtimeDirectory, f"worker-{n}.sock"))
            for n in range(count)
        ]
        self.ports: list[IListeningPort] = []
        self._bound = False
        self.draining = False
        self._youngExits = 0
        self._restartCalls: dict[int, Any] = {}
        self._devnullFd: int | None = None

    def adminEndpoint(self, worker: Worker) -> str:
        """
        The admin endpoint string a worker listens on.
        """
        return f"unix:{worker.adminSocket}:mode=600"

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._bind()

    def _bind(self) -> None:
        """
        Bind every listener and check that the workers' admin sockets can
        be; on failure, close what was bound and remove the runtime
        directory.

        @raise UsageError: naming the listener and why it cannot listen.
        """
        try:
            for listener in self._listeners:
                port = listener.listen()
                # Only the workers accept: the supervisor keeps the socket
                # open (to hand it to restarted workers) without reading.
                port.stopReading()  # type: ignore[attr-defined]
                self.ports.append(port)
            for worker in self.workers:
                self._checkAdminSocket(worker)
        except BaseException:
            self._closePorts()
            shutil.rmtree(self.runtimeDirectory, ignore_errors=True)
            raise
        self._bound = True

    def _checkAdminSocket(self, worker: Worker) -> None:
        """
        Bind, then remove, a Unix socket where C{worker} will listen for the
        group's admin site, so that a path that cannot be used (too long, a
        directory gone) stops the group now rather than every worker, again
        and again.
        """
        path = worker.adminSocket
        if os.path.lexists(path):
            os.unlink(path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.bind(path)
        except OSError as e:
            reason = e.strerror.lower() if e.strerror else str(e)
            raise UsageError(
                f"--workers unix:{path}: cannot listen: {reason}"
                " (a worker's admin socket, in $TMPDIR)"
            ) from None
        finally:
            probe.close()
        os.unlink(path)

    def notListening(self) -> list[str]:
        """
        The proxy listeners not bound, as C{--port tcp:30080}.
        """
        return [
            listener.label for listener in self._listeners if not listener.listening
        ]

    def startService(self) -> None:
        if not self._bound:
            self._bind()
        self.draining = False
        super().startService()
        for worker in self.workers:
            self._spawn(worker)

    def _inherited(self) -> tuple[list[str], dict[int, Any]]:
        values = []
        # Workers share this process's stdout and stderr. Their stdin is
        # /dev/null, not a pipe: a pipe would delay processEnded (and so the
        # restart) for as long as anything the worker started held it.
        childFDs: dict[int, Any] = {0: self._devnull(), 1: 1, 2: 2}
        for offset, port in enumerate(self.ports):
            fd = FIRST_FD + offset
            childFDs[fd] = port.fileno()  # type: ignore[attr-defined]
            values.append(f"{fd}:{familyName(port)}")
        return values, childFDs

    def _devnull(self) -> int:
        if self._devnullFd is None:
            self._devnullFd = os.open(os.devnull, os.O_RDONLY)
        return self._devnullFd

    def _spawn(self, worker: Worker) -> None:
        self._restartCalls.pop(worker.number, None)
        if os.path.exists(worker.adminSocket):
            os.unlink(worker.adminSocket)
        inherited, childFDs = self._inherited()
        argv = self._command(worker.number, inherited, self.adminEndpoint(worker))
        env = dict(os.environ if self._environment is None else self._environment)
        transport = self._reactor.spawnProcess(
            _WorkerProtocol(self, worker),
            argv[0],
            argv,
            env=env,
            childFDs=childFDs,
        )
        worker.transport = transport
        worker.pid = transport.pid
        worker.startedAt = self._reactor.seconds()
        worker.ended = Deferred()
        self._log.info(
            "worker {worker} started (pid {pid})", worker=worker.number, pid=worker.pid
        )

    def _ended(self, worker: Worker, reason: Failure) -> None:
        value = reason.value
        exitCode = getattr(value, "exitCode", None)
        signalNumber = getattr(value, "signal", None)
        if signalNumber is not None:
            worker.lastExit = f"signal {signalNumber}"
        else:
            worker.lastExit = f"exit code {exitCode}"
        lived = self._reactor.seconds() - (worker.startedAt or 0.0)
        pid, worker.pid, worker.transport = worker.pid, None, None
        ended, worker.ended = worker.ended, None
        if not self.running or self.draining:
            self._log.info(
                "worker {worker} (pid {pid}) stopped: {exit}",
                worker=worker.number,
                pid=pid,
                exit=worker.lastExit,
            )
            if ended is not None:
                ended.callback(None)
            return
        if ended is not None:
            ended.callback(None)
        if lived < YOUNG:
            self._youngExits += 1
        else:
            self._youngExits = 0
        delay = min(
            RESTART_DELAY * 2 ** max(self._youngExits - 1, 0), RESTART_DELAY_MAX
        )
        worker.restarts += 1
        self._log.error(
            "worker {worker} (pid {pid}) died ({exit}) after {lived:.1f}s;"
            " restarting in {delay}s",
            worker=worker.number,
            pid=pid,
            exit=worker.lastExit,
            lived=lived,
            delay=delay,
        )
        self._restartCalls[worker.number] = self._reactor.callLater(
            delay, self._spawn, worker
        )

    def alive(self) -> int:
        """
        How many workers are running.
        """
        return sum(1 for worker in self.workers if worker.alive)

    def _signal(self, number: int) -> None:
        for worker in self.workers:
            if worker.transport is not None:
                try:
                    worker.transport.signalProcess(number)
                except (OSError, ProcessExitedAlready):
                    # Already gone; processEnded will follow.
                    pass

    def stopService(self) -> Deferred[Any]:
        self.draining = True
        for call in self._restartCalls.values():
            if call.active():
                call.cancel()
        self._restartCalls.clear()
        self._log.info(
            "draining {alive} workers: SIGTERM sent; killing any left after {limit}s",
            alive=self.alive(),
            limit=self.drainDelay + self.drainTimeout + 5,
        )
        self._signal(signal.SIGTERM)
        # The workers stop accepting after the drain delay; close this
        # process's copy of the sockets then, so that the kernel stops
        # queueing connections nobody will accept.
        closing = self._reactor.callLater(self.drainDelay, self._closePorts)
        killing = self._reactor.callLater(
            self.drainDelay + self.drainTimeout + 5, self._signal, signal.SIGKILL
        )
        waiting = [worker.ended for worker in self.workers if worker.ended is not None]

        def done(result: object) -> Deferred[None] | None:
            for call in (closing, killing):
                if call.active():
                    call.cancel()
            self._closePorts()
            self._bound = False
            self._log.info("all workers stopped")
            shutil.rmtree(self.runtimeDirectory, ignore_errors=True)
            if self._devnullFd is not None:
                os.close(self._devnullFd)
                self._devnullFd = None
            stopped: Deferred[None] | None = MultiService.stopService(self)
            return stopped

        d: Deferred[Any] = gatherResults(waiting).addCallback(done)
        return d

    def _closePorts(self) -> None:
        ports, self.ports = self.ports, []
        for port in ports:
            port.stopListening()


@implementer(IAgentEndpointFactory)
class _WorkerSockets:
    def __init__(self, reactor: Any, group: WorkerGroup) -> None:
        self._reactor = reactor
        self._group = group

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        number = int(uri.host.decode("ascii").removeprefix("worker-"))
        path = self._group.workers[number].adminSocket
        return UNIXClientEndpoint(self._reactor, path, timeout=2)


class WorkerAdminClient:
    """
    Asks workers' private admin sockets (for the group's admin site).
    """

    def __init__(self, reactor: Any, group: WorkerGroup, timeout: float = 2.0) -> None:
        # Scrapes open connections to the workers often: not logged each.
        pool = quietConnectionPool(reactor)
        self._agent = Agent.usingEndpointFactory(
            reactor, _WorkerSockets(reactor, group), pool=pool
        )
        self._reactor = reactor
        self._timeout = timeout

    def fetch(self, worker: Worker, path: str) -> Deferred[tuple[int, bytes]]:
        """
        GET C{path} from C{worker}'s admin site: its status and body.
        """
        url = f"http://worker-{worker.number}{path}".encode("ascii")
        d: Deferred[Any] = self._agent.request(b"GET", url)

        def read(response: Any) -> Deferred[tuple[int, bytes]]:
            body: Deferred[bytes] = readBody(response)
            return body.addCallback(lambda data: (int(response.code), data))

        result: Deferred[tuple[int, bytes]] = d.addCallback(read)
        result.addTimeout(self._timeout, self._reactor)
        return result
