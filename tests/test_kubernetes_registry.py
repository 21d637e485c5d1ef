"""
The Kubernetes registry without a server: how Services and EndpointSlices
become registry entries, readiness, and the registry contract.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from monedge.interfaces import IServiceRegistry
from monedge.registry import Endpoint
from monedge.registry.kubernetes import (
    ENDPOINT_SLICES,
    SERVICES,
    ClusterState,
    KubernetesRegistry,
    endpointsFor,
    policyFromAnnotations,
)
from monedge.registry.static import parseRegistry
from monedge.testing.kubernetes import endpointSliceObject, serviceObject
from tests.test_registry import RegistryContractMixin


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
        self.assertEqual(endpointsFor(svc, [slice_]), (Endpoint("10.0.0.1", 8080),))

    def test_onlyPortUnnamed(self) -> None:
        """
        A Service with one unnamed port uses the slice's unnamed port.
        """
        svc = service("service-api-foo", ports=[{"port": 80}])
        slice_ = endpointSlice(
            "s1", "service-api-foo", [ep("10.0.0.1")], ports=[{"port": 3000}]
        )
        self.assertEqual(endpointsFor(svc, [slice_])[0].port, 3000)

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
            endpointsFor(https, [slice_]),
            (Endpoint("10.0.0.1", 8443, scheme="https"),),
        )
        both = service(
            "service-api-foo",
            ports=[{"name": "https", "port": 443}, {"name": "http", "port": 80}],
        )
        self.assertEqual(endpointsFor(both, [slice_]), (Endpoint("10.0.0.1", 8080),))
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
        self.assertEqual(endpointsFor(single, [webSlice])[0].scheme, "https")

    def test_noUsablePort(self) -> None:
        """
        Several ports, none named http or https: no endpoints.
        """
        svc = service(
            "service-api-foo",
            ports=[{"name": "a", "port": 1}, {"name": "b", "port": 2}],
        )
        slice_ = endpointSlice("s1", "service-api-foo", [ep("10.0.0.1")])
        self.assertEqual(endpointsFor(svc, [slice_]), ())

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
        found = {e.host: e for e in endpointsFor(svc, slices)}
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
        self.assertEqual(endpointsFor(svc, slices), (Endpoint("10.0.0.1", 8080),))


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


class _Quiet(KubernetesRegistry):
    """
    A Kubernetes registry with no watcher threads: tests feed it what the
    watchers would.
    """

    def _startWatchers(self) -> None:
        pass


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


class KubernetesRegistryContractTests(RegistryContractMixin, SynchronousTestCase):
    """
    The registry contract, against L{KubernetesRegistry}, fed Service and
    EndpointSlice lists as its watchers would.
    """

    def makeRegistry(
        self, services: Mapping[str, Any]
    ) -> tuple[IServiceRegistry, Callable[[Mapping[str, Any]], None]]:
        registry = _Quiet(
            None, tiers=frozenset(["api", "webhooks"]), reactor=MemoryReactorClock()
        )

        def update(services: Mapping[str, Any]) -> None:
            svcs, slices = _objects(services)
            watchers = {w.kind: w for w in registry._watchers}
            registry.listed(watchers[SERVICES], svcs, "1")
            registry.listed(watchers[ENDPOINT_SLICES], slices, "1")

        update(services)
        return registry, update


class ReadinessTests(SynchronousTestCase):
    """
    Ready after the first full sync, or after the initial sync timeout.
    """

    def test_readyAfterBothLists(self) -> None:
        """
        Not ready until Services and EndpointSlices have both been listed.
        """
        clock = MemoryReactorClock()
        registry = _Quiet(None, tiers=frozenset(["api"]), reactor=clock)
        registry.startService()
        watchers = {w.kind: w for w in registry._watchers}
        self.assertFalse(registry.isReady())
        registry.listed(watchers[SERVICES], [service("service-api-foo")], "5")
        self.assertFalse(registry.isReady())
        registry.listed(watchers[ENDPOINT_SLICES], [], "5")
        self.assertTrue(registry.isReady())
        self.assertEqual(registry.lastSync, clock.seconds())

    def test_readyAfterInitialSyncTimeout(self) -> None:
        """
        With no sync at all, the registry reports ready once the initial
        sync timeout passes, so the proxy does not stay out of rotation.
        """
        clock = MemoryReactorClock()
        registry = _Quiet(
            None, tiers=frozenset(["api"]), reactor=clock, initialSyncTimeout=30
        )
        registry.startService()
        clock.advance(29)
        self.assertFalse(registry.isReady())
        clock.advance(2)
        self.assertTrue(registry.isReady())

    def test_zeroTimeoutWaitsForSync(self) -> None:
        """
        With an initial sync timeout of 0 the registry never reports ready
        without a full sync.
        """
        clock = MemoryReactorClock()
        registry = _Quiet(
            None, tiers=frozenset(["api"]), reactor=clock, initialSyncTimeout=0
        )
        registry.startService()
        clock.advance(3600)
        self.assertFalse(registry.isReady())

    def test_perNamespaceWatchers(self) -> None:
        """
        With namespaces given, each is watched for both kinds; a list in
        one namespace replaces only that namespace's objects.
        """
        registry = _Quiet(
            None,
            tiers=frozenset(["api"]),
            namespaces=["b", "a"],
            reactor=MemoryReactorClock(),
        )
        scopes = sorted((w.kind, w.namespace or "") for w in registry._watchers)
        self.assertEqual(
            scopes,
            [
                (ENDPOINT_SLICES, "a"),
                (ENDPOINT_SLICES, "b"),
                (SERVICES, "a"),
                (SERVICES, "b"),
            ],
        )
        byScope = {(w.kind, w.namespace): w for w in registry._watchers}
        registry.listed(
            byScope[(SERVICES, "a")], [service("service-api-x", namespace="a")], "1"
        )
        registry.listed(
            byScope[(SERVICES, "b")], [service("service-api-y", namespace="b")], "1"
        )
        registry.listed(byScope[(SERVICES, "a")], [], "2")
        self.assertIsNone(registry.lookup("service.api.x"))
        self.assertIsNotNone(registry.lookup("service.api.y"))
