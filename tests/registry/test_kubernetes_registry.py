"""
The Kubernetes registry without a server or threads: how Services and
EndpointSlices become registry entries, and the watch logic (first list and
readiness, watch events, bookmarks, 410 Gone and relists, back-off, outages)
on a L{MemoryKubernetes} and a L{Clock}, with the registry contract.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from monedge.interfaces import IServiceRegistry
from monedge.registry import Endpoint
from monedge.registry.kubernetes import (
    COALESCE_WINDOW,
    ENDPOINT_SLICES,
    INVALID_HOOKS,
    SERVICES,
    ClusterState,
    KubernetesRegistry,
    compactService,
    compactSlice,
    endpointsFor,
    policyFromAnnotations,
)
from monedge.registry.static import parseRegistry
from monedge.testing.kubernetes import (
    MemoryKubernetes,
    endpointSliceObject,
    serviceObject,
)
from tests.registry.test_registry import EventRecorder, Recorder, RegistryContractMixin


def service(
    name: str,
    namespace: str = "shop",
    ports: list[dict[str, Any]] | None = None,
    annotations: dict[str, str] | None = None,
    version: str = "1",
) -> dict[str, Any]:
    """
    A Service as the API serves it (with a resourceVersion).
    """
    return serviceObject(name, namespace, ports, annotations, version)


def endpointSlice(
    name: str,
    serviceName: str,
    endpoints: list[dict[str, Any]],
    namespace: str = "shop",
    ports: list[dict[str, Any]] | None = None,
    addressType: str = "IPv4",
) -> dict[str, Any]:
    """
    An EndpointSlice, in the namespace these tests use.
    """
    return endpointSliceObject(
        name, serviceName, endpoints, namespace, ports, addressType
    )


def endpointsOf(
    svc: Mapping[str, Any], slices: Sequence[Mapping[str, Any]]
) -> tuple[Endpoint, ...]:
    """
    L{endpointsFor} raw objects: compacted as the API would.
    """
    return endpointsFor(
        compactService(svc, "service.api.x"),
        [compactSlice(s, "service.api.x") for s in slices],
    )


def ep(address: str, **conditions: bool | None) -> dict[str, Any]:
    """
    One slice endpoint with the given conditions.
    """
    return {"addresses": [address], "conditions": conditions}


class AnnotationTests(SynchronousTestCase):
    """
    monedge.io/ annotations give the policy.
    """

    def test_valid(self) -> None:
        """
        Every policy key can be set by an annotation; other annotations are
        ignored.
        """
        policy, problems = policyFromAnnotations(
            {
                "monedge.io/timeout": "5s",
                "monedge.io/strip-prefix": "false",
                "monedge.io/max-body-size": "1MiB",
                "monedge.io/expose": "true",
                "example.com/other": "x",
            }
        )
        self.assertEqual(problems, [])
        self.assertEqual(policy.timeout, 5.0)
        self.assertFalse(policy.stripPrefix)
        self.assertEqual(policy.maxBodySize, 1 << 20)

    def test_invalidFallsBackPerKey(self) -> None:
        """
        An invalid or unknown annotation is reported and takes its default;
        the valid ones still apply.
        """
        policy, problems = policyFromAnnotations(
            {
                "monedge.io/timeout": "soon",
                "monedge.io/idle-timeout": "9s",
                "monedge.io/retries": "3",
            }
        )
        self.assertEqual(policy.timeout, 60.0)
        self.assertEqual(policy.idleTimeout, 9.0)
        self.assertEqual(len(problems), 2)
        self.assertIn("monedge.io/timeout", " ".join(problems))
        self.assertIn("monedge.io/retries", " ".join(problems))


class EndpointsTests(SynchronousTestCase):
    """
    Endpoints follow the Service port and the slices' conditions.
    """

    def test_httpPortResolvedThroughSlice(self) -> None:
        """
        The Service port named http is resolved to the slice port of the
        same name.
        """
        svc = service(
            "service-api-foo",
            ports=[{"name": "metrics", "port": 9090}, {"name": "http", "port": 80}],
        )
        slice_ = endpointSlice(
            "s1",
            "service-api-foo",
            [ep("10.0.0.1", ready=True)],
            ports=[{"name": "metrics", "port": 9091}, {"name": "http", "port": 8080}],
        )
        self.assertEqual(endpointsOf(svc, [slice_]), (Endpoint("10.0.0.1", 8080),))

    def test_onlyPortUnnamed(self) -> None:
        """
        A Service with one unnamed port uses the slice's unnamed port.
        """
        svc = service("service-api-foo", ports=[{"port": 80}])
        slice_ = endpointSlice(
            "s1", "service-api-foo", [ep("10.0.0.1")], ports=[{"port": 3000}]
        )
        self.assertEqual(endpointsOf(svc, [slice_])[0].port, 3000)

    def test_httpsPort(self) -> None:
        """
        Without an http port, the port named https is used, and its
        endpoints are https; so is a single port whose appProtocol is
        https. An http port wins over an https one.
        """
        slice_ = endpointSlice(
            "s1",
            "service-api-foo",
            [ep("10.0.0.1")],
            ports=[{"name": "https", "port": 8443}, {"name": "http", "port": 8080}],
        )
        https = service(
            "service-api-foo",
            ports=[{"name": "metrics", "port": 9090}, {"name": "https", "port": 443}],
        )
        self.assertEqual(
            endpointsOf(https, [slice_]),
            (Endpoint("10.0.0.1", 8443, scheme="https"),),
        )
        both = service(
            "service-api-foo",
            ports=[{"name": "https", "port": 443}, {"name": "http", "port": 80}],
        )
        self.assertEqual(endpointsOf(both, [slice_]), (Endpoint("10.0.0.1", 8080),))
        single = service(
            "service-api-foo",
            ports=[{"name": "web", "port": 443, "appProtocol": "https"}],
        )
        webSlice = endpointSlice(
            "s1",
            "service-api-foo",
            [ep("10.0.0.1")],
            ports=[{"name": "web", "port": 8443}],
        )
        self.assertEqual(endpointsOf(single, [webSlice])[0].scheme, "https")

    def test_noUsablePort(self) -> None:
        """
        Several ports, none named http or https: no endpoints.
        """
        svc = service(
            "service-api-foo",
            ports=[{"name": "a", "port": 1}, {"name": "b", "port": 2}],
        )
        slice_ = endpointSlice("s1", "service-api-foo", [ep("10.0.0.1")])
        self.assertEqual(endpointsOf(svc, [slice_]), ())

    def test_conditions(self) -> None:
        """
        Unknown ready means ready; unknown serving follows ready;
        terminating is kept; FQDN slices are skipped; only the first
        address of an endpoint is used.
        """
        svc = service("service-api-foo")
        slices = [
            endpointSlice(
                "s1",
                "service-api-foo",
                [
                    {"addresses": ["10.0.0.1", "10.0.0.99"]},
                    ep("10.0.0.2", ready=False, serving=True, terminating=True),
                    ep("10.0.0.3", ready=False),
                ],
            ),
            endpointSlice(
                "s2", "service-api-foo", [ep("db.example.com")], addressType="FQDN"
            ),
        ]
        found = {e.host: e for e in endpointsOf(svc, slices)}
        self.assertEqual(sorted(found), ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
        self.assertTrue(found["10.0.0.1"].ready and found["10.0.0.1"].serving)
        self.assertEqual(
            (
                found["10.0.0.2"].ready,
                found["10.0.0.2"].serving,
                found["10.0.0.2"].terminating,
            ),
            (False, True, True),
        )
        self.assertFalse(found["10.0.0.3"].serving)

    def test_duplicateAcrossSlices(self) -> None:
        """
        An address in two slices appears once, with the more usable
        conditions.
        """
        svc = service("service-api-foo")
        slices = [
            endpointSlice("old", "service-api-foo", [ep("10.0.0.1", ready=False)]),
            endpointSlice("new", "service-api-foo", [ep("10.0.0.1", ready=True)]),
        ]
        self.assertEqual(endpointsOf(svc, slices), (Endpoint("10.0.0.1", 8080),))


class ClusterStateTests(SynchronousTestCase):
    """
    Only convention Services for configured tiers are kept.
    """

    def test_onlyConventionServicesKept(self) -> None:
        """
        Services and slices that do not follow the convention for a
        configured tier are not stored at all.
        """
        state = ClusterState(tiers=frozenset(["api"]))
        touched = state.replace(
            SERVICES,
            None,
            [
                service("service-api-foo"),
                service("service-webhooks-stripe"),
                service("ledger"),
                service("service-api-Bad"),
            ],
        )
        self.assertEqual(touched, {"service.api.foo"})
        self.assertEqual(list(state.services), [("shop", "service-api-foo")])
        state.replace(
            ENDPOINT_SLICES,
            None,
            [
                endpointSlice("a", "service-api-foo", [ep("10.0.0.1")]),
                endpointSlice("b", "ledger", [ep("10.0.0.2")]),
            ],
        )
        self.assertEqual(list(state.slices), [("shop", "a")])

    def test_eventsAndEntries(self) -> None:
        """
        Watch events add, change and remove entries; slices in another
        namespace do not count.
        """
        state = ClusterState(tiers=frozenset(["api"]))
        state.event(SERVICES, "ADDED", service("service-api-foo"))
        state.event(
            ENDPOINT_SLICES,
            "ADDED",
            endpointSlice("a", "service-api-foo", [ep("10.0.0.1")]),
        )
        state.event(
            ENDPOINT_SLICES,
            "ADDED",
            endpointSlice("x", "service-api-foo", [ep("10.9.9.9")], namespace="other"),
        )
        entry = state.entry("service.api.foo")
        assert entry is not None
        self.assertEqual([e.host for e in entry.endpoints], ["10.0.0.1"])
        self.assertEqual(entry.source["namespace"], "shop")
        state.event(SERVICES, "DELETED", service("service-api-foo"))
        self.assertIsNone(state.entry("service.api.foo"))

    def test_sliceMovesToAnotherService(self) -> None:
        """
        A slice whose service-name label changes leaves its old service and
        joins the new one; both are reported as changed.
        """
        state = ClusterState(tiers=frozenset(["api"]))
        state.event(SERVICES, "ADDED", service("service-api-a"))
        state.event(SERVICES, "ADDED", service("service-api-b"))
        state.event(
            ENDPOINT_SLICES,
            "ADDED",
            endpointSlice("s", "service-api-a", [ep("10.0.0.1")]),
        )
        touched = state.event(
            ENDPOINT_SLICES,
            "MODIFIED",
            endpointSlice("s", "service-api-b", [ep("10.0.0.1")]),
        )
        self.assertEqual(touched, {"service.api.a", "service.api.b"})
        a, b = state.entry("service.api.a"), state.entry("service.api.b")
        assert a is not None and b is not None
        self.assertEqual((len(a.endpoints), len(b.endpoints)), (0, 1))
        touched = state.event(
            ENDPOINT_SLICES, "MODIFIED", endpointSlice("s", "ledger", [ep("10.0.0.1")])
        )
        self.assertEqual(touched, {"service.api.b"})
        self.assertEqual(state.slices, {})

    def test_namespaceConflict(self) -> None:
        """
        The same Service name in two namespaces: the first namespace in
        sort order wins.
        """
        state = ClusterState(tiers=frozenset(["api"]))
        state.event(SERVICES, "ADDED", service("service-api-foo", namespace="zeta"))
        state.event(SERVICES, "ADDED", service("service-api-foo", namespace="alpha"))
        entry = state.entry("service.api.foo")
        assert entry is not None
        self.assertEqual(entry.source["namespace"], "alpha")

    def test_replaceInOneNamespace(self) -> None:
        """
        A list in one namespace replaces only that namespace's objects; a
        list of every namespace replaces them all.
        """
        state = ClusterState(tiers=frozenset(["api"]))
        state.replace(SERVICES, "a", [service("service-api-x", namespace="a")])
        state.replace(SERVICES, "b", [service("service-api-y", namespace="b")])
        touched = state.replace(SERVICES, "a", [])
        self.assertEqual(touched, {"service.api.x"})
        self.assertIsNone(state.entry("service.api.x"))
        self.assertIsNotNone(state.entry("service.api.y"))
        touched = state.replace(
            SERVICES, None, [service("service-api-z", namespace="c")]
        )
        self.assertEqual(touched, {"service.api.y", "service.api.z"})
        self.assertEqual(list(state.services), [("c", "service-api-z")])

    def test_appProtocolSetsProtocol(self) -> None:
        """
        A Service port whose C{appProtocol} is C{kubernetes.io/h2c} gives
        the service the C{h2c} protocol; a C{monedge.io/protocol}
        annotation overrides it; a Service without either is C{http1}.
        """
        state = ClusterState(tiers=frozenset(["api"]))
        h2c = [{"name": "http", "port": 80, "appProtocol": "kubernetes.io/h2c"}]
        state.event(SERVICES, "ADDED", service("service-api-a", ports=h2c))
        state.event(
            SERVICES,
            "ADDED",
            service(
                "service-api-b",
                ports=h2c,
                annotations={"monedge.io/protocol": "http1"},
            ),
        )
        state.event(
            SERVICES,
            "ADDED",
            service("service-api-c", annotations={"monedge.io/protocol": "h2c"}),
        )
        state.event(SERVICES, "ADDED", service("service-api-d"))
        protocols = {}
        for name in "abcd":
            entry = state.entry(f"service.api.{name}")
            assert entry is not None
            protocols[name] = entry.policy.protocol
        self.assertEqual(
            protocols, {"a": "h2c", "b": "http1", "c": "h2c", "d": "http1"}
        )

    def test_invalidAnnotationsCountedOncePerVersion(self) -> None:
        """
        An invalid annotation is counted once per Service version, however
        often the entry is rebuilt.
        """
        state = ClusterState(tiers=frozenset(["api"]))
        bad = service("service-api-foo", annotations={"monedge.io/timeout": "never"})
        state.event(SERVICES, "ADDED", bad)
        state.entry("service.api.foo")
        state.entry("service.api.foo")
        self.assertEqual(state.invalidAnnotations, 1)
        state.event(
            SERVICES,
            "MODIFIED",
            {**bad, "metadata": {**bad["metadata"], "resourceVersion": "2"}},
        )
        state.entry("service.api.foo")
        self.assertEqual(state.invalidAnnotations, 2)
        self.flushLoggedErrors()


def _objects(
    services: Mapping[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """
    Services and slices equivalent to a static registry mapping.
    """
    table = parseRegistry({"services": dict(services)}, "test")
    svcs, slices = [], []
    for name, entry in table.items():
        kname = "service-" + name.split(".", 1)[1].replace(".", "-")
        annotations = {
            f"monedge.io/{k}": str(v)
            for k, v in (services[name].get("policy") or {}).items()
        }
        svcs.append(service(kname, "default", annotations=annotations))
        for index, endpoint in enumerate(entry.endpoints):
            slices.append(
                endpointSlice(
                    f"{kname}-{index}",
                    kname,
                    [ep(endpoint.host, ready=True)],
                    namespace="default",
                    ports=[{"name": "http", "port": endpoint.port}],
                    addressType="IPv6" if ":" in endpoint.host else "IPv4",
                )
            )
    return svcs, slices


class _Ceiling(random.Random):
    """
    Back-off without jitter: every delay is its ceiling.
    """

    def uniform(self, a: float, b: float) -> float:
        return b


def ceiling(attempt: int, maxBackoff: float = 30.0) -> float:
    """
    The back-off before retry number C{attempt}, without jitter.
    """
    return min(maxBackoff, 0.5 * 2.0 ** (attempt - 1))


class RegistryTestCase(SynchronousTestCase):
    """
    A L{KubernetesRegistry} on a L{MemoryKubernetes} and a L{Clock}, its
    log events recorded.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.api = MemoryKubernetes(self.clock)
        self.logs = EventRecorder()
        globalLogPublisher.addObserver(self.logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs)

    def makeRegistry(
        self,
        namespaces: Sequence[str] = (),
        initialSyncTimeout: float = 30.0,
        maxBackoff: float = 30.0,
        tiers: Sequence[str] = ("api",),
        coalesceWindow: float = 0.0,
        **kwargs: Any,
    ) -> KubernetesRegistry:
        """
        A registry (not started) on the test's API and clock, with no
        back-off jitter, and (unless C{coalesceWindow} says) each watch
        event applied to the table at once; stopped after the test.
        """
        registry = KubernetesRegistry(
            self.api,
            tiers=frozenset(tiers),
            namespaces=namespaces,
            clock=self.clock,
            initialSyncTimeout=initialSyncTimeout,
            maxBackoff=maxBackoff,
            rng=_Ceiling(),
            coalesceWindow=coalesceWindow,
            **kwargs,
        )
        self.addCleanup(self._stop, registry)
        return registry

    def startRegistry(self, **kwargs: Any) -> KubernetesRegistry:
        """
        A started registry.
        """
        registry = self.makeRegistry(**kwargs)
        registry.startService()
        return registry

    def _stop(self, registry: KubernetesRegistry) -> None:
        if registry.running:
            self.successResultOf(registry.stopService())

    def watches(self, registry: KubernetesRegistry) -> dict[str, dict[str, Any]]:
        """
        The registry's description of each watch, by kind (one namespace).
        """
        return {w["kind"]: w for w in registry.describe()["watches"]}

    def logged(self, text: str) -> list[str]:
        """
        The formatted log messages that contain C{text}.
        """
        found = [formatEvent(e) for e in self.logs.events]
        return [m for m in found if text in m]

    def calls(self, since: int = 0) -> list[tuple[str | None, ...]]:
        """
        The API calls made since the C{since}th.
        """
        return self.api.requests[since:]

    def applyFoo(self, *endpoints: str) -> None:
        """
        The Service service-api-foo in shop, and a slice with C{endpoints}.
        """
        self.api.apply(service("service-api-foo"))
        self.api.apply(
            endpointSlice(
                "foo-1", "service-api-foo", [ep(a, ready=True) for a in endpoints]
            )
        )


class KubernetesRegistryContractTests(RegistryContractMixin, SynchronousTestCase):
    """
    The registry contract, against L{KubernetesRegistry} on a
    L{MemoryKubernetes}: the first services are listed, later updates
    arrive as watch events (Services first, then their slices, as the API
    would apply and delete them).
    """

    def makeRegistry(
        self, services: Mapping[str, Any]
    ) -> tuple[IServiceRegistry, Callable[[Mapping[str, Any]], None]]:
        api = MemoryKubernetes()
        applied: dict[tuple[str, str], dict[str, Any]] = {}

        def update(services: Mapping[str, Any]) -> None:
            svcs, slices = _objects(services)
            for kind, objects in (("Service", svcs), ("EndpointSlice", slices)):
                wanted = {(kind, o["metadata"]["name"]): o for o in objects}
                for key, obj in wanted.items():
                    if applied.get(key) != obj:
                        api.apply(obj)
                        applied[key] = obj
                for key in [k for k in applied if k[0] == kind and k not in wanted]:
                    api.delete(kind, "default", key[1])
                    del applied[key]

        clock = Clock()

        def updateAndWait(services: Mapping[str, Any]) -> None:
            # Watch events reach the table once the coalescing window ends.
            update(services)
            clock.advance(COALESCE_WINDOW)

        update(services)
        registry = KubernetesRegistry(
            api, tiers=frozenset(["api", "webhooks"]), clock=clock
        )
        registry.startService()
        self.addCleanup(registry.stopService)
        return registry, updateAndWait


class FirstSyncTests(RegistryTestCase):
    """
    The first list of each kind, and readiness.
    """

    def test_firstListThenWatch(self) -> None:
        """
        On start each kind is listed, and the registry serves what the
        lists hold and is ready; then each kind is watched from its list's
        resourceVersion.
        """
        self.applyFoo("10.0.0.1")
        registry = self.makeRegistry()
        self.assertFalse(registry.isReady())
        self.clock.advance(7)
        registry.startService()
        self.assertTrue(registry.isReady())
        version = self.api.resourceVersion
        self.assertEqual(
            self.calls(),
            [
                ("list", SERVICES, None),
                ("watch", SERVICES, None, version),
                ("list", ENDPOINT_SLICES, None),
                ("watch", ENDPOINT_SLICES, None, version),
            ],
        )
        entry = registry.lookup("service.api.foo")
        assert entry is not None
        self.assertEqual(entry.endpoints, (Endpoint("10.0.0.1", 8080),))
        self.assertEqual(entry.source["name"], "service-api-foo")
        self.assertEqual((registry.reloadsSucceeded, registry.reloadsFailed), (2, 0))
        self.assertEqual(registry.lastSync, 7)
        description = registry.describe()
        self.assertIs(description["synced"], True)
        self.assertEqual(description["namespaces"], ["*"])
        for watch in description["watches"]:
            self.assertEqual(
                (watch["synced"], watch["resource_version"], watch["last_error"]),
                (True, version, None),
            )
        self.assertEqual(self.api.watchCount, 2)
        self.assertEqual(len(self.logged("Kubernetes registry synced: 1 services")), 1)

    def test_readyOnlyOnceBothKindsListed(self) -> None:
        """
        Services listed but EndpointSlices refused (a role without them):
        not ready, and the refusal is shown; once they can be listed, after
        the back-off, the registry is ready.
        """
        self.applyFoo("10.0.0.1")
        self.api.forbid("EndpointSlice")
        registry = self.startRegistry()
        self.assertFalse(registry.isReady())
        self.assertIsNotNone(registry.lookup("service.api.foo"))
        watches = self.watches(registry)
        self.assertEqual(
            (watches[SERVICES]["synced"], watches[ENDPOINT_SLICES]["synced"]),
            (True, False),
        )
        self.assertEqual(
            watches[ENDPOINT_SLICES]["last_error"], "API error 403: Forbidden"
        )
        self.assertIs(registry.describe()["synced"], False)
        self.api.forbid("EndpointSlice", False)
        self.clock.advance(ceiling(1))
        self.assertTrue(registry.isReady())
        entry = registry.lookup("service.api.foo")
        assert entry is not None
        self.assertEqual(len(entry.endpoints), 1)

    def test_readyAfterInitialSyncTimeout(self) -> None:
        """
        With no sync at all, the registry reports ready once the initial
        sync timeout passes, so the proxy does not stay out of rotation.
        """
        self.api.stop()
        registry = self.startRegistry(initialSyncTimeout=30)
        self.clock.advance(29)
        self.assertFalse(registry.isReady())
        self.clock.advance(2)
        self.assertTrue(registry.isReady())
        self.assertIs(registry.describe()["synced"], False)
        self.assertEqual(len(self.logged("no full Kubernetes sync after 30")), 1)
        self.flushLoggedErrors()

    def test_zeroTimeoutWaitsForSync(self) -> None:
        """
        With an initial sync timeout of 0 the registry never reports ready
        without a full sync.
        """
        self.api.stop()
        registry = self.startRegistry(initialSyncTimeout=0)
        self.clock.advance(3600)
        self.assertFalse(registry.isReady())
        self.flushLoggedErrors()

    def test_perNamespaceWatchers(self) -> None:
        """
        With namespaces given, each is listed and watched for both kinds,
        and objects elsewhere are not seen.
        """
        self.api.apply(service("service-api-x", namespace="a"))
        self.api.apply(service("service-api-y", namespace="b"))
        self.api.apply(service("service-api-z", namespace="c"))
        registry = self.startRegistry(namespaces=["b", "a"])
        self.assertEqual(
            sorted((c[0], c[1], c[2]) for c in self.calls()),
            sorted(
                (verb, kind, namespace)
                for verb in ("list", "watch")
                for kind in (SERVICES, ENDPOINT_SLICES)
                for namespace in ("a", "b")
            ),
        )
        self.assertEqual(registry.describe()["namespaces"], ["a", "b"])
        self.assertEqual(
            sorted(registry.services()), ["service.api.x", "service.api.y"]
        )
        self.api.apply(service("service-api-w", namespace="c"))
        self.api.delete("Service", "a", "service-api-x")
        self.assertEqual(sorted(registry.services()), ["service.api.y"])
        self.assertTrue(registry.isReady())


class EventTests(RegistryTestCase):
    """
    Watch events add, change and remove entries.
    """

    def test_serviceEvents(self) -> None:
        """
        A Service added, modified (its port, its annotations) and deleted
        makes, changes and removes its entry, each change announced to
        listeners, and each event counts as contact with the API.
        """
        registry = self.startRegistry()
        recorder = Recorder()
        registry.subscribe(recorder)
        self.clock.advance(5)
        self.api.apply(service("service-api-foo"))
        self.assertEqual(recorder.calls, [frozenset(["service.api.foo"])])
        self.assertEqual(registry.lastSync, 5)
        entry = registry.lookup("service.api.foo")
        assert entry is not None
        self.assertEqual(entry.endpoints, ())
        self.api.apply(
            endpointSlice(
                "s", "service-api-foo", [ep("10.0.0.1")], ports=[{"port": 3000}]
            )
        )
        entry = registry.lookup("service.api.foo")
        assert entry is not None
        self.assertEqual(entry.endpoints, ())
        self.api.apply(service("service-api-foo", ports=[{"port": 80}]))
        entry = registry.lookup("service.api.foo")
        assert entry is not None
        self.assertEqual(entry.endpoints, (Endpoint("10.0.0.1", 3000),))
        self.api.apply(
            service(
                "service-api-foo",
                ports=[{"port": 80}],
                annotations={"monedge.io/timeout": "5s"},
            )
        )
        entry = registry.lookup("service.api.foo")
        assert entry is not None
        self.assertEqual(entry.policy.timeout, 5.0)
        self.assertEqual(
            entry.source["resourceVersion"],
            self.watches(registry)[SERVICES]["resource_version"],
        )
        self.clock.advance(5)
        self.api.delete("Service", "shop", "service-api-foo")
        self.assertIsNone(registry.lookup("service.api.foo"))
        self.assertEqual(len(recorder.calls), 4)
        self.assertEqual(registry.lastSync, 10)

    def test_sliceEvents(self) -> None:
        """
        EndpointSlices added, modified (conditions, addresses) and deleted
        change the endpoints of their Service; a slice of an unknown or
        unexposed Service changes nothing.
        """
        self.api.apply(service("service-api-foo"))
        registry = self.startRegistry()

        def endpoints() -> dict[str, tuple[bool, bool, bool]]:
            entry = registry.lookup("service.api.foo")
            assert entry is not None
            return {
                e.host: (e.ready, e.serving, e.terminating) for e in entry.endpoints
            }

        self.api.apply(endpointSlice("a", "service-api-foo", [ep("10.0.0.1")]))
        self.api.apply(endpointSlice("b", "service-api-foo", [ep("10.0.0.2")]))
        self.assertEqual(
            endpoints(),
            {"10.0.0.1": (True, True, False), "10.0.0.2": (True, True, False)},
        )
        self.api.apply(
            endpointSlice(
                "a",
                "service-api-foo",
                [ep("10.0.0.1", ready=False, serving=True, terminating=True)],
            )
        )
        self.assertEqual(endpoints()["10.0.0.1"], (False, True, True))
        self.api.delete("EndpointSlice", "shop", "a")
        self.assertEqual(endpoints(), {"10.0.0.2": (True, True, False)})
        recorder = Recorder()
        registry.subscribe(recorder)
        self.api.apply(endpointSlice("c", "service-api-bar", [ep("10.0.0.3")]))
        self.api.apply(endpointSlice("d", "ledger", [ep("10.0.0.4")]))
        self.assertEqual(recorder.calls, [])
        self.assertEqual(sorted(registry.state.slices), [("shop", "b"), ("shop", "c")])
        self.api.apply(service("service-api-bar"))
        bar = registry.lookup("service.api.bar")
        assert bar is not None
        self.assertEqual([e.host for e in bar.endpoints], ["10.0.0.3"])

    def test_nonRoutableServicesIgnored(self) -> None:
        """
        Services whose names do not follow the convention for a tier some
        host serves, listed or watched, make no entry and are not kept;
        nor are their slices.
        """
        self.api.apply(service("ledger"))
        self.api.apply(service("service-webhooks-stripe"))
        self.api.apply(endpointSlice("l", "ledger", [ep("10.0.0.1")]))
        registry = self.startRegistry()
        recorder = Recorder()
        registry.subscribe(recorder)
        self.api.apply(service("service-api-Bad"))
        self.api.apply(service("service-api"))
        self.api.apply(endpointSlice("w", "service-webhooks-stripe", [ep("10.0.0.2")]))
        self.api.apply(service("service-api-good"))
        self.assertEqual(list(registry.services()), ["service.api.good"])
        self.assertEqual(recorder.calls, [frozenset(["service.api.good"])])
        self.assertEqual(list(registry.state.services), [("shop", "service-api-good")])
        self.assertEqual(registry.state.slices, {})

    def test_policyAnnotations(self) -> None:
        """
        A Service's monedge.io/ annotations are its policy; an invalid one
        takes its default, is shown in the entry's source, logged and
        counted once per Service version; an unreadable monedge.io/hooks
        fails closed; fixing the annotation clears the error.
        """
        registry = self.startRegistry()
        self.api.apply(
            service(
                "service-api-foo",
                annotations={
                    "monedge.io/timeout": "never",
                    "monedge.io/idle-timeout": "9s",
                    "monedge.io/hooks": "{name: x",
                },
            )
        )
        entry = registry.lookup("service.api.foo")
        assert entry is not None
        self.assertEqual((entry.policy.timeout, entry.policy.idleTimeout), (60.0, 9.0))
        self.assertEqual([h.name for h in entry.policy.hooks], [INVALID_HOOKS])
        self.assertEqual(len(entry.source["annotation_errors"]), 2)
        self.assertEqual(registry.invalidConfig, 2)
        self.api.apply(endpointSlice("a", "service-api-foo", [ep("10.0.0.1")]))
        self.assertEqual(registry.invalidConfig, 2)
        self.assertEqual(len(self.logged("invalid annotation, default used")), 2)
        self.api.apply(
            service("service-api-foo", annotations={"monedge.io/timeout": "5s"})
        )
        entry = registry.lookup("service.api.foo")
        assert entry is not None
        self.assertEqual((entry.policy.timeout, entry.policy.hooks), (5.0, ()))
        self.assertEqual(entry.source["annotation_errors"], [])
        self.assertEqual(registry.describe()["invalid_annotations"], 2)
        self.flushLoggedErrors()


class BookmarkTests(RegistryTestCase):
    """
    Bookmarks move a watch on without changing the table.
    """

    def test_bookmark(self) -> None:
        """
        A bookmark changes no entry but counts as contact with the API and
        moves the watch's resourceVersion to the bookmark's, so that a
        watch reopened after a drop starts from there.
        """
        self.applyFoo("10.0.0.1")
        registry = self.startRegistry()
        recorder = Recorder()
        registry.subscribe(recorder)
        for i in range(3):
            self.api.apply(endpointSlice(f"other-{i}", "ledger", []))
        self.assertEqual(self.watches(registry)[SERVICES]["resource_version"], "3")
        self.clock.advance(10)
        self.api.bookmark()
        version = self.api.resourceVersion
        self.assertEqual(version, "6")
        self.assertEqual(self.watches(registry)[SERVICES]["resource_version"], version)
        self.assertEqual(registry.lastSync, 10)
        self.assertEqual(recorder.calls, [])
        since = len(self.calls())
        self.api.dropWatches()
        self.clock.advance(ceiling(1))
        self.assertEqual(
            self.calls(since),
            [
                ("watch", SERVICES, None, version),
                ("watch", ENDPOINT_SLICES, None, version),
            ],
        )
        self.flushLoggedErrors()


class GoneTests(RegistryTestCase):
    """
    410 Gone: the registry relists.
    """

    def test_expiredMidWatchRelists(self) -> None:
        """
        A watch expired mid-stream is followed at once (no back-off, no
        failure counted) by a new list and a watch from its version.
        """
        self.applyFoo("10.0.0.1")
        registry = self.startRegistry()
        since = len(self.calls())
        self.api.compact()
        self.api.expireWatches()
        version = self.api.resourceVersion
        self.assertEqual(
            self.calls(since),
            [
                ("list", SERVICES, None),
                ("watch", SERVICES, None, version),
                ("list", ENDPOINT_SLICES, None),
                ("watch", ENDPOINT_SLICES, None, version),
            ],
        )
        watches = self.watches(registry)
        self.assertEqual([w["relists"] for w in watches.values()], [1, 1])
        self.assertEqual([w["failures"] for w in watches.values()], [0, 0])
        self.assertEqual(registry.reloadsSucceeded, 4)
        self.assertEqual(len(self.logged("watch expired (410 Gone); relisting")), 2)
        self.assertIsNotNone(registry.lookup("service.api.foo"))

    def test_relistAfterMissedChanges(self) -> None:
        """
        Changes made while the watches were down, and then compacted away,
        are caught by the relist that the expired resume asks for: deleted
        Services disappear, new ones appear.
        """
        self.applyFoo("10.0.0.1")
        registry = self.startRegistry()
        self.api.stop()
        self.api.apply(service("service-api-new"))
        self.api.delete("Service", "shop", "service-api-foo")
        self.api.compact()
        self.api.start()
        self.assertIsNotNone(registry.lookup("service.api.foo"))
        self.clock.advance(ceiling(1))
        self.assertEqual(list(registry.services()), ["service.api.new"])
        self.assertEqual(
            [(w["relists"], w["failures"]) for w in self.watches(registry).values()],
            [(1, 1), (1, 1)],
        )
        self.assertEqual(self.api.watchCount, 2)
        self.flushLoggedErrors()


class BackoffTests(RegistryTestCase):
    """
    Failures are retried after a jittered, capped exponential back-off.
    """

    def test_droppedWatchReconnects(self) -> None:
        """
        A dropped watch is reopened after the back-off, from the last
        version seen (nothing is relisted), and what changed meanwhile
        arrives; the outage is logged once, and the API's return once
        something is heard from it.
        """
        self.applyFoo("10.0.0.1")
        registry = self.startRegistry()
        version = self.api.resourceVersion
        since = len(self.calls())
        self.api.dropWatches()
        self.api.apply(service("service-api-bar"))
        self.assertEqual(self.api.watchCount, 0)
        watches = self.watches(registry)
        self.assertEqual(
            watches[SERVICES]["last_error"],
            "ConnectionLost: Connection to the other side was lost in a non-clean"
            " fashion: the watch's connection was dropped.",
        )
        self.assertEqual(registry.reloadsFailed, 2)
        self.assertEqual(len(self.logged("Kubernetes API unavailable")), 1)
        self.clock.advance(ceiling(1) - 0.01)
        self.assertEqual(
            (self.calls(since), registry.lookup("service.api.bar")), ([], None)
        )
        self.clock.advance(0.01)
        self.assertEqual(
            self.calls(since),
            [
                ("watch", SERVICES, None, version),
                ("watch", ENDPOINT_SLICES, None, version),
            ],
        )
        self.assertIsNotNone(registry.lookup("service.api.bar"))
        self.assertEqual(len(self.logged("Kubernetes API reachable again")), 1)
        self.flushLoggedErrors()

    def test_backoffGrowsCapsAndResets(self) -> None:
        """
        Each failure in a row doubles the wait, up to the cap; a watch the
        server ends cleanly starts the count again.
        """
        self.api.stop()
        registry = self.startRegistry(maxBackoff=3, initialSyncTimeout=0)
        waits = []
        for _ in range(5):
            since = len(self.calls())
            self.clock.advance(0.25)
            waited = 0.25
            while len(self.calls()) == since:
                self.clock.advance(0.25)
                waited += 0.25
            waits.append(waited)
        self.assertEqual(waits, [ceiling(n, 3) for n in range(1, 6)])
        self.assertEqual(waits, [0.5, 1.0, 2.0, 3.0, 3.0])
        self.assertEqual(self.watches(registry)[SERVICES]["failures"], 6)
        self.api.start()
        self.clock.advance(3)
        self.assertTrue(registry.isReady())
        self.api.endWatches()
        self.api.dropWatches()
        self.assertEqual(
            [c.getTime() - self.clock.seconds() for c in self.clock.getDelayedCalls()],
            [ceiling(1), ceiling(1)],
        )
        self.flushLoggedErrors()

    def test_jitter(self) -> None:
        """
        Each wait is drawn between half its ceiling and the ceiling: 0.5 s
        doubled with each attempt, up to the cap.
        """
        registry = KubernetesRegistry(
            MemoryKubernetes(),
            frozenset(["api"]),
            clock=Clock(),
            maxBackoff=10,
            rng=random.Random(4),
        )
        for attempt, top in [
            (1, 0.5),
            (2, 1.0),
            (4, 4.0),
            (5, 8.0),
            (6, 10.0),
            (40, 10.0),
        ]:
            delays = [registry.backoff(attempt) for _ in range(50)]
            self.assertTrue(all(top / 2 <= d <= top for d in delays), (attempt, delays))
            self.assertGreater(len(set(delays)), 1)


class OutageTests(RegistryTestCase):
    """
    The API down at start, or lost mid-run.
    """

    def test_apiDownAtStart(self) -> None:
        """
        With the API unreachable at start the registry is not ready, shows
        why, and retries; once the API is back, the retry lists and the
        registry is ready with its routes.
        """
        self.api.stop()
        registry = self.startRegistry()
        self.assertFalse(registry.isReady())
        self.assertEqual(registry.services(), {})
        self.assertIsNone(registry.lastSync)
        watches = self.watches(registry)
        self.assertTrue(
            watches[SERVICES]["last_error"].startswith("ConnectionRefusedError:"),
            watches,
        )
        self.assertEqual(
            self.api.requests,
            [("list", SERVICES, None), ("list", ENDPOINT_SLICES, None)],
        )
        self.api.start()
        self.applyFoo("10.0.0.1")
        self.clock.advance(ceiling(1))
        self.assertTrue(registry.isReady())
        self.assertIsNotNone(registry.lookup("service.api.foo"))
        self.assertEqual(len(self.logged("Kubernetes API unavailable")), 1)
        self.assertEqual(len(self.logged("Kubernetes API reachable again")), 1)
        self.flushLoggedErrors()

    def test_apiLostMidRun(self) -> None:
        """
        While the API is lost the last table is served and the time since
        the last sync grows; changes made meanwhile arrive once it is back.
        """
        self.applyFoo("10.0.0.1")
        registry = self.startRegistry()
        self.api.stop()
        for _ in range(20):
            self.clock.advance(1)
        self.assertIsNotNone(registry.lookup("service.api.foo"))
        self.assertEqual(registry.describe()["seconds_since_sync"], 20)
        self.assertGreater(registry.reloadsFailed, 2)
        self.api.apply(service("service-api-new"))
        self.api.start()
        self.clock.advance(30)
        self.assertEqual(
            sorted(registry.services()), ["service.api.foo", "service.api.new"]
        )
        self.assertEqual(registry.describe()["seconds_since_sync"], 0)
        self.flushLoggedErrors()


class StopTests(RegistryTestCase):
    """
    Stopping the registry stops every watch and retry.
    """

    def test_stopWatching(self) -> None:
        """
        After stopService no watch is open, no call is scheduled, and
        later changes are not applied.
        """
        self.applyFoo("10.0.0.1")
        registry = self.startRegistry()
        self.successResultOf(registry.stopService())
        self.assertEqual(self.api.watchCount, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.api.delete("Service", "shop", "service-api-foo")
        self.assertIsNotNone(registry.lookup("service.api.foo"))

    def test_stopDuringBackoff(self) -> None:
        """
        Stopped while waiting to retry, the registry retries no more.
        """
        self.api.stop()
        registry = self.startRegistry()
        since = len(self.calls())
        self.successResultOf(registry.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.api.start()
        self.clock.advance(60)
        self.assertEqual(self.calls(since), [])
        self.flushLoggedErrors()
