"""
Start, readiness and graceful drain.

Every listener monedge is configured with (L{Listener}) listens when the
service starts, at once, or stops monedge: the failure is a
L{UsageError} whose one line names the option and the address, and
L{reportStartupErrors} makes an uncaught one end the process with that line
on standard error and a non-zero status, with no traceback. C{/readyz} is
503 while any proxy listener is not listening.

On SIGTERM twistd stops the application, which here means:

1. C{/readyz} turns 503 at once, and every response from then on closes its
   connection, while the proxy keeps serving for C{drainDelay} seconds (the
   time a load balancer needs to notice);
2. the proxy stops accepting connections and closes idle keep-alive ones;
3. it waits up to C{drainTimeout} seconds for requests in flight;
4. the admin site, the registry, the upstream pool and the hooks stop.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from types import TracebackType
from typing import IO, Any, NoReturn

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.usage import UsageError

from monedge.edge.server import ProxySite
from monedge.hooks import HookSet
from monedge.interfaces import IServiceRegistry, IUpstreamClient
from monedge.upstream.tunnel import TunnelSet

#: Hints for the errors whose own words leave the cause unclear.
_HINTS = {errno.EADDRNOTAVAIL: " (not an address of this machine)"}


def describeError(error: BaseException) -> str:
    """
    What went wrong, in a few words: an operating system error's own
    (C{address already in use}, C{permission denied}, C{no such file or
    directory}), lowercase, else the error's message.
    """
    if isinstance(error, CannotListenError):
        cause = error.socketError
        if not isinstance(cause, BaseException):
            return str(cause)
        error = cause
    if isinstance(error, OSError) and error.errno is not None:
        text = os.strerror(error.errno)
        return text[:1].lower() + text[1:] + _HINTS.get(error.errno, "")
    return str(error) or type(error).__name__


def startupLine(message: str) -> str:
    """
    The one line monedge ends with when it cannot start: C{monedge: },
    then C{message} with its line breaks folded into spaces.
    """
    return "monedge: " + " ".join(message.split()) + "\n"


def exitAtStartup(message: str, stderr: IO[str] | None = None) -> NoReturn:
    """
    Write L{startupLine} to the process's original standard error (not
    twistd's log) and exit with status 1.
    """
    out = sys.__stderr__ if stderr is None else stderr
    if out is not None:
        out.write(startupLine(message))
        out.flush()
    raise SystemExit(1)


ExceptHook = Callable[
    [type[BaseException], BaseException, TracebackType | None], object
]


def startupErrorHook(
    previous: ExceptHook, stderr: Callable[[], IO[str] | None]
) -> ExceptHook:
    """
    A C{sys.excepthook}: an uncaught L{UsageError} (an option whose value
    cannot be used, found while starting: a listener that cannot listen, a
    file that cannot be opened) is logged and written to C{stderr()} as
    its one line, with no traceback; Python then exits with status 1.
    Anything else goes to C{previous}.
    """
    log = Logger(namespace="monedge")

    def hook(
        kind: type[BaseException],
        value: BaseException,
        traceback: TracebackType | None,
    ) -> None:
        if not isinstance(value, UsageError):
            previous(kind, value, traceback)
            return
        message = " ".join(str(value).split())
        log.critical("cannot start: {reason}", reason=message)
        out = stderr()
        if out is not None:
            out.write(startupLine(message))
            out.flush()

    return hook


def reportStartupErrors() -> None:
    """
    Install L{startupErrorHook} for this process, writing to its original
    standard error (twistd sends C{sys.stderr} to its log once logging
    starts). twistd lets an exception from C{privilegedStartService},
    C{startService} or C{makeService} end the process (after removing its
    pid file, or telling a daemon's parent), and Python hands it to the
    hook.
    """
    sys.excepthook = startupErrorHook(sys.excepthook, lambda: sys.__stderr__)


class Listener(Service):
    """
    One configured listener: C{--port}, a C{--listen}, C{--tls-port},
    C{--admin-port}, or a worker's adopted socket or private admin socket.

    It listens when the service starts (C{privilegedStartService}, before
    twistd drops privileges), and the endpoint must answer at once, as
    Twisted's C{tcp}, C{tcp6}, C{unix}, C{ssl} and adopted endpoints do.

    @ivar option: the option's name, without dashes (C{port}).
    @ivar description: the address as configured (an endpoint string).
    @ivar port: the listening port, once listening.
    """

    def __init__(
        self,
        option: str,
        description: str,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
    ) -> None:
        self.option = option
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None

    @property
    def label(self) -> str:
        """
        The option and address: C{--port tcp:30080}.
        """
        return f"--{self.option} {self.description}"

    @property
    def listening(self) -> bool:
        """
        Whether the port is open and has not been closed since.
        """
        return self.port is not None and bool(getattr(self.port, "connected", True))

    def listen(self) -> IListeningPort:
        """
        Listen now.

        @raise UsageError: naming the option and address, and why not.
        """
        d = self.endpoint.listen(self.factory)
        outcome: list[IListeningPort | Failure] = []
        d.addBoth(outcome.append)
        if not outcome:
            d.cancel()
            raise UsageError(
                f"{self.label}: cannot listen: the endpoint did not listen at once"
            )
        result = outcome[0]
        if isinstance(result, Failure):
            error = result.value
            assert error is not None
            raise UsageError(f"{self.label}: cannot listen: {describeError(error)}")
        self.port = result
        return result

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.port is None:
            self.listen()

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self.listen()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        stopped: Deferred[None] | None = port.stopListening()
        return stopped


class ProxyService(MultiService):
    """
    The application's root service.

    The proxy listeners are kept in L{listeners}, apart from the other
    children, so that they stop first and alone.
    """

    _log = Logger()

    def __init__(
        self,
        site: ProxySite,
        registry: IServiceRegistry,
        client: IUpstreamClient,
        clock: IReactorTime,
        drainDelay: float = 5.0,
        drainTimeout: float = 25.0,
        hooks: HookSet | None = None,
        tunnels: TunnelSet | None = None,
    ) -> None:
        super().__init__()
        self.site = site
        self.registry = registry
        self.client = client
        self.clock = clock
        self.drainDelay = drainDelay
        self.drainTimeout = drainTimeout
        self.hooks = hooks
        self.tunnels = tunnels
        self.listeners = MultiService()
        self.draining = False

    def addListener(self, service: IService) -> None:
        """
        Add a proxy listener (stopped first on drain): a L{Listener}, or
        any service, which then counts as listening while it runs.
        """
        service.setServiceParent(self.listeners)

    def notListening(self) -> list[str]:
        """
        The proxy listeners not listening, as C{--port tcp:30080}.
        """
        idle = []
        for service in self.listeners:
            if isinstance(service, Listener):
                if not service.listening:
                    idle.append(service.label)
            elif not service.running:
                idle.append(service.name or repr(service))
        return idle

    def readiness(self) -> tuple[bool, str]:
        """
        Whether to receive traffic, and why not.
        """
        if self.draining:
            return False, "draining"
        if not self.running:
            return False, "starting"
        idle = self.notListening()
        if idle:
            return False, "not listening: " + ", ".join(idle)
        if not self.registry.isReady():
            return False, "waiting for the first registry sync"
        return True, "serving"

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.listeners.privilegedStartService()

    def startService(self) -> None:
        super().startService()
        self.listeners.startService()

    def stopService(self) -> Deferred[Any]:
        self.draining = True
        self.site.startDraining()
        self._log.info(
            "draining: not ready; serving for {delay}s more", delay=self.drainDelay
        )
        d = deferLater(self.clock, self.drainDelay, lambda: None)
        d.addCallback(lambda _: self._stopAccepting())
        d.addCallback(lambda _: self._waitForRequests())
        d.addBoth(lambda _: self._stopRest())
        return d

    def _stopAccepting(self) -> Deferred[Any]:
        d = self.listeners.stopService()

        def closeIdle(result: object) -> object:
            closed = self.site.closeIdleConnections()
            self._log.info(
                "stopped accepting; closed {closed} idle connections;"
                " {inflight} requests in flight",
                closed=closed,
                inflight=self.site.inFlight,
            )
            return result

        result: Deferred[Any] = d.addCallback(closeIdle)
        return result

    def _waitForRequests(self) -> Deferred[None]:
        idle = self.site.whenDrained()
        timer = self.clock.callLater(self.drainTimeout, lambda: idle.cancel())

        def done(result: object) -> None:
            if timer.active():
                timer.cancel()
                self._log.info("drained: no request in flight")
            else:
                self._log.warn(
                    "drain timeout: {inflight} requests still in flight",
                    inflight=self.site.inFlight,
                )

        return idle.addBoth(done)

    def _stopRest(self) -> Deferred[Any]:
        if self.tunnels is not None and self.tunnels.open:
            # Tunnels (WebSockets) count as requests in flight: those still
            # open after the drain timeout are closed now.
            self._log.info(
                "closing {count} open tunnels", count=self.tunnels.closeAll()
            )
        self.site.accessLog.flush()
        stopped = MultiService.stopService(self)
        closing = [stopped, self.client.close()]
        if self.hooks is not None:
            closing.append(self.hooks.close())
        return DeferredList(closing, consumeErrors=True)
