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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
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
    WatchEvent,
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
    "ENDPOINT_SLICES",
    "INVALID_HOOKS",
    "SERVICES",
    "SERVICE_NAME_LABEL",
    "ClusterState",
    "KubernetesRegistry",
    "ObjectKey",
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

ObjectKey = tuple[str, str]


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _key(obj: Mapping[str, Any]) -> ObjectKey:
    meta = _meta(obj)
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


def policyFromAnnotations(
    annotations: Mapping[str, str] | None,
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
    for name, value in (annotations or {}).items():
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


#: A Service port's C{appProtocol} -> the upstream protocol it means.
APP_PROTOCOLS = {"kubernetes.io/h2c": "h2c", "h2c": "h2c", "h2": "h2"}


def basePolicy(service: Mapping[str, Any]) -> Policy:
    """
    The policy a Service's port gives before its annotations: C{protocol}
    from the port's C{appProtocol} (L{APP_PROTOCOLS}).
    """
    port = _chosenPort(service)
    protocol = APP_PROTOCOLS.get(str((port or {}).get("appProtocol") or ""))
    if protocol is None:
        return DEFAULT_POLICY
    return replace(DEFAULT_POLICY, protocol=protocol)


def _servicePort(service: Mapping[str, Any]) -> tuple[str, str] | None:
    """
    The name of the port traffic goes to, and its scheme: the port named
    C{http}, else the one named C{https}, else the only one (C{""} if it
    has no name); L{None} if there is no such port. The scheme is C{https}
    for a port named C{https} or whose C{appProtocol} is C{https}.
    """
    chosen = _chosenPort(service)
    if chosen is None:
        return None
    name = str(chosen.get("name") or "")
    secure = name == "https" or chosen.get("appProtocol") == "https"
    return name, "https" if secure else "http"


def _chosenPort(service: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """
    The Service port traffic goes to (see L{_servicePort}).
    """
    ports = (service.get("spec") or {}).get("ports") or []
    chosen = None
    for wanted in ("http", "https"):
        for port in ports:
            if port.get("name") == wanted:
                chosen = port
                break
        if chosen is not None:
            break
    if chosen is None:
        if len(ports) != 1:
            return None
        chosen = ports[0]
    result: Mapping[str, Any] = chosen
    return result


def endpointsFor(
    service: Mapping[str, Any], slices: Iterable[Mapping[str, Any]]
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
        if slice_.get("addressType") not in ("IPv4", "IPv6"):
            continue
        port = None
        for candidate in slice_.get("ports") or []:
            if str(candidate.get("name") or "") == portName:
                port = candidate.get("port")
        if not isinstance(port, int):
            continue
        for item in slice_.get("endpoints") or []:
            addresses = item.get("addresses") or []
            if not addresses:
                continue
            ready, serving, terminating = _conditions(item)
            endpoint = Endpoint(
                host=str(addresses[0]),
                port=port,
                scheme=scheme,
                ready=ready,
                serving=serving,
                terminating=terminating,
            )
            known = found.get((endpoint.host, port))
            # The same address in two slices (as a slice is replaced): keep
            # the more usable view of it.
            if known is None or (endpoint.ready, endpoint.serving) > (
                known.ready,
                known.serving,
            ):
                found[(endpoint.host, port)] = endpoint
    return tuple(found[k] for k in sorted(found))


@dataclass
class ClusterState:
    """
    The Services and EndpointSlices monedge keeps, and the registry entries
    they make.  Pure: fed list snapshots and watch events, it says which
    entries changed.

    @ivar tiers: the tiers some host serves; other Services are ignored.
    """

    tiers: frozenset[str]
    services: dict[ObjectKey, dict[str, Any]] = field(default_factory=dict)
    slices: dict[ObjectKey, dict[str, Any]] = field(default_factory=dict)
    invalidAnnotations: int = 0
    _problems: dict[ObjectKey, tuple[str, list[str]]] = field(default_factory=dict)
    #: (kind, key) -> registry name, and registry name -> kind -> keys.
    _names: dict[tuple[str, ObjectKey], str] = field(default_factory=dict)
    _index: dict[str, dict[str, set[ObjectKey]]] = field(default_factory=dict)
    _log = Logger()

    def registryName(self, kind: str, obj: Mapping[str, Any]) -> str | None:
        """
        The registry name an object belongs to, or L{None} if it is not
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

    def _store(self, kind: str) -> dict[ObjectKey, dict[str, Any]]:
        return self.services if kind == SERVICES else self.slices

    def _put(self, kind: str, obj: dict[str, Any], name: str) -> None:
        key = _key(obj)
        self._drop(kind, key)
        self._store(kind)[key] = obj
        self._names[(kind, key)] = name
        self._index.setdefault(name, {}).setdefault(kind, set()).add(key)

    def _drop(self, kind: str, key: ObjectKey) -> str | None:
        name = self._names.pop((kind, key), None)
        self._store(kind).pop(key, None)
        if name is not None:
            keys = self._index[name][kind]
            keys.discard(key)
            if not keys:
                del self._index[name][kind]
                if not self._index[name]:
                    del self._index[name]
        return name

    def replace(
        self, kind: str, namespace: str | None, items: Iterable[dict[str, Any]]
    ) -> set[str]:
        """
        A fresh list of C{kind} (in C{namespace}, or everywhere): replace
        what was known.  Returns the registry names that may have changed.
        """
        touched: set[str] = set()
        for key in list(self._store(kind)):
            if namespace is None or key[0] == namespace:
                name = self._drop(kind, key)
                if name is not None:
                    touched.add(name)
        for obj in items:
            name = self.registryName(kind, obj)
            if name is not None:
                self._put(kind, obj, name)
                touched.add(name)
        return touched

    def event(self, kind: str, type_: str, obj: dict[str, Any]) -> set[str]:
        """
        Apply one watch event; return the registry names it may change.
        """
        touched = set()
        previous = self._drop(kind, _key(obj))
        if previous is not None:
            touched.add(previous)
        name = self.registryName(kind, obj)
        if name is not None and type_ != "DELETED":
            self._put(kind, obj, name)
            touched.add(name)
        return touched

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
        meta = _meta(service)
        policy, problems = policyFromAnnotations(
            meta.get("annotations"), basePolicy(service)
        )
        self._noteProblems(owners[0], str(meta.get("resourceVersion", "")), problems)
        return ServiceEntry(
            name=name,
            endpoints=endpointsFor(service, slices),
            policy=policy,
            source={
                "kind": "kubernetes",
                "namespace": namespace,
                "name": owners[0][1],
                "resourceVersion": meta.get("resourceVersion"),
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
        api = self.registry.api
        d: Deferred[Any]
        # The API may answer before it returns: each callback that runs
        # then sets _pending to the next call, so this one is set first.
        if self._needList:
            d = self._pending = api.listObjects(self.kind, self.namespace)
            d.addCallbacks(self._listed, self._failed)
        else:
            assert self.resourceVersion is not None
            d = self._pending = api.watchObjects(
                self.kind, self.namespace, self.resourceVersion, self._received
            )
            d.addCallbacks(self._watchEnded, self._failed)
        d.addErrback(self._crashed)

    def _listed(self, listed: ObjectList) -> None:
        self._pending = None
        self._needList = False
        self.resourceVersion = listed.resourceVersion
        self.registry.listed(self, list(listed.items), listed.resourceVersion)
        self._next()

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
    ) -> None:
        self.clock = clock
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
        self, watcher: _Watcher, items: list[dict[str, Any]], version: str
    ) -> None:
        """
        A full list arrived: replace that kind and scope.
        """
        touched = self.state.replace(watcher.kind, watcher.namespace, items)
        self._rebuild(touched)
        watcher.synced = True
        self.reloadsSucceeded += 1
        self._heard()
        if not self._syncedAll and all(w.synced for w in self._watchers):
            self._syncedAll = True
            self._log.info(
                "Kubernetes registry synced: {count} services",
                count=len(self._table.services()),
            )

    def changed(self, watcher: _Watcher, type_: str, obj: dict[str, Any]) -> None:
        """
        One watch event.
        """
        self._rebuild(self.state.event(watcher.kind, type_, obj))
        self._heard()

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
        self._table.update({name: self.state.entry(name) for name in names})

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
        close = getattr(self.api, "close", None)
        if close is not None:
            # Not waited for: a thread in the middle of a blocking list
            # returns within the request timeout, and the pool's threads
            # are daemons, so none keeps the process alive meanwhile.
            close()
        return succeed(None)
