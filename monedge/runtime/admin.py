"""
The admin site, on its own port: liveness, readiness, Prometheus metrics
and the route table.

    GET /healthz   200 while the process lives
    GET /readyz    200 when serving; 503 while draining, while a proxy
                   listener is not listening, or before the registry's
                   first sync
    GET /metrics   Prometheus text format, written over several reactor
                   turns
    GET /routes    services, their endpoints and effective policy (JSON),
                   a page at a time: ?service=, ?q=, ?limit=, ?after=

With C{--workers N}, the supervisor serves the same paths for the whole
group (L{groupAdminSite}), built from each worker's private admin socket.
"""

from __future__ import annotations

import json
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Cooperator, TaskFinished, TaskStopped
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import pages
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from monedge.interfaces import IServiceRegistry
from monedge.observe.metrics import Metrics, StaticCollector, mergeExpositions
from monedge.rules.convention import HostTiers, parseServiceName
from monedge.rules.policy import HookSpec
from monedge.rules.redact import redactHook, redactValue
from monedge.twistedseam import requestDisconnected
from monedge.upstream.balancer import Balancer, eligible

if TYPE_CHECKING:
    from monedge.runtime.workers import Worker, WorkerGroup

#: GETs a path from one worker's admin site: (status, body).
Fetch = Callable[["Worker", str], Deferred[tuple[int, bytes]]]


def _jsonBody(document: object) -> bytes:
    """
    C{document} as the admin site writes JSON.
    """
    return json.dumps(document, indent=2, sort_keys=True).encode("utf-8") + b"\n"


def _json(request: Request, status: int, document: object) -> bytes:
    body = _jsonBody(document)
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return body


class _Leaf(Resource):
    isLeaf = True

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)  # type: ignore[no-any-return, attr-defined]


class Health(_Leaf):
    """
    C{/healthz}: the process is alive and its reactor turns.
    """

    def render_GET(self, request: Request) -> bytes:
        return _json(request, 200, {"status": "ok"})


class Ready(_Leaf):
    """
    C{/readyz}: whether a load balancer should send traffic here.
    """

    def __init__(self, readiness: Callable[[], tuple[bool, str]]) -> None:
        super().__init__()
        self._readiness = readiness

    def render_GET(self, request: Request) -> bytes:
        ready, reason = self._readiness()
        return _json(request, 200 if ready else 503, {"ready": ready, "reason": reason})


#: The longest a /metrics render runs before the reactor gets control back,
#: in seconds: a few milliseconds, so traffic waits no longer for a scrape.
METRICS_SLICE = 0.003


def _slices(seconds: float) -> Callable[[], Callable[[], bool]]:
    """
    A L{Cooperator} termination predicate factory: each turn works for
    C{seconds} of real time (the reactor's own time, whatever clock the
    rest uses), then yields.
    """

    def factory() -> Callable[[], bool]:
        deadline = time.perf_counter() + seconds
        return lambda: time.perf_counter() >= deadline

    return factory


def metricsCooperator(
    reactor: Any, slices: Callable[[], Callable[[], bool]] | None = None
) -> Cooperator:
    """
    The cooperator that renders /metrics: a slice of at most
    L{METRICS_SLICE} at a time (or as C{slices} says), each scheduled on
    C{reactor} with no delay so that the reactor polls its sockets between
    slices.
    """
    return Cooperator(
        terminationPredicateFactory=slices or _slices(METRICS_SLICE),
        scheduler=lambda work: reactor.callLater(0, work),
    )


@implementer(IPushProducer)
class _StreamedBody:
    """
    Writes one long body (a /metrics exposition, a /routes page) to one
    request, a few services at a time over reactor turns (see
    L{Metrics.exposition}, L{Routes.chunks}), pausing while the client
    reads slowly and stopping if it goes.
    """

    _log = Logger()

    def __init__(
        self,
        request: Request,
        chunks: Iterator[bytes],
        cooperator: Cooperator,
        what: str = "/metrics",
    ) -> None:
        self._request = request
        self._chunks = chunks
        self._cooperator = cooperator
        self._what = what
        self._paused = False
        self._stopped = False

    def start(self) -> None:
        request = self._request
        self._task = self._cooperator.cooperate(self._write())
        request.registerProducer(self, True)
        request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._task.whenDone().addCallbacks(self._done, self._failed)

    def _write(self) -> Iterator[None]:
        request = self._request
        for chunk in self._chunks:
            if chunk:
                request.write(chunk)
            yield None

    def _done(self, _: object) -> None:
        request = self._request
        request.unregisterProducer()
        if not request.finished and not requestDisconnected(request):
            request.finish()

    def _failed(self, reason: Failure) -> None:
        if reason.check(TaskStopped):
            return
        self._log.failure("rendering {what} failed", reason, what=self._what)
        # Part of the body is sent: cut the connection rather than end a
        # truncated exposition that would parse.
        self._request.unregisterProducer()
        self._request.loseConnection()

    def pauseProducing(self) -> None:
        if not self._paused and not self._stopped:
            self._paused = True
            self._task.pause()

    def resumeProducing(self) -> None:
        if self._paused and not self._stopped:
            self._paused = False
            self._task.resume()

    def stopProducing(self) -> None:
        if not self._stopped:
            self._stopped = True
            try:
                self._task.stop()
            except TaskFinished:
                pass


class PrometheusMetrics(_Leaf):
    """
    C{/metrics}, from monedge's own metrics, in the Prometheus text format:
    written over several reactor turns with C{cooperator} (see
    L{metricsCooperator}), so that a scrape of thousands of services never
    holds traffic up for more than a slice.
    """

    def __init__(self, metrics: Metrics, cooperator: Cooperator | None = None) -> None:
        super().__init__()
        self._metrics = metrics
        self._cooperator = cooperator or Cooperator()

    def render_GET(self, request: Request) -> int:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        _StreamedBody(request, self._metrics.exposition(), self._cooperator).start()
        return NOT_DONE_YET

    def render_HEAD(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return b""


#: Services on a /routes page unless C{?limit=} says otherwise, and the most
#: C{?limit=} may ask for.
ROUTES_LIMIT = 100
ROUTES_MAX_LIMIT = 1000

_ROUTES_PARAMETERS = ("service", "q", "limit", "after")


class BadQuery(ValueError):
    """
    A /routes query monedge cannot answer; the message says why.
    """


@dataclass(frozen=True)
class RoutesQuery:
    """
    Which services a /routes page shows.

    @ivar service: only the service of this exact name.
    @ivar q: only services whose name contains this.
    @ivar limit: at most this many services (L{None}: every one).
    @ivar after: only services whose name sorts after this (the previous
        page's C{next}).
    """

    service: str | None = None
    q: str | None = None
    limit: int | None = None
    after: str | None = None

    @classmethod
    def fromArgs(cls, args: Mapping[bytes, Sequence[bytes]]) -> RoutesQuery:
        """
        Parse a request's query arguments.

        @raise BadQuery: for an unknown or repeated parameter, one that is
            not UTF-8, or a limit that is not a whole number from 1 to
            L{ROUTES_MAX_LIMIT}.
        """
        values: dict[str, str] = {}
        for key, given in args.items():
            name = key.decode("utf-8", "replace")
            if name not in _ROUTES_PARAMETERS:
                raise BadQuery(
                    f"unknown parameter {name!r}: use " + ", ".join(_ROUTES_PARAMETERS)
                )
            if len(given) != 1:
                raise BadQuery(f"parameter {name!r} given more than once")
            try:
                values[name] = given[0].decode("utf-8")
            except UnicodeDecodeError:
                raise BadQuery(f"parameter {name!r} is not UTF-8") from None
        limit = ROUTES_LIMIT
        if "limit" in values:
            text = values["limit"]
            if not (text.isascii() and text.isdigit()) or not (
                1 <= int(text) <= ROUTES_MAX_LIMIT
            ):
                raise BadQuery(
                    f"limit must be a whole number from 1 to {ROUTES_MAX_LIMIT}"
                )
            limit = int(text)
        return cls(values.get("service"), values.get("q"), limit, values.get("after"))


def _badQuery(request: Request, error: BadQuery) -> bytes:
    """
    A 400 for a bad admin query, with an error body in the shape of
    docs/errors.md's (no request id: the admin site gives none).
    """
    document = {"status": 400, "code": "bad_request", "message": str(error)}
    return _json(request, 400, document)


class Routes(_Leaf):
    """
    C{/routes}: the route table as the proxy sees it.
    """

    def __init__(
        self,
        registry: IServiceRegistry,
        hostTiers: HostTiers,
        balancer: Balancer,
        globalHooks: Sequence[HookSpec] = (),
        cooperator: Cooperator | None = None,
    ) -> None:
        super().__init__()
        self._registry = registry
        self._hostTiers = hostTiers
        self._balancer = balancer
        self._globalHooks = tuple(globalHooks)
        self._cooperator = cooperator or Cooperator()

    def render_GET(self, request: Request) -> bytes | int:
        try:
            query = RoutesQuery.fromArgs(request.args or {})
        except BadQuery as error:
            return _badQuery(request, error)
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        # A page of a thousand services takes a quarter of a second to
        # describe: it is written a slice at a time, as /metrics is.
        _StreamedBody(request, self.chunks(query), self._cooperator, "/routes").start()
        return NOT_DONE_YET

    def render_HEAD(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return b""

    def chunks(self, query: RoutesQuery | None = None) -> Iterator[bytes]:
        """
        L{document}'s JSON, as the admin site writes JSON, in pieces: the
        document around its services, then each service (each piece some
        work, so a cooperator can interleave them with traffic).
        """
        page, following, describe = self._select(query or RoutesQuery())
        marker = "\0services\0"
        outline = _jsonBody(self._outline([marker], following))
        before, after = outline.split(json.dumps(marker).encode("ascii"), 1)
        yield before
        for index, name in enumerate(page):
            text = json.dumps(describe(name), indent=2, sort_keys=True)
            # Nested two levels down: "services", then the list.
            piece = text.replace("\n", "\n    ").encode("utf-8")
            yield piece if index == 0 else b",\n    " + piece
        yield after

    def document(self, query: RoutesQuery | None = None) -> dict[str, Any]:
        """
        The route table as JSON-able data: the services C{query} selects
        (by default, every one), in name order, and in C{next} the last
        one's name when more remain (L{None} otherwise).
        """
        page, following, describe = self._select(query or RoutesQuery())
        return self._outline([describe(name) for name in page], following)

    def _outline(self, services: list[Any], following: str | None) -> dict[str, Any]:
        """
        The document with C{services} as its services (already redacted).
        """
        # Redacted on the way out: hook options by their hook's rule, then
        # the whole document (URL user-info and queries in registry errors,
        # sources and options; secret-named options): see monedge.rules.redact.
        document: dict[str, Any] = redactValue(
            {
                "registry": dict(self._registry.describe()),
                "global_hooks": [
                    redactHook(spec.asJSON()) for spec in self._globalHooks
                ],
                "tiers": sorted(self._hostTiers.tiers()),
            }
        )
        document["services"] = services
        document["next"] = following
        return document

    def _select(
        self, query: RoutesQuery
    ) -> tuple[list[str], str | None, Callable[[str], dict[str, Any]]]:
        """
        The names of the services on C{query}'s page, the C{next} cursor,
        and what describes one of them (redacted).
        """
        tiers = self._hostTiers.tiers()
        hostsByTier: dict[str, list[str]] = {}
        for host, tier in self._hostTiers.mapping.items():
            hostsByTier.setdefault(tier, []).append(host)
        table = self._registry.services()
        if query.service is not None:
            names = [query.service] if query.service in table else []
        else:
            names = sorted(table)
        start = 0 if query.after is None else bisect_right(names, query.after)
        matching: Iterator[str] = iter(names[start:])
        if query.q:
            text = query.q
            matching = (name for name in matching if text in name)
        if query.limit is None:
            page = list(matching)
            following = None
        else:
            page = list(islice(matching, query.limit + 1))
            following = page[query.limit - 1] if len(page) > query.limit else None
            del page[query.limit :]

        def describe(name: str) -> dict[str, Any]:
            entry = table[name]
            parsed = parseServiceName(name)
            routable = parsed is not None and parsed[0] in tiers and entry.policy.expose
            usable = set(eligible(entry.endpoints))
            endpoints = []
            for state in self._balancer.states(entry.endpoints):
                description = state.endpoint.asJSON()
                description["eligible"] = state.endpoint in usable
                description["outstanding"] = state.outstanding
                description["connect_failures"] = state.failures
                endpoints.append(description)
            if parsed is None or parsed[0] not in tiers:
                hosts: list[str] = []
            elif self._hostTiers.mapping:
                hosts = sorted(hostsByTier[parsed[0]])
            else:
                hosts = ["*"]
            policy = entry.policy.asJSON()
            policy["hooks"] = [redactHook(hook) for hook in policy["hooks"]]
            described: dict[str, Any] = redactValue(
                {
                    "name": name,
                    "routable": routable,
                    "path": f"/{parsed[1]}/" if parsed else None,
                    "hosts": hosts,
                    "policy": policy,
                    "endpoints": endpoints,
                    "source": dict(entry.source),
                }
            )
            return described

        return page, following, describe


class AdminRoot(Resource):
    """
    The admin site's root.
    """

    def getChild(self, path: bytes, request: Request) -> IResource:
        return pages.notFound()


class _AdminSite(Site):
    """
    An admin site: no tracebacks shown, and no access log (probes and
    scrapes come every few seconds).
    """

    displayTracebacks = False

    def log(self, request: object) -> None:
        pass


def adminSite(
    readiness: Callable[[], tuple[bool, str]],
    metrics: Metrics,
    registry: IServiceRegistry,
    hostTiers: HostTiers,
    balancer: Balancer,
    reactor: Any,
    globalHooks: Sequence[HookSpec] = (),
) -> Site:
    """
    Build the admin site.
    """
    root = AdminRoot()
    root.putChild(b"healthz", Health())
    root.putChild(b"readyz", Ready(readiness))
    # One cooperator shares the reactor's turns out among long pages.
    cooperator = metricsCooperator(reactor)
    root.putChild(b"metrics", PrometheusMetrics(metrics, cooperator))
    root.putChild(
        b"routes", Routes(registry, hostTiers, balancer, globalHooks, cooperator)
    )
    return _AdminSite(root, reactor=reactor)


class _GroupLeaf(_Leaf):
    """
    A group admin page built from the workers' answers, asynchronously.
    """

    def __init__(self, group: WorkerGroup, fetch: Fetch) -> None:
        super().__init__()
        self._group = group
        self._fetch = fetch

    def _ask(
        self, path: str
    ) -> Deferred[list[tuple[Worker, tuple[int, bytes] | None]]]:
        """
        GET C{path} from every running worker; L{None} for one that failed.
        """
        workers = [worker for worker in self._group.workers if worker.alive]

        def answered(results: list[tuple[bool, Any]]) -> list[Any]:
            return [
                (worker, value if ok else None)
                for worker, (ok, value) in zip(workers, results, strict=True)
            ]

        asked = [self._fetch(worker, path) for worker in workers]
        return DeferredList(asked, consumeErrors=True).addCallback(answered)

    def render_GET(self, request: Request) -> int:
        d = self.build(request)

        def write(body: bytes) -> None:
            if not request.finished and not requestDisconnected(request):
                request.write(body)
                request.finish()

        def failed(reason: Failure) -> None:
            self._log.failure("group admin page failed", reason)
            write(_json(request, 500, {"error": "internal"}))

        d.addCallback(write).addErrback(failed)
        return NOT_DONE_YET

    _log = Logger()

    def build(self, request: Request) -> Deferred[bytes]:
        raise NotImplementedError()


class GroupReady(_GroupLeaf):
    """
    C{/readyz} for a group: ready when the supervisor holds every proxy
    listener and every worker runs and is ready.
    """

    def build(self, request: Request) -> Deferred[bytes]:
        group = self._group

        def decide(answers: list[tuple[Worker, tuple[int, bytes] | None]]) -> bytes:
            reasons = []
            if group.draining:
                reasons.append("draining")
            idle = group.notListening()
            if idle:
                reasons.append("not listening: " + ", ".join(idle))
            for worker in group.workers:
                if not worker.alive:
                    reasons.append(f"worker {worker.number}: not running")
            for worker, answer in answers:
                if answer is None:
                    reasons.append(f"worker {worker.number}: admin did not answer")
                elif answer[0] != 200:
                    try:
                        reason = json.loads(answer[1])["reason"]
                    except (ValueError, KeyError, TypeError):
                        reason = f"status {answer[0]}"
                    reasons.append(f"worker {worker.number}: {reason}")
            ready = not reasons
            document = {
                "ready": ready,
                "reason": "; ".join(reasons) if reasons else "serving",
                "workers": len(group.workers),
            }
            return _json(request, 200 if ready else 503, document)

        return self._ask("/readyz").addCallback(decide)


class GroupCollector:
    """
    The group's own metrics: workers configured and alive, restarts, and
    workers whose metrics a scrape missed.
    """

    def __init__(self, group: WorkerGroup, unanswered: int) -> None:
        self._group = group
        self._unanswered = unanswered

    def collect(self) -> Iterator[Metric]:
        workers = GaugeMetricFamily(
            "monedge_workers", "Worker processes configured (--workers)."
        )
        workers.add_metric([], len(self._group.workers))
        yield workers
        alive = GaugeMetricFamily("monedge_workers_alive", "Worker processes running.")
        alive.add_metric([], self._group.alive())
        yield alive
        restarts = CounterMetricFamily(
            "monedge_worker_restarts",
            "Times each worker was restarted after it died.",
            labels=["worker"],
        )
        for worker in self._group.workers:
            restarts.add_metric([str(worker.number)], worker.restarts)
        yield restarts
        unanswered = GaugeMetricFamily(
            "monedge_worker_scrape_failures",
            "Running workers whose metrics this scrape could not read.",
        )
        unanswered.add_metric([], self._unanswered)
        yield unanswered


class GroupMetrics(_GroupLeaf):
    """
    C{/metrics} for a group: the workers' metrics merged (see
    L{mergeExpositions}), and the group's own.
    """

    def build(self, request: Request) -> Deferred[bytes]:
        def merge(answers: list[tuple[Worker, tuple[int, bytes] | None]]) -> bytes:
            texts = [
                answer[1].decode("utf-8")
                for _, answer in answers
                if answer is not None and answer[0] == 200
            ]
            registry = CollectorRegistry(auto_describe=False)
            registry.register(StaticCollector(mergeExpositions(texts)))
            registry.register(GroupCollector(self._group, len(answers) - len(texts)))
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
            return generate_latest(registry)

        return self._ask("/metrics").addCallback(merge)


class GroupRoutes(_GroupLeaf):
    """
    C{/routes} for a group: the first running worker's table (they share
    one configuration), and every worker's state.
    """

    def build(self, request: Request) -> Deferred[bytes]:
        args = request.args or {}
        try:
            RoutesQuery.fromArgs(args)
        except BadQuery as error:
            return succeed(_badQuery(request, error))
        # Valid, so each parameter is known, once and UTF-8: the worker is
        # asked for the same page, its defaults applying to the rest.
        pairs = sorted((key.decode(), value[0].decode()) for key, value in args.items())
        path = "/routes" + ("?" + urlencode(pairs) if pairs else "")

        def pick(answers: list[tuple[Worker, tuple[int, bytes] | None]]) -> bytes:
            workers = [worker.asJSON() for worker in self._group.workers]
            for worker, answer in answers:
                if answer is not None and answer[0] == 400:
                    # The worker refused the query: its reason, as it is.
                    return _json(request, 400, redactValue(json.loads(answer[1])))
                if answer is not None and answer[0] == 200:
                    # Each worker redacts its own; once more here, so the
                    # group's table never shows more than a worker's would.
                    document = redactValue(json.loads(answer[1]))
                    document["workers"] = workers
                    document["answered_by"] = worker.number
                    return _json(request, 200, document)
            return _json(
                request,
                503,
                {"error": "no worker answered", "workers": workers},
            )

        return self._ask(path).addCallback(pick)


class GroupHealth(_Leaf):
    """
    C{/healthz} for a group: the supervisor lives.
    """

    def __init__(self, group: WorkerGroup) -> None:
        super().__init__()
        self._group = group

    def render_GET(self, request: Request) -> bytes:
        document = {
            "status": "ok",
            "workers": len(self._group.workers),
            "workers_alive": self._group.alive(),
        }
        return _json(request, 200, document)


def groupAdminSite(group: WorkerGroup, fetch: Fetch, reactor: Any) -> Site:
    """
    The admin site of a C{--workers} group, answering for every worker.

    @param fetch: GETs a path from a worker's own admin site.
    """
    root = AdminRoot()
    root.putChild(b"healthz", GroupHealth(group))
    root.putChild(b"readyz", GroupReady(group, fetch))
    root.putChild(b"metrics", GroupMetrics(group, fetch))
    root.putChild(b"routes", GroupRoutes(group, fetch))
    return _AdminSite(root, reactor=reactor)
