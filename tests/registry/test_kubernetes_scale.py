"""
What lets the Kubernetes registry scale to thousands of Services, on a
L{MemoryKubernetes} and a L{Clock}: compact records instead of raw objects,
relists diffed off the reactor and applied in slices over reactor turns,
watch events coalesced into one table update per window, the collector
frozen after each sync, and the C{--selector} label selector.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.trial.unittest import SynchronousTestCase

from monedge.registry import Endpoint
from monedge.registry.kubeapi import (
    DELETED,
    MODIFIED,
    ObjectList,
    ServiceRecord,
    SliceRecord,
    Tombstone,
    WatchEvent,
    checkLabelSelector,
    compactEvent,
)
from monedge.registry.kubeclient import EVENTS_PER_TURN, _Batch, _Stream
from monedge.registry.kubernetes import (
    ENDPOINT_SLICES,
    SERVICES,
    ClusterState,
    KubernetesRegistry,
    diffRecords,
)
from monedge.testing.kubernetes import MemoryKubernetes
from tests.registry.test_kubernetes_registry import (
    RegistryTestCase,
    endpointSlice,
    ep,
    service,
)
from tests.registry.test_registry import Recorder

T = TypeVar("T")


def bulky(name: str, **kwargs: Any) -> dict[str, Any]:
    """
    A Service shaped like a real one: managedFields, a last-applied
    annotation, labels, status.
    """
    obj = service(name, **kwargs)
    obj["metadata"]["labels"] = {"app": name}
    obj["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied"] = "x" * 500
    obj["metadata"]["managedFields"] = [{"manager": "kubectl", "fieldsV1": {}}]
    obj["status"] = {"loadBalancer": {}}
    return obj


class CompactTests(SynchronousTestCase):
    """
    The state keeps compact records, made where objects are decoded.
    """

    def test_serviceRecord(self) -> None:
        """
        A Service becomes a L{ServiceRecord} with its monedge.io/
        annotations, its ports and its version only.
        """
        state = ClusterState(tiers=frozenset(["api"]))
        obj = bulky(
            "service-api-foo",
            annotations={"monedge.io/timeout": "5s", "other.io/x": "y"},
            ports=[{"name": "http", "port": 80, "appProtocol": "h2c"}],
            version="7",
        )
        record = state.compact(SERVICES, obj)
        self.assertEqual(
            record,
            ServiceRecord(
                "shop",
                "service-api-foo",
                "7",
                "service.api.foo",
                (("monedge.io/timeout", "5s"),),
                (("http", 80, "h2c"),),
            ),
        )
        self.assertIsNone(state.compact(SERVICES, bulky("kube-dns")))
        self.assertIsNone(state.compact(SERVICES, bulky("service-web-foo")))

    def test_sliceRecord(self) -> None:
        """
        An EndpointSlice becomes a L{SliceRecord}: its ports by name and
        each endpoint's first address and conditions; an endpoint without
        an address is dropped.
        """
        state = ClusterState(tiers=frozenset(["api"]))
        obj = endpointSlice(
            "s",
            "service-api-foo",
            [
                ep("10.0.0.1", ready=False, serving=True, terminating=True),
                {"addresses": [], "conditions": {}},
            ],
        )
        record = state.compact(ENDPOINT_SLICES, obj)
        self.assertEqual(
            record,
            SliceRecord(
                "shop",
                "s",
                "",
                "service.api.foo",
                "service-api-foo",
                "IPv4",
                (("http", 8080),),
                (("10.0.0.1", False, True, True),),
            ),
        )

    def test_stateKeepsOnlyRecords(self) -> None:
        """
        A registry fed bulky objects keeps only records: no raw dict is
        stored, and what the API hands over is already compact.
        """
        api = MemoryKubernetes()
        api.apply(bulky("service-api-foo"))
        api.apply(bulky("service-internal-thing"))
        api.apply(endpointSlice("s", "service-api-foo", [ep("10.0.0.1")]))
        handed: list[Any] = []
        listObjects = api.listObjects

        def spy(*args: Any) -> Deferred[ObjectList]:
            d = listObjects(*args)

            def seen(listed: ObjectList) -> ObjectList:
                handed.extend(listed.items)
                return listed

            return d.addCallback(seen)

        api.listObjects = spy  # type: ignore[assignment]
        registry = KubernetesRegistry(api, frozenset(["api"]), clock=_clock())
        registry.startService()
        self.addCleanup(registry.stopService)
        self.assertEqual([type(item) for item in handed], [ServiceRecord, SliceRecord])
        self.assertEqual(
            {type(v) for v in registry.state.services.values()}, {ServiceRecord}
        )
        self.assertEqual(
            {type(v) for v in registry.state.slices.values()}, {SliceRecord}
        )
        entry = registry.lookup("service.api.foo")
        assert entry is not None
        self.assertEqual(entry.endpoints, (Endpoint("10.0.0.1", 8080),))

    def test_compactEvent(self) -> None:
        """
        A watch event's object is compacted; one modified so that it is no
        longer kept becomes DELETED with a tombstone; other events of
        objects not kept are not reported; bookmarks pass as they are.
        """
        compact = ClusterState(tiers=frozenset(["api"])).compact
        kept = compactEvent(SERVICES, MODIFIED, service("service-api-a"), compact)
        assert kept is not None
        self.assertIsInstance(kept.object, ServiceRecord)
        self.assertEqual(kept.resourceVersion, "1")
        moved = endpointSlice("s", "kube-dns", [])
        moved["metadata"]["resourceVersion"] = "9"
        gone = compactEvent(ENDPOINT_SLICES, MODIFIED, moved, compact)
        self.assertEqual(gone, WatchEvent(DELETED, Tombstone("shop", "s", "9")))
        self.assertIsNone(compactEvent(ENDPOINT_SLICES, "ADDED", moved, compact))
        self.assertIsNone(compactEvent(ENDPOINT_SLICES, DELETED, moved, compact))
        bookmark = {"metadata": {"resourceVersion": "3"}}
        self.assertEqual(
            compactEvent(SERVICES, "BOOKMARK", bookmark, compact),
            WatchEvent("BOOKMARK", bookmark),
        )

    def test_sliceRelabelledAway(self) -> None:
        """
        A slice relabelled to a Service not kept leaves its old Service:
        the tombstone removes it.
        """
        self.api = MemoryKubernetes()
        self.api.apply(service("service-api-foo"))
        self.api.apply(endpointSlice("s", "service-api-foo", [ep("10.0.0.1")]))
        registry = KubernetesRegistry(
            self.api, frozenset(["api"]), clock=_clock(), coalesceWindow=0
        )
        registry.startService()
        self.addCleanup(registry.stopService)
        self.api.apply(endpointSlice("s", "kube-dns", [ep("10.0.0.1")]))
        entry = registry.lookup("service.api.foo")
        assert entry is not None
        self.assertEqual(entry.endpoints, ())
        self.assertEqual(registry.state.slices, {})


def _clock() -> Any:
    from twisted.internet.task import Clock

    return Clock()


class DiffTests(SynchronousTestCase):
    """
    A relist is a diff, grouped by registry name.
    """

    def test_diff(self) -> None:
        """
        Unchanged records make no change; changed, new and gone ones do,
        grouped by their registry name.
        """
        a1 = ServiceRecord("ns", "a", "1", "service.api.a")
        a2 = ServiceRecord("ns", "a", "2", "service.api.a")
        b = ServiceRecord("ns", "b", "1", "service.api.b")
        c = ServiceRecord("ns", "c", "1", "service.api.c")
        groups = diffRecords({("ns", "a"): a1, ("ns", "b"): b}, [a2, b, c])
        self.assertEqual(groups, [[(("ns", "a"), a2)], [(("ns", "c"), c)]])
        self.assertEqual(diffRecords({("ns", "b"): b}, []), [[(("ns", "b"), None)]])
        self.assertEqual(diffRecords({("ns", "b"): b}, [b]), [])


class ManualOffReactor:
    """
    An L{OffReactor} whose computations run when the test says.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, call: Callable[[], T]) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        self.calls.append((call, d))
        return d

    def runAll(self) -> None:
        calls, self.calls = self.calls, []
        for call, d in calls:
            d.callback(call())


class SliceTests(RegistryTestCase):
    """
    Lists are diffed off the reactor and applied a slice per reactor turn.
    """

    def names(self, registry: KubernetesRegistry) -> set[str]:
        return set(registry.services())

    def test_diffOffReactor(self) -> None:
        """
        A list is diffed by the off-reactor runner: nothing is applied, and
        nothing watched, until it answers.
        """
        self.api.apply(service("service-api-a"))
        offReactor = ManualOffReactor()
        registry = self.startRegistry(offReactor=offReactor)
        self.assertEqual(len(offReactor.calls), 2)
        self.assertEqual(self.names(registry), set())
        self.assertEqual(self.api.watchCount, 0)
        offReactor.runAll()
        self.assertEqual(self.names(registry), {"service.api.a"})
        self.assertEqual(self.api.watchCount, 2)
        self.assertTrue(registry.isReady())

    def test_firstListInSlices(self) -> None:
        """
        With slices of 2, a list of 5 Services is applied 2 at a time, one
        slice per reactor turn (the first at once); the watch starts, and
        the registry is ready, only once all of it is applied.
        """
        for name in "abcde":
            self.api.apply(service(f"service-api-{name}"))
        recorder = Recorder()
        registry = self.makeRegistry(relistBatch=2)
        registry.subscribe(recorder)
        registry.startService()
        # One slice now; the next waits for the next reactor turn.
        self.assertEqual(len(self.names(registry)), 2)
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()][:1], [0])
        self.assertFalse(registry.isReady())
        self.assertNotIn(("watch", SERVICES), [r[:2] for r in self.calls()])
        self.clock.advance(0)
        self.assertTrue(registry.isReady())
        self.assertEqual([len(c) for c in recorder.calls], [2, 2, 1])
        self.assertIn(("watch", SERVICES), [r[:2] for r in self.calls()])

    def test_relistKeepsEveryNameThroughout(self) -> None:
        """
        After 410 Gone, the relist is applied in slices, and at every turn
        each Service in both the old and the new list is in the table, with
        its endpoints; the new one appears and the deleted one goes.
        """
        kept = [f"k{i}" for i in range(6)]
        for name in [*kept, "old"]:
            self.api.apply(service(f"service-api-{name}"))
            self.api.apply(
                endpointSlice(f"{name}-1", f"service-api-{name}", [ep("10.0.0.1")])
            )
        registry = self.startRegistry(relistBatch=2)
        self.clock.advance(0)
        self.assertTrue(registry.isReady())
        missing: list[str] = []
        updates: list[frozenset[str]] = []

        def check(changed: frozenset[str]) -> None:
            # What the table holds after each slice of the relist.
            updates.append(changed)
            for name in kept:
                entry = registry.lookup(f"service.api.{name}")
                if entry is None or len(entry.endpoints) != 1:
                    missing.append(name)

        registry.subscribe(check)
        # Changes the watches miss (the API unreachable), then the history
        # they would resume from is compacted away: the next watch is
        # refused with 410 Gone, and both kinds are relisted.
        self.api.stop()
        self.api.delete("Service", "shop", "service-api-old")
        self.api.apply(service("service-api-new"))
        for name in kept:
            self.api.apply(
                endpointSlice(f"{name}-1", f"service-api-{name}", [ep("10.0.0.2")])
            )
        self.api.compact()
        self.api.start()
        self.clock.advance(0.5)
        self.assertEqual(registry.describe()["watches"][0]["relists"], 1)
        self.clock.advance(0)
        self.assertEqual(self.api.watchCount, 2)
        self.assertEqual(missing, [])
        self.assertGreater(len(updates), 2)
        self.assertEqual(
            self.names(registry),
            {f"service.api.{name}" for name in [*kept, "new"]},
        )
        for name in kept:
            entry = registry.lookup(f"service.api.{name}")
            assert entry is not None
            self.assertEqual(entry.endpoints, (Endpoint("10.0.0.2", 8080),))

    def test_stopMidSlices(self) -> None:
        """
        Stopping while a list is being applied stops applying it.
        """
        for name in "abcde":
            self.api.apply(service(f"service-api-{name}"))
        registry = self.makeRegistry(relistBatch=1)
        registry.startService()
        self.successResultOf(registry.stopService())
        count = len(self.names(registry))
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(len(self.names(registry)), count)
        self.assertEqual(self.api.watchCount, 0)


class CoalesceTests(RegistryTestCase):
    """
    Watch events change the state at once, the table once per window.
    """

    def test_burstIsOneUpdate(self) -> None:
        """
        A burst of slice updates within the window reaches the table, and
        its subscribers, in one update naming every Service changed, at
        the window's end.
        """
        self.api.apply(service("service-api-a"))
        self.api.apply(service("service-api-b"))
        registry = self.startRegistry(coalesceWindow=0.05)
        recorder = Recorder()
        registry.subscribe(recorder)
        for index in range(10):
            for name in "ab":
                self.api.apply(
                    endpointSlice(
                        f"{name}-1", f"service-api-{name}", [ep(f"10.0.0.{index}")]
                    )
                )
        self.assertEqual(recorder.calls, [])
        entry = registry.lookup("service.api.a")
        assert entry is not None
        self.assertEqual(entry.endpoints, ())
        self.clock.advance(0.049)
        self.assertEqual(recorder.calls, [])
        self.clock.advance(0.001)
        self.assertEqual(
            recorder.calls, [frozenset(["service.api.a", "service.api.b"])]
        )
        entry = registry.lookup("service.api.a")
        assert entry is not None
        self.assertEqual(entry.endpoints, (Endpoint("10.0.0.9", 8080),))
        self.api.delete("Service", "shop", "service-api-b")
        self.assertIsNotNone(registry.lookup("service.api.b"))
        self.clock.advance(0.05)
        self.assertIsNone(registry.lookup("service.api.b"))
        self.assertEqual(len(recorder.calls), 2)

    def test_largeBurstInSlices(self) -> None:
        """
        More names changed in a window than a slice holds: the table is
        updated a slice per reactor turn, starting at the window's end.
        """
        for name in "abcde":
            self.api.apply(service(f"service-api-{name}"))
        registry = self.startRegistry(coalesceWindow=0.05, relistBatch=2)
        self.clock.advance(0)
        recorder = Recorder()
        registry.subscribe(recorder)
        for name in "abcde":
            self.api.apply(
                endpointSlice(f"{name}-1", f"service-api-{name}", [ep("10.0.0.1")])
            )
        self.clock.advance(0.049)
        self.assertEqual(recorder.calls, [])
        # Each update after the first is a call of its own, a turn later
        # (the Clock runs them all in this one advance).
        turns = []
        registry.subscribe(lambda _: turns.append(registry._flushCall is not None))
        self.clock.advance(0.001)
        self.assertEqual([len(c) for c in recorder.calls], [2, 2, 1])
        self.assertEqual(turns, [True, True, False])
        for name in "abcde":
            entry = registry.lookup(f"service.api.{name}")
            assert entry is not None
            self.assertEqual(entry.endpoints, (Endpoint("10.0.0.1", 8080),))

    def test_stopDropsPending(self) -> None:
        """
        Stopping cancels a pending window.
        """
        registry = self.startRegistry(coalesceWindow=0.05)
        self.api.apply(service("service-api-a"))
        self.successResultOf(registry.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FreezeTests(RegistryTestCase):
    """
    The injected freeze runs after the first full sync and each relist.
    """

    def test_freezeAfterSync(self) -> None:
        """
        Not after the first kind alone; once after both are listed; once
        more after a relist; never for a watch event.
        """
        freezes: list[bool] = []
        offReactor = ManualOffReactor()
        registries: list[KubernetesRegistry] = []
        registry = self.makeRegistry(
            freeze=lambda: freezes.append(registries[0].isReady()),
            offReactor=offReactor,
        )
        registries.append(registry)
        registry.startService()
        call, d = offReactor.calls.pop(0)
        d.callback(call())
        self.assertEqual(freezes, [])
        offReactor.runAll()
        self.assertEqual(freezes, [True])
        self.api.apply(service("service-api-a"))
        self.assertEqual(freezes, [True])
        self.api.expireWatches()
        offReactor.runAll()
        self.assertEqual(freezes, [True, True, True])
        self.assertEqual(registry.freezes, 3)


class SelectorTests(RegistryTestCase):
    """
    --selector filters Services, listed and watched; not slices.
    """

    def test_selectorPassedToServicesOnly(self) -> None:
        """
        The selector goes with every list and watch of Services, and with
        none of EndpointSlices; only matching Services are routed, and a
        Service that stops matching goes.
        """
        edge = service("service-api-a")
        edge["metadata"]["labels"] = {"edge": "true"}
        self.api.apply(edge)
        self.api.apply(service("service-api-b"))
        self.api.apply(endpointSlice("b-1", "service-api-b", [ep("10.0.0.1")]))
        registry = self.startRegistry(selector="edge=true")
        self.assertEqual(
            self.api.selectors,
            [("list", SERVICES, "edge=true"), ("watch", SERVICES, "edge=true")],
        )
        self.assertEqual(set(registry.services()), {"service.api.a"})
        self.assertEqual(list(registry.state.slices), [("shop", "b-1")])
        unlabelled = service("service-api-a")
        self.api.apply(unlabelled)
        self.assertEqual(set(registry.services()), set())
        self.assertEqual(registry.describe()["selector"], "edge=true")


class LabelSelectorSyntaxTests(SynchronousTestCase):
    """
    checkLabelSelector accepts what the API server parses.
    """

    def test_valid(self) -> None:
        """
        Each requirement form, and several separated by commas.
        """
        for text in [
            "edge",
            "!internal",
            "edge=true",
            "edge==true",
            "tier!=web",
            "example.com/edge=true",
            "team in (payments, ledger)",
            "team notin (x)",
            "replicas>2",
            " a=b , c ",
            "empty=",
        ]:
            self.assertEqual(checkLabelSelector(text), text.strip())

    def test_invalid(self) -> None:
        """
        Anything else is refused with a one-line reason.
        """
        for text in ["", "a b", "a in x", "a in (b", "a=b c", "a=b,,c", "-a", "a=@"]:
            with self.assertRaises(ValueError) as caught:
                checkLabelSelector(text)
            self.assertNotIn("\n", str(caught.exception))


class ThreadCalls:
    """
    A reactor's C{callFromThread}, run when the test says, one reactor
    iteration at a time.
    """

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.queue.append((f, args))

    def iterate(self) -> None:
        """
        Run the calls queued before this iteration.
        """
        calls, self.queue = self.queue, []
        for f, args in calls:
            f(*args)


class BatchTests(SynchronousTestCase):
    """
    The real API hands watch events to the reactor in bounded batches.
    """

    def test_boundedPerTurn(self) -> None:
        """
        250 events queued by the watch thread arrive in order, 100 per
        reactor iteration, from one wake-up each; none after the watch
        has ended.
        """
        calls = ThreadCalls()
        received: list[str] = []
        batch = _Batch(
            cast(IReactorFromThreads, calls),
            _Stream(),
            lambda event: received.append(event.type),
        )
        for index in range(250):
            batch.add(WatchEvent(str(index), {}))
        self.assertEqual(len(calls.queue), 1)
        counts = []
        while calls.queue:
            calls.iterate()
            counts.append(len(received))
        self.assertEqual(counts, [EVENTS_PER_TURN, 2 * EVENTS_PER_TURN, 250])
        self.assertEqual(received, [str(i) for i in range(250)])
        for _ in range(150):
            batch.add(WatchEvent("late", {}))
        calls.iterate()
        batch.close()
        calls.iterate()
        self.assertEqual(len(received), 250 + EVENTS_PER_TURN)
