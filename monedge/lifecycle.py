"""
Start, readiness and graceful drain.

On SIGTERM twistd stops the application, which here means:

1. C{/readyz} turns 503 at once, and every response from then on closes its
   connection, while the proxy keeps serving for C{drainDelay} seconds (the
   time a load balancer needs to notice);
2. the proxy stops accepting connections and closes idle keep-alive ones;
3. it waits up to C{drainTimeout} seconds for requests in flight;
4. the admin site, the registry, the upstream pool and the hooks stop.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from monedge.hooks import HookSet
from monedge.interfaces import IServiceRegistry, IUpstreamClient
from monedge.server import ProxySite
from monedge.tunnel import TunnelSet


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
        Add a proxy listener (stopped first on drain).
        """
        service.setServiceParent(self.listeners)

    def readiness(self) -> tuple[bool, str]:
        """
        Whether to receive traffic, and why not.
        """
        if self.draining:
            return False, "draining"
        if not self.running:
            return False, "starting"
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
