"""
The Kubernetes registry: v1 Services and discovery.k8s.io/v1 EndpointSlices,
listed, then watched, and turned into registry entries.

    Service service-api-foo (namespace shop)   ->  service.api.foo
    EndpointSlices labelled kubernetes.io/service-name=service-api-foo
                                                ->  its endpoints

Only Services named by the convention for a configured tier are kept (and
only their slices), so memory follows the exposed services, not the
cluster.  Three parts:

  - L{ClusterState} turns objects into registry entries, and is pure;
  - L{_Watcher} keeps one kind (in one namespace, or all) in step with
    the API: list, watch, relist on 410 Gone, back off on failures;
  - L{KubernetesRegistry} runs the watchers, applies what they hear, and
    says when the first full sync is done.

They talk to the API only through L{IKubernetesAPI}, and time everything on
an injected clock: all of it runs on the reactor thread, and the proxy only
ever reads the table, so the data path never waits on the API.  The real
API is L{monedge.registry.kubeclient.KubernetesClientAPI} (the official
client, in threads), which the composition root builds
(L{monedge.runtime.compose}); tests use
L{monedge.testing.kubernetes.MemoryKubernetes}.  This module never imports
the official client.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from sys import intern
from typing import Any, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from monedge.interfaces import IKubernetesAPI, IServiceRegistry
from monedge.registry import Endpoint, RegistryTable, ServiceEntry, TableRegistry
from monedge.registry.kubeapi import (
    ADDED,
    DELETED,
    ENDPOINT_SLICES,
    MODIFIED,
    SERVICES,
    KubernetesAPIError,
    ObjectList,
    ResourceExpired,
    ServiceRecord,
    SliceRecord,
    Tombstone,
    WatchEvent,
    tombstoneOf,
)
from monedge.rules.convention import parseServiceName, serviceFromKubernetesName
from monedge.rules.policy import (
    DEFAULT_POLICY,
    POLICY_KEYS,
    HookSpec,
    Policy,
    PolicyError,
    parsePolicy,
)

__all__ = [
    "ANNOTATION_PREFIX",
    "COALESCE_WINDOW",
    "ENDPOINT_SLICES",
    "INVALID_HOOKS",
    "RELIST_BATCH",
    "SERVICES",
    "SERVICE_NAME_LABEL",
    "ClusterState",
    "KubernetesRegistry",
    "ObjectKey",
    "compactService",
    "compactSlice",
    "diffRecords",
    "endpointsFor",
    "policyFromAnnotations",
]

#: Annotation prefix for per-service policy: C{monedge.io/timeout: 30s}.
ANNOTATION_PREFIX = "monedge.io/"

#: The hook name an invalid monedge.io/hooks annotation is replaced by: no
#: such hook exists, so the service answers 503 rather than skip its hooks.
INVALID_HOOKS = "invalid-monedge.io/hooks-annotation"

#: The label an EndpointSlice names its Service with.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

#: Seconds watch events are coalesced for before the table is updated (see
#: L{KubernetesRegistry}): the most a change waits to be routed.
COALESCE_WINDOW = 0.02

#: Objects a list applies per reactor turn (see L{KubernetesRegistry}).
RELIST_BATCH = 200

T = TypeVar("T")

ObjectKey = tuple[str, str]


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


#: A record as the state keeps it.
Record = ServiceRecord | SliceRecord

#: One change a relist makes: an object's key, and its new record (L{None}:
#: it is gone).
Change = tuple[ObjectKey, Record | None]


def policyFromAnnotations(
    annotations: Mapping[str, str] | Iterable[tuple[str, str]] | None,
    base: Policy = DEFAULT_POLICY,
) -> tuple[Policy, list[str]]:
    """
    The policy a Service's C{monedge.io/<key>} annotations give (on top of
    C{base}), and a message for each annotation that is invalid.  Each invalid annotation
    falls back to its default and the valid ones still apply, except an
    invalid C{monedge.io/hooks}, which fails closed (see L{INVALID_HOOKS}).
    """
    values: dict[str, str] = {}
    problems: list[str] = []
    hooksInvalid = False
    pairs = annotations.items() if isinstance(annotations, Mapping) else annotations
    for name, value in pairs or ():
        if not name.startswith(ANNOTATION_PREFIX):
            continue
        key = name[len(ANNOTATION_PREFIX) :]
        if key not in POLICY_KEYS:
            problems.append(f"{name}: unknown monedge annotation")
            continue
        try:
            parsePolicy({key: value})
        except PolicyError as e:
            problems.append(f"{name}: {str(e).split(': ', 1)[1]}")
            hooksInvalid = hooksInvalid or key == "hooks"
            continue
        values[key] = value
    policy = parsePolicy(values, base)
    if hooksInvalid:
        # Hooks may be security (auth): an unreadable setting fails closed.
        # This hook name is never registered, so the service answers 503
        # hook_config_invalid until the annotation is fixed.
        policy = replace(policy, hooks=(HookSpec(INVALID_HOOKS, "{}"),))
    return policy, problems


def _conditions(endpoint: Mapping[str, Any]) -> tuple[bool, bool, bool]:
    """
    (ready, serving, terminating), read as the EndpointSlice API says: an
    unknown C{ready} is ready, an unknown C{serving} is C{ready}.
    """
    conditions = endpoint.get("conditions") or {}
    ready = conditions.get("ready") is not False
    serving = conditions.get("serving")
    terminating = conditions.get("terminating") is True
    return ready, (ready if serving is None else bool(serving)), terminating


def compactService(obj: Mapping[str, Any], registryName: str) -> ServiceRecord:
    """
    The L{ServiceRecord} of a raw Service: what routing and C{/routes}
    need, nothing else (repeated short strings interned).
    """
    meta = _meta(obj)
    annotations = meta.get("annotations") or {}
    ports = []
    for port in (obj.get("spec") or {}).get("ports") or []:
        number = port.get("port")
        ports.append(
            (
                intern(str(port.get("name") or "")),
                number if isinstance(number, int) else 0,
                intern(str(port.get("appProtocol") or "")),
            )
        )
    return ServiceRecord(
        namespace=intern(str(meta.get("namespace", ""))),
        name=str(meta.get("name", "")),
        resourceVersion=str(meta.get("resourceVersion") or ""),
        registryName=registryName,
        annotations=tuple(
            sorted(
                (intern(str(k)), str(v))
                for k, v in annotations.items()
                if str(k).startswith(ANNOTATION_PREFIX)
            )
        ),
        ports=tuple(ports),
    )


def compactSlice(obj: Mapping[str, Any], registryName: str) -> SliceRecord:
    """
    The L{SliceRecord} of a raw EndpointSlice (see L{compactService}).
    """
    meta = _meta(obj)
    ports = []
    for port in obj.get("ports") or []:
        number = port.get("port")
        if isinstance(number, int):
            ports.append((intern(str(port.get("name") or "")), number))
    endpoints = []
    for item in obj.get("endpoints") or []:
        addresses = item.get("addresses") or []
        if addresses:
            endpoints.append((str(addresses[0]), *_conditions(item)))
    return SliceRecord(
        namespace=intern(str(meta.get("namespace", ""))),
        name=str(meta.get("name", "")),
        resourceVersion=str(meta.get("resourceVersion") or ""),
        registryName=registryName,
        serviceName=str((meta.get("labels") or {}).get(SERVICE_NAME_LABEL, "")),
        addressType=intern(str(obj.get("addressType") or "")),
        ports=tuple(ports),
        endpoints=tuple(endpoints),
    )


#: A Service port's C{appProtocol} -> the upstream protocol it means.
APP_PROTOCOLS = {"kubernetes.io/h2c": "h2c", "h2c": "h2c", "h2": "h2"}


def basePolicy(service: ServiceRecord) -> Policy:
    """
    The policy a Service's port gives before its annotations: C{protocol}
    from the port's C{appProtocol} (L{APP_PROTOCOLS}).
    """
    port = _chosenPort(service)
    protocol = APP_PROTOCOLS.get(port[2] if port is not None else "")
    if protocol is None:
        return DEFAULT_POLICY
    return replace(DEFAULT_POLICY, protocol=protocol)


def _servicePort(service: ServiceRecord) -> tuple[str, str] | None:
    """
    The name of the port traffic goes to, and its scheme: the port named
    C{http}, else the one named C{https}, else the only one (C{""} if it
    has no name); L{None} if there is no such port. The scheme is C{https}
    for a port named C{https} or whose C{appProtocol} is C{https}.
    """
    chosen = _chosenPort(service)
    if chosen is None:
        return None
    name, _, appProtocol = chosen
    secure = name == "https" or appProtocol == "https"
    return name, "https" if secure else "http"


def _chosenPort(service: ServiceRecord) -> tuple[str, int, str] | None:
    """
    The Service port traffic goes to (see L{_servicePort}).
    """
    for wanted in ("http", "https"):
        for port in service.ports:
            if port[0] == wanted:
                return port
    if len(service.ports) != 1:
        return None
    return service.ports[0]


def endpointsFor(
    service: ServiceRecord, slices: Iterable[SliceRecord]
) -> tuple[Endpoint, ...]:
    """
    The endpoints of C{service} from its EndpointSlices: the Service port
    (see L{_servicePort}) resolved to each slice's port of that name,
    one address per endpoint, with its conditions.
    """
    chosen = _servicePort(service)
    if chosen is None:
        return ()
    portName, scheme = chosen
    found: dict[tuple[str, int], Endpoint] = {}
    for slice_ in slices:
        if slice_.addressType not in ("IPv4", "IPv6"):
            continue
        port = None
        for name, number in slice_.ports:
            if name == portName:
                port = number
        if port is None:
            continue
        for host, ready, serving, terminating in slice_.endpoints:
            endpoint = Endpoint(
                host=host,
                port=port,
                scheme=scheme,
                ready=ready,
                serving=serving,
                terminating=terminating,
            )
            known = found.get((host, port))
            # The same address in two slices (as a slice is replaced): keep
            # the more usable view of it.
            if known is None or (ready, serving) > (known.ready, known.serving):
                found[(host, port)] = endpoint
    return tuple(found[k] for k in sorted(found))


def diffRecords(
    known: Mapping[ObjectKey, Record], items: Iterable[Record]
) -> list[list[Change]]:
    """
    The changes that turn C{known} into C{items} (a full list of the same
    scope), grouped by registry name, so that applying one group at a time
    never shows a name half changed; unchanged records make no change.
    Pure, and reads only its arguments: it runs off the reactor.
    """
    groups: dict[str, list[Change]] = {}
    seen: set[ObjectKey] = set()
    for record in items:
        key = (record.namespace, record.name)
        seen.add(key)
        if known.get(key) != record:
            groups.setdefault(record.registryName, []).append((key, record))
    for key, record in known.items():
        if key not in seen:
            groups.setdefault(record.registryName, []).append((key, None))
    return list(groups.values())


@dataclass
class ClusterState:
    """
    The Services and EndpointSlices monedge keeps, in compact form
    (L{ServiceRecord}, L{SliceRecord}), and the registry entries they make.
    Pure: fed lists and watch events, it says which entries changed.

    Raw API objects given to it are compacted first (and dropped if they
    are not kept); the registry asks the API to compact them where they
    are decoded, with L{compact}.

    @ivar tiers: the tiers some host serves; other Services are ignored.
    """

    tiers: frozenset[str]
    services: dict[ObjectKey, ServiceRecord] = field(default_factory=dict)
    slices: dict[ObjectKey, SliceRecord] = field(default_factory=dict)
    invalidAnnotations: int = 0
    _problems: dict[ObjectKey, tuple[str, list[str]]] = field(default_factory=dict)
    #: registry name -> kind -> keys.
    _index: dict[str, dict[str, set[ObjectKey]]] = field(default_factory=dict)
    _log = Logger()

    def registryName(self, kind: str, obj: Mapping[str, Any]) -> str | None:
        """
        The registry name a raw object belongs to, or L{None} if it is not
        kept.
        """
        meta = _meta(obj)
        if kind == SERVICES:
            kname = meta.get("name")
        else:
            kname = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if not isinstance(kname, str):
            return None
        name = serviceFromKubernetesName(kname)
        if name is None:
            return None
        parsed = parseServiceName(name)
        if parsed is None or parsed[0] not in self.tiers:
            return None
        return name

    def compact(self, kind: str, obj: Mapping[str, Any]) -> Record | None:
        """
        The L{Compactor} of this state: a raw object's record, or L{None}
        if it is not kept.  Reads only C{tiers}, so any thread may call it.
        """
        name = self.registryName(kind, obj)
        if name is None:
            return None
        if kind == SERVICES:
            return compactService(obj, name)
        return compactSlice(obj, name)

    def _compacted(self, kind: str, obj: Any) -> Record | Tombstone:
        if isinstance(obj, dict):
            return self.compact(kind, obj) or tombstoneOf(obj)
        assert isinstance(obj, (ServiceRecord, SliceRecord, Tombstone))
        return obj

    def _store(self, kind: str) -> dict[ObjectKey, Any]:
        return self.services if kind == SERVICES else self.slices

    def _put(self, kind: str, key: ObjectKey, record: Record) -> None:
        self._drop(kind, key)
        self._store(kind)[key] = record
        self._index.setdefault(record.registryName, {}).setdefault(kind, set()).add(key)

    def _drop(self, kind: str, key: ObjectKey) -> str | None:
        record = self._store(kind).pop(key, None)
        if record is None:
            return None
        name: str = record.registryName
        keys = self._index[name][kind]
        keys.discard(key)
        if not keys:
            del self._index[name][kind]
            if not self._index[name]:
                del self._index[name]
        if kind == SERVICES:
            self._problems.pop(key, None)
        return name

    def snapshot(self, kind: str, namespace: str | None) -> dict[ObjectKey, Record]:
        """
        The records of C{kind} kept (in C{namespace}, or everywhere): a copy
        another thread may read.
        """
        store = self._store(kind)
        if namespace is None:
            return dict(store)
        return {key: r for key, r in store.items() if key[0] == namespace}

    def diff(
        self, kind: str, known: Mapping[ObjectKey, Record], items: Iterable[Any]
    ) -> list[list[Change]]:
        """
        L{diffRecords} of a list of C{kind} against C{known} (its
        L{snapshot}), raw objects among C{items} compacted first.  Reads
        only its arguments and C{tiers}: it runs off the reactor.
        """
        records = []
        for item in items:
            record = self._compacted(kind, item)
            if not isinstance(record, Tombstone):
                records.append(record)
        return diffRecords(known, records)

    def apply(self, kind: str, changes: Iterable[Change]) -> set[str]:
        """
        Apply changes from L{diff}; return the registry names they may
        change.
        """
        touched = set()
        for key, record in changes:
            previous = self._drop(kind, key)
            if previous is not None:
                touched.add(previous)
            if record is not None:
                self._put(kind, key, record)
                touched.add(record.registryName)
        return touched

    def replace(
        self, kind: str, namespace: str | None, items: Iterable[Any]
    ) -> set[str]:
        """
        A fresh list of C{kind} (in C{namespace}, or everywhere): replace
        what was known, at once.  Returns the registry names that may have
        changed.
        """
        touched: set[str] = set()
        for group in self.diff(kind, self.snapshot(kind, namespace), items):
            touched |= self.apply(kind, group)
        return touched

    def event(self, kind: str, type_: str, obj: Any) -> set[str]:
        """
        Apply one watch event (its object raw, a record, or a
        L{Tombstone}); return the registry names it may change.
        """
        record = self._compacted(kind, obj)
        key = (record.namespace, record.name)
        if type_ == DELETED or isinstance(record, Tombstone):
            return self.apply(kind, [(key, None)])
        return self.apply(kind, [(key, record)])

    def entry(self, name: str) -> ServiceEntry | None:
        """
        The registry entry for C{name}, or L{None} if no Service makes it.

        Two namespaces with a Service of the same name make the same
        registry name: the namespace first in sort order wins, and the
        conflict is logged.
        """
        index = self._index.get(name, {})
        owners = sorted(index.get(SERVICES, ()))
        if not owners:
            return None
        if len(owners) > 1:
            self._log.warn(
                "{name} is defined in several namespaces {namespaces}; using {used}",
                name=name,
                namespaces=[ns for ns, _ in owners],
                used=owners[0][0],
            )
        namespace = owners[0][0]
        service = self.services[owners[0]]
        slices = [
            self.slices[key]
            for key in index.get(ENDPOINT_SLICES, ())
            if key[0] == namespace
        ]
        policy, problems = policyFromAnnotations(
            service.annotations, basePolicy(service)
        )
        self._noteProblems(owners[0], service.resourceVersion, problems)
        return ServiceEntry(
            name=name,
            endpoints=endpointsFor(service, slices),
            policy=policy,
            source={
                "kind": "kubernetes",
                "namespace": namespace,
                "name": owners[0][1],
                "resourceVersion": service.resourceVersion or None,
                "annotation_errors": problems,
            },
        )

    def _noteProblems(
        self, key: ObjectKey, resourceVersion: str, problems: list[str]
    ) -> None:
        """
        Log and count invalid annotations once per Service version, not at
        every rebuild.
        """
        if not problems:
            self._problems.pop(key, None)
            return
        if self._problems.get(key, ("", []))[0] == resourceVersion:
            return
        self._problems[key] = (resourceVersion, problems)
        for problem in problems:
            self.invalidAnnotations += 1
            self._log.error(
                "Service {namespace}/{name}: invalid annotation, default used: {problem}",
                namespace=key[0],
                name=key[1],
                problem=problem,
            )


class _Watcher:
    """
    Keeps one kind of object in one namespace (or all) in step: list, then
    watch from the list's resourceVersion; watch again from the last
    version seen when the server ends a watch; relist on 410 Gone; after
    any other failure, try again (the list, if none has succeeded since the
    last relist, else the watch) after a jittered, capped exponential
    back-off on the registry's clock.

    Everything happens on the reactor thread: the API answers through
    L{Deferred}s and calls L{_received} with each event.
    """

    _log = Logger()

    def __init__(
        self,
        registry: KubernetesRegistry,
        kind: str,
        namespace: str | None,
    ) -> None:
        self.registry = registry
        self.kind = kind
        self.namespace = namespace
        self.resourceVersion: str | None = None
        self.synced = False
        self.relists = 0
        self.failures = 0
        self.lastError: str | None = None
        self._running = False
        self._needList = True
        self._attempt = 0
        self._pending: Deferred[Any] | None = None
        self._retry: IDelayedCall | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "namespace": self.namespace or "*",
            "synced": self.synced,
            "resource_version": self.resourceVersion,
            "relists": self.relists,
            "failures": self.failures,
            "last_error": self.lastError,
        }

    def start(self) -> None:
        """
        List, then watch, until stopped.
        """
        self._running = True
        self._next()

    def stop(self) -> None:
        """
        Cancel the list or watch under way, and any retry.
        """
        self._running = False
        retry, self._retry = self._retry, None
        if retry is not None and retry.active():
            retry.cancel()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    def _next(self) -> None:
        """
        List if need be, else watch from the last version seen.
        """
        self._retry = None
        if not self._running:
            return
        registry = self.registry
        api = registry.api
        selector = registry.selector if self.kind == SERVICES else None
        d: Deferred[Any]
        # The API may answer before it returns: each callback that runs
        # then sets _pending to the next call, so this one is set first.
        if self._needList:
            d = self._pending = api.listObjects(
                self.kind, self.namespace, selector, registry.state.compact
            )
            d.addCallbacks(self._listed, self._failed)
        else:
            assert self.resourceVersion is not None
            d = self._pending = api.watchObjects(
                self.kind,
                self.namespace,
                self.resourceVersion,
                self._received,
                selector,
                registry.state.compact,
            )
            d.addCallbacks(self._watchEnded, self._failed)
        d.addErrback(self._crashed)

    def _listed(self, listed: ObjectList) -> None:
        """
        A full list arrived: the registry applies it (maybe over several
        reactor turns); watch once it has.
        """
        self.resourceVersion = listed.resourceVersion
        d = self._pending = self.registry.listed(
            self, listed.items, listed.resourceVersion
        )
        d.addCallbacks(self._applied, self._applyFailed)
        d.addErrback(self._crashed)

    def _applied(self, _: None) -> None:
        self._pending = None
        self._needList = False
        self._next()

    def _applyFailed(self, failure: Failure) -> None:
        if self._running and not failure.check(CancelledError):
            self._log.failure(
                "applying a list of {kind} failed", failure, kind=self.kind
            )
        self._failed(failure)

    def _received(self, event: WatchEvent) -> None:
        """
        One watch event: a change, or a bookmark.
        """
        if not self._running:
            return
        version = event.resourceVersion
        if version:
            self.resourceVersion = version
        if event.type in (ADDED, MODIFIED, DELETED):
            self.registry.changed(self, event.type, event.object)
        else:
            self.registry.heardFrom(self)

    def _watchEnded(self, _: None) -> None:
        """
        The server ended the watch (its timeout): all is well.
        """
        self._pending = None
        self._attempt = 0
        self.registry.heardFrom(self)
        self._next()

    def _failed(self, failure: Failure) -> None:
        self._pending = None
        if not self._running:
            # Stopped: the failure is the cancellation, or comes after it.
            return
        if failure.check(ResourceExpired):
            self.relists += 1
            self._needList = True
            self.registry.gone(self)
            self._next()
            return
        error = failure.value
        if isinstance(error, KubernetesAPIError):
            self.lastError = f"API error {error.status}: {error.reason}"
        else:
            self.lastError = f"{type(error).__name__}: {error}"
        self.failures += 1
        self._attempt += 1
        delay = self.registry.backoff(self._attempt)
        self.registry.failed(self, self.lastError, delay)
        self._retry = self.registry.clock.callLater(delay, self._next)

    def _crashed(self, failure: Failure) -> None:
        self._log.failure("Kubernetes {kind} watcher crashed", failure, kind=self.kind)


class OffReactor(Protocol):
    """
    Runs a computation off the reactor thread: see L{KubernetesRegistry}.
    """

    def __call__(self, call: Callable[[], T], /) -> Deferred[T]: ...


def _atOnce(call: Callable[[], T]) -> Deferred[T]:
    """
    The L{OffReactor} that is not: C{call} now, in this thread.
    """
    return maybeDeferred(call)


class _Turns:
    """
    Runs one step per reactor turn (C{callLater(0)}), cancellably.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._call: IDelayedCall | None = None

    def next(self, step: Callable[[int], None], index: int) -> None:
        self._call = self._clock.callLater(0, step, index)

    def cancel(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()


@implementer(IServiceRegistry)
class KubernetesRegistry(TableRegistry, Service):
    """
    Services from the Kubernetes API: for each kind (and each namespace
    watched), a L{_Watcher} lists and watches through an
    L{IKubernetesAPI}, and L{ClusterState} turns what it hears into
    registry entries.

    @param api: the L{IKubernetesAPI} to list and watch through.  The
        registry owns it: when the registry stops, it closes the API if the
        API has a C{close} method (the real one's stops its threads).
    @param tiers: the tiers some host serves.
    @param namespaces: the namespaces to watch; all if empty.
    @param clock: the clock back-off, readiness and sync ages are timed
        on.
    @param initialSyncTimeout: seconds after start after which the registry
        reports itself ready even without a full sync; 0 to wait for the
        sync however long it takes.
    @param maxBackoff: the longest wait before retrying a failed list or
        watch.
    @param rng: the source of back-off jitter.
    @param selector: a label selector (already checked) Services are
        listed and watched with, or L{None} for all; EndpointSlices are
        never filtered by it (they do not carry their Service's labels).
    @param coalesceWindow: watch events change the cluster state as they
        come, but the table is updated, and its subscribers told, at most
        once per this many seconds, for every name changed meanwhile (0:
        at once, for each event).
    @param relistBatch: how many objects a list applies per reactor turn
        (every object of one registry name goes in the same turn), and how
        many names the end of a coalescing window rebuilds per turn.
    @param offReactor: runs a pure computation (a relist's diff) off the
        reactor thread, returning a L{Deferred} of its result; L{None}
        runs it at once (tests).  The composition root passes the API's
        pool (L{monedge.registry.kubeclient.KubernetesClientAPI.run}).
    @param freeze: called once the first full sync, and each relist after
        it, is applied: the composition root passes C{gc.freeze}, so the
        state just built (long-lived) leaves the collected generations and
        full collections stop scanning it.
    """

    _log = Logger()

    def __init__(
        self,
        api: IKubernetesAPI,
        tiers: frozenset[str],
        namespaces: Sequence[str] = (),
        *,
        clock: IReactorTime,
        initialSyncTimeout: float = 30.0,
        maxBackoff: float = 30.0,
        rng: random.Random | None = None,
        selector: str | None = None,
        coalesceWindow: float = COALESCE_WINDOW,
        relistBatch: int = RELIST_BATCH,
        offReactor: OffReactor | None = None,
        freeze: Callable[[], None] | None = None,
    ) -> None:
        self.clock = clock
        self.selector = selector
        self.coalesceWindow = coalesceWindow
        self.relistBatch = max(1, relistBatch)
        self._offReactor: OffReactor = offReactor or _atOnce
        self._freeze = freeze
        self.freezes = 0
        self.tableUpdates = 0
        self._pendingNames: set[str] = set()
        self._flushCall: IDelayedCall | None = None
        self.state = ClusterState(tiers=tiers)
        self._table = RegistryTable()
        self.namespaces = tuple(sorted(set(namespaces)))
        self.initialSyncTimeout = initialSyncTimeout
        self.maxBackoff = maxBackoff
        self._rng = rng or random.Random()
        self.reloadsSucceeded = 0
        self.reloadsFailed = 0
        self.lastSync: float | None = None
        self._syncedAll = False
        self._gaveUpWaiting = False
        self._timeoutCall: IDelayedCall | None = None
        self._outage = False
        scopes: Sequence[str | None] = self.namespaces or (None,)
        self._watchers = [
            _Watcher(self, kind, namespace)
            for namespace in scopes
            for kind in (SERVICES, ENDPOINT_SLICES)
        ]
        self.api = api

    @property
    def invalidConfig(self) -> int:
        """
        Invalid annotations seen (each Service version counted once).
        """
        return self.state.invalidAnnotations

    # IServiceRegistry (lookup, services, subscribe: from TableRegistry)

    def isReady(self) -> bool:
        return self._syncedAll or self._gaveUpWaiting

    def describe(self) -> Mapping[str, Any]:
        now = self.clock.seconds()
        return {
            "kind": "kubernetes",
            "namespaces": list(self.namespaces) or ["*"],
            "synced": self._syncedAll,
            "seconds_since_sync": (
                round(now - self.lastSync, 3) if self.lastSync is not None else None
            ),
            "invalid_annotations": self.state.invalidAnnotations,
            "selector": self.selector,
            "watches": [w.describe() for w in self._watchers],
        }

    def backoff(self, attempt: int) -> float:
        """
        The delay before retry number C{attempt}: exponential from 0.5 s,
        capped, with full jitter.
        """
        ceiling = min(self.maxBackoff, 0.5 * 2.0 ** min(attempt - 1, 16))
        return float(self._rng.uniform(ceiling / 2, ceiling))

    # What the watchers report

    def listed(
        self, watcher: _Watcher, items: Sequence[Any], version: str
    ) -> Deferred[None]:
        """
        A full list arrived: replace that kind and scope.  The diff against
        what is kept is computed off the reactor, then applied in slices of
        L{relistBatch} objects, one per reactor turn (the first at once);
        a name in both the old and the new list stays in the table
        throughout.  Fires once all of it is applied; cancelling it stops
        there.
        """
        kind = watcher.kind
        known = self.state.snapshot(kind, watcher.namespace)
        state = self.state
        diffed = self._offReactor(lambda: state.diff(kind, known, items))
        applied = diffed.addCallback(self._applyInSlices, kind)
        return applied.addCallback(self._listApplied, watcher)

    def _applyInSlices(self, groups: list[list[Change]], kind: str) -> Deferred[None]:
        done: Deferred[None] = Deferred(lambda _: turn.cancel())
        turn = _Turns(self.clock)

        def step(start: int) -> None:
            batch: list[Change] = []
            index = start
            while index < len(groups) and len(batch) < self.relistBatch:
                batch.extend(groups[index])
                index += 1
            self._rebuild(self.state.apply(kind, batch))
            if index < len(groups):
                turn.next(step, index)
            else:
                done.callback(None)

        step(0)
        return done

    def _listApplied(self, _: None, watcher: _Watcher) -> None:
        watcher.synced = True
        self.reloadsSucceeded += 1
        self._heard()
        if not self._syncedAll and all(w.synced for w in self._watchers):
            self._syncedAll = True
            self._log.info(
                "Kubernetes registry synced: {count} services",
                count=len(self._table.services()),
            )
        if self._syncedAll and self._freeze is not None:
            # The state just built lives until the next relist: out of the
            # collected generations, full collections stop scanning it.
            self._freeze()
            self.freezes += 1

    def changed(self, watcher: _Watcher, type_: str, obj: Any) -> None:
        """
        One watch event: the state changes now, the table within the
        coalescing window.
        """
        touched = self.state.event(watcher.kind, type_, obj)
        self._heard()
        if self.coalesceWindow <= 0:
            self._rebuild(touched)
            return
        self._pendingNames |= touched
        if self._pendingNames and self._flushCall is None:
            self._flushCall = self.clock.callLater(self.coalesceWindow, self._flush)

    def _flush(self) -> None:
        """
        The coalescing window ended: update the table, and tell its
        subscribers, once for every name changed in it.
        """
        self._flushCall = None
        pending = self._pendingNames
        if len(pending) <= self.relistBatch:
            self._pendingNames = set()
            self._rebuild(pending)
            return
        # A burst larger than a relist slice: a slice per reactor turn.
        names = [pending.pop() for _ in range(self.relistBatch)]
        self._flushCall = self.clock.callLater(0, self._flush)
        self._rebuild(names)

    def heardFrom(self, watcher: _Watcher) -> None:
        """
        A bookmark or a clean end of a watch: the API is there.
        """
        self._heard()

    def gone(self, watcher: _Watcher) -> None:
        """
        The watch's resourceVersion was too old (410 Gone): relisting.
        """
        self._log.info("{kind} watch expired (410 Gone); relisting", kind=watcher.kind)

    def failed(self, watcher: _Watcher, error: str | None, delay: float) -> None:
        """
        A list or watch failed; the watcher retries after C{delay}.
        """
        self.reloadsFailed += 1
        if not self._outage:
            self._outage = True
            self._log.error(
                "Kubernetes API unavailable ({error}); serving the last known"
                " table, retrying with back-off",
                error=error,
            )

    def _heard(self) -> None:
        self.lastSync = self.clock.seconds()
        if self._outage:
            self._outage = False
            self._log.info("Kubernetes API reachable again")

    def _rebuild(self, names: Iterable[str]) -> None:
        entries = {name: self.state.entry(name) for name in names}
        if entries:
            self.tableUpdates += 1
            self._table.update(entries)

    # Service

    def startService(self) -> None:
        super().startService()
        if self.initialSyncTimeout > 0:
            self._timeoutCall = self.clock.callLater(
                self.initialSyncTimeout, self._initialSyncTimedOut
            )
        for watcher in self._watchers:
            watcher.start()

    def _initialSyncTimedOut(self) -> None:
        self._timeoutCall = None
        if not self._syncedAll:
            self._gaveUpWaiting = True
            self._log.warn(
                "no full Kubernetes sync after {timeout}s: reporting ready anyway",
                timeout=self.initialSyncTimeout,
            )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._timeoutCall is not None and self._timeoutCall.active():
            self._timeoutCall.cancel()
        self._timeoutCall = None
        for watcher in self._watchers:
            watcher.stop()
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        self._flushCall = None
        self._pendingNames = set()
        close = getattr(self.api, "close", None)
        if close is not None:
            # Not waited for: a thread in the middle of a blocking list
            # returns within the request timeout, and the pool's threads
            # are daemons, so none keeps the process alive meanwhile.
            close()
        return succeed(None)
