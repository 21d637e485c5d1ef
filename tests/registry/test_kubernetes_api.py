"""
The L{IKubernetesAPI} contract, run against both implementations: the
in-memory L{MemoryKubernetes}, and the real L{KubernetesClientAPI} (the
official client, in threads) against L{FakeKubernetes} on 127.0.0.1.  The
cluster behind each is scripted through the same L{FakeCluster} controls,
so the fake the registry's unit tests use is seen to behave as the real
API does.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any, TypeVar, cast

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.defer import TimeoutError as StepTimedOut
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from monedge.interfaces import IKubernetesAPI
from monedge.registry.kubeapi import (
    ENDPOINT_SLICES,
    SERVICES,
    KubeObject,
    KubernetesAPIError,
    ObjectList,
    ResourceExpired,
    ServiceRecord,
    WatchEvent,
)
from monedge.registry.kubeclient import KubernetesClientAPI, apiClientFromConfig
from monedge.testing.kubernetes import (
    FakeCluster,
    FakeKubernetes,
    MemoryKubernetes,
    endpointSliceObject,
    serviceObject,
)

T = TypeVar("T")

#: The longest any one step may take against the real API.
STEP_TIMEOUT = 5.0


class Events:
    """
    A watch's C{receive}: records every event, and lets the test wait for
    some.
    """

    def __init__(self) -> None:
        self.events: list[WatchEvent] = []
        self._waiting: list[tuple[int, Deferred[list[WatchEvent]]]] = []

    def __call__(self, event: WatchEvent) -> None:
        self.events.append(event)
        for count, waiter in list(self._waiting):
            if len(self.events) >= count:
                self._waiting.remove((count, waiter))
                waiter.callback(list(self.events))

    def atLeast(self, count: int) -> Deferred[list[WatchEvent]]:
        """
        Fire with the events once there are C{count} of them.
        """
        if len(self.events) >= count:
            return succeed(list(self.events))
        waiter: Deferred[list[WatchEvent]] = Deferred()
        self._waiting.append((count, waiter))
        return waiter

    def summary(self) -> list[tuple[str, str]]:
        """
        (type, namespace/name) of each event.
        """
        return [
            (
                e.type,
                f"{e.object['metadata'].get('namespace')}"
                f"/{e.object['metadata'].get('name')}",
            )
            for e in self.events
        ]


def names(listed: ObjectList) -> list[str]:
    """
    namespace/name of each listed object, in order.
    """
    return [
        f"{item['metadata']['namespace']}/{item['metadata']['name']}"
        for item in listed.items
    ]


class KubernetesAPIContractMixin:
    """
    What every L{IKubernetesAPI} does.  Mixed into a L{TestCase} whose
    C{setUp} sets C{self.api} and C{self.cluster} (the cluster it reaches,
    scripted by the tests).
    """

    api: IKubernetesAPI
    cluster: FakeCluster

    # Supplied by TestCase.
    assertEqual: Any
    assertIsInstance: Any
    assertNotIsInstance: Any
    assertIn: Any
    addCleanup: Any
    fail: Any

    def bounded(self, d: Deferred[T]) -> Deferred[T]:
        """
        C{d}, failing if it takes longer than a step may.
        """
        return d.addTimeout(STEP_TIMEOUT, cast(IReactorTime, reactor))

    async def failureOf(self, d: Deferred[Any]) -> BaseException:
        """
        The exception C{d} fails with (the test fails if it succeeds).
        """
        try:
            result = await self.bounded(d)
        except StepTimedOut:
            self.fail(f"neither fired nor failed within {STEP_TIMEOUT}s")
            raise
        except Exception as e:
            return e
        self.fail(f"succeeded with {result!r}")
        raise AssertionError("unreachable")

    async def apiDown(self) -> None:
        """
        Make the API unreachable (its open watches break).
        """
        raise NotImplementedError()

    def apiUp(self) -> None:
        """
        Make the API reachable again.
        """
        raise NotImplementedError()

    def watch(
        self,
        kind: str,
        namespace: str | None,
        resourceVersion: str,
    ) -> tuple[Events, Deferred[None]]:
        """
        Open a watch recording its events; cancel it after the test.
        """
        events = Events()
        d = self.api.watchObjects(kind, namespace, resourceVersion, events)
        self.addCleanup(self._cancel, d)
        return events, d

    def _cancel(self, d: Deferred[None]) -> None:
        d.addErrback(lambda _: None)
        d.cancel()

    async def opened(self, count: int = 1) -> None:
        """
        Wait until the API server has C{count} watches open.
        """
        await self.bounded(self.cluster.whenWatching(count))

    async def streaming(self, events: Events) -> None:
        """
        Wait until a watch of Services (C{events}) is streaming: it has
        had an event.  (Until the client has the response, a connection
        cut may be retried by it rather than break the watch.)
        """
        count = len(events.events) + 1
        self.cluster.apply(serviceObject("streaming", "test"))
        await self.bounded(events.atLeast(count))

    def test_verifyObject(self) -> None:
        """
        The implementation provides L{IKubernetesAPI}.
        """
        self.assertEqual(verifyObject(IKubernetesAPI, self.api), True)

    async def test_listEveryObjectOfTheKind(self) -> None:
        """
        A list has every object of its kind (in the namespace, if one is
        given), sorted by namespace and name, each with its own
        resourceVersion and without kind or apiVersion, as the API server
        sends them; its resourceVersion is the cluster's at the list.
        """
        a = self.cluster.apply(serviceObject("a", "zeta"))
        self.cluster.apply(serviceObject("b", "alpha"))
        self.cluster.apply(serviceObject("a", "alpha"))
        self.cluster.apply(endpointSliceObject("a-1", "a", [], "alpha"))
        listed = await self.bounded(self.api.listObjects(SERVICES, None))
        self.assertEqual(names(listed), ["alpha/a", "alpha/b", "zeta/a"])
        self.assertEqual(listed.resourceVersion, self.cluster.resourceVersion)
        self.assertEqual(
            listed.items[2]["metadata"]["resourceVersion"],
            a["metadata"]["resourceVersion"],
        )
        self.assertEqual(listed.items[2]["spec"], a["spec"])
        self.assertEqual(
            [k for k in ("kind", "apiVersion") if k in a], ["kind", "apiVersion"]
        )
        self.assertEqual(
            [k for k in ("kind", "apiVersion") if k in listed.items[2]], []
        )
        alpha = await self.bounded(self.api.listObjects(SERVICES, "alpha"))
        self.assertEqual(names(alpha), ["alpha/a", "alpha/b"])
        slices = await self.bounded(self.api.listObjects(ENDPOINT_SLICES, None))
        self.assertEqual(names(slices), ["alpha/a-1"])
        none = await self.bounded(self.api.listObjects(ENDPOINT_SLICES, "zeta"))
        self.assertEqual(
            (names(none), none.resourceVersion), ([], listed.resourceVersion)
        )

    async def test_watchFromListVersion(self) -> None:
        """
        A watch from a list's version reports every change of its kind
        made since, in order, then each new one as it happens: ADDED,
        MODIFIED, and DELETED with the object's last state and the
        deletion's new version.
        """
        self.cluster.apply(serviceObject("a", "shop"))
        listed = await self.bounded(self.api.listObjects(SERVICES, None))
        self.cluster.apply(serviceObject("b", "shop"))
        self.cluster.apply(endpointSliceObject("b-1", "b", [], "shop"))
        self.cluster.apply(serviceObject("a", "shop", ports=[{"port": 81}]))
        events, _ = self.watch(SERVICES, None, listed.resourceVersion)
        await self.bounded(events.atLeast(2))
        await self.opened()
        self.cluster.delete("Service", "shop", "a")
        await self.bounded(events.atLeast(3))
        self.assertEqual(
            events.summary(),
            [("ADDED", "shop/b"), ("MODIFIED", "shop/a"), ("DELETED", "shop/a")],
        )
        versions = [int(e.resourceVersion or 0) for e in events.events]
        self.assertEqual(versions, sorted(versions))
        self.assertEqual(
            events.events[-1].resourceVersion, self.cluster.resourceVersion
        )
        self.assertEqual(events.events[1].object["spec"]["ports"], [{"port": 81}])
        self.assertEqual(events.events[2].object["spec"]["ports"], [{"port": 81}])

    async def test_labelSelector(self) -> None:
        """
        With a label selector, a list has only the matching objects, and a
        watch reports only changes to them: an object that starts matching
        is ADDED, one that stops is DELETED.
        """
        edge = serviceObject("a", "shop")
        edge["metadata"]["labels"] = {"edge": "true"}
        self.cluster.apply(edge)
        self.cluster.apply(serviceObject("b", "shop"))
        listed = await self.bounded(
            self.api.listObjects(SERVICES, None, labelSelector="edge=true")
        )
        self.assertEqual(names(listed), ["shop/a"])
        events = Events()
        d = self.api.watchObjects(
            SERVICES, None, listed.resourceVersion, events, labelSelector="edge"
        )
        self.addCleanup(self._cancel, d)
        await self.opened()
        other = serviceObject("b", "shop")
        other["metadata"]["labels"] = {"edge": "false"}
        self.cluster.apply(other)
        self.cluster.apply(serviceObject("c", "shop"))
        self.cluster.apply(serviceObject("a", "shop"))
        await self.bounded(events.atLeast(2))
        self.assertEqual(events.summary(), [("ADDED", "shop/b"), ("DELETED", "shop/a")])

    async def test_compact(self) -> None:
        """
        With a compactor, a list has what it makes of each object, without
        those it drops, and a watch reports compacted objects; an object it
        drops is not reported as ADDED, and a modification of one (which
        may have been kept before) is reported as DELETED with a
        L{Tombstone}.
        """

        def compact(kind: str, obj: KubeObject) -> ServiceRecord | None:
            meta = obj["metadata"]
            if not meta["name"].startswith("keep"):
                return None
            labels = meta.get("labels") or {}
            if labels.get("drop"):
                return None
            return ServiceRecord(
                meta["namespace"], meta["name"], meta["resourceVersion"], kind
            )

        self.cluster.apply(serviceObject("keep-a", "shop"))
        self.cluster.apply(serviceObject("other", "shop"))
        listed = await self.bounded(
            self.api.listObjects(SERVICES, None, compact=compact)
        )
        self.assertEqual(
            [(r.name, r.registryName) for r in listed.items], [("keep-a", SERVICES)]
        )
        events: list[WatchEvent] = []
        received = Events()
        d = self.api.watchObjects(
            SERVICES, None, listed.resourceVersion, received, compact=compact
        )
        self.addCleanup(self._cancel, d)
        await self.opened()
        self.cluster.apply(serviceObject("other", "shop", ports=[{"port": 1}]))
        self.cluster.apply(serviceObject("keep-b", "shop"))
        dropped = serviceObject("keep-a", "shop")
        dropped["metadata"]["labels"] = {"drop": "yes"}
        self.cluster.apply(dropped)
        self.cluster.apply(serviceObject("dropped-at-once", "shop"))
        self.cluster.apply(serviceObject("keep-c", "shop"))
        events = await self.bounded(received.atLeast(4))
        self.assertEqual(
            [(e.type, type(e.object).__name__, e.object.name) for e in events],
            [
                ("DELETED", "Tombstone", "other"),
                ("ADDED", "ServiceRecord", "keep-b"),
                ("DELETED", "Tombstone", "keep-a"),
                ("ADDED", "ServiceRecord", "keep-c"),
            ],
        )
        self.assertEqual(events[-1].resourceVersion, self.cluster.resourceVersion)

    async def test_watchNamespace(self) -> None:
        """
        A watch in a namespace reports only that namespace's objects.
        """
        start = self.cluster.resourceVersion
        events, _ = self.watch(ENDPOINT_SLICES, "one", start)
        await self.opened()
        self.cluster.apply(endpointSliceObject("x-1", "x", [], "two"))
        self.cluster.apply(endpointSliceObject("x-1", "x", [], "one"))
        await self.bounded(events.atLeast(1))
        self.assertEqual(events.summary(), [("ADDED", "one/x-1")])

    async def test_bookmark(self) -> None:
        """
        A bookmark arrives as a BOOKMARK event carrying the cluster's
        current version and nothing else of an object.
        """
        events, _ = self.watch(SERVICES, None, self.cluster.resourceVersion)
        await self.opened()
        self.cluster.apply(endpointSliceObject("x-1", "x", [], "shop"))
        self.cluster.bookmark()
        [bookmark] = await self.bounded(events.atLeast(1))
        self.assertEqual(bookmark.type, "BOOKMARK")
        self.assertEqual(bookmark.resourceVersion, self.cluster.resourceVersion)
        self.assertEqual(
            bookmark.object["metadata"],
            {"resourceVersion": self.cluster.resourceVersion},
        )

    async def test_watchFromExpiredVersion(self) -> None:
        """
        A watch from a version older than the history the server keeps
        fails with L{ResourceExpired} (410), reporting nothing.
        """
        old = self.cluster.resourceVersion
        self.cluster.apply(serviceObject("a", "shop"))
        self.cluster.compact()
        events, d = self.watch(SERVICES, None, old)
        error = await self.failureOf(d)
        self.assertIsInstance(error, ResourceExpired)
        assert isinstance(error, ResourceExpired)
        self.assertEqual(error.status, 410)
        self.assertIn("too old resource version", error.reason)
        self.assertEqual(events.events, [])

    async def test_expiredMidWatch(self) -> None:
        """
        A watch the server expires mid-stream fails with
        L{ResourceExpired}.
        """
        _, d = self.watch(SERVICES, None, self.cluster.resourceVersion)
        await self.opened()
        self.cluster.expireWatches()
        self.assertIsInstance(await self.failureOf(d), ResourceExpired)

    async def test_endedWatch(self) -> None:
        """
        A watch the server ends cleanly (its timeout) fires with L{None}.
        """
        _, d = self.watch(SERVICES, None, self.cluster.resourceVersion)
        await self.opened()
        results: list[object] = []
        d.addCallback(results.append)
        self.cluster.endWatches()
        await self.bounded(d)
        self.assertEqual(results, [None])

    async def test_droppedWatch(self) -> None:
        """
        A watch whose connection breaks fails, with an error that is not
        a refusal by the API.
        """
        events, d = self.watch(SERVICES, None, self.cluster.resourceVersion)
        await self.streaming(events)
        self.cluster.dropWatches()
        self.assertNotIsInstance(await self.failureOf(d), KubernetesAPIError)

    async def test_cancelStopsWatch(self) -> None:
        """
        A cancelled watch fails with L{CancelledError} and reports
        nothing after, though later changes reach other watches.
        """
        start = self.cluster.resourceVersion
        cancelled, d = self.watch(SERVICES, None, start)
        await self.opened()
        d.cancel()
        self.assertIsInstance(await self.failureOf(d), CancelledError)
        self.cluster.apply(serviceObject("a", "shop"))
        other, _ = self.watch(SERVICES, None, start)
        await self.bounded(other.atLeast(1))
        self.assertEqual(cancelled.events, [])

    async def test_forbidden(self) -> None:
        """
        Lists and watches the API refuses fail with L{KubernetesAPIError}
        and its status; other kinds are unaffected.
        """
        self.cluster.forbid("EndpointSlice")
        calls: list[Deferred[Any]] = [
            self.api.listObjects(ENDPOINT_SLICES, None),
            self.api.watchObjects(
                ENDPOINT_SLICES, "shop", self.cluster.resourceVersion, Events()
            ),
        ]
        for d in calls:
            error = await self.failureOf(d)
            self.assertIsInstance(error, KubernetesAPIError)
            assert isinstance(error, KubernetesAPIError)
            self.assertNotIsInstance(error, ResourceExpired)
            self.assertEqual((error.status, error.reason), (403, "Forbidden"))
        listed = await self.bounded(self.api.listObjects(SERVICES, None))
        self.assertEqual(listed.items, [])
        self.cluster.forbid("EndpointSlice", False)
        await self.bounded(self.api.listObjects(ENDPOINT_SLICES, None))

    async def test_apiDown(self) -> None:
        """
        While the API is unreachable, open watches fail and so do lists,
        with errors that are not refusals by the API; once it is back,
        lists answer again.
        """
        events, d = self.watch(SERVICES, None, self.cluster.resourceVersion)
        await self.streaming(events)
        await self.apiDown()
        self.assertNotIsInstance(await self.failureOf(d), KubernetesAPIError)
        error = await self.failureOf(self.api.listObjects(SERVICES, None))
        self.assertNotIsInstance(error, KubernetesAPIError)
        self.cluster.apply(serviceObject("a", "shop"))
        self.apiUp()
        listed = await self.bounded(self.api.listObjects(SERVICES, "shop"))
        self.assertEqual(names(listed), ["shop/a"])


class MemoryKubernetesTests(KubernetesAPIContractMixin, TestCase):
    """
    The contract, against the in-memory fake.
    """

    def setUp(self) -> None:
        self.memory = MemoryKubernetes()
        self.api = self.cluster = self.memory

    async def apiDown(self) -> None:
        self.memory.stop()

    def apiUp(self) -> None:
        self.memory.start()

    def test_synchronous(self) -> None:
        """
        The fake answers before it returns: a list has fired, and a watch
        has replayed the changes after its version.
        """
        start = self.memory.resourceVersion
        self.memory.apply(serviceObject("a", "shop"))
        listed = self.successResultOf(self.memory.listObjects(SERVICES, None))
        self.assertEqual(names(listed), ["shop/a"])
        events = Events()
        d = self.memory.watchObjects(SERVICES, None, start, events)
        self.assertEqual(events.summary(), [("ADDED", "shop/a")])
        self.assertNoResult(d)
        self.assertEqual(
            self.memory.requests,
            [("list", SERVICES, None), ("watch", SERVICES, None, start)],
        )
        self.memory.endWatches()
        self.assertIsNone(self.successResultOf(d))


class KubernetesClientAPITests(KubernetesAPIContractMixin, TestCase):
    """
    The contract, against the real client in threads and the fake API
    server on 127.0.0.1.
    """

    timeout = 30

    def setUp(self) -> None:
        self.server = FakeKubernetes(reactor)
        self.server.start()
        self.addCleanup(self.server.stop)
        self.cluster = self.server
        apiClient = apiClientFromConfig(self.server.writeKubeconfig(self.mktemp()))
        self.addCleanup(apiClient.close)
        self.client = KubernetesClientAPI(
            apiClient,
            cast(IReactorFromThreads, reactor),
            watchTimeout=20,
            requestTimeout=STEP_TIMEOUT,
            pageSize=2,
        )
        self.api = self.client
        self.addCleanup(self.client.close)

    async def apiDown(self) -> None:
        await self.bounded(self.server.stop())

    def apiUp(self) -> None:
        self.server.start(self.server.port)

    async def test_listReadsEveryPage(self) -> None:
        """
        A list longer than a page is read page by page, from one snapshot:
        every object, at the first page's version.
        """
        for name in "abcde":
            self.server.apply(serviceObject(name, "shop"))
        version = self.server.resourceVersion
        listed = await self.bounded(self.client.listObjects(SERVICES, "shop"))
        self.assertEqual(names(listed), [f"shop/{n}" for n in "abcde"])
        self.assertEqual(listed.resourceVersion, version)
        pages = [q for _, path, q in self.server.requests if path.endswith("/services")]
        self.assertEqual([q["limit"] for q in pages], [["2"]] * 3)
        self.assertEqual(["continue" in q for q in pages], [False, True, True])

    def pageRequests(self) -> int:
        """
        How many list requests for Services the server has had.
        """
        return sum(
            1
            for _, path, q in self.server.requests
            if path.endswith("/services") and "watch" not in q
        )

    async def test_nextPageAskedBeforeDecoding(self) -> None:
        """
        A list asks for its next page as soon as it has read this page's
        continue token, while it is still decoding this page's items: the
        compactor, called on the first page's first item, sees the server
        receive the second page's request without the list going on.
        """
        for name in "abcde":
            self.server.apply(serviceObject(name, "shop"))
        seen: list[bool] = []
        asked = threading.Event()

        def compact(kind: str, obj: KubeObject) -> ServiceRecord:
            if not seen:
                deadline = time.monotonic() + STEP_TIMEOUT
                while self.pageRequests() < 2 and time.monotonic() < deadline:
                    asked.wait(0.005)
                seen.append(self.pageRequests() >= 2)
            meta = obj["metadata"]
            return ServiceRecord(meta["namespace"], meta["name"], "", meta["name"])

        listed = await self.bounded(
            self.client.listObjects(SERVICES, "shop", compact=compact)
        )
        self.assertEqual(seen, [True])
        self.assertEqual(
            [r.name for r in listed.items if isinstance(r, ServiceRecord)],
            list("abcde"),
        )
        self.assertEqual(self.pageRequests(), 3)

    async def test_relistReadsPageByPage(self) -> None:
        """
        A kind's later lists (relists, which run beside traffic) do not
        read ahead: while the first page is decoded, the server has had no
        request for the second.
        """
        for name in "abcde":
            self.server.apply(serviceObject(name, "shop"))
        await self.bounded(self.client.listObjects(SERVICES, "shop"))
        before = self.pageRequests()
        seen: list[int] = []

        def compact(kind: str, obj: KubeObject) -> None:
            if not seen:
                time.sleep(0.2)
                seen.append(self.pageRequests() - before)

        listed = await self.bounded(
            self.client.listObjects(SERVICES, "shop", compact=compact)
        )
        self.assertEqual(seen, [1])
        self.assertEqual(listed.items, [])
        self.assertEqual(self.pageRequests() - before, 3)

    async def test_noCollectionWhileDecoding(self) -> None:
        """
        The cyclic garbage collector is off while a list's pages are
        decoded (their objects make no cycles, and a young collection
        would hold the interpreter for every young object), and on again
        once the list has ended, whether it succeeded or failed.
        """
        for name in "abc":
            self.server.apply(serviceObject(name, "shop"))
        self.assertTrue(gc.isenabled())
        enabled: list[bool] = []

        def compact(kind: str, obj: KubeObject) -> None:
            enabled.append(gc.isenabled())

        await self.bounded(self.client.listObjects(SERVICES, "shop", compact=compact))
        self.assertEqual(enabled, [False] * 3)
        self.assertTrue(gc.isenabled())

        def fail(kind: str, obj: KubeObject) -> None:
            raise ValueError("compactor failed")

        error = await self.failureOf(
            self.client.listObjects(SERVICES, "shop", compact=fail)
        )
        self.assertIsInstance(error, ValueError)
        self.assertTrue(gc.isenabled())

    async def test_nextPageRefused(self) -> None:
        """
        If the page asked for ahead is refused (here its snapshot expired:
        410), the list fails with that refusal, and no thread of it is left
        running.
        """
        for name in "abcde":
            self.server.apply(serviceObject(name, "shop"))
        server = self.server

        class Requests(list[tuple[str, str, dict[str, list[str]]]]):
            def append(self, request: tuple[str, str, dict[str, list[str]]]) -> None:
                super().append(request)
                if "continue" in request[2] and len(self) == 2:
                    server.apply(serviceObject("f", "shop"))
                    server.compact()

        server.requests = Requests()
        error = await self.failureOf(self.client.listObjects(SERVICES, "shop"))
        self.assertIsInstance(error, ResourceExpired)
        self.assertEqual(len(server.requests), 2)
        self.assertEqual(
            [t for t in threading.enumerate() if t.name == "monedge-kubernetes-page"],
            [],
        )

    async def test_watchRequest(self) -> None:
        """
        A watch asks for bookmarks, from the version given, and for the
        server to end it after C{watchTimeout} seconds.
        """
        self.watch(ENDPOINT_SLICES, "shop", self.server.resourceVersion)
        await self.opened()
        [(_, path, query)] = self.server.requests
        self.assertEqual(
            path, "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices"
        )
        self.assertEqual(query["allowWatchBookmarks"], ["true"])
        self.assertEqual(query["resourceVersion"], [self.server.resourceVersion])
        self.assertEqual(query["timeoutSeconds"], ["20"])

    async def test_closeWaitsForThreads(self) -> None:
        """
        C{close} cancels every watch and fires once every thread has
        returned; the API can be used again after.
        """
        _, first = self.watch(SERVICES, None, self.server.resourceVersion)
        _, second = self.watch(ENDPOINT_SLICES, None, self.server.resourceVersion)
        await self.opened(2)
        closed = self.client.close()
        for d in (first, second):
            self.assertIsInstance(await self.failureOf(d), CancelledError)
        await self.bounded(closed)
        self.assertEqual(self.client._inFlight, 0)
        listed = await self.bounded(self.client.listObjects(SERVICES, None))
        self.assertEqual(listed.items, [])
