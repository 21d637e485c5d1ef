"""
End-to-end Kubernetes scenarios: a real twistd monedge process running the
real kubernetes client against monedge.testing.kubernetes.FakeKubernetes,
with real upstreams, all on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, DeferredList

from monedge.testing import ProxyProcess, RecordingUpstream, freePort
from monedge.testing.kubernetes import (
    FakeKubernetes,
    endpointSliceObject,
    serviceObject,
)
from tests.e2e import ProxyTestCase
from tests.load import Load


def _later(seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


def kService(
    name: str, namespace: str = "shop", annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    """
    A Service with an http port.
    """
    return serviceObject(name, namespace, annotations=annotations)


def kSlice(
    name: str,
    service: str,
    endpoints: Sequence[tuple[RecordingUpstream, dict[str, bool]]],
    namespace: str = "shop",
) -> dict[str, Any]:
    """
    An EndpointSlice for C{service}: each upstream with its conditions.
    All the upstreams must share one port, as a slice's pods do; use one
    slice per upstream otherwise.
    """
    ports = {upstream.portNumber for upstream, _ in endpoints}
    assert len(ports) <= 1, "one port per slice"
    return endpointSliceObject(
        name,
        service,
        [{"addresses": ["127.0.0.1"], "conditions": c} for _, c in endpoints],
        namespace,
        [{"name": "http", "port": port} for port in ports],
    )


READY = {"ready": True, "serving": True, "terminating": False}
TERMINATING = {"ready": False, "serving": True, "terminating": True}


class KubernetesTestCase(ProxyTestCase):
    """
    Starts a fake API server and a proxy watching it.
    """

    def startFake(self, port: int = 0) -> FakeKubernetes:
        fake = FakeKubernetes(reactor)
        fake.start(port)
        self.addCleanup(fake.stop)
        return fake

    async def startKubernetesProxy(
        self, fake: FakeKubernetes, args: Sequence[str] = ()
    ) -> ProxyProcess:
        """
        A proxy on the Kubernetes registry, with the fake's kubeconfig (the
        fake may not be listening yet, if its port is set).
        """
        kubeconfig = fake.writeKubeconfig(os.path.join(self.directory, "kubeconfig"))
        proxy = ProxyProcess(
            "unused",
            self.directory,
            ["--drain-delay", "0s", "--drain-timeout", "5s", *args],
        )
        command = proxy.command()
        index = command.index("--registry")
        command[index + 1 : index + 2] = ["kubernetes", "--kubeconfig", kubeconfig]
        proxy.command = lambda: command  # type: ignore[method-assign]
        self.addCleanup(proxy.stop)
        await proxy.start()
        return proxy

    async def status(self, proxy: ProxyProcess, path: str) -> int:
        response, _ = await self.get(proxy.url + path)
        code: int = response.code
        return code

    async def waitForStatus(
        self, proxy: ProxyProcess, path: str, status: int, within: float
    ) -> float:
        """
        Poll C{path} until it answers C{status}; return how long it took.
        """
        started = time.monotonic()
        while True:
            if await self.status(proxy, path) == status:
                return time.monotonic() - started
            self.assertLess(
                time.monotonic() - started, within, f"{path} never answered {status}"
            )
            await _later(0.05)

    async def waitForReady(self, proxy: ProxyProcess, within: float = 10) -> None:
        """
        Poll /readyz until it answers 200.
        """
        started = time.monotonic()
        while (await self.get(proxy.adminURL + "/readyz"))[0].code != 200:
            self.assertLess(time.monotonic() - started, within, "never ready")
            await _later(0.05)

    async def routes(self, proxy: ProxyProcess) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(
            (await self.get(proxy.adminURL + "/routes"))[1]
        )
        return document


class DiscoveryTests(KubernetesTestCase):
    """
    Services appear and disappear with the API.
    """

    async def test_serviceAppearsWithinASecond(self) -> None:
        """
        A Service and its slice added after start are routable within 1 s;
        deleting the Service gives 404 again.  Services not named by the
        convention are never routable.
        """
        fake = self.startFake()
        upstream = self.startUpstream()
        proxy = await self.startKubernetesProxy(fake)
        await self.waitForReady(proxy)
        self.assertEqual(await self.status(proxy, "/foo/"), 404)
        fake.apply(kService("service-api-foo"))
        fake.apply(kSlice("service-api-foo-1", "service-api-foo", [(upstream, READY)]))
        fake.apply(kService("foo"))
        took = await self.waitForStatus(proxy, "/foo/x", 200, within=5)
        self.assertLess(took, 1.0)
        self.assertEqual(upstream.received[-1].uri, b"/x")
        routes = await self.routes(proxy)
        [service] = routes["services"]
        self.assertEqual(service["source"]["namespace"], "shop")
        self.assertEqual(service["source"]["name"], "service-api-foo")
        self.assertTrue(service["source"]["resourceVersion"])
        self.assertEqual(service["endpoints"][0]["ready"], True)
        fake.delete("Service", "shop", "service-api-foo")
        await self.waitForStatus(proxy, "/foo/x", 404, within=5)

    async def test_invalidAnnotationServedWithDefaults(self) -> None:
        """
        An invalid annotation is logged and counted, the service is served
        with that setting's default, and valid annotations still apply.
        """
        fake = self.startFake()
        upstream = self.startUpstream()
        fake.apply(
            kService(
                "service-api-ann",
                annotations={
                    "monedge.io/timeout": "whenever",
                    "monedge.io/strip-prefix": "false",
                },
            )
        )
        fake.apply(kSlice("ann-1", "service-api-ann", [(upstream, READY)]))
        proxy = await self.startKubernetesProxy(fake)
        await self.waitForStatus(proxy, "/ann/x", 200, within=5)
        self.assertEqual(upstream.received[-1].uri, b"/ann/x")
        [service] = (await self.routes(proxy))["services"]
        self.assertEqual(service["policy"]["timeout"], 60.0)
        self.assertEqual(len(service["source"]["annotation_errors"]), 1)
        metrics = (await self.get(proxy.adminURL + "/metrics"))[1].decode()
        self.assertIn("monedge_registry_invalid_config_total 1.0", metrics)
        self.assertIn("monedge.io/timeout", proxy.log())


class RollingDeployTests(KubernetesTestCase):
    """
    A rolling deploy of an upstream service fails no request.
    """

    async def test_rollingEndpointsUnderLoad(self) -> None:
        """
        Under steady GET load, endpoints roll one by one (new ready, old
        terminating, old removed, old upstream stopped) and every request
        succeeds.
        """
        fake = self.startFake()
        old = [self.startUpstream() for _ in range(2)]
        new = [self.startUpstream() for _ in range(2)]
        fake.apply(kService("service-api-roll"))
        slices = {
            f"old-{i}": kSlice(f"old-{i}", "service-api-roll", [(u, READY)])
            for i, u in enumerate(old)
        }
        for obj in slices.values():
            fake.apply(obj)
        proxy = await self.startKubernetesProxy(fake)
        await self.waitForStatus(proxy, "/roll/", 200, within=5)
        load = Load(proxy.url + "/roll/", concurrency=8)
        load.start()
        try:
            load.eventStarted()
            for i, (before, after) in enumerate(zip(old, new, strict=True)):
                fake.apply(kSlice(f"new-{i}", "service-api-roll", [(after, READY)]))
                await _later(0.4)
                fake.apply(
                    kSlice(f"old-{i}", "service-api-roll", [(before, TERMINATING)])
                )
                await _later(0.4)
                fake.delete("EndpointSlice", "shop", f"old-{i}")
                await _later(0.4)
                await before.stop()
            load.eventEnded()
            await _later(0.5)
        finally:
            await load.stop()
        figures = json.dumps(load.report("kubernetes rolling endpoints"))
        whole = load.figures()
        self.assertEqual(whole.failed, 0, figures)
        self.assertGreater(whole.sent, 200, figures)
        # Both generations served: the old before the roll, the new after.
        self.assertTrue(all(u.received for u in new))
        self.assertTrue(all(u.received for u in old))


class WatchFailureTests(KubernetesTestCase):
    """
    Expired watches, dead API servers and late API servers.
    """

    async def test_goneMidWatchRelists(self) -> None:
        """
        A 410 Gone mid-watch makes the registry relist, and the table is
        right afterwards, changes made while the watch was expiring
        included.
        """
        fake = self.startFake()
        first = self.startUpstream()
        second = self.startUpstream()
        fake.apply(kService("service-api-a"))
        fake.apply(kSlice("a-1", "service-api-a", [(first, READY)]))
        proxy = await self.startKubernetesProxy(fake)
        await self.waitForStatus(proxy, "/a/", 200, within=5)
        fake.compact()
        fake.apply(kService("service-api-b"))
        fake.apply(kSlice("b-1", "service-api-b", [(second, READY)]))
        fake.delete("Service", "shop", "service-api-a")
        fake.compact()
        fake.expireWatches()
        await self.waitForStatus(proxy, "/b/", 200, within=5)
        await self.waitForStatus(proxy, "/a/", 404, within=5)
        watches = (await self.routes(proxy))["registry"]["watches"]
        self.assertGreaterEqual(sum(w["relists"] for w in watches), 1)

    async def test_droppedWatchReconnects(self) -> None:
        """
        Watch streams cut by the server are reopened (from the last
        resourceVersion, so nothing is missed), and later changes arrive.
        """
        fake = self.startFake()
        upstream = self.startUpstream()
        proxy = await self.startKubernetesProxy(fake)
        await self.waitForReady(proxy)
        fake.dropWatches()
        fake.apply(kService("service-api-after"))
        fake.apply(kSlice("after-1", "service-api-after", [(upstream, READY)]))
        await self.waitForStatus(proxy, "/after/", 200, within=10)

    async def test_apiDownAtStartup(self) -> None:
        """
        With the API unreachable at start the proxy still starts, /readyz
        stays 503; once the API comes up, readiness flips and routes
        appear.
        """
        fake = FakeKubernetes(reactor)
        fake.port = freePort()
        self.addCleanup(fake.stop)
        upstream = self.startUpstream()
        proxy = await self.startKubernetesProxy(fake)
        await _later(1.0)
        ready, body = await self.get(proxy.adminURL + "/readyz")
        self.assertEqual(ready.code, 503, body)
        self.assertFalse(proxy.exited())
        fake.start(fake.port)
        fake.apply(kService("service-api-late"))
        fake.apply(kSlice("late-1", "service-api-late", [(upstream, READY)]))
        await self.waitForReady(proxy, within=15)
        await self.waitForStatus(proxy, "/late/", 200, within=5)

    async def test_apiLostMidRun(self) -> None:
        """
        When the API server dies, traffic keeps flowing on the last table,
        the sync age grows; when it returns, changes made meanwhile arrive.
        """
        fake = self.startFake()
        upstream = self.startUpstream()
        fake.apply(kService("service-api-keep"))
        fake.apply(kSlice("keep-1", "service-api-keep", [(upstream, READY)]))
        proxy = await self.startKubernetesProxy(fake)
        await self.waitForStatus(proxy, "/keep/", 200, within=5)
        port = fake.port
        await fake.stop()
        for _ in range(10):
            self.assertEqual(await self.status(proxy, "/keep/"), 200)
            await _later(0.1)
        await _later(1.0)
        metrics = (await self.get(proxy.adminURL + "/metrics"))[1].decode()
        [age] = [
            float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith("monedge_registry_last_sync_age_seconds ")
        ]
        self.assertGreater(age, 1.0)
        fake.apply(kService("service-api-new"))
        fake.apply(kSlice("new-1", "service-api-new", [(upstream, READY)]))
        fake.start(port)
        await self.waitForStatus(proxy, "/new/", 200, within=15)
        self.assertEqual(await self.status(proxy, "/keep/"), 200)


#: Routable Services in the scale test (and as many that are not).
SCALE = 2000


class ScaleTests(KubernetesTestCase):
    """
    The registry at thousands of Services: behaviour, not timing.
    """

    async def sweep(
        self,
        proxy: ProxyProcess,
        indices: Sequence[int],
        tag: str,
        concurrency: int = 8,
    ) -> list[str]:
        """
        GET C{/sNNNN/TAG-NNNN} for each index, C{concurrency} at a time;
        return a line for each request that did not answer 200.
        """
        failed: list[str] = []
        queue = list(indices)

        async def worker() -> None:
            while queue:
                index = queue.pop()
                path = f"/s{index:04d}/{tag}-{index:04d}"
                try:
                    response, _ = await self.get(proxy.url + path)
                except Exception as e:
                    failed.append(f"{path}: {e!r}")
                    continue
                if response.code != 200:
                    failed.append(f"{path}: {response.code}")

        await DeferredList(
            [Deferred.fromCoroutine(worker()) for _ in range(concurrency)]
        )
        return failed

    async def test_thousandsOfServices(self) -> None:
        """
        2,000 routable Services (and 2,000 that are not) all become
        routable; a relist after 410 Gone (with changes made while the API
        was away: slices moved to another upstream, a Service deleted,
        another added) keeps every route that is in both lists answering
        200 while requests are in flight, and applies the changes; and a
        burst of 500 EndpointSlice updates ends with every one of them
        routed.
        """
        fake = self.startFake()
        first = self.startUpstream()
        second = self.startUpstream()
        for index in range(SCALE):
            name = f"service-api-s{index:04d}"
            fake.apply(kService(name))
            fake.apply(kSlice(f"{name}-1", name, [(first, READY)]))
            other = f"other-{index:04d}"
            fake.apply(kService(other))
            fake.apply(kSlice(f"{other}-1", other, [(first, READY)]))
        proxy = await self.startKubernetesProxy(fake)
        await self.waitForReady(proxy, within=30)
        everyone = range(SCALE)
        self.assertEqual(await self.sweep(proxy, everyone, "synced"), [])
        self.assertEqual(len(first.received), SCALE)

        # The API goes away; meanwhile 500 slices move to the second
        # upstream, one Service goes and one comes; the history is
        # compacted, so the watches are refused with 410 Gone on return.
        port = fake.port
        await fake.stop()
        moved = range(500)
        for index in moved:
            name = f"service-api-s{index:04d}"
            fake.apply(kSlice(f"{name}-1", name, [(second, READY)]))
        fake.delete("Service", "shop", f"service-api-s{SCALE - 1:04d}")
        fake.apply(kService("service-api-snew"))
        fake.apply(kSlice("snew-1", "service-api-snew", [(second, READY)]))
        fake.compact()
        fake.start(port)
        # Requests to every Service in both lists, in flight throughout
        # (sweep after sweep until the relist has been applied).
        kept = range(SCALE - 1)
        relisted = False

        async def traffic() -> list[str]:
            failed: list[str] = []
            while not relisted:
                failed += await self.sweep(proxy, kept, "relist", 4)
            return failed

        during = Deferred.fromCoroutine(traffic())
        await self.waitForStatus(proxy, "/snew/", 200, within=20)
        relisted = True
        self.assertEqual(await during, [])
        self.assertIn("410 Gone", proxy.log())
        await self.waitForStatus(proxy, f"/s{SCALE - 1:04d}/", 404, within=5)
        before = len(second.received)
        self.assertEqual(await self.sweep(proxy, moved, "moved"), [])
        self.assertEqual(len(second.received) - before, len(moved))

        # A burst of slice updates: the moved ones come back to the first
        # upstream, all at once.
        for index in moved:
            name = f"service-api-s{index:04d}"
            fake.apply(kSlice(f"{name}-1", name, [(first, READY)]))
        last = f"/s{moved[-1]:04d}/"
        started = time.monotonic()
        while True:
            count = len(first.received)
            await self.get(proxy.url + last)
            if len(first.received) > count:
                break
            self.assertLess(time.monotonic() - started, 10, "burst never applied")
            await _later(0.05)
        before = len(first.received)
        self.assertEqual(await self.sweep(proxy, moved, "burst"), [])
        self.assertEqual(len(first.received) - before, len(moved))
