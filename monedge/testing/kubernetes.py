"""
Fakes of the Kubernetes API for tests: L{FakeKubernetes}, a real HTTP
server the real client talks to, and L{MemoryKubernetes}, an in-memory
L{IKubernetesAPI} for unit tests of the registry's watch logic.  Both keep
their objects in a L{FakeCluster}, so versions, history and expiry behave
the same in each; the rest of this docstring is about L{FakeKubernetes}.

No kube-apiserver can run in monedge's test environment, so the Kubernetes
tests run the real C{kubernetes} Python client against this server, a real
HTTP server on 127.0.0.1 built on C{twisted.web}.  It speaks the list/watch
wire protocol of the Kubernetes API ("API concepts: efficient detection of
changes", U{https://kubernetes.io/docs/reference/using-api/api-concepts/})
for two resources:

  - v1 Services: C{/api/v1/services} and
    C{/api/v1/namespaces/{ns}/services[/{name}]};
  - discovery.k8s.io/v1 EndpointSlices:
    C{/apis/discovery.k8s.io/v1/endpointslices} and
    C{/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices[/{name}]};

and answers C{/version}, C{/api}, C{/apis}, C{/api/v1} and
C{/apis/discovery.k8s.io/v1} minimally.  Everything else is a 404 C{Status}.

What it does as the real API server does:

  - one global, monotonically increasing C{resourceVersion} (an integer, as
    a string; clients must treat it as opaque), shared by both kinds;
  - B{list} answers a C{ServiceList}/C{EndpointSliceList} whose
    C{metadata.resourceVersion} is the version the list was built at, its
    items sorted by namespace and name and, as the real server sends them,
    without their own C{kind}/C{apiVersion}.  C{limit}/C{continue} paginate
    over a consistent snapshot: later pages show the objects as they were
    when the first page was served; a continue token whose snapshot has been
    compacted away is refused with HTTP 410 (reason C{Expired});
  - B{watch} (C{watch=true}) answers 200 with a chunked body of one JSON
    event per line, each flushed as it happens.  Without C{resourceVersion}
    or with C{"0"} it first sends a synthetic C{ADDED} for every current
    object, then streams changes; from a specific version it replays every
    retained change after it, then streams; from a version older than the
    retained history it sends one C{ERROR} event (a 410 C{Expired} C{Status})
    and ends the stream, as the real server does for watches;
  - C{labelSelector} (C{k=v}, C{k==v}, C{k!=v}, C{k}, C{!k}, C{k in (a,b)},
    C{k notin (a,b)}) and C{fieldSelector} on C{metadata.name} and
    C{metadata.namespace}, for lists and watches; a watch whose selector an
    object stops (or starts) matching sees C{DELETED} (or C{ADDED});
  - C{timeoutSeconds} ends a watch cleanly after that many seconds of the
    injected reactor's clock; C{allowWatchBookmarks} opts a watch into
    L{FakeKubernetes.bookmark};
  - every request needs C{Authorization: Bearer <token>} with the token
    L{FakeKubernetes.writeKubeconfig} writes; otherwise 401.

What it does not do: writes over HTTP (tests change state with
L{FakeKubernetes.apply} and L{FakeKubernetes.delete}), C{sendInitialEvents}
and C{resourceVersionMatch}, protobuf, server-chosen watch timeouts (a watch
without C{timeoutSeconds} lasts until it is ended), defaulting of object
fields, admission, and optimistic concurrency (an L{FakeKubernetes.apply} of
an unchanged object still makes a new version and a C{MODIFIED} event).

Everything runs on the reactor thread.  The real client is blocking: call it
in a thread (C{twisted.internet.threads.deferToThread}), bound every watch
with C{timeout_seconds} (or C{_request_timeout}) and every thread call with
a reactor-side timeout, and C{stop()} the fake in a cleanup.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import re
import secrets
import uuid
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from twisted.internet import error
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from monedge.interfaces import IKubernetesAPI
from monedge.registry.kubeapi import (
    Compactor,
    KubernetesAPIError,
    ObjectList,
    ResourceExpired,
    WatchEvent,
    compactEvent,
)

__all__ = [
    "FakeCluster",
    "FakeKubernetes",
    "MemoryKubernetes",
    "endpointSliceObject",
    "realisticEndpointSlice",
    "realisticService",
    "serviceObject",
]


@dataclass(frozen=True)
class _Kind:
    """
    One resource the fake serves.
    """

    kind: str
    apiVersion: str
    plural: str
    prefix: tuple[str, ...]

    @property
    def listKind(self) -> str:
        return self.kind + "List"


_SERVICE = _Kind("Service", "v1", "services", ("api", "v1"))
_ENDPOINT_SLICE = _Kind(
    "EndpointSlice",
    "discovery.k8s.io/v1",
    "endpointslices",
    ("apis", "discovery.k8s.io", "v1"),
)
_KINDS = (_SERVICE, _ENDPOINT_SLICE)

_Key = tuple[str, str, str]
"""
(plural, namespace, name): where an object is stored.
"""


def _kindNamed(name: str) -> _Kind:
    """
    The kind called C{name}: its kind (C{"Service"}) or plural
    (C{"services"}), case-insensitively.
    """
    lowered = name.lower()
    for kind in _KINDS:
        if lowered in (kind.kind.lower(), kind.plural):
            return kind
    raise ValueError(f"FakeKubernetes serves no kind {name!r}")


def _status(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    """
    A failure C{Status} object, as the API server sends for errors.
    """
    status: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        status["details"] = details
    return status


def _expired(message: str) -> dict[str, Any]:
    return _status(410, "Expired", message)


class _HTTPError(Exception):
    """
    Answer the request with C{status} (a C{Status} object).
    """

    def __init__(self, status: dict[str, Any]) -> None:
        super().__init__(status["message"])
        self.status = status


def _badRequest(message: str) -> _HTTPError:
    return _HTTPError(_status(400, "BadRequest", message))


_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def _boolParam(query: dict[str, list[str]], name: str) -> bool:
    """
    A boolean query parameter, parsed as Go's C{strconv.ParseBool} does;
    absent or empty is false.
    """
    value = query.get(name, [""])[0]
    if value == "" or value in _FALSE:
        return False
    if value in _TRUE:
        return True
    raise _badRequest(f"invalid boolean for {name}: {value!r}")


def _intParam(query: dict[str, list[str]], name: str) -> int:
    """
    A non-negative integer query parameter; absent or empty is 0.
    """
    value = query.get(name, [""])[0]
    if value == "":
        return 0
    try:
        number = int(value)
    except ValueError:
        raise _badRequest(f"invalid integer for {name}: {value!r}") from None
    if number < 0:
        raise _badRequest(f"{name} must not be negative")
    return number


_Requirement = Callable[[dict[str, Any]], bool]

_NAME = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_SET_REQUIREMENT = re.compile(rf"^({_NAME})\s+(in|notin)\s+\(([^()]*)\)$")
_EQUALITY_REQUIREMENT = re.compile(rf"^({_NAME})\s*(==|!=|=)\s*([-A-Za-z0-9_.]*)$")
_EXISTS_REQUIREMENT = re.compile(rf"^(!?)\s*({_NAME})$")


def _splitSelector(text: str) -> list[str]:
    """
    Split a selector on the commas outside parentheses.
    """
    parts: list[str] = []
    depth = 0
    current = ""
    for character in text:
        if character == "(":
            depth += 1
        elif character == ")":
            depth -= 1
        if character == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += character
    parts.append(current.strip())
    return [part for part in parts if part]


def _labelRequirement(text: str) -> _Requirement:
    def labels(obj: dict[str, Any]) -> dict[str, str]:
        found = obj.get("metadata", {}).get("labels") or {}
        assert isinstance(found, dict)
        return found

    match = _SET_REQUIREMENT.match(text)
    if match is not None:
        key, operator, values = match.groups()
        allowed = {v.strip() for v in values.split(",") if v.strip()}
        if operator == "in":
            return lambda obj: labels(obj).get(key) in allowed
        return lambda obj: labels(obj).get(key) not in allowed
    match = _EQUALITY_REQUIREMENT.match(text)
    if match is not None:
        key, operator, value = match.groups()
        if operator == "!=":
            return lambda obj: labels(obj).get(key) != value
        return lambda obj: labels(obj).get(key) == value
    match = _EXISTS_REQUIREMENT.match(text)
    if match is not None:
        negated, key = match.groups()
        if negated:
            return lambda obj: key not in labels(obj)
        return lambda obj: key in labels(obj)
    raise _badRequest(f"unable to parse requirement: {text!r}")


_FIELDS: dict[str, Callable[[dict[str, Any]], str]] = {
    "metadata.name": lambda obj: str(obj["metadata"]["name"]),
    "metadata.namespace": lambda obj: str(obj["metadata"]["namespace"]),
}


def _fieldRequirement(text: str) -> _Requirement:
    match = _EQUALITY_REQUIREMENT.match(text)
    if match is None:
        raise _badRequest(f"invalid field selector: {text!r}")
    name, operator, value = match.groups()
    getter = _FIELDS.get(name)
    if getter is None:
        raise _badRequest(f'field label not supported: "{name}"')
    if operator == "!=":
        return lambda obj: getter(obj) != value
    return lambda obj: getter(obj) == value


@dataclass(frozen=True)
class _Selector:
    """
    What a list or watch request selects: a kind, maybe a namespace, and
    label and field requirements.
    """

    kind: _Kind
    namespace: str | None
    requirements: tuple[_Requirement, ...] = ()

    @classmethod
    def parse(
        cls, kind: _Kind, namespace: str | None, query: dict[str, list[str]]
    ) -> _Selector:
        requirements: list[_Requirement] = []
        for text in query.get("labelSelector", []):
            requirements.extend(_labelRequirement(r) for r in _splitSelector(text))
        for text in query.get("fieldSelector", []):
            requirements.extend(_fieldRequirement(r) for r in _splitSelector(text))
        return cls(kind, namespace, tuple(requirements))

    def selectsKey(self, key: _Key) -> bool:
        plural, namespace, _ = key
        return plural == self.kind.plural and (
            self.namespace is None or namespace == self.namespace
        )

    def matches(self, obj: dict[str, Any] | None) -> bool:
        return obj is not None and all(r(obj) for r in self.requirements)


@dataclass(frozen=True)
class _Event:
    """
    One retained change.

    @ivar obj: the object as watchers see it: the new state, or for
        C{DELETED} the last state with the deletion's resourceVersion.
    @ivar old: the state before the change (L{None} for C{ADDED}), to filter
        by selectors and to rewind to a list snapshot.
    """

    rv: int
    key: _Key
    type: str
    obj: dict[str, Any]
    old: dict[str, Any] | None

    def seenBy(self, selector: _Selector) -> str | None:
        """
        The event type a watch with C{selector} sees for this change, if any.
        """
        if not selector.selectsKey(self.key):
            return None
        before = selector.matches(self.old)
        after = self.type != "DELETED" and selector.matches(self.obj)
        if before and after:
            return "MODIFIED"
        if after:
            return "ADDED"
        if before:
            return "DELETED"
        return None


class _Channel(HTTPChannel):
    """
    An HTTP/1.1 channel its L{_FakeSite} keeps track of, so that the fake
    can abort every connection.
    """

    site: _FakeSite

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channels.add(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        try:
            super().connectionLost(reason)
        finally:
            self.site.channelLost(self)

    def abort(self) -> None:
        """
        Drop the connection at once, like a dead server.
        """
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()


class _FakeSite(Site):
    protocol = _Channel  # type: ignore[assignment]

    def __init__(self, resource: Resource, reactor: Any) -> None:
        super().__init__(resource, reactor=reactor)
        self.channels: set[_Channel] = set()
        self._idle: list[Deferred[None]] = []

    def log(self, request: http.Request) -> None:
        pass

    def channelLost(self, channel: _Channel) -> None:
        self.channels.discard(channel)
        if not self.channels:
            idle, self._idle = self._idle, []
            for waiter in idle:
                waiter.callback(None)

    def whenIdle(self) -> Deferred[None]:
        """
        Fire when no connection is open.
        """
        if not self.channels:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle.append(waiter)
        return waiter


@dataclass(eq=False)
class _Watch:
    """
    One open watch stream.
    """

    request: Request
    channel: _Channel | None
    selector: _Selector
    bookmarks: bool
    timeout: IDelayedCall | None = None
    open: bool = True


class _APIResource(Resource):
    isLeaf = True

    def __init__(self, fake: FakeKubernetes) -> None:
        super().__init__()
        self._fake = fake

    def render(self, request: Request) -> bytes | int:
        return self._fake._render(request)


def _encodeContinue(rv: int, last: _Key) -> str:
    """
    An opaque continue token: the snapshot's version and the last key sent,
    shaped like the real server's.
    """
    start = f"{last[1]}/{last[2]}"
    token = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start})
    return base64.urlsafe_b64encode(token.encode()).decode()


def _decodeContinue(token: str) -> tuple[int, tuple[str, str]]:
    """
    The snapshot version and (namespace, name) after which to go on.
    """
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
        rv, start = decoded["rv"], decoded["start"]
        namespace, name = start.split("/")
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        raise _badRequest("continue key is not valid") from None
    if not isinstance(rv, int):
        raise _badRequest("continue key is not valid")
    return rv, (namespace, name)


class FakeCluster:
    """
    Services and EndpointSlices as the API server keeps them: one global,
    increasing C{resourceVersion}, a bounded history of changes a watch can
    resume from, and compaction.  The state (and the test controls) of both
    fakes of the API: L{FakeKubernetes} serves it over HTTP to the real
    client, L{MemoryKubernetes} in memory as an L{IKubernetesAPI}.

    @param clock: the clock creation timestamps are read from.
    @param retainEvents: how many of the most recent changes (of both kinds
        together) a watch can resume from; a watch from an older
        resourceVersion gets a 410.
    """

    def __init__(self, clock: IReactorTime, retainEvents: int = 1000) -> None:
        if retainEvents < 0:
            raise ValueError("retainEvents must not be negative")
        self._clock = clock
        self._retainEvents = retainEvents
        self._rv = 1
        # A watch from a version older than this gets a 410: every change
        # after it is retained.
        self._oldestResumable = self._rv
        self._objects: dict[_Key, dict[str, Any]] = {}
        #: Every key, sorted, while no object has come or gone since.
        self._sortedKeys: list[_Key] | None = None
        #: Each object's JSON as a list item (no apiVersion, no kind), with
        #: the object it was made from: stored objects are never changed.
        self._itemJSON: dict[_Key, tuple[dict[str, Any], bytes]] = {}
        self._events: deque[_Event] = deque()
        self._watchWaiters: list[tuple[int, Deferred[None]]] = []
        self._forbidden: set[str] = set()

    # State

    @property
    def resourceVersion(self) -> str:
        """
        The current global resourceVersion.
        """
        return str(self._rv)

    def services(self) -> list[dict[str, Any]]:
        """
        Copies of every Service, sorted by namespace and name.
        """
        return self._current(_SERVICE)

    def endpointSlices(self) -> list[dict[str, Any]]:
        """
        Copies of every EndpointSlice, sorted by namespace and name.
        """
        return self._current(_ENDPOINT_SLICE)

    def _current(self, kind: _Kind) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(obj)
            for key, obj in sorted(self._objects.items())
            if key[0] == kind.plural
        ]

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """
        Create or replace the Service (C{"apiVersion": "v1", "kind":
        "Service"}) or EndpointSlice (C{"apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice"}, which needs an C{addressType}) named by
        C{metadata.namespace} (C{"default"} if absent) and C{metadata.name}.

        It gets a new resourceVersion; a new object gets a C{metadata.uid}
        and C{metadata.creationTimestamp}, a replaced one keeps its own.
        Watches see C{ADDED} or C{MODIFIED}.

        @return: a copy of the object as stored.
        @raise ValueError: if C{obj} is not one of those kinds or has no name.
        """
        kind = self._kindOf(obj)
        stored = copy.deepcopy(obj)
        metadata = stored.get("metadata")
        if not isinstance(metadata, dict) or not metadata.get("name"):
            raise ValueError("the object needs metadata.name")
        metadata.setdefault("namespace", "default")
        if kind is _ENDPOINT_SLICE and not isinstance(stored.get("addressType"), str):
            raise ValueError("an EndpointSlice needs an addressType")
        key = (kind.plural, str(metadata["namespace"]), str(metadata["name"]))
        old = self._objects.get(key)
        if old is None:
            metadata["uid"] = str(uuid.uuid4())
            metadata["creationTimestamp"] = datetime.fromtimestamp(
                self._clock.seconds(), UTC
            ).strftime("%Y-%m-%dT%H:%M:%SZ")
        else:
            metadata["uid"] = old["metadata"]["uid"]
            metadata["creationTimestamp"] = old["metadata"]["creationTimestamp"]
        self._rv += 1
        metadata["resourceVersion"] = str(self._rv)
        if old is None:
            self._sortedKeys = None
        self._objects[key] = stored
        self._record(
            _Event(self._rv, key, "ADDED" if old is None else "MODIFIED", stored, old)
        )
        return copy.deepcopy(stored)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        """
        Delete the object of C{kind} (C{"Service"} or C{"EndpointSlice"}, or
        their plurals) named C{namespace}/C{name}: watches see C{DELETED}
        with its last state and the deletion's new resourceVersion.

        @raise KeyError: if there is no such object.
        @raise ValueError: for another kind.
        """
        key = (_kindNamed(kind).plural, namespace, name)
        old = self._objects.pop(key)
        self._sortedKeys = None
        self._itemJSON.pop(key, None)
        self._rv += 1
        last = copy.deepcopy(old)
        last["metadata"]["resourceVersion"] = str(self._rv)
        self._record(_Event(self._rv, key, "DELETED", last, old))

    def _kindOf(self, obj: dict[str, Any]) -> _Kind:
        for kind in _KINDS:
            if obj.get("apiVersion") == kind.apiVersion and obj.get("kind") == (
                kind.kind
            ):
                return kind
        raise ValueError(
            "the fake stores v1 Services and discovery.k8s.io/v1 "
            f"EndpointSlices, not {obj.get('apiVersion')}/{obj.get('kind')}"
        )

    def _record(self, event: _Event) -> None:
        self._events.append(event)
        while len(self._events) > self._retainEvents:
            forgotten = self._events.popleft()
            self._oldestResumable = forgotten.rv
        self._changed(event)

    def _changed(self, event: _Event) -> None:
        """
        Tell the open watches of C{event}, just recorded.
        """
        raise NotImplementedError()

    def _keys(self) -> list[_Key]:
        """
        Every key, sorted (kept until an object comes or goes).
        """
        keys = self._sortedKeys
        if keys is None:
            keys = self._sortedKeys = sorted(self._objects)
        return keys

    def _item(self, key: _Key, obj: dict[str, Any]) -> bytes:
        """
        C{obj}'s JSON as an item of a list (without apiVersion and kind),
        made once per stored object: a list of thousands of objects, page
        after page, costs what a real API server's watch cache does, not a
        copy and an encoding of each object each time.
        """
        cached = self._itemJSON.get(key)
        if cached is not None and cached[0] is obj:
            return cached[1]
        item = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
        encoded = json.dumps(item).encode()
        self._itemJSON[key] = (obj, encoded)
        return encoded

    def _stateAt(self, rv: int) -> dict[_Key, dict[str, Any]]:
        """
        Every object as it was at C{rv} (which must not be older than the
        retained history), by undoing the retained changes after it.
        """
        state = dict(self._objects)
        for event in reversed(self._events):
            if event.rv <= rv:
                break
            if event.old is None:
                state.pop(event.key, None)
            else:
                state[event.key] = event.old
        return state

    # Test controls

    def compact(self) -> None:
        """
        Forget every retained change: a watch from any version older than
        the current one (and a continue token from such a list) now gets a
        410.
        """
        self._events.clear()
        self._oldestResumable = self._rv

    def forbid(self, kind: str, forbidden: bool = True) -> None:
        """
        Refuse (or, with C{forbidden=False}, allow again) every list and
        watch of C{kind} (C{"Service"} or C{"EndpointSlice"}, or their
        plurals) with 403 Forbidden, as the API server does for a service
        account whose role lacks them.
        """
        plural = _kindNamed(kind).plural
        if forbidden:
            self._forbidden.add(plural)
        else:
            self._forbidden.discard(plural)

    def bookmark(self) -> None:
        """
        Send a C{BOOKMARK} event, at the current version, on every open
        watch that asked for bookmarks.
        """
        raise NotImplementedError()

    def expireWatches(self) -> None:
        """
        End every open watch with a 410 Gone.
        """
        raise NotImplementedError()

    def dropWatches(self) -> None:
        """
        Break the connection of every open watch.
        """
        raise NotImplementedError()

    def endWatches(self) -> None:
        """
        End every open watch cleanly, as its timeout would.
        """
        raise NotImplementedError()

    @property
    def watchCount(self) -> int:
        """
        How many watches are open.
        """
        raise NotImplementedError()

    def whenWatching(self, count: int = 1) -> Deferred[None]:
        """
        Fire once at least C{count} watch streams are open (at once if they
        already are); add your own timeout.
        """
        if self.watchCount >= count:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._watchWaiters.append((count, waiter))
        return waiter

    def _watchOpened(self) -> None:
        """
        A watch opened: fire the L{whenWatching} waiters it satisfies.
        """
        for count, waiter in list(self._watchWaiters):
            if self.watchCount >= count:
                self._watchWaiters.remove((count, waiter))
                waiter.callback(None)


class FakeKubernetes(FakeCluster):
    """
    A fake Kubernetes API server on 127.0.0.1 serving v1 Services and
    discovery.k8s.io/v1 EndpointSlices over the real list/watch wire
    protocol (see the module docstring for what it does and does not do).

    @param reactor: the reactor to listen on and to time watches with; the
        global reactor by default.
    @param retainEvents: how many of the most recent changes (of both kinds
        together) a watch can resume from; a watch from an older
        resourceVersion gets a 410.

    @ivar port: the port listened on (0 before the first L{start}; kept
        after L{stop}, so that C{start(fake.port)} restarts on it).
    @ivar token: the bearer token every request must carry.
    @ivar requests: C{(method, path, query)} of every request received, in
        order, the query parsed to lists of strings.
    """

    def __init__(self, reactor: Any = None, retainEvents: int = 1000) -> None:
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        super().__init__(reactor, retainEvents)
        self._reactor = reactor
        self.port = 0
        self.token = secrets.token_hex(16)
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []
        self._watches: list[_Watch] = []
        self._site = _FakeSite(_APIResource(self), reactor)
        self._listening: IListeningPort | None = None

    # Lifecycle

    def start(self, port: int = 0) -> int:
        """
        Listen on 127.0.0.1:C{port} (any free port for 0); return the port.
        The state (objects, versions, history) survives L{stop} and a new
        L{start}.
        """
        if self._listening is not None:
            raise RuntimeError("FakeKubernetes is already listening")
        self._listening = self._reactor.listenTCP(
            port, self._site, interface="127.0.0.1"
        )
        bound = getattr(self._listening.getHost(), "port")  # noqa: B009
        self.port = int(bound)
        return self.port

    def stop(self) -> Deferred[None]:
        """
        Stop listening and abort every open connection (watch streams die
        abruptly, as when the API server dies); fire when the port is closed
        and every connection is gone.  Harmless when not listening.
        """
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        listening, self._listening = self._listening, None
        if listening is not None:
            await maybeDeferred(listening.stopListening)
        for channel in list(self._site.channels):
            channel.abort()
        await self._site.whenIdle()

    @property
    def url(self) -> str:
        """
        C{http://127.0.0.1:PORT}.
        """
        return f"http://127.0.0.1:{self.port}"

    def writeKubeconfig(self, path: str) -> str:
        """
        Write a kubeconfig at C{path} whose current context reaches this
        server (at its current L{url}) as a user with the static bearer
        L{token}; return C{path}.
        """
        if not self.port:
            raise RuntimeError("start() the fake before writing a kubeconfig")
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake-user", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {
                        "cluster": "fake",
                        "user": "fake-user",
                        "namespace": "default",
                    },
                }
            ],
            "current-context": "fake",
            "preferences": {},
        }
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f)
        return path

    # Test controls

    def bookmark(self) -> None:
        """
        Send a C{BOOKMARK} event (an object of the watched kind with only
        C{metadata.resourceVersion}, the current version) on every open
        watch that asked for C{allowWatchBookmarks=true}.
        """
        for watch in list(self._watches):
            if watch.bookmarks:
                kind = watch.selector.kind
                self._write(
                    watch,
                    "BOOKMARK",
                    {
                        "kind": kind.kind,
                        "apiVersion": kind.apiVersion,
                        "metadata": {"resourceVersion": self.resourceVersion},
                    },
                )

    def _changed(self, event: _Event) -> None:
        for watch in list(self._watches):
            self._send(watch, event)

    def dropWatches(self) -> None:
        """
        Abruptly close the connection of every open watch; the server keeps
        running.
        """
        for watch in list(self._watches):
            if watch.channel is not None:
                watch.channel.abort()

    def expireWatches(self) -> None:
        """
        Send an C{ERROR} event with a 410 C{Expired} C{Status} on every open
        watch, then end each stream cleanly.
        """
        for watch in list(self._watches):
            self._write(
                watch,
                "ERROR",
                _expired(
                    f"too old resource version: {self._oldestResumable} ({self._rv})"
                ),
            )
            self._endWatch(watch)

    def endWatches(self) -> None:
        """
        End every open watch cleanly, as its C{timeoutSeconds} would.
        """
        for watch in list(self._watches):
            self._endWatch(watch)

    @property
    def watchCount(self) -> int:
        """
        How many watch streams are open.
        """
        return len(self._watches)

    # HTTP

    def _render(self, request: Request) -> bytes | int:
        method = request.method.decode("ascii", "replace")
        target = urlsplit(request.uri.decode("ascii", "replace"))
        query = parse_qs(target.query, keep_blank_values=True)
        self.requests.append((method, target.path, query))
        try:
            if request.getHeader(b"authorization") != f"Bearer {self.token}".encode():
                raise _HTTPError(_status(401, "Unauthorized", "Unauthorized"))
            return self._route(request, method, target.path, query)
        except _HTTPError as e:
            return self._json(request, e.status["code"], e.status)

    def _json(self, request: Request, code: int, body: dict[str, Any]) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    def _route(
        self, request: Request, method: str, path: str, query: dict[str, list[str]]
    ) -> bytes | int:
        segments = tuple(unquote(s) for s in path.strip("/").split("/") if s)
        notFound = _HTTPError(
            _status(404, "NotFound", "the server could not find the requested resource")
        )
        discovery = self._discovery(segments)
        for kind in _KINDS:
            n = len(kind.prefix)
            if segments[:n] != kind.prefix:
                continue
            rest = segments[n:]
            if rest == (kind.plural,):
                namespace, name = None, None
            elif (
                len(rest) in (3, 4)
                and rest[0] == "namespaces"
                and rest[2] == (kind.plural)
            ):
                namespace, name = rest[1], rest[3] if len(rest) == 4 else None
            else:
                continue
            if method != "GET":
                raise _HTTPError(
                    _status(405, "MethodNotAllowed", f"{method} is not supported")
                )
            if kind.plural in self._forbidden:
                verb = "watch" if _boolParam(query, "watch") else "list"
                raise _HTTPError(
                    _status(
                        403,
                        "Forbidden",
                        f'{kind.plural} is forbidden: User "fake-user" cannot'
                        f' {verb} resource "{kind.plural}"',
                        kind=kind.plural,
                    )
                )
            if name is not None:
                assert namespace is not None
                return self._get(request, kind, namespace, name)
            selector = _Selector.parse(kind, namespace, query)
            if _boolParam(query, "watch"):
                return self._watch(request, selector, query)
            return self._list(request, selector, query)
        if discovery is None:
            raise notFound
        if method != "GET":
            raise _HTTPError(
                _status(405, "MethodNotAllowed", f"{method} is not supported")
            )
        return self._json(request, 200, discovery)

    def _discovery(self, segments: tuple[str, ...]) -> dict[str, Any] | None:
        address = f"127.0.0.1:{self.port}"
        if segments == ("version",):
            return {
                "major": "1",
                "minor": "33",
                "gitVersion": "v1.33.0-monedge-fake",
                "gitCommit": "0" * 40,
                "gitTreeState": "clean",
                "buildDate": "2025-01-01T00:00:00Z",
                "goVersion": "go1.24.0",
                "compiler": "gc",
                "platform": "linux/amd64",
            }
        if segments == ("api",):
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": address}
                ],
            }
        if segments == ("apis",):
            version = {"groupVersion": "discovery.k8s.io/v1", "version": "v1"}
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": "discovery.k8s.io",
                        "versions": [version],
                        "preferredVersion": version,
                    }
                ],
            }
        for kind in _KINDS:
            if segments == kind.prefix:
                return {
                    "kind": "APIResourceList",
                    "apiVersion": "v1",
                    "groupVersion": kind.apiVersion,
                    "resources": [
                        {
                            "name": kind.plural,
                            "singularName": kind.kind.lower(),
                            "namespaced": True,
                            "kind": kind.kind,
                            "verbs": ["get", "list", "watch"],
                        }
                    ],
                }
        return None

    def _get(self, request: Request, kind: _Kind, namespace: str, name: str) -> bytes:
        obj = self._objects.get((kind.plural, namespace, name))
        if obj is None:
            raise _HTTPError(
                _status(
                    404,
                    "NotFound",
                    f'{kind.plural} "{name}" not found',
                    name=name,
                    kind=kind.plural,
                )
            )
        return self._json(request, 200, obj)

    def _list(
        self, request: Request, selector: _Selector, query: dict[str, list[str]]
    ) -> bytes:
        limit = _intParam(query, "limit")
        token = query.get("continue", [""])[0]
        if token:
            rv, start = _decodeContinue(token)
            if rv > self._rv:
                raise _badRequest("continue key is not valid")
            if rv < self._oldestResumable:
                raise _HTTPError(
                    _expired(
                        "The provided continue parameter is too old to display a "
                        "consistent list result. You can start a new list without "
                        "the continue parameter."
                    )
                )
            state = self._stateAt(rv)
        else:
            rv, start = self._rv, ("", "")
            state = self._objects
        # The keys in order: the current ones' kept order, or, for a page
        # of a list that began before later changes, that moment's.
        keys = self._keys() if state is self._objects else sorted(state)
        plural = selector.kind.plural
        first = bisect_right(keys, (plural, *start))
        # Keys sort by kind, namespace and name: this kind's (and this
        # namespace's) are one run.
        if selector.namespace is None:
            end = bisect_left(keys, (plural + "\0",))
        else:
            end = bisect_left(keys, (plural, selector.namespace + "\0"))
            first = max(first, bisect_left(keys, (plural, selector.namespace)))
        matching: list[tuple[_Key, dict[str, Any]]] = []
        remaining = 0
        for index in range(first, end):
            key = keys[index]
            obj = state[key]
            if not selector.selectsKey(key) or not selector.matches(obj):
                continue
            if limit and len(matching) == limit:
                # One more: there is a next page.
                remaining = (end - index) if not selector.requirements else 1
                break
            matching.append((key, obj))
        metadata: dict[str, Any] = {"resourceVersion": str(rv)}
        if remaining:
            metadata["continue"] = _encodeContinue(rv, matching[-1][0])
            if not selector.requirements:
                metadata["remainingItemCount"] = remaining
        head = json.dumps(
            {
                "kind": selector.kind.listKind,
                "apiVersion": selector.kind.apiVersion,
                "metadata": metadata,
            }
        ).encode()
        items = b", ".join(
            [
                self._item(key, obj)
                if state is self._objects
                else json.dumps(
                    {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
                ).encode()
                for key, obj in matching
            ]
        )
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        return head[:-1] + b', "items": [' + items + b"]}"

    def _watch(
        self, request: Request, selector: _Selector, query: dict[str, list[str]]
    ) -> int:
        version = query.get("resourceVersion", [""])[0]
        timeoutSeconds = _intParam(query, "timeoutSeconds")
        since: int | None = None
        if version not in ("", "0"):
            try:
                since = int(version)
            except ValueError:
                raise _badRequest(f"invalid resourceVersion: {version!r}") from None
        channel = request.channel
        watch = _Watch(
            request,
            channel if isinstance(channel, _Channel) else None,
            selector,
            _boolParam(query, "allowWatchBookmarks"),
        )
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-cache, private")
        # Send the status line and headers now, as the real server does: the
        # client's watch call returns only once it has them.
        request.write(b"")
        if since is not None and since < self._oldestResumable:
            self._write(
                watch,
                "ERROR",
                _expired(
                    f"too old resource version: {since} ({self._oldestResumable})"
                ),
            )
            request.finish()
            return NOT_DONE_YET
        if since is None:
            for key, obj in sorted(self._objects.items()):
                if selector.selectsKey(key) and selector.matches(obj):
                    self._write(watch, "ADDED", obj)
        else:
            for event in self._events:
                if event.rv > since:
                    self._send(watch, event)
        self._watches.append(watch)
        request.notifyFinish().addBoth(lambda _: self._forget(watch))
        if timeoutSeconds:
            watch.timeout = self._reactor.callLater(
                timeoutSeconds, self._endWatch, watch
            )
        self._watchOpened()
        return NOT_DONE_YET

    def _send(self, watch: _Watch, event: _Event) -> None:
        seen = event.seenBy(watch.selector)
        if seen is not None:
            self._write(watch, seen, event.obj)

    def _write(self, watch: _Watch, type: str, obj: dict[str, Any]) -> None:
        if watch.open:
            line = json.dumps({"type": type, "object": obj}) + "\n"
            watch.request.write(line.encode())

    def _endWatch(self, watch: _Watch) -> None:
        if watch.open:
            watch.request.finish()

    def _forget(self, watch: _Watch) -> None:
        watch.open = False
        if watch in self._watches:
            self._watches.remove(watch)
        if watch.timeout is not None and watch.timeout.active():
            watch.timeout.cancel()
        watch.timeout = None


@dataclass(eq=False)
class _MemoryWatch:
    """
    One open watch of a L{MemoryKubernetes}.
    """

    selector: _Selector
    receive: Callable[[WatchEvent], None]
    done: Deferred[None]


def _compacting(
    kind: str, receive: Callable[[WatchEvent], None], compact: Compactor
) -> Callable[[WatchEvent], None]:
    """
    C{receive}, given each event as L{compactEvent} makes it.
    """

    def compacting(event: WatchEvent) -> None:
        compacted = compactEvent(kind, event.type, event.object, compact)
        if compacted is not None:
            receive(compacted)

    return compacting


@implementer(IKubernetesAPI)
class MemoryKubernetes(FakeCluster):
    """
    An in-memory L{IKubernetesAPI}, for unit tests of what uses one: no
    HTTP, no threads, and nothing happens until the test says.

    Lists answer at once, from the current state.  A watch replays the
    retained changes after its version before C{watchObjects} returns,
    then hears each change as L{apply} and L{delete} make it; it always has
    bookmarks.  The test scripts the rest: L{bookmark}, L{expireWatches}
    (410), L{dropWatches} (a broken connection), L{endWatches} (a clean
    end), L{forbid} (403), and L{stop} and L{start} (the API unreachable,
    then back).  Objects, versions and history behave as L{FakeKubernetes}'
    do: the contract tests in C{tests/registry/test_kubernetes_api.py} run against
    both.

    @param clock: the clock creation timestamps are read from (a new
        L{Clock} by default).
    @ivar requests: every call, in order, refused or not: C{("list", kind,
        namespace)} or C{("watch", kind, namespace, resourceVersion)}.
    @ivar selectors: C{("list" or "watch", kind, labelSelector)} for each
        call that had a label selector.
    """

    def __init__(
        self, clock: IReactorTime | None = None, retainEvents: int = 1000
    ) -> None:
        super().__init__(clock if clock is not None else Clock(), retainEvents)
        self.requests: list[tuple[str | None, ...]] = []
        self.selectors: list[tuple[str, str, str]] = []
        self._watches: list[_MemoryWatch] = []
        self._down = False

    # IKubernetesAPI

    def listObjects(
        self,
        kind: str,
        namespace: str | None,
        labelSelector: str | None = None,
        compact: Compactor | None = None,
    ) -> Deferred[ObjectList]:
        self.requests.append(("list", kind, namespace))
        if labelSelector is not None:
            self.selectors.append(("list", kind, labelSelector))
        refusal = self._refusal(kind)
        if refusal is not None:
            return fail(refusal)
        try:
            selector = self._selector(kind, namespace, labelSelector)
        except KubernetesAPIError as e:
            return fail(e)
        items: list[Any] = []
        for key, obj in sorted(self._objects.items()):
            if selector.selectsKey(key) and selector.matches(obj):
                item = copy.deepcopy(obj)
                item.pop("apiVersion", None)
                item.pop("kind", None)
                if compact is None:
                    items.append(item)
                elif (kept := compact(kind, item)) is not None:
                    items.append(kept)
        return succeed(ObjectList(items, self.resourceVersion))

    def _selector(
        self, kind: str, namespace: str | None, labelSelector: str | None
    ) -> _Selector:
        query = {} if labelSelector is None else {"labelSelector": [labelSelector]}
        try:
            return _Selector.parse(_kindNamed(kind), namespace, query)
        except _HTTPError as e:
            raise KubernetesAPIError(400, str(e.status.get("message"))) from None

    def watchObjects(
        self,
        kind: str,
        namespace: str | None,
        resourceVersion: str,
        receive: Callable[[WatchEvent], None],
        labelSelector: str | None = None,
        compact: Compactor | None = None,
    ) -> Deferred[None]:
        self.requests.append(("watch", kind, namespace, resourceVersion))
        if labelSelector is not None:
            self.selectors.append(("watch", kind, labelSelector))
        refusal = self._refusal(kind)
        if refusal is not None:
            return fail(refusal)
        try:
            selector = self._selector(kind, namespace, labelSelector)
        except KubernetesAPIError as e:
            return fail(e)
        if compact is not None:
            receive = _compacting(kind, receive, compact)
        since: int | None = None
        if resourceVersion not in ("", "0"):
            try:
                since = int(resourceVersion)
            except ValueError:
                return fail(
                    KubernetesAPIError(
                        400, f"BadRequest: invalid resourceVersion: {resourceVersion!r}"
                    )
                )
            if since < self._oldestResumable:
                return fail(
                    ResourceExpired(
                        f"Expired: too old resource version: {since}"
                        f" ({self._oldestResumable})"
                    )
                )

        def cancel(_: Deferred[None]) -> None:
            self._forget(watch)

        watch = _MemoryWatch(selector, receive, Deferred(cancel))
        if since is None:
            for key, obj in sorted(self._objects.items()):
                if watch.selector.selectsKey(key) and watch.selector.matches(obj):
                    receive(WatchEvent("ADDED", copy.deepcopy(obj)))
        else:
            for event in list(self._events):
                if event.rv > since:
                    self._send(watch, event)
        self._watches.append(watch)
        self._watchOpened()
        return watch.done

    def _refusal(self, kind: str) -> Exception | None:
        if self._down:
            return error.ConnectionRefusedError("the fake API is stopped")
        if _kindNamed(kind).plural in self._forbidden:
            return KubernetesAPIError(403, "Forbidden")
        return None

    def _changed(self, event: _Event) -> None:
        for watch in list(self._watches):
            self._send(watch, event)

    def _send(self, watch: _MemoryWatch, event: _Event) -> None:
        seen = event.seenBy(watch.selector)
        if seen is not None:
            watch.receive(WatchEvent(seen, copy.deepcopy(event.obj)))

    def _forget(self, watch: _MemoryWatch) -> bool:
        if watch in self._watches:
            self._watches.remove(watch)
            return True
        return False

    def _endAll(self, outcome: Callable[[Deferred[None]], object]) -> None:
        for watch in list(self._watches):
            if self._forget(watch):
                outcome(watch.done)

    # Test controls

    def bookmark(self) -> None:
        """
        Send a C{BOOKMARK} event (an object of the watched kind with only
        C{metadata.resourceVersion}, the current version) on every open
        watch.
        """
        for watch in list(self._watches):
            kind = watch.selector.kind
            watch.receive(
                WatchEvent(
                    "BOOKMARK",
                    {
                        "kind": kind.kind,
                        "apiVersion": kind.apiVersion,
                        "metadata": {"resourceVersion": self.resourceVersion},
                    },
                )
            )

    def expireWatches(self) -> None:
        """
        Fail every open watch with L{ResourceExpired}, as a 410 C{ERROR}
        event does.
        """
        message = (
            f"Expired: too old resource version: {self._oldestResumable} ({self._rv})"
        )
        self._endAll(lambda d: d.errback(ResourceExpired(message)))

    def dropWatches(self) -> None:
        """
        Fail every open watch with C{ConnectionLost}, as a connection cut
        mid-stream does.
        """
        self._endAll(
            lambda d: d.errback(
                error.ConnectionLost("the watch's connection was dropped")
            )
        )

    def endWatches(self) -> None:
        """
        End every open watch cleanly, as its timeout would.
        """
        self._endAll(lambda d: d.callback(None))

    @property
    def watchCount(self) -> int:
        """
        How many watches are open.
        """
        return len(self._watches)

    def stop(self) -> None:
        """
        The API becomes unreachable: every open watch's connection is
        dropped, and every list and watch fails with
        C{ConnectionRefusedError} until L{start}.  The state survives.
        """
        self._down = True
        self.dropWatches()

    def start(self) -> None:
        """
        The API is reachable again.
        """
        self._down = False


def serviceObject(
    name: str,
    namespace: str = "default",
    ports: list[dict[str, Any]] | None = None,
    annotations: dict[str, str] | None = None,
    resourceVersion: str | None = None,
) -> dict[str, Any]:
    """
    A v1 Service, as tests (and L{FakeKubernetes.apply}) want it: by
    default with one port named C{http}.
    """
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "annotations": dict(annotations or {}),
    }
    if resourceVersion is not None:
        metadata["resourceVersion"] = resourceVersion
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "ports": ports
            if ports is not None
            else [{"name": "http", "port": 80, "targetPort": 8080}]
        },
    }


def endpointSliceObject(
    name: str,
    serviceName: str,
    endpoints: list[dict[str, Any]],
    namespace: str = "default",
    ports: list[dict[str, Any]] | None = None,
    addressType: str = "IPv4",
) -> dict[str, Any]:
    """
    A discovery.k8s.io/v1 EndpointSlice for C{serviceName}: by default one
    port named C{http} (8080).
    """
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": serviceName},
        },
        "addressType": addressType,
        "ports": ports if ports is not None else [{"name": "http", "port": 8080}],
        "endpoints": endpoints,
    }


# Objects shaped like a real cluster's, for benchmarks of scale.


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fieldsV1(*paths: str) -> dict[str, Any]:
    """
    A C{fieldsV1} set, as the API server tracks fields: each path is
    C{|}-separated C{f:}/C{k:} elements; a leaf is C{{}}, and a map below
    the top level that is itself owned holds C{".": {}}.
    """
    root: dict[str, Any] = {}
    for path in paths:
        node = root
        elements = path.split("|")
        for depth, element in enumerate(elements):
            node = node.setdefault(element, {})
            if 0 < depth < len(elements) - 1:
                node.setdefault(".", {})
    return root


def _hexOf(seed: str, length: int) -> str:
    return uuid.uuid5(uuid.NAMESPACE_URL, seed).hex[:length]


def realisticService(
    name: str,
    namespace: str = "default",
    index: int = 0,
    port: int = 80,
    targetPort: int = 8080,
    created: float = 1_700_000_000.0,
) -> dict[str, Any]:
    """
    A v1 Service shaped like one a cluster serves, for benchmarks of scale:
    labels, a few annotations with kubectl's
    C{last-applied-configuration} (a few KB of JSON), three
    C{managedFields} entries, a C{uid} and C{creationTimestamp}, a spec with
    a cluster IP, an C{http} and a C{metrics} port and a selector, and an
    empty load-balancer status.  Deterministic for (C{name},
    C{namespace}, C{index}); L{FakeCluster.apply} replaces its C{uid},
    C{creationTimestamp} and C{resourceVersion} with its own.
    """
    app = name.removeprefix("service-")
    labels = {
        "app": app,
        "app.kubernetes.io/name": app,
        "app.kubernetes.io/instance": f"{app}-{namespace}",
        "app.kubernetes.io/part-of": namespace,
        "app.kubernetes.io/managed-by": "kubectl",
        "app.kubernetes.io/version": f"v1.{index % 97}.{index % 13}",
        "team": f"team-{index % 37}",
        "cost-centre": f"cc-{1000 + index % 211}",
    }
    annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9090",
        "prometheus.io/path": "/metrics",
        "owner": f"team-{index % 37}@example.com",
        "runbook": f"https://runbooks.example.com/{namespace}/{app}",
        "description": (
            f"The {app} service of {namespace}: serves its API to the other "
            "services of the platform and to the edge, with its metrics on "
            "port 9090.  Deployed by the platform pipeline; see the runbook "
            "for alerts, dashboards and escalation."
        ),
        "deploy.example.com/commit": _hexOf(f"{namespace}/{name}/commit", 32) * 2,
        "deploy.example.com/pipeline": (
            f"https://ci.example.com/{namespace}/{app}/pipelines/{100000 + index}"
        ),
        "alerts.example.com/rules": json.dumps(
            [
                {
                    "alert": f"{app}-{signal}",
                    "expr": (
                        f'sum(rate(http_requests_total{{service="{app}",'
                        f'code=~"5.."}}[5m])) / sum(rate(http_requests_total'
                        f'{{service="{app}"}}[5m])) > 0.0{1 + n}'
                    ),
                    "for": f"{5 * (n + 1)}m",
                    "labels": {"severity": severity, "team": f"team-{index % 37}"},
                    "annotations": {
                        "summary": f"{app}: {signal} above its objective",
                        "dashboard": (
                            f"https://grafana.example.com/d/{app}?var-ns={namespace}"
                        ),
                    },
                }
                for n, (signal, severity) in enumerate(
                    (("errors", "page"), ("latency", "page"), ("saturation", "ticket"))
                )
            ],
            separators=(",", ":"),
        ),
    }
    selector = {"app": app, "app.kubernetes.io/instance": f"{app}-{namespace}"}
    ports = [
        {"name": "http", "port": port, "protocol": "TCP", "targetPort": targetPort},
        {"name": "metrics", "port": 9090, "protocol": "TCP", "targetPort": 9090},
    ]
    clusterIP = f"10.{96 + index // 65536 % 16}.{index // 256 % 256}.{index % 256}"
    applied = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "annotations": {
                key: annotations[key]
                for key in sorted(annotations)
                if not key.startswith("deploy.")
            },
            "labels": labels,
            "name": name,
            "namespace": namespace,
        },
        "spec": {"ports": ports, "selector": selector, "type": "ClusterIP"},
    }
    time = _timestamp(created)
    managedFields = [
        {
            "manager": "kubectl-client-side-apply",
            "operation": "Update",
            "apiVersion": "v1",
            "time": time,
            "fieldsType": "FieldsV1",
            "fieldsV1": _fieldsV1(
                *(f"f:metadata|f:annotations|f:{key}" for key in sorted(annotations)),
                "f:metadata|f:annotations|"
                "f:kubectl.kubernetes.io/last-applied-configuration",
                *(f"f:metadata|f:labels|f:{key}" for key in sorted(labels)),
                *(
                    f'f:spec|f:ports|k:{{"port":{p["port"]},"protocol":"TCP"}}|f:{f}'
                    for p in ports
                    for f in ("name", "port", "protocol", "targetPort")
                ),
                *(f"f:spec|f:selector|f:{key}" for key in sorted(selector)),
                "f:spec|f:internalTrafficPolicy",
                "f:spec|f:sessionAffinity",
                "f:spec|f:type",
            ),
        },
        {
            "manager": "kubectl-annotate",
            "operation": "Update",
            "apiVersion": "v1",
            "time": time,
            "fieldsType": "FieldsV1",
            "fieldsV1": _fieldsV1(
                "f:metadata|f:annotations|f:deploy.example.com/commit",
                "f:metadata|f:annotations|f:deploy.example.com/pipeline",
            ),
        },
        {
            "manager": "kube-controller-manager",
            "operation": "Update",
            "apiVersion": "v1",
            "time": time,
            "fieldsType": "FieldsV1",
            "fieldsV1": _fieldsV1("f:status|f:loadBalancer"),
            "subresource": "status",
        },
    ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/{name}")),
            "creationTimestamp": time,
            "labels": labels,
            "annotations": {
                **annotations,
                "kubectl.kubernetes.io/last-applied-configuration": json.dumps(
                    applied, separators=(",", ":"), sort_keys=True
                )
                + "\n",
            },
            "managedFields": managedFields,
        },
        "spec": {
            "clusterIP": clusterIP,
            "clusterIPs": [clusterIP],
            "internalTrafficPolicy": "Cluster",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "ports": ports,
            "selector": selector,
            "sessionAffinity": "None",
            "type": "ClusterIP",
        },
        "status": {"loadBalancer": {}},
    }


def realisticEndpointSlice(
    serviceName: str,
    addresses: list[str],
    port: int,
    namespace: str = "default",
    index: int = 0,
    ready: list[bool] | None = None,
    created: float = 1_700_000_000.0,
) -> dict[str, Any]:
    """
    A discovery.k8s.io/v1 EndpointSlice for C{serviceName} shaped like the
    EndpointSlice controller's: one endpoint per address (ready or not as
    C{ready} says, all ready by default), each with its conditions, a
    C{targetRef} to its Pod, a C{nodeName} and a zone, an C{http} port
    (C{port}) and a C{metrics} port, the controller's labels and
    annotation, an owner reference to the Service and a C{managedFields}
    entry.  Named C{<serviceName>-<5 characters>}; deterministic for its
    arguments.
    """
    app = serviceName.removeprefix("service-")
    readiness = ready if ready is not None else [True] * len(addresses)
    suffix = _hexOf(f"{namespace}/{serviceName}/slice", 5)
    replicaSet = _hexOf(f"{namespace}/{serviceName}/rs", 10)
    endpoints = []
    for i, (address, isReady) in enumerate(zip(addresses, readiness, strict=True)):
        pod = f"{app}-{replicaSet}-{_hexOf(f'{namespace}/{serviceName}/{i}', 5)}"
        endpoints.append(
            {
                "addresses": [address],
                "conditions": {
                    "ready": isReady,
                    "serving": isReady,
                    "terminating": False,
                },
                "nodeName": f"node-{(index + i) % 50:03d}.eu-west-1.compute.internal",
                "targetRef": {
                    "kind": "Pod",
                    "name": pod,
                    "namespace": namespace,
                    "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/{pod}")),
                },
                "zone": f"eu-west-1{'abc'[(index + i) % 3]}",
            }
        )
    name = f"{serviceName}-{suffix}"
    time = _timestamp(created)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "generateName": f"{serviceName}-",
            "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/{name}")),
            "creationTimestamp": time,
            "generation": 1,
            "labels": {
                "app": app,
                "app.kubernetes.io/name": app,
                "endpointslice.kubernetes.io/managed-by": (
                    "endpointslice-controller.k8s.io"
                ),
                "kubernetes.io/service-name": serviceName,
            },
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": time},
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": serviceName,
                    "uid": str(
                        uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/{serviceName}")
                    ),
                    "blockOwnerDeletion": True,
                    "controller": True,
                }
            ],
            "managedFields": [
                {
                    "manager": "kube-controller-manager",
                    "operation": "Update",
                    "apiVersion": "discovery.k8s.io/v1",
                    "time": time,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": _fieldsV1(
                        "f:addressType",
                        "f:endpoints",
                        "f:metadata|f:annotations|"
                        "f:endpoints.kubernetes.io/last-change-trigger-time",
                        "f:metadata|f:generateName",
                        "f:metadata|f:labels|f:app",
                        "f:metadata|f:labels|f:app.kubernetes.io/name",
                        "f:metadata|f:labels|f:endpointslice.kubernetes.io/managed-by",
                        "f:metadata|f:labels|f:kubernetes.io/service-name",
                        "f:metadata|f:ownerReferences",
                        "f:ports",
                    ),
                }
            ],
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [
            {"name": "http", "port": port, "protocol": "TCP"},
            {"name": "metrics", "port": 9090, "protocol": "TCP"},
        ],
    }
