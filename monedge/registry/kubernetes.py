"""
The Kubernetes registry: v1 Services and discovery.k8s.io/v1 EndpointSlices,
listed, then watched, with the official C{kubernetes} client.

The client blocks, so every list and watch runs in a thread pool of its
own; every change is applied on the reactor thread, and the proxy only ever
reads the table.  The data path never waits on the API.

    Service service-api-foo (namespace shop)   ->  service.api.foo
    EndpointSlices labelled kubernetes.io/service-name=service-api-foo
                                                ->  its endpoints

Only Services named by the convention for a configured tier are kept (and
only their slices), so memory follows the exposed services, not the
cluster.  L{ClusterState} turns objects into registry entries and is pure;
L{KubernetesRegistry} keeps it in step with the API.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from monedge.convention import parseServiceName, serviceFromKubernetesName
from monedge.interfaces import IServiceRegistry
from monedge.policy import POLICY_KEYS, HookSpec, Policy, PolicyError, parsePolicy
from monedge.registry import Endpoint, RegistryTable, ServiceEntry, TableRegistry

#: Annotation prefix for per-service policy: C{monedge.io/timeout: 30s}.
ANNOTATION_PREFIX = "monedge.io/"

#: The hook name an invalid monedge.io/hooks annotation is replaced by: no
#: such hook exists, so the service answers 503 rather than skip its hooks.
INVALID_HOOKS = "invalid-monedge.io/hooks-annotation"

#: The label an EndpointSlice names its Service with.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

SERVICES = "services"
ENDPOINT_SLICES = "endpointslices"

ObjectKey = tuple[str, str]


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _key(obj: Mapping[str, Any]) -> ObjectKey:
    meta = _meta(obj)
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


def policyFromAnnotations(
    annotations: Mapping[str, str] | None,
) -> tuple[Policy, list[str]]:
    """
    The policy a Service's C{monedge.io/<key>} annotations give, and a
    message for each annotation that is invalid.  Each invalid annotation
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
    policy = parsePolicy(values)
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


def _servicePort(service: Mapping[str, Any]) -> tuple[str, str] | None:
    """
    The name of the port traffic goes to, and its scheme: the port named
    C{http}, else the one named C{https}, else the only one (C{""} if it
    has no name); L{None} if there is no such port. The scheme is C{https}
    for a port named C{https} or whose C{appProtocol} is C{https}.
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
    name = str(chosen.get("name") or "")
    secure = name == "https" or chosen.get("appProtocol") == "https"
    return name, "https" if secure else "http"


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
        policy, problems = policyFromAnnotations(meta.get("annotations"))
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
    watch from the list's resourceVersion; relist on 410 Gone; reconnect
    with jittered, capped exponential back-off on any other failure.
    Runs in a pool thread and hands everything to the reactor.
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
        self._stopped = threading.Event()
        self._watch: Any = None

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

    def stop(self) -> None:
        self._stopped.set()
        watch = self._watch
        if watch is not None:
            watch.stop()

    # In the pool thread from here on.

    def _listFunction(self) -> Callable[..., Any]:
        api = self.registry.api
        assert api is not None
        function: Callable[..., Any]
        if self.kind == SERVICES:
            if self.namespace is None:
                function = api.core.list_service_for_all_namespaces
            else:
                function = api.core.list_namespaced_service
        elif self.namespace is None:
            function = api.discovery.list_endpoint_slice_for_all_namespaces
        else:
            function = api.discovery.list_namespaced_endpoint_slice
        return function

    def _arguments(self) -> tuple[Any, ...]:
        return () if self.namespace is None else (self.namespace,)

    def _list(self) -> None:
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {
                "_preload_content": False,
                "_request_timeout": self.registry.requestTimeout,
                "limit": 500,
            }
            if token:
                kwargs["_continue"] = token
            response = self._listFunction()(*self._arguments(), **kwargs)
            try:
                document = json.loads(response.data)
            finally:
                response.release_conn()
            items.extend(document.get("items") or [])
            metadata = document.get("metadata") or {}
            token = metadata.get("continue")
            if not token:
                break
        self.resourceVersion = str(metadata.get("resourceVersion", ""))
        self.registry.fromThread(
            self.registry.listed, self, items, self.resourceVersion
        )

    def _watchOnce(self) -> None:
        from kubernetes import watch

        self._watch = stream = watch.Watch()
        if self._stopped.is_set():
            return
        try:
            for event in stream.stream(
                self._listFunction(),
                *self._arguments(),
                resource_version=self.resourceVersion,
                allow_watch_bookmarks=True,
                timeout_seconds=int(self.registry.watchTimeout),
                _request_timeout=self.registry.watchRequestTimeout,
            ):
                # (The client's deserialize=False mode cannot report a 410
                # ERROR event: it looks for raw_object, which only the
                # deserializing mode sets.  The raw dict is used here.)
                if self._stopped.is_set():
                    return
                type_ = event.get("type")
                obj = event.get("raw_object") or {}
                version = _meta(obj).get("resourceVersion")
                if version:
                    self.resourceVersion = str(version)
                if type_ in ("ADDED", "MODIFIED", "DELETED"):
                    self.registry.fromThread(self.registry.changed, self, type_, obj)
                else:
                    self.registry.fromThread(self.registry.heardFrom, self)
            # The server ended the watch (its timeout): all is well.
            self.registry.fromThread(self.registry.heardFrom, self)
        finally:
            self._watch = None

    def run(self) -> None:
        """
        The watcher's loop, until stopped.
        """
        from kubernetes.client.exceptions import ApiException

        needList = True
        attempt = 0
        while not self._stopped.is_set():
            try:
                if needList:
                    self._list()
                    needList = False
                self._watchOnce()
                attempt = 0
                continue
            except ApiException as e:
                if e.status == 410:
                    self.relists += 1
                    needList = True
                    self.registry.fromThread(self.registry.gone, self)
                    continue
                self.lastError = f"API error {e.status}: {e.reason}"
            except Exception as e:
                self.lastError = f"{type(e).__name__}: {e}"
            if self._stopped.is_set():
                return
            self.failures += 1
            attempt += 1
            delay = self.registry.backoff(attempt)
            self.registry.fromThread(self.registry.failed, self, self.lastError, delay)
            self._stopped.wait(delay)


class _Api:
    """
    The typed API objects over one C{ApiClient}.
    """

    def __init__(self, apiClient: Any) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(apiClient)
        self.discovery = client.DiscoveryV1Api(apiClient)


@implementer(IServiceRegistry)
class KubernetesRegistry(TableRegistry, Service):
    """
    Services from the Kubernetes API.

    @param apiClient: a C{kubernetes.client.ApiClient}.
    @param tiers: the tiers some host serves.
    @param namespaces: the namespaces to watch; all if empty.
    @param initialSyncTimeout: seconds after start after which the registry
        reports itself ready even without a full sync; 0 to wait for the
        sync however long it takes.
    """

    _log = Logger()

    def __init__(
        self,
        apiClient: Any,
        tiers: frozenset[str],
        namespaces: Sequence[str] = (),
        reactor: Any = None,
        initialSyncTimeout: float = 30.0,
        watchTimeout: float = 60.0,
        requestTimeout: float = 10.0,
        maxBackoff: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self._reactor = reactor
        self.api = _Api(apiClient) if apiClient is not None else None
        self.state = ClusterState(tiers=tiers)
        self._table = RegistryTable()
        self.namespaces = tuple(sorted(set(namespaces)))
        self.initialSyncTimeout = initialSyncTimeout
        self.watchTimeout = watchTimeout
        self.requestTimeout = (min(5.0, requestTimeout), requestTimeout)
        self.watchRequestTimeout = (min(5.0, requestTimeout), watchTimeout + 30.0)
        self.maxBackoff = maxBackoff
        self._rng = rng or random.Random()
        self.reloadsSucceeded = 0
        self.reloadsFailed = 0
        self.lastSync: float | None = None
        self._syncedAll = False
        self._gaveUpWaiting = False
        self._timeoutCall: Any = None
        self._outage = False
        scopes: Sequence[str | None] = self.namespaces or (None,)
        self._watchers = [
            _Watcher(self, kind, namespace)
            for namespace in scopes
            for kind in (SERVICES, ENDPOINT_SLICES)
        ]
        self._pool: ThreadPool | None = None

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
        now = self._reactor.seconds()
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

    # Threads

    def fromThread(self, function: Callable[..., object], *args: object) -> None:
        """
        Run C{function(*args)} on the reactor thread.
        """
        self._reactor.callFromThread(function, *args)

    def backoff(self, attempt: int) -> float:
        """
        The delay before retry number C{attempt}: exponential from 0.5 s,
        capped, with full jitter.
        """
        ceiling = min(self.maxBackoff, 0.5 * 2.0 ** min(attempt - 1, 16))
        return float(self._rng.uniform(ceiling / 2, ceiling))

    # Reactor side: what the watchers report

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
        self.lastSync = self._reactor.seconds()
        if self._outage:
            self._outage = False
            self._log.info("Kubernetes API reachable again")

    def _rebuild(self, names: Iterable[str]) -> None:
        self._table.update({name: self.state.entry(name) for name in names})

    # Service

    def startService(self) -> None:
        super().startService()
        if self.initialSyncTimeout > 0:
            self._timeoutCall = self._reactor.callLater(
                self.initialSyncTimeout, self._initialSyncTimedOut
            )
        self._startWatchers()

    def _startWatchers(self) -> None:
        """
        Run every watcher in a pool thread of its own.
        """
        pool = ThreadPool(
            minthreads=0, maxthreads=len(self._watchers), name="monedge-kubernetes"
        )
        pool.threadFactory = _daemonThread  # type: ignore[assignment]
        pool.start()
        self._pool = pool
        for watcher in self._watchers:
            deferToThreadPool(self._reactor, pool, watcher.run).addErrback(
                lambda failure: self._log.failure("watcher crashed", failure)
            )

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
        for watcher in self._watchers:
            watcher.stop()
        # The pool is not joined: a thread in the middle of a blocking read
        # ends when its socket is shut down or its timeout passes, and its
        # threads are daemons, so none keeps the process alive meanwhile.
        self._pool = None
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d


def _daemonThread(*args: Any, **kwargs: Any) -> threading.Thread:
    """
    Watcher threads are daemons: one stuck in a read must not keep the
    process alive after the reactor stops.
    """
    return threading.Thread(*args, daemon=True, **kwargs)


def apiClientFromConfig(kubeconfig: str | None) -> Any:
    """
    A C{kubernetes.client.ApiClient}: from C{kubeconfig} if given, else
    in-cluster when running in a pod, else the default kubeconfig.

    @raise ValueError: with a one-line reason if no configuration loads.
    """
    import os

    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        if kubeconfig:
            config.load_kube_config(
                config_file=kubeconfig, client_configuration=configuration
            )
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(client_configuration=configuration)
    except Exception as e:
        raise ValueError(f"cannot load Kubernetes configuration: {e}") from None
    return client.ApiClient(configuration)
