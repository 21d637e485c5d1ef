"""
Reliability scenarios under load: a real twistd monedge (or two), real
upstreams, and L{tests.load.Load} clients sending GETs throughout.  Each
scenario asserts that no request failed, that enough were sent during the
event for that to mean something, and that the old and the new backends
both served; it reports its figures with L{tests.load.Load.report}
(C{MONEDGE_FIGURES=/path/figures.jsonl} collects them).
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from monedge.testing import ProxyProcess, RecordingUpstream
from monedge.testing.loadbalancer import Backend, LoadBalancer
from tests import test_e2e_kubernetes as k8s
from tests.e2e import ProxyTestCase
from tests.load import Load

#: Concurrent clients in every scenario.
CLIENTS = 12

#: What monedge logs when it stops accepting, on SIGTERM.
_DRAINED = re.compile(r"closed \d+ idle connections; \d+ requests in flight")


def _later(seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


async def _until(condition: Callable[[], object], within: float, what: str) -> float:
    """
    Poll C{condition} every 50 ms until it is true; return how long it took.
    """
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            raise TimeoutError(f"{what}: not within {within}s")
        await _later(0.05)
    return time.monotonic() - started


def _servedMore(backend: Backend) -> Callable[[], bool]:
    """
    Whether C{backend} has served more than it had so far.
    """
    served = backend.forwarded
    return lambda: backend.forwarded > served


def assertNoFailures(
    case: TestCase,
    load: Load,
    scenario: str,
    minimum: int,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """
    Report C{load}'s figures (with C{extra}); assert that no request failed
    and that at least C{minimum} were sent during the event.
    """
    record = load.report(scenario, extra)
    message = json.dumps(record, indent=1)
    case.assertEqual(load.figures().failed, 0, message)
    case.assertGreaterEqual(load.figures(event=True).sent, minimum, message)


class KubernetesFlappingTests(k8s.KubernetesTestCase):
    """
    The Kubernetes API comes and goes while traffic flows.
    """

    async def test_apiFlappingUnderLoad(self) -> None:
        """
        The API server is stopped and restarted five times (0.5 s down,
        0.5 s up, its watch streams dropped again midway through each up
        phase) under load: no request fails; a new endpoint applied during
        an early outage gets traffic, and a new Service applied during the
        last outage is routed once the API is back.
        """
        fake = self.startFake()
        firstServed: list[float] = []

        def stamp(request: object, received: object) -> None:
            if not firstServed:
                firstServed.append(time.monotonic())

        steady, late = self.startUpstream(), self.startUpstream()
        joining = self.startUpstream(stamp)
        fake.apply(k8s.kService("service-api-flap"))
        fake.apply(k8s.kSlice("flap-1", "service-api-flap", [(steady, k8s.READY)]))
        proxy = await self.startKubernetesProxy(fake)
        await self.waitForStatus(proxy, "/flap/", 200, within=10)
        port = fake.port
        load = Load(proxy.url + "/flap/", CLIENTS)
        load.start()
        try:
            await _later(1.0)
            load.eventStarted()
            for cycle in range(5):
                await fake.stop()
                if cycle == 1:
                    applied = time.monotonic()
                    fake.apply(
                        k8s.kSlice("flap-2", "service-api-flap", [(joining, k8s.READY)])
                    )
                if cycle == 4:
                    fake.apply(k8s.kService("service-api-late"))
                    fake.apply(
                        k8s.kSlice("late-1", "service-api-late", [(late, k8s.READY)])
                    )
                await _later(0.5)
                fake.start(port)
                back = time.monotonic()
                await _later(0.25)
                fake.dropWatches()
                await _later(0.25)
            await self.waitForStatus(proxy, "/late/", 200, within=45)
            serviceAfter = time.monotonic() - back
            await _until(lambda: firstServed, 45, "the new endpoint serving")
            endpointAfter = firstServed[0] - applied
            load.eventEnded()
            await _later(0.5)
        finally:
            await load.stop()
        watches = (await self.routes(proxy))["registry"]["watches"]
        assertNoFailures(
            self,
            load,
            "kubernetes API flapping",
            minimum=200,
            extra={
                "new_endpoint_served_after_apply_s": round(endpointAfter, 2),
                "new_service_routed_after_api_back_s": round(serviceAfter, 2),
                "watch_failures": sum(w["failures"] for w in watches),
                "watch_requests": sum(
                    1 for _, _, query in fake.requests if query.get("watch")
                ),
            },
        )
        self.assertTrue(steady.received)
        self.assertTrue(late.received)


class StaticRollingDeployTests(ProxyTestCase):
    """
    A rolling deploy of an upstream service on the static registry.
    """

    async def reload(
        self, proxy: ProxyProcess, name: str, upstreams: Sequence[RecordingUpstream]
    ) -> None:
        """
        Rewrite the registry with C{upstreams} as C{name}'s endpoints,
        SIGHUP the proxy, and wait until /routes shows them.
        """
        addresses = sorted(u.address for u in upstreams)
        self.writeServices({name: {"endpoints": addresses}})
        proxy.signal(signal.SIGHUP)

        async def current() -> list[str]:
            _, body = await self.get(proxy.adminURL + "/routes")
            [service] = json.loads(body)["services"]
            return sorted(e["address"] for e in service["endpoints"])

        started = time.monotonic()
        while await current() != addresses:
            self.assertLess(time.monotonic() - started, 10, "reload not seen")
            await _later(0.05)

    async def test_rollingDeployUnderLoad(self) -> None:
        """
        Twice, under load: a new upstream starts, the registry adds it
        (SIGHUP), then drops the old one (SIGHUP), and the old upstream
        stops listening.  No request fails, and every generation served.
        """
        name = "service.api.roll"
        generations = [self.startUpstream()]
        proxy = await self.startProxy({name: {"endpoints": [generations[0].address]}})
        load = Load(proxy.url + "/roll/", CLIENTS)
        load.start()
        try:
            await _later(1.0)
            load.eventStarted()
            for _ in range(2):
                old, new = generations[-1], self.startUpstream()
                generations.append(new)
                await self.reload(proxy, name, [old, new])
                await _later(0.5)
                await self.reload(proxy, name, [new])
                await _later(0.5)
                await old.stop()
            load.eventEnded()
            await _later(0.5)
        finally:
            await load.stop()
        assertNoFailures(self, load, "static registry rolling deploy", minimum=200)
        self.assertEqual([bool(u.received) for u in generations], [True] * 3)


class RollingRestartTests(ProxyTestCase):
    """
    monedge itself restarted, one process at a time, behind a load balancer
    that health-checks /readyz.
    """

    async def test_rollingRestartBehindLoadBalancer(self) -> None:
        """
        Two monedge processes on one registry behind L{LoadBalancer}
        (checks every 0.1 s, unhealthy after one failure); under load each
        in turn gets SIGTERM (--drain-delay 1s), exits, and starts again on
        the same ports.  The load balancer stops sending to it before it
        stops accepting, and sends to it again once it is ready: no request
        fails, none is answered 502 by the load balancer, and each process,
        old and new, served.
        """
        upstreams = [self.startUpstream() for _ in range(2)]
        self.writeServices(
            {"service.api.web": {"endpoints": [u.address for u in upstreams]}}
        )
        drain = ["--drain-delay", "1s", "--drain-timeout", "10s"]
        proxies = [ProxyProcess(self.registryPath, self.directory, drain) for _ in "ab"]
        for proxy in proxies:
            self.addCleanup(proxy.stop)
            await proxy.start()
        backends = [
            Backend(name, p.url, p.adminURL + "/readyz")
            for name, p in zip("ab", proxies, strict=True)
        ]
        balancer = LoadBalancer(backends, reactor, interval=0.1)
        balancer.start()
        self.addCleanup(balancer.stop)
        for backend in backends:
            await backend.whenHealthy().addTimeout(10, reactor)
        load = Load(balancer.url + "/web/", CLIENTS)
        load.start()
        unhealthyAfter: list[float] = []
        readyAfter: list[float] = []
        drains: list[str] = []
        try:
            await _later(1.0)
            load.eventStarted()
            for backend, proxy in zip(backends, proxies, strict=True):
                before = backend.forwarded
                self.assertGreater(before, 0, f"{backend.name} never served")
                stopping = time.monotonic()
                marked = backend.whenHealthy(False)
                proxy.signal(signal.SIGTERM)
                await marked.addTimeout(10, reactor)
                unhealthyAfter.append(round(time.monotonic() - stopping, 3))
                await proxy.waitFor(proxy.exited, 30, "monedge to exit")
                log = proxy.log()
                self.assertIn("drained: no request in flight", log)
                drains.append(_DRAINED.findall(log)[-1])
                starting = time.monotonic()
                await proxy.start()
                await backend.whenHealthy().addTimeout(20, reactor)
                readyAfter.append(round(time.monotonic() - starting, 3))
                await _until(
                    _servedMore(backend), 10, f"restarted {backend.name} serving"
                )
                await _later(1.0)
            load.eventEnded()
            await _later(0.5)
        finally:
            await load.stop()
        assertNoFailures(
            self,
            load,
            "rolling restart of monedge behind a load balancer",
            minimum=200,
            extra={
                "lb_unhealthy_after_sigterm_s": unhealthyAfter,
                "drain_logged": drains,
                "healthy_after_start_s": readyAfter,
                "lb_errors": balancer.errors,
            },
        )
        self.assertEqual(balancer.errors, 0, balancer.errorLog[:5])
        # The premise: the balancer noticed well within the drain delay.
        self.assertLess(max(unhealthyAfter), 1.0)
