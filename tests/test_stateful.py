"""
Stateful property tests (hypothesis C{RuleBasedStateMachine}) of the two
pieces of monedge that keep state across many events:

  - the Kubernetes registry's L{ClusterState}, fed random list snapshots
    and watch events, checked after every step against a small model of
    what the cluster holds;
  - the upstream connection pool of L{FastUpstreamClient}, driven with
    real L{_Connection} protocols over in-memory transports and a fake
    upstream that answers, closes or misbehaves, checked after every step
    against a model of which connections are idle, busy or closed.

Each machine also has tests showing that it fails on a deliberately broken
model or implementation, so that its checks are not vacuous.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hypothesis import HealthCheck, Phase, Verbosity, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IConsumer, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from monedge.registry import RegistryTable, ServiceEntry
from monedge.registry.kubeapi import ServiceRecord, SliceRecord
from monedge.registry.kubernetes import (
    ENDPOINT_SLICES,
    SERVICE_NAME_LABEL,
    SERVICES,
    ClusterState,
    ObjectKey,
    policyFromAnnotations,
)
from monedge.testing.kubernetes import endpointSliceObject, serviceObject
from monedge.upstream.balancer import eligible
from monedge.upstream.client import (
    FastUpstreamClient,
    Key,
    StaleConnection,
    _Connection,
)
from monedge.upstream.endpoints import EndpointCache, UpstreamTLS


class InvariantBroken(AssertionError):
    """
    A machine's check failed: the implementation and the model disagree.
    """


def check(condition: bool, message: str) -> None:
    """
    Raise L{InvariantBroken} with C{message} unless C{condition}.
    """
    if not condition:
        raise InvariantBroken(message)


#: The settings every machine runs with: bounded, and the same examples on
#: every run (CI must not find a different failure each time).
MACHINE_SETTINGS = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

#: For showing a machine fails: stop at the first failure, quietly.
BREAKING_SETTINGS = settings(
    MACHINE_SETTINGS,
    max_examples=300,
    phases=[Phase.generate],
    report_multiple_bugs=False,
    verbosity=Verbosity.quiet,
)


# ---------------------------------------------------------------------------
# The registry: ClusterState

NAMESPACES = ("alpha", "beta")

#: The configured tiers: "web" is a valid tier some host could serve, but
#: none does here.
TIERS = frozenset(["api"])

#: Kubernetes names: two kept Services, one for an unconfigured tier, two
#: that do not follow the convention.
KUBERNETES_NAMES = (
    "service-api-foo",
    "service-api-bar",
    "service-web-foo",
    "foo",
    "service-api-",
)

#: The model's own idea of which Kubernetes names make which registry
#: names (written out, not computed by monedge's convention module).
KEPT = {"service-api-foo": "service.api.foo", "service-api-bar": "service.api.bar"}

#: Every registry name the machine looks up: the kept ones, and one that a
#: Service exists for but whose tier no host serves.
REGISTRY_NAMES = ("service.api.foo", "service.api.bar", "service.web.foo")

SERVICE_PORTS: tuple[list[dict[str, Any]], ...] = (
    [{"name": "http", "port": 80}],
    [{"name": "https", "port": 443}],
    [{"name": "other", "port": 81}],
    [{"port": 80}],
    [{"name": "other", "port": 81}, {"name": "http", "port": 80}],
    [{"name": "https", "port": 443}, {"name": "http", "port": 80}],
    [{"name": "other", "port": 81}, {"name": "metrics", "port": 82}],
    [{"name": "web", "port": 80, "appProtocol": "https"}],
    [],
)

SLICE_PORTS: tuple[list[dict[str, Any]], ...] = (
    [{"name": "http", "port": 8080}],
    [{"name": "other", "port": 9000}],
    [{"name": "http", "port": 8080}, {"name": "other", "port": 9000}],
    [{"name": "https", "port": 8443}],
    [{"port": 8000}],
    [{"name": "web", "port": 8081}],
    [],
)

#: Endpoint conditions as the API sends them, each with the (ready,
#: serving, terminating) the EndpointSlice API documentation gives it: an
#: unknown ready is ready, an unknown serving is the same as ready.
CONDITIONS: tuple[tuple[dict[str, bool], tuple[bool, bool, bool]], ...] = (
    ({"ready": True, "serving": True, "terminating": False}, (True, True, False)),
    ({}, (True, True, False)),
    ({"serving": True}, (True, True, False)),
    ({"ready": False, "serving": True, "terminating": True}, (False, True, True)),
    ({"ready": False, "serving": False, "terminating": True}, (False, False, True)),
    ({"ready": False, "terminating": False}, (False, False, False)),
)

ANNOTATIONS: tuple[dict[str, str], ...] = (
    {},
    {"monedge.io/timeout": "5s"},
    {"monedge.io/timeout": "soon"},
    {"monedge.io/retries": "3"},
    {"monedge.io/hooks": "[unclosed"},
    {"monedge.io/strip-prefix": "false", "example.com/team": "shop"},
)

ADDRESSES = ("10.0.0.1", "10.0.0.2", "10.0.0.3")


def _service(
    kname: str, namespace: str, ports: list[dict[str, Any]], annotations: dict[str, str]
) -> dict[str, Any]:
    return serviceObject(kname, namespace, copy.deepcopy(ports), dict(annotations))


def _slice(
    name: str,
    label: str | None,
    namespace: str,
    endpoints: list[dict[str, Any]],
    ports: list[dict[str, Any]],
    addressType: str,
) -> dict[str, Any]:
    obj = endpointSliceObject(
        name,
        label or "",
        endpoints,
        namespace,
        copy.deepcopy(ports),
        addressType,
    )
    if label is None:
        obj["metadata"]["labels"] = {}
    return obj


sliceEndpoints = st.lists(
    st.builds(
        lambda address, conditions: {
            "addresses": [address] if address else [],
            "conditions": dict(conditions[0]),
        },
        st.sampled_from((*ADDRESSES, "")),
        st.sampled_from(CONDITIONS),
    ),
    min_size=1,
    max_size=3,
)

#: Kubernetes names, the kept ones more often (so that slices meet them).
kubernetesNames = st.one_of(
    st.sampled_from(sorted(KEPT)), st.sampled_from(KUBERNETES_NAMES)
)

services = st.builds(
    _service,
    kubernetesNames,
    st.sampled_from(NAMESPACES),
    st.one_of(st.just(SERVICE_PORTS[0]), st.sampled_from(SERVICE_PORTS)),
    st.sampled_from(ANNOTATIONS),
)

slices = st.builds(
    _slice,
    st.sampled_from(("s1", "s2", "s3")),
    st.one_of(kubernetesNames, st.none()),
    st.sampled_from(NAMESPACES),
    sliceEndpoints,
    st.one_of(st.just(SLICE_PORTS[0]), st.sampled_from(SLICE_PORTS)),
    st.sampled_from(("IPv4", "IPv4", "IPv4", "FQDN")),
)

eventTypes = st.sampled_from(("ADDED", "MODIFIED", "DELETED"))

#: (kind, namespace, name)
ModelKey = tuple[str, str, str]


def _objectKey(obj: Mapping[str, Any]) -> ObjectKey:
    return (obj["metadata"]["namespace"], obj["metadata"]["name"])


def _conditionsOf(conditions: Mapping[str, bool]) -> tuple[bool, bool, bool]:
    for sent, meaning in CONDITIONS:
        if sent == conditions:
            return meaning
    raise KeyError(conditions)


def expectedPort(service: Mapping[str, Any]) -> tuple[str, str] | None:
    """
    The model's reading of docs/annotations.md: the port named http, else
    https, else the only one; TLS for https or appProtocol https.
    """
    ports = service["spec"]["ports"]
    byName = {port.get("name", ""): port for port in ports}
    if "http" in byName:
        chosen = byName["http"]
    elif "https" in byName:
        chosen = byName["https"]
    elif len(ports) == 1:
        chosen = ports[0]
    else:
        return None
    name = chosen.get("name", "")
    https = name == "https" or chosen.get("appProtocol") == "https"
    return name, "https" if https else "http"


def expectedEndpoints(
    service: Mapping[str, Any], slices_: Sequence[Mapping[str, Any]]
) -> dict[tuple[str, int], tuple[str, bool, bool, bool]]:
    """
    (host, port) -> (scheme, ready, serving, terminating) for every address
    of C{service}'s slices on its port; an address in two slices counts as
    its most usable view.
    """
    chosen = expectedPort(service)
    if chosen is None:
        return {}
    portName, scheme = chosen
    found: dict[tuple[str, int], tuple[str, bool, bool, bool]] = {}
    for slice_ in slices_:
        if slice_["addressType"] != "IPv4":
            continue
        numbers = [p["port"] for p in slice_["ports"] if p.get("name", "") == portName]
        if not numbers:
            continue
        for item in slice_["endpoints"]:
            if not item["addresses"]:
                continue
            ready, serving, terminating = _conditionsOf(item["conditions"])
            where = (item["addresses"][0], numbers[0])
            known = found.get(where)
            if known is None or (ready, serving) > known[1:3]:
                found[where] = (scheme, ready, serving, terminating)
    return found


def expectedUsable(
    endpoints: Mapping[tuple[str, int], tuple[str, bool, bool, bool]],
) -> set[tuple[str, int]]:
    """
    Where traffic goes: the ready addresses, else the serving ones that are
    terminating.
    """
    ready = {where for where, (_, r, _s, _t) in endpoints.items() if r}
    if ready:
        return ready
    return {where for where, (_, _r, s, t) in endpoints.items() if s and t}


class RegistryMachine(RuleBasedStateMachine):
    """
    L{ClusterState} fed random Service and EndpointSlice lists and watch
    events, in two namespaces, checked after every step against a model of
    the cluster: the entries, their endpoints, the namespace that wins a
    conflict, the names reported as touched, and the state's own indexes.
    """

    #: The implementation under test (tests of the machine swap in broken
    #: ones).
    stateFactory: ClassVar[type[ClusterState]] = ClusterState

    def __init__(self) -> None:
        super().__init__()
        self.state = self.stateFactory(TIERS)
        #: What the cluster holds: every object, kept or not, by
        #: (kind, namespace, name).
        self.cluster: dict[ModelKey, dict[str, Any]] = {}
        #: What a registry rebuilt from the touched names shows, as
        #: KubernetesRegistry._rebuild does it.
        self.table = RegistryTable()
        self.version = 0

    # The model

    def owner(self, namespaces: list[str]) -> str:
        """
        The namespace whose Service wins a conflict: the first in sort
        order.
        """
        return min(namespaces)

    def stamped(self, obj: dict[str, Any]) -> dict[str, Any]:
        """
        A copy of C{obj} with a new resourceVersion, as the API would give.
        """
        self.version += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.version)
        return obj

    def keptName(self, kind: str, obj: Mapping[str, Any]) -> str | None:
        meta = obj["metadata"]
        if kind == SERVICES:
            return KEPT.get(meta["name"])
        label = meta.get("labels", {}).get(SERVICE_NAME_LABEL)
        return None if label is None else KEPT.get(label)

    def kept(self, kind: str) -> dict[ObjectKey, dict[str, Any]]:
        return {
            (namespace, name): obj
            for (k, namespace, name), obj in self.cluster.items()
            if k == kind and self.keptName(kind, obj) is not None
        }

    def snapshot(self) -> dict[str, ServiceEntry | None]:
        return {name: self.state.entry(name) for name in REGISTRY_NAMES}

    def applied(
        self, touched: set[str], before: Mapping[str, ServiceEntry | None]
    ) -> None:
        """
        After a change: every entry that changed was reported as touched,
        and only kept names ever are; the mirror table follows.
        """
        after = self.snapshot()
        changed = {name for name in REGISTRY_NAMES if before[name] != after[name]}
        check(
            changed <= touched,
            f"entries changed but were not reported: {changed - touched}",
        )
        check(
            touched <= set(KEPT.values()),
            f"names that can never be routed to reported: {touched}",
        )
        self.table.update({name: self.state.entry(name) for name in touched})

    # Rules

    def _replace(
        self, kind: str, namespace: str | None, items: list[dict[str, Any]]
    ) -> None:
        fresh: dict[ModelKey, dict[str, Any]] = {}
        for item in items:
            obj = self.stamped(item)
            if namespace is not None:
                obj["metadata"]["namespace"] = namespace
            fresh[(kind, *_objectKey(obj))] = obj
        before = self.snapshot()
        touched = self.state.replace(
            kind, namespace, [copy.deepcopy(obj) for obj in fresh.values()]
        )
        for key in list(self.cluster):
            if key[0] == kind and namespace in (None, key[1]):
                del self.cluster[key]
        self.cluster.update(fresh)
        self.applied(touched, before)

    @rule(
        namespace=st.sampled_from((*NAMESPACES, None)),
        items=st.lists(services, max_size=4),
    )
    def replaceServices(
        self, namespace: str | None, items: list[dict[str, Any]]
    ) -> None:
        """
        A fresh list of Services, in one namespace or everywhere, replaces
        what was known of them there.
        """
        self._replace(SERVICES, namespace, items)

    @rule(
        namespace=st.sampled_from((*NAMESPACES, None)),
        items=st.lists(slices, max_size=4),
    )
    def replaceSlices(self, namespace: str | None, items: list[dict[str, Any]]) -> None:
        """
        A fresh list of EndpointSlices, in one namespace or everywhere.
        """
        self._replace(ENDPOINT_SLICES, namespace, items)

    def _event(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        obj = self.stamped(obj)
        before = self.snapshot()
        touched = self.state.event(kind, type_, copy.deepcopy(obj))
        key = (kind, *_objectKey(obj))
        if type_ == "DELETED":
            self.cluster.pop(key, None)
        else:
            self.cluster[key] = obj
        self.applied(touched, before)

    @rule(type_=eventTypes, obj=services)
    def serviceEvent(self, type_: str, obj: dict[str, Any]) -> None:
        """
        A watch event for a Service (which may or may not exist).
        """
        self._event(SERVICES, type_, obj)

    @rule(type_=eventTypes, obj=slices)
    def sliceEvent(self, type_: str, obj: dict[str, Any]) -> None:
        """
        A watch event for an EndpointSlice, whose label may move it from
        one Service to another.
        """
        self._event(ENDPOINT_SLICES, type_, obj)

    @precondition(lambda self: bool(self.kept(SERVICES)))
    @rule(
        data=st.data(),
        type_=st.sampled_from(("ADDED", "MODIFIED")),
        name=st.sampled_from(("s1", "s2", "s3")),
        endpoints=sliceEndpoints,
        number=st.sampled_from((8080, 8443)),
    )
    def sliceForKnownService(
        self,
        data: st.DataObject,
        type_: str,
        name: str,
        endpoints: list[dict[str, Any]],
        number: int,
    ) -> None:
        """
        A slice appears or changes for a Service the cluster holds, in its
        namespace, with ports named as the Service's.
        """
        namespace, kname = data.draw(st.sampled_from(sorted(self.kept(SERVICES))))
        service = self.cluster[(SERVICES, namespace, kname)]
        ports = [
            {**({"name": p["name"]} if "name" in p else {}), "port": number + i}
            for i, p in enumerate(service["spec"]["ports"])
        ]
        self._event(
            ENDPOINT_SLICES,
            type_,
            _slice(name, kname, namespace, endpoints, ports, "IPv4"),
        )

    @precondition(lambda self: bool(self.cluster))
    @rule(data=st.data())
    def deleteKnown(self, data: st.DataObject) -> None:
        """
        An object the cluster holds is deleted (its last state is sent).
        """
        key = data.draw(st.sampled_from(sorted(self.cluster)))
        self._event(key[0], "DELETED", self.cluster[key])

    # Invariants

    @invariant()
    def entriesFollowTheModel(self) -> None:
        """
        An entry exists exactly for a kept name some Service makes; it
        comes from the namespace first in sort order, with that Service's
        policy, and its endpoints are its slices' addresses there.
        """
        services_ = self.kept(SERVICES)
        slices_ = self.kept(ENDPOINT_SLICES)
        for name in REGISTRY_NAMES:
            entry = self.state.entry(name)
            owners = [
                namespace for (namespace, kname) in services_ if KEPT.get(kname) == name
            ]
            if not owners:
                check(entry is None, f"{name}: an entry with no Service: {entry}")
                continue
            check(entry is not None, f"{name}: no entry, Services in {owners}")
            assert entry is not None
            namespace = self.owner(owners)
            kname = next(k for k, n in KEPT.items() if n == name)
            service = services_[(namespace, kname)]
            check(
                entry.source["namespace"] == namespace,
                f"{name}: from {entry.source['namespace']}, not {namespace}"
                f" (candidates {sorted(owners)})",
            )
            check(
                entry.source["resourceVersion"]
                == service["metadata"]["resourceVersion"],
                f"{name}: from an old version of the Service",
            )
            check(
                entry.policy
                == policyFromAnnotations(service["metadata"]["annotations"])[0],
                f"{name}: the policy is not the Service's annotations'",
            )
            mine = [
                obj
                for (ns, _), obj in slices_.items()
                if ns == namespace
                and obj["metadata"]["labels"][SERVICE_NAME_LABEL] == kname
            ]
            expected = expectedEndpoints(service, mine)
            actual = {
                (e.host, e.port): (e.scheme, e.ready, e.serving)
                for e in entry.endpoints
            }
            check(
                actual == {where: v[:3] for where, v in expected.items()},
                f"{name}: endpoints {actual}, expected {expected}",
            )
            check(
                len(entry.endpoints) == len(actual)
                and [(e.host, e.port) for e in entry.endpoints] == sorted(actual),
                f"{name}: endpoints repeated or out of order: {entry.endpoints}",
            )
            usable = {(e.host, e.port) for e in eligible(entry.endpoints)}
            check(
                usable == expectedUsable(expected),
                f"{name}: traffic would go to {usable},"
                f" expected {expectedUsable(expected)}",
            )

    @invariant()
    def touchedNamesKeptTheTableCurrent(self) -> None:
        """
        A table rebuilt only for the touched names is the same as one built
        from scratch: no change was ever missed.
        """
        fresh = {
            name: entry
            for name in REGISTRY_NAMES
            if (entry := self.state.entry(name)) is not None
        }
        check(
            dict(self.table.services()) == fresh,
            "the table rebuilt from touched names is stale",
        )

    @invariant()
    def storesHoldTheKeptObjects(self) -> None:
        """
        The state holds exactly the kept objects, as last seen, in compact
        form.
        """
        for kind, store in (
            (SERVICES, self.state.services),
            (ENDPOINT_SLICES, self.state.slices),
        ):
            kept = {
                key: self.state.compact(kind, obj)
                for key, obj in self.kept(kind).items()
            }
            check(
                dict(store) == kept,
                f"{kind} stored {sorted(store)}, kept {sorted(kept)}",
            )

    @invariant()
    def indexesAreTidy(self) -> None:
        """
        The name index has only valid names for configured tiers, no empty
        sets, and no key of an object that is not stored; each stored
        record is indexed under its own registry name.
        """
        state = self.state
        stores: dict[str, Mapping[ObjectKey, ServiceRecord | SliceRecord]] = {
            SERVICES: state.services,
            ENDPOINT_SLICES: state.slices,
        }
        for name, kinds in state._index.items():
            check(name in KEPT.values(), f"unroutable name indexed: {name}")
            check(bool(kinds), f"{name}: an empty index entry")
            for kind, keys in kinds.items():
                check(bool(keys), f"{name}: an empty set of {kind}")
                for key in keys:
                    record = stores[kind].get(key)
                    check(record is not None, f"{name}: {kind} {key} not stored")
                    check(
                        record is None or record.registryName == name,
                        f"{kind} {key}: indexed under {name}, named otherwise",
                    )
        for kind, store in stores.items():
            for key, record in store.items():
                check(
                    key in state._index.get(record.registryName, {}).get(kind, set()),
                    f"{kind} {key}: stored, not indexed",
                )


class RegistryMachineTests(RegistryMachine.TestCase):  # type: ignore[misc,valid-type]
    """
    The registry machine, run by trial.
    """

    settings = MACHINE_SETTINGS

    def test_registry(self) -> None:
        """
        Whatever lists and events arrive, ClusterState's entries, touched
        names and indexes agree with the model of the cluster.
        """
        self.runTest()


# ---------------------------------------------------------------------------
# The upstream connection pool: FastUpstreamClient

MAX_PER_HOST = 2
POOL_IDLE = 4.0

#: The endpoints requests go to: two plain ones, and one https endpoint
#: reached with two different TLS settings, which must never share
#: connections.
TARGETS: dict[str, tuple[bytes, UpstreamTLS | None]] = {
    "a": (b"http://10.0.0.1:8080/a", None),
    "b": (b"http://10.0.0.2:8080/b", None),
    "tls1": (b"https://10.0.0.1:8443/t", UpstreamTLS(serverName="one.example")),
    "tls2": (b"https://10.0.0.1:8443/t", UpstreamTLS(serverName="two.example")),
}

KEYS: dict[str, Key] = {
    "a": (b"http", b"10.0.0.1", 8080, None),
    "b": (b"http", b"10.0.0.2", 8080, None),
    "tls1": (b"https", b"10.0.0.1", 8443, TARGETS["tls1"][1]),
    "tls2": (b"https", b"10.0.0.1", 8443, TARGETS["tls2"][1]),
}

#: Methods, and whether the request has a body.
METHODS: tuple[tuple[bytes, bool], ...] = (
    (b"GET", False),
    (b"HEAD", False),
    (b"POST", True),
    (b"PUT", True),
)

#: Endpoint names to send to, the first more often (so that its pool
#: fills up).
NAMES = ("a", "a", "a", "b", "tls1", "tls2")

#: How the upstream answers: keeping the connection, closing it, with
#: garbage, or not at all.
ANSWERS = (
    "keep-alive",
    "keep-alive",
    "keep-alive",
    "chunked",
    "close",
    "malformed",
    "none",
)

#: Time steps: exact in binary, so that "exactly the idle time" is exact.
STEPS = (0.25, 1.0, 3.75, 4.0, 4.5, 10.0)


class _PlainEndpoints(EndpointCache):
    """
    Plain TCP endpoints whatever the scheme: the pool's keys still differ by
    TLS settings, but no handshake is needed to drive the connections.
    """

    def get(
        self,
        scheme: bytes,
        host: bytes,
        port: int,
        timeout: float,
        tls: UpstreamTLS | None = None,
        alpn: tuple[bytes, ...] = (),
    ) -> IStreamClientEndpoint:
        return TCP4ClientEndpoint(
            self._reactor, host.decode("ascii"), port, timeout=timeout
        )


@implementer(IBodyProducer)
class _Payload:
    """
    A request body, written at once, that cannot be produced again (it has
    no C{replayable}): a request carrying it is never sent twice.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Body(Protocol):
    """
    Collects a response body and how it ended.
    """

    def __init__(self) -> None:
        self.data = b""
        self.reasons: list[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.reasons.append(reason)


class _Wire(StringTransport):
    """
    A connection's transport.  As a reactor's TCP transport does, an abort
    reports the loss later (at the next turn of the reactor, here when the
    machine says so); either end's close is reported once.
    """

    def __init__(self, pending: list[_Wire]) -> None:
        super().__init__(lenient=True)
        self._pending = pending
        self.owner: Protocol | None = None
        self.lost = False

    def abortConnection(self) -> None:
        if self.disconnected:
            return
        super().abortConnection()
        self._pending.append(self)

    def lose(self, reason: Failure) -> None:
        if self.lost:
            return
        self.lost = True
        self.disconnected = self.disconnecting = True
        assert self.owner is not None
        self.owner.connectionLost(reason)


@dataclass(eq=False)
class _Request:
    """
    One request and what the model expects of it: C{None} while pending,
    C{"ok"} or the failure it fails with.
    """

    number: int
    method: bytes
    key: Key
    body: bytes | None
    attempts: int = 1
    expected: str | type[Exception] | None = None
    outcomes: list[IResponse | Failure] = field(default_factory=list)
    bodies: list[_Body] = field(default_factory=list)

    @property
    def retryable(self) -> bool:
        return self.body is None and self.method in (b"GET", b"HEAD")


@dataclass(eq=False)
class _Upstream:
    """
    One connection as the fake upstream sees it, and the model's view of
    it.
    """

    number: int
    key: Key
    wire: _Wire
    wrapper: Protocol
    connection: _Connection
    reused: bool = False
    dead: bool = False
    busy: _Request | None = None
    idleSince: float | None = None
    read: int = 0

    def __repr__(self) -> str:
        return f"<upstream {self.number} {self.key[:3]!r}>"


class PoolMachine(RuleBasedStateMachine):
    """
    L{FastUpstreamClient} with C{maxPerHost=2} on a memory reactor, its
    real connections driven by a fake upstream that answers (keeping the
    connection or closing it), sends garbage, closes idle or just-reused
    connections, while time passes and the pool is closed; checked after
    every step against a model of which connection is idle, busy or gone.
    """

    #: The implementation under test (tests of the machine swap in broken
    #: ones).
    clientFactory: ClassVar[Callable[..., FastUpstreamClient]] = FastUpstreamClient

    def __init__(self) -> None:
        super().__init__()
        self.reactor = MemoryReactorClock()
        self.client = self.clientFactory(
            self.reactor, maxPerHost=MAX_PER_HOST, poolIdle=POOL_IDLE
        )
        self.client._endpoints = _PlainEndpoints(self.reactor)
        self.losses: list[_Wire] = []
        self.upstreams: list[_Upstream] = []
        self.requests: list[_Request] = []
        #: The model's idle lists, in the pool's order (the last is reused
        #: first).
        self.idle: dict[Key, list[_Upstream]] = {key: [] for key in KEYS.values()}
        self.connected = 0

    # Plumbing

    def turn(self) -> None:
        """
        The reactor's next turn: aborted connections are reported lost.
        """
        while self.losses:
            self.losses.pop(0).lose(Failure(ConnectionAborted()))

    def accept(self) -> list[_Upstream]:
        """
        Complete every pending connection attempt.
        """
        new = []
        while self.connected < len(self.reactor.tcpClients):
            host, port, factory, _, _ = self.reactor.tcpClients[self.connected]
            self.connected += 1
            wrapper: Any = factory.buildProtocol(IPv4Address("TCP", host, port))
            assert wrapper is not None
            wire = _Wire(self.losses)
            wire.owner = wrapper
            connection = wrapper._wrappedProtocol
            check(isinstance(connection, _Connection), f"not a connection: {wrapper}")
            key = connection.key
            check(
                (host, port) == (key[1].decode("ascii"), key[2]),
                f"connected to {host}:{port} for {key}",
            )
            upstream = _Upstream(len(self.upstreams), key, wire, wrapper, connection)
            self.upstreams.append(upstream)
            new.append(upstream)
            wrapper.makeConnection(wire)
        return new

    def carries(self, upstream: _Upstream, request: _Request) -> None:
        """
        C{request} was just written on C{upstream}, and nothing else.
        """
        written = upstream.wire.value()[upstream.read :]
        upstream.read += len(written)
        check(
            written.startswith(request.method + b" ")
            and written.count(b"\r\nX-Req: ") == 1
            and b"\r\nX-Req: %d\r\n" % (request.number,) in written,
            f"request {request.number} not on {upstream}: {written!r}",
        )
        if request.body is not None:
            check(written.endswith(request.body), f"no body on {upstream}")
        check(upstream.key == request.key, f"{upstream} used for {request.key}")
        check(upstream.busy is None, f"{upstream} carries two requests")
        upstream.busy = request

    def issue(self, name: str, method: bytes, hasBody: bool) -> _Request:
        """
        Send a request; the model says which connection it goes out on.
        """
        url, tls = TARGETS[name]
        number = len(self.requests)
        request = _Request(
            number,
            method,
            KEYS[name],
            b"payload %d" % (number,) if hasBody else None,
        )
        self.requests.append(request)
        idle = self.idle[request.key]
        reusing = idle.pop() if idle else None
        body = None if request.body is None else _Payload(request.body)
        d = self.client.request(
            method,
            url,
            Headers({b"x-req": [b"%d" % (number,)]}),
            body,
            5.0,
            tls,
        )

        def arrived(response: IResponse) -> None:
            request.outcomes.append(response)
            reader = _Body()
            request.bodies.append(reader)
            response.deliverBody(reader)

        def failed(reason: Failure) -> None:
            request.outcomes.append(reason)

        d.addCallbacks(arrived, failed)
        new = self.accept()
        if reusing is not None:
            check(new == [], f"a new connection though {reusing} was idle")
            reusing.reused = True
            reusing.idleSince = None
            self.carries(reusing, request)
        else:
            check(len(new) == 1, f"{len(new)} connections opened for one request")
            self.carries(new[0], request)
        return request

    def finished(self, upstream: _Upstream, kept: bool) -> None:
        """
        C{upstream}'s exchange is over: pooled if C{kept} and there is
        room, else closed.
        """
        upstream.busy = None
        idle = self.idle[upstream.key]
        if kept and len(idle) < MAX_PER_HOST:
            idle.append(upstream)
            upstream.idleSince = self.reactor.seconds()
        else:
            upstream.dead = True

    def closedIdle(self, upstream: _Upstream) -> None:
        self.idle[upstream.key].remove(upstream)
        upstream.idleSince = None
        upstream.dead = True

    def pick(self, data: st.DataObject, among: list[_Upstream]) -> _Upstream:
        """
        One of C{among}, drawn by number (for a readable failing example).
        """
        number = data.draw(st.sampled_from([u.number for u in among]))
        return self.upstreams[number]

    def busy(self) -> list[_Upstream]:
        return [u for u in self.upstreams if u.busy is not None]

    def anyIdle(self) -> list[_Upstream]:
        return [u for idle in self.idle.values() for u in idle]

    # Rules

    @rule(name=st.sampled_from(NAMES), method=st.sampled_from(METHODS))
    def request(self, name: str, method: tuple[bytes, bool]) -> None:
        """
        A request goes out: on the most recently pooled idle connection for
        its endpoint and TLS settings, else on a new one.
        """
        self.issue(name, *method)
        self.turn()

    @rule(
        name=st.sampled_from(NAMES),
        method=st.sampled_from(METHODS),
        count=st.integers(2, 4),
    )
    def burst(self, name: str, method: tuple[bytes, bool], count: int) -> None:
        """
        Several requests to one endpoint at once: all but one (at most)
        need connections of their own.
        """
        for _ in range(count):
            self.issue(name, *method)
        self.turn()

    @precondition(lambda self: bool(self.busy()))
    @rule(data=st.data(), kind=st.sampled_from(ANSWERS))
    def answer(self, data: st.DataObject, kind: str) -> None:
        """
        The upstream answers a request, naming it in a header and the body:
        keeping the connection (pooled after, if there is room), closing
        it, or with a response llhttp refuses (the request fails); or it
        closes the connection with no answer at all (see L{drop}).
        """
        self.respond(self.pick(data, self.busy()), kind)

    def respond(self, upstream: _Upstream, kind: str) -> None:
        """
        The upstream answers C{upstream}'s request (see L{answer}).
        """
        request = upstream.busy
        assert request is not None
        if kind == "none":
            self.drop(upstream)
            return
        tag = b"%d" % (request.number,)
        payload = b"" if request.method == b"HEAD" else b"answer " + tag
        if kind == "malformed":
            response = (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
            )
        elif kind == "chunked":
            response = b"HTTP/1.1 200 OK\r\nX-Answer: " + tag
            response += b"\r\nTransfer-Encoding: chunked\r\n\r\n"
            if request.method != b"HEAD":
                response += b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)
        else:
            response = b"HTTP/1.1 200 OK\r\nX-Answer: " + tag
            if kind == "close":
                response += b"\r\nConnection: close"
            response += b"\r\nContent-Length: %d\r\n\r\n" % (len(b"answer " + tag),)
            response += payload
        upstream.wrapper.dataReceived(response)
        if kind == "close":
            upstream.wire.lose(Failure(ConnectionDone()))
        if kind == "malformed":
            request.expected = ResponseFailed
        else:
            request.expected = "ok"
        self.finished(upstream, kind in ("keep-alive", "chunked"))
        self.turn()

    @precondition(lambda self: len(self.busy()) > 1)
    @rule(data=st.data())
    def answerAll(self, data: st.DataObject) -> None:
        """
        The upstream answers every pending request, keeping the
        connections, in any order: the pools fill up to maxPerHost and the
        connections beyond are closed.
        """
        numbers = data.draw(st.permutations([u.number for u in self.busy()]))
        for number in numbers:
            self.respond(self.upstreams[number], "keep-alive")

    def drop(self, upstream: _Upstream) -> None:
        """
        The upstream closes C{upstream} before any byte of its response: a
        reused connection's bodiless GET or HEAD is sent again, once, on a
        new connection; any other request fails.
        """
        request = upstream.busy
        assert request is not None
        upstream.busy = None
        upstream.dead = True
        upstream.wire.lose(Failure(ConnectionDone()))
        new = self.accept()
        if upstream.reused and request.retryable:
            # The stale case: sent again, once, on a new connection.
            check(request.attempts == 1, f"request {request.number} retried twice")
            check(len(new) == 1, f"stale request retried on {len(new)} connections")
            request.attempts += 1
            self.carries(new[0], request)
        else:
            check(new == [], f"request {request.number} retried though unsafe")
            request.expected = (
                StaleConnection if upstream.reused else ResponseNeverReceived
            )
        self.turn()

    @precondition(lambda self: bool(self.anyIdle()))
    @rule(data=st.data(), method=st.sampled_from(METHODS))
    def staleReuse(self, data: st.DataObject, method: tuple[bytes, bool]) -> None:
        """
        The upstream closes a pooled connection just as it is reused: the
        request is written and the connection drops with no response.
        """
        name = data.draw(st.sampled_from([n for n, k in KEYS.items() if self.idle[k]]))
        upstream = self.idle[KEYS[name]][-1]
        request = self.issue(name, *method)
        check(upstream.busy is request, f"request {request.number} not reused")
        self.drop(upstream)

    @precondition(lambda self: bool(self.anyIdle()))
    @rule(data=st.data())
    def closeIdle(self, data: st.DataObject) -> None:
        """
        The upstream closes an idle pooled connection: it leaves the pool.
        """
        upstream = self.pick(data, self.anyIdle())
        self.closedIdle(upstream)
        upstream.wire.lose(Failure(ConnectionDone()))
        self.turn()

    @precondition(lambda self: bool(self.anyIdle()))
    @rule(data=st.data())
    def garbageOnIdle(self, data: st.DataObject) -> None:
        """
        The upstream sends bytes on an idle connection nothing asked for:
        the connection cannot be trusted and is dropped.
        """
        upstream = self.pick(data, self.anyIdle())
        self.closedIdle(upstream)
        upstream.wrapper.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.turn()

    @rule(seconds=st.sampled_from(STEPS))
    def wait(self, seconds: float) -> None:
        """
        Time passes: connections idle for the pool's idle time are closed.
        """
        self.reactor.advance(seconds)
        now = self.reactor.seconds()
        for upstream in self.anyIdle():
            assert upstream.idleSince is not None
            if upstream.idleSince + POOL_IDLE <= now:
                self.closedIdle(upstream)
        self.turn()

    @precondition(lambda self: bool(self.anyIdle()))
    @rule()
    def close(self) -> None:
        """
        The pool is closed: every idle connection is closed; busy ones
        finish their exchange.
        """
        self.client.close()
        for upstream in self.anyIdle():
            self.closedIdle(upstream)
        self.turn()

    # Invariants

    @invariant()
    def poolMatchesTheModel(self) -> None:
        """
        Each endpoint's idle list is the model's: at most maxPerHost
        connections, every one alive and of that endpoint and settings,
        none busy, none twice.
        """
        seen: set[int] = set()
        for key, expected in self.idle.items():
            actual = self.client._idle.get(key, [])
            check(
                len(actual) <= MAX_PER_HOST,
                f"{len(actual)} idle connections for {key}",
            )
            check(
                [id(c) for c in actual] == [id(u.connection) for u in expected],
                f"idle for {key[:3]!r}: {actual}, expected {expected}",
            )
            for upstream in expected:
                connection = upstream.connection
                check(id(connection) not in seen, f"{upstream} pooled twice")
                seen.add(id(connection))
                check(connection.key == key, f"{upstream} pooled under {key}")
                check(
                    connection.transport is upstream.wire
                    and not upstream.wire.disconnecting,
                    f"idle {upstream} has no live transport",
                )
                check(
                    upstream.busy is None and connection._result is None,
                    f"{upstream} is both idle and busy",
                )
        unknown = set(self.client._idle) - set(self.idle)
        check(
            not any(self.client._idle[key] for key in unknown),
            f"connections pooled under unknown keys {unknown}",
        )

    @invariant()
    def oneTimerForTheOldestIdle(self) -> None:
        """
        While any connection is idle, exactly one timer is pending: the
        pool's sweep, due no later than when the oldest idle connection
        will have been idle for the pool's idle time.  Nothing is pending
        once no connection is idle and the sweep has run (nor after
        close()).
        """
        pending = [call for call in self.reactor.getDelayedCalls() if call.active()]
        idle = self.anyIdle()
        check(len(pending) <= 1, f"{len(pending)} timers pending")
        if not idle:
            check(
                not pending or pending[0] is self.client._sweep,
                "a timer other than the sweep is pending with nothing idle",
            )
            return
        check(
            len(pending) == 1 and pending[0] is self.client._sweep,
            f"{len(pending)} timers pending for {len(idle)} idle connections",
        )
        oldest = min(u.idleSince for u in idle if u.idleSince is not None)
        for upstream in idle:
            check(
                upstream.connection.idleSince == upstream.idleSince,
                f"{upstream} idle since {upstream.connection.idleSince}",
            )
        check(
            pending[0].getTime() <= oldest + POOL_IDLE,
            f"the sweep is due at {pending[0].getTime()}, after {oldest + POOL_IDLE}",
        )

    @invariant()
    def connectionsAliveAsModelled(self) -> None:
        """
        A connection is closed exactly when the model says it should be.
        """
        for upstream in self.upstreams:
            check(
                upstream.wire.lost == upstream.dead,
                f"{upstream} lost={upstream.wire.lost}, expected {upstream.dead}",
            )
            if not upstream.dead:
                check(
                    upstream.connection.transport is upstream.wire,
                    f"{upstream} lost its transport",
                )

    @invariant()
    def everyRequestAnsweredOnceAndRightly(self) -> None:
        """
        Every request's result fires at most once, only when it should,
        with the response meant for it (its own number, its whole body).
        """
        for request in self.requests:
            outcomes = request.outcomes
            check(len(outcomes) <= 1, f"request {request.number} fired twice")
            if request.expected is None:
                check(
                    outcomes == [],
                    f"request {request.number} fired early: {outcomes}",
                )
                continue
            check(len(outcomes) == 1, f"request {request.number} never fired")
            outcome = outcomes[0]
            if request.expected == "ok":
                check(
                    not isinstance(outcome, Failure),
                    f"request {request.number} failed: {outcome}",
                )
                assert not isinstance(outcome, Failure)
                tag = b"%d" % (request.number,)
                check(
                    outcome.headers.getRawHeaders(b"x-answer") == [tag],
                    f"request {request.number} got the answer to"
                    f" {outcome.headers.getRawHeaders(b'x-answer')}",
                )
                body = request.bodies[0]
                wanted = b"" if request.method == b"HEAD" else b"answer " + tag
                check(
                    body.data == wanted,
                    f"request {request.number}: body {body.data!r}",
                )
                check(
                    len(body.reasons) == 1
                    and body.reasons[0].check(ResponseDone) is not None,
                    f"request {request.number}: body ended {body.reasons}",
                )
            else:
                assert not isinstance(request.expected, str)
                check(
                    isinstance(outcome, Failure)
                    and outcome.check(request.expected) is not None,
                    f"request {request.number}: {outcome},"
                    f" expected {request.expected.__name__}",
                )


class PoolMachineTests(PoolMachine.TestCase):  # type: ignore[misc,valid-type]
    """
    The pool machine, run by trial.
    """

    settings = MACHINE_SETTINGS

    def test_pool(self) -> None:
        """
        Whatever the upstream does and however time passes, the pool holds
        at most maxPerHost live connections per endpoint, each with one
        idle timer, never a busy one, never across endpoints; every request
        gets its own answer once; stale reuse is retried only when safe.
        """
        self.runTest()
