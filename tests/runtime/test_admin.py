"""
The admin site's /metrics, written over several reactor turns, and
/routes, a page at a time (L{monedge.runtime.admin}).
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from monedge.observe.metrics import Metrics
from monedge.registry import Endpoint, ServiceEntry
from monedge.rules.convention import HostTiers
from monedge.runtime.admin import (
    ROUTES_LIMIT,
    PrometheusMetrics,
    Routes,
    RoutesQuery,
    metricsCooperator,
)
from monedge.testing import MemoryRegistry
from monedge.upstream.balancer import Balancer


class _Request(DummyRequest):
    """
    A DummyRequest that keeps a push producer registered (DummyRequest
    drives only pull producers) and has a real request's disconnection
    flag.
    """

    _disconnected = False
    producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


class _Turns:
    """
    A reactor's timed calls as the real reactor runs them: C{callLater(0,
    f)} made during a turn waits for the next turn (L{Clock} would run it
    in the same C{advance}).
    """

    def __init__(self) -> None:
        self.pending: list[Any] = []

    def callLater(self, delay: float, f: Any) -> Any:
        assert delay == 0
        self.pending.append(f)
        return _Call(self, f)

    def turn(self) -> None:
        """
        One reactor turn: run the calls already due.
        """
        due, self.pending = self.pending, []
        for f in due:
            f()


class _Call:
    def __init__(self, turns: _Turns, f: Any) -> None:
        self._turns = turns
        self._f = f

    def cancel(self) -> None:
        self._turns.pending.remove(self._f)


def _withoutProcess(body: bytes) -> list[bytes]:
    """
    An exposition's lines but the process collector's, which change from
    one reading to the next.
    """
    return [line for line in body.splitlines() if b"process_" not in line]


class MetricsPageTests(SynchronousTestCase):
    """
    /metrics is written a step at a time, each step on its own reactor
    turn, and the body is the whole exposition.
    """

    def setUp(self) -> None:
        self.metrics = Metrics()
        for number in range(250):
            children = self.metrics.forService(f"service.api.s{number}")
            children.observe(200, 0.01 * number, "upstream", 0.001)
            if number % 7 == 0:
                children.upstreamError("reset")
        self.reactor = _Turns()
        # One step a turn: the slice ends after every step.
        cooperator = metricsCooperator(self.reactor, lambda: lambda: True)
        self.page = PrometheusMetrics(self.metrics, cooperator)

    def get(self) -> _Request:
        request = _Request([b""])
        request.render(self.page)
        return request

    def runTurns(self, request: _Request, most: int = 1000) -> int:
        """
        Let the reactor turn until the request finishes; the turns it took.
        """
        for turn in range(most):
            if request.finished:
                return turn
            self.reactor.turn()
        self.fail("the page never finished")

    def test_reactorTurnsBetweenSlices(self) -> None:
        """
        Nothing is written before the reactor turns; then each turn does one
        step and leaves the next to a later turn, so other work (sockets,
        timers) runs between them; the request finishes with the whole
        exposition, headers set.
        """
        request = self.get()
        self.assertEqual((request.written, request.finished), ([], 0))
        self.assertEqual(len(self.reactor.pending), 1)
        turns = self.runTurns(request)
        self.assertGreater(turns, 10)
        self.assertIsNone(request.producer)
        self.assertEqual(
            _withoutProcess(b"".join(request.written)),
            _withoutProcess(b"".join(self.metrics.exposition())),
        )
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"),
            [CONTENT_TYPE_LATEST.encode("ascii")],
        )

    def test_serviceSnapshotIsOneMoment(self) -> None:
        """
        A request counted while the page is being written shows in no
        series of this page: each service's series agree with each other
        (requests counted and histogram counts).
        """
        request = self.get()
        self.reactor.turn()
        self.reactor.turn()
        children = self.metrics.forService("service.api.s1")
        for _ in range(5):
            children.observe(200, 0.01, "upstream", 0.001)
        self.runTurns(request)
        body = b"".join(request.written)
        label = b'service="service.api.s1"'
        [requests] = [
            line
            for line in body.splitlines()
            if line.startswith(b"monedge_requests_total") and label in line
        ]
        [count] = [
            line
            for line in body.splitlines()
            if line.startswith(b"monedge_request_duration_seconds_count{")
            and label in line
        ]
        self.assertTrue(requests.endswith(b" 1.0"), requests)
        self.assertTrue(count.endswith(b" 1.0"), count)

    def test_slowClientPauses(self) -> None:
        """
        The page registers itself as a streaming producer: paused (the
        client reads slowly), it writes nothing however long the reactor
        turns; resumed, it finishes.
        """
        request = self.get()
        self.reactor.turn()
        self.reactor.turn()
        self.reactor.turn()
        request.producer.pauseProducing()
        written = len(request.written)
        for _ in range(50):
            self.reactor.turn()
        self.assertEqual(len(request.written), written)
        self.assertEqual(request.finished, 0)
        request.producer.resumeProducing()
        self.runTurns(request)
        self.assertEqual(request.finished, 1)

    def test_clientGoneStops(self) -> None:
        """
        A client that goes away stops the rendering: nothing more is
        written, and no work stays scheduled.
        """
        request = self.get()
        self.reactor.turn()
        request._disconnected = True
        request.processingFailed(ConnectionError("gone"))
        written = len(request.written)
        for _ in range(5):
            self.reactor.turn()
        self.assertEqual(len(request.written), written)
        self.assertEqual(self.reactor.pending, [])
        self.assertEqual(request.finished, 0)

    def test_head(self) -> None:
        """
        HEAD answers the headers and no body, without rendering.
        """
        request = _Request([b""])
        request.method = b"HEAD"
        request.render(self.page)
        self.assertEqual((b"".join(request.written), request.finished), (b"", 1))
        self.assertEqual(self.reactor.pending, [])


def _routes(count: int, turns: _Turns | None = None) -> Routes:
    registry = MemoryRegistry()
    for number in range(count):
        registry.put(
            ServiceEntry(
                f"service.api.s{number:04d}",
                (Endpoint("10.0.0.1", 8080 + number % 10),),
            )
        )
    registry.put(ServiceEntry("payments", ()))
    cooperator = metricsCooperator(turns or _Turns(), lambda: lambda: True)
    return Routes(registry, HostTiers({}), Balancer(Clock()), (), cooperator)


class RoutesPageTests(SynchronousTestCase):
    """
    /routes is a page of services: filtered by exact name or substring,
    at most C{limit} of them, and a C{next} cursor when more remain.
    """

    def setUp(self) -> None:
        self.turns = _Turns()
        self.routes = _routes(250, self.turns)

    def get(self, **args: str | list[str] | bytes) -> tuple[int, Any]:
        request = _Request([b""])
        for name, value in args.items():
            values = value if isinstance(value, list) else [value]
            request.args[name.encode()] = [
                v if isinstance(v, bytes) else v.encode() for v in values
            ]
        request.render(self.routes)
        while self.turns.pending:
            self.turns.turn()
        body = b"".join(request.written)
        return request.responseCode or 200, json.loads(body)

    def names(self, document: Any) -> list[str]:
        return [service["name"] for service in document["services"]]

    def test_streamedAsDocument(self) -> None:
        """
        A page is written a service per step, each on its own reactor turn,
        and the body is exactly the document as the admin site writes JSON.
        """
        request = _Request([b""])
        request.args[b"limit"] = [b"50"]
        request.render(self.routes)
        turns = 0
        while self.turns.pending:
            self.turns.turn()
            turns += 1
        self.assertGreaterEqual(turns, 50)
        expected = json.dumps(
            self.routes.document(RoutesQuery(limit=50)), indent=2, sort_keys=True
        )
        self.assertEqual(b"".join(request.written), expected.encode() + b"\n")
        self.assertEqual(request.finished, 1)
        empty = _Request([b""])
        empty.args[b"q"] = [b"nothing"]
        empty.render(self.routes)
        while self.turns.pending:
            self.turns.turn()
        self.assertEqual(json.loads(b"".join(empty.written))["services"], [])

    def test_defaultPage(self) -> None:
        """
        With no query, the first L{ROUTES_LIMIT} services in name order, the
        document's other keys as before, and C{next} the last one shown.
        """
        status, document = self.get()
        self.assertEqual(status, 200)
        names = self.names(document)
        self.assertEqual(len(names), ROUTES_LIMIT)
        self.assertEqual(names, sorted(names))
        self.assertEqual(names[0], "payments")
        self.assertEqual(document["next"], names[-1])
        self.assertEqual(
            set(document), {"registry", "global_hooks", "tiers", "services", "next"}
        )

    def test_cursorWalksEveryService(self) -> None:
        """
        Following C{next} with C{after} visits every service exactly once,
        and the last page's C{next} is null.
        """
        seen: list[str] = []
        after: str | None = None
        pages = 0
        while True:
            query = {"limit": "40"} | ({"after": after} if after else {})
            status, document = self.get(**query)
            self.assertEqual(status, 200)
            seen.extend(self.names(document))
            pages += 1
            after = document["next"]
            if after is None:
                break
        self.assertEqual(pages, 7)
        self.assertEqual(seen, self.names(self.routes.document()))
        self.assertEqual(len(seen), 251)

    def test_exactPageHasNoNext(self) -> None:
        """
        A limit equal to what remains gives no C{next}.
        """
        _, document = self.get(limit="251")
        self.assertEqual(len(document["services"]), 251)
        self.assertIsNone(document["next"])

    def test_service(self) -> None:
        """
        C{service} selects the one service of that exact name, or none.
        """
        _, document = self.get(service="service.api.s0042")
        self.assertEqual(self.names(document), ["service.api.s0042"])
        self.assertEqual(document["services"][0]["path"], "/s0042/")
        self.assertIsNone(document["next"])
        _, document = self.get(service="service.api.s004")
        self.assertEqual(document["services"], [])

    def test_substring(self) -> None:
        """
        C{q} keeps the services whose name contains it, paged like the rest.
        """
        _, document = self.get(q="s01", limit="5")
        self.assertEqual(
            self.names(document), [f"service.api.s{n:04d}" for n in range(100, 105)]
        )
        self.assertEqual(document["next"], "service.api.s0104")
        _, document = self.get(q="s01", after="service.api.s0104", limit="1000")
        self.assertEqual(len(document["services"]), 95)
        self.assertIsNone(document["next"])
        _, document = self.get(q="pay")
        self.assertEqual(self.names(document), ["payments"])

    def test_badQuery(self) -> None:
        """
        An out-of-range or malformed limit, an unknown or repeated
        parameter, or one that is not UTF-8 is a 400 with a JSON error body
        (status, code bad_request and a message saying what is wrong).
        """
        cases: list[tuple[dict[str, str | list[str] | bytes], str]] = [
            ({"limit": "0"}, "limit"),
            ({"limit": "1001"}, "limit"),
            ({"limit": "ten"}, "limit"),
            ({"limit": "-5"}, "limit"),
            ({"services": "x"}, "unknown parameter 'services'"),
            ({"q": ["a", "b"]}, "more than once"),
            ({"service": b"\xff"}, "not UTF-8"),
        ]
        for query, reason in cases:
            status, document = self.get(**query)
            self.assertEqual(status, 400, query)
            self.assertEqual(document["status"], 400)
            self.assertEqual(document["code"], "bad_request")
            self.assertIn(reason, document["message"])
