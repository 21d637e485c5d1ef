"""
Contract tests for L{monedge.testing.kubernetes.FakeKubernetes}: the real
C{kubernetes} client (and, for the wire itself, a raw TCP client) against
the fake API server on 127.0.0.1, pinning its list/watch behaviour to the
Kubernetes API concepts ("efficient detection of changes").

The client is blocking, so every call runs in a thread, bounded twice: by
C{timeout_seconds} (or C{_request_timeout}) on the client side and by a
reactor-side timeout on the Deferred.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar, cast

from kubernetes import client as k8s
from kubernetes import config as k8sconfig
from kubernetes import watch as k8swatch
from kubernetes.client.exceptions import ApiException
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from monedge.testing.kubernetes import FakeKubernetes

T = TypeVar("T")

THREAD_TIMEOUT = 10.0
"""
Reactor-side bound on every call made in a thread.
"""

WATCH_SECONDS = 8
"""
Client-side bound (C{timeout_seconds}) on every watch that is not meant to
time out.
"""


def inThread(f: Callable[[], T], timeout: float = THREAD_TIMEOUT) -> Deferred[T]:
    """
    Run C{f} in the reactor's thread pool; fail after C{timeout} seconds.
    """
    d = deferToThread(f)
    d.addTimeout(timeout, reactor)
    return d


def bounded(d: Deferred[T], timeout: float = 5.0) -> Deferred[T]:
    """
    C{d}, failing after C{timeout} seconds.
    """
    d.addTimeout(timeout, reactor)
    return d


def service(
    namespace: str,
    name: str,
    port: int = 80,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """
    A v1 Service manifest.
    """
    metadata: dict[str, Any] = {"namespace": namespace, "name": name}
    if labels is not None:
        metadata["labels"] = labels
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {"ports": [{"port": port, "protocol": "TCP"}]},
    }


def endpointSlice(namespace: str, name: str, *addresses: str) -> dict[str, Any]:
    """
    A discovery.k8s.io/v1 EndpointSlice manifest for Service C{name}.
    """
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": namespace,
            "name": f"{name}-abcde",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [address], "conditions": {"ready": True}}
            for address in addresses
        ],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


class Clients:
    """
    The real client's APIs, configured from a kubeconfig without touching
    the global default configuration.  The APIs are typed C{Any}: every
    field of the client's models is optional, and these tests read them
    without narrowing each one.
    """

    def __init__(self, kubeconfig: str) -> None:
        configuration = k8s.Configuration()
        k8sconfig.load_kube_config(
            config_file=kubeconfig, client_configuration=configuration
        )
        self.apiClient = k8s.ApiClient(configuration)
        self.core: Any = k8s.CoreV1Api(self.apiClient)
        self.discovery: Any = k8s.DiscoveryV1Api(self.apiClient)


def collect(
    watch: Any,
    func: Callable[..., Any],
    count: int,
    onEvent: Callable[[], None] = lambda: None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """
    Blocking: the events of C{watch.stream(func, **kwargs)} until C{count}
    have arrived (then stop the watch) or the stream ends; C{onEvent} is
    called after each.
    """
    events: list[dict[str, Any]] = []
    for event in watch.stream(func, **kwargs):
        events.append(event)
        onEvent()
        if len(events) >= count:
            watch.stop()
    return events


def threadSignal() -> tuple[Callable[[], None], Deferred[None]]:
    """
    A function any thread may call, and a Deferred that fires (on the
    reactor) the first time it is called; it fails after 5 seconds.
    """
    fired: Deferred[None] = Deferred()

    def fire() -> None:
        if not fired.called:
            fired.callback(None)

    fromThreads = cast(IReactorFromThreads, reactor)
    return (lambda: fromThreads.callFromThread(fire)), bounded(fired)


def raised(f: Callable[[], object]) -> Callable[[], BaseException | None]:
    """
    C{f}, returning the exception it raises instead (L{None} if none).
    """

    def call() -> BaseException | None:
        try:
            f()
        except Exception as e:
            return e
        return None

    return call


def summary(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """
    (type, namespace/name) of each event, from its raw object.
    """
    return [
        (
            e["type"],
            f"{e['raw_object']['metadata'].get('namespace')}"
            f"/{e['raw_object']['metadata'].get('name')}",
        )
        for e in events
    ]


def statusOf(error: ApiException) -> dict[str, Any]:
    """
    The C{Status} object in an error's body.
    """
    assert error.body is not None
    status: dict[str, Any] = json.loads(error.body)
    return status


def versions(events: list[dict[str, Any]]) -> list[int]:
    return [int(e["raw_object"]["metadata"]["resourceVersion"]) for e in events]


class RawClient(Protocol):
    """
    A raw TCP client: records every byte and lets the test wait for some.
    """

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[bytes] = Deferred()
        self._waiting: list[tuple[bytes, Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for marker, waiter in list(self._waiting):
            if marker in self.data:
                self._waiting.remove((marker, waiter))
                waiter.callback(None)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.closed.callback(self.data)

    def until(self, marker: bytes) -> Deferred[None]:
        """
        Fire once C{marker} has arrived; fail after 5 seconds.
        """
        if marker in self.data:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiting.append((marker, waiter))
        return bounded(waiter)


async def rawConnect(port: int, target: str, token: str | None) -> RawClient:
    """
    Send C{GET target} (with C{Connection: close}) on a new connection.
    """
    protocol = RawClient()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await bounded(connectProtocol(endpoint, protocol))
    headers = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if token is not None:
        headers.append(f"Authorization: Bearer {token}")
    assert protocol.transport is not None
    protocol.transport.write(("\r\n".join(headers) + "\r\n\r\n").encode())
    return protocol


def parseResponse(data: bytes) -> tuple[int, dict[str, str], list[bytes]]:
    """
    Status, headers (lower-cased names) and body of a raw HTTP/1.1 response;
    a chunked body as its list of chunks, any other as one.
    """
    head, _, body = data.partition(b"\r\n\r\n")
    statusLine, *headerLines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in headerLines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") != "chunked":
        return int(statusLine.split()[1]), headers, [body]
    chunks = []
    while True:
        size, _, rest = body.partition(b"\r\n")
        length = int(size, 16)
        if length == 0:
            break
        chunks.append(rest[:length])
        assert rest[length : length + 2] == b"\r\n", rest[: length + 2]
        body = rest[length + 2 :]
    return int(statusLine.split()[1]), headers, chunks


class FakeKubernetesTests(TestCase):
    """
    The fake against the real client, one fake and one client per test.
    """

    timeout = 30

    def setUp(self) -> None:
        self.fake = self.startFake()
        self.clients = self.connect(self.fake)
        self.core = self.clients.core
        self.discovery = self.clients.discovery

    def startFake(self, retainEvents: int = 1000) -> FakeKubernetes:
        """
        A started fake, stopped after the test.
        """
        fake = FakeKubernetes(retainEvents=retainEvents)
        fake.start()
        self.addCleanup(fake.stop)
        return fake

    def connect(self, fake: FakeKubernetes) -> Clients:
        """
        Real clients for C{fake}, from its kubeconfig; closed after the test.
        """
        clients = Clients(fake.writeKubeconfig(self.mktemp()))
        self.addCleanup(clients.apiClient.close)
        return clients

    def openWatch(
        self, func: Callable[..., Any], count: int, **kwargs: Any
    ) -> tuple[Any, Deferred[list[dict[str, Any]]]]:
        """
        A real C{Watch} collecting C{count} events of C{func} in a thread;
        stopped after the test whatever happens.
        """
        watch = k8swatch.Watch()
        self.addCleanup(watch.stop)
        return watch, inThread(lambda: collect(watch, func, count, **kwargs))

    def watchRequests(self) -> list[dict[str, list[str]]]:
        """
        The query of every watch request the fake received.
        """
        return [query for _, _, query in self.fake.requests if "watch" in query]

    async def test_listReturnsObjectsAndListVersion(self) -> None:
        """
        A list answers every object of its kind sorted by namespace and name,
        each with its own resourceVersion, under a C{ServiceList} /
        C{EndpointSliceList} whose resourceVersion is the current one; the
        raw items carry no kind/apiVersion, as the real server's don't.
        """
        a = self.fake.apply(service("zeta", "a"))
        b = self.fake.apply(service("alpha", "b"))
        c = self.fake.apply(service("alpha", "a"))
        slice_ = self.fake.apply(endpointSlice("alpha", "a", "10.0.0.1"))

        listed = await inThread(self.core.list_service_for_all_namespaces)
        self.assertEqual(listed.metadata.resource_version, self.fake.resourceVersion)
        self.assertEqual(
            [(i.metadata.namespace, i.metadata.name) for i in listed.items],
            [("alpha", "a"), ("alpha", "b"), ("zeta", "a")],
        )
        self.assertEqual(
            [i.metadata.resource_version for i in listed.items],
            [o["metadata"]["resourceVersion"] for o in (c, b, a)],
        )
        self.assertEqual(listed.items[0].spec.ports[0].port, 80)

        raw = await inThread(
            lambda: (
                self.core.list_namespaced_service("alpha", _preload_content=False).data
            )
        )
        document = json.loads(raw)
        self.assertEqual(document["kind"], "ServiceList")
        self.assertEqual(document["apiVersion"], "v1")
        self.assertNotIn("kind", document["items"][0])
        self.assertNotIn("apiVersion", document["items"][0])

        slices = await inThread(self.discovery.list_endpoint_slice_for_all_namespaces)
        self.assertEqual([s.metadata.name for s in slices.items], ["a-abcde"])
        self.assertEqual(slices.items[0].address_type, "IPv4")
        self.assertEqual(slices.items[0].endpoints[0].addresses, ["10.0.0.1"])
        self.assertEqual(
            slices.items[0].metadata.resource_version,
            slice_["metadata"]["resourceVersion"],
        )
        self.assertEqual(slices.metadata.resource_version, self.fake.resourceVersion)

        one = await inThread(lambda: self.core.read_namespaced_service("a", "zeta"))
        self.assertEqual(one.metadata.uid, a["metadata"]["uid"])

    async def test_applyAndDeleteBumpResourceVersion(self) -> None:
        """
        Every apply and delete makes a new, larger global resourceVersion;
        create sets uid and creationTimestamp, replace keeps them; apply
        returns a copy; deleting a missing object or applying another kind
        fails.
        """
        start = int(self.fake.resourceVersion)
        created = self.fake.apply(service("default", "a"))
        self.assertEqual(int(created["metadata"]["resourceVersion"]), start + 1)
        self.assertTrue(created["metadata"]["uid"])
        self.assertTrue(created["metadata"]["creationTimestamp"].endswith("Z"))
        replaced = self.fake.apply(service("default", "a", port=81))
        self.assertEqual(int(replaced["metadata"]["resourceVersion"]), start + 2)
        self.assertEqual(replaced["metadata"]["uid"], created["metadata"]["uid"])
        self.assertEqual(
            replaced["metadata"]["creationTimestamp"],
            created["metadata"]["creationTimestamp"],
        )
        replaced["spec"]["ports"][0]["port"] = 1
        self.assertEqual(self.fake.services()[0]["spec"]["ports"][0]["port"], 81)
        self.fake.apply(endpointSlice("default", "a", "10.0.0.1"))
        self.assertEqual(int(self.fake.resourceVersion), start + 3)
        self.fake.delete("Service", "default", "a")
        self.assertEqual(int(self.fake.resourceVersion), start + 4)
        self.assertEqual(self.fake.services(), [])
        self.assertEqual(len(self.fake.endpointSlices()), 1)
        self.assertRaises(KeyError, self.fake.delete, "Service", "default", "a")
        self.assertRaises(
            ValueError, self.fake.apply, {"apiVersion": "v1", "kind": "Pod"}
        )
        self.assertEqual(int(self.fake.resourceVersion), start + 4)

        listed = await inThread(self.core.list_service_for_all_namespaces)
        self.assertEqual(listed.metadata.resource_version, str(start + 4))
        self.assertEqual(listed.items, [])

    async def test_watchFromListVersionSeesChangesInOrder(self) -> None:
        """
        A watch from a list's resourceVersion replays the changes made since
        the list, then streams new ones as they happen: ADDED, MODIFIED and
        DELETED in order, each with a larger resourceVersion, and only of
        the watched kind.
        """
        self.fake.apply(service("default", "a"))
        listed = await inThread(self.core.list_service_for_all_namespaces)
        listVersion = listed.metadata.resource_version
        self.fake.apply(service("default", "b"))

        watch, events = self.openWatch(
            self.core.list_service_for_all_namespaces,
            4,
            resource_version=listVersion,
            timeout_seconds=WATCH_SECONDS,
        )
        await bounded(self.fake.whenWatching())
        self.fake.apply(service("default", "a", port=81))
        self.fake.apply(endpointSlice("default", "a", "10.0.0.1"))
        self.fake.delete("Service", "default", "b")
        self.fake.apply(service("other", "c"))

        seen = await events
        self.assertEqual(
            summary(seen),
            [
                ("ADDED", "default/b"),
                ("MODIFIED", "default/a"),
                ("DELETED", "default/b"),
                ("ADDED", "other/c"),
            ],
        )
        rvs = versions(seen)
        self.assertEqual(rvs, sorted(set(rvs)))
        self.assertGreater(rvs[0], int(listVersion))
        self.assertEqual(seen[1]["object"].spec.ports[0].port, 81)
        self.assertEqual(watch.resource_version, self.fake.resourceVersion)
        [query] = self.watchRequests()
        self.assertEqual(query["resourceVersion"], [listVersion])

    async def test_watchFromZeroSendsSyntheticAdded(self) -> None:
        """
        A watch from resourceVersion "0" (or none) first gets a synthetic
        ADDED for every current object, each with its own resourceVersion,
        then the changes that follow.
        """
        a = self.fake.apply(service("default", "a"))
        b = self.fake.apply(service("default", "b"))
        self.fake.apply(service("default", "a", port=81))

        _, events = self.openWatch(
            self.core.list_service_for_all_namespaces,
            3,
            resource_version="0",
            timeout_seconds=WATCH_SECONDS,
        )
        await bounded(self.fake.whenWatching())
        self.fake.apply(service("default", "c"))
        seen = await events
        self.assertEqual(
            summary(seen),
            [("ADDED", "default/a"), ("ADDED", "default/b"), ("ADDED", "default/c")],
        )
        self.assertEqual(seen[0]["object"].spec.ports[0].port, 81)
        self.assertGreater(versions(seen)[0], int(a["metadata"]["resourceVersion"]))
        self.assertEqual(versions(seen)[1], int(b["metadata"]["resourceVersion"]))

        _, events = self.openWatch(
            self.core.list_service_for_all_namespaces,
            3,
            timeout_seconds=WATCH_SECONDS,
        )
        seen = await events
        self.assertEqual(
            summary(seen),
            [("ADDED", "default/a"), ("ADDED", "default/b"), ("ADDED", "default/c")],
        )

    async def test_watchEndsCleanlyAfterTimeoutSeconds(self) -> None:
        """
        C{timeoutSeconds} ends the stream cleanly on time: the client's
        stream ends without an error and, given C{timeout_seconds}, does not
        watch again.
        """
        started = time.monotonic()
        _, events = self.openWatch(
            self.core.list_service_for_all_namespaces, 10, timeout_seconds=1
        )
        self.assertEqual(await events, [])
        self.assertLess(time.monotonic() - started, 4)
        self.assertEqual(self.fake.watchCount, 0)
        self.assertEqual(len(self.watchRequests()), 1)

    async def test_bookmarks(self) -> None:
        """
        C{bookmark()} sends a BOOKMARK carrying the current resourceVersion
        only to watches that allowed bookmarks; the client yields it with
        the raw object and moves C{Watch.resource_version} to it.
        """
        start = self.fake.resourceVersion
        withBookmarks, bookmarked = self.openWatch(
            self.discovery.list_endpoint_slice_for_all_namespaces,
            2,
            resource_version=start,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS,
        )
        _, plain = self.openWatch(
            self.discovery.list_endpoint_slice_for_all_namespaces,
            1,
            resource_version=start,
            timeout_seconds=WATCH_SECONDS,
        )
        await bounded(self.fake.whenWatching(2))
        self.fake.apply(service("default", "a"))
        self.fake.bookmark()
        current = self.fake.resourceVersion
        self.fake.apply(endpointSlice("default", "a", "10.0.0.1"))

        seenWithBookmarks = await bookmarked
        self.assertEqual([e["type"] for e in seenWithBookmarks], ["BOOKMARK", "ADDED"])
        bookmark = seenWithBookmarks[0]["raw_object"]
        self.assertEqual(
            bookmark,
            {
                "kind": "EndpointSlice",
                "apiVersion": "discovery.k8s.io/v1",
                "metadata": {"resourceVersion": current},
            },
        )
        self.assertEqual(withBookmarks.resource_version, self.fake.resourceVersion)
        self.assertEqual([e["type"] for e in await plain], ["ADDED"])

    async def test_bookmarkMovesResumeVersion(self) -> None:
        """
        The client resumes from a bookmark's resourceVersion: with a
        bookmark the only event seen, C{Watch.resource_version} is the
        bookmark's.
        """
        watch, events = self.openWatch(
            self.core.list_service_for_all_namespaces,
            1,
            resource_version=self.fake.resourceVersion,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS,
        )
        await bounded(self.fake.whenWatching())
        self.fake.apply(endpointSlice("default", "a", "10.0.0.1"))
        self.fake.bookmark()
        [event] = await events
        self.assertEqual(event["type"], "BOOKMARK")
        self.assertIsInstance(event["object"], dict)
        self.assertEqual(watch.resource_version, self.fake.resourceVersion)

    async def test_watchFromCompactedVersionRetriesOnceThenRaisesGone(
        self,
    ) -> None:
        """
        A watch from a compacted resourceVersion gets an ERROR event with a
        410 C{Expired} Status and the stream ends.  The client's C{Watch}
        (without C{timeout_seconds}) watches once more from the same
        version, gets the 410 again and raises C{ApiException(status=410)}.
        """
        old = self.fake.apply(service("default", "a"))["metadata"]["resourceVersion"]
        self.fake.apply(service("default", "b"))
        self.fake.compact()
        watch = k8swatch.Watch()
        self.addCleanup(watch.stop)
        error = await inThread(
            raised(
                lambda: list(
                    watch.stream(
                        self.core.list_service_for_all_namespaces,
                        resource_version=old,
                        _request_timeout=5,
                    )
                )
            )
        )
        assert isinstance(error, ApiException), error
        self.assertEqual(error.status, 410)
        self.assertIn("Expired", error.reason)
        self.assertEqual(
            [q["resourceVersion"] for q in self.watchRequests()], [[old], [old]]
        )
        self.assertEqual(self.fake.watchCount, 0)

    async def test_watchFromCompactedVersionWithTimeoutRaisesAtOnce(
        self,
    ) -> None:
        """
        Given C{timeout_seconds}, the client does not retry: the 410 ERROR
        event raises C{ApiException(status=410)} after one watch request.  A
        watch from the current version after compaction works.
        """
        old = self.fake.resourceVersion
        self.fake.apply(service("default", "a"))
        self.fake.compact()
        watch = k8swatch.Watch()
        self.addCleanup(watch.stop)
        error = await inThread(
            raised(
                lambda: list(
                    watch.stream(
                        self.core.list_service_for_all_namespaces,
                        resource_version=old,
                        timeout_seconds=WATCH_SECONDS,
                    )
                )
            )
        )
        assert isinstance(error, ApiException), error
        self.assertEqual(error.status, 410)
        self.assertEqual(len(self.watchRequests()), 1)

        _, events = self.openWatch(
            self.core.list_service_for_all_namespaces,
            1,
            resource_version=self.fake.resourceVersion,
            timeout_seconds=WATCH_SECONDS,
        )
        await bounded(self.fake.whenWatching())
        self.fake.apply(service("default", "b"))
        self.assertEqual(summary(await events), [("ADDED", "default/b")])

    async def test_retainEventsBoundsHistory(self) -> None:
        """
        Only the last C{retainEvents} changes can be resumed from: a watch
        from just before them replays them, a watch from any older version
        gets a 410.
        """
        fake = self.startFake(retainEvents=2)
        core = self.connect(fake).core
        before = fake.resourceVersion
        fake.apply(service("default", "a"))
        fake.apply(service("default", "b"))
        fake.apply(service("default", "c"))
        watch = k8swatch.Watch()
        self.addCleanup(watch.stop)
        error = await inThread(
            raised(
                lambda: list(
                    watch.stream(
                        core.list_service_for_all_namespaces,
                        resource_version=before,
                        timeout_seconds=WATCH_SECONDS,
                    )
                )
            )
        )
        assert isinstance(error, ApiException), error
        self.assertEqual(error.status, 410)

        _, events = self.openWatch(
            core.list_service_for_all_namespaces,
            2,
            resource_version=str(int(before) + 1),
            timeout_seconds=WATCH_SECONDS,
        )
        self.assertEqual(
            summary(await events), [("ADDED", "default/b"), ("ADDED", "default/c")]
        )

    async def test_expireWatches(self) -> None:
        """
        C{expireWatches()} sends a 410 ERROR event and ends every stream: a
        client given C{timeout_seconds} raises C{ApiException(status=410)};
        one without it silently watches again from the last version it saw
        and misses nothing.
        """
        watch = k8swatch.Watch()
        self.addCleanup(watch.stop)
        strict = inThread(
            raised(
                lambda: list(
                    watch.stream(
                        self.core.list_service_for_all_namespaces,
                        resource_version=self.fake.resourceVersion,
                        timeout_seconds=WATCH_SECONDS,
                    )
                )
            )
        )
        await bounded(self.fake.whenWatching())
        self.fake.expireWatches()
        error = await strict
        assert isinstance(error, ApiException), error
        self.assertEqual(error.status, 410)
        self.assertEqual(self.fake.watchCount, 0)

        watchedFrom = len(self.fake.requests)
        _, events = self.openWatch(
            self.core.list_service_for_all_namespaces,
            2,
            resource_version=self.fake.resourceVersion,
            _request_timeout=5,
        )
        await bounded(self.fake.whenWatching())
        seenVersion = self.fake.apply(service("default", "a"))["metadata"][
            "resourceVersion"
        ]
        self.fake.expireWatches()
        self.fake.apply(service("default", "b"))
        await bounded(self.fake.whenWatching())
        self.fake.apply(service("default", "c"))
        self.assertEqual(
            summary(await events), [("ADDED", "default/a"), ("ADDED", "default/b")]
        )
        resumed = [q["resourceVersion"] for _, _, q in self.fake.requests[watchedFrom:]]
        self.assertEqual(resumed[1:], [[seenVersion]])

    async def test_pagination(self) -> None:
        """
        C{limit} and C{continue} page through a consistent snapshot: later
        pages show the objects as they were at the first page's version,
        under that version; pages cover every object exactly once, across
        namespaces in the list's order; a continue token whose snapshot was
        compacted away gets a 410.
        """
        for name in "abcde":
            self.fake.apply(service("default", name))
        first = await inThread(
            lambda: self.core.list_namespaced_service("default", limit=2)
        )
        snapshot = first.metadata.resource_version
        self.assertEqual([i.metadata.name for i in first.items], ["a", "b"])
        self.assertEqual(first.metadata.remaining_item_count, 3)
        token = first.metadata._continue
        self.assertTrue(token)

        self.fake.apply(service("default", "c", port=81))
        self.fake.delete("Service", "default", "d")
        self.fake.apply(service("default", "zz"))

        second = await inThread(
            lambda: self.core.list_namespaced_service(
                "default", limit=2, _continue=token
            )
        )
        self.assertEqual([i.metadata.name for i in second.items], ["c", "d"])
        self.assertEqual(second.items[0].spec.ports[0].port, 80)
        self.assertEqual(second.metadata.resource_version, snapshot)
        third = await inThread(
            lambda: self.core.list_namespaced_service(
                "default", limit=2, _continue=second.metadata._continue
            )
        )
        self.assertEqual([i.metadata.name for i in third.items], ["e"])
        self.assertIsNone(third.metadata._continue)

        self.fake.apply(service("x", "b"))
        self.fake.apply(service("x-y", "a"))
        whole = await inThread(self.core.list_service_for_all_namespaces)
        paged: list[str] = []
        token = None
        for _ in range(20):
            page = await inThread(
                partial(
                    self.core.list_service_for_all_namespaces, limit=1, _continue=token
                )
            )
            paged += [f"{i.metadata.namespace}/{i.metadata.name}" for i in page.items]
            token = page.metadata._continue
            if token is None:
                break
        self.assertEqual(
            paged, [f"{i.metadata.namespace}/{i.metadata.name}" for i in whole.items]
        )

        current = await inThread(
            lambda: self.core.list_namespaced_service("default", limit=2)
        )
        self.assertEqual([i.metadata.name for i in current.items], ["a", "b"])
        self.fake.apply(service("default", "a", port=82))
        self.fake.compact()
        error = await inThread(
            raised(
                lambda: self.core.list_namespaced_service(
                    "default", limit=2, _continue=current.metadata._continue
                )
            )
        )
        assert isinstance(error, ApiException), error
        self.assertEqual(error.status, 410)
        self.assertEqual(statusOf(error)["reason"], "Expired")

    async def test_dropWatchesBreaksStreamPromptly(self) -> None:
        """
        C{dropWatches()} aborts every watch connection: the client's stream
        raises a connection error (urllib3's C{ProtocolError}) at once,
        without waiting for C{timeout_seconds}; the server keeps serving.
        """
        self.fake.apply(service("default", "a"))
        watch = k8swatch.Watch()
        self.addCleanup(watch.stop)
        onEvent, streaming = threadSignal()
        outcome = inThread(
            raised(
                lambda: collect(
                    watch,
                    self.core.list_service_for_all_namespaces,
                    10,
                    onEvent,
                    timeout_seconds=WATCH_SECONDS,
                )
            )
        )
        # Drop only once the client has the stream: dropped before the
        # response headers, the request would be retried by urllib3.
        await streaming
        dropped = time.monotonic()
        self.fake.dropWatches()
        error = await outcome
        self.assertLess(time.monotonic() - dropped, WATCH_SECONDS / 2)
        self.assertIsNotNone(error, "the stream ended as if cleanly")
        self.assertNotIsInstance(error, ApiException)
        self.assertIn("Connection broken", str(error))
        self.assertEqual(self.fake.watchCount, 0)
        self.assertEqual(len(self.watchRequests()), 1)
        listed = await inThread(self.core.list_service_for_all_namespaces)
        self.assertEqual([i.metadata.name for i in listed.items], ["a"])

    async def test_stopAndRestartOnSamePort(self) -> None:
        """
        C{stop()} kills open watches abruptly and refuses connections;
        C{start(port)} serves again on the same port with the state kept,
        and the same client lists again.
        """
        self.fake.apply(service("default", "a"))
        port = self.fake.port
        watch = k8swatch.Watch()
        self.addCleanup(watch.stop)
        onEvent, streaming = threadSignal()
        outcome = inThread(
            raised(
                lambda: collect(
                    watch,
                    self.core.list_service_for_all_namespaces,
                    10,
                    onEvent,
                    timeout_seconds=WATCH_SECONDS,
                )
            )
        )
        await streaming
        await bounded(self.fake.stop())
        self.assertIn("Connection broken", str(await outcome))
        self.assertEqual(self.fake.watchCount, 0)
        refused = await inThread(
            raised(
                lambda: self.core.list_service_for_all_namespaces(_request_timeout=2)
            )
        )
        self.assertIsNotNone(refused)

        self.assertEqual(self.fake.start(port), port)
        self.fake.apply(service("default", "b"))
        listed = await inThread(self.core.list_service_for_all_namespaces)
        self.assertEqual([i.metadata.name for i in listed.items], ["a", "b"])
        self.assertEqual(listed.metadata.resource_version, self.fake.resourceVersion)

    async def test_namespacedListAndWatchSeeOnlyTheirNamespace(self) -> None:
        """
        Namespaced list and watch paths see only objects in their namespace.
        """
        self.fake.apply(service("one", "a"))
        self.fake.apply(service("two", "b"))
        self.fake.apply(endpointSlice("one", "a", "10.0.0.1"))
        self.fake.apply(endpointSlice("two", "b", "10.0.0.2"))
        listed = await inThread(lambda: self.core.list_namespaced_service("one"))
        self.assertEqual([i.metadata.name for i in listed.items], ["a"])
        slices = await inThread(
            lambda: self.discovery.list_namespaced_endpoint_slice("two")
        )
        self.assertEqual([s.metadata.name for s in slices.items], ["b-abcde"])

        _, services = self.openWatch(
            self.core.list_namespaced_service,
            2,
            namespace="one",
            resource_version="0",
            timeout_seconds=WATCH_SECONDS,
        )
        _, endpoints = self.openWatch(
            self.discovery.list_namespaced_endpoint_slice,
            1,
            namespace="one",
            resource_version=self.fake.resourceVersion,
            timeout_seconds=WATCH_SECONDS,
        )
        await bounded(self.fake.whenWatching(2))
        self.fake.apply(service("two", "c"))
        self.fake.apply(endpointSlice("two", "c", "10.0.0.3"))
        self.fake.apply(service("one", "d"))
        self.fake.apply(endpointSlice("one", "d", "10.0.0.4"))
        self.assertEqual(
            summary(await services), [("ADDED", "one/a"), ("ADDED", "one/d")]
        )
        self.assertEqual(summary(await endpoints), [("ADDED", "one/d-abcde")])

    async def test_labelSelectors(self) -> None:
        """
        C{labelSelector} filters lists; a watch with one sees ADDED when an
        object starts matching and DELETED when it stops, as the real server
        sends them; its synthetic ADDED events are filtered too.
        """
        self.fake.apply(service("default", "a", labels={"app": "x"}))
        self.fake.apply(service("default", "b", labels={"app": "y"}))
        self.fake.apply(service("default", "c"))

        async def names(selector: str) -> list[str]:
            listed = await inThread(
                lambda: self.core.list_namespaced_service(
                    "default", label_selector=selector
                )
            )
            return [i.metadata.name for i in listed.items]

        self.assertEqual(await names("app=x"), ["a"])
        self.assertEqual(await names("app"), ["a", "b"])
        self.assertEqual(await names("!app"), ["c"])
        self.assertEqual(await names("app!=x"), ["b", "c"])
        self.assertEqual(await names("app in (x, y)"), ["a", "b"])
        self.assertEqual(await names("app notin (x),app"), ["b"])
        bad = await inThread(
            raised(
                lambda: self.core.list_namespaced_service(
                    "default", label_selector="app in x"
                )
            )
        )
        assert isinstance(bad, ApiException), bad
        self.assertEqual(bad.status, 400)

        _, events = self.openWatch(
            self.core.list_namespaced_service,
            4,
            namespace="default",
            label_selector="app=x",
            resource_version="0",
            timeout_seconds=WATCH_SECONDS,
        )
        await bounded(self.fake.whenWatching())
        self.fake.apply(service("default", "b", labels={"app": "x"}))
        self.fake.apply(service("default", "c", port=81))
        self.fake.apply(service("default", "a", labels={"app": "z"}))
        self.fake.delete("Service", "default", "b")
        self.assertEqual(
            summary(await events),
            [
                ("ADDED", "default/a"),
                ("ADDED", "default/b"),
                ("DELETED", "default/a"),
                ("DELETED", "default/b"),
            ],
        )

    async def test_forbidAndEndWatches(self) -> None:
        """
        C{forbid(kind)} refuses that kind's lists and watches with a 403
        C{Forbidden} C{Status} (other kinds are served) until
        C{forbid(kind, False)}; C{endWatches()} ends every open watch
        cleanly, as its C{timeoutSeconds} would, long before it.
        """
        self.fake.forbid("EndpointSlice")
        for call in [
            self.discovery.list_endpoint_slice_for_all_namespaces,
            lambda: self.discovery.list_namespaced_endpoint_slice(
                "default", watch=True, _preload_content=False
            ),
        ]:
            error = await inThread(raised(call))
            assert isinstance(error, ApiException), error
            self.assertEqual(error.status, 403)
            status = statusOf(error)
            self.assertEqual(
                (status["kind"], status["reason"], status["code"]),
                ("Status", "Forbidden", 403),
            )
            self.assertIn("endpointslices is forbidden", status["message"])
        await inThread(self.core.list_service_for_all_namespaces)
        self.fake.forbid("endpointslices", False)
        await inThread(self.discovery.list_endpoint_slice_for_all_namespaces)

        self.fake.apply(service("default", "a"))
        watch, events = self.openWatch(
            self.core.list_service_for_all_namespaces,
            10,
            resource_version="0",
            timeout_seconds=WATCH_SECONDS,
        )
        await bounded(self.fake.whenWatching())
        started = time.monotonic()
        self.fake.endWatches()
        self.assertEqual(summary(await events), [("ADDED", "default/a")])
        self.assertLess(time.monotonic() - started, WATCH_SECONDS / 2)
        self.assertEqual(self.fake.watchCount, 0)

    async def test_unauthorizedWithoutToken(self) -> None:
        """
        A request without the kubeconfig's bearer token, or with another,
        gets a 401 with a C{Status} body.
        """
        for token in (None, "wrong"):
            configuration = k8s.Configuration(host=self.fake.url)
            if token is not None:
                configuration.api_key = {"BearerToken": token}
                configuration.api_key_prefix = {"BearerToken": "Bearer"}
            apiClient = k8s.ApiClient(configuration)
            self.addCleanup(apiClient.close)
            core = k8s.CoreV1Api(apiClient)
            error = await inThread(raised(core.list_service_for_all_namespaces))
            assert isinstance(error, ApiException), error
            self.assertEqual(error.status, 401)
            status = statusOf(error)
            self.assertEqual(
                (status["kind"], status["status"], status["reason"], status["code"]),
                ("Status", "Failure", "Unauthorized", 401),
            )

    async def test_unknownPathsAreNotFound(self) -> None:
        """
        Unknown paths and missing objects get a 404 with a C{NotFound}
        C{Status} body.
        """
        error = await inThread(raised(self.core.list_pod_for_all_namespaces))
        assert isinstance(error, ApiException), error
        self.assertEqual(error.status, 404)
        status = statusOf(error)
        self.assertEqual(
            (status["kind"], status["apiVersion"], status["status"]),
            ("Status", "v1", "Failure"),
        )
        self.assertEqual((status["reason"], status["code"]), ("NotFound", 404))

        missing = await inThread(
            raised(lambda: self.core.read_namespaced_service("nope", "default"))
        )
        assert isinstance(missing, ApiException), missing
        self.assertEqual(missing.status, 404)
        self.assertEqual(statusOf(missing)["reason"], "NotFound")

    async def test_discovery(self) -> None:
        """
        C{/version}, C{/api} and C{/apis} answer enough for the client's
        discovery calls.
        """
        version = await inThread(k8s.VersionApi(self.clients.apiClient).get_code)
        self.assertEqual(version.major, "1")
        core = await inThread(k8s.CoreApi(self.clients.apiClient).get_api_versions)
        self.assertEqual(core.versions, ["v1"])
        groups = await inThread(k8s.ApisApi(self.clients.apiClient).get_api_versions)
        self.assertEqual([g.name for g in groups.groups], ["discovery.k8s.io"])

    async def test_rawWireIsChunkedJSONLines(self) -> None:
        """
        On the wire a watch is a 200 C{application/json} response with
        chunked transfer encoding whose headers come at once, before any
        event, then one JSON event per line, each flushed as its own chunk
        when it happens; C{timeoutSeconds} ends it with the
        last chunk.  A watch from a compacted version is a 200 stream of one
        ERROR event (a 410 C{Expired} C{Status}); other errors are JSON
        C{Status} bodies.
        """
        raw = await rawConnect(
            self.fake.port,
            "/api/v1/namespaces/default/services?watch=1&allowWatchBookmarks=true"
            f"&timeoutSeconds=1&resourceVersion={self.fake.resourceVersion}",
            self.fake.token,
        )
        await raw.until(b"\r\n\r\n")
        self.assertEqual(raw.data.partition(b"\r\n\r\n")[2], b"")
        self.fake.apply(service("default", "a"))
        await raw.until(b'"ADDED"')
        self.fake.apply(service("default", "a", port=81))
        await raw.until(b'"MODIFIED"')
        self.fake.bookmark()
        await raw.until(b'"BOOKMARK"')
        data = await bounded(raw.closed)

        code, headers, chunks = parseResponse(data)
        self.assertEqual(code, 200)
        self.assertEqual(headers["transfer-encoding"], "chunked")
        self.assertEqual(headers["content-type"], "application/json")
        self.assertTrue(data.endswith(b"0\r\n\r\n"), data[-20:])
        self.assertEqual(len(chunks), 3)
        for chunk in chunks:
            self.assertTrue(chunk.endswith(b"\n"))
            self.assertEqual(chunk.count(b"\n"), 1)
        events = [json.loads(chunk) for chunk in chunks]
        self.assertEqual([e["type"] for e in events], ["ADDED", "MODIFIED", "BOOKMARK"])
        self.assertEqual(events[1]["object"]["kind"], "Service")
        self.assertEqual(events[1]["object"]["spec"]["ports"][0]["port"], 81)

        self.fake.compact()
        raw = await rawConnect(
            self.fake.port,
            "/apis/discovery.k8s.io/v1/endpointslices?watch=true&resourceVersion=1",
            self.fake.token,
        )
        code, headers, chunks = parseResponse(await bounded(raw.closed))
        self.assertEqual((code, headers["transfer-encoding"]), (200, "chunked"))
        [error] = [json.loads(chunk) for chunk in chunks]
        self.assertEqual(error["type"], "ERROR")
        status = error["object"]
        self.assertEqual(
            (status["kind"], status["status"], status["reason"], status["code"]),
            ("Status", "Failure", "Expired", 410),
        )

        raw = await rawConnect(self.fake.port, "/api/v1/services", None)
        code, headers, [body] = parseResponse(await bounded(raw.closed))
        self.assertEqual(code, 401)
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(json.loads(body)["reason"], "Unauthorized")

        raw = await rawConnect(self.fake.port, "/api/v1/nothing", self.fake.token)
        code, headers, [body] = parseResponse(await bounded(raw.closed))
        self.assertEqual(code, 404)
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(json.loads(body)["kind"], "Status")
